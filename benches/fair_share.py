#!/usr/bin/env python3
"""Fair share between API keys: how long a light tenant waits for its first
token while another tenant floods the same model, with `[engine] fair_share`
on and off, in one run.

    cargo build --release --bin kindling
    python3 benches/fair_share.py [--threads 2] [--flood 32] [--samples 30]
        [--warmup 5] [--pause 0.2] [--max-window 150]
        [--kindling-config benches/kindling.toml]

Python standard library only. The daemon (binary: $KINDLING_BIN, else
target/release/kindling) runs as `kindling serve --config TMP --listen
127.0.0.1:0 --api-key KA --api-key KB` with RAYON_NUM_THREADS=--threads and
RUST_LOG=--rust-log. KA is tenant A (`api-key-1`), KB tenant B (`api-key-2`);
both are full-access keys without rate limits. TMP is --kindling-config with
its [models] paths made absolute, its [engine] kept except `max_sequences =
16`, `queue_size = 64`, `max_batch_tokens = 256` (--max-sequences,
--queue-size, --max-batch-tokens) and `fair_share` set per condition, and
[usage] writing to a temporary SQLite file (not the store's).

Every request is a streaming /v1/completions request for smollm2-135m on a
fresh connection (`Connection: close`), temperature 0, ignore_eos,
stream_options.include_usage, `Authorization: Bearer <key>`.

  - Tenant A floods: --flood concurrent streams (default 32, twice the batch's
    16 seats, so A alone keeps the batch full and 16 requests queued), each
    re-issued as soon as it ends, with its own text prompt of about 96 tokens
    (`Note N.` and the first --flood-words words, 78, of shuffled sentences;
    every request's text differs, so no prompt cache helps) and max_tokens
    --flood-max-tokens (64).
  - Tenant B sends --samples requests (default 30) one after another, with
    --pause seconds (0.2) between the end of one and the start of the next;
    short distinct prompts (about 12 tokens), max_tokens --b-max-tokens (8).
    It sends no new request once --max-window seconds (150) have passed since
    its first: under first come, first served each of B's requests waits
    behind A's 16 queued ones (over 10 s on 2 cores), so (c) gets about 10
    samples and the run stays under 5 minutes; the table's `n` column says
    how many each condition got.

Conditions, one daemon per fair_share setting:
  (a) `alone`: B with no flood (daemon with fair_share = true, before its flood),
  (b) `fair`: B while A floods, fair_share = true,
  (c) `fcfs`: B while A floods, fair_share = false (first come, first served).
Each daemon is warmed up with one request (loads the model). In (b) and (c)
the flood runs --warmup seconds (5) before B's first request, and is
cancelled (its connections closed) after B's last.

Per condition:
  - B TTFT: request start (before connecting) to the first chunk with text;
    p50 and p99 over B's successful requests (linear interpolation). With
    30 samples p99 lies between the two largest values, essentially the max;
    with 10 it is the max, near enough.
  - B e2e: request start to the end of the stream ([DONE]), p50 and p99.
  - A tok/s: A's chunks with text that arrived inside B's measurement window
    (B's first request start to B's last request end) divided by the window;
    a chunk is one token (the JSON line counts streams where usage and chunk
    count differ). A's work preempted and recomputed under fair share is
    not output, so this is A's delivered throughput.
  - errors per tenant: failed requests (HTTP status, error event, no [DONE],
    timeout); 429s are also counted separately. A's flood requests that end
    with an error are re-issued after 0.1 s.
  - preemptions during the window, from the daemon log (at RUST_LOG
    kindling=debug): "sequence preempted: its tenant is over its share"
    (fair share) and "sequence preempted: out of KV cache blocks" (the
    scheduler logs the latter for every preemption, fair share's included,
    so the latter right after the former is not counted again).

The client is one asyncio thread (bench_servers.py's raw HTTP/1.1 streaming
client) on the same machine as the daemon; it shares the CPU with it.

Prints the machine (CPU model, cores, and which of avx512f, avx512_vnni,
amx_tile, avx_vnni it has), the command, a table and a JSON line with all
figures.
"""
import argparse
import asyncio
import json
import os
import random
import secrets
import shlex
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import MODEL, ROOT, Kindling, Stream, pct, stream_completion  # noqa: E402

CONDITIONS = ("alone", "fair", "fcfs")
FLAGS = ("avx512f", "avx512_vnni", "amx_tile", "avx_vnni")
PREEMPT_FAIR = "sequence preempted: its tenant is over its share"
PREEMPT_KV = "sequence preempted: out of KV cache blocks"

