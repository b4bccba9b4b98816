//! A blocking, std-only client for a relay's Unix-domain socket (`unix_listen` in the relay's
//! configuration): the wire protocol's frames and framing over a `UnixStream`, with no async
//! runtime and no network stack, for a process whose sandbox allows only `AF_UNIX` sockets
//! (the messenger's Secure process talking to its Network process).
//!
//! It is a thin driver around the sans-IO [`ClientSession`]: the session decides what to send,
//! drops repeats, grants credit and resubscribes after a reconnect; [`UnixClient`] only moves
//! bytes and hands the session's events to the application.
//!
//! # Threads
//!
//! A [`UnixClient`] runs two threads of its own: a *reader* that reads the socket, hands the
//! frames to the session and reconnects when the link is lost, and a *writer* that writes
//! the encoded frames the session produced. No lock is held while blocking on the socket, and
//! the reader never waits for the application, so the relay is always read from and a slow
//! application can never stall the link: what it has not taken yet is bounded by each
//! subscription's credit window ([`UnixOptions::window`]) and by its own publishes. All
//! methods take `&self`; share the client between threads with an `Arc`.
//!
//! # Events
//!
//! [`UnixClient::next_event`] hands out, in order, publish answers, subscription events,
//! disconnects and reconnects ([`Event`]). Taking a chunk event gives its room back to the
//! relay (credit, half a window at a time). [`UnixClient::publish_wait`] waits for one
//! publish's answer and leaves every other event queued.
//!
//! # Reconnect
//!
//! When the link is lost (the relay restarted, say), publishes waiting for an answer fail
//! with [`PublishFailure::Disconnected`] (publishing the identical chunk again is safe: the
//! relay acknowledges duplicates), [`Event::Disconnected`] is queued, and the reader tries
//! again with capped exponential backoff ([`UnixOptions::min_backoff`] doubling up to
//! [`UnixOptions::max_backoff`]). On success the session re-sends every open subscription (a
//! finished replay comes back as `CachedAndLive`, so the relay replays what was missed, and
//! repeats are dropped), and [`Event::Reconnected`] is queued. Publishing while disconnected
//! fails at once with `Disconnected`.
//!
//! ```no_run
//! use std::time::Duration;
//! use canopy::session::unix::{Event, UnixClient};
//! use canopy::session::{SessionEvent, SubEvent};
//! use canopy::wire::ReplayMode;
//! use canopy::{Chunk, Filter, Name};
//!
//! let client = UnixClient::connect("/run/user/1000/canopy.sock", Some("secure-token"))?;
//! let sub = client.subscribe("0x0a0b0000000000000000000000000000/16".parse()?, ReplayMode::CachedAndLive);
//! let chunk = Chunk::new(Name::new(0x0a0b << 112), u64::MAX, &b"hi"[..])?;
//! client.publish_wait(chunk, Duration::from_secs(5))?;
//! while let Some(event) = client.next_event(Duration::from_secs(1)) {
//!     if let Event::Session(SessionEvent::Sub { id, event: SubEvent::Chunk(chunk) }) = event {
//!         assert_eq!(id, sub);
//!         println!("{}: {} bytes", chunk.name(), chunk.data().len());
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{ClientSession, PublishFailure, SessionEvent, SubEvent};
use crate::wire::{self, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION, ReplayMode, Role};
use crate::{Chunk, Filter};

/// How to connect, and the client's limits.
#[derive(Debug, Clone)]
pub struct UnixOptions {
    /// The relay's socket (its `unix_listen`).
    pub path: PathBuf,
    /// The token sent in `Hello`, if the relay has access rules.
    pub token: Option<String>,
    /// Each subscription's credit window, in chunks (default 256): the relay sends at most
    /// this many that the application has not taken yet.
    pub window: u32,
    /// How long the `Hello` exchange may take (default 5 s).
    pub connect_timeout: Duration,
    /// The first pause before reconnecting (default 100 ms).
    pub min_backoff: Duration,
    /// The longest pause between reconnect attempts (default 5 s).
    pub max_backoff: Duration,
}

