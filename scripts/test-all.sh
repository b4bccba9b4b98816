#!/usr/bin/env bash
# Every check Canopy has, in the order a failure is cheapest to see. CI runs exactly this
# (through .ci/run); so does the README.
set -euo pipefail
cd "$(dirname "$0")/.."

# The multisig model's secp256k1 (C) for wasm32-wasip2: see scripts/build-plugins.sh.
export CFLAGS_wasm32_wasip2="-nostdlibinc"

# Each step prints the minutes:seconds since the start, so a slow CI run shows where it went.
# It also prints the disk space left and what target/ takes, since a full disk shows up only as a
# linker failure whose message cargo cuts short.
step() {
  printf '\n==> [%02d:%02d] %s (disk free: %s, target/: %s)\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" \
    "$(df -h --output=avail . | tail -1 | tr -d ' ')" "$(du -sh target 2>/dev/null | cut -f1 || echo none)"
}

# CI builds from scratch and never rebuilds, so incremental compilation's caches (several GB in
# target/debug/incremental) only cost disk; a caller may still set CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "test tools (tmux, Chromium, Redis; installing what is missing)"
bash scripts/install-test-deps.sh

step "plugins (Wasm for wasm32-wasip2, installing the target if needed; native)"
bash scripts/build-plugins.sh

step "lint (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --locked --target wasm32-wasip2 -p canopy-plugin -p echo -p clock -p hostile -p dump -p sink -p canopy-member -p canopy-model -p poll -p faulty -p multisig -- -D warnings

step "unit, property, integration and doc tests"
cargo test --workspace --locked

step "release build (scripts/build-release.sh: plugins, relay, messenger, benches, examples in one cargo call)"
bash scripts/build-release.sh
# The same package set as build-release.sh, so cargo bench reuses its dependencies.
RELEASE_SET=(-p canopy-relay -p canopy-messenger -p canopy-benches -p canopy-examples)
bin=target/release

step "benchmarks run end to end (smoke: small sizes, one iteration each)"
CANOPY_BENCH_SIZES=1000 cargo bench --locked "${RELEASE_SET[@]}" --bench name_matching -- --test
cargo bench --locked "${RELEASE_SET[@]}" --bench plugin_dispatch -- --test
$bin/match-memory 1000
$bin/match-ratio 10000 3
$bin/mem-latency 4
# relay-load starts the real relay binary found next to it.
$bin/relay-load --connections 50 --subs-per-connection 20 --seconds 2
# Soak (the real run is 10 minutes, see docs/reliability.md): the same relay binary with the
# echo Wasm plugin, churning connections and subscriptions; about 20 s.
$bin/soak --seconds 15 --sample 5 --connections 50 --churn 5 --sub-period 3 --rate 500
# Messaging bench, Canopy only (no Debian packages needed); the full side-by-side run is
# `bash scripts/install-peers.sh && cargo run --release -p canopy-benches --bin pubsub-bench`.
$bin/pubsub-bench --smoke
# A pipeline model's apply through the Wasm model host beside the same model native.
$bin/model-apply 2 10
# A 2-of-3 multisig pipeline end to end through the CLI of three users (about 20 s).
$bin/pipeline-e2e
# The web UI's live updates beside Secure's follow stream (the full run: --messages 300).
$bin/web-latency --messages 20
# The Redis Cluster store beside the memory and fjall stores, on a 3-primary cluster of real
# redis-server processes (the full run: no flags, docs/origin.md).
$bin/redis-store --smoke
# One and two origin front-ends over a Redis Cluster beside single origins (docs/origin.md).
$bin/origin-bench --smoke

step "fuzz target builds"
(cd framework/fuzz && cargo check --locked -q)
(cd apps/messenger/core/fuzz && cargo check --locked -q)

step "demos run"
bash scripts/demo.sh > /dev/null
$bin/examples/tour > /dev/null

step "done"
printf '\nall checks passed\n'
