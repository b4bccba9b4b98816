//! Shared helpers: in-process relays on 127.0.0.1 and clients for them.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use canopy_relay::{Relay, RelayConfig, RelayHandle, StoreKind};
use canopy_sdk::{Chunk, Client, ConnectOptions, Name, SubEvent, Subscription, Trust};

/// Upper bound for any single awaited event.
pub const WAIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A relay listening on `listen` (port 0 for a free one) with its data in `data`.
pub async fn relay_at(data: &Path, listen: SocketAddr, store: StoreKind) -> RelayHandle {
    logs();
    let config = RelayConfig { listen, data: data.to_path_buf(), store, ..RelayConfig::default() };
    Relay::spawn(config).await.expect("relay starts")
}

/// A relay that also accepts TLS over TCP, both listeners on free ports (or `tcp` for the TCP
/// one), memory store unless `store` says otherwise.
pub async fn relay_with_tcp(data: &Path, listen: SocketAddr, tcp: SocketAddr, store: StoreKind) -> RelayHandle {
    logs();
    let config = RelayConfig { listen, tcp_listen: Some(tcp), data: data.to_path_buf(), store, ..RelayConfig::default() };
    Relay::spawn(config).await.expect("relay starts")
}

/// Options for the relay's TLS-over-TCP listener (`tcp://`), trusting its certificate.
pub fn tcp_options(relay: &RelayHandle) -> ConnectOptions {
    let addr = relay.tcp_addr().expect("the relay has a TCP listener");
    ConnectOptions::new(format!("tcp://{addr}"), Trust::CaPem(relay.cert_pem().to_string()))
}

/// Like [`relay_at`], but retries while the port is still held: a relay that just shut down
/// releases its UDP socket when quinn's endpoint driver next runs, which may be just after
/// `shutdown()` returns.
pub async fn relay_restart(data: &Path, listen: SocketAddr, store: StoreKind) -> RelayHandle {
    within("the port to be free again", async {
        let mut attempts = 0u32;
        loop {
            let config = RelayConfig { listen, data: data.to_path_buf(), store: store.clone(), ..RelayConfig::default() };
            match Relay::spawn(config).await {
                Ok(relay) => {
                    if attempts > 0 {
                        eprintln!("relay restarted after {attempts} failed binds");
                    }
                    return relay;
                }
                Err(e) if format!("{e:#}").contains("binding") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("relay restart: {e:#}"),
            }
        }
    })
    .await
}

/// A memory-store relay on a free port.
pub async fn relay(data: &Path) -> RelayHandle {
    relay_at(data, "127.0.0.1:0".parse().unwrap(), StoreKind::Memory).await
}

/// Options trusting the relay's self-signed certificate as a CA.
pub fn options(relay: &RelayHandle) -> ConnectOptions {
    ConnectOptions::new(relay.local_addr(), Trust::CaPem(relay.cert_pem().to_string()))
}

pub async fn client(relay: &RelayHandle) -> Client {
    within("connect", Client::connect(options(relay))).await.expect("client connects")
}

/// A chunk named `n` living an hour.
pub fn chunk(n: u128, data: &str) -> Chunk {
    Chunk::new(Name::new(n), canopy_sdk::now_ms() + 3_600_000, data.as_bytes().to_vec()).unwrap()
}

/// The next event, which must arrive within [`WAIT`].
pub async fn next(sub: &mut Subscription) -> SubEvent {
    within("a subscription event", sub.next()).await.expect("subscription still open")
}

/// The next event, which must be a chunk.
pub async fn next_chunk(sub: &mut Subscription) -> Chunk {
    match next(sub).await {
        SubEvent::Chunk(c) => c,
        other => panic!("expected a chunk, got {other:?}"),
    }
}
