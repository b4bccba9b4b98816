//! The Secure process: its sockets and threads around a [`Service`].

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use canopy::session::unix::{Event, UnixClient, UnixOptions};
use canopy::session::{PublishFailure, SessionEvent, SubEvent};
use canopy::wire::{ErrorCode, ReplayMode};
use canopy::{Chunk, Filter};
use canopy_msg_core::{Device, Key, Org, Outgoing};
use crate::proto::{self, MessageLine, Reply, Request};
use crate::service::{Service, View};
use crate::store::FjallBackend;

/// How to run Secure.
pub struct Options {
    /// Where the sealed state lives (a fjall database).
    pub state: PathBuf,
    /// The socket the UI connects to.
    pub ui_socket: PathBuf,
    /// Network's socket.
    pub network_socket: PathBuf,
    /// The key that seals the state.
    pub key: Key,
    /// The org.
    pub org: Org,
    /// The clock filter, if time comes by subscription.
    pub clock: Option<Filter>,
    /// The token presented to Network.
    pub token: Option<String>,
    /// Where Network writes its status report ([`proto::NetworkStatus`]), read for `status`.
    pub network_status: Option<PathBuf>,
}

/// Why Secure could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state could not be opened (a wrong passphrase says so).
    #[error(transparent)]
    State(#[from] canopy_msg_core::MlsError),
    /// Storage.
    #[error("{0}")]
    Storage(String),
    /// A socket.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The sandbox.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

type Shared = Arc<Mutex<Service<FjallBackend>>>;

struct Clock {
    filter: Option<Filter>,
    /// Clock time minus OS time, from the latest tick.
    offset_ms: Mutex<Option<i64>>,
}

impl Clock {
    fn now(&self) -> u64 {
        let os = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        match *self.offset_ms.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(off) => os.saturating_add_signed(off),
            None => os,
        }
    }
}

/// UI connections that follow messages: one conversation's, or (`None`) every one's.
struct Followers {
    list: Mutex<Vec<(Option<View>, UnixStream)>>,
}

impl Followers {
    fn send(&self, shown: &[MessageLine]) {
        if shown.is_empty() {
            return;
        }
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain_mut(|(view, stream)| shown.iter().filter(|m| view.is_none_or(|v| v.shows(m))).all(|m| proto::write_frame(stream, &Reply::Message(m.clone())).is_ok()));
    }
}

/// Secure's side of the link to Network: the std Unix-socket client, plus what it must
/// not forget across Network restarts. A publish that failed because the link was down is
/// kept and sent again when it is back (an identical publish is acknowledged again).
struct Link {
    client: UnixClient,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    /// Publishes sent and not answered: seq → chunk.
    pending: BTreeMap<u64, Chunk>,
    /// Publishes to send again once the link is back.
    retry: Vec<Chunk>,
    /// Open subscriptions: id → (filter, mode).
    subs: BTreeMap<u64, (Filter, ReplayMode)>,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, out: Vec<Outgoing>) {
        for o in out {
            match Chunk::new(o.name, o.expiry_ms, o.data) {
                Ok(chunk) => self.publish_chunk(chunk),
                Err(e) => tracing::error!("cannot publish {}: {e}", o.name),
            }
        }
    }

    fn publish_chunk(&self, chunk: Chunk) {
        let mut state = self.lock();
        let seq = self.client.publish(chunk.clone());
        state.pending.insert(seq, chunk);
    }

    fn subscribe(&self, filter: Filter, mode: ReplayMode) {
        let mut state = self.lock();
        if state.subs.values().any(|s| *s == (filter, mode)) {
            return;
        }
        let id = self.client.subscribe(filter, mode);
        state.subs.insert(id, (filter, mode));
    }

    fn unacknowledged(&self) -> usize {
        let state = self.lock();
        state.pending.len() + state.retry.len()
    }
}

