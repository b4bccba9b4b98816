//! The [`Client`]: one QUIC connection to a relay, owned by a background task, with automatic
//! reconnect.
//!
//! # Architecture
//!
//! [`Client::connect`] resolves the address, makes the QUIC + TLS 1.3 connection, opens the
//! control stream, exchanges `Hello`s and then spawns one **driver task**. What a client must
//! remember across connections (open subscriptions, names already delivered, credit, publishes
//! awaiting an answer) lives in the sans-IO [`ClientSession`] of the core crate, the same code
//! the deterministic simulator drives; the driver only moves bytes and events:
//!
//! - a *reader loop* decodes frames with [`FrameDecoder`] and hands them to the session, then
//!   routes the session's events: a publish's answer to its waiter (a `seq → oneshot` map, so
//!   any number of publishes can be in flight), a subscription's events to its channel;
//! - a *writer task* owns the send half of the control stream and writes the frames the
//!   session produces, so a relay that is slow to read never stops the reader.
//!
//! Publish sequence numbers and subscription ids come from one counter, so an `Error` whose
//! `about` is a number always names exactly one of them.
//!
//! # Flow control
//!
//! Each subscription has a window of [`ConnectOptions::subscription_buffer`] chunks. The relay
//! sends at most that many ahead of what the application has read, and the SDK grants credit
//! back as [`Subscription::next`] consumes them. A subscription's buffered events therefore
//! never exceed [`Subscription::buffer_bound`] (see [`Subscription::buffered`]), whatever the
//! size of a replay, and an application that keeps reading is never cut off. One that stops
//! reading holds back only that subscription; if it stays stalled while live chunks keep
//! coming, the relay ends it with `SlowConsumer`, and subscribing again recovers from the
//! cache.
//!
//! # Reconnect
//!
//! When the connection drops (relay restart, network loss, idle timeout of 15 s without
//! keep-alive answers) the driver:
//!
//! 1. fails every publish still waiting for an answer with [`PublishError::Disconnected`] —
//!    re-publishing the identical chunk is safe, the relay acknowledges duplicates; publishes
//!    made while disconnected fail the same way at once;
//! 2. reconnects with capped exponential backoff: 100 ms, 200 ms, … up to 5 s between
//!    attempts, forever, until the [`Client`] and all its [`Subscription`]s are dropped or
//!    [`Client::close`] is called;
//! 3. sends `Hello` again and re-subscribes every open subscription with the same id: a
//!    subscription that had finished its replay is re-opened as `CachedAndLive` (or
//!    `LiveOnly` if it was opened `LiveOnly`), so the relay replays what was missed; one
//!    still replaying, or never sent, is re-opened with its original mode. The SDK remembers
//!    the names it already delivered on each subscription (until they expire) and drops the
//!    duplicates, so the application sees each chunk once and sees
//!    [`SubEvent::ReplayDone`] once. A `LiveOnly` subscription does not get the chunks
//!    published while the client was disconnected; it gets a [`SubEvent::Gap`] instead.
//!
//! [`Client::connection_events`] reports each step: [`ConnectionEvent::Disconnected`],
//! [`ConnectionEvent::Connected`] and [`ConnectionEvent::Resubscribed`].
//!
//! A client made with [`Client::connect_any`] has several candidate relays: it reconnects
//! to the first that answers, moves back to a preferred one when it answers again, and
//! reports each move as [`ConnectionEvent::Moved`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use canopy::session::SubEvent;
use canopy::session::{ClientSession, PublishFailure, SessionEvent};
use canopy::wire::{self, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION, ReplayMode, Role};
use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::Trust;

/// The first pause before a reconnect attempt.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a client reaches its relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC with TLS 1.3 over UDP, to the relay's `listen` address (the default).
    #[default]
    Quic,
    /// TLS 1.3 over TCP, to the relay's `tcp_listen` address: the same protocol on one TCP
    /// connection, for networks that block UDP, and cheaper per message where packet loss is
    /// rare (one machine, a LAN): TCP carries many chunks per segment and TLS record, where
    /// QUIC seals and acknowledges each ~1 KiB chunk as a packet of its own. Head-of-line
    /// blocking is no worse than QUIC's, since a link is one QUIC stream as well.
    Tcp,
}

/// Where and how to connect to a relay.
///
/// ```
/// use canopy_sdk::{ConnectOptions, Trust};
/// let mut opts = ConnectOptions::new("127.0.0.1:4433", Trust::Fingerprint("ab…".into()));
/// opts.token = Some("secret".into());
/// assert_eq!(opts.server_name, "localhost");
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The relay's address: `host:port` or an IP socket address (`127.0.0.1:4433`,
    /// `[::1]:4433`), without a scheme. Names are resolved again on every reconnect.
    pub addr: String,
    /// QUIC (the default) or TLS over TCP; [`ConnectOptions::new`] takes it from the
    /// address's scheme (`quic://`, `tcp://`).
    pub transport: Transport,
    /// How to trust the relay's certificate.
    pub trust: Trust,
    /// The authentication token sent in `Hello`, if the relay requires one.
    pub token: Option<String>,
    /// The name the relay's certificate must carry with [`Trust::CaPem`] (the TLS SNI).
    /// Defaults to `localhost`.
    pub server_name: String,
    /// Each subscription's window, in chunks (default 1024): the relay sends at most this
    /// many ahead of what the application has read, so a subscription never buffers more
    /// (see [`Subscription::buffered`]). Larger windows carry more in flight on long paths.
    pub subscription_buffer: usize,
    /// How long one connection attempt (QUIC + TLS + `Hello` exchange) may take (default
    /// 10 s).
    pub connect_timeout: Duration,
    /// The largest UDP payload path-MTU discovery probes for towards the relay (default
    /// [`crate::DEFAULT_MAX_UDP_PAYLOAD`]); 1,452 keeps every packet within an Ethernet MTU.
    pub max_udp_payload: u16,
}

impl ConnectOptions {
    /// Options with the defaults: no token, server name `localhost`, 1024-event subscription
    /// buffers, 10 s connect timeout. The address may carry a scheme: `tcp://HOST:PORT` for
    /// TLS over TCP ([`Transport::Tcp`]), `quic://HOST:PORT` or none for QUIC.
    ///
    /// ```
    /// use canopy_sdk::{ConnectOptions, Transport, Trust};
    /// let addr: std::net::SocketAddr = "127.0.0.1:4433".parse().unwrap();
    /// let opts = ConnectOptions::new(addr, Trust::CaPem(String::new()));
    /// assert_eq!((opts.addr.as_str(), opts.transport), ("127.0.0.1:4433", Transport::Quic));
    /// let opts = ConnectOptions::new("tcp://relay.example:4434", Trust::CaPem(String::new()));
    /// assert_eq!((opts.addr.as_str(), opts.transport), ("relay.example:4434", Transport::Tcp));
    /// ```
    pub fn new(addr: impl ToString, trust: Trust) -> Self {
        let addr = addr.to_string();
        let (transport, addr) = match (addr.strip_prefix("tcp://"), addr.strip_prefix("quic://")) {
            (Some(rest), _) => (Transport::Tcp, rest.to_owned()),
            (_, Some(rest)) => (Transport::Quic, rest.to_owned()),
            _ => (Transport::Quic, addr),
        };
        ConnectOptions {
            addr,
            transport,
            trust,
            token: None,
            server_name: "localhost".into(),
            subscription_buffer: 1024,
            connect_timeout: Duration::from_secs(10),
            max_udp_payload: crate::tls::DEFAULT_MAX_UDP_PAYLOAD,
        }
    }
}

