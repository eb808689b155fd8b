"""API keys and rate limits through the official `openai` Python client.

Started by scripts/test.sh with KINDLING_BIN pointing at the built binary.
"""
import subprocess
import tempfile
from pathlib import Path

import daemon
import openai
import pytest
from daemon import ROOT
from openai import OpenAI

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "kindling.toml"
        config.write_text(
            f'[auth]\nkeys_file = "keys.toml"\n[usage]\npath = "usage.sqlite"\n'
            f'[models]\nmanifests = "{ROOT / "configs" / "models"}"\nstore = "{ROOT / "store"}"\n'
        )
        limited = subprocess.run(
            [daemon.binary(), "keys", "--config", str(config), "create", "--name", "limited", "--rpm", "1"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        proc, address, log = daemon.start(config, "--api-key", "full-key")
        yield f"http://{address}/v1", limited
        daemon.stop(proc, log)


def test_the_client_sends_its_api_key(server):
    base, _ = server
    client = OpenAI(base_url=base, api_key="full-key", max_retries=0)
    assert MODEL in [m.id for m in client.models.list()]
    with pytest.raises(openai.AuthenticationError) as e:
        OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"


def test_a_rate_limited_key_gets_a_rate_limit_error_with_headers(server):
    base, limited = server
    client = OpenAI(base_url=base, api_key=limited, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.parse().usage.completion_tokens >= 1
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        )
    assert e.value.status_code == 429
    assert int(e.value.response.headers["retry-after"]) >= 1
