#!/usr/bin/env bash
# Runs Kindling's whole test suite on a fresh machine:
#   1. fetches the demo models (skipped when present and verified),
#   2. runs every Rust test (unit, known-answer, HTTP integration),
#   3. drives the daemon with the official OpenAI Python client, in a venv.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/fetch-models.sh

# A throwaway PostgreSQL server for the usage store's tests (KINDLING_TEST_PG=0 skips it).
if [[ ${KINDLING_TEST_PG:-1} != 0 ]]; then
    pgtmp=$(mktemp -d)
    chmod 755 "$pgtmp"  # the server runs as user postgres when we are root
    trap 'scripts/pg-test-server.sh stop "$pgtmp/pg" || true; rm -rf "$pgtmp"' EXIT
    KINDLING_TEST_PG_URL=$(scripts/pg-test-server.sh start "$pgtmp/pg")
    export KINDLING_TEST_PG_URL KINDLING_REQUIRE_PG=1
fi

cargo test --workspace --locked

venv=${KINDLING_TEST_VENV:-$root/.venv}
if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --locked --workspace --bins
target=${CARGO_TARGET_DIR:-$root/target}
KINDLING_BIN="$target/debug/kindling" "$venv/bin/python" -m pytest -q tests/python

# The container image from the Dockerfile (its stage for binaries built
# outside, here the ones above), run read-only with podman and driven by the
# OpenAI client, then stopped with SIGTERM mid-stream. The whole multi-stage
# build is `scripts/container-smoke.sh --full`. KINDLING_TEST_CONTAINER=0 skips.
if [[ ${KINDLING_TEST_CONTAINER:-1} != 0 ]]; then
    scripts/container-smoke.sh --prebuilt --no-build \
        --bin "$target/debug/kindling" --random-pipeline "$target/debug/random-pipeline" \
        --store "${KINDLING_STORE:-$root/store}"
fi