/// Why connecting or subscribing failed.
///
/// ```
/// use canopy_sdk::ClientError;
/// let e = ClientError::Closed;
/// assert_eq!(e.to_string(), "the client is closed");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The options are unusable (bad PEM, bad fingerprint, bad server name…).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The relay address did not resolve.
    #[error("cannot resolve relay address {addr}: {message}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        message: String,
    },
    /// The QUIC/TLS connection failed (unreachable, certificate not trusted, ALPN refused…).
    #[error("cannot connect to relay {addr}: {message}")]
    Connect {
        /// The address connected to.
        addr: String,
        /// Why.
        message: String,
    },
    /// The relay answered the `Hello` with an error (bad token, unsupported version…).
    #[error("relay refused the session: {code}: {message}")]
    Refused {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// The relay broke the protocol during the handshake.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection attempt took longer than [`ConnectOptions::connect_timeout`].
    #[error("timed out connecting to the relay")]
    Timeout,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

/// Why a publish failed.
///
/// Every variant but [`Disconnected`](PublishError::Disconnected) is the relay's final
/// answer; after `Disconnected` the outcome is unknown and re-publishing the identical
/// chunk is safe.
///
/// ```
/// use canopy_sdk::PublishError;
/// let e = PublishError::Expired { message: "expired".into() };
/// assert!(e.to_string().contains("expired"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The chunk's data exceeds [`MAX_CHUNK_DATA`] (checked locally, or the relay's
    /// `ChunkTooLarge`).
    #[error("chunk too large: {len} bytes, the limit is {MAX_CHUNK_DATA}")]
    TooLarge {
        /// The data length.
        len: usize,
    },
    /// A different chunk is already stored at this name.
    #[error("conflict at {name}: {message}")]
    Conflict {
        /// The chunk's name.
        name: Name,
        /// The relay's message.
        message: String,
    },
    /// This client may not publish that name (`PublishDenied`).
    #[error("publish denied: {message}")]
    Denied {
        /// The relay's message.
        message: String,
    },
    /// The chunk's expiry is not in the future by the relay's clock.
    #[error("chunk expired: {message}")]
    Expired {
        /// The relay's message.
        message: String,
    },
    /// The relay's store is full of chunks that outlive this one.
    #[error("relay store full: {message}")]
    StoreFull {
        /// The relay's message.
        message: String,
    },
    /// Any other error the relay answered with.
    #[error("relay error {code}: {message}")]
    Relay {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// The connection dropped (or the client was closed) before the relay answered.
    #[error("disconnected from the relay before it answered")]
    Disconnected,
}

impl PublishError {
    fn from_session(failure: PublishFailure) -> Self {
        match failure {
            PublishFailure::Disconnected => PublishError::Disconnected,
            PublishFailure::Refused { code, message, name, len } => Self::from_relay(name, len, code, message),
        }
    }

    fn from_relay(name: Name, len: usize, code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::ChunkTooLarge => PublishError::TooLarge { len },
            ErrorCode::Conflict => PublishError::Conflict { name, message },
            ErrorCode::PublishDenied => PublishError::Denied { message },
            ErrorCode::Expired => PublishError::Expired { message },
            ErrorCode::StoreFull => PublishError::StoreFull { message },
            code => PublishError::Relay { code, message },
        }
    }
}

/// A change in the client's connection, from [`Client::connection_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The connection was lost; the client is reconnecting.
    Disconnected {
        /// Why it was lost.
        reason: String,
    },
    /// A new connection is up after a loss (the `Hello`s are exchanged). The first connection
    /// is not reported: [`Client::connect`] returning says it.
    Connected,
    /// The open subscriptions were sent again on the new connection.
    Resubscribed {
        /// How many.
        subscriptions: usize,
    },
    /// The client moved to another of its candidate relays ([`Client::connect_any`]): the one
    /// in use was lost, or a preferred one answers again. Followed by `Connected` and
    /// `Resubscribed`.
    Moved {
        /// The relay it left (its address as given).
        from: String,
        /// The relay it uses now.
        to: String,
    },
    /// The relay refused a chunk published with [`Client::publish_unacked`] (conflict,
    /// expired, denied, store full…). Nothing is kept per unacked publish: `seq` is the
    /// number `publish_unacked` returned for it. Every refusal is also counted
    /// ([`Client::unacked_refusals`]), which a receiver that lags cannot miss.
    UnackedRefused {
        /// The publish, as numbered by [`Client::publish_unacked`].
        seq: u64,
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// A chunk given to [`Client::publish_unacked`] was not sent: the connection was lost
    /// before the driver took it.
    UnackedNotSent {
        /// The publish, as numbered by [`Client::publish_unacked`].
        seq: u64,
        /// The chunk's name.
        name: Name,
    },
}

enum Command {
    Publish {
        chunk: Chunk,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    /// A publish without an ack, numbered `seq`: its place among [`UNACKED_COMMANDS`] is
    /// freed once the driver takes it.
    PublishUnacked {
        seq: u64,
        chunk: Chunk,
    },
    Subscribe {
        id: u64,
        filter: Filter,
        mode: ReplayMode,
        tx: mpsc::UnboundedSender<SubEvent>,
        shared: Arc<SubShared>,
    },
    Unsubscribe {
        id: u64,
    },
    /// The application read this many chunks of subscription `id`.
    Consumed {
        id: u64,
        n: u32,
    },
    Close,
}

/// What a [`Subscription`] and the driver both see.
#[derive(Debug, Default)]
struct SubShared {
    /// Events in the channel, not yet read.
    buffered: AtomicUsize,
    /// The most ever buffered.
    peak: AtomicUsize,
    /// A `Gap` is in the channel, unread: a further gap joins it rather than adding one.
    gap_unread: AtomicBool,
}

/// A connection to a relay. Cheap to clone: clones share the connection.
///
/// See the [crate documentation](crate) for a walk-through and the [module documentation of
/// the driver](crate#reconnect) for the reconnect behaviour.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use canopy_sdk::{Client, ConnectOptions, Trust};
/// let pem = std::fs::read_to_string("relay-cert.pem")?;
/// let client = Client::connect(ConnectOptions::new("127.0.0.1:4433", Trust::CaPem(pem))).await?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    cmd: mpsc::UnboundedSender<Command>,
    ids: Arc<AtomicU64>,
    buffer: u32,
    events: broadcast::Sender<ConnectionEvent>,
    connected: watch::Receiver<bool>,
    unacked: Arc<Unacked>,
}

/// How many [`Client::publish_unacked`] calls may wait for the driver at once.
const UNACKED_COMMANDS: usize = 1024;
/// How many encoded bytes may wait to be written to the connection before
/// [`Client::publish_unacked`] waits: about a thousand full chunks, as core NATS's client
/// queues 2 048 messages.
const BACKLOG_LIMIT: usize = 1 << 20;

/// Flow control for publishes that are not acknowledged, which the application does not
/// wait for: a place among [`UNACKED_COMMANDS`] until the driver takes the chunk, then room
/// under [`BACKLOG_LIMIT`] in the connection's unwritten bytes.
struct Unacked {
    commands: Semaphore,
    /// Refusals so far ([`Client::unacked_refusals`]).
    refused: AtomicU64,
    /// The backlog of the connection in use (each connection has its own).
    backlog: Mutex<Arc<Backlog>>,
}

