#!/usr/bin/env python3
"""Serving speed, Kindling beside llama.cpp, on the demo GGUF, in one run.

    benches/setup.sh                    # once: builds the peer into .venv-bench
    cargo build --release --bin kindling
    .venv-bench/bin/python benches/serving.py [--threads 2] [--runs 5]
        [--max-tokens 64] [--concurrency 1,4,16,64] [--kindling-config PATH]

Both sides get the same thread count (--threads, default 2) and the same
prompt token ids (from the GGUF's tokenizer; no BOS is added on either side).

Single stream
  - prompt processing (--prompt-tokens, default 512): Kindling's time to first
    token of a streaming /v1/completions request with max_tokens 1, through
    HTTP, as a user gets it; llama.cpp's in-process `eval(prompt)` through
    llama-cpp-python (no HTTP, no sampling).
  - decode (--decode-tokens, default 128, after an 8-token prompt): Kindling's
    streamed tokens after the first divided by the time from the first to the
    last; llama.cpp's single-token `eval`s with an argmax in between.
  Medians over --runs runs after one warm-up; each run has its own prompt.
  The two sides' runs alternate (Kindling's run 1, llama.cpp's run 1, then
  llama.cpp first in run 2, ...), so a drift in the machine's speed over
  the minutes of a run falls on both; the paired ratio (each run's Kindling
  figure over the same run's llama.cpp figure) is reported beside the ratio
  of medians, with its lowest and highest. Each side's run starts after
  --settle seconds (default 1) of quiet, so the other side's threads have
  stopped polling for work: llama.cpp's spin for a while after each
  evaluation, and a run that starts under them loses a core.

Concurrent streams (--concurrency, default 1,4,16,64), both through HTTP
  Each stream is one streaming /v1/completions request on a fresh connection
  (`Connection: close`, no pooling): its own prompt of --stream-prompt-tokens
  token ids (default 96; prompts differ per stream and per level, so no
  server can serve one from a prompt cache), max_tokens --max-tokens,
  temperature 0, ignore_eos, stream_options.include_usage. All streams of a
  level wait on one barrier and start together; the level ends when the last
  stream ends. Per level:
  - output tok/s: output tokens of all successful streams / level wall time,
  - TTFT: request start (before connecting) to the first chunk with text,
  - inter-token latency (ITL): the gaps between successive chunks with text
    of one stream, pooled over the level's streams,
  - errors: streams that failed (HTTP status, error event, no [DONE], timeout).
  Output tokens are counted exactly: `usage.completion_tokens` of the stream
  (llama-server puts usage on its final chunk; Kindling sends a usage chunk
  when asked by include_usage), else the number of chunks with text. The JSON
  line has both counts; `multi_token_chunks` counts streams whose chunk count
  differs from the usage count (a chunk held back an incomplete UTF-8
  character and was sent with the next one), where ITL is per chunk.

  Kindling: `kindling serve --config <--kindling-config> --listen
  127.0.0.1:0` (binary: $KINDLING_BIN, else target/release/kindling) with
  RAYON_NUM_THREADS=--threads, one process for the whole run, warmed up with
  one request.

  llama.cpp: .venv-bench/bin/llama-server (from setup.sh) with `-m GGUF -t N
  -tb N -np SLOTS -c SLOTS*CTX --cont-batching --no-webui`, restarted for
  each level with SLOTS = the level's stream count (--llama-slots 0, the
  default) and CTX = prompt + max_tokens rounded up to 256 per slot, warmed
  up with one request. One slot per stream is what makes llama-server
  strongest: every stream is batched from the start (fewer slots would queue
  streams), and no KV cache or per-slot work is spent on idle slots.
  --llama-slots N fixes the slot count instead.

The client is one asyncio thread with raw HTTP/1.1 on the same machine; it
parses one small JSON object per chunk. It shares the CPU with the server
under test, equally for both sides.

`--concurrency ''` runs the single-stream part only.

Prints the machine, the build options, a table (ratio = kindling / llama.cpp;
the `better` column says whether higher or lower is better) and a JSON line
with all figures.
"""
import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from bench_servers import (GGUF, config_for_gguf, LLAMA_SERVER, MODEL, ROOT, VENV, Kindling, LlamaServer,
                           ServerError, Stream, pct, stream_completion)