# Flood prompts are shuffles of these sentences (15 to 20 tokens each).
SENTENCES = [
    "The history of the lighthouse is a story of fire, glass and stubborn people.",
    "Bakers in the old quarter start their ovens at three in the morning.",
    "A river delta grows slowly as silt settles where the current loses its strength.",
    "Chess players often study endgames first, because they teach how the pieces cooperate.",
    "Migrating geese fly in a V so that each bird rides the updraft of the one ahead.",
    "Volcanic soil is famously fertile, which is why farms climb the slopes of mountains.",
    "Early railways ran on local time, until timetables forced towns to agree on one clock.",
    "Sailors once measured speed by counting knots on a rope paid out behind the ship.",
    "Glaciers carve valleys into a U shape, while rivers cut them into a V.",
    "Octopuses can taste with their arms and change colour in a fraction of a second.",
    "Desert plants store water in thick stems and open their pores only at night.",
    "Bridges of stone stand for centuries because an arch turns weight into compression.",
]
# B's prompts: one short question each, numbered so that no two are equal.
TOPICS = ["tides", "volcanoes", "bread", "owls", "comets", "glass", "maps", "bees", "salt", "kites"]


def machine():
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "flags": {f: f in flags for f in FLAGS}}


# -- config --------------------------------------------------------------------

def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(base: Path, out_dir: Path, fair: bool, args) -> Path:
    """--kindling-config with [models] paths absolute, [engine] overridden
    and usage records in out_dir."""
    cfg = tomllib.loads(base.read_text())
    models = cfg.setdefault("models", {})
    for k in ("manifests", "store"):
        if k in models:
            models[k] = str((base.parent / models[k]).resolve())
    if "store" not in models:
        sys.exit(f"{base}: [models] store is missing")
    cfg.setdefault("engine", {}).update(max_sequences=args.max_sequences, queue_size=args.queue_size,
                                        max_batch_tokens=args.max_batch_tokens, fair_share=fair)
    cfg.setdefault("usage", {})["path"] = str(out_dir / f"usage-{'fair' if fair else 'fcfs'}.sqlite")
    lines = []
    for table, body in cfg.items():
        if not isinstance(body, dict) or any(isinstance(v, dict) for v in body.values()):
            sys.exit(f"{base}: [{table}]: only flat tables are supported here")
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    path = out_dir / f"kindling-{'fair' if fair else 'fcfs'}.toml"
    path.write_text("\n".join(lines))
    return path


# -- prompts -------------------------------------------------------------------

def flood_prompt(n: int, words: int) -> str:
    rng = random.Random(f"flood-{n}")
    return f"Note {n}. " + " ".join(" ".join(rng.sample(SENTENCES, len(SENTENCES))).split()[:words])


def b_prompt(condition: int, i: int) -> str:
    # Three-digit numbers, distinct per condition and request, so every
    # condition's prompts have the same length.
    return f"Question {100 * (condition + 1) + i}: write one sentence about {TOPICS[i % len(TOPICS)]}."


# -- measurement ---------------------------------------------------------------

def ms(x):
    return None if x is None else round(x * 1000, 1)


def is_429(err):
    return err is not None and "HTTP 429" in err


class LogCounter:
    """Counts preemptions in the daemon log while `phase` is set. Every
    preemption logs PREEMPT_KV (whatever its cause); one for fair share
    logs PREEMPT_FAIR just before it, so that pair counts once."""

    def __init__(self):
        self.phase = None
        self.counts = {}
        self.pending_fair = False

    def __call__(self, line):
        if PREEMPT_FAIR in line:
            self.pending_fair = True
            if self.phase is not None:
                self.counts.setdefault(self.phase, {"fair_share": 0, "kv_cache": 0})["fair_share"] += 1
        elif PREEMPT_KV in line:
            if not self.pending_fair and self.phase is not None:
                self.counts.setdefault(self.phase, {"fair_share": 0, "kv_cache": 0})["kv_cache"] += 1
            self.pending_fair = False


async def flood_worker(base, n0, step, streams, stop, args, key):
    n = n0
    while not stop.is_set():
        s = Stream()
        streams.append(s)
        await stream_completion(base, flood_prompt(n, args.flood_words), args.flood_max_tokens,
                                args.request_timeout, api_key=key, stream=s)
        n += step
        if s.error is not None:
            await asyncio.sleep(0.1)


