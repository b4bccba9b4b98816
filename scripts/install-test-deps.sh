#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, from Debian's packages: tmux, which the
# terminal UI's end-to-end test (apps/messenger/tests/tui.rs) drives, and Chromium with its
# WebDriver, which the web UI's browser tests (apps/messenger/tests/web.rs) drive, and Redis
# (`redis-server`, and `redis-cli` from redis-tools), whose clusters the Redis store's tests
# (relay/redis/tests/cluster.rs) start. Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v tmux > /dev/null || need+=(tmux)
command -v chromium > /dev/null || need+=(chromium)
command -v chromedriver > /dev/null || need+=(chromium-driver)
command -v redis-server > /dev/null || need+=(redis-server)
command -v redis-cli > /dev/null || need+=(redis-tools)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