# Prompts are shuffles of these sentences, seeded per request.
SENTENCES = [
    "The history of the lighthouse is a story of fire, glass and stubborn people.",
    "Long before electric lamps, keepers climbed narrow stairs every evening to trim wicks.",
    "Bakers in the old quarter start their ovens at three in the morning, long before sunrise.",
    "A river delta grows slowly as silt settles where the current loses its strength.",
    "Chess players often study endgames first, because they teach how the pieces cooperate.",
    "Migrating geese fly in a V so that each bird rides the updraft of the one ahead.",
    "The printing press made books cheap enough for merchants and students to own.",
    "Volcanic soil is famously fertile, which is why farms climb the slopes of active mountains.",
    "Early railways ran on local time, until timetables forced towns to agree on one clock.",
    "Honeybees tell their sisters where flowers are by dancing on the comb.",
    "Sailors once measured speed by counting knots on a rope paid out behind the ship.",
    "A good soup starts with onions cooked slowly until they turn soft and sweet.",
    "Glaciers carve valleys into a U shape, while rivers cut them into a V.",
    "The first public libraries lent books chained to the desks they were read at.",
    "Octopuses can taste with their arms and change colour in a fraction of a second.",
    "Windmills ground grain, pumped water from polders and even sawed timber.",
    "Mathematicians proved long ago that there is no largest prime number.",
    "Desert plants store water in thick stems and open their pores only at night.",
    "Clockmakers used the swing of a pendulum to keep time within seconds a day.",
    "Coral reefs are built by tiny animals that live together with algae.",
    "Postal services once carried letters by horse relay across whole continents.",
    "Snow looks white because its crystals scatter every colour of light equally.",
    "The compass let navigators hold a course even when clouds hid the stars.",
    "Tea spread along trade routes, and each country changed how it was brewed.",
    "Radio waves travel around the world by bouncing between the ground and the sky.",
    "Apprentice carpenters learn to sharpen their tools before they learn to cut wood.",
    "Salt was so valuable that soldiers were sometimes paid with it.",
    "Owls turn their heads far around because their eyes cannot move in their sockets.",
    "Bridges of stone stand for centuries because an arch turns weight into compression.",
    "Cartographers must choose what to distort when they flatten the round earth.",
    "Fireflies flash in patterns that tell others of their kind where to find them.",
    "The abacus let traders add long columns of numbers faster than with pen and ink.",
]


# -- machine and build facts -------------------------------------------------

def machine_facts():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "mem_gib": mem,
    }


def read(path: Path):
    try:
        return path.read_text().strip()
    except OSError:
        return None


def build_facts(kindling_bin: str):
    rustflags = None
    cfg = read(ROOT / ".cargo" / "config.toml")
    if cfg:
        m = re.search(r"rustflags\s*=\s*(\[[^\]]*\])", cfg)
        rustflags = m.group(1) if m else None
    server_version = None
    if LLAMA_SERVER.exists():
        try:
            out = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=30)
            server_version = " ".join((out.stdout + out.stderr).split()).removeprefix("version: ")
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "kindling": {"binary": kindling_bin, "rustflags": rustflags},
        # setup.sh's stamp: "<version> <CMAKE_ARGS>".
        "llama-cpp-python": {"version": llama_cpp.__version__,
                             "cmake": (read(VENV / ".llama-cpp-python.flags") or " ").split(" ", 1)[1] or None},
        "llama-server": {"version": server_version,
                         "cmake": read(VENV / "src" / "llama-server-build" / ".flags")},
    }


# -- prompts -----------------------------------------------------------------

class Prompts:
    """Deterministic, distinct prompt token ids, the same for both servers."""

    def __init__(self, vocab):
        self.vocab = vocab

    def ids(self, key: str, n: int):
        rng = random.Random(key)
        out = []
        while len(out) < n:
            text = (" " if out else "") + " ".join(rng.sample(SENTENCES, len(SENTENCES)))
            out += self.vocab.tokenize(text.encode(), add_bos=False)
        return out[:n]


# -- measurements ------------------------------------------------------------

