"""Client and server plumbing for benches/serving.py: a minimal asyncio
HTTP/1.1 client that streams one completion per fresh connection and times
its chunks, and the two servers under test (Kindling and llama-server) as
child processes."""
import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-bench"
GGUF = ROOT / "store" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m"
LLAMA_SERVER = VENV / "bin" / "llama-server"


@dataclass
class Stream:
    start: float = 0.0
    end: float = 0.0
    times: list = field(default_factory=list)  # arrival of each chunk with text
    usage_tokens: int = None
    prompt_tokens: int = None  # usage.prompt_tokens, when the server sent usage
    finish_reason: str = None
    error: str = None

    @property
    def tokens(self):
        return self.usage_tokens if self.usage_tokens is not None else len(self.times)


def pct(values, q):
    """The q-th percentile of values, interpolated linearly; None if empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def stream_chat(base, body):
    """POSTs a streaming chat completion `body` to `base` (host, port); exits
    on a non-200 answer. Returns (time to first text s, text, usage, total s)."""
    host, port = base
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        sys.exit(f"{resp.status}: {resp.read()[:300]}")
    ttft, text, usage = None, [], {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            piece = (c.get("delta") or {}).get("content")
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    total = time.perf_counter() - t0
    conn.close()
    return ttft, "".join(text), usage, total


class ServerError(Exception):
    pass


class SseReader:
    def __init__(self, s: Stream):
        self.s = s
        self.buf = b""
        self.done = False

    def feed(self, data: bytes) -> bool:
        """Parses complete lines; True once `data: [DONE]` was seen."""
        now = time.perf_counter()
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                return False
            line, self.buf = self.buf[:i].rstrip(b"\r"), self.buf[i + 1:]
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                return True
            obj = json.loads(payload)
            if "error" in obj:
                raise ServerError(json.dumps(obj["error"])[:300])
            usage = obj.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                self.s.usage_tokens = usage["completion_tokens"]
            if usage and usage.get("prompt_tokens") is not None:
                self.s.prompt_tokens = usage["prompt_tokens"]
            for choice in obj.get("choices") or []:
                if choice.get("text"):
                    self.s.times.append(now)
                if choice.get("finish_reason"):
                    self.s.finish_reason = choice["finish_reason"]


async def _exchange(host, port, body: bytes, s: Stream, api_key=None):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        writer.write(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2:
            raise ConnectionError(f"bad status line {status_line!r}")
        status = int(parts[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        if status != 200:
            rest = await reader.read(2000)
            raise ServerError(f"HTTP {status}: {rest[:300]!r}")
        sse = SseReader(s)
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                chunk = await reader.readexactly(size + 2)
                if sse.feed(chunk[:-2]):
                    break
        else:
            while True:
                chunk = await reader.read(65536)
                if not chunk or sse.feed(chunk):
                    break
        if not sse.done:
            raise ServerError("stream ended without [DONE]")
    finally:
        writer.close()


async def stream_completion(base, prompt_ids, max_tokens, timeout, api_key=None, stream=None) -> Stream:
    """`prompt_ids`: token ids or a text. `api_key`: sent as `Authorization:
    Bearer`. `stream`: a Stream to fill in (its start is set here), so that a
    caller who cancels the task keeps the chunks timed so far."""
    host, port = base
    body = json.dumps({
        "model": MODEL, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    s = stream if stream is not None else Stream()
    s.start = time.perf_counter()
    try:
        await asyncio.wait_for(_exchange(host, port, body, s, api_key), timeout)
        if not s.times:
            raise ServerError("no tokens")
    except Exception as e:  # noqa: BLE001 - every failure is an error count
        s.error = f"{type(e).__name__}: {e}"[:300]
    s.end = time.perf_counter()
    return s


# -- servers -----------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Kindling:
    """`extra_args`: more `kindling serve` arguments (e.g. `--api-key K`);
    `rust_log`: RUST_LOG; `on_line`: called with each line the daemon logs."""

    def __init__(self, binary, config, threads, extra_args=(), rust_log="warn,kindling=info", on_line=None):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG=rust_log)
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", str(config), "--listen", "127.0.0.1:0", *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.tail = []
        found = threading.Event()
        self.addr = None

        def drain():
            for line in self.proc.stdout:
                self.tail = (self.tail + [line.rstrip()])[-20:]
                if on_line is not None:
                    on_line(line)
                if self.addr is None and "listening on http://" in line:
                    self.addr = line.split("listening on http://")[1].split()[0]
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(60):
            self.stop()
            sys.exit("kindling did not start:\n" + "\n".join(self.tail))
        host, port = self.addr.rsplit(":", 1)
        self.base = (host, int(port))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def config_for_gguf(gguf: Path, base_config: Path, workdir: Path) -> Path:
    """A copy of `base_config` whose demo-model manifest serves `gguf` instead
    (same id and settings), written under `workdir`."""
    manifest = (ROOT / "configs" / "models" / f"{MODEL}.toml").read_text()
    manifest = re.sub(r'(?m)^path = ".*"$', f'path = "{gguf.resolve()}"', manifest)
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    (workdir / "models" / f"{MODEL}.toml").write_text(manifest)
    config = base_config.read_text()
    config = re.sub(r'(?m)^manifests = ".*"$', f'manifests = "{workdir / "models"}"', config)
    config = re.sub(r'(?m)^store = ".*"$', f'store = "{ROOT / "store"}"', config)
    path = workdir / "kindling.toml"
    path.write_text(config)
    return path


class LlamaServer:
    def __init__(self, threads, slots, ctx_per_slot, gguf=GGUF):
        port = free_port()
        self.args = [str(LLAMA_SERVER), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                     "-np", str(slots), "-c", str(slots * ctx_per_slot), "--cont-batching",
                     "--no-webui", "--host", "127.0.0.1", "--port", str(port)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = ("127.0.0.1", port)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.fail("exited")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail("not healthy after 120 s")
            time.sleep(0.2)

    def fail(self, why):
        self.stop()
        self.log.seek(0)
        sys.exit(f"llama-server {why}: {' '.join(self.args)}\n" + "".join(self.log.readlines()[-30:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
