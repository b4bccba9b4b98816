//! Secure's link to Network: the ordinary wire protocol over `HOME/network.sock`, driven by
//! the sans-IO [`ClientSession`] (resubscribe after reconnect, dedup by name, credit) with
//! std threads and blocking I/O only — Secure has no async runtime and no network stack.
//!
//! One reader thread owns the connection: it connects (again and again, if Network
//! restarts), exchanges `Hello`s, and hands each frame to the session. Any thread may
//! publish or subscribe; the session sits behind a mutex, and the frames it queues go, in
//! order and at once, to a writer thread per connection. Nobody writes to the socket while
//! holding the mutex, so a full socket can never stop the reader (and with it the credit
//! that would let Network drain).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy::session::{ClientSession, PublishFailure, SessionEvent, SubEvent};
use canopy::wire::{self, ErrorCode, Frame, FrameDecoder, ReplayMode, Role};
use canopy::{Chunk, Filter, Name};

/// Chunks one subscription may have handed to Secure and not yet processed.
pub const WINDOW: u32 = 1024;

/// What the link reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected to Network (again).
    Up,
    /// The connection to Network is gone; the link keeps trying.
    Down,
    /// A chunk of subscription `sub`; report it processed with [`Link::consumed`].
    Chunk {
        /// The subscription.
        sub: u64,
        /// The chunk.
        chunk: Chunk,
    },
    /// A publish was acknowledged.
    Acked(Name),
    /// A publish was refused for good.
    Refused {
        /// Its name.
        name: Name,
        /// The relay's code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// A subscription ended (refused, or cut for being slow); the link opens it again.
    SubscriptionEnded {
        /// Its filter.
        filter: Filter,
        /// Why.
        code: ErrorCode,
    },
}

struct Inner {
    session: ClientSession,
    writer: Option<Sender<Vec<u8>>>,
    next_id: u64,
    /// Publishes not acknowledged yet, sent again on every new connection (an identical
    /// publish is acknowledged again, so this is safe).
    unacked: BTreeMap<u64, Chunk>,
    subs: BTreeMap<u64, (Filter, ReplayMode)>,
}

