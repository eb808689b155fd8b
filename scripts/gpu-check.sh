#!/usr/bin/env bash
# Proves Kindling's GPU side in one command on a GPU host, prepared on a
# machine without one.
#
#   scripts/gpu-check.sh prepare [--skip-build]   # here: build and pack into .gpu/
#   scripts/gpu-check.sh run [--only STAGES] [--budget SECONDS]
#                                                 # there: check, measure, report
#   scripts/gpu-check.sh run --dry-run            # here, without a GPU: the
#                                                 # same flow on the CPU
#
# `prepare` builds with CUDA (scripts/build-cuda.sh --tests --bench), fetches
# the demo models, and packs into .gpu/ (git-ignored, a few tens of MB):
#   bin.tar.xz   the daemon, the weight writers, the benchmark examples, the
#                CUDA test binaries (stripped) and libcudart.so.13
#   models/      the demo chat and embedding models' headers (metadata,
#                tokenizer, chat template, tensor shapes) and small files; the
#                host refills them with random weights (their real weights do
#                not fit in the pack and do not matter to what is checked)
#   wheels/      the official OpenAI client and its dependencies (Python 3.11-3.13)
#   manifest.json
#
# `run` needs, on the host: the NVIDIA driver, cuBLAS 13, cuRAND 10 and
# NVRTC 13 (found in the loader's cache, /usr/local/cuda or Python's NVIDIA
# wheels), Python 3, and for the decode comparison PyTorch with transformers.
# It runs from this checkout with .gpu/ beside it, takes about 5 minutes on
# an H100 (it writes 16 GB of Llama-3-8B-shaped weights), and writes
# summary.json, report.md, logs.tar.gz and nvidia-smi.txt to $OUT (else
# ./gpu-out). Exit 0: every check passed; 1: something failed; 2: no GPU;
# 3: dry run. See scripts/gpu/check.py for the stages.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prepare() {
    local build=1
    case ${1:-} in
        --skip-build) build=0 ;;
        "") ;;
        *) usage ;;
    esac
    local pack=${KINDLING_GPU_PACK:-$root/.gpu}
    local target=${CARGO_TARGET_DIR:-$root/target}
    ((build)) && scripts/build-cuda.sh --tests --bench
    [[ -s $target/release/cuda-tests.txt ]] || { echo "gpu-check: no test list: run without --skip-build" >&2; exit 1; }
    KINDLING_RANDOM_PIPELINE=$target/release/random-pipeline scripts/fetch-models.sh

    rm -rf "$pack"
    mkdir -p "$pack/models" "$pack/wheels"
    local stage
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' RETURN

    # Binaries, by their paths under the build root (the test binaries find
    # the daemon and their data there).
    local -a names=(kindling random-pipeline random-weights gpu_decode sd_speed)
    local -a files=(
        "${target#"$root"/}/release/kindling"
        "${target#"$root"/}/release/random-pipeline"
        "${target#"$root"/}/release/random-weights"
        "${target#"$root"/}/release/examples/gpu_decode"
        "${target#"$root"/}/release/examples/sd_speed"
    )
    local name path
    for name in fused device stable_diffusion devices; do
        path=$(awk -v n="$name" '$1 == n { print $2 }' "$target/release/cuda-tests.txt" | tail -n1)
        [[ -n $path ]] || { echo "gpu-check: test binary $name was not built" >&2; exit 1; }
        names+=("test:$name")
        files+=("${path#"$root"/}")
    done
    local i
    for i in "${!files[@]}"; do
        mkdir -p "$stage/$(dirname "${files[$i]}")"
        strip --strip-all -o "$stage/${files[$i]}" "$root/${files[$i]}"
    done
    local cudart=${target#"$root"/}/release/libcudart.so.13
    cp -L "$root/$cudart" "$stage/$cudart"
    # One LZMA window over every binary: they share most of their code and
    # all of candle's kernels, which then compress to one copy.
    local total dict
    total=$(du -sb "$stage" | cut -f1)
    dict=$(( (total / 1048576 + 64) ))
    ((dict > 1024)) && dict=1024
    echo "gpu-check: packing $((total / 1048576)) MiB of binaries (LZMA window ${dict} MiB)"
    (cd "$stage" && tar -cf - "${files[@]}" "$cudart") |
        xz -T1 --lzma2=preset=6,dict=${dict}MiB >"$pack/bin.tar.xz"

    # The demo models' headers and small files.
    local bin=$target/release/random-weights
    "$bin" shape store/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf "$pack/models/smollm2-135m.shape.gguf" >/dev/null
    mkdir -p "$pack/models/all-minilm-l6-v2"
    (cd store/all-minilm-l6-v2 && find . -type f ! -name model.safetensors -exec cp --parents {} "$pack/models/all-minilm-l6-v2/" \;)
    "$bin" shape store/all-minilm-l6-v2/model.safetensors "$pack/models/all-minilm-l6-v2/model.safetensors.shape" >/dev/null

    # The OpenAI client the Python tests pin, with its dependencies, for
    # Python 3.11 to 3.13 (the compiled parts of each sit side by side).
    local openai version
    openai=$(grep -E '^openai==' tests/python/requirements.txt)
    for version in 3.11 3.12 3.13; do
        python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
            --python-version "$version" --implementation cp --abi "cp${version/./}" \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any \
            -d "$pack/wheels" "$openai"
    done

    # shellcheck disable=SC1091
    source "${KINDLING_CUDA_DIR:-$root/.cuda}/env.sh"
    local commit
    commit=$(git rev-parse --short HEAD)
    [[ -z $(git status --porcelain --untracked-files=no) ]] || commit+="+changes"
    python3 - "$pack" "$root" "$commit" "$(nvcc --version | tail -n1)" "${CUDA_COMPUTE_CAP:-90}" \
        "${names[@]}" -- "${files[@]}" "$cudart" <<'PY'
import hashlib, json, sys, time
pack, root, commit, nvcc, cap, *rest = sys.argv[1:]
cut = rest.index("--")
names, files = rest[:cut], rest[cut + 1:]
digest = hashlib.sha256(open(f"{pack}/bin.tar.xz", "rb").read()).hexdigest()
manifest = {
    "pack_id": digest[:16], "commit": commit, "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "build_root": root, "nvcc": nvcc, "compute_cap": cap,
    "files": files, "binaries": dict(zip(names, files)),
}
open(f"{pack}/manifest.json", "w").write(json.dumps(manifest, indent=2) + "\n")
PY

    # What travels with the checkout: the tracked files and this pack.
    local tree packed limit=$((64 * 1048576))
    tree=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -n1 | cut -f1)
    packed=$(du -sb "$pack" | cut -f1)
    echo "gpu-check: $pack holds $((packed / 1048576)) MiB ($(du -sh "$pack/bin.tar.xz" | cut -f1) binaries); with the checkout $(((packed + tree) / 1048576)) MiB"
    du -sh "$pack"/* | sed 's/^/  /'
    if ((packed + tree > limit)); then
        echo "gpu-check: the pack and the checkout exceed 64 MiB" >&2
        exit 1
    fi
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) shift; exec python3 scripts/gpu/check.py "$@" ;;
    *) usage ;;
esac
