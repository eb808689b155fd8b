#!/usr/bin/env bash
# Creates .venv-bench with the peer for the benchmarks: llama.cpp built from
# the sources in the llama-cpp-python sdist (x86-64-v3 flags, the level
# Kindling is built for; AMX off: the native AMX build crashes here).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv-bench
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$venv/bin/pip" install --disable-pip-version-check llama-cpp-python==0.3.36 numpy jinja2
