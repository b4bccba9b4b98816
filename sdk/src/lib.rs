//! # Canopy client SDK
//!
//! Connect to a Canopy relay over QUIC + TLS 1.3 (or TLS 1.3 over TCP, `tcp://HOST:PORT`, to a
//! relay's `tcp_listen`), publish immutable [`Chunk`]s and subscribe
//! to [`Filter`]s over their 128-bit [`Name`]s. The `canopy` command-line tool in this package
//! is built on it.
//!
//! ## Connect
//!
//! Trust the relay either through a CA (for a relay with a self-signed certificate, that
//! certificate itself) in PEM form, or by pinning the SHA-256 fingerprint of its certificate:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use canopy_sdk::{Client, ConnectOptions, Trust};
//!
//! let pem = std::fs::read_to_string("relay-cert.pem")?;
//! let client = Client::connect(ConnectOptions::new("127.0.0.1:4433", Trust::CaPem(pem))).await?;
//! # let _ = client; Ok(()) }
//! ```
//!
//! ## Publish
//!
//! [`Client::publish`] resolves when the relay acknowledges the chunk. The first chunk stored
//! at a name wins: publishing the identical chunk again succeeds, different data at a stored
//! name is a [`PublishError::Conflict`]. [`Client::publish_unacked`] asks for no answer at
//! all (at most once, like core NATS or MQTT QoS 0): for readings where the next one replaces
//! a lost one; only a refusal comes back, as [`ConnectionEvent::UnackedRefused`] naming the number
//! `publish_unacked` returned.
//!
//! ```no_run
//! # async fn demo(client: canopy_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use canopy_sdk::{Chunk, Schema};
//!
//! let schema = Schema::messenger();
//! let name = schema.parse_name("team=5/channel=3/msg=1")?;
//! let chunk = Chunk::new(name, canopy_sdk::now_ms() + 3_600_000, &b"hello"[..])?;
//! client.publish(chunk).await?;
//! # Ok(()) }
//! ```
//!
//! ## Subscribe
//!
//! A [`Subscription`] yields the cached chunks in name order, one [`SubEvent::ReplayDone`],
//! then live chunks. The relay does not send a chunk back to the connection that published
//! it, so a client does not see its own publishes live (the `Ack` is its confirmation); they
//! do appear in later replays, e.g. a new subscription's cached chunks.
//!
//! ```no_run
//! # async fn demo(client: canopy_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use canopy_sdk::{ReplayMode, Schema, SubEvent};
//!
//! let filter = Schema::messenger().parse_filter("origin=0/app=0/path=0/org=0/team=5")?;
//! let mut sub = client.subscribe(filter, ReplayMode::CachedAndLive).await?;
//! while let Some(event) = sub.next().await {
//!     match event {
//!         SubEvent::Chunk(chunk) => println!("{}: {:?}", chunk.name(), chunk.data()),
//!         SubEvent::ReplayDone => println!("-- live from here --"),
//!         SubEvent::Gap => println!("-- reconnected: live chunks may be missing --"),
//!         SubEvent::Error { code, message } => eprintln!("subscription ended: {code}: {message}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ## Reconnect
//!
//! One background task per [`Client`] owns the connection. If it drops, the task fails the
//! publishes still waiting for an answer with [`PublishError::Disconnected`] (re-publishing
//! the identical chunk is safe), reconnects with capped exponential backoff (100 ms doubling
//! up to 5 s, forever), sends `Hello` again and re-subscribes every open subscription —
//! `CachedAndLive` once its first replay had finished (`LiveOnly` ones stay `LiveOnly`, miss
//! what was published meanwhile and get a [`SubEvent::Gap`]) — so the relay replays what was
//! missed. [`Client::connection_events`] reports each disconnect, connect and resubscribe. The SDK
//! remembers which names each subscription already delivered (until they expire) and drops
//! the repeats: the application sees each chunk, and `ReplayDone`, once.
//!
//! ## Back-pressure
//!
//! Each subscription has a credit window of [`ConnectOptions::subscription_buffer`] chunks:
//! the relay sends no more than the application has room for, and the SDK grants credit back
//! as [`Subscription::next`] returns chunks. So a replay of any size arrives whole into a
//! bounded buffer ([`Subscription::buffered`] never exceeds [`Subscription::buffer_bound`]),
//! and an application that keeps reading is never cut off. One that stops reading holds back
//! only that subscription; if live chunks keep coming while it is stalled, the relay ends it
//! with a final [`SubEvent::Error`] (`SlowConsumer`), and subscribing again recovers from the
//! cache. Publishes are bounded by the application's own concurrency: each waits for its
//! answer.
//!
//! ## Latency
//!
//! The client's background task runs on the application's tokio runtime. With each process
//! at its defaults (a multi-threaded runtime in the client), a paced 1 KiB chunk over TLS on
//! TCP took 45 µs from publish to delivery at the median on a 2-vCPU machine, against 81 µs
//! for NATS core (docs/performance.md, "One thread per paced chunk"). A multi-threaded
//! runtime can still wake idle workers to look for work, and on a quiet machine each such
//! wake lands on an idle CPU, which can take tens of microseconds; a current-thread runtime
//! (or one with a single worker) never does. For the most chunks per second from one
//! publisher, keep many publishes in flight: each waits for its own ack.

mod client;
pub mod discovery;
mod tls;
pub mod tool;

pub use client::{
    Client, ClientError, ConnectOptions, ConnectionEvent, MAX_BACKOFF, MIN_BACKOFF, PublishError, SubEvent,
    Subscription, Transport, now_ms, open_endpoints, probe_fingerprint,
};
pub use tls::{
    DEFAULT_MAX_UDP_PAYLOAD, Trust, UDP_SOCKET_BUFFER, bind_udp, endpoint_config, fingerprint, parse_fingerprint,
    quic_client_config, quic_client_config_with_mtu, tune_mtu, tune_tcp,
};

pub use canopy::wire::{ErrorCode, ReplayMode};
pub use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name, Schema};