impl Unacked {
    fn backlog(&self) -> Arc<Backlog> {
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Bytes encoded for the connection and not yet written to it (the TCP buffer, or the QUIC
/// writer task's queue).
#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    /// Set once the connection is gone: nothing waits on it any more.
    closed: AtomicBool,
    /// Woken when `bytes` falls below [`BACKLOG_LIMIT`], or the connection is gone.
    room: Notify,
}

/// Closes a connection's backlog when the driver is done with the connection.
struct EndsBacklog(Arc<Backlog>);

impl Drop for EndsBacklog {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Backlog {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` bytes were written (or dropped with their connection).
    fn remove(&self, n: usize) {
        let before = self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| Some(b.saturating_sub(n)));
        let before = before.unwrap_or_else(|b| b);
        if before >= BACKLOG_LIMIT && before.saturating_sub(n) < BACKLOG_LIMIT {
            self.room.notify_waiters();
        }
    }

    /// The connection is gone, and what it had not written with it.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.notify_waiters();
    }

    /// Waits until fewer than [`BACKLOG_LIMIT`] bytes are unwritten, or the connection is
    /// gone (the next one has a backlog of its own).
    async fn room(&self) {
        loop {
            let room = self.room.notified();
            if self.closed.load(Ordering::Acquire) || self.bytes.load(Ordering::Acquire) < BACKLOG_LIMIT {
                return;
            }
            room.await;
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("closed", &self.cmd.is_closed()).finish()
    }
}

impl Client {
    /// Connects to a relay: QUIC + TLS 1.3 (ALPN `canopy/3`), control stream, `Hello`
    /// exchange. Returns once the relay has answered the `Hello`; later connection losses
    /// are repaired in the background (see the [crate docs](crate#reconnect)).
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), canopy_sdk::ClientError> {
    /// use canopy_sdk::{Client, ConnectOptions, Trust};
    /// let mut opts = ConnectOptions::new("relay.example:4433", Trust::Fingerprint("9f86…".into()));
    /// opts.server_name = "relay.example".into();
    /// opts.token = Some("secret".into());
    /// let client = Client::connect(opts).await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub async fn connect(opts: ConnectOptions) -> Result<Client, ClientError> {
        Client::connect_any(vec![opts], Duration::MAX).await
    }

    /// Connects to the first reachable of `candidates`, in order of preference (say, the
    /// local relay, then a cloud relay found by DNS, then a fixed address), each with its own
    /// address and trust; the first's buffer size applies to every subscription.
    ///
    /// When the relay in use is lost, the client moves to the first candidate that answers
    /// and re-subscribes there; chunks it already delivered are recognised by name and not
    /// delivered again, so the application sees no repeats, and the relays' caches fill the
    /// gap. While it is on a less preferred candidate, it tries the preferred ones every
    /// `prefer_every` and moves back as soon as one answers. Each move is reported as
    /// [`ConnectionEvent::Moved`]. Fails only if no candidate can be reached now (each
    /// reason, in order).
    pub async fn connect_any(candidates: Vec<ConnectOptions>, prefer_every: Duration) -> Result<Client, ClientError> {
        if candidates.is_empty() {
            return Err(ClientError::Config("no relay to connect to".into()));
        }
        let candidates: Arc<Vec<Connector>> = Arc::new(candidates.into_iter().map(Connector::new).collect::<Result<_, _>>()?);
        let (session, current) = establish_any(&candidates, candidates.len()).await?;
        let connector = candidates[current].clone();
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let ids = Arc::new(AtomicU64::new(1));
        let buffer = u32::try_from(connector.opts.subscription_buffer.max(1)).unwrap_or(u32::MAX);
        let (events, _) = broadcast::channel(64);
        let (connected_tx, connected) = watch::channel(true);
        let unacked = Arc::new(Unacked {
            commands: Semaphore::new(UNACKED_COMMANDS),
            refused: AtomicU64::new(0),
            backlog: Mutex::new(session.link.backlog.clone()),
        });
        let driver = Driver {
            connector,
            candidates,
            current,
            prefer_every,
            cmd_rx,
            ids: ids.clone(),
            session: ClientSession::new(),
            subs: HashMap::new(),
            waiters: HashMap::new(),
            events: events.clone(),
            connected: connected_tx,
            sessions: 0,
            outgoing: Vec::new(),
            unacked: unacked.clone(),
        };
        tokio::spawn(driver.run(session));
        Ok(Client { cmd, ids, buffer, events, connected, unacked })
    }

    /// Connection events from now on: disconnected, connected, resubscribed. A receiver that
    /// falls more than 64 events behind gets `RecvError::Lagged` and continues.
    ///
    /// ```no_run
    /// # async fn demo(client: canopy_sdk::Client) {
    /// let mut events = client.connection_events();
    /// while let Ok(event) = events.recv().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn connection_events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.events.subscribe()
    }

    /// Whether the client is connected to the relay right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Publishes a chunk and waits for the relay's answer: `Ok` on `Ack` (also for an
    /// identical re-publish), a typed [`PublishError`] otherwise. Any number of publishes
    /// may be in flight at once from clones of the client or concurrent futures.
    ///
    /// ```no_run
    /// # async fn demo(client: canopy_sdk::Client) {
    /// use canopy_sdk::{Chunk, Name, PublishError};
    /// let expiry = canopy_sdk::now_ms() + 3_600_000;
    /// let chunk = Chunk::new(Name::new(42), expiry, &b"hello"[..]).unwrap();
    /// match client.publish(chunk).await {
    ///     Ok(()) => println!("stored"),
    ///     Err(PublishError::Conflict { name, .. }) => println!("{name} holds other data"),
    ///     Err(PublishError::Disconnected) => println!("unknown outcome; safe to retry"),
    ///     Err(e) => println!("refused: {e}"),
    /// }
    /// # }
    /// ```
    pub async fn publish(&self, chunk: Chunk) -> Result<(), PublishError> {
        if chunk.data().len() > MAX_CHUNK_DATA {
            return Err(PublishError::TooLarge { len: chunk.data().len() });
        }
        let (reply, answer) = oneshot::channel();
        self.cmd.send(Command::Publish { chunk, reply }).map_err(|_| PublishError::Disconnected)?;
        answer.await.unwrap_or(Err(PublishError::Disconnected))
    }

    /// Publishes a chunk without asking for the relay's answer, as core NATS and MQTT QoS 0
    /// do: returns once the chunk is queued for the connection, and the relay sends nothing
    /// back unless it refuses the chunk, which arrives as
    /// [`ConnectionEvent::UnackedRefused`]. Delivery is at most once: a chunk still in flight
    /// when the connection drops may be lost without a word (one the driver had not taken yet
    /// is reported as [`ConnectionEvent::UnackedNotSent`]). Use [`publish`](Self::publish)
    /// when the chunk must be known stored.
    ///
    /// It waits, rather than queue without bound, while the connection has about a megabyte
    /// unwritten or a thousand such publishes wait for the driver: a publisher faster than
    /// the relay is slowed to the relay's pace. The relay holds a publisher back for slow
    /// subscribers only briefly, so one that keeps publishing faster than a subscriber reads
    /// gets that subscriber ended as a slow consumer (it recovers from the cache); use
    /// [`publish`](Self::publish) with a bounded number in flight to go at the pace of the
    /// slowest subscriber. Fails at once with
    /// [`PublishError::Disconnected`] when there is no connection (nothing is sent) and with
    /// [`PublishError::TooLarge`] for data over [`MAX_CHUNK_DATA`].
    ///
    /// Returns the publish's number, which a refusal names. Cancelling the call (dropping
    /// its future) before it returns sends nothing.
    ///
    /// ```no_run
    /// # async fn demo(client: canopy_sdk::Client) -> Result<(), canopy_sdk::PublishError> {
    /// use canopy_sdk::{Chunk, Name};
    /// let expiry = canopy_sdk::now_ms() + 60_000;
    /// for i in 0..1_000u128 {
    ///     client.publish_unacked(Chunk::new(Name::new(i), expiry, &b"reading"[..]).unwrap()).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn publish_unacked(&self, chunk: Chunk) -> Result<u64, PublishError> {
        if chunk.data().len() > MAX_CHUNK_DATA {
            return Err(PublishError::TooLarge { len: chunk.data().len() });
        }
        if !self.is_connected() {
            return Err(PublishError::Disconnected);
        }
        let unacked = &*self.unacked;
        // Held until the command is sent (so a cancelled call gives it back), then given
        // back by the driver when it takes the chunk.
        let permit = tokio::select! {
            permit = unacked.commands.acquire() => permit.map_err(|_| PublishError::Disconnected)?,
            () = self.cmd.closed() => return Err(PublishError::Disconnected),
        };
        let backlog = unacked.backlog();
        tokio::select! {
            () = backlog.room() => {}
            () = self.cmd.closed() => return Err(PublishError::Disconnected),
        }
        let seq = self.ids.fetch_add(1, Ordering::Relaxed);
        self.cmd.send(Command::PublishUnacked { seq, chunk }).map_err(|_| PublishError::Disconnected)?;
        permit.forget();
        Ok(seq)
    }

    /// How many chunks published with [`publish_unacked`](Self::publish_unacked) the relay
    /// has refused so far, each also reported as [`ConnectionEvent::UnackedRefused`].
    pub fn unacked_refusals(&self) -> u64 {
        self.unacked.refused.load(Ordering::Relaxed)
    }

    /// Opens a subscription. Events arrive on the returned [`Subscription`]: the cached
    /// chunks the `mode` asks for in name order, one [`SubEvent::ReplayDone`], then live
    /// chunks. A refusal arrives as a [`SubEvent::Error`]. The subscription survives
    /// reconnects (see the [crate docs](crate#reconnect)). Chunks this same client publishes
    /// are not delivered to it live: the relay does not echo a chunk to its sender.
    ///
    /// ```no_run
    /// # async fn demo(client: canopy_sdk::Client) -> Result<(), canopy_sdk::ClientError> {
    /// use canopy_sdk::{Filter, ReplayMode, SubEvent};
    /// let filter: Filter = "0x0a000000000000000000000000000000/8".parse().unwrap();
    /// let mut sub = client.subscribe(filter, ReplayMode::CachedAndLive).await?;
    /// while let Some(event) = sub.next().await {
    ///     if let SubEvent::Chunk(chunk) = event {
    ///         println!("{} {:?}", chunk.name(), chunk.data());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, filter: Filter, mode: ReplayMode) -> Result<Subscription, ClientError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(SubShared::default());
        self.cmd
            .send(Command::Subscribe { id, filter, mode, tx, shared: shared.clone() })
            .map_err(|_| ClientError::Closed)?;
        let window = self.buffer;
        Ok(Subscription { id, rx, cmd: self.cmd.clone(), shared, window, unreported: 0 })
    }

