#!/usr/bin/env python3
"""Regenerates tests/data/llama_cpp_reference.json: greedy token ids from llama.cpp.

For each fixed prompt, llama.cpp (through llama-cpp-python) tokenizes the prompt
and greedily decodes 32 tokens (argmax of the logits, no sampling, no penalties,
continuing past end-of-turn tokens). `greedy_margins` records, per step, how far
llama.cpp's chosen logit is above its runner-up: where that margin is small,
two correct implementations may pick differently. `clear_text` is the output
up to the first such near-tie (`clear_steps` tokens); `top_logits` has, per
step, llama.cpp's five highest logits as [id, logit]; `sha256` identifies the
file. Chat prompts are rendered first with the chat template stored in the GGUF,
by Jinja2, as Hugging Face renders them. Kindling's known-answer tests must
reproduce the prompt ids and the 32 ids.

    python3 -m venv .venv-ref && .venv-ref/bin/pip install llama-cpp-python==0.3.36 jinja2 numpy
    .venv-ref/bin/python scripts/llama_cpp_reference.py store/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf

The reference for every quantization format at once is made on the demo model
requantized to a mix of them (Kindling's `requantize`, the same bytes on every
machine):

    target/release/requantize store/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/mixed.gguf mixed
    .venv-ref/bin/python scripts/llama_cpp_reference.py /tmp/mixed.gguf tests/data/llama_cpp_reference.mixed.json

Other prompts: a third argument names a JSON file with `completions` (strings),
`chats` (message lists) and optionally `steps` (the eight unseen prompts of
the greedy-agreement study: benches/unseen_prompts.json).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np

STEPS = 32
# Logits recorded per step: the TOP highest, as [id, logit].
TOP = 5
# Margins (in logits) under which llama.cpp's own choice is a near-tie.
NEAR_TIE = 0.3
COMPLETIONS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours of the rainbow."},
    ],
]


def render(template: str, messages, bos: str, eos: str) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    # Without logits_all, llama.cpp keeps only the last position's logits.
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def greedy(llm: llama_cpp.Llama, prompt_ids, steps=STEPS):
    llm.reset()
    llm.eval(prompt_ids)
    out, margins, tops = [], [], []
    for _ in range(steps):
        logits = last_logits(llm)
        top = np.argsort(logits)[::-1][:TOP]
        tok = int(top[0])
        out.append(tok)
        margins.append(round(float(logits[top[0]] - logits[top[1]]), 4))
        tops.append([[int(i), round(float(logits[i]), 4)] for i in top])
        llm.eval([tok])
    return out, margins, tops


def main() -> None:
    gguf = Path(sys.argv[1])
    out_path = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("tests/data/llama_cpp_reference.json")
    # KINDLING_REF_KV=f32: llama.cpp keeps its KV cache in f32 (as Kindling
    # does on the CPU) instead of its default f16, for logit comparisons.
    kv = {"type_k": 0, "type_v": 0} if os.environ.get("KINDLING_REF_KV") == "f32" else {}
    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=2, seed=0, verbose=False, **kv)
    meta = llm.metadata
    template = meta["tokenizer.chat_template"]
    tok = lambda i: llm.detokenize([i], special=True).decode("utf-8", "replace")
    bos = tok(int(meta["tokenizer.ggml.bos_token_id"]))
    eos = tok(int(meta["tokenizer.ggml.eos_token_id"]))
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
    completions, chats, steps = COMPLETIONS, CHATS, STEPS
    if len(sys.argv) > 3:
        spec = json.loads(Path(sys.argv[3]).read_text())
        completions, chats = spec.get("completions", []), spec.get("chats", [])
        steps = spec.get("steps", STEPS)
    cases = [{"kind": "completion", "prompt": p} for p in completions]
    cases += [{"kind": "chat", "messages": m, "prompt": render(template, m, bos, eos)} for m in chats]
    for case in cases:
        ids = llm.tokenize(case["prompt"].encode(), add_bos=add_bos, special=True)
        case["prompt_ids"] = ids
        case["greedy_ids"], case["greedy_margins"], case["top_logits"] = greedy(llm, ids, steps)
        case["greedy_text"] = llm.detokenize(case["greedy_ids"]).decode("utf-8", "replace")
        clear = next((i for i, m in enumerate(case["greedy_margins"]) if m < NEAR_TIE), steps)
        case["clear_steps"] = clear
        case["clear_text"] = llm.detokenize(case["greedy_ids"][:clear]).decode("utf-8", "replace")
    doc = {
        "generator": f"llama-cpp-python {llama_cpp.__version__}, greedy argmax, n_ctx 2048"
        + (", f32 KV cache" if kv else ""),
        "model": gguf.name,
        "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "steps": steps,
        "cases": cases,
    }
    out_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {out_path}")


if __name__ == "__main__":
    main()
