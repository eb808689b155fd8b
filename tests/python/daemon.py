"""Starts the real `kindling` binary for the Python tests (KINDLING_BIN,
else target/debug/kindling) on a free loopback port."""
import os
import queue
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def binary():
    return os.environ.get("KINDLING_BIN", str(ROOT / "target" / "debug" / "kindling"))


def store():
    """The model store (KINDLING_STORE, else store/)."""
    return Path(os.environ.get("KINDLING_STORE", str(ROOT / "store")))


def start(config, *args):
    """`kindling serve --config CONFIG --listen 127.0.0.1:0 ARGS…`: returns
    the process, its address and its log lines so far (still filling)."""
    proc = subprocess.Popen(
        [binary(), "serve", "--config", str(config), "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    addresses: "queue.Queue[str]" = queue.Queue()
    log = []

    def drain():
        for line in proc.stdout:
            log.append(line)
            if "listening on http://" in line:
                addresses.put(line.split("listening on http://")[1].split()[0])

    threading.Thread(target=drain, daemon=True).start()
    try:
        return proc, addresses.get(timeout=20), log
    except queue.Empty:
        proc.kill()
        pytest.fail("kindling did not start:\n" + "".join(log))


def stop(proc, log):
    """SIGTERM, and the daemon must exit 0."""
    proc.terminate()
    assert proc.wait(timeout=30) == 0, "".join(log)