    /// Closes the connection now: pending publishes fail with
    /// [`PublishError::Disconnected`], every subscription ends (`next` returns `None`), and
    /// later calls fail. Dropping every clone of the client and every subscription does the
    /// same. What was already queued for the relay (chunks given to
    /// [`publish_unacked`](Self::publish_unacked), say) is still sent, in the background and
    /// for 3 s at most, before the connection closes.
    ///
    /// ```no_run
    /// # async fn demo(client: canopy_sdk::Client) {
    /// client.close();
    /// # }
    /// ```
    pub fn close(&self) {
        let _ = self.cmd.send(Command::Close);
    }

    /// Whether the client has been closed (its driver task has stopped).
    ///
    /// ```no_run
    /// # async fn demo(client: canopy_sdk::Client) {
    /// assert!(!client.is_closed());
    /// # }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.cmd.is_closed()
    }
}

/// An open subscription; read it with [`next`](Subscription::next).
///
/// The relay sends at most [`ConnectOptions::subscription_buffer`] chunks ahead of what
/// [`next`](Self::next) has returned, so the events waiting here stay within
/// [`buffer_bound`](Self::buffer_bound) however large a replay is, and an application that
/// keeps reading is never cut off. One that stops reading holds back only this subscription;
/// if live chunks keep arriving meanwhile, the relay ends it with a final
/// [`SubEvent::Error`] (`SlowConsumer`), and subscribing again (`CachedAndLive`) recovers from
/// the cache. Dropping the subscription unsubscribes. It keeps the connection alive even if
/// every [`Client`] clone is dropped.
///
/// ```no_run
/// # async fn demo(client: canopy_sdk::Client) -> Result<(), canopy_sdk::ClientError> {
/// use canopy_sdk::{Filter, ReplayMode, SubEvent};
/// let mut sub = client.subscribe(Filter::ALL, ReplayMode::CachedOnly).await?;
/// while let Some(SubEvent::Chunk(chunk)) = sub.next().await {
///     println!("{}", chunk.name());
/// }
/// sub.unsubscribe().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<SubEvent>,
    cmd: mpsc::UnboundedSender<Command>,
    shared: Arc<SubShared>,
    window: u32,
    /// Chunks read and not yet reported to the driver (reported a quarter window at a time).
    unreported: u32,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Publish { chunk, .. } => write!(f, "Publish({})", chunk.name()),
            Command::PublishUnacked { chunk, .. } => write!(f, "PublishUnacked({})", chunk.name()),
            Command::Subscribe { id, filter, .. } => write!(f, "Subscribe({id}, {filter})"),
            Command::Unsubscribe { id } => write!(f, "Unsubscribe({id})"),
            Command::Consumed { id, n } => write!(f, "Consumed({id}, {n})"),
            Command::Close => write!(f, "Close"),
        }
    }
}

impl Subscription {
    /// The next event, or `None` once the subscription has ended (after a final
    /// [`SubEvent::Error`], after [`SubEvent::ReplayDone`] of a
    /// [`ReplayMode::CachedOnly`] subscription, or when the client was closed).
    ///
    /// ```no_run
    /// # async fn demo(mut sub: canopy_sdk::Subscription) {
    /// use std::time::Duration;
    /// match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
    ///     Ok(Some(event)) => println!("{event:?}"),
    ///     Ok(None) => println!("ended"),
    ///     Err(_) => println!("nothing for 5 s"),
    /// }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<SubEvent> {
        let event = self.rx.recv().await?;
        self.shared.buffered.fetch_sub(1, Ordering::Relaxed);
        match event {
            SubEvent::Chunk(_) => {
                self.unreported += 1;
                if self.unreported >= (self.window / 4).max(1) {
                    let n = std::mem::take(&mut self.unreported);
                    let _ = self.cmd.send(Command::Consumed { id: self.id, n });
                }
            }
            SubEvent::Gap => self.shared.gap_unread.store(false, Ordering::Relaxed),
            _ => {}
        }
        Some(event)
    }

    /// Events received for this subscription and not yet returned by [`next`](Self::next).
    ///
    /// ```no_run
    /// # fn demo(sub: canopy_sdk::Subscription) {
    /// assert!(sub.buffered() <= sub.buffer_bound());
    /// # }
    /// ```
    pub fn buffered(&self) -> usize {
        self.shared.buffered.load(Ordering::Relaxed)
    }

    /// The most events this subscription ever had buffered.
    pub fn peak_buffered(&self) -> usize {
        self.shared.peak.load(Ordering::Relaxed)
    }

    /// The most events it can ever buffer: its window of chunks
    /// ([`ConnectOptions::subscription_buffer`]) plus one each of `ReplayDone`, `Gap` and a
    /// final `Error`.
    pub fn buffer_bound(&self) -> usize {
        self.window as usize + 3
    }

    /// The subscription id used on the wire.
    ///
    /// ```no_run
    /// # fn demo(sub: canopy_sdk::Subscription) {
    /// println!("subscription {}", sub.id());
    /// # }
    /// ```
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Closes the subscription (sends `Unsubscribe`). Dropping it does the same.
    ///
    /// ```no_run
    /// # async fn demo(sub: canopy_sdk::Subscription) {
    /// sub.unsubscribe().await;
    /// # }
    /// ```
    pub async fn unsubscribe(self) {
        drop(self);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Unsubscribe { id: self.id });
    }
}

