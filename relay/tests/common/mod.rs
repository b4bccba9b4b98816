//! A minimal raw test client (quinn, ALPN `canopy/3`, one control stream) and helpers to run
//! relays in-process. Deliberately independent of the SDK.

#![allow(dead_code, missing_docs)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use canopy::wire::{self, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION, ReplayMode, Role};
use canopy::{Chunk, Filter, Name};
use canopy_sdk::{Trust, quic_client_config};
use canopy_relay::{Relay, RelayConfig, RelayHandle, StoreKind};

/// Bound on any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A chunk named `name` living for an hour.
pub fn chunk(name: u128, data: &str) -> Chunk {
    Chunk::new(Name::new(name), now_ms() + 3_600_000, data.as_bytes().to_vec()).unwrap()
}

pub fn filter(text: &str) -> Filter {
    text.parse().unwrap()
}

/// Config for a test relay on an ephemeral loopback port with its data in `dir`.
pub fn config(dir: &Path) -> RelayConfig {
    RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.to_owned(),
        store: StoreKind::Fjall,
        capacity_bytes: 64 << 20,
        ..RelayConfig::default()
    }
}

/// Config for a child of `parent`.
pub fn child_config(dir: &Path, parent: &RelayHandle) -> RelayConfig {
    RelayConfig {
        parent: Some(parent.local_addr().to_string()),
        parent_ca: Some(parent.cert_path().to_owned()),
        ..config(dir)
    }
}

pub async fn spawn(config: RelayConfig) -> RelayHandle {
    Relay::spawn(config).await.expect("relay starts")
}

/// Spawns a relay on a specific address, retrying while the port is still being released.
pub async fn spawn_on(config: RelayConfig) -> RelayHandle {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Relay::spawn(config.clone()).await {
            Ok(relay) => return relay,
            Err(err) if tokio::time::Instant::now() < deadline => {
                eprintln!("respawn on {} failed, retrying: {err:#}", config.listen);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("relay did not restart: {err:#}"),
        }
    }
}

/// Waits (bounded) until `f` holds, checking every 20 ms.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

pub struct Client {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// Frames received but not yet taken.
    pub pending: VecDeque<Frame>,
    next_seq: u64,
    ended: bool,
}

impl Client {
    /// Connects and opens the control stream, without sending anything.
    pub async fn connect_raw(relay: &RelayHandle) -> Client {
        let config = quic_client_config(&Trust::CaPem(relay.cert_pem().to_owned())).unwrap();
        // A socket like the SDK's (4 MiB buffers): with the kernel's default the client's own
        // receive queue drops datagrams under a burst and it falls behind for that alone.
        let socket = canopy_sdk::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let mut endpoint =
            quinn::Endpoint::new(canopy_sdk::endpoint_config(canopy_sdk::DEFAULT_MAX_UDP_PAYLOAD), None, socket, runtime)
                .unwrap();
        endpoint.set_default_client_config(config);
        let conn = tokio::time::timeout(WAIT, endpoint.connect(relay.local_addr(), "localhost").unwrap())
            .await
            .expect("handshake in time")
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.unwrap();
        Client { endpoint, conn, send, recv, decoder: FrameDecoder::new(), pending: VecDeque::new(), next_seq: 0, ended: false }
    }

    /// Connects, sends a client `Hello` and waits for the relay's.
    pub async fn connect(relay: &RelayHandle) -> Client {
        Self::connect_with(relay.local_addr(), relay.cert_pem(), None).await
    }

