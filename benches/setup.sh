#!/usr/bin/env bash
# Creates .venv-bench with the peer for the benchmarks: llama.cpp built from
# the sources in the llama-cpp-python sdist with every x86 extension this
# machine's CPU reports (of AVX2, AVX-VNNI, AVX-512 F/VBMI/VNNI/BF16, FMA,
# F16C, BMI2) except AMX: llama.cpp's native build (GGML_NATIVE) crashes in
# its AMX code on the first decode on AMX machines, so the options are named
# one by one, from /proc/cpuinfo.
#
# - llama-cpp-python (in-process llama.cpp, for the single-stream figures),
# - .venv-bench/bin/llama-server, built from the same sdist's vendored
#   llama.cpp with the same GGML options (for the concurrent figures),
# - .venv-bench/bin/llama-quantize from the same build (requantizes the demo
#   model to Q4_0, Q4_K_M, Q5_K_M and Q8_0 for the per-format figures and the
#   known-answer tests),
# - sentence-transformers and PyTorch (the embeddings peer),
# - diffusers (the image peer).
#
# Idempotent: a second run skips what is already built. Builds use
# CMAKE_BUILD_PARALLEL_LEVEL jobs (default 2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv-bench
version=0.3.36
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# Each extension is switched on only where this machine's CPU reports it
# (CPUs of this kind differ: AVX-VNNI on some, only AVX-512 VNNI on others).
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ $cpu_flags == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
ggml_opts="-DGGML_NATIVE=OFF -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2) -DGGML_AVX_VNNI=$(onoff avx_vnni) -DGGML_AVX512=$(onoff avx512f) -DGGML_AVX512_VBMI=$(onoff avx512vbmi) -DGGML_AVX512_VNNI=$(onoff avx512_vnni) -DGGML_AVX512_BF16=$(onoff avx512_bf16) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c) -DGGML_BMI2=$(onoff bmi2) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
py_cmake_args="-DLLAMA_CURL=OFF $ggml_opts"
# Server build: static, release, no web UI (neither built nor downloaded), no
# HTTPS, no tests or examples.
server_cmake_args="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $ggml_opts"

[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
pip=("$venv/bin/pip" --disable-pip-version-check)

# 1. llama-cpp-python, compiled here with the flags above. --no-cache-dir: pip
# would otherwise reuse a wheel it built earlier with other flags (a native
# AMX build, say). A stamp records the flags of the installed build.
stamp=$venv/.llama-cpp-python.flags
if [[ "$(cat "$stamp" 2>/dev/null)" != "$version $py_cmake_args" ]] \
    || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "setup: building llama-cpp-python $version" >&2
    CMAKE_BUILD_PARALLEL_LEVEL=$jobs CMAKE_ARGS="$py_cmake_args" \
        "${pip[@]}" install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$version"
    echo "$version $py_cmake_args" > "$stamp"
fi
"${pip[@]}" install -q "llama-cpp-python==$version" numpy jinja2 cmake
# The embeddings peer (benches/embeddings.py, scripts/embedding_reference.py).
"${pip[@]}" install -q "sentence-transformers==6.2.0" "torch==2.15.0" "diffusers==0.42.1"

# 2. The same sdist, unpacked, for llama.cpp's own sources. (Only the sdist is
# fetched; its build requirements may come as wheels.)
src=$venv/src
llama_src=$src/llama_cpp_python-$version/vendor/llama.cpp
if [[ ! -f $llama_src/CMakeLists.txt ]]; then
    echo "setup: fetching the llama-cpp-python $version sdist" >&2
    mkdir -p "$src/dl"
    "${pip[@]}" download "llama-cpp-python==$version" --no-binary llama-cpp-python --no-deps -d "$src/dl"
    tar -xzf "$src/dl/llama_cpp_python-$version.tar.gz" -C "$src"
fi

# 3. llama-server from those sources, with the same GGML options.
build=$src/llama-server-build
cmake=$venv/bin/cmake
if [[ "$(cat "$build/.flags" 2>/dev/null)" != "$server_cmake_args" ]]; then
    echo "setup: configuring llama-server" >&2
    rm -rf "$build"
    # shellcheck disable=SC2086
    "$cmake" -S "$llama_src" -B "$build" $server_cmake_args
    echo "$server_cmake_args" > "$build/.flags"
fi
echo "setup: building llama-server and llama-quantize (incremental)" >&2
"$cmake" --build "$build" --config Release --target llama-server llama-quantize -j "$jobs"
install -m 755 "$build/bin/llama-server" "$venv/bin/llama-server"
install -m 755 "$build/bin/llama-quantize" "$venv/bin/llama-quantize"

"$venv/bin/llama-server" --version
"$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