/// The current time in unix milliseconds, for chunk expiries.
///
/// ```
/// let in_an_hour = canopy_sdk::now_ms() + 3_600_000;
/// assert!(in_an_hour > 1_700_000_000_000);
/// ```
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Connection establishment

/// The QUIC endpoints (UDP sockets) of the clients, one per tokio runtime, each shared by
/// that runtime's clients for as long as any of them lives.
///
/// A quinn endpoint is made for many connections, and each one costs memory of its own: its
/// receive buffer alone is 2.9 MB on Linux (32 datagrams of up to 64 GRO segments of 1,472
/// bytes), and glibc, once it has seen such a buffer freed, serves the next one from its heap
/// and zeroes it, so every live endpoint keeps that much resident. A process with a thousand
/// clients, one endpoint each, held 2.9 GB. An endpoint's driver task runs on the runtime
/// that made it, hence one per runtime (and per [`ConnectOptions::max_udp_payload`], which
/// sizes that buffer and is told to the relay).
static ENDPOINTS: Mutex<Vec<(tokio::runtime::Id, u16, Weak<quinn::Endpoint>)>> = Mutex::new(Vec::new());

/// The shared endpoint of the current runtime, opened if it has none.
fn shared_endpoint(max_udp_payload: u16) -> Result<Arc<quinn::Endpoint>, ClientError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| ClientError::Config("Client::connect must be called inside a tokio runtime".into()))?
        .id();
    let mut endpoints = ENDPOINTS.lock().unwrap_or_else(PoisonError::into_inner);
    // Endpoints whose clients are all gone (with their runtime, perhaps) are closed already.
    endpoints.retain(|(_, _, endpoint)| endpoint.strong_count() > 0);
    if let Some(endpoint) =
        endpoints.iter().filter(|(id, max, _)| *id == runtime && *max == max_udp_payload).find_map(|(_, _, e)| e.upgrade())
    {
        return Ok(endpoint);
    }
    // A dual-stack wildcard socket reaches IPv4 and IPv6 relays; fall back to IPv4 only.
    let bind = |addr: SocketAddr| -> std::io::Result<quinn::Endpoint> {
        let socket = crate::tls::bind_udp(addr)?;
        let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
        quinn::Endpoint::new(crate::tls::endpoint_config(max_udp_payload), None, socket, runtime)
    };
    let endpoint = bind(SocketAddr::from(([0u16; 8], 0)))
        .or_else(|_| bind(SocketAddr::from(([0u8; 4], 0))))
        .map_err(|e| ClientError::Config(format!("cannot open a UDP socket: {e}")))?;
    let endpoint = Arc::new(endpoint);
    endpoints.push((runtime, max_udp_payload, Arc::downgrade(&endpoint)));
    Ok(endpoint)
}

/// The fingerprint of the certificate the relay at `addr` presents, learned by a TLS
/// handshake that trusts nothing and is abandoned once the certificate is seen: what trust on
/// first use pins ([`crate::discovery::KnownRelays`]). Bounded by `timeout`.
pub async fn probe_fingerprint(addr: SocketAddr, server_name: &str, timeout: Duration) -> Result<String, ClientError> {
    let seen = Arc::new(Mutex::new(None));
    let config = crate::tls::probe_config(seen.clone())?;
    let endpoint = shared_endpoint(crate::tls::DEFAULT_MAX_UDP_PAYLOAD)?;
    let addr = match (addr, endpoint.local_addr()) {
        (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        _ => addr,
    };
    let err = |message: String| ClientError::Connect { addr: addr.to_string(), message };
    let connecting = endpoint.connect_with(config, addr, server_name).map_err(|e| err(e.to_string()))?;
    // The handshake fails by design once the certificate is noted.
    let _ = tokio::time::timeout(timeout, connecting).await.map_err(|_| ClientError::Timeout)?;
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).take();
    seen.ok_or_else(|| err("the relay presented no certificate".into()))
}

/// How many client endpoints are open in this process (for tests).
#[doc(hidden)]
pub fn open_endpoints() -> usize {
    let endpoints = ENDPOINTS.lock().unwrap_or_else(PoisonError::into_inner);
    endpoints.iter().filter(|(_, _, endpoint)| endpoint.strong_count() > 0).count()
}

/// Everything needed to (re)connect; cheap to clone.
#[derive(Clone)]
struct Connector {
    opts: Arc<ConnectOptions>,
    dialer: Dialer,
}

/// How a [`Connector`] opens a connection.
#[derive(Clone)]
enum Dialer {
    Quic {
        /// Shared with the runtime's other clients: closing this client closes its
        /// connection, never the endpoint; the endpoint closes when its last client is
        /// dropped.
        endpoint: Arc<quinn::Endpoint>,
        config: quinn::ClientConfig,
    },
    Tcp(tokio_rustls::TlsConnector),
}

impl Connector {
    fn new(opts: ConnectOptions) -> Result<Self, ClientError> {
        let dialer = match opts.transport {
            Transport::Quic => Dialer::Quic {
                config: crate::tls::quic_client_config_with_mtu(&opts.trust, opts.max_udp_payload)?,
                endpoint: shared_endpoint(opts.max_udp_payload)?,
            },
            Transport::Tcp => {
                Dialer::Tcp(tokio_rustls::TlsConnector::from(Arc::new(crate::tls::client_config(&opts.trust)?)))
            }
        };
        Ok(Connector { opts: Arc::new(opts), dialer })
    }

    async fn establish(&self) -> Result<Session, ClientError> {
        tokio::time::timeout(self.opts.connect_timeout, self.establish_inner())
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    async fn establish_inner(&self) -> Result<Session, ClientError> {
        let opts = &self.opts;
        // Errors name the relay as it was given, scheme included.
        let shown = shown_addr(opts);
        let addr_err = |message: String| ClientError::Resolve { addr: shown.clone(), message };
        let addr = tokio::net::lookup_host(opts.addr.as_str())
            .await
            .map_err(|e| addr_err(e.to_string()))?
            .next()
            .ok_or_else(|| addr_err("no addresses".into()))?;
        let connect_err = |message: String| ClientError::Connect { addr: shown.clone(), message };
        let backlog = Arc::new(Backlog::default());
        let (conn, mut send, mut recv) = match &self.dialer {
            Dialer::Quic { endpoint, config } => {
                // A dual-stack socket needs IPv4 peers in their IPv6-mapped form.
                let addr = match (addr, endpoint.local_addr()) {
                    (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
                        SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                    }
                    _ => addr,
                };
                let conn = endpoint
                    .connect_with(config.clone(), addr, &opts.server_name)
                    .map_err(|e| connect_err(e.to_string()))?
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                let (send, recv) = conn.open_bi().await.map_err(|e| connect_err(e.to_string()))?;
                (Conn::Quic(conn), SendHalf::Quic(send), RecvHalf::Quic(recv))
            }
            Dialer::Tcp(tls) => {
                let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| connect_err(e.to_string()))?;
                crate::tls::tune_tcp(&stream).map_err(|e| connect_err(format!("setting socket options: {e}")))?;
                let server_name = rustls::pki_types::ServerName::try_from(opts.server_name.clone())
                    .map_err(|e| ClientError::Config(format!("server name {:?}: {e}", opts.server_name)))?;
                let stream = tls.connect(server_name, stream).await.map_err(|e| connect_err(e.to_string()))?;
                let out = Arc::new(Mutex::new(Vec::new()));
                let io = TcpIo {
                    stream: Some(stream),
                    out: out.clone(),
                    sending: Vec::new(),
                    sent: 0,
                    write_error: None,
                    backlog: backlog.clone(),
                };
                (Conn::Tcp, SendHalf::Tcp(out), RecvHalf::Tcp(Box::new(io)))
            }
        };
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Client,
            relay_path: Vec::new(),
            token: opts.token.clone(),
        };
        let bytes = wire::encode_to_vec(&hello)
            .map_err(|e| ClientError::Config(format!("hello does not encode (token too long?): {e}")))?;
        send.write_all(&bytes).await.map_err(|e| connect_err(e.to_string()))?;

        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match decoder.next_frame() {
                Ok(Some(frame @ Frame::Hello { .. })) => {
                    wire::check_version(&frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
                    break;
                }
                Ok(Some(Frame::Error { code, message, .. })) => {
                    return Err(ClientError::Refused { code, message });
                }
                Ok(Some(other)) => {
                    return Err(ClientError::Protocol(format!("expected Hello, got {other:?}")));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.extend(&buf[..n]),
                Ok(None) => return Err(connect_err("relay closed the stream before its Hello".into())),
                Err(e) => return Err(connect_err(e.to_string())),
            }
        }
        info!(relay = %opts.addr, transport = ?opts.transport, "connected");

        let writer = match send {
            SendHalf::Quic(send) => {
                let (writer, frames) = mpsc::unbounded_channel::<Vec<u8>>();
                let task = tokio::spawn(write_quic(send, frames, backlog.clone()));
                Writer::Task(writer, task)
            }
            SendHalf::Tcp(out) => Writer::Buffer(out),
        };
        Ok(Session { link: Link { conn, writer, backlog }, recv, decoder })
    }
}

