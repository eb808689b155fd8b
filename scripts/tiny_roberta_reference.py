"""Writes a tiny random RoBERTa (transformers' RobertaModel) and its outputs,
for Kindling's RoBERTa-style position handling test.

    .venv-bench/bin/python scripts/tiny_roberta_reference.py [models/tests/data/tiny-roberta]

The folder gets `config.json` and `model.safetensors` (random weights, seed 0)
and `reference.json`: for a few token-id sequences, the encoder's last hidden
states (f32, CPU). `models/tests/tiny_roberta.rs` compares against it.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaModel


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models/tests/data/tiny-roberta")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        hidden_act="gelu",
    )
    model = RobertaModel(config, add_pooling_layer=False).eval()
    # Random LayerNorm weights too, so a wrong norm cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(out, safe_serialization=True)
    sequences = [[0, 5, 17, 42, 2], [0, 99, 2], [0] + list(range(3, 39)) + [2]]
    cases = []
    with torch.inference_mode():
        for ids in sequences:
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
            cases.append({"ids": ids, "hidden": [float(x) for x in hidden.flatten()]})
    (out / "reference.json").write_text(json.dumps({"generator": "scripts/tiny_roberta_reference.py",
                                                    "torch": torch.__version__, "cases": cases}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
