#!/usr/bin/env bash
# Builds every release artefact the demo, the bench smoke runs and the benches themselves use:
# the plugins (Wasm, and native in release), then the relay, the messenger, the bench binaries
# and the examples in ONE cargo call.
#
# Why one call: cargo resolves features per invocation, for the packages it was given. Two
# release builds with different `-p` sets can each want a different feature set of a shared
# crate (tokio, wasmtime, openmls...), and then each rebuilds it. Every release cargo command in
# scripts/ uses RELEASE_SET (with at least one example or bench target, so dev-dependencies are
# resolved the same way each time), then runs the built binaries from target/release directly.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE_SET=(-p canopy-relay -p canopy-messenger -p canopy-benches -p canopy-examples)

bash scripts/build-plugins.sh --release > /dev/null
cargo build -q --release --locked "${RELEASE_SET[@]}" --bins --examples
