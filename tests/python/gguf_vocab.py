"""Reads the token list of a GGUF file (the tests pick token ids for
`logit_bias` with it). GGUF: magic, version, tensor and key counts, then
typed key/value pairs; the vocabulary is `tokenizer.ggml.tokens`."""
import struct

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read(f, fmt):
    size = struct.calcsize("<" + fmt)
    return struct.unpack("<" + fmt, f.read(size))[0]


def _string(f):
    return f.read(_read(f, "Q")).decode("utf-8", errors="replace")


def _value(f, kind):
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == 8:
        return _string(f)
    if kind == 9:
        inner, count = _read(f, "I"), _read(f, "Q")
        return [_value(f, inner) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def tokens(path):
    """The vocabulary: token strings by id."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _read(f, "I")  # version
        _read(f, "Q")  # tensors
        for _ in range(_read(f, "Q")):
            key = _string(f)
            value = _value(f, _read(f, "I"))
            if key == "tokenizer.ggml.tokens":
                return value
    raise ValueError(f"{path} has no tokenizer.ggml.tokens")
