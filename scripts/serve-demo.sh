#!/usr/bin/env bash
# Fetches the demo models and serves them: the one command to try Kindling.
# Extra arguments go to `kindling serve` (e.g. --listen 0.0.0.0:8080
# --api-key KEY: beyond loopback the daemon wants a key).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# One release build of the daemon and the tool that writes the sd-tiny demo.
cargo build --release --locked --workspace --bins
target=${CARGO_TARGET_DIR:-$root/target}
KINDLING_RANDOM_PIPELINE=$target/release/random-pipeline scripts/fetch-models.sh
exec "$target/release/kindling" serve --config configs/kindling.toml "$@"
