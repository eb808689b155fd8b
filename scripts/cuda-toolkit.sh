#!/usr/bin/env bash
# Sets up a CUDA 13.0 toolkit from NVIDIA's Python wheels, for building
# Kindling with `--features cuda` on a machine without a system toolkit (a GPU
# is not needed to build).
#
#   scripts/cuda-toolkit.sh          # installs into .cuda/ (git-ignored)
#   source .cuda/env.sh              # CUDA_ROOT, PATH, CUDA_COMPUTE_CAP
#
# scripts/build-cuda.sh runs this when needed and then builds.
#
# Why 13.0: GPU hosts on driver 580 run CUDA 13.0, whose PTX JIT accepts the
# PTX that nvcc 13.0 writes; a newer nvcc writes PTX that driver refuses.
#
# Layout of .cuda/:
#   venv/      the wheels (about 1.2 GB)
#   root/      a CUDA_ROOT: bin, include, nvvm linked from the wheels, and
#              lib64 with the shared libraries plus unversioned links
#   cudarc/    candle's CUDA binding crate with one build-script change: the
#              driver, cuBLAS, cuRAND and NVRTC libraries are opened at run
#              time instead of linked, so a binary starts without a GPU or
#              driver and falls back to the CPU
#   env.sh     the environment for a build
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${KINDLING_CUDA_DIR:-$root/.cuda}
# 90 = Hopper (H100/H200). Override for other GPUs (80 = A100, 89 = L4/L40S).
cap=${CUDA_COMPUTE_CAP:-90}

wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35
    nvidia-cublas==13.1.0.3
)

mkdir -p "$dir"
if [[ ! -x $dir/venv/bin/python ]]; then
    python3 -m venv "$dir/venv"
fi
"$dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}"

tree=$("$dir/venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[[ -x $tree/bin/nvcc ]] || { echo "nvcc missing from $tree" >&2; exit 1; }

cuda=$dir/root
rm -rf "$cuda"
mkdir -p "$cuda/lib64"
for part in bin include nvvm; do
    ln -s "$tree/$part" "$cuda/$part"
done
for lib in "$tree"/lib/*.so* "$tree"/lib/*.a; do
    [[ -e $lib ]] && ln -sf "$lib" "$cuda/lib64/"
done
# Unversioned names for the linker.
for name in cudart cublas cublasLt nvrtc curand; do
    versioned=$(cd "$cuda/lib64" && ls "lib$name.so."* 2>/dev/null | sort | head -n1 || true)
    [[ -n $versioned ]] || { echo "lib$name missing from the wheels" >&2; exit 1; }
    ln -sf "$versioned" "$cuda/lib64/lib$name.so"
done

# cudarc with run-time loading of every CUDA library (see the header).
cargo fetch --locked --manifest-path "$root/Cargo.toml" >/dev/null 2>&1 || true
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -n1 || true)
if [[ -z $registry ]]; then
    # Not yet fetched: cudarc only enters the lock file with `cuda` on.
    tmp=$(mktemp -d)
    mkdir -p "$tmp/src"
    printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncudarc = { version = "=0.19.10", default-features = false, features = ["std"] }\n' >"$tmp/Cargo.toml"
    echo 'fn main() {}' >"$tmp/src/main.rs"
    cargo fetch --manifest-path "$tmp/Cargo.toml" >/dev/null
    rm -rf "$tmp"
    registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -n1)
fi
rm -rf "$dir/cudarc"
cp -r "$registry" "$dir/cudarc"
patch --quiet -d "$dir/cudarc" -p1 <"$root/scripts/cuda/cudarc-run-time-loading.patch"

cat >"$dir/env.sh" <<EOF
# Environment for building Kindling with --features cuda (from scripts/cuda-toolkit.sh).
export CUDA_ROOT="$cuda" CUDA_HOME="$cuda" CUDA_PATH="$cuda"
export PATH="$cuda/bin:\$PATH"
export CUDA_COMPUTE_CAP=$cap
export LIBRARY_PATH="$cuda/lib64\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
"$cuda/bin/nvcc" --version | tail -n2
echo "CUDA toolkit ready in $dir; run: source $dir/env.sh"
