//! The [`Client`]: one QUIC connection to a relay, owned by a background task, with automatic
//! reconnect.
//!
//! # Architecture
//!
//! [`Client::connect`] resolves the address, makes the QUIC + TLS 1.3 connection, opens the
//! control stream, exchanges `Hello`s and then spawns one **driver task**. The driver owns the
//! connection:
//!
//! - a *reader loop* decodes frames with [`FrameDecoder`] and dispatches them: `Ack`/`Error`
//!   about a publish `seq` to that publish's waiter (a `seq → oneshot` map, so any number of
//!   publishes can be in flight), `Deliver`/`ReplayDone`/`Error` about a subscription id to
//!   that subscription's bounded channel;
//! - a *writer task* owns the send half of the control stream and writes the frames the driver
//!   queues on an mpsc channel, so a relay that is slow to read never stops the reader.
//!
//! Publish sequence numbers and subscription ids come from one counter, so an `Error` whose
//! `about` is a number always names exactly one of them.
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
//!    published while the client was disconnected.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy::wire::{self, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION, ReplayMode, Role};
use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::Trust;

/// The first pause before a reconnect attempt.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
    /// `[::1]:4433`). Names are resolved again on every reconnect.
    pub addr: String,
    /// How to trust the relay's certificate.
    pub trust: Trust,
    /// The authentication token sent in `Hello`, if the relay requires one.
    pub token: Option<String>,
    /// The name the relay's certificate must carry with [`Trust::CaPem`] (the TLS SNI).
    /// Defaults to `localhost`.
    pub server_name: String,
    /// Capacity of each subscription's event channel (default 1024). A subscription whose
    /// application falls this many events behind is ended with a
    /// [`SubEvent::Error`] of code [`ErrorCode::SlowConsumer`].
    pub subscription_buffer: usize,
    /// How long one connection attempt (QUIC + TLS + `Hello` exchange) may take (default
    /// 10 s).
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    /// Options with the defaults: no token, server name `localhost`, 1024-event subscription
    /// buffers, 10 s connect timeout.
    ///
    /// ```
    /// use canopy_sdk::{ConnectOptions, Trust};
    /// let addr: std::net::SocketAddr = "127.0.0.1:4433".parse().unwrap();
    /// let opts = ConnectOptions::new(addr, Trust::CaPem(String::new()));
    /// assert_eq!(opts.addr, "127.0.0.1:4433");
    /// ```
    pub fn new(addr: impl ToString, trust: Trust) -> Self {
        ConnectOptions {
            addr: addr.to_string(),
            trust,
            token: None,
            server_name: "localhost".into(),
            subscription_buffer: 1024,
            connect_timeout: Duration::from_secs(10),
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

/// What a [`Subscription`] yields.
///
/// ```
/// use canopy_sdk::SubEvent;
/// fn describe(ev: &SubEvent) -> String {
///     match ev {
///         SubEvent::Chunk(c) => format!("chunk {}", c.name()),
///         SubEvent::ReplayDone => "caught up".into(),
///         SubEvent::Error { code, message } => format!("ended: {code}: {message}"),
///     }
/// }
/// assert_eq!(describe(&SubEvent::ReplayDone), "caught up");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubEvent {
    /// A matching chunk. Each name is delivered at most once per subscription, even across
    /// reconnects.
    Chunk(Chunk),
    /// Every cached chunk the mode asked for has been delivered; live chunks follow (none for
    /// [`ReplayMode::CachedOnly`], whose subscription then ends). Delivered once.
    ReplayDone,
    /// The subscription ended: refused by the relay (`SubscribeDenied`), dropped by the relay
    /// for falling behind (`SlowConsumer`), or ended by the SDK because the application did
    /// not read its events fast enough (`SlowConsumer`, message says "local"). Nothing
    /// follows; subscribing again is up to the application.
    Error {
        /// Why it ended.
        code: ErrorCode,
        /// Detail from the relay or the SDK.
        message: String,
    },
}

enum Command {
    Publish { chunk: Chunk, reply: oneshot::Sender<Result<(), PublishError>> },
    Subscribe { id: u64, filter: Filter, mode: ReplayMode, tx: mpsc::Sender<SubEvent> },
    Unsubscribe { id: u64 },
    Close,
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
    buffer: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("closed", &self.cmd.is_closed()).finish()
    }
}