fn connect(opts: &Options) -> UnixClient {
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        let mut o = UnixOptions::new(&opts.network_socket);
        o.token = opts.token.clone();
        o.window = 1024;
        o.min_backoff = std::time::Duration::from_millis(20);
        o.max_backoff = std::time::Duration::from_millis(500);
        match UnixClient::connect_with(o) {
            Ok(c) => return c,
            Err(e) => {
                tracing::info!("waiting for Network: {e}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
        }
    }
}

/// Runs Secure until a `stop` request.
pub fn run(opts: Options) -> Result<(), RunError> {
    let backend = FjallBackend::open(&opts.state).map_err(RunError::Storage)?;
    let device = Device::open(opts.key.clone(), backend, opts.org)?;
    let service: Shared = Arc::new(Mutex::new(Service::new(device)));
    let clock = Arc::new(Clock { filter: opts.clock, offset_ms: Mutex::new(None) });

    // Network first: the UI socket appears only once Secure can serve, so `up` never talks
    // to a Secure that cannot answer yet.
    let link = Arc::new(Link { client: connect(&opts), state: Mutex::new(LinkState::default()) });
    let _ = std::fs::remove_file(&opts.ui_socket);
    let listener = UnixListener::bind(&opts.ui_socket)?;
    std::fs::set_permissions(&opts.ui_socket, std::fs::Permissions::from_mode(0o600))?;
    // The filters, and this device's key package for anyone to start a conversation with.
    let start = service.lock().expect("service").start(clock.now())?;
    for filter in start.subscribe {
        link.subscribe(filter, ReplayMode::CachedAndLive);
    }
    link.publish(start.publish);
    if let Some(filter) = clock.filter {
        link.subscribe(filter, ReplayMode::MostRecent(1));
    }

    // Every thread that will ever run exists or inherits the filter from here on.
    crate::sandbox::install()?;
    service.lock().expect("service").sandboxed = true;
    tracing::info!("secure up, sandboxed: {}", opts.ui_socket.display());

    let followers = Arc::new(Followers { list: Mutex::new(Vec::new()) });
    {
        let (service, link, clock, followers) = (service.clone(), link.clone(), clock.clone(), followers.clone());
        std::thread::Builder::new().name("network-events".into()).spawn(move || network_events(&service, &link, &clock, &followers))?;
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (service, link, clock, followers, status) = (service.clone(), link.clone(), clock.clone(), followers.clone(), opts.network_status.clone());
        std::thread::Builder::new().name("ui".into()).spawn(move || ui_connection(conn, &service, &link, &clock, &followers, status.as_deref()))?;
    }
    Ok(())
}

/// Network's report, if it is fresh: a report older than two seconds means Network stopped
/// writing it (it rewrites it five times a second), so it says nothing about the relay.
fn read_network_status(path: &std::path::Path, now_ms: u64) -> Option<proto::NetworkStatus> {
    let report: proto::NetworkStatus = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (now_ms.abs_diff(report.written_ms) <= 2_000).then_some(report)
}

fn ui_connection(mut conn: UnixStream, service: &Shared, link: &Link, clock: &Clock, followers: &Followers, network_status: Option<&std::path::Path>) {
    loop {
        let request: Request = match proto::read_frame(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = proto::write_frame(&mut conn, &Reply::Error { message: format!("bad request: {e}") });
                return;
            }
        };
        let follow = match &request {
            Request::Follow { conversation } => Some(Some(conversation.clone())),
            Request::Watch => Some(None),
            _ => None,
        };
        // Read outside the service lock; only `status` shows it.
        let relay = match (&request, network_status) {
            // Network stamps its report with the OS clock, whatever clock Secure keeps.
            (Request::Status, Some(path)) => read_network_status(path, SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)),
            _ => None,
        };
        let (reply, fx) = {
            let mut s = service.lock().unwrap_or_else(|p| p.into_inner());
            s.network_up = link.client.is_connected();
            s.unacknowledged = link.unacknowledged();
            s.relay = relay;
            s.handle(request, clock.now())
        };
        // A key package's welcome: subscribed before the key package is out, so the
        // welcome comes live (and from the cache if the link drops in between).
        for filter in fx.subscribe {
            link.subscribe(filter, ReplayMode::CachedAndLive);
        }
        for filter in fx.refetch {
            // A one-off replay; it ends by itself after its `ReplayDone`.
            link.client.subscribe(filter, ReplayMode::CachedOnly);
        }
        link.publish(fx.publish);
        followers.send(&fx.shown);
        if proto::write_frame(&mut conn, &reply).is_err() {
            return;
        }
        if fx.stop {
            tracing::info!("stopping on request");
            std::process::exit(0);
        }
        if let (Some(conversation), Reply::Pong) = (follow, &reply) {
            let view = match conversation {
                Some(c) => service.lock().unwrap_or_else(|p| p.into_inner()).view(&c).map(Some),
                None => Ok(None),
            };
            if let (Ok(view), Ok(stream)) = (view, conn.try_clone()) {
                followers.list.lock().unwrap_or_else(|p| p.into_inner()).push((view, stream));
            }
            return;
        }
    }
}

