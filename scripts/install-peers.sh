#!/usr/bin/env bash
# Installs the peers the messaging benchmark runs side by side with Canopy (Debian packages
# nats-server and mosquitto). Idempotent: does nothing when both binaries are present.
#
#   bash scripts/install-peers.sh && cargo run --release -p canopy-benches --bin pubsub-bench
set -euo pipefail

have() { command -v "$1" > /dev/null || [ -x "/usr/sbin/$1" ]; }   # Debian puts both in /usr/sbin
if have nats-server && have mosquitto; then
    echo "nats-server and mosquitto already installed"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y nats-server mosquitto
