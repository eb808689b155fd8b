"""Sleep and wake, measured: the daemon's resident memory awake and asleep at
each level, and the time from `POST /wake_up` to the first streamed token,
against a cold start (a new process whose weight files are out of the
page cache, from spawn to first token).

    KINDLING_BIN=target/release/kindling python3 benches/sleep_wake.py [--runs 3]

The memory figures are taken with all three demo models loaded (a chat, an
embedding and an image model); the times with the chat model alone, as in
the cold start. Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, Kindling, stream_completion  # noqa: E402

STORE = ROOT / "store"
PROMPT = "Write one sentence about the sea."


def request(base, method, path, body=None):
    host, port = base
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read() or b"null")


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def drop_page_cache():
    """Drops the store's files from the page cache (what a fresh node has)."""
    for path in STORE.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def first_token(base):
    s = asyncio.run(stream_completion(base, PROMPT, 4, 300))
    if s.error:
        sys.exit(f"stream failed: {s.error}")
    return s.times[0]


def load_all(base):
    request(base, "POST", "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "warm up"})
    request(base, "POST", "/v1/images/generations",
            {"model": "sd-tiny", "prompt": "a lighthouse", "size": "64x64",
             "response_format": "b64_json"})
    first_token(base)


def cold_start(binary, config):
    drop_page_cache()
    t0 = time.perf_counter()
    k = Kindling(binary, config, os.cpu_count())
    try:
        return first_token(k.base) - t0
    finally:
        k.stop()


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default=str(ROOT / "configs" / "kindling.toml"))
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))

    cold = [cold_start(binary, args.config) for _ in range(args.runs)]
    awake, asleep, held = [], {1: [], 2: []}, {}
    wake = {1: [], 2: []}
    k = Kindling(binary, args.config, os.cpu_count())
    try:
        for _ in range(args.runs):
            for level in (1, 2):
                # Memory: all three models resident, then asleep.
                load_all(k.base)
                time.sleep(0.5)
                awake.append(rss(k.proc.pid))
                report = request(k.base, "POST", f"/sleep?level={level}")
                held[level] = report["host_memory_bytes"]
                time.sleep(0.5)
                asleep[level].append(rss(k.proc.pid))
                request(k.base, "POST", "/wake_up")
                # Time: the chat model alone, as in the cold start.
                for model in ("all-minilm-l6-v2", "sd-tiny"):
                    request(k.base, "POST", f"/admin/models/{model}/unload")
                first_token(k.base)
                request(k.base, "POST", f"/sleep?level={level}")
                t0 = time.perf_counter()
                request(k.base, "POST", "/wake_up")
                wake[level].append(first_token(k.base) - t0)
    finally:
        k.stop()

    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"runs: {args.runs}; medians\n")
    print("| state | resident memory | to first token |")
    print("|---|---|---|")
    print(f"| cold start (new process, page cache dropped) | - | {median(cold) * 1e3:.0f} ms |")
    print(f"| awake, three models loaded | {mib(median(awake))} | - |")
    for level in (1, 2):
        print(f"| asleep, level {level} (weight files kept: {mib(held[level])}) "
              f"| {mib(median(asleep[level]))} | wake to first token: "
              f"{median(wake[level]) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