/// The link. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Mutex<Inner>>,
    events: Sender<LinkEvent>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Link {
    /// Starts the link to the socket at `path`; events arrive on the returned receiver.
    pub fn start(path: PathBuf, token: Option<String>) -> (Link, Receiver<LinkEvent>) {
        let (tx, rx) = channel();
        let inner = Inner { session: ClientSession::new(), writer: None, next_id: 1, unacked: BTreeMap::new(), subs: BTreeMap::new() };
        let link = Link { inner: Arc::new(Mutex::new(inner)), events: tx };
        let reader = link.clone();
        std::thread::Builder::new().name("network-link".into()).spawn(move || reader.run(path, token)).expect("spawning the link thread");
        (link, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> bool {
        self.lock().writer.is_some()
    }

    /// Publishes a chunk; its outcome arrives as [`LinkEvent::Acked`] or
    /// [`LinkEvent::Refused`]. Kept and sent again until then.
    pub fn publish(&self, chunk: Chunk) {
        let mut inner = self.lock();
        let seq = inner.next_id;
        inner.next_id += 1;
        inner.unacked.insert(seq, chunk.clone());
        if inner.writer.is_some() {
            inner.session.publish(seq, chunk);
            self.flush(&mut inner);
        }
    }

    /// Subscribes (cached and live) to `filter`, unless already subscribed.
    pub fn subscribe(&self, filter: Filter, mode: ReplayMode) {
        let mut inner = self.lock();
        if inner.subs.values().any(|(f, m)| *f == filter && *m == mode) {
            return;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subs.insert(id, (filter, mode));
        inner.session.subscribe(id, filter, mode, WINDOW);
        self.flush(&mut inner);
    }

    /// Secure processed `n` chunks of subscription `sub`: room for more.
    pub fn consumed(&self, sub: u64, n: u32) {
        let mut inner = self.lock();
        inner.session.consumed(sub, n);
        self.flush(&mut inner);
    }

    /// Chunks and publishes not acknowledged yet.
    pub fn unacknowledged(&self) -> usize {
        self.lock().unacked.len()
    }

    /// Sends what the session queued, and turns its events into link events.
    fn flush(&self, inner: &mut Inner) {
        let mut bytes = Vec::new();
        while let Some(frame) = inner.session.poll_transmit() {
            if let Err(e) = wire::encode(&frame, &mut bytes) {
                tracing::error!("cannot encode a frame for Network: {e}");
            }
        }
        if !bytes.is_empty()
            && let Some(w) = inner.writer.as_ref()
        {
            let _ = w.send(bytes);
        }
        while let Some(event) = inner.session.poll_event() {
            let out = match event {
                SessionEvent::Published { seq, result: Ok(()) } => inner.unacked.remove(&seq).map(|c| LinkEvent::Acked(c.name())),
                SessionEvent::Published { seq, result: Err(PublishFailure::Refused { code, message, name, .. }) } => {
                    inner.unacked.remove(&seq);
                    Some(LinkEvent::Refused { name, code, message })
                }
                // Sent again on the next connection.
                SessionEvent::Published { result: Err(PublishFailure::Disconnected), .. } => None,
                SessionEvent::Sub { id, event: SubEvent::Chunk(chunk) } => Some(LinkEvent::Chunk { sub: id, chunk }),
                SessionEvent::Sub { id, event: SubEvent::Error { code, .. } } => {
                    inner.subs.remove(&id).map(|(filter, _)| LinkEvent::SubscriptionEnded { filter, code })
                }
                SessionEvent::Sub { .. } | SessionEvent::Ended { .. } => None,
                SessionEvent::ConnectionError { code, message } => {
                    tracing::warn!("Network closed the link: {code:?} {message}");
                    None
                }
            };
            if let Some(e) = out {
                let _ = self.events.send(e);
            }
        }
    }

    fn run(self, path: PathBuf, token: Option<String>) {
        let mut pause = Duration::from_millis(5);
        loop {
            match self.session(&path, token.clone()) {
                Ok(()) => pause = Duration::from_millis(5),
                Err(e) => tracing::debug!("link to Network: {e}"),
            }
            {
                let mut inner = self.lock();
                if inner.writer.take().is_some() {
                    inner.session.disconnected();
                    self.flush(&mut inner);
                    let _ = self.events.send(LinkEvent::Down);
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// One connection, until it ends.
    fn session(&self, path: &PathBuf, token: Option<String>) -> Result<(), String> {
        let mut stream = UnixStream::connect(path).map_err(|e| format!("connecting to {}: {e}", path.display()))?;
        let hello = Frame::Hello { version: wire::PROTOCOL_VERSION, role: Role::Client, relay_path: Vec::new(), token };
        stream.write_all(&wire::encode_to_vec(&hello).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        // The relay's Hello, or its refusal.
        loop {
            match decoder.next_frame().map_err(|e| e.to_string())? {
                Some(Frame::Hello { .. }) => break,
                Some(Frame::Error { code, message, .. }) => return Err(format!("Network refused the link: {code:?} {message}")),
                Some(other) => return Err(format!("Network answered the hello with {other:?}")),
                None => {}
            }
            let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("Network closed the link during the hello".into());
            }
            decoder.extend(&buf[..n]);
        }
        {
            let mut write_half = stream.try_clone().map_err(|e| e.to_string())?;
            let (tx, rx) = channel::<Vec<u8>>();
            std::thread::Builder::new()
                .name("network-writer".into())
                .spawn(move || {
                    // Ends when the connection's sender is dropped, or the socket fails (then
                    // the reader sees the connection end too).
                    while let Ok(bytes) = rx.recv() {
                        if let Err(e) = write_half.write_all(&bytes) {
                            tracing::warn!("writing to Network: {e}");
                            let _ = write_half.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            let mut inner = self.lock();
            inner.writer = Some(tx);
            inner.session.connected(now_ms());
            let unacked: Vec<(u64, Chunk)> = inner.unacked.iter().map(|(s, c)| (*s, c.clone())).collect();
            for (seq, chunk) in unacked {
                inner.session.publish(seq, chunk);
            }
            self.flush(&mut inner);
        }
        let _ = self.events.send(LinkEvent::Up);
        loop {
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        let mut inner = self.lock();
                        inner.session.handle(frame, now_ms());
                        self.flush(&mut inner);
                    }
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => return Err(format!("from Network: {e}")),
                    Err(e) => tracing::warn!("from Network: {e}"),
                }
            }
            let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("Network closed the link".into());
            }
            decoder.extend(&buf[..n]);
        }
    }
}