async def run_level(base, prompts, max_tokens, timeout):
    gate = asyncio.Event()

    async def one(p):
        await gate.wait()
        return await stream_completion(base, p, max_tokens, timeout)

    tasks = [asyncio.create_task(one(p)) for p in prompts]
    await asyncio.sleep(0.05)  # every task is parked on the gate
    t0 = time.perf_counter()
    gate.set()
    streams = await asyncio.gather(*tasks)
    wall = max(s.end for s in streams) - t0
    ok = [s for s in streams if s.error is None]
    ttft = [s.times[0] - s.start for s in ok]
    itl = [b - a for s in ok for a, b in zip(s.times, s.times[1:])]
    tokens = sum(s.tokens for s in ok)
    errors = [s.error for s in streams if s.error is not None]
    return {
        "streams": len(streams),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "output_tokens": tokens,
        "chunks_with_text": sum(len(s.times) for s in ok),
        "tokens_from_usage": sum(s.usage_tokens is not None for s in ok),
        "multi_token_chunks": sum(s.usage_tokens is not None and s.usage_tokens != len(s.times) for s in ok),
        "short_streams": sum(s.tokens != max_tokens for s in ok),
        "wall_s": round(wall, 3),
        "out_tok_s": tokens / wall if wall > 0 else None,
        "ttft_p50_ms": ms(pct(ttft, 50)),
        "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_p50_ms": ms(pct(itl, 50)),
        "itl_p99_ms": ms(pct(itl, 99)),
    }


def ms(x):
    return None if x is None else x * 1000


async def checked(base, prompt, max_tokens, timeout, what):
    s = await stream_completion(base, prompt, max_tokens, timeout)
    if s.error:
        sys.exit(f"{what}: {s.error}")
    return s


async def kindling_run(base, prompts, run, args):
    """One single-stream run: (prompt tok/s, decode tok/s, chunk mismatch)."""
    long = prompts.ids(f"prefill-{run}", args.prompt_tokens)
    short = prompts.ids(f"decode-{run}", 8)
    s = await checked(base, long, 1, args.request_timeout, "kindling prefill")
    d = await checked(base, short, args.decode_tokens, args.request_timeout, "kindling decode")
    # Chunks after the first over their span; exact when each chunk is one token.
    return (len(long) / (s.times[0] - s.start), (len(d.times) - 1) / (d.times[-1] - d.times[0]),
            d.tokens != len(d.times))


def llama_run(llm, prompts, run, args):
    """One single-stream run of llama.cpp in process: (prompt tok/s, decode tok/s)."""
    def timed(ids, decode):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        t2 = time.perf_counter()
        for _ in range(decode - 1):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    long = prompts.ids(f"prefill-{run}", args.prompt_tokens)
    short = prompts.ids(f"decode-{run}", 8)
    lp, _ = timed(long, 1)
    _, ld = timed(short, args.decode_tokens)
    return len(long) / lp, (args.decode_tokens - 1) / ld


async def single_stream(base, llm, prompts, args):
    """The single-stream runs, the two sides interleaved run by run (the
    machine's speed drifts over minutes; interleaving puts both sides under
    the same drift), which side goes first alternating. Run 0 warms up."""
    res = {}
    if base:
        res["kindling"] = {"prefill_tok_s": [], "decode_tok_s": [], "decode_chunk_mismatch": 0}
    if llm:
        res["llama.cpp"] = {"prefill_tok_s": [], "decode_tok_s": []}
    for run in range(args.runs + 1):
        order = ["kindling", "llama.cpp"] if run % 2 == 0 else ["llama.cpp", "kindling"]
        for side in (s for s in order if s in res):
            # Let the other side's threads stop spinning and sleep first
            # (llama.cpp's poll for work after each evaluation).
            await asyncio.sleep(args.settle)
            if side == "kindling":
                prefill, decode, mismatch = await kindling_run(base, prompts, run, args)
            else:
                (prefill, decode), mismatch = llama_run(llm, prompts, run, args), False
            if run == 0:
                continue
            res[side]["prefill_tok_s"].append(prefill)
            res[side]["decode_tok_s"].append(decode)
            if mismatch:
                res[side]["decode_chunk_mismatch"] += 1
    return res


def level_prompts(prompts, level, args):
    return [prompts.ids(f"level-{level}-stream-{i}", args.stream_prompt_tokens) for i in range(level)]


