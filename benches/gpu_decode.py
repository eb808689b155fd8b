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
    try:
        model = AutoModelForCausalLM.from_pretrained(args.weights, dtype=dtype, attn_implementation="eager")
    except TypeError:  # transformers before `dtype`
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
    args = p.parse_args()

    ours = kindling(args)
    for line in ours:
        print("kindling", json.dumps(line))
    peer = transformers_side(args)
    bw = next(x["d2d_bytes_per_s"] for x in ours if "d2d_bytes_per_s" in x)
    print(f"\ndevice-to-device copy: {bw / 1e9:.1f} GB/s (bytes read + written)")
    for x in ours:
        if "load" in x:
            print(f"load ({x['load']}): {x['gb_per_s']:.2f} GB/s, free {x['free_before'] / 2**30:.2f} -> "
                  f"{x['free_after_load'] / 2**30:.2f} GiB")
        if "free_after_unload" in x:
            print(f"unload: free {x['free_before_unload'] / 2**30:.2f} -> {x['free_after_unload'] / 2**30:.2f} GiB")
    print("\n| batch | Kindling tok/s | of roofline | transformers tok/s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    agree = []
    for x in ours:
        if "batch" in x:
            b = x["batch"]
            rate, tokens = peer[b]
            print(f"| {b} | {x['tokens_per_s']:.1f} | {x['of_roofline']:.2f} | {rate:.1f} | "
                  f"{x['tokens_per_s'] / rate:.2f} |")
            same = next((i for i, (a, c) in enumerate(zip(x["tokens"], tokens)) if a != c), len(tokens))
            agree.append(f"batch {b}: {same} of {len(tokens)}")
    print("\ngreedy tokens of the first sequence equal to transformers' up to step:", ", ".join(agree))


if __name__ == "__main__":
    sys.exit(main())
