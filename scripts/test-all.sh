#!/usr/bin/env bash
# Every check Canopy has, in the order a failure is cheapest to see. CI runs exactly this
# (through .ci/run); so does the README.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "plugins (Wasm for wasm32-wasip2, installing the target if needed; native)"
bash scripts/build-plugins.sh

step "lint (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --locked --target wasm32-wasip2 -p canopy-plugin -p echo -p clock -p hostile -p dump -p sink -p canopy-member -- -D warnings

step "unit, property, integration and doc tests"
cargo test --workspace --locked

step "benchmarks run end to end (smoke: small sizes, one iteration each)"
CANOPY_BENCH_SIZES=1000 cargo bench -p canopy-benches --locked --bench name_matching -- --test
bash scripts/build-plugins.sh --release
cargo bench -p canopy-benches --locked --bench plugin_dispatch -- --test
cargo run -q --release --locked -p canopy-benches --bin match-memory -- 1000
cargo run -q --release --locked -p canopy-benches --bin match-ratio -- 10000 3
cargo run -q --release --locked -p canopy-benches --bin mem-latency -- 4
# relay-load starts the real relay binary found next to it, so build that first.
cargo build -q --release --locked -p canopy-relay
cargo run -q --release --locked -p canopy-benches --bin relay-load -- --connections 50 --subs-per-connection 20 --seconds 2
# Soak (the real run is 10 minutes, see docs/reliability.md): the same relay binary with the
# echo Wasm plugin (built above), churning connections and subscriptions; about 20 s.
cargo run -q --release --locked -p canopy-benches --bin soak -- --seconds 15 --sample 5 --connections 50 --churn 5 --sub-period 3 --rate 500
# Messaging bench, Canopy only (no Debian packages needed); the full side-by-side run is
# `bash scripts/install-peers.sh && cargo run --release -p canopy-benches --bin pubsub-bench`.
cargo run -q --release --locked -p canopy-benches --bin pubsub-bench -- --smoke

step "fuzz target builds"
(cd framework/fuzz && cargo check --locked -q)

step "demos run"
bash scripts/demo.sh > /dev/null
cargo run -q --release --locked -p canopy-examples --example tour > /dev/null

printf '\nall checks passed\n'
