#!/usr/bin/env python3
"""Known-answer images for Kindling's Stable Diffusion pipeline.

Loads a diffusers-layout folder written by Kindling's `random-pipeline`
tool into diffusers (PyTorch, f32, CPU), checks that every tensor in the
files maps one-to-one onto diffusers' modules, and renders a fixed prompt
from fixed initial latents with DDIM, Euler and DPM++ 2M (4 steps, guidance
7.5; DDIM also unguided) and one Turbo-style run (Euler, 1 step, guidance
0), each scheduler built from the folder's own config. Writes the latents,
token ids and the RGB pixels as JSON for `models/tests/stable_diffusion.rs`.

    .venv-bench/bin/python scripts/sd_reference.py store/sd-tiny \
        models/tests/data/sd_tiny_reference.json

Versions used for the committed references: diffusers 0.42.1,
transformers 5.23, torch 2.15.0 (CPU).
"""
import argparse
import hashlib
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, lowres"


def check_weights(module, folder):
    """Every tensor in the folder's file loads into `module`, and nothing is left random."""
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    saved = load_file(os.path.join(folder, files[0]))
    strip = lambda k: k[len("text_model."):] if k.startswith("text_model.") else k
    saved = {strip(k): v for k, v in saved.items()}
    state = {strip(k): v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(state) - set(saved))
    unexpected = sorted(set(saved) - set(state))
    assert not missing and not unexpected, (folder, missing[:5], unexpected[:5])
    for k, v in saved.items():
        assert torch.equal(state[k].float(), v.float()), (folder, k)
    return hashlib.sha256(open(os.path.join(folder, files[0]), "rb").read()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from diffusers import (DDIMScheduler, DiffusionPipeline, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, DPMSolverMultistepScheduler)

    pipe = DiffusionPipeline.from_pretrained(args.folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    xl = hasattr(pipe, "text_encoder_2")
    hashes = {}
    for name in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if xl else []):
        hashes[name] = check_weights(getattr(pipe, name), os.path.join(args.folder, name))

    factor = pipe.vae_scale_factor
    side = args.size // factor
    rng = np.random.RandomState(1234)
    latents = rng.standard_normal((1, 4, side, side)).astype(np.float32)
    tokens = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids

    base = pipe.scheduler.config
    runs = []
    samplers = [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler),
                ("dpmpp_2m", DPMSolverMultistepScheduler)]
    for name, cls in samplers:
        pipe.scheduler = cls.from_config(base)
        for guidance in ([7.5, 1.0] if name == "ddim" else [7.5]):
            out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps,
                       guidance_scale=guidance, height=args.size, width=args.size,
                       latents=torch.from_numpy(latents), output_type="np")
            pixels = (out.images[0] * 255).round().astype(np.uint8)
            print(f"{name} guidance {guidance}: pixel mean {pixels.mean():.1f}, "
                  f"std {pixels.std():.1f}, saturated {(pixels == 0).mean() + (pixels == 255).mean():.3f}")
            runs.append({"sampler": name, "guidance": guidance, "steps": args.steps,
                         "pixels": pixels.reshape(-1).tolist()})
    # A Turbo-style run: one step, no guidance.
    pipe.scheduler = EulerDiscreteScheduler.from_config(base)
    out = pipe(prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, height=args.size,
               width=args.size, latents=torch.from_numpy(latents), output_type="np")
    pixels = (out.images[0] * 255).round().astype(np.uint8)
    print(f"euler 1 step guidance 0: pixel mean {pixels.mean():.1f}")
    runs.append({"sampler": "euler", "guidance": 0.0, "steps": 1, "pixels": pixels.reshape(-1).tolist()})
    json.dump({
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "size": args.size,
        "tokens": tokens, "weights_sha256": hashes,
        "latents": latents.reshape(-1).tolist(), "runs": runs,
    }, open(args.out, "w"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