/// A connection's send half: the control stream (QUIC), or the buffer the driver's reads
/// write out from (TCP, [`TcpIo`]).
enum SendHalf {
    Quic(quinn::SendStream),
    Tcp(Arc<Mutex<Vec<u8>>>),
}

impl SendHalf {
    /// Sends `bytes` (QUIC), or queues them for the next read (TCP).
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            SendHalf::Quic(send) => send.write_all(bytes).await.map_err(std::io::Error::from),
            SendHalf::Tcp(out) => {
                out.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(bytes);
                Ok(())
            }
        }
    }
}

/// The QUIC writer task: sends what the driver queues until the queue closes, then finishes
/// the stream.
async fn write_quic(mut send: quinn::SendStream, mut frames: mpsc::UnboundedReceiver<Vec<u8>>, backlog: Arc<Backlog>) {
    // What piled up while the last write was under way goes out as one write, so a burst of
    // publishes fills whole packets instead of one packet per chunk.
    let mut pending = Vec::new();
    while frames.recv_many(&mut pending, WRITE_BATCH).await > 0 {
        let len = pending.iter().map(Vec::len).sum();
        let result = if pending.len() == 1 {
            send.write_all(&pending[0]).await
        } else {
            let mut joined = Vec::with_capacity(len);
            for bytes in &pending {
                joined.extend_from_slice(bytes);
            }
            send.write_all(&joined).await
        };
        backlog.remove(len);
        pending.clear();
        if let Err(e) = result {
            debug!("control stream write failed: {e}");
            return;
        }
    }
    if send.finish().is_ok() {
        // Until the relay has every byte: the connection is closed only then (or after
        // `LINGER`), so what was queued before a close is not thrown away with it.
        let _ = send.stopped().await;
    }
}

/// A TCP link's TLS stream, read and written by the driver task itself: each read first
/// writes out what the driver queued since (as far as the socket takes it), so a publish
/// reaches the socket without waking another task. (QUIC has a writer task: quinn's stream
/// writes wake its connection task anyway.)
struct TcpIo {
    /// `None` once handed to the closing task.
    stream: Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    /// What the driver queued ([`Writer::Buffer`]).
    out: Arc<Mutex<Vec<u8>>>,
    /// Taken from `out`, being written; `sent` bytes of it are.
    sending: Vec<u8>,
    sent: usize,
    /// A write failed: reported once what can still be read is read.
    write_error: Option<std::io::Error>,
    /// Counts down as the queued bytes are written.
    backlog: Arc<Backlog>,
}