async def run_condition(server, name, index, flood, log, args, keys):
    a_streams, stop, tasks = [], asyncio.Event(), []
    if flood:
        tasks = [asyncio.create_task(flood_worker(server.base, i, args.flood, a_streams, stop, args, keys[0]))
                 for i in range(args.flood)]
        print(f"  {name}: flood of {args.flood} streams, {args.warmup} s warm-up", file=sys.stderr, flush=True)
        await asyncio.sleep(args.warmup)
    print(f"  {name}: {args.samples} requests of tenant B", file=sys.stderr, flush=True)
    log.phase = name
    b_streams = []
    for i in range(args.samples):
        if i:
            if time.perf_counter() - b_streams[0].start > args.max_window:
                break
            await asyncio.sleep(args.pause)
        b_streams.append(await stream_completion(server.base, b_prompt(index, i), args.b_max_tokens,
                                                 args.request_timeout, api_key=keys[1]))
    log.phase = None
    t0, t1 = b_streams[0].start, b_streams[-1].end
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if server.proc.poll() is not None:
        sys.exit("kindling exited during the run:\n" + "\n".join(server.tail))

    window = t1 - t0
    ok = [s for s in b_streams if s.error is None]
    ttft = [s.times[0] - s.start for s in ok]
    e2e = [s.end - s.start for s in ok]
    a_chunks = sum(t0 <= t <= t1 for s in a_streams for t in s.times)
    a_done = [s for s in a_streams if s.error is None and s.end > 0]  # not cancelled
    a_err = [s.error for s in a_streams if s.error is not None and s.end <= t1]
    b_err = [s.error for s in b_streams if s.error is not None]
    return {
        "window_s": round(window, 3),
        "b_requests": len(b_streams),
        "b_ttft_p50_ms": ms(pct(ttft, 50)),
        "b_ttft_p99_ms": ms(pct(ttft, 99)),
        "b_ttft_max_ms": ms(max(ttft, default=None)),
        "b_e2e_p50_ms": ms(pct(e2e, 50)),
        "b_e2e_p99_ms": ms(pct(e2e, 99)),
        # After the first chunk: B's 7 other tokens.
        "b_rest_p50_ms": ms(pct([s.end - s.times[0] for s in ok], 50)),
        "b_ttft_ms": [ms(x) for x in ttft],
        "b_e2e_ms": [ms(x) for x in e2e],
        "b_output_tokens": sum(s.tokens for s in ok),
        "b_prompt_tokens_mean": mean([s.prompt_tokens for s in ok]),
        "b_errors": len(b_err),
        "b_429": sum(map(is_429, b_err)),
        "b_error_samples": sorted(set(b_err))[:3],
        "a_tok_s": round(a_chunks / window, 1) if flood and window > 0 else None,
        "a_chunks_in_window": a_chunks if flood else None,
        "a_requests_started": len(a_streams),
        "a_requests_completed": len(a_done),
        "a_ttft_p50_ms": ms(pct([s.times[0] - s.start for s in a_done], 50)),
        "a_prompt_tokens_mean": mean([s.prompt_tokens for s in a_done]),
        "a_multi_token_chunks": sum(s.usage_tokens is not None and s.usage_tokens != len(s.times)
                                    for s in a_done),
        # Errors of A requests that ended by the window's end (not those cancelled after it).
        "a_errors": len(a_err),
        "a_429": sum(map(is_429, a_err)),
        "a_error_samples": sorted(set(a_err))[:3],
        "preemptions": log.counts.get(name, {"fair_share": 0, "kv_cache": 0}),
    }


def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 1) if xs else None


async def warm_up(server, key, args):
    s = await stream_completion(server.base, "Warm-up: say hello.", args.b_max_tokens, args.request_timeout,
                                api_key=key)
    if s.error:
        server.stop()
        sys.exit(f"warm-up: {s.error}")


async def bench(args, binary, tmp):
    keys = [f"bench-a-{secrets.token_hex(8)}", f"bench-b-{secrets.token_hex(8)}"]
    key_args = [a for k in keys for a in ("--api-key", k)]
    results, configs = {}, {}
    for fair, conditions in ((True, [("alone", False), ("fair", True)]), (False, [("fcfs", True)])):
        config = write_config(args.kindling_config, tmp, fair, args)
        configs["fair" if fair else "fcfs"] = config.read_text()
        log = LogCounter()
        server = Kindling(binary, config, args.threads, extra_args=key_args, rust_log=args.rust_log, on_line=log)
        try:
            await warm_up(server, keys[1], args)
            for name, flood in conditions:
                results[name] = await run_condition(server, name, CONDITIONS.index(name), flood, log, args, keys)
        finally:
            server.stop()
    return results, configs