impl UnixOptions {
    /// Options for the socket at `path` with the defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixOptions {
            path: path.into(),
            token: None,
            window: 256,
            connect_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be reached (no relay there, permission denied…), or the link
    /// broke during the `Hello` exchange.
    #[error("cannot connect to {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The relay answered the `Hello` with an error (a refused token, another version…).
    #[error("relay refused the session: {code}: {message}")]
    Refused {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// The relay broke the protocol during the `Hello` exchange.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The relay did not answer the `Hello` within [`UnixOptions::connect_timeout`].
    #[error("timed out waiting for the relay's hello")]
    Timeout,
}

/// Why [`UnixClient::publish_wait`] did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The relay refused the chunk: its final answer (`Conflict`, `PublishDenied`,
    /// `Expired`, `StoreFull`…), naming the chunk.
    #[error("relay refused {name} ({len} bytes): {code}: {message}")]
    Refused {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
        /// The chunk's name.
        name: crate::Name,
        /// The chunk's data length.
        len: usize,
    },
    /// The link was down, or went down before the relay answered: the outcome is unknown,
    /// and publishing the identical chunk again is safe.
    #[error("disconnected from the relay before it answered")]
    Disconnected,
    /// No answer within the timeout; it will come later as a [`SessionEvent::Published`] for
    /// `seq`.
    #[error("no answer from the relay in time (publish {seq})")]
    Timeout {
        /// The publish's number.
        seq: u64,
    },
}

impl From<PublishFailure> for PublishError {
    fn from(failure: PublishFailure) -> Self {
        match failure {
            PublishFailure::Refused { code, message, name, len } => PublishError::Refused { code, message, name, len },
            PublishFailure::Disconnected => PublishError::Disconnected,
        }
    }
}

/// What the client tells the application, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// What the session reports: publish answers, subscription events and ends, and the
    /// relay's errors about the link.
    Session(SessionEvent),
    /// The link was lost; the client is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A new link is up after a loss, and the open subscriptions were sent again.
    Reconnected {
        /// How many subscriptions were sent again.
        subscriptions: usize,
    },
}

impl From<SessionEvent> for Event {
    fn from(event: SessionEvent) -> Self {
        Event::Session(event)
    }
}

struct State {
    session: ClientSession,
    events: VecDeque<Event>,
    /// The current writer's queue; none while disconnected.
    tx: Option<mpsc::Sender<Vec<u8>>>,
    /// The current link, to shut it down on close.
    stream: Option<UnixStream>,
    /// The relay's last error about the link, the reason it is lost.
    last_error: Option<String>,
    closed: bool,
    next_id: u64,
}