async def bench_kindling(prompts, args, llm):
    """Kindling's levels, after the single-stream runs of both sides (`llm`,
    when llama.cpp runs too, is interleaved with Kindling's); returns
    Kindling's results and llama.cpp's single-stream ones."""
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    server = Kindling(binary, args.kindling_config, args.threads)
    try:
        # Warm-up: loads the model.
        await checked(server.base, prompts.ids("warmup", args.stream_prompt_tokens), args.max_tokens,
                      args.request_timeout, "kindling warm-up")
        single = await single_stream(server.base, llm, prompts, args)
        res = {"single": single["kindling"], "levels": {}}
        for level in args.concurrency:
            print(f"  kindling: {level} streams", file=sys.stderr, flush=True)
            res["levels"][level] = await run_level(server.base, level_prompts(prompts, level, args),
                                                   args.max_tokens, args.request_timeout)
        if server.proc.poll() is not None:
            sys.exit("kindling exited during the run:\n" + "\n".join(server.tail))
        return res, single.get("llama.cpp")
    finally:
        server.stop()


async def bench_llama(llm, prompts, args, single):
    if single is None:
        single = (await single_stream(None, llm, prompts, args))["llama.cpp"]
    res = {"single": single, "levels": {}, "server_args": {}}
    ctx = -(-(args.stream_prompt_tokens + args.max_tokens + 16) // 256) * 256
    for level in args.concurrency:
        print(f"  llama.cpp: {level} streams", file=sys.stderr, flush=True)
        slots = args.llama_slots or level
        server = LlamaServer(args.threads, slots, ctx, args.gguf)
        try:
            await checked(server.base, prompts.ids("warmup", args.stream_prompt_tokens), args.max_tokens,
                          args.request_timeout, "llama-server warm-up")
            res["levels"][level] = await run_level(server.base, level_prompts(prompts, level, args),
                                                   args.max_tokens, args.request_timeout)
            res["server_args"][level] = " ".join(server.args[1:])
        finally:
            server.stop()
    return res


# -- report ------------------------------------------------------------------

def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def report(facts, build, args, results):
    med = {}
    for side, r in results.items():
        med[side] = {k: statistics.median(r["single"][k]) for k in ("prefill_tok_s", "decode_tok_s")}
    rows = [
        (f"prompt tok/s ({args.prompt_tokens}), 1 stream", "higher",
         *(med.get(side, {}).get("prefill_tok_s") for side in ("kindling", "llama.cpp"))),
        (f"decode tok/s ({args.decode_tokens}), 1 stream", "higher",
         *(med.get(side, {}).get("decode_tok_s") for side in ("kindling", "llama.cpp"))),
    ]
    metrics = [("out_tok_s", "output tok/s", "higher"), ("ttft_p50_ms", "TTFT p50 ms", "lower"),
               ("ttft_p99_ms", "TTFT p99 ms", "lower"), ("itl_p50_ms", "ITL p50 ms", "lower"),
               ("itl_p99_ms", "ITL p99 ms", "lower"), ("errors", "errors", "lower")]
    for level in args.concurrency:
        for key, label, better in metrics:
            vals = [results[side]["levels"][level][key] if side in results else None
                    for side in ("kindling", "llama.cpp")]
            rows.append((f"{level:>2} streams: {label}", better, *vals))

    print(f"machine: {facts['cpu']}, {facts['logical_cores']} logical cores "
          f"({facts['usable_cores']} usable), {facts['mem_gib']} GiB")
    print(f"kindling: {build['kindling']['binary']}, rustflags {build['kindling']['rustflags']}, "
          f"config {args.kindling_config}")
    print(f"llama-cpp-python {build['llama-cpp-python']['version']}: CMAKE_ARGS {build['llama-cpp-python']['cmake']}")
    print(f"llama-server {build['llama-server']['version']}: cmake {build['llama-server']['cmake']}")
    if "llama.cpp" in results:
        for level, a in results["llama.cpp"]["server_args"].items():
            print(f"llama-server at {level} streams: {a}")
    print(f"{args.gguf.name}, {args.threads} threads each; single stream: median of {args.runs} runs; "
          f"streams: {args.stream_prompt_tokens}-token prompts, {args.max_tokens} output tokens each")
    print("ratio = kindling / llama.cpp; `better` says whether higher or lower is better")
    print(f"{'':34}{'kindling':>11}{'llama.cpp':>11}{'ratio':>8}  better")
    for label, better, k, l in rows:
        ratio = k / l if k is not None and l else None
        print(f"{label:34}{fmt(k):>11}{fmt(l):>11}{fmt(ratio, 2):>8}  {better}")
    paired = {}
    if len(results) == 2:
        for key, label in (("prefill_tok_s", "prompt"), ("decode_tok_s", "decode")):
            pairs = [a / b for a, b in zip(results["kindling"]["single"][key], results["llama.cpp"]["single"][key])]
            paired[key] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
            print(f"paired {label} ratio, run by run: median {paired[key]['median']:.2f} "
                  f"(lowest {paired[key]['min']:.2f}, highest {paired[key]['max']:.2f})")
    notes = []
    for side, r in results.items():
        for level, lv in r["levels"].items():
            if lv["errors"]:
                notes.append(f"{side} {level} streams: {lv['errors']} errors, e.g. {lv['error_samples']}")
            if lv["multi_token_chunks"]:
                notes.append(f"{side} {level} streams: {lv['multi_token_chunks']} streams had a chunk "
                             f"with more than one token (ITL is per chunk)")
            if lv["short_streams"]:
                notes.append(f"{side} {level} streams: {lv['short_streams']} streams "
                             f"returned other than {args.max_tokens} tokens")
            if lv["tokens_from_usage"] != lv["streams"] - lv["errors"]:
                notes.append(f"{side} {level} streams: some token counts from chunks (no usage)")
        if r["single"].get("decode_chunk_mismatch"):
            notes.append(f"{side}: single-stream decode had chunks of more than one token")
    for n in notes:
        print("note:", n)
    print(json.dumps({
        "machine": facts, "build": build,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median": med, "paired_ratio": paired, "results": results,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="single-stream runs (after one warm-up)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="single-stream prompt-processing prompt")
    ap.add_argument("--decode-tokens", type=int, default=128, help="single-stream decode length")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per concurrent stream")
    ap.add_argument("--stream-prompt-tokens", type=int, default=96, help="prompt tokens per concurrent stream")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds of quiet before each single-stream run of either side")
    ap.add_argument("--kindling-config", type=Path, default=ROOT / "configs" / "kindling.toml")
    ap.add_argument("--gguf", type=Path, default=GGUF,
                    help="the GGUF both sides serve (default: the demo model); Kindling serves it "
                         "under the demo model's id with a copy of --kindling-config")
    ap.add_argument("--llama-slots", type=int, default=0,
                    help="llama-server -np; 0 (default): the level's stream count")
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds per request")
    ap.add_argument("--skip-kindling", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.kindling_config = args.kindling_config.resolve()
    args.gguf = args.gguf.resolve()
    workdir = tempfile.TemporaryDirectory(prefix="kindling-bench-")
    if args.gguf != GGUF.resolve():
        args.kindling_config = config_for_gguf(args.gguf, args.kindling_config, Path(workdir.name))
    if args.skip_kindling and args.skip_llama:
        ap.error("nothing to run")
    if not args.skip_llama and not LLAMA_SERVER.exists():
        sys.exit(f"{LLAMA_SERVER} is missing: run benches/setup.sh")

    kindling_bin = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    facts, build = machine_facts(), build_facts(kindling_bin)
    vocab = llama_cpp.Llama(str(args.gguf), vocab_only=True, verbose=False)
    prompts = Prompts(vocab)
    results = {}
    llm = None
    if not args.skip_llama:
        llm = llama_cpp.Llama(str(args.gguf), n_ctx=2 * args.prompt_tokens + args.decode_tokens + 64,
                              n_batch=max(512, args.prompt_tokens), n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
    try:
        llama_single = None
        if not args.skip_kindling:
            results["kindling"], llama_single = asyncio.run(bench_kindling(prompts, args, llm))
        if llm:
            results["llama.cpp"] = asyncio.run(bench_llama(llm, prompts, args, llama_single))
    finally:
        if llm:
            llm.close()
    report(facts, build, args, results)


if __name__ == "__main__":
    main()
