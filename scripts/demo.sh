#!/usr/bin/env bash
# The README's demo: a relay tree on loopback, then the messenger on it. Builds what the
# messenger part runs (the `canopy-msg` binary and the member Wasm plugin, installing the
# wasm32-wasip2 target if needed), then runs the `tree` example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh --release > /dev/null
cargo build -q --release --locked -p canopy-messenger --bin canopy-msg
cargo run -q --release --locked -p canopy-examples --example tree