impl State {
    /// Sends what the session queued and takes its events; the caller notifies.
    fn pump(&mut self) {
        while let Some(frame) = self.session.poll_transmit() {
            match wire::encode_to_vec(&frame) {
                Ok(bytes) => {
                    if let Some(tx) = &self.tx {
                        // A writer that is gone has a broken link; the reader will notice.
                        let _ = tx.send(bytes);
                    }
                }
                Err(err) => tracing::warn!(%err, "dropping a frame that does not encode"),
            }
        }
        while let Some(event) = self.session.poll_event() {
            if let SessionEvent::ConnectionError { code, message } = &event {
                self.last_error = Some(format!("relay error {code}: {message}"));
            }
            self.events.push_back(event.into());
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

struct Shared {
    opts: UnixOptions,
    state: Mutex<State>,
    /// Signalled when events arrive or the client closes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A link to a relay over its Unix socket, kept up in the background. See the
/// [module docs](self).
pub struct UnixClient {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UnixClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixClient").field("path", &self.shared.opts.path).finish_non_exhaustive()
    }
}

/// Unix time in milliseconds.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl UnixClient {
    /// Connects to the relay's socket at `path`, presenting `token`, with the default
    /// options. Returns once the relay has answered the `Hello`.
    pub fn connect(path: impl AsRef<Path>, token: Option<&str>) -> Result<UnixClient, ConnectError> {
        let mut opts = UnixOptions::new(path.as_ref());
        opts.token = token.map(str::to_owned);
        UnixClient::connect_with(opts)
    }

    /// Connects with `opts`. Returns once the relay has answered the `Hello`; a refusal (a
    /// wrong token) or no relay at the path is an error. Later losses are repaired in the
    /// background.
    pub fn connect_with(opts: UnixOptions) -> Result<UnixClient, ConnectError> {
        let (stream, decoder) = establish(&opts)?;
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State {
                session: ClientSession::new(),
                events: VecDeque::new(),
                tx: None,
                stream: None,
                last_error: None,
                closed: false,
                next_id: 1,
            }),
            changed: Condvar::new(),
        });
        let link = start(&shared, stream, false)
            .map_err(|source| ConnectError::Io { path: shared.opts.path.clone(), source })?;
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("canopy-unix-reader".into())
                .spawn(move || reader(&shared, link, decoder))
                .map_err(|source| ConnectError::Io { path: PathBuf::new(), source })?
        };
        Ok(UnixClient { shared, reader: Some(reader) })
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().session.is_connected()
    }

    /// Publishes waiting for the relay's answer.
    pub fn pending_publishes(&self) -> usize {
        self.shared.lock().session.pending_publishes()
    }

    /// Opens a subscription and returns its id; its events come as [`SessionEvent::Sub`]. While
    /// disconnected it is sent on the next link.
    pub fn subscribe(&self, filter: Filter, mode: ReplayMode) -> u64 {
        let mut state = self.shared.lock();
        let id = state.next_id();
        state.session.subscribe(id, filter, mode, self.shared.opts.window);
        state.pump();
        id
    }

    /// Closes subscription `id`; its events not yet taken are dropped.
    pub fn unsubscribe(&self, id: u64) {
        let mut state = self.shared.lock();
        state.session.unsubscribe(id);
        state.events.retain(|e| !matches!(e, Event::Session(SessionEvent::Sub { id: i, .. }) | Event::Session(SessionEvent::Ended { id: i }) if *i == id));
        state.pump();
    }

    /// Publishes `chunk` and returns its number; the answer comes as [`SessionEvent::Published`]
    /// with that `seq`. While disconnected it fails at once (with
    /// [`PublishFailure::Disconnected`]).
    pub fn publish(&self, chunk: Chunk) -> u64 {
        let mut state = self.shared.lock();
        let seq = state.next_id();
        state.session.publish(seq, chunk);
        state.pump();
        drop(state);
        self.shared.changed.notify_all();
        seq
    }

    /// Publishes `chunk` and waits up to `timeout` for the relay's answer. Other events stay
    /// queued for [`next_event`](Self::next_event).
    pub fn publish_wait(&self, chunk: Chunk, timeout: Duration) -> Result<(), PublishError> {
        let seq = self.publish(chunk);
        match self.wait_published(seq, timeout) {
            Some(result) => result.map_err(PublishError::from),
            None => Err(PublishError::Timeout { seq }),
        }
    }

    /// Waits up to `timeout` for the answer to publish `seq` and takes it from the queue,
    /// leaving every other event there. `None` if it has not come (or was already taken).
    pub fn wait_published(&self, seq: u64, timeout: Duration) -> Option<Result<(), PublishFailure>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let found = state.events.iter().position(|e| matches!(e, Event::Session(SessionEvent::Published { seq: s, .. }) if *s == seq));
            if let Some(Event::Session(SessionEvent::Published { result, .. })) = found.and_then(|i| state.events.remove(i)) {
                return Some(result);
            }
            state = self.wait(state, deadline)?;
        }
    }

    /// The next event, waiting up to `timeout` for one; `None` if none came (or the client
    /// is closed). Taking a chunk gives its room back to the relay.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(event) = state.events.pop_front() {
                if let Event::Session(SessionEvent::Sub { id, event: SubEvent::Chunk(_) }) = &event {
                    state.session.consumed(*id, 1);
                    state.pump();
                }
                return Some(event);
            }
            state = self.wait(state, deadline)?;
        }
    }

    /// Waits for a change until `deadline`; `None` once it has passed or the client closed.
    fn wait<'a>(&self, state: MutexGuard<'a, State>, deadline: Instant) -> Option<MutexGuard<'a, State>> {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        if state.closed {
            return None;
        }
        let (state, _) = self.shared.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner());
        Some(state)
    }

    /// Closes the link and stops the client's threads. Dropping the client does the same.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            state.tx = None;
            if let Some(stream) = state.stream.take() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for UnixClient {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects and exchanges `Hello`s; returns the stream and the decoder holding whatever
/// followed the relay's `Hello`.
fn establish(opts: &UnixOptions) -> Result<(UnixStream, FrameDecoder), ConnectError> {
    let io_err = |source: io::Error| ConnectError::Io { path: opts.path.clone(), source };
    let mut stream = UnixStream::connect(&opts.path).map_err(io_err)?;
    stream.set_read_timeout(Some(opts.connect_timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(opts.connect_timeout)).map_err(io_err)?;
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        relay_path: Vec::new(),
        token: opts.token.clone(),
    };
    let bytes =
        wire::encode_to_vec(&hello).map_err(|e| ConnectError::Protocol(format!("hello does not encode: {e}")))?;
    stream.write_all(&bytes).map_err(io_err)?;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match decoder.next_frame() {
            Ok(Some(frame @ Frame::Hello { .. })) => {
                wire::check_version(&frame).map_err(|e| ConnectError::Protocol(e.to_string()))?;
                break;
            }
            Ok(Some(Frame::Error { code, message, .. })) => return Err(ConnectError::Refused { code, message }),
            Ok(Some(other)) => return Err(ConnectError::Protocol(format!("expected Hello, got {other:?}"))),
            Ok(None) => {}
            Err(e) => return Err(ConnectError::Protocol(e.to_string())),
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "the relay closed the link before its Hello");
                return Err(io_err(eof));
            }
            Ok(n) => decoder.extend(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(ConnectError::Timeout);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    stream.set_write_timeout(None).map_err(io_err)?;
    Ok((stream, decoder))
}

/// One link's reading end and its writer thread.
struct Link {
    stream: UnixStream,
    writer: JoinHandle<()>,
}

/// Starts a link on a stream whose `Hello`s are exchanged: spawns its writer and tells the
/// session, which (re)sends the open subscriptions.
fn start(shared: &Shared, stream: UnixStream, reconnect: bool) -> io::Result<Link> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut out = stream.try_clone()?;
    let stored = stream.try_clone()?;
    let writer = std::thread::Builder::new().name("canopy-unix-writer".into()).spawn(move || {
        while let Ok(bytes) = rx.recv() {
            if out.write_all(&bytes).is_err() {
                return;
            }
        }
    })?;
    let mut state = shared.lock();
    if state.closed {
        let _ = stream.shutdown(Shutdown::Both);
    } else {
        state.tx = Some(tx);
        state.stream = Some(stored);
        state.last_error = None;
        let subscriptions = state.session.connected(now_ms());
        if reconnect {
            state.events.push_back(Event::Reconnected { subscriptions });
        }
        state.pump();
    }
    drop(state);
    shared.changed.notify_all();
    Ok(Link { stream, writer })
}

