"""Writes the known-answer reference for Kindling's embedding model.

Runs sentence-transformers (PyTorch, f32, CPU) on the demo model folder and
records, for a fixed set of sentences, the token ids it feeds the encoder and
the embeddings it returns. `models/tests/embedding_known_answer.rs` compares
Kindling against this file.

    .venv-bench/bin/python scripts/embedding_reference.py \
        [store/all-minilm-l6-v2] [models/tests/data/minilm_reference.json]

(`benches/setup.sh` creates .venv-bench with sentence-transformers.)
"""

import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Kindling loads models only when asked and frees memory when they go idle.",
    "What is the capital of France?",
    "Ünïcödé façade: naïve café, crème brûlée, Straße and smörgåsbord.",
    "東京は日本の首都です。北京是中国的首都。",
    "Привет, как дела? Γειά σου κόσμε! مرحبا بالعالم",
    "Emoji 🚀🔥 and symbols ∑∫√ ≠ ≤ in text ☕.",
    "   leading and trailing   spaces\tand\ttabs\nand newlines  ",
    "1234567890 3.14159 2026-11-22 #hashtag @mention user@example.org",
    # Longer than the model's 256-token limit: sentence-transformers cuts it.
    " ".join(
        f"Sentence {i} of a long document about serving embeddings on a small CPU."
        for i in range(40)
    ),
    # Near the limit, not over it.
    " ".join(["embedding"] * 80),
]


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "store/all-minilm-l6-v2"
    out = sys.argv[2] if len(sys.argv) > 2 else "models/tests/data/minilm_reference.json"
    torch.manual_seed(0)
    model = SentenceTransformer(folder, device="cpu")
    features = model.tokenize(SENTENCES)
    ids = [
        [int(t) for t, m in zip(row, mask) if m]
        for row, mask in zip(features["input_ids"], features["attention_mask"])
    ]
    with torch.inference_mode():
        vectors = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    record = {
        "generator": "scripts/embedding_reference.py",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "cases": [
            {"text": s, "ids": i, "embedding": [float(x) for x in v]}
            for s, i, v in zip(SENTENCES, ids, vectors)
        ],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(SENTENCES)} cases to {out}")


if __name__ == "__main__":
    main()
