"""Kindling's Stable Diffusion pipeline against diffusers (PyTorch, f32, CPU)
on the same weights, the same size, steps and guidance, side by side in one run.

  .venv-bench/bin/python benches/images.py [--threads 2] [--runs 3]

Two pipelines, each timed for both sides, in process:

1. `sd-tiny` (store/sd-tiny, from scripts/fetch-models.sh): 64x64, DDIM 4 steps.
2. Random weights at the full SD 1.5 architecture (860M-parameter UNet, the
   VAE and CLIP ViT-L text encoder), written by Kindling's random-pipeline
   tool into `--sd15` (default /work/bench-models/sd15-random; created if
   missing, 2 GB in f16): 256x256 (32x32 latents), DDIM 4 steps.

Both use classifier-free guidance 7.5, so each UNet call runs two rows per
image. Figures: seconds per UNet step (median within a run) and seconds per
image (prompt encoding, every step and the VAE decode), best and median
over `--runs`. diffusers' steps are timed by wrapping `pipe.unet.forward`.
Kindling's side is `models/examples/sd_speed.rs` (release build).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on mars"


def diffusers_runs(folder, size, steps, batch, runs, threads):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline

    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    inner = pipe.unet.forward
    step_times = []

    def timed(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        step_times.append(time.perf_counter() - t)
        return out

    pipe.unet.forward = timed
    side = size // pipe.vae_scale_factor
    latents = torch.from_numpy(np.random.RandomState(0).standard_normal((batch, 4, side, side)).astype(np.float32))
    results = []
    for _ in range(runs + 1):  # the first run warms up
        step_times.clear()
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=[PROMPT] * batch, negative_prompt=["blurry"] * batch, num_inference_steps=steps,
                 guidance_scale=7.5, height=size, width=size, latents=latents, output_type="np")
        total = time.perf_counter() - t
        results.append({"step_s": statistics.median(step_times), "image_s": total / batch})
    return results[1:]


def kindling_runs(folder, size, steps, batch, runs, threads):
    exe = ROOT / "target/release/examples/sd_speed"
    if not exe.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "kindling-models", "--example", "sd_speed"],
                       cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([str(exe), str(folder), str(size), str(steps), str(batch), str(runs + 1)],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")][1:]


def summary(results, key):
    values = sorted(r[key] for r in results)
    return values[0], statistics.median(values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sd15", default="/work/bench-models/sd15-random")
    ap.add_argument("--only", choices=["tiny", "sd15"])
    args = ap.parse_args()
    cases = []
    if args.only in (None, "tiny"):
        cases.append(("sd-tiny", ROOT / "store/sd-tiny", 64, 4))
    if args.only in (None, "sd15"):
        sd15 = Path(args.sd15)
        if not (sd15 / "model_index.json").exists():
            subprocess.run(["cargo", "run", "--release", "-p", "kindling-models", "--bin", "random-pipeline", "--",
                            "--preset", "sd15", "--dtype", "f16", str(sd15)], cwd=ROOT, check=True)
        cases.append(("sd15-random", sd15, 256, 4))
    print(f"threads {args.threads}, batch {args.batch}, guidance 7.5 (2 UNet rows per image), DDIM")
    print("| pipeline | size | figure | diffusers best (median) | Kindling best (median) | ratio best (median) |")
    print("|---|---|---|---:|---:|---:|")
    for name, folder, size, steps in cases:
        theirs = diffusers_runs(str(folder), size, steps, args.batch, args.runs, args.threads)
        ours = kindling_runs(folder, size, steps, args.batch, args.runs, args.threads)
        for key, label in [("step_s", "s / UNet step"), ("image_s", f"s / image ({steps} steps)")]:
            (tb, tm), (ob, om) = summary(theirs, key), summary(ours, key)
            print(f"| {name} | {size}x{size} | {label} | {tb:.3f} ({tm:.3f}) | {ob:.3f} ({om:.3f}) "
                  f"| {tb / ob:.2f} ({tm / om:.2f}) |", flush=True)
    print("ratio = diffusers time / Kindling time (above 1: Kindling is faster)")


if __name__ == "__main__":
    sys.exit(main())