/// The reader thread: reads each link until it is lost, then reconnects, until the client is
/// closed.
fn reader(shared: &Shared, mut link: Link, mut decoder: FrameDecoder) {
    loop {
        let lost = read_link(shared, &mut link.stream, &mut decoder);
        {
            let mut state = shared.lock();
            state.tx = None;
            state.stream = None;
            state.session.disconnected();
            state.pump();
            if !state.closed {
                let reason = state.last_error.take().unwrap_or(lost);
                tracing::warn!(path = %shared.opts.path.display(), "link to the relay lost: {reason}; reconnecting");
                state.events.push_back(Event::Disconnected { reason });
            }
        }
        shared.changed.notify_all();
        let _ = link.stream.shutdown(Shutdown::Both);
        let _ = link.writer.join();

        let mut backoff = shared.opts.min_backoff;
        link = loop {
            if closed_within(shared, backoff) {
                return;
            }
            match establish(&shared.opts) {
                Ok((stream, fresh)) => match start(shared, stream, true) {
                    Ok(link) => {
                        decoder = fresh;
                        break link;
                    }
                    Err(err) => tracing::debug!(%err, "starting the link failed"),
                },
                Err(err) => tracing::debug!(%err, "reconnecting failed"),
            }
            backoff = (backoff * 2).min(shared.opts.max_backoff);
        };
    }
}

/// Waits `pause` unless the client closes first; true if it is closed.
fn closed_within(shared: &Shared, pause: Duration) -> bool {
    let deadline = Instant::now() + pause;
    let mut state = shared.lock();
    while !state.closed {
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
            return false;
        };
        state = shared.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
    }
    true
}

/// Reads one link, handing frames to the session, until it ends; returns why.
fn read_link(shared: &Shared, stream: &mut UnixStream, decoder: &mut FrameDecoder) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    // Frames that came with the relay's `Hello` are handled first.
    let mut fresh = 0;
    loop {
        if fresh > 0 {
            decoder.extend(&buf[..fresh]);
        }
        let now = now_ms();
        let mut failure = None;
        {
            let mut state = shared.lock();
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => state.session.handle(frame, now),
                    Ok(None) => break,
                    Err(err) => {
                        failure = Some(format!("the relay sent bytes that do not decode: {err}"));
                        break;
                    }
                }
            }
            state.pump();
        }
        shared.changed.notify_all();
        if let Some(reason) = failure {
            return reason;
        }
        fresh = loop {
            match stream.read(&mut buf) {
                Ok(0) => return "the relay closed the link".into(),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return e.to_string(),
            }
        };
    }
}
