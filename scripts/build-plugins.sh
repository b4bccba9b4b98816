#!/usr/bin/env bash
# Builds every plugin: the Wasm ones for wasm32-wasip2 (installing the target if missing) into
# target/wasm32-wasip2/plugin/, the native ones into target/<profile>/.
# Usage: scripts/build-plugins.sh [--release]   (native plugins: debug unless --release)
set -euo pipefail
cd "$(dirname "$0")/.."

# Package names; a package whose lib is named otherwise builds to that name (canopy-member → member.wasm).
WASM_PLUGINS=(echo clock hostile dump sink poll faulty multisig)
# Built for speed rather than size (profile plugin-speed), then copied beside the others.
SPEED_PLUGINS=(canopy-member)
NATIVE_PLUGINS=(echo stale-abi sink)

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi

# The multisig model's secp256k1 is C: clang compiles it for wasm32 (Debian's clang 14 knows
# no wasip2 sysroot, so only its own freestanding headers and secp256k1's wasm sysroot are used).
if ! command -v clang > /dev/null; then
    echo "installing clang (for the multisig model's secp256k1)" >&2
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang
fi
export CFLAGS_wasm32_wasip2="-nostdlibinc"

args=()
for p in "${WASM_PLUGINS[@]}"; do args+=(-p "$p"); done
cargo build -q --locked --profile plugin --target wasm32-wasip2 "${args[@]}"
args=()
for p in "${SPEED_PLUGINS[@]}"; do args+=(-p "$p"); done
cargo build -q --locked --profile plugin-speed --target wasm32-wasip2 "${args[@]}"
# The file name is the lib's name (canopy-member → member.wasm); copied only when it changed, so
# the compile cache (keyed by the file's bytes) and file times stay put otherwise.
for f in target/wasm32-wasip2/plugin-speed/*.wasm; do
    cmp -s "$f" "target/wasm32-wasip2/plugin/$(basename "$f")" || cp "$f" target/wasm32-wasip2/plugin/
done

if ((${#NATIVE_PLUGINS[@]})); then
    args=()
    for p in "${NATIVE_PLUGINS[@]}"; do args+=(-p "$p"); done
    cargo build -q --locked ${1:+"$1"} "${args[@]}"
fi