impl Client {
    /// Connects to a relay: QUIC + TLS 1.3 (ALPN `canopy/1`), control stream, `Hello`
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
        let connector = Connector::new(opts)?;
        let session = connector.establish().await?;
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let ids = Arc::new(AtomicU64::new(1));
        let buffer = connector.opts.subscription_buffer.max(2);
        let driver = Driver {
            connector,
            cmd_rx,
            ids: ids.clone(),
            subs: HashMap::new(),
            pending: HashMap::new(),
        };
        tokio::spawn(driver.run(session));
        Ok(Client { cmd, ids, buffer })
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
        self.cmd
            .send(Command::Publish { chunk, reply })
            .map_err(|_| PublishError::Disconnected)?;
        answer.await.unwrap_or(Err(PublishError::Disconnected))
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
        let (tx, rx) = mpsc::channel(self.buffer);
        self.cmd
            .send(Command::Subscribe { id, filter, mode, tx })
            .map_err(|_| ClientError::Closed)?;
        Ok(Subscription { id, rx, cmd: self.cmd.clone() })
    }

    /// Closes the connection now: pending publishes fail with
    /// [`PublishError::Disconnected`], every subscription ends (`next` returns `None`), and
    /// later calls fail. Dropping every clone of the client and every subscription does the
    /// same.
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
/// Events queue in a bounded channel ([`ConnectOptions::subscription_buffer`]). If the
/// application does not keep up and the channel fills, the SDK ends the subscription with a
/// final [`SubEvent::Error`] (`SlowConsumer`) instead of growing memory; subscribing again
/// (e.g. `CachedAndLive` to catch up) is the application's choice. Dropping the subscription
/// unsubscribes. It keeps the connection alive even if every [`Client`] clone is dropped.
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
    rx: mpsc::Receiver<SubEvent>,
    cmd: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Publish { chunk, .. } => write!(f, "Publish({})", chunk.name()),
            Command::Subscribe { id, filter, .. } => write!(f, "Subscribe({id}, {filter})"),
            Command::Unsubscribe { id } => write!(f, "Unsubscribe({id})"),
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
        self.rx.recv().await
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

/// Everything needed to (re)connect; cheap to clone.
#[derive(Clone)]
struct Connector {
    opts: Arc<ConnectOptions>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl Connector {
    fn new(opts: ConnectOptions) -> Result<Self, ClientError> {
        let config = crate::tls::quic_client_config(&opts.trust)?;
        // A dual-stack wildcard socket reaches IPv4 and IPv6 relays; fall back to IPv4 only.
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0u16; 8], 0)))
            .or_else(|_| quinn::Endpoint::client(SocketAddr::from(([0u8; 4], 0))))
            .map_err(|e| ClientError::Config(format!("cannot open a UDP socket: {e}")))?;
        Ok(Connector { opts: Arc::new(opts), endpoint, config })
    }

    async fn establish(&self) -> Result<Session, ClientError> {
        tokio::time::timeout(self.opts.connect_timeout, self.establish_inner())
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    async fn establish_inner(&self) -> Result<Session, ClientError> {
        let opts = &self.opts;
        let addr_err = |message: String| ClientError::Resolve { addr: opts.addr.clone(), message };
        let addr = tokio::net::lookup_host(opts.addr.as_str())
            .await
            .map_err(|e| addr_err(e.to_string()))?
            .next()
            .ok_or_else(|| addr_err("no addresses".into()))?;
        // A dual-stack socket needs IPv4 peers in their IPv6-mapped form.
        let addr = match (addr, self.endpoint.local_addr()) {
            (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        };
        let connect_err = |message: String| ClientError::Connect { addr: opts.addr.clone(), message };
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), addr, &opts.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect_err(e.to_string()))?;
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
        info!(relay = %opts.addr, "connected");

        let (writer, mut frames) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(bytes) = frames.recv().await {
                if let Err(e) = send.write_all(&bytes).await {
                    debug!("control stream write failed: {e}");
                    return;
                }
            }
            let _ = send.finish();
        });
        Ok(Session { link: Link { conn, writer }, recv, decoder })
    }
}

