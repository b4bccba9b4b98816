#!/usr/bin/env bash
# The README's demo: a relay tree on loopback, then the messenger on it. Builds the release
# artefacts (scripts/build-release.sh: the plugins, installing the wasm32-wasip2 target if
# needed, `canopy-msg` and the examples), then runs the `tree` example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-release.sh
target/release/examples/tree