fn network_events(service: &Shared, link: &Link, clock: &Clock, followers: &Followers) {
    loop {
        let Some(first) = link.client.next_event(std::time::Duration::from_secs(3600)) else { continue };
        // Take everything already waiting as one batch: one MLS pass, one sealed write.
        let mut batch = vec![first];
        while batch.len() < 4096
            && let Some(more) = link.client.next_event(std::time::Duration::ZERO)
        {
            batch.push(more);
        }
        let mut chunks = Vec::new();
        for event in batch {
            match event {
                Event::Reconnected { .. } => {
                    service.lock().unwrap_or_else(|p| p.into_inner()).network_up = true;
                    let retry = std::mem::take(&mut link.lock().retry);
                    for chunk in retry {
                        link.publish_chunk(chunk);
                    }
                }
                Event::Disconnected { reason } => {
                    tracing::warn!("lost the link to Network: {reason}");
                    service.lock().unwrap_or_else(|p| p.into_inner()).network_up = false;
                }
                Event::Session(SessionEvent::Sub { event: SubEvent::Chunk(chunk), .. }) => {
                    if clock.filter.is_some_and(|f| f.matches(chunk.name())) {
                        if let Ok(bytes) = <[u8; 8]>::try_from(chunk.data().as_ref()) {
                            let os = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                            *clock.offset_ms.lock().unwrap_or_else(|p| p.into_inner()) = Some(u64::from_be_bytes(bytes) as i64 - os);
                            service.lock().unwrap_or_else(|p| p.into_inner()).time_source = format!("clock {}", clock.filter.expect("set"));
                        }
                        continue;
                    }
                    chunks.push((chunk.name(), chunk.data().to_vec()));
                }
                Event::Session(SessionEvent::Sub { id, event: SubEvent::Error { code, message } }) => {
                    let sub = link.lock().subs.remove(&id);
                    if let Some((filter, mode)) = sub {
                        tracing::warn!(%filter, "subscription ended ({code:?}: {message}); subscribing again");
                        link.subscribe(filter, if mode == ReplayMode::LiveOnly { mode } else { ReplayMode::CachedAndLive });
                    }
                }
                Event::Session(SessionEvent::Sub { .. } | SessionEvent::Ended { .. }) => {}
                Event::Session(SessionEvent::Published { seq, result }) => {
                    let chunk = link.lock().pending.remove(&seq);
                    match (result, chunk) {
                        (Ok(()), _) | (_, None) => {}
                        (Err(PublishFailure::Disconnected), Some(chunk)) => {
                            // Sent again once the link is back (or now, if it already is).
                            if link.client.is_connected() {
                                link.publish_chunk(chunk);
                            } else {
                                link.lock().retry.push(chunk);
                            }
                        }
                        (Err(PublishFailure::Refused { code, message, name, .. }), Some(_)) => {
                            tracing::warn!(%name, "publish refused: {code:?} {message}");
                            if code == ErrorCode::Conflict {
                                service.lock().unwrap_or_else(|p| p.into_inner()).refused(name);
                            }
                        }
                    }
                }
                Event::Session(SessionEvent::ConnectionError { code, message }) => tracing::warn!("Network: {code:?} {message}"),
                // Secure publishes every chunk with an ack: these never come.
                Event::Session(event @ (SessionEvent::UnackedRefused { .. } | SessionEvent::UnackedNotSent { .. })) => {
                    tracing::warn!("unexpected {event:?}");
                }
            }
        }
        if !chunks.is_empty() {
            let mut s = service.lock().unwrap_or_else(|p| p.into_inner());
            let before = s.filters();
            match s.ingest(&chunks, clock.now()) {
                Ok((_, fx)) => {
                    // New groups, or new users to follow: their filters.
                    let filters = Some(s.filters()).filter(|f| *f != before);
                    drop(s);
                    // Shown before the sync: a crash in between loses only what the relay
                    // sends again, so the reader need not wait for the disk. Outside the
                    // service lock, so a follower that stops reading holds up only itself.
                    // (A send in between syncs this batch with its own.)
                    followers.send(&fx.shown);
                    if let Err(e) = service.lock().unwrap_or_else(|p| p.into_inner()).sync() {
                        tracing::error!("cannot persist what arrived: {e}");
                    }
                    link.publish(fx.publish);
                    for filter in filters.into_iter().flatten() {
                        link.subscribe(filter, ReplayMode::CachedAndLive);
                    }
                    for filter in fx.refetch {
                        // A one-off replay; it ends by itself after its `ReplayDone`.
                        link.client.subscribe(filter, ReplayMode::CachedOnly);
                    }
                }
                Err(e) => tracing::error!("cannot persist what arrived: {e}"),
            }
        }
    }
}