/// One live connection.
struct Session {
    link: Link,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// The sending side of a live connection.
struct Link {
    conn: quinn::Connection,
    writer: mpsc::UnboundedSender<Vec<u8>>,
}

impl Link {
    fn send(&self, frame: &Frame) {
        match wire::encode_to_vec(frame) {
            // If the writer has stopped the connection is broken; the reader will notice.
            Ok(bytes) => {
                let _ = self.writer.send(bytes);
            }
            Err(e) => warn!("dropping a frame that does not encode: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The driver task

struct SubState {
    filter: Filter,
    mode: ReplayMode,
    tx: mpsc::Sender<SubEvent>,
    /// Whether a `Subscribe` for it ever reached a connection.
    sent: bool,
    replay_done: bool,
    /// Names delivered so far, with their expiry, to drop replays after a reconnect.
    seen: HashMap<Name, u64>,
    prune_at: usize,
}

impl SubState {
    /// The mode to (re)subscribe with on a fresh connection.
    fn wire_mode(&self) -> ReplayMode {
        match self.mode {
            _ if !self.sent || !self.replay_done => self.mode,
            ReplayMode::LiveOnly => ReplayMode::LiveOnly,
            _ => ReplayMode::CachedAndLive,
        }
    }

    fn prune_seen(&mut self) {
        let now = now_ms();
        self.seen.retain(|_, expiry| *expiry > now);
        self.prune_at = (self.seen.len() * 2).max(1024);
    }
}

/// Why handing an event to the application failed.
enum Offer {
    Ok,
    /// The channel was full: a final `SlowConsumer` error was queued instead.
    Slow,
    /// The application dropped the subscription.
    Gone,
}

fn offer(tx: &mpsc::Sender<SubEvent>, event: SubEvent) -> Offer {
    // The driver is the only sender, so the capacity it sees can only grow meanwhile. The
    // last slot is kept for the final error.
    if tx.is_closed() {
        return Offer::Gone;
    }
    if tx.capacity() <= 1 {
        let _ = tx.try_send(SubEvent::Error {
            code: ErrorCode::SlowConsumer,
            message: "local: the application did not read this subscription's events fast enough; \
                      subscribe again to resume"
                .into(),
        });
        return Offer::Slow;
    }
    match tx.try_send(event) {
        Ok(()) => Offer::Ok,
        Err(mpsc::error::TrySendError::Full(_)) => Offer::Slow,
        Err(mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
    }
}

enum SessionEnd {
    /// The application is gone or closed the client.
    Closed,
    /// The connection was lost.
    Lost(String),
}

/// Where a publish's answer goes.
type Waiter = oneshot::Sender<Result<(), PublishError>>;

struct Driver {
    connector: Connector,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    ids: Arc<AtomicU64>,
    subs: HashMap<u64, SubState>,
    /// seq → (name, data length, waiter).
    pending: HashMap<u64, (Name, usize, Waiter)>,
}

impl Driver {
    async fn run(mut self, first: Session) {
        let mut session = Some(first);
        let mut backoff = MIN_BACKOFF;
        loop {
            if let Some(s) = session.take() {
                backoff = MIN_BACKOFF;
                match self.run_session(s).await {
                    SessionEnd::Closed => break,
                    SessionEnd::Lost(reason) => {
                        warn!(relay = %self.connector.opts.addr, "connection lost: {reason}; reconnecting");
                        for (_, (_, _, waiter)) in self.pending.drain() {
                            let _ = waiter.send(Err(PublishError::Disconnected));
                        }
                    }
                }
            }
            // Wait, then try to reconnect, serving commands all the while.
            if self.idle(tokio::time::sleep(backoff)).await.is_none() {
                break;
            }
            let connector = self.connector.clone();
            match self.idle(async move { connector.establish().await }).await {
                None => break,
                Some(Ok(s)) => session = Some(s),
                Some(Err(e)) => {
                    debug!("reconnect failed: {e}");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.connector.endpoint.close(0u32.into(), b"client closed");
        debug!("client driver stopped");
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
                    Some(cmd) => self.command(cmd, None),
                },
            }
        }
    }

    async fn run_session(&mut self, session: Session) -> SessionEnd {
        let Session { link: s, mut recv, mut decoder } = session;
        let mut buf = vec![0u8; 64 * 1024];
        // (Re-)subscribe everything open.
        for (&id, sub) in self.subs.iter_mut() {
            sub.prune_seen();
            let mode = sub.wire_mode();
            debug!(id, %sub.filter, ?mode, "subscribing on the new connection");
            s.send(&Frame::Subscribe { id, filter: sub.filter, mode });
            sub.sent = true;
        }
        let mut last_error = None;
        loop {
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Close) => {
                        s.conn.close(0u32.into(), b"client closed");
                        return SessionEnd::Closed;
                    }
                    Some(cmd) => self.command(cmd, Some(&s)),
                },
                read = recv.read(&mut buf) => {
                    let n = match read {
                        Ok(Some(n)) => n,
                        Ok(None) => return SessionEnd::Lost(last_error.unwrap_or_else(|| "relay closed the control stream".into())),
                        Err(e) => return SessionEnd::Lost(last_error.unwrap_or_else(|| e.to_string())),
                    };
                    decoder.extend(&buf[..n]);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(frame)) => {
                                if let Some(e) = self.frame(frame, &s) {
                                    last_error = Some(e);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                s.send(&Frame::Error { code: e.error_code(), about: None, message: e.to_string() });
                                s.conn.close(1u32.into(), b"malformed frame");
                                return SessionEnd::Lost(format!("relay sent bytes that do not decode: {e}"));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Handles an application command; `s` is the live session, if any.
    fn command(&mut self, cmd: Command, s: Option<&Link>) {
        match cmd {
            Command::Publish { chunk, reply } => {
                let Some(s) = s else {
                    let _ = reply.send(Err(PublishError::Disconnected));
                    return;
                };
                let seq = self.ids.fetch_add(1, Ordering::Relaxed);
                self.pending.insert(seq, (chunk.name(), chunk.data().len(), reply));
                s.send(&Frame::Publish { seq, chunk });
            }
            Command::Subscribe { id, filter, mode, tx } => {
                let mut sub = SubState {
                    filter,
                    mode,
                    tx,
                    sent: false,
                    replay_done: false,
                    seen: HashMap::new(),
                    prune_at: 1024,
                };
                if let Some(s) = s {
                    s.send(&Frame::Subscribe { id, filter, mode });
                    sub.sent = true;
                }
                self.subs.insert(id, sub);
            }
            Command::Unsubscribe { id } => {
                if let Some(sub) = self.subs.remove(&id)
                    && sub.sent
                    && let Some(s) = s
                {
                    s.send(&Frame::Unsubscribe { id });
                }
            }
            Command::Close => {}
        }
    }

    /// Ends subscription `id` from the SDK's side, telling the relay.
    fn drop_sub(&mut self, id: u64, s: &Link) {
        if self.subs.remove(&id).is_some() {
            s.send(&Frame::Unsubscribe { id });
        }
    }

    /// Dispatches one frame from the relay. Returns a connection-level error message, if it
    /// was one.
    fn frame(&mut self, frame: Frame, s: &Link) -> Option<String> {
        tracing::trace!(?frame, "from relay");
        match frame {
            Frame::Ack { seq } => {
                if let Some((_, _, waiter)) = self.pending.remove(&seq) {
                    let _ = waiter.send(Ok(()));
                }
            }
            Frame::Deliver { id, chunk } => {
                let sub = self.subs.get_mut(&id)?;
                match sub.seen.entry(chunk.name()) {
                    Entry::Occupied(_) => return None, // already delivered before a reconnect
                    Entry::Vacant(v) => {
                        v.insert(chunk.expiry());
                    }
                }
                if sub.seen.len() > sub.prune_at {
                    sub.prune_seen();
                }
                match offer(&sub.tx, SubEvent::Chunk(chunk)) {
                    Offer::Ok => {}
                    Offer::Slow => {
                        warn!(id, "subscription ended: the application is not reading it");
                        self.drop_sub(id, s);
                    }
                    Offer::Gone => self.drop_sub(id, s),
                }
            }
            Frame::ReplayDone { id } => {
                let sub = self.subs.get_mut(&id)?;
                let cached_only = sub.mode == ReplayMode::CachedOnly;
                if !sub.replay_done {
                    sub.replay_done = true;
                    match offer(&sub.tx, SubEvent::ReplayDone) {
                        Offer::Ok => {}
                        Offer::Slow | Offer::Gone => {
                            self.drop_sub(id, s);
                            return None;
                        }
                    }
                }
                if cached_only {
                    // The relay has closed it; closing the channel ends `next`.
                    self.subs.remove(&id);
                }
            }
            Frame::Error { code, about: Some(about), message } => {
                if let Some((name, len, waiter)) = self.pending.remove(&about) {
                    let _ = waiter.send(Err(PublishError::from_relay(name, len, code, message)));
                } else if code == ErrorCode::UnknownSubscription {
                    debug!(about, "relay: {message}");
                } else if let Some(sub) = self.subs.remove(&about) {
                    let _ = sub.tx.try_send(SubEvent::Error { code, message });
                } else {
                    debug!(about, %code, "relay error about an unknown seq/id: {message}");
                }
            }
            Frame::Error { code, about: None, message } => {
                warn!(%code, "relay error: {message}");
                return Some(format!("relay error {code}: {message}"));
            }
            other => warn!("ignoring unexpected frame from the relay: {other:?}"),
        }
        None
    }
}