# -- report --------------------------------------------------------------------

def fmt(x):
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def report(facts, command, binary, args, results, configs, duration):
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in facts["flags"].items())
    print(f"machine: {facts['cpu']}, {facts['logical_cores']} logical cores ({facts['usable_cores']} usable); {flags}")
    print(f"command: {command}")
    print(f"kindling: {binary}, RAYON_NUM_THREADS={args.threads}; [engine] max_sequences {args.max_sequences}, "
          f"queue_size {args.queue_size}, max_batch_tokens {args.max_batch_tokens}")
    print(f"{MODEL}; A: {args.flood} streams, ~{results.get('fair', {}).get('a_prompt_tokens_mean')}-token prompts, "
          f"max_tokens {args.flood_max_tokens}; B: up to {args.samples} requests in {args.max_window:g} s, "
          f"~{results['alone']['b_prompt_tokens_mean']}-token prompts, max_tokens {args.b_max_tokens}, "
          f"{args.pause} s apart; p99 of n <= {args.samples} samples is about the max")
    head = (f"{'condition':<10}{'n':>4}{'B TTFT p50':>12}{'B TTFT p99':>12}{'B e2e p50':>11}{'A tok/s':>9}"
            f"{'errors A (429)':>16}{'errors B (429)':>16}{'preempted':>11}")
    print(head)
    print(f"{'':<14}{'ms':>12}{'ms':>12}{'ms':>11}")
    for name in CONDITIONS:
        r = results[name]
        a_err = f"{r['a_errors']} ({r['a_429']})" if name != "alone" else "-"
        pre = r["preemptions"]["fair_share"] + r["preemptions"]["kv_cache"]
        print(f"{name:<10}{r['b_requests']:>4}{fmt(r['b_ttft_p50_ms']):>12}{fmt(r['b_ttft_p99_ms']):>12}{fmt(r['b_e2e_p50_ms']):>11}"
              f"{fmt(r['a_tok_s']):>9}{a_err:>16}{str(r['b_errors']) + ' (' + str(r['b_429']) + ')':>16}{pre:>11}")
    print(f"run: {duration:.1f} s")
    for name, r in results.items():
        for who in ("a", "b"):
            if r[f"{who}_error_samples"]:
                print(f"note: {name}: tenant {who.upper()} errors, e.g. {r[f'{who}_error_samples']}")
        if r["a_multi_token_chunks"]:
            print(f"note: {name}: {r['a_multi_token_chunks']} A streams had a chunk of more than one token")
    print(json.dumps({
        "machine": facts, "command": command, "binary": binary, "duration_s": round(duration, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "configs": configs, "results": results,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS of the daemon")
    ap.add_argument("--flood", type=int, default=32, help="tenant A's concurrent streams")
    ap.add_argument("--samples", type=int, default=30, help="tenant B's requests per condition")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of flood before B starts")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between B's requests")
    ap.add_argument("--max-window", type=float, default=150,
                    help="B sends no new request once this many seconds passed since its first")
    ap.add_argument("--flood-max-tokens", type=int, default=64)
    ap.add_argument("--b-max-tokens", type=int, default=8)
    ap.add_argument("--flood-words", type=int, default=78,
                    help="words per flood prompt, after `Note N.` (78: about 96 tokens)")
    ap.add_argument("--max-sequences", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--kindling-config", type=Path, default=ROOT / "benches" / "kindling.toml")
    ap.add_argument("--rust-log", default="warn,kindling=debug",
                    help="RUST_LOG of the daemon (kindling=debug logs preemptions)")
    ap.add_argument("--request-timeout", type=float, default=120, help="seconds per request")
    args = ap.parse_args()
    args.kindling_config = args.kindling_config.resolve()
    if args.samples < 1:
        ap.error("--samples must be at least 1")
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    if not Path(binary).exists():
        sys.exit(f"{binary} is missing: cargo build --release --bin kindling")
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    facts = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kindling-fair-") as tmp:
        results, configs = asyncio.run(bench(args, binary, Path(tmp)))
    report(facts, command, binary, args, results, configs, time.perf_counter() - started)


if __name__ == "__main__":
    main()
