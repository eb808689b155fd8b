"""Kindling's embeddings against sentence-transformers (PyTorch, f32) on the
same all-MiniLM-L6-v2 weights and the same CPU threads, side by side in one run.

  .venv-bench/bin/python benches/embeddings.py [--threads 2] [--runs 5] [--no-amx]

Two workloads, each timed for both, best and median of `--runs`:

1. **Batch**: 256 sentences of ~32 tokens. sentence-transformers runs
   `model.encode(sentences, batch_size=32)` in-process; Kindling gets the 256
   sentences in one `/v1/embeddings` request over loopback HTTP (so its figure
   includes JSON and HTTP, which sentence-transformers' does not).
2. **Concurrent**: 64 single-sentence requests at once, from 64 client
   threads, several rounds. sentence-transformers sits behind a minimal
   threaded HTTP wrapper (`ThreadingHTTPServer`, one `encode([text])` per
   request); Kindling batches them dynamically.

Also reported, for context only: sentence-transformers under
`torch.autocast(bfloat16)`, since Kindling's AMX path multiplies in split
bf16 (three bf16 products per f32 product, f32 accumulation).

Set up with benches/setup.sh (it installs sentence-transformers) and build
Kindling with `cargo build --release`.
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, Kindling  # noqa: E402

MODEL = "all-minilm-l6-v2"
FOLDER = ROOT / "store" / MODEL
WORDS = ("the of and to in is was for on that with as by at from his her an were which are this "
         "be or had not but one have they you all their has been more when will there would who so no").split()


def sentences(count, words, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    if "data" not in out:
        raise RuntimeError(f"bad response: {out}")
    return out


def timed(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def concurrent(url, texts, clients):
    """Fires one request per text from `clients` threads; returns when all answered."""
    def one(text):
        return post(url, {"model": MODEL, "input": text})
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, texts))
    assert all(len(r["data"]) == 1 for r in results)


def st_server(model, port_holder, ready):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = model.encode(inputs, batch_size=32)
            out = json.dumps({"object": "list", "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)
            ]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # the default backlog (5) resets 64 concurrent clients

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_holder.append(server)
    ready.set()
    server.serve_forever()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 64 concurrent requests per run")
    ap.add_argument("--kindling-bin", default=str(ROOT / "target" / "release" / "kindling"))
    ap.add_argument("--no-amx", action="store_true",
                    help="run Kindling's f32 kernels ([devices.cpu] disable = [\"amx\"] in its config)")
    args = ap.parse_args()

    import torch
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(FOLDER), device="cpu")
    batch = sentences(256, 30, 1)
    tokens = statistics.mean(len(model.tokenizer(s)["input_ids"]) for s in batch)
    single = sentences(64 * args.rounds, 30, 2)
    results = {}

    # sentence-transformers, in-process.
    results["st_batch"] = timed(lambda: model.encode(batch, batch_size=32), args.runs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["st_batch_bf16"] = timed(lambda: model.encode(batch, batch_size=32), args.runs)

    # sentence-transformers behind a minimal HTTP wrapper.
    holder, ready = [], threading.Event()
    threading.Thread(target=st_server, args=(model, holder, ready), daemon=True).start()
    ready.wait()
    st_url = f"http://127.0.0.1:{holder[0].server_address[1]}/v1/embeddings"
    results["st_concurrent"] = timed(lambda: concurrent(st_url, single, 64), args.runs)
    holder[0].shutdown()

    # Kindling, as a server with only the embedding model.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        (tmp / "models" / f"{MODEL}.toml").write_text((ROOT / "configs" / "models" / f"{MODEL}.toml").read_text())
        devices = '[devices.cpu]\ndisable = ["amx"]\n' if args.no_amx else ""
        (tmp / "kindling.toml").write_text(f'[models]\nmanifests = "models"\nstore = "{ROOT / "store"}"\n{devices}')
        server = Kindling(args.kindling_bin, tmp / "kindling.toml", args.threads)
        try:
            url = f"http://{server.addr}/v1/embeddings"
            post(url, {"model": MODEL, "input": "load"})
            kernels = next((l.split("kernels=")[1].split()[0].strip('"') for l in server.tail if "kernels=" in l), "?")
            # Same vectors as sentence-transformers (a spot check of the run).
            ours = post(url, {"model": MODEL, "input": batch[:8]})["data"]
            theirs = model.encode(batch[:8])
            cos = min(float(sum(a * b for a, b in zip(o["embedding"], t))) for o, t in zip(ours, theirs))
            results["kindling_batch"] = timed(lambda: post(url, {"model": MODEL, "input": batch}), args.runs)
            results["kindling_concurrent"] = timed(lambda: concurrent(url, single, 64), args.runs)
        finally:
            server.stop()

    n_single = len(single)
    rate = lambda key, n: (n / results[key][0], n / results[key][1])  # noqa: E731
    rows = [
        ("256 sentences, one batch", rate("st_batch", 256), rate("kindling_batch", 256)),
        ("64 concurrent single-sentence requests", rate("st_concurrent", n_single), rate("kindling_concurrent", n_single)),
    ]
    print(f"\nall-MiniLM-L6-v2, {args.threads} threads, {tokens:.1f} tokens per sentence, best of {args.runs} (median)")
    print(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}; Kindling kernels {kernels}")
    print(f"lowest cosine Kindling vs sentence-transformers on 8 bench sentences: {cos:.7f}\n")
    print("| workload | sentence-transformers sent/s | Kindling sent/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, st, k in rows:
        print(f"| {name} | {st[0]:.0f} ({st[1]:.0f}) | {k[0]:.0f} ({k[1]:.0f}) | {k[0] / st[0]:.2f} ({k[1] / st[1]:.2f}) |")
    bf = rate("st_batch_bf16", 256)
    print(f"\nfor context: sentence-transformers under torch.autocast(bfloat16), 256 sentences: {bf[0]:.0f} ({bf[1]:.0f}) sent/s")


if __name__ == "__main__":
    main()
