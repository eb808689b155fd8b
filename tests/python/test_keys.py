"""API keys and rate limits through the official `openai` Python client.

Started by scripts/test.sh with KINDLING_BIN pointing at the built binary.
"""
import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

import openai
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m"


def start(config, *args):
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "debug" / "kindling"))
    proc = subprocess.Popen(
        [binary, "serve", "--config", str(config), "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    addresses: "queue.Queue[str]" = queue.Queue()
    log = []

    def drain():
        for line in proc.stdout:
            log.append(line)
            if "listening on http://" in line:
                addresses.put(line.split("listening on http://")[1].split()[0])

    threading.Thread(target=drain, daemon=True).start()
    try:
        return proc, addresses.get(timeout=20), log
    except queue.Empty:
        proc.kill()
        pytest.fail("kindling did not start:\n" + "".join(log))


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "kindling.toml"
        config.write_text(
            f'[auth]\nkeys_file = "keys.toml"\n[usage]\npath = "usage.sqlite"\n'
            f'[models]\nmanifests = "{ROOT / "configs" / "models"}"\nstore = "{ROOT / "store"}"\n'
        )
        binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "debug" / "kindling"))
        limited = subprocess.run(
            [binary, "keys", "--config", str(config), "create", "--name", "limited", "--rpm", "1"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        proc, address, log = start(config, "--api-key", "full-key")
        yield f"http://{address}/v1", limited
        proc.terminate()
        assert proc.wait(timeout=30) == 0, "".join(log)


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
