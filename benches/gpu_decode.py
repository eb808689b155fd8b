#!/usr/bin/env python3
"""Decode throughput on a GPU: Kindling's device forward pass against
PyTorch `transformers` (eager attention) on the same random weights at
Llama-3-8B's architecture in bf16, side by side in one run.

Kindling's side is the `gpu_decode` example (built by
`scripts/build-cuda.sh --bench`); it also reports the device-to-device copy
bandwidth (for the roofline: weight bytes per step / bandwidth), the load
rate from the page cache, and the GPU's free memory before and after load
and after unload. Both sides prefill each sequence with the same CONTEXT
token ids, then time STEPS-1 greedy decode steps after one warm-up step.

    python benches/gpu_decode.py --bin target/release/examples/gpu_decode \\
        --weights /tmp/kindling-llama3-8b --batches 1,16,64

`--preset tiny --device cpu --dtype f32` runs the same flow on the CPU with a
two-layer model (a check of the script, not a benchmark).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def kindling(args):
    weights = Path(args.weights)
    if not (weights / "config.json").exists():
        subprocess.run([args.bin, "write", str(weights), args.preset], check=True)
    device = "cpu" if args.device == "cpu" else f"cuda:{args.ordinal}"
    out = subprocess.run(
        [args.bin, "run", str(weights), device, args.dtype, args.batches,
         str(args.context), str(args.steps)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def transformers_side(args):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    device = "cpu" if args.device == "cpu" else f"cuda:{args.ordinal}"
    sync = (lambda: None) if device == "cpu" else (lambda: torch.cuda.synchronize(device))
    # Straight onto the device where accelerate can place it (no host copy).
    placed = {} if device == "cpu" else {"device_map": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(args.weights, dtype=dtype, attn_implementation="eager", **placed)
    except (TypeError, ImportError, ValueError):  # older transformers, or no accelerate
        model = AutoModelForCausalLM.from_pretrained(args.weights, torch_dtype=dtype, attn_implementation="eager")
    model = model.to(device)
    model.eval()
    vocab = model.config.vocab_size
    results = {}
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.tensor(
            [[(i * 7919 + j * 104729) % vocab for j in range(args.context)] for i in range(b)],
            device=device,
        )
        tokens = []
        with torch.no_grad():
            past = model(ids, use_cache=True).past_key_values
            # As on Kindling's side, every sequence then feeds token 1.
            nxt = torch.ones((b, 1), dtype=torch.long, device=device)
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt[0, 0])
            sync()
            t = time.perf_counter()
            for _ in range(args.steps - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt[0, 0])
            sync()
            secs = time.perf_counter() - t
        results[b] = (b * (args.steps - 1) / secs, [int(x) for x in tokens])
    return results


def summarize(ours, peer):
    """One result: bandwidth, loads, unload, and per batch size our rate,
    the peer's, and how long the greedy tokens agree."""
    out = {"d2d_bytes_per_s": next(x["d2d_bytes_per_s"] for x in ours if "d2d_bytes_per_s" in x),
           "loads": [x for x in ours if "load" in x],
           "unload": next((x for x in ours if "free_after_unload" in x), None),
           "peer": peer.get("name"), "batches": []}
    for x in ours:
        if "batch" not in x:
            continue
        row = {k: x[k] for k in ("batch", "tokens_per_s", "step_ms", "roofline_steps_per_s", "of_roofline")}
        if x["batch"] in peer.get("rates", {}):
            rate, tokens = peer["rates"][x["batch"]]
            row["peer_tokens_per_s"] = round(rate, 2)
            row["ratio"] = round(x["tokens_per_s"] / rate, 3)
            row["agree_steps"] = next((i for i, (a, c) in enumerate(zip(x["tokens"], tokens)) if a != c), len(tokens))
            row["steps"] = len(tokens)
        out["batches"].append(row)
    return out


def print_summary(s):
    bw = s["d2d_bytes_per_s"]
    print(f"\ndevice-to-device copy: {bw / 1e9:.1f} GB/s (bytes read + written)")
    for x in s["loads"]:
        print(f"load ({x['load']}): {x['gb_per_s']:.2f} GB/s, free {x['free_before'] / 2**30:.2f} -> "
              f"{x['free_after_load'] / 2**30:.2f} GiB")
    u = s["unload"]
    if u:
        print(f"unload: free {u['free_before_unload'] / 2**30:.2f} -> {u['free_after_unload'] / 2**30:.2f} GiB")
    print(f"\npeer: {s['peer']}")
    print("\n| batch | Kindling tok/s | of roofline | transformers tok/s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for b in s["batches"]:
        peer = f"{b['peer_tokens_per_s']:.1f} | {b['ratio']:.2f}" if "ratio" in b else "- | -"
        print(f"| {b['batch']} | {b['tokens_per_s']:.1f} | {b['of_roofline']:.2f} | {peer} |")
    agree = [f"batch {b['batch']}: {b['agree_steps']} of {b['steps']}" for b in s["batches"] if "agree_steps" in b]
    if agree:
        print("\ngreedy tokens of the first sequence equal to transformers' up to step:", ", ".join(agree))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/examples/gpu_decode")
    p.add_argument("--weights", default="/tmp/kindling-llama3-8b")
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--ordinal", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    ours = kindling(args)
    for line in ours:
        print("kindling", json.dumps(line))
    try:
        import transformers
        peer = {"name": f"transformers {transformers.__version__} (eager attention)",
                "rates": transformers_side(args)}
    except ImportError as e:
        # Kindling's figures stand alone; the report says the peer is missing.
        peer = {"name": f"unavailable ({e})"}
    summary = summarize(ours, peer)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
