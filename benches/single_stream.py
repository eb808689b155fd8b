#!/usr/bin/env python3
"""Single-stream speed, Kindling beside llama.cpp, on the demo GGUF, in one run.

    benches/setup.sh                         # once: builds the peer into .venv-bench
    cargo build --release --bin kindling
    .venv-bench/bin/python benches/single_stream.py [--threads 2] [--runs 5]

Kindling is measured through its HTTP API (streaming /v1/completions, greedy,
`ignore_eos`), as a user gets it. llama.cpp is measured in-process through
llama-cpp-python's low-level `eval` (no HTTP, no sampling overhead), with the
same thread count. Both process the same prompt token ids:

- prompt processing: a 128-token prompt and one output token; Kindling's time
  to first token vs llama.cpp's `eval(prompt)`.
- decode: 128 tokens after a short prompt; Kindling's time from the first to
  the last streamed token vs llama.cpp's 127 single-token `eval`s.

Medians over --runs runs after one warm-up. Prints a table and a JSON line.
"""
import argparse
import json
import os
import queue
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "store" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m"
TEXT = (
    "The history of the lighthouse is a story of fire, glass and stubborn people. "
    "Long before electric lamps, keepers climbed narrow stairs every evening to trim wicks, "
    "polish lenses and watch the sea for ships in trouble. "
) * 8


def start_kindling(threads: int):
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG="warn,kindling=info")
    proc = subprocess.Popen(
        [binary, "serve", "--config", str(ROOT / "configs" / "kindling.toml"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    found: "queue.Queue[str]" = queue.Queue()

    def drain():
        for line in proc.stdout:
            if "listening on http://" in line:
                found.put(line.split("listening on http://")[1].split()[0])

    threading.Thread(target=drain, daemon=True).start()
    return proc, "http://" + found.get(timeout=30)


def stream_times(base: str, prompt_ids, max_tokens: int):
    """Returns (seconds to first token, seconds first->last token, tokens)."""
    body = json.dumps({
        "model": MODEL, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = None
    chunks = 0
    with urllib.request.urlopen(req) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload["choices"] and payload["choices"][0].get("finish_reason") is None:
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    return first - start, last - first, chunks


def llama_times(llm, prompt_ids, decode_tokens: int):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    tok = int(np.argmax(logits))
    t2 = time.perf_counter()
    for _ in range(decode_tokens - 1):
        llm.eval([tok])
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()

    llm = llama_cpp.Llama(str(GGUF), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    ids = llm.tokenize(TEXT.encode(), add_bos=False)
    long_prompt = ids[: args.prompt_tokens]
    short_prompt = ids[:8]
    assert len(long_prompt) == args.prompt_tokens

    proc, base = start_kindling(args.threads)
    try:
        results = {"kindling": {"prefill": [], "decode": []}, "llama.cpp": {"prefill": [], "decode": []}}
        for run in range(args.runs + 1):  # run 0 warms up (and loads the model)
            ttft, _, _ = stream_times(base, long_prompt, 1)
            _, span, n = stream_times(base, short_prompt, args.decode_tokens)
            lp, _ = llama_times(llm, long_prompt, 1)
            _, ld = llama_times(llm, short_prompt, args.decode_tokens)
            if run == 0:
                continue
            results["kindling"]["prefill"].append(len(long_prompt) / ttft)
            results["kindling"]["decode"].append((n - 1) / span)
            results["llama.cpp"]["prefill"].append(len(long_prompt) / lp)
            results["llama.cpp"]["decode"].append((args.decode_tokens - 1) / ld)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    print(f"SmolLM2-135M Q4_1, {args.threads} threads, median of {args.runs} runs")
    print(f"{'':24}{'kindling':>12}{'llama.cpp':>12}{'ratio':>8}")
    for metric, label in [("prefill", f"prompt tok/s ({args.prompt_tokens})"), ("decode", f"decode tok/s ({args.decode_tokens})")]:
        k, l = med["kindling"][metric], med["llama.cpp"][metric]
        print(f"{label:24}{k:12.1f}{l:12.1f}{k / l:8.2f}")
    print(json.dumps({"threads": args.threads, "runs": args.runs, "median": med}))


if __name__ == "__main__":
    main()
