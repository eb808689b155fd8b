"""Drives a real Kindling daemon with the official `openai` Python client.

Started by scripts/test.sh with KINDLING_BIN pointing at the built binary.
"""
import base64
import struct

import daemon
import openai
import pytest
from daemon import ROOT
from openai import OpenAI

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client():
    proc, address, log = daemon.start(ROOT / "configs" / "kindling.toml")
    yield OpenAI(base_url=f"http://{address}/v1", api_key="not-needed", max_retries=0)
    daemon.stop(proc, log)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        temperature=0,
        max_tokens=40,
    )
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "4" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    args = dict(
        model=MODEL,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_tokens=16,
    )
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_streaming_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_seed_reproduces(client):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Invent a word."}], seed=42, max_tokens=12)
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"


def test_logit_bias_and_min_tokens(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
               temperature=0, max_tokens=3, logprobs=True)
    forced = client.chat.completions.create(logit_bias={"1000": 100}, **ask)
    tokens = [t.token for t in forced.choices[0].logprobs.content]
    assert len(tokens) == 3 and len(set(tokens)) == 1, tokens
    plain = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=3)
    biased = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=3,
                                       logit_bias={"1000": 100})
    assert biased.choices[0].text != plain.choices[0].text
    held = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0,
        max_tokens=64, extra_body={"min_tokens": 30},
    )
    assert held.usage.completion_tokens >= 30
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(logit_bias={"1000": 101}, **ask)
    assert e.value.body["param"] == "logit_bias"


EMBEDDING_MODEL = "all-minilm-l6-v2"


def test_embeddings_float_and_base64(client):
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé façade", "Hi"]
    as_float = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="float")
    assert as_float.object == "list"
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert all(len(d.embedding) == 384 for d in as_float.data)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > 0
    # base64 (the client asks for it by default and decodes it).
    as_b64 = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="base64")
    default = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    for f, b, d in zip(as_float.data, as_b64.data, default.data):
        assert isinstance(b.embedding, str)
        raw = base64.b64decode(b.embedding)
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        # JSON carries the shortest decimal of each f32: round it back to f32.
        floats = list(struct.unpack(f"<{len(f.embedding)}f", struct.pack(f"<{len(f.embedding)}f", *f.embedding)))
        assert decoded == floats
        assert list(d.embedding) == floats
        assert abs(sum(x * x for x in f.embedding) - 1.0) < 1e-4


def test_embeddings_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input=[])
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input="hi", dimensions=64)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="hi")
    assert e.value.body["param"] == "model"


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_images_generate(client):
    r = client.images.generate(
        model="sd-tiny", prompt="a lighthouse at dawn", n=2, size="64x48",
        response_format="b64_json", extra_body={"seed": 11, "steps": 3},
    )
    assert len(r.data) == 2
    for item in r.data:
        assert _png_size(base64.b64decode(item.b64_json)) == (64, 48)
    assert r.usage.input_tokens > 0
    again = client.images.generate(
        model="sd-tiny", prompt="a lighthouse at dawn", size="64x48",
        extra_body={"seed": 12, "steps": 3},
    )
    assert again.data[0].b64_json == r.data[1].b64_json
    jpeg = client.images.generate(model="sd-tiny", prompt="x", output_format="jpeg",
                                  extra_body={"steps": 2})
    assert base64.b64decode(jpeg.data[0].b64_json)[:2] == b"\xff\xd8"


def test_images_stream(client):
    stream = client.images.generate(
        model="sd-tiny", prompt="a lighthouse at dawn", stream=True, partial_images=2,
        extra_body={"seed": 11, "steps": 4},
    )
    kinds = [event.type for event in stream]
    assert kinds.count("image_generation.partial_image") == 2
    assert kinds[-1] == "image_generation.completed"
    assert kinds.count("image_generation.progress") == 4


def test_images_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="sd-tiny", prompt="x", size="65x64")
    assert e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="sd-tiny", prompt="x", response_format="url")
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="sd-tiny", prompt="x", n=11)
    assert e.value.body["param"] == "n"
