#!/usr/bin/env bash
# Builds Kindling with CUDA support (`--features cuda`), in release mode:
#
#   scripts/build-cuda.sh            # -> target/release/kindling (+ libcudart)
#   scripts/build-cuda.sh --tests    # also the test binaries, listed in
#                                    # target/release/cuda-tests.txt (name path)
#   scripts/build-cuda.sh --bench    # also target/release/examples/{gpu_decode,sd_speed}
#   scripts/build-cuda.sh --tests --bench
#
# Sets up the CUDA 13.0 toolkit from NVIDIA's wheels first when .cuda/ lacks
# it (scripts/cuda-toolkit.sh). No GPU is needed to build. The binary opens
# the driver, cuBLAS, cuRAND and NVRTC at run time and starts without them
# (serving on the CPU); it needs only libcudart.so.13, which is copied beside
# it and found there through its run path.
set -euo pipefail

tests=0 bench=0
for arg in "$@"; do
    case $arg in
        --tests) tests=1 ;;
        --bench) bench=1 ;;
        *) echo "usage: scripts/build-cuda.sh [--tests] [--bench]" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${KINDLING_CUDA_DIR:-$root/.cuda}
[[ -f $dir/env.sh && -d $dir/cudarc ]] || scripts/cuda-toolkit.sh
# shellcheck disable=SC1091
source "$dir/env.sh"

# The patched cudarc (see cuda-toolkit.sh) replaces the registry's for this
# build only; the committed lock file is put back afterwards.
cargo metadata --format-version 1 >/dev/null
cp Cargo.lock "$dir/Cargo.lock.saved"
trap 'cp "$dir/Cargo.lock.saved" Cargo.lock' EXIT
patch_arg="patch.crates-io.cudarc.path=\"$dir/cudarc\""

target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --features cuda --config "$patch_arg" --workspace --bins
if ((tests)); then
    cargo test --release --features cuda --config "$patch_arg" --workspace --no-run \
        --message-format=json-render-diagnostics >"$target/release/cuda-tests.json"
    python3 - "$target/release/cuda-tests.json" >"$target/release/cuda-tests.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
PY
fi
if ((bench)); then
    cargo build --release --features cuda --config "$patch_arg" -p kindling-models \
        --example gpu_decode --example sd_speed
fi
cp -L "$CUDA_ROOT/lib64/libcudart.so.13" "$target/release/"
ls -l "$target/release/kindling"
