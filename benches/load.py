#!/usr/bin/env python3
"""Cold load, Kindling beside llama.cpp, on the same GGUF files.

    cargo build --release --bin kindling
    .venv-bench/bin/python benches/load.py [--runs 3] [GGUF ...]   # default: the demo model

Each run starts from a new process with the file dropped from the page cache
(`posix_fadvise(DONTNEED)`, what a fresh node has):

- Kindling: `kindling serve` with the demo model's manifest pointed at the
  file (as benches/serving.py --gguf does), then one completion of one token.
  Reported: the daemon's own `model loaded` time (`elapsed_ms`: reading,
  and laying the weights out for our kernels), and spawn to first token.
- llama.cpp: a new Python process that builds `llama_cpp.Llama(GGUF,
  n_ctx=512, n_threads=2)` (llama.cpp memory-maps the file) and evaluates one
  token. Reported: the constructor's time, and process start to the first
  token's logits.

Medians over --runs. Prints a Markdown table.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import GGUF, MODEL, ROOT, VENV, Kindling, config_for_gguf  # noqa: E402

LLAMA_PROBE = r"""
import sys, time
t0 = time.perf_counter()
import llama_cpp
t1 = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
t2 = time.perf_counter()
llm.eval([llm.token_bos() if llm.token_bos() >= 0 else 0])
t3 = time.perf_counter()
print(f"{t2 - t1} {t3 - t0}")
"""


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def kindling_once(binary: str, gguf: Path, workdir: Path):
    config = config_for_gguf(gguf, ROOT / "benches" / "kindling.toml", workdir)
    drop_from_cache(gguf)
    loaded = []
    start = time.perf_counter()
    server = Kindling(binary, config, 2, on_line=lambda line: loaded.append(line)
                      if "model loaded" in line else None)
    try:
        host, port = server.base
        body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
        req = urllib.request.Request(f"http://{host}:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
        first_token = time.perf_counter() - start
    finally:
        server.stop()
    elapsed = None
    for line in loaded:
        m = re.search(r"elapsed_ms=(\d+)", line)
        if m:
            elapsed = int(m.group(1)) / 1e3
    return elapsed, first_token


def llama_once(gguf: Path):
    drop_from_cache(gguf)
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", LLAMA_PROBE, str(gguf)],
                         capture_output=True, text=True, check=True)
    load, first = out.stdout.split()[-2:]
    return float(load), float(first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("gguf", nargs="*", type=Path, default=[GGUF])
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    print("| file | size | Kindling load (ms) | llama.cpp load (ms) | ratio | Kindling start → first token (ms) | llama.cpp start → first token (ms) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for gguf in args.gguf:
        gguf = gguf.resolve()
        with tempfile.TemporaryDirectory(prefix="kindling-load-") as work:
            ours = [kindling_once(binary, gguf, Path(work)) for _ in range(args.runs)]
        theirs = [llama_once(gguf) for _ in range(args.runs)]
        k_load = statistics.median(o[0] for o in ours) * 1e3
        k_first = statistics.median(o[1] for o in ours) * 1e3
        l_load = statistics.median(t[0] for t in theirs) * 1e3
        l_first = statistics.median(t[1] for t in theirs) * 1e3
        size = gguf.stat().st_size / 1e6
        print(f"| {gguf.name} | {size:.0f} MB | {k_load:.0f} | {l_load:.0f} | {k_load / l_load:.2f} "
              f"| {k_first:.0f} | {l_first:.0f} | {k_first / l_first:.2f} |")


if __name__ == "__main__":
    main()
