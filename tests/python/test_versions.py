"""Model versions through the official `openai` Python client: the
`id@version` names, the version header on plain and streamed responses,
sticky routing by `user`, and a promotion seen by the very next request.

Started by scripts/test.sh with KINDLING_BIN pointing at the built binary.
"""
import json
import os
import tempfile
import urllib.request
from pathlib import Path

import daemon
import pytest
from daemon import ROOT
from openai import OpenAI

PROMPT = "Write a long story about a dragon who lives in a castle."


def manifest(version, max_tokens):
    return (
        f'id = "demo"\nversion = "{version}"\nkind = "chat"\nformat = "gguf"\n'
        f'architecture = "llama"\n[weights]\npath = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"\n'
        f"[defaults]\nmax_tokens = {max_tokens}\n"
    )


@pytest.fixture(scope="module")
def server():
    store = os.environ.get("KINDLING_STORE", str(ROOT / "store"))
    with tempfile.TemporaryDirectory() as d:
        models = Path(d) / "models"
        models.mkdir()
        (models / "v1.toml").write_text(manifest("v1", 3))
        (models / "v2.toml").write_text(manifest("v2", 6))
        config = Path(d) / "kindling.toml"
        config.write_text(
            '[routes.demo]\nweights = { v1 = 100 }\n'
            f'[models]\nmanifests = "models"\nstore = "{store}"\nroutes_state = "routes.json"\n'
        )
        proc, address, log = daemon.start(config)
        yield f"http://{address}"
        daemon.stop(proc, log)


def ask(client, model, **extra):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0, **extra
    )
    return raw.headers["x-kindling-model-version"], raw.parse()


def test_versions_are_models_and_every_answer_names_its_version(server):
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    ids = {m.id for m in client.models.list()}
    assert {"demo", "demo@v1", "demo@v2"} <= ids
    version, reply = ask(client, "demo@v2")
    assert (version, reply.model, reply.usage.completion_tokens) == ("v2", "demo@v2", 6)
    version, reply = ask(client, "demo", user="alice")
    assert (version, reply.model, reply.usage.completion_tokens) == ("v1", "demo@v1", 3)


def test_a_promotion_reaches_the_next_request_and_streams_name_their_version(server):
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    body = json.dumps({"version": "v2"}).encode()
    req = urllib.request.Request(
        f"{server}/admin/routes/demo/promote", data=body, method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        assert json.load(resp)["weights"]["v2"] == 100
    with client.chat.completions.with_streaming_response.create(
        model="demo", messages=[{"role": "user", "content": PROMPT}], temperature=0,
        stream=True, user="bob",
    ) as resp:
        assert resp.headers["x-kindling-model-version"] == "v2"
        chunks = list(resp.parse())
    assert all(c.model == "demo@v2" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    req = urllib.request.Request(f"{server}/admin/routes/demo/rollback", method="POST")
    with urllib.request.urlopen(req) as resp:
        assert json.load(resp)["weights"] == {"v1": 100}
    assert ask(client, "demo", user="bob")[0] == "v1"


def test_the_prefix_cache_is_per_version(server):
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "system", "content": "You are a careful narrator of castle histories. " * 8},
                {"role": "user", "content": "Begin."}]

    def cached(model):
        r = client.chat.completions.create(model=model, messages=messages, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("demo@v1") == 0
    assert cached("demo@v1") > 0
    # The same prompt on another version computes its own keys and values.
    assert cached("demo@v2") == 0
    assert cached("demo@v2") > 0
