#!/usr/bin/env bash
# Installs the peers the messaging benchmark runs side by side with Canopy (Debian packages
# nats-server and mosquitto; nats-server also serves the `jetstream` system, started with -js),
# and iproute2 for `pubsub-bench --mtu N` (`ip netns`). Idempotent: does nothing when all
# three binaries are present.
#
#   bash scripts/install-peers.sh && cargo run --release -p canopy-benches --bin pubsub-bench
set -euo pipefail

have() { command -v "$1" > /dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }   # Debian puts them in /usr/sbin
if have nats-server && have mosquitto && have ip; then
    echo "nats-server, mosquitto and ip already installed"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y nats-server mosquitto iproute2
