"""Prefix caching on a multi-turn chat workload: several conversations at
once, all opening with the same long system prompt (about 1.5k tokens),
each going on for a few turns. Side by side in one run: Kindling with its
prefix cache, Kindling without it, llama-server with its prompt cache
(`cache_prompt`, on by default; one slot per conversation) and llama-server
with it off.

    KINDLING_BIN=target/release/kindling python3 benches/prefix_cache.py [--runs 2]

Prints a Markdown table for BENCHMARKS.md: mean and p90 time to first token
over every turn, turn 1 alone and later turns alone, completion tokens per
second over the whole workload, and the prompt tokens each server reported
as cached.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, Kindling, LlamaServer, pct, stream_chat  # noqa: E402

SYSTEM = ("You are the support assistant of a company that sells garden tools. "
          "Answer politely, mention the warranty when it matters, never invent prices. ") * 48
QUESTIONS = ["Hello! Which spade should I buy?", "What about a rake?", "And for a small balcony?",
             "Thanks. How long is the warranty?"]


def turn(base, model, messages, tokens, extra):
    body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    ttft, text, usage, _ = stream_chat(base, body)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ttft, text, usage.get("completion_tokens", 0), cached


def conversation(base, model, tokens, extra, user):
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": f"(customer {user}) {q}"})
        ttft, text, n, cached = turn(base, model, messages, tokens, extra)
        messages.append({"role": "assistant", "content": text})
        out.append((ttft, n, cached))
    return out


def workload(base, model, users, tokens, extra):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        convs = list(pool.map(lambda u: conversation(base, model, tokens, extra, u), range(users)))
    wall = time.perf_counter() - t0
    turns = [t for c in convs for t in c]
    return {
        "ttft": [t[0] for t in turns if t[0] is not None],
        "first": [c[0][0] for c in convs if c[0][0] is not None],
        "later": [t[0] for c in convs for t in c[1:] if t[0] is not None],
        "tps": sum(t[1] for t in turns) / wall,
        "cached": sum(t[2] for t in turns),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    results = {}

    def record(name, r):
        agg = results.setdefault(name, {"ttft": [], "first": [], "later": [], "tps": [], "cached": []})
        for k in ("ttft", "first", "later"):
            agg[k] += r[k]
        agg["tps"].append(r["tps"])
        agg["cached"].append(r["cached"])

    with tempfile.TemporaryDirectory() as d:
        configs = {}
        for on in (True, False):
            path = Path(d) / f"kindling-{on}.toml"
            path.write_text(f'[models]\nmanifests = "{ROOT / "configs" / "models"}"\nstore = "{ROOT / "store"}"\n'
                            f"[engine]\nprefix_caching = {str(on).lower()}\nkv_cache_tokens = 32768\n")
            configs[on] = path
        for _ in range(args.runs):
            for on in (True, False):
                k = Kindling(binary, configs[on], args.threads)
                try:
                    turn(k.base, "smollm2-135m", [{"role": "user", "content": "hi"}], 4, {})
                    record(f"Kindling, prefix cache {'on' if on else 'off'}",
                           workload(k.base, "smollm2-135m", args.users, args.tokens, {"ignore_eos": True}))
                finally:
                    k.stop()
            server = LlamaServer(args.threads, args.users, 8192)
            try:
                for cache in (True, False):
                    extra = {"cache_prompt": cache, "ignore_eos": True}
                    record(f"llama-server, cache_prompt {'on' if cache else 'off'}",
                           workload(server.base, "smollm2", args.users, args.tokens, extra))
            finally:
                server.stop()
    print(f"| server | TTFT mean s | TTFT p90 s | turn 1 mean s | later turns mean s | tok/s | cached prompt tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {statistics.mean(r['ttft']):.3f} | {pct(r['ttft'], 90):.3f} | "
              f"{statistics.mean(r['first']):.3f} | {statistics.mean(r['later']):.3f} | "
              f"{statistics.median(r['tps']):.1f} | {int(statistics.median(r['cached']))} |")


if __name__ == "__main__":
    main()
