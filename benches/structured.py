"""What constrained decoding costs: decode speed of the demo model with no
constraint, under a JSON Schema (`response_format`), and forced into a tool
call (`tool_choice: required`), single-stream and over 16 concurrent
streams, side by side in one run (settings interleaved).

    KINDLING_BIN=target/release/kindling python3 benches/structured.py [--runs 5]

Each constrained request's grammar admits a long output: a JSON object with
an array of exactly 24 short strings (about 130 tokens), so generation runs
on the grammar, not on end-of-turn. The unconstrained runs decode the same
number of tokens (ignore_eos). Prints a Markdown table for BENCHMARKS.md:
completion tokens per second (median of the runs), each setting relative to
no constraint, and the time the constraint adds per token.
"""
import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, Kindling  # noqa: E402

WORDS = {"type": "object", "properties": {"words": {
    "type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 24, "maxItems": 24}},
    "required": ["words"]}
TOOL = [{"type": "function", "function": {"name": "store_words", "description": "Stores words",
                                          "parameters": WORDS}}]
SETTINGS = {
    "no constraint": {"ignore_eos": True},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "w", "strict": True, "schema": WORDS}}},
    "tool_choice: required": {"tools": TOOL, "tool_choice": "required", "parallel_tool_calls": False},
}


def chat(base, tokens, extra, seed):
    host, port = base
    body = {"model": "smollm2-135m", "temperature": 0.7, "seed": seed, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "List some words about the sea."}], **extra}
    req = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    choice = out["choices"][0]
    if "ignore_eos" not in extra and choice["finish_reason"] == "length":
        sys.exit(f"constrained output ran out of tokens: {choice}")
    return out["usage"]["completion_tokens"]


def rate(base, tokens, extra, streams):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(lambda i: chat(base, tokens, extra, i), range(streams)))
    return total / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=130, help="tokens of the unconstrained runs")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    k = Kindling(binary, ROOT / "benches" / "kindling.toml", args.threads)
    try:
        for extra in SETTINGS.values():  # load the model, build the grammar tables
            chat(k.base, 400, extra if "ignore_eos" not in extra else {"ignore_eos": True}, 0)
        results = {(name, s): [] for name in SETTINGS for s in (1, args.streams)}
        for _ in range(args.runs):
            for streams in (1, args.streams):
                for name, extra in SETTINGS.items():
                    limit = args.tokens if "ignore_eos" in extra else 400
                    results[(name, streams)].append(rate(k.base, limit, extra, streams))
    finally:
        k.stop()
    print(f"| setting | 1 stream tok/s | vs none | added ms/token | {args.streams} streams tok/s | vs none |")
    print("|---|---|---|---|---|---|")
    base = {s: statistics.median(results[("no constraint", s)]) for s in (1, args.streams)}
    for name in SETTINGS:
        one = statistics.median(results[(name, 1)])
        many = statistics.median(results[(name, args.streams)])
        added = (1 / one - 1 / base[1]) * 1000
        print(f"| {name} | {one:.1f} | {one / base[1]:.3f} | {added:+.2f} | {many:.1f} | "
              f"{many / base[args.streams]:.3f} |")


if __name__ == "__main__":
    main()
