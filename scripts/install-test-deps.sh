#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust: tmux, which the terminal UI's end-to-end
# test (apps/messenger/tests/tui.rs) drives. Idempotent: does nothing when it is present.
set -euo pipefail

if command -v tmux > /dev/null; then
    exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y tmux
