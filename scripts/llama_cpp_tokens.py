#!/usr/bin/env python3
"""Writes llama.cpp's token ids for a fixed corpus, for Kindling's tokenizer
parity tests: code, emoji, CJK, combining marks, odd whitespace, numbers,
and special tokens written in the text (parsed as special, as chat
templates need). BOS is added where the file asks for it.

    .venv-bench/bin/python scripts/llama_cpp_tokens.py MODEL.gguf OUT.json

For the demo model: tests/data/llama_cpp_tokens.json. For its vocabulary
recast as SentencePiece (`target/release/retarget SRC /tmp/spm.gguf spm`):
tests/data/llama_cpp_tokens.spm.json; without the space prefix (`spm-no-prefix`,
as Gemma's vocabularies are): tests/data/llama_cpp_tokens.spm-no-prefix.json.
For the real vocabularies in store/vocab (scripts/fetch-models.sh):
tests/data/llama_cpp_tokens.{llama-bpe,qwen2,llama-spm,phi-3}.json.
"""
import hashlib
import json
import sys
from pathlib import Path

import llama_cpp

CORPUS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Emoji: 🦀🔥👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，还有한국어。",
    "Combining: e\u0301 a\u0308 n\u0303 — Zalgo z\u0351\u0352a\u0353l\u0354g\u0355o",
    "Numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "Tabs\tand\nnewlines\r\n\n\nmixed   spaces",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé façade naïve coöperate",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "<s>literal tags</s> and <unk>",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def main() -> None:
    gguf = Path(sys.argv[1])
    out = Path(sys.argv[2])
    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "true" if llm.metadata.get("tokenizer.ggml.model") == "llama" else "false") == "true"
    cases = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=add_bos, special=True)} for t in CORPUS]
    doc = {
        "generator": f"llama-cpp-python {llama_cpp.__version__}, tokenize(special=True)",
        "model": gguf.name,
        "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "add_bos": add_bos,
        "cases": cases,
    }
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
