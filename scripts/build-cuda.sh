#!/usr/bin/env bash
# Builds Kindling with CUDA support (`--features cuda`), in release mode:
#
#   scripts/build-cuda.sh            # -> target/release/kindling (+ libcudart)
#   scripts/build-cuda.sh --tests    # also the kernel and model test binaries
#   scripts/build-cuda.sh --bench    # also target/release/examples/gpu_decode
#
# Sets up the CUDA 13.0 toolkit from NVIDIA's wheels first when .cuda/ lacks
# it (scripts/cuda-toolkit.sh). No GPU is needed to build. The binary opens
# the driver, cuBLAS, cuRAND and NVRTC at run time and starts without them
# (serving on the CPU); it needs only libcudart.so.13, which is copied beside
# it and found there through its run path.
set -euo pipefail

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
case ${1:-} in
    --tests) cargo test --release --features cuda --config "$patch_arg" --workspace --no-run ;;
    --bench) cargo build --release --features cuda --config "$patch_arg" -p kindling-models --example gpu_decode ;;
esac
cp -L "$CUDA_ROOT/lib64/libcudart.so.13" "$target/release/"
ls -l "$target/release/kindling"