impl TcpIo {
    /// Writes what is queued as far as the socket takes it, then reads. Ready with the bytes
    /// read (0 at the end of the stream) or an error; a failed write is reported once what can
    /// still be read is read.
    fn poll_io(&mut self, cx: &mut std::task::Context<'_>, buf: &mut [u8]) -> std::task::Poll<std::io::Result<usize>> {
        use std::pin::Pin;
        use std::task::Poll;
        let stream = self.stream.as_mut().expect("open while the session runs");
        if self.write_error.is_none() {
            let mut written = 0;
            let result = Self::poll_send(stream, &mut self.sending, &mut self.sent, &self.out, &mut written, cx);
            self.write_error = result.err();
            self.backlog.remove(written);
        }
        // Reads go on after a failed write: what the relay sent before it went (its `Error`
        // frame, say) is read first, and the failure reported after it.
        let mut read = tokio::io::ReadBuf::new(buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => Poll::Ready(Ok(read.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.write_error.take().unwrap_or(e))),
            ready_or_pending => match self.write_error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => ready_or_pending.map(|r| r.map(|()| 0)),
            },
        }
    }

    /// Writes what is queued as far as the socket takes it, and flushes: TLS records the stream
    /// still holds (a write the socket had no room for accepts the bytes and keeps their
    /// records) go to the socket now, or when it has room, which wakes the task too.
    fn poll_send(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        sending: &mut Vec<u8>,
        sent: &mut usize,
        out: &Mutex<Vec<u8>>,
        written: &mut usize,
        cx: &mut std::task::Context<'_>,
    ) -> std::io::Result<()> {
        use std::pin::Pin;
        use std::task::Poll;
        loop {
            if *sent == sending.len() {
                sending.clear();
                *sent = 0;
                std::mem::swap(sending, &mut *out.lock().unwrap_or_else(PoisonError::into_inner));
                if sending.is_empty() {
                    break;
                }
            }
            match Pin::new(&mut *stream).poll_write(cx, &sending[*sent..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    *sent += n;
                    *written += n;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        match Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for TcpIo {
    /// Sends what is still queued, then TLS's `close_notify` and the end of the stream, in a
    /// task of its own and for [`LINGER`] at most (a relay that stopped reading).
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut rest = self.sending.split_off(self.sent);
        rest.append(&mut self.out.lock().unwrap_or_else(PoisonError::into_inner));
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                stream.write_all(&rest).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

/// A connection's receive half.
enum RecvHalf {
    Quic(quinn::RecvStream),
    /// Boxed: the TLS stream is a kilobyte.
    Tcp(Box<TcpIo>),
}

impl RecvHalf {
    /// Reads some bytes; `None` at the end of the stream. Cancel-safe, as both reads are (a
    /// TCP read writes queued bytes first; what it wrote stays written).
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self {
            RecvHalf::Quic(recv) => recv.read(buf).await.map_err(std::io::Error::from),
            RecvHalf::Tcp(io) => match std::future::poll_fn(|cx| io.poll_io(cx, buf)).await? {
                0 => Ok(None),
                n => Ok(Some(n)),
            },
        }
    }
}

/// What closes a connection.
enum Conn {
    Quic(quinn::Connection),
    /// Closes as its [`TcpIo`] is dropped.
    Tcp,
}

/// How long a link may go on sending what was queued after it is closed.
const LINGER: Duration = Duration::from_secs(3);

impl Conn {
    /// Closes the connection now (QUIC). A TCP link closes when its [`TcpIo`] is dropped, after
    /// what was queued, with TLS's `close_notify`.
    fn close(&self, code: u32, reason: &[u8]) {
        if let Conn::Quic(conn) = self {
            conn.close(code.into(), reason);
        }
    }
}

/// Where a [`Link`]'s encoded frames go.
enum Writer {
    /// The QUIC writer task, and its handle.
    Task(mpsc::UnboundedSender<Vec<u8>>, tokio::task::JoinHandle<()>),
    /// The TCP buffer the driver's next read writes out.
    Buffer(Arc<Mutex<Vec<u8>>>),
}

/// One live connection.
struct Session {
    link: Link,
    recv: RecvHalf,
    decoder: FrameDecoder,
}

/// The sending side of a live connection.
struct Link {
    conn: Conn,
    writer: Writer,
    /// What is encoded and not yet written ([`Client::publish_unacked`] waits on it).
    backlog: Arc<Backlog>,
}

impl Link {
    /// Closes the connection once what was queued on it is sent, for [`LINGER`] at most, in
    /// a task of its own: chunks published without an ack just before are not thrown away
    /// with the connection. (A TCP link does the same as its [`TcpIo`] is dropped.)
    fn close_after_sending(self, reason: &'static [u8]) {
        let Link { conn, writer, .. } = self;
        let (Conn::Quic(conn), Writer::Task(frames, task)) = (conn, writer) else { return };
        // The writer task writes what it holds, finishes the stream and waits for the relay
        // to have it all.
        drop(frames);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = tokio::time::timeout(LINGER, task).await;
                    conn.close(0u32.into(), reason);
                });
            }
            Err(_) => conn.close(0u32.into(), reason),
        }
    }

    fn send(&self, frame: &Frame) {
        self.send_all(&mut vec![frame.clone()]);
    }

    /// Sends many frames as one buffer: for QUIC one allocation, one channel message, one
    /// stream write; for TCP they join what the next read writes out.
    fn send_all(&self, frames: &mut Vec<Frame>) {
        let encode = |out: &mut Vec<u8>, frames: &mut Vec<Frame>| {
            for frame in frames.drain(..) {
                if let Err(e) = wire::encode(&frame, out) {
                    warn!("dropping a frame that does not encode: {e}");
                }
            }
        };
        match &self.writer {
            Writer::Task(writer, _) => {
                let mut bytes = Vec::new();
                encode(&mut bytes, frames);
                if !bytes.is_empty() {
                    self.backlog.add(bytes.len());
                    // If the writer has stopped the connection is broken; the reader will notice.
                    let _ = writer.send(bytes);
                }
            }
            Writer::Buffer(out) => {
                let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
                let before = out.len();
                encode(&mut out, frames);
                self.backlog.add(out.len() - before);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The driver task

enum SessionEnd {
    /// The application is gone or closed the client.
    Closed,
    /// The connection was lost.
    Lost(String),
    /// A preferred candidate answered: this connection was closed for that one's.
    Preferred(Session, usize),
}

/// A try of the preferred candidates, in a task of its own; stopped if the session ends first.
struct Probe(Option<tokio::task::JoinHandle<Result<(Session, usize), ClientError>>>);

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The relay's address as the user gave it: with `tcp://` for TLS over TCP.
fn shown_addr(opts: &ConnectOptions) -> String {
    match opts.transport {
        Transport::Quic => opts.addr.clone(),
        Transport::Tcp => format!("tcp://{}", opts.addr),
    }
}

/// The first of `candidates[..upto]` that can be reached, in order, and its index; every
/// failure, in order, if none.
async fn establish_any(candidates: &[Connector], upto: usize) -> Result<(Session, usize), ClientError> {
    let mut failures = Vec::new();
    for (i, c) in candidates.iter().enumerate().take(upto) {
        match c.establish().await {
            Ok(session) => return Ok((session, i)),
            Err(e) if candidates.len() == 1 => return Err(e),
            Err(e) => failures.push(format!("{}: {e}", shown_addr(&c.opts))),
        }
    }
    Err(ClientError::Connect { addr: candidates.iter().take(upto).map(|c| shown_addr(&c.opts)).collect::<Vec<_>>().join(", "), message: failures.join("; ") })
}

/// Where a publish's answer goes.
type Waiter = oneshot::Sender<Result<(), PublishError>>;

/// The driver's end of one subscription's channel.
struct SubOut {
    tx: mpsc::UnboundedSender<SubEvent>,
    shared: Arc<SubShared>,
}

struct Driver {
    /// The candidate in use.
    connector: Connector,
    /// Every candidate, most preferred first.
    candidates: Arc<Vec<Connector>>,
    /// The index of the one in use.
    current: usize,
    /// How often a preferred candidate is tried while a less preferred one is in use.
    prefer_every: Duration,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    ids: Arc<AtomicU64>,
    /// Everything that must survive a reconnect.
    session: ClientSession,
    subs: HashMap<u64, SubOut>,
    waiters: HashMap<u64, Waiter>,
    events: broadcast::Sender<ConnectionEvent>,
    connected: watch::Sender<bool>,
    /// Connections made so far.
    sessions: u64,
    /// Frames being gathered for one write, kept between flushes for its buffer.
    outgoing: Vec<Frame>,
    /// Flow control of unacked publishes, shared with the [`Client`]s.
    unacked: Arc<Unacked>,
}

/// Commands the driver takes per turn at most before it sends what they queued.
const COMMAND_BATCH: usize = 256;
/// Encoded buffers the control stream's writer joins into one write at most.
const WRITE_BATCH: usize = 64;

impl Driver {
    async fn run(mut self, first: Session) {
        let mut session = Some(first);
        let mut backoff = MIN_BACKOFF;
        loop {
            if let Some(s) = session.take() {
                backoff = MIN_BACKOFF;
                let end = self.run_session(s).await;
                self.session.disconnected();
                self.route_events();
                let _ = self.connected.send(false);
                match end {
                    SessionEnd::Closed => break,
                    SessionEnd::Lost(reason) => {
                        warn!(relay = %self.connector.opts.addr, "connection lost: {reason}; reconnecting");
                        let _ = self.events.send(ConnectionEvent::Disconnected { reason });
                    }
                    SessionEnd::Preferred(next, index) => {
                        let reason = format!("moving to the preferred relay {}", self.candidates[index].opts.addr);
                        let _ = self.events.send(ConnectionEvent::Disconnected { reason });
                        self.moved(index);
                        session = Some(next);
                        continue;
                    }
                }
            }
            // Wait, then try to reconnect, serving commands all the while.
            if self.idle(tokio::time::sleep(backoff)).await.is_none() {
                break;
            }
            let candidates = self.candidates.clone();
            match self.idle(async move { establish_any(&candidates, candidates.len()).await }).await {
                None => break,
                Some(Ok((s, index))) => {
                    if index != self.current {
                        self.moved(index);
                    }
                    session = Some(s);
                }
                Some(Err(e)) => {
                    debug!("reconnect failed: {e}");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // The connection is closed already; the endpoint is shared with the runtime's other
        // clients, and closes once the last of them lets go of it.
        debug!("client driver stopped");
    }

    /// Now on candidate `index`: says so.
    fn moved(&mut self, index: usize) {
        let from = self.connector.opts.addr.clone();
        self.current = index;
        self.connector = self.candidates[index].clone();
        info!(%from, to = %self.connector.opts.addr, "moved to another relay");
        let _ = self.events.send(ConnectionEvent::Moved { from, to: self.connector.opts.addr.clone() });
    }

    /// Drives `fut` to completion while handling commands without a connection. `None` if
    /// the client was closed meanwhile.
    async fn idle<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Close) => return None,
                    Some(cmd) => {
                        self.command(cmd);
                        self.route_events();
                    }
                },
            }
        }
    }

    async fn run_session(&mut self, session: Session) -> SessionEnd {
        let Session { link: s, mut recv, mut decoder } = session;
        // Unacked publishes wait on this connection's backlog until it ends.
        *self.unacked.backlog.lock().unwrap_or_else(PoisonError::into_inner) = s.backlog.clone();
        let _ended = EndsBacklog(s.backlog.clone());
        let mut buf = vec![0u8; 64 * 1024];
        let subscriptions = self.session.connected(now_ms());
        let _ = self.connected.send(true);
        // The first connection is reported by `Client::connect` returning.
        if self.sessions > 0 {
            let _ = self.events.send(ConnectionEvent::Connected);
            let _ = self.events.send(ConnectionEvent::Resubscribed { subscriptions });
        }
        self.sessions += 1;
        // `LiveOnly` subscriptions learn of the gap.
        self.route_events();
        self.flush(&s);
        let mut last_error = None;
        // On a less preferred candidate: try the preferred ones now and then, in a task of
        // their own, so commands and chunks keep flowing meanwhile.
        let mut prefer = (self.current > 0).then(|| tokio::time::interval_at(tokio::time::Instant::now() + self.prefer_every.min(Duration::from_secs(86_400)), self.prefer_every.max(Duration::from_millis(10))));
        let mut probe = Probe(None);
        loop {
            tokio::select! {
                _ = async { prefer.as_mut().expect("guarded").tick().await }, if prefer.is_some() && probe.0.is_none() => {
                    let (candidates, upto) = (self.candidates.clone(), self.current);
                    probe.0 = Some(tokio::spawn(async move { establish_any(&candidates, upto).await }));
                }
                done = async { probe.0.as_mut().expect("guarded").await }, if probe.0.is_some() => {
                    probe.0 = None;
                    if let Ok(Ok((next, index))) = done {
                        s.close_after_sending(b"moving to a preferred relay");
                        return SessionEnd::Preferred(next, index);
                    }
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Close) => {
                        s.close_after_sending(b"client closed");
                        return SessionEnd::Closed;
                    }
                    Some(cmd) => {
                        self.command(cmd);
                        // Take what else is queued before sending, so a burst of publishes
                        // leaves as one write.
                        for _ in 1..COMMAND_BATCH {
                            match self.cmd_rx.try_recv() {
                                Ok(Command::Close) => {
                                    self.flush(&s);
                                    s.close_after_sending(b"client closed");
                                    return SessionEnd::Closed;
                                }
                                Ok(cmd) => self.command(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                },
                read = recv.read(&mut buf) => {
                    let n = match read {
                        Ok(Some(n)) => n,
                        Ok(None) => return SessionEnd::Lost(last_error.unwrap_or_else(|| "relay closed the control stream".into())),
                        Err(e) => return SessionEnd::Lost(last_error.unwrap_or_else(|| e.to_string())),
                    };
                    decoder.extend(&buf[..n]);
                    let now = now_ms();
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(frame)) => {
                                tracing::trace!(?frame, "from relay");
                                self.session.handle(frame, now);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                s.send(&Frame::Error { code: e.error_code(), about: None, message: e.to_string() });
                                s.conn.close(1, b"malformed frame");
                                return SessionEnd::Lost(format!("relay sent bytes that do not decode: {e}"));
                            }
                        }
                    }
                }
            }
            if let Some(e) = self.route_events() {
                last_error = Some(e);
            }
            self.flush(&s);
        }
    }

    /// Sends what the session queued.
    fn flush(&mut self, s: &Link) {
        let mut frames = std::mem::take(&mut self.outgoing);
        while let Some(frame) = self.session.poll_transmit() {
            frames.push(frame);
        }
        s.send_all(&mut frames);
        self.outgoing = frames;
    }

    /// Hands an application command to the session.
    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { chunk, reply } => {
                let seq = self.ids.fetch_add(1, Ordering::Relaxed);
                self.waiters.insert(seq, reply);
                self.session.publish(seq, chunk);
            }
            Command::PublishUnacked { seq, chunk } => {
                self.unacked.commands.add_permits(1);
                self.session.publish_unacked(seq, chunk);
            }
            Command::Subscribe { id, filter, mode, tx, shared } => {
                let window = u32::try_from(self.connector.opts.subscription_buffer.max(1)).unwrap_or(u32::MAX);
                self.session.subscribe(id, filter, mode, window);
                self.subs.insert(id, SubOut { tx, shared });
            }
            Command::Unsubscribe { id } => {
                self.subs.remove(&id);
                self.session.unsubscribe(id);
            }
            Command::Consumed { id, n } => self.session.consumed(id, n),
            Command::Close => {}
        }
    }

    /// Routes the session's events to waiters and subscriptions. Returns the last
    /// connection-level error the relay sent, if any.
    fn route_events(&mut self) -> Option<String> {
        let mut connection_error = None;
        while let Some(event) = self.session.poll_event() {
            match event {
                SessionEvent::Published { seq, result } => {
                    if let Some(waiter) = self.waiters.remove(&seq) {
                        let _ = waiter.send(result.map_err(PublishError::from_session));
                    }
                }
                SessionEvent::Sub { id, event } => {
                    let Some(out) = self.subs.get(&id) else { continue };
                    if event == SubEvent::Gap && out.shared.gap_unread.swap(true, Ordering::Relaxed) {
                        continue; // joins the gap the application has not read yet
                    }
                    let buffered = out.shared.buffered.fetch_add(1, Ordering::Relaxed) + 1;
                    out.shared.peak.fetch_max(buffered, Ordering::Relaxed);
                    if out.tx.send(event).is_err() {
                        // The application dropped the subscription.
                        self.subs.remove(&id);
                        self.session.unsubscribe(id);
                    }
                }
                SessionEvent::Ended { id } => {
                    // Dropping the sender ends `next` after the queued events.
                    self.subs.remove(&id);
                }
                SessionEvent::ConnectionError { code, message } => {
                    warn!(%code, "relay error: {message}");
                    connection_error = Some(format!("relay error {code}: {message}"));
                }
                SessionEvent::UnackedRefused { seq, code, message } => {
                    debug!(%code, "unacked publish {seq} refused: {message}");
                    self.unacked.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = self.events.send(ConnectionEvent::UnackedRefused { seq, code, message });
                }
                SessionEvent::UnackedNotSent { seq, name } => {
                    let _ = self.events.send(ConnectionEvent::UnackedNotSent { seq, name });
                }
            }
        }
        connection_error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A publisher without acks waits while the connection holds `BACKLOG_LIMIT` bytes or
    /// more unwritten, and goes on when writes bring it below, or when the connection ends.
    #[tokio::test]
    async fn the_backlog_holds_publishers_back_until_it_drains_or_closes() {
        let backlog = Arc::new(Backlog::default());
        backlog.add(BACKLOG_LIMIT - 1);
        backlog.room().await; // below the limit: no wait
        backlog.add(10);
        let waiter = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "at the limit it waits");
        backlog.remove(5);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still at the limit");
        backlog.remove(5);
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woken once below").unwrap();
        // Removing more than was added (a write counted after its connection was cleared)
        // leaves zero, not a wrapped count.
        backlog.remove(usize::MAX);
        assert_eq!(backlog.bytes.load(Ordering::Acquire), 0);

        backlog.add(BACKLOG_LIMIT);
        let waiter = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        backlog.close();
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woken when closed").unwrap();
        backlog.room().await; // closed: never waits again
    }
}