    pub async fn connect_with(addr: SocketAddr, cert_pem: &str, token: Option<&str>) -> Client {
        let config = quic_client_config(&Trust::CaPem(cert_pem.to_owned())).unwrap();
        // A socket like the SDK's (4 MiB buffers): with the kernel's default the client's own
        // receive queue drops datagrams under a burst and it falls behind for that alone.
        let socket = canopy_sdk::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let mut endpoint =
            quinn::Endpoint::new(canopy_sdk::endpoint_config(canopy_sdk::DEFAULT_MAX_UDP_PAYLOAD), None, socket, runtime)
                .unwrap();
        endpoint.set_default_client_config(config);
        let conn = tokio::time::timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
            .await
            .expect("handshake in time")
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut client =
            Client { endpoint, conn, send, recv, decoder: FrameDecoder::new(), pending: VecDeque::new(), next_seq: 0, ended: false };
        client
            .send(&Frame::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Client,
                relay_path: vec![],
                token: token.map(str::to_owned),
            })
            .await;
        match client.recv().await {
            Some(Frame::Hello { role: Role::Relay, .. }) => {}
            other => panic!("expected the relay's hello, got {other:?}"),
        }
        client
    }

    pub async fn send(&mut self, frame: &Frame) {
        let bytes = wire::encode_to_vec(frame).unwrap();
        self.send.write_all(&bytes).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// The next frame (bounded wait); `None` once the relay ended the stream or connection.
    pub async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, self.recv_inner()).await.expect("a frame in time")
    }

    async fn recv_inner(&mut self) -> Option<Frame> {
        if let Some(frame) = self.pending.pop_front() {
            return Some(frame);
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame().expect("the relay sends valid frames") {
                return Some(frame);
            }
            if self.ended {
                return None;
            }
            match self.recv.read(&mut buf).await {
                Ok(Some(n)) => self.decoder.extend(&buf[..n]),
                Ok(None) | Err(_) => self.ended = true,
            }
        }
    }

    /// Frames until `done` returns true for one (included), bounded.
    pub async fn recv_until(&mut self, mut done: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.recv().await.unwrap_or_else(|| panic!("stream ended; got {frames:?}"));
            let stop = done(&frame);
            frames.push(frame);
            if stop {
                return frames;
            }
        }
    }

    pub async fn publish(&mut self, chunk: Chunk) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.send(&Frame::Publish { seq, chunk }).await;
        seq
    }

    /// Publishes and waits for the `Ack`, keeping other frames for later.
    pub async fn publish_acked(&mut self, chunk: Chunk) {
        let seq = self.publish(chunk).await;
        let mut other = Vec::new();
        loop {
            match self.recv().await.expect("ack") {
                Frame::Ack { seq: s } if s == seq => break,
                Frame::Error { about: Some(s), code, message } if s == seq => panic!("publish refused: {code} {message}"),
                frame => other.push(frame),
            }
        }
        for frame in other.into_iter().rev() {
            self.pending.push_front(frame);
        }
    }

    /// Subscribes and returns the replayed chunks once `ReplayDone` arrives.
    pub async fn subscribe(&mut self, id: u64, filter: Filter, mode: ReplayMode) -> Vec<Chunk> {
        self.send(&Frame::Subscribe { id, filter, mode, credit: u32::MAX }).await;
        let mut replayed = Vec::new();
        let mut other = Vec::new();
        loop {
            match self.recv().await.expect("replay") {
                Frame::ReplayDone { id: i } if i == id => break,
                Frame::Deliver { id: i, chunk } if i == id => replayed.push(chunk),
                Frame::Error { about: Some(i), code, message } if i == id => panic!("subscribe refused: {code} {message}"),
                frame => other.push(frame),
            }
        }
        for frame in other.into_iter().rev() {
            self.pending.push_front(frame);
        }
        replayed
    }

    /// Chunks delivered for subscription `id` until one named `name` arrives (included).
    pub async fn delivered_until(&mut self, id: u64, name: u128) -> Vec<Chunk> {
        let frames =
            self.recv_until(|f| matches!(f, Frame::Deliver { id: i, chunk } if *i == id && chunk.name() == Name::new(name))).await;
        frames
            .into_iter()
            .filter_map(|f| match f {
                Frame::Deliver { id: i, chunk } if i == id => Some(chunk),
                _ => None,
            })
            .collect()
    }

    /// Waits for an `Error` frame and returns its code and `about`.
    pub async fn expect_error(&mut self) -> (ErrorCode, Option<u64>) {
        match self.recv_until(|f| matches!(f, Frame::Error { .. })).await.pop() {
            Some(Frame::Error { code, about, .. }) => (code, about),
            _ => unreachable!(),
        }
    }

    /// Waits until the relay ends the stream (bounded); returns the frames received meanwhile.
    pub async fn expect_end(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.recv().await {
            frames.push(frame);
        }
        frames
    }
}
