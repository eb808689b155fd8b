#!/usr/bin/env python3
"""CPU a Kindling daemon uses while its only client has stopped reading.

Starts the daemon (KINDLING_BIN, else target/release/kindling) with the
given config and sends one streaming chat request. The request asks for 8
choices with 20 log-probability alternatives per token, so every step
produces kilobytes. The client uses a small receive buffer and then never
reads. Once the daemon's CPU time stops growing (its buffers for that client
are full), the script measures the daemon's CPU time over --seconds and
prints it as a share of one core.

    benches/stalled_client.py --config benches/kindling.toml --seconds 10
"""

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, Kindling  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "benches" / "kindling.toml")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    server = Kindling(binary, args.config, args.threads)
    try:
        body = json.dumps({
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": 4000, "n": 8, "logprobs": True, "top_logprobs": 20,
            "ignore_eos": True, "stream": True, "seed": 1,
        }).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.base)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: kindling\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        pid = server.proc.pid
        last, started = cpu_seconds(pid), time.monotonic()
        while True:
            time.sleep(0.5)
            now = cpu_seconds(pid)
            if now - last < 0.02:
                break
            last = now
            if time.monotonic() - started > 600:
                sys.exit("the daemon never stopped working")
        stalled_after = time.monotonic() - started
        before = cpu_seconds(pid)
        time.sleep(args.seconds)
        used = cpu_seconds(pid) - before
        print(json.dumps({
            "binary": binary,
            "stalled_after_s": round(stalled_after, 1),
            "window_s": args.seconds,
            "cpu_s": round(used, 3),
            "cpu_share_of_one_core": round(used / args.seconds, 4),
        }))
        sock.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
