#!/usr/bin/env bash
# Builds every plugin: the Wasm ones for wasm32-wasip2 (installing the target if missing) into
# target/wasm32-wasip2/plugin/, the native ones into target/<profile>/.
# Usage: scripts/build-plugins.sh [--release]   (native plugins: debug unless --release)
set -euo pipefail
cd "$(dirname "$0")/.."

# Package names; a package whose lib is named otherwise builds to that name (canopy-member → member.wasm).
WASM_PLUGINS=(echo clock hostile dump sink canopy-member poll faulty)
NATIVE_PLUGINS=(echo stale-abi sink)

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi

args=()
for p in "${WASM_PLUGINS[@]}"; do args+=(-p "$p"); done
cargo build -q --locked --profile plugin --target wasm32-wasip2 "${args[@]}"

if ((${#NATIVE_PLUGINS[@]})); then
    args=()
    for p in "${NATIVE_PLUGINS[@]}"; do args+=(-p "$p"); done
    cargo build -q --locked ${1:+"$1"} "${args[@]}"
fi
