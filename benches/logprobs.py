"""What log-probabilities cost: decode speed of the demo model with no
logprobs, with `logprobs: true` (the chosen token only) and with
`top_logprobs: 20`, single-stream and over 16 concurrent streams, side by
side in one run (runs interleaved, so drift hits every setting alike).

    KINDLING_BIN=target/release/kindling python3 benches/logprobs.py [--runs 5]

Each request is a chat completion decoding `--tokens` tokens (ignore_eos,
temperature 0). Prints a Markdown table for BENCHMARKS.md: tokens per second
(median of the runs) and each setting's speed relative to no logprobs.
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

SETTINGS = {
    "no logprobs": {},
    "logprobs (chosen token)": {"logprobs": True},
    "top_logprobs: 20": {"logprobs": True, "top_logprobs": 20},
}


def chat(base, tokens, extra):
    host, port = base
    body = {
        "model": "smollm2-135m", "temperature": 0, "ignore_eos": True, "max_tokens": tokens,
        "messages": [{"role": "user", "content": "Tell me about the sea."}], **extra,
    }
    req = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    n = out["usage"]["completion_tokens"]
    if n != tokens:
        sys.exit(f"expected {tokens} tokens, got {n}")
    if "top_logprobs" in extra and len(out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) != 20:
        sys.exit("top_logprobs missing")
    return n


def rate(base, tokens, extra, streams):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(lambda _: chat(base, tokens, extra), range(streams)))
    return total / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    k = Kindling(binary, ROOT / "configs" / "kindling.toml", args.threads)
    try:
        chat(k.base, 8, {})  # load the model
        results = {(name, s): [] for name in SETTINGS for s in (1, args.streams)}
        for _ in range(args.runs):
            for streams in (1, args.streams):
                for name, extra in SETTINGS.items():
                    results[(name, streams)].append(rate(k.base, args.tokens, extra, streams))
    finally:
        k.stop()
    print(f"| setting | 1 stream tok/s | vs none | {args.streams} streams tok/s | vs none |")
    print("|---|---|---|---|---|")
    base = {s: statistics.median(results[("no logprobs", s)]) for s in (1, args.streams)}
    for name in SETTINGS:
        one = statistics.median(results[(name, 1)])
        many = statistics.median(results[(name, args.streams)])
        print(f"| {name} | {one:.1f} | {one / base[1]:.3f} | {many:.1f} | {many / base[args.streams]:.3f} |")


if __name__ == "__main__":
    main()
