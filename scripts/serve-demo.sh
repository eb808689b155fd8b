#!/usr/bin/env bash
# Fetches the demo models and serves them: the one command to try Kindling.
# Extra arguments go to `kindling serve` (e.g. --listen 0.0.0.0:8080).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/fetch-models.sh
exec cargo run --release --locked --bin kindling -- serve --config configs/kindling.toml "$@"
