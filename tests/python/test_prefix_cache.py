"""The prefix cache through the official `openai` client: the second turn of
a conversation reports the prompt tokens it reused, and at temperature 0
every turn reads the same with the cache on as with it off."""
import os
import tempfile
from pathlib import Path

import daemon
import pytest
from daemon import ROOT
from openai import OpenAI

MODEL = "smollm2-135m"
SYSTEM = "You are Kindling's helpful assistant. Answer briefly and kindly. " * 24


def config(d, caching):
    store = os.environ.get("KINDLING_STORE", str(ROOT / "store"))
    path = Path(d) / f"kindling-{caching}.toml"
    path.write_text(
        f'[models]\nmanifests = "{ROOT / "configs" / "models"}"\nstore = "{store}"\n'
        f"[engine]\nprefix_caching = {str(caching).lower()}\n"
    )
    return path


@pytest.fixture(scope="module")
def clients():
    with tempfile.TemporaryDirectory() as d:
        started = [daemon.start(config(d, on)) for on in (True, False)]
        yield [OpenAI(base_url=f"http://{a}/v1", api_key="x", max_retries=0) for _, a, _ in started]
        for proc, _, log in started:
            daemon.stop(proc, log)


def conversation(client, turns=3):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    out = []
    for _ in range(turns):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
        text = r.choices[0].message.content
        out.append((text, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And another?"}]
    return out


def test_later_turns_reuse_the_prefix_and_read_the_same(clients):
    cached, uncached = clients
    on, off = conversation(cached), conversation(uncached)
    assert [t for t, _, _ in on] == [t for t, _, _ in off]
    assert [p for _, p, _ in on] == [p for _, p, _ in off]
    assert on[0][2] == 0 and all(c == 0 for _, _, c in off)
    for text, prompt, hit in on[1:]:
        # Everything up to the last whole 16-token block of the previous turn.
        assert prompt // 2 < hit < prompt, (prompt, hit)


def test_streamed_usage_reports_cached_tokens(clients):
    client = clients[0]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= len(SYSTEM) // 8


def test_a_salt_keeps_cached_blocks_apart(clients):
    client = clients[0]
    messages = [{"role": "system", "content": "Salted. " + SYSTEM}, {"role": "user", "content": "Hello."}]

    def cached(**extra):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(extra_body={"cache_salt": "team-a"}) == 0
    assert cached(extra_body={"cache_salt": "team-b"}) == 0
    assert cached() == 0
    assert cached(extra_body={"cache_salt": "team-a"}) > 0
    assert cached() > 0
