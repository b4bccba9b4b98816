//! # canopy-relay
//!
//! The Canopy relay server: tokio and quinn driving the sans-IO routing core
//! ([`canopy::node::Node`]).
//!
//! Data flows one way. Each link's reader task (a QUIC connection's control stream, or a
//! connection on the Unix socket, see [`RelayConfig::unix_listen`]) decodes frames and sends them to the **node actor**, the single task that owns the `Node` and its
//! store (with the memory store, a reader runs the actor's turn for what it read itself when
//! the node is free, unless its chunks fan out wide, and wakes one writer on its own thread,
//! which wakes the rest once it has its frames). The actor handles a batch of frames, syncs the store once for the batch (releasing
//! the acks), and moves the frames the node queued into each link's writer buffer as far as
//! the writer has room; writer tasks encode them onto the stream. A parent task keeps the
//! connection to the parent relay up, reconnecting with capped exponential backoff; the node
//! itself renews subscriptions and drains the durable outbox when it comes back.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use canopy_relay::{Relay, RelayConfig};
//! let relay = Relay::spawn(RelayConfig {
//!     listen: "127.0.0.1:0".parse()?,
//!     data: "/tmp/relay-data".into(),
//!     ..RelayConfig::default()
//! })
//! .await?;
//! println!("listening on {}, certificate {}", relay.local_addr(), relay.fingerprint());
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! See `docs/relay.md` for configuration and running a tree of relays.

mod actor;
mod frontend;
pub use frontend::FrontendMetrics;
pub mod advertise;
pub mod config;
mod link;
pub mod metrics;
mod plugin;
mod socket;
mod tcp;
pub mod tls;
#[cfg(unix)]
mod unix;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use canopy::node::{LinkId, Metrics, Node, NodeConfig, ParentRefusal};
use canopy::wire::RelayId;
use canopy::plugin::{MemoryState, StateStore};
use canopy::{FjallStore, MemoryStore, StoreStats};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::actor::{ActorParts, Stop, ToNode};
pub use canopy::plugin::{Limits as PluginLimits, PluginKind, PluginStats};

pub use crate::config::{AccessRule, PluginConfig, RelayConfig, RelayRole, StoreKind};
use crate::link::{LinkOut, LinkSend, QuicSend};
use crate::tls::Trust;

/// A snapshot of a relay's counters: the routing core's plus the store's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayMetrics {
    /// The routing core's counters.
    pub node: Metrics,
    /// The store's counters (chunks, bytes, evictions, outbox depth).
    pub store: StoreStats,
    /// Live downstream subscriptions.
    pub subscriptions: usize,
    /// Open links (clients, children and the parent).
    pub links: usize,
    /// Whether the link to the parent is up (always false without a parent).
    pub parent_connected: bool,
    /// An origin front-end's counters of its shared store (`None` for other relays).
    pub frontend: Option<FrontendMetrics>,
}

/// Messages in flight from connection tasks to the node actor at most; readers wait beyond
/// it, which pushes back on their peers through QUIC flow control.
const INBOX: usize = 1024;

/// How long an accepted connection may take to open its control stream.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Backoff between attempts to reach the parent.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection attempt to the parent gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A parent session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(2);
/// How long stopping waits for the listener's socket to close before giving up (with an
/// error logged); in practice it closes within milliseconds of the connections.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The relay server. See [`Relay::spawn`].
pub struct Relay;

/// State shared by the relay's network tasks.
struct Shared {
    to_node: mpsc::Sender<ToNode>,
    stop: watch::Receiver<Stop>,
    room: Arc<Notify>,
    next_link: AtomicU64,
    /// The largest UDP payload the QUIC endpoints accept and probe for.
    max_udp_payload: u16,
    /// Turns run on link readers' threads (memory store); set once the actor runs.
    turns: std::sync::OnceLock<Arc<dyn actor::Turns>>,
}

impl Shared {
    fn link_id(&self) -> LinkId {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running relay. Dropping it stops the relay abruptly (like [`RelayHandle::kill`], without
/// waiting); [`RelayHandle::shutdown`] stops it gracefully.
pub struct RelayHandle {
    /// The QUIC listener's address; none with `quic_listen = false`.
    local_addr: Option<SocketAddr>,
    cert_pem: String,
    cert_path: PathBuf,
    fingerprint: String,
    id: RelayId,
    /// The listener; taken (dropped) while stopping, so the socket can close.
    endpoint: Option<quinn::Endpoint>,
    /// Completes once the listener's UDP socket is closed.
    socket_released: Option<oneshot::Receiver<()>>,
    stop: watch::Sender<Stop>,
    snapshot: Arc<Mutex<RelayMetrics>>,
    node_done: Option<oneshot::Receiver<()>>,
    tasks: Vec<JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    plugins: Vec<plugin::RunningPlugin>,
    /// The Unix socket file, removed when dropped.
    #[cfg(unix)]
    unix_socket: Option<unix::SocketFile>,
    /// Connections open on the Unix socket and the TCP listener.
    stream_links: Arc<AtomicUsize>,
    /// The TCP listener's address (`tcp_listen`).
    tcp_addr: Option<SocketAddr>,
    /// The mDNS announcement (`advertise`), withdrawn first when stopping.
    advertisement: Option<advertise::Advertisement>,
}

impl Relay {
    /// Starts a relay: opens the store and TLS identity in `config.data` (creating them on
    /// first start), binds the QUIC listener (unless `quic_listen` is false) and the Unix
    /// socket (with `unix_listen`), and starts the node actor, the parent link and
    /// the metrics endpoint as configured. Must be called inside a tokio runtime.
    pub async fn spawn(config: RelayConfig) -> anyhow::Result<RelayHandle> {
        config.validate()?;
        std::fs::create_dir_all(&config.data)
            .with_context(|| format!("creating data directory {}", config.data.display()))?;
        let id = load_or_create_id(&config.data, config.id.as_deref())?;
        let identity = tls::load_or_create(&config.data, config.listen)?;
        if identity.created {
            tracing::info!(path = %identity.cert_path.display(), "created a self-signed certificate");
        }
        let access = config.access_rules()?;
        if access.is_open() && config.quic_listen && !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "no access rules are configured and the relay listens beyond loopback: anyone who can reach it may publish and subscribe everything"
            );
        }
        let parent_trust = match (&config.parent_ca, &config.parent_fingerprint) {
            (Some(path), _) => Some(Trust::CaPem(
                std::fs::read_to_string(path).with_context(|| format!("reading parent_ca {}", path.display()))?,
            )),
            (None, Some(fp)) => Some(Trust::Fingerprint(fp.clone())),
            (None, None) => None,
        };
        let parent = match (&config.parent, parent_trust) {
            (Some(parent), _) if parent.starts_with("dns:") => {
                let ca_pem = match &config.parent_ca {
                    Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading parent_ca {}", path.display()))?),
                    None => None,
                };
                Some(ParentTarget::Dns {
                    domain: parent["dns:".len()..].to_string(),
                    trust: canopy_sdk::discovery::TrustConfig { ca_pem, pinned: config.parent_fingerprint.iter().cloned().collect(), trust_dns: config.parent_trust_dns, ..Default::default() },
                    dns: canopy_sdk::discovery::DnsOptions { server: config.dns_server, ..canopy_sdk::discovery::DnsOptions::default() },
                    max_udp_payload: config.max_udp_payload,
                })
            }
            (Some(parent), Some(trust)) => Some(ParentTarget::Addr {
                addrs: parent.split(',').map(|addr| addr.trim().to_owned()).collect(),
                config: canopy_sdk::quic_client_config_with_mtu(&trust, config.max_udp_payload)?,
            }),
            _ => None,
        };

        // An origin front-end's chunks live in the Redis Cluster: the node hands its store
        // operations to the actor as requests, which it runs there in batches.
        let remote = match &config.store {
            StoreKind::Redis { nodes } => {
                let mut redis = canopy_redis::RedisStoreConfig::new(nodes.iter().cloned());
                redis.min_replicas = config.redis_min_replicas;
                let (store, feed) = canopy_redis::RedisStore::connect_live(redis)
                    .await
                    .with_context(|| format!("connecting to the Redis Cluster at {}", nodes.join(",")))?;
                let origin = store.origin_id().await.context("reading the origin's id from the Redis Cluster")?;
                tracing::info!(origin = %RelayId(origin), "an origin front-end");
                Some((frontend::Frontend::new(store, feed), RelayId(origin)))
            }
            _ => None,
        };
        let (remote, origin) = remote.unzip();
        let node_config = NodeConfig {
            store_requests: remote.is_some(),
            origin,
            parent_token: config.parent_token.clone(),
            access,
            max_queue: config.max_queue,
            max_backlog: config.max_backlog,
            ack_before_sync: config.sync_interval_ms.is_some(),
            ..NodeConfig::new(id)
        };
        let has_parent = parent.is_some();
        let (to_node, inbox) = mpsc::channel(INBOX);
        let (stop, stop_rx) = watch::channel(Stop::Running);
        let room = Arc::new(Notify::new());
        let snapshot = Arc::new(Mutex::new(RelayMetrics::default()));
        let parts = ActorParts {
            inbox,
            room: room.clone(),
            stop: stop_rx.clone(),
            snapshot: snapshot.clone(),
            evict_interval: Duration::from_millis(config.evict_interval_ms),
            sync_interval: config.sync_interval_ms.map(Duration::from_millis),
            frontend: remote,
        };
        let shared = Arc::new(Shared { to_node, stop: stop_rx.clone(), room: room.clone(), next_link: AtomicU64::new(1), max_udp_payload: config.max_udp_payload, turns: std::sync::OnceLock::new() });
        let (node_done, plugins) = task_ext::block_in_place_or_run(|| -> anyhow::Result<_> {
            let host = plugin::Host { to_node: shared.to_node.clone(), room: room.clone(), link_id: &|| shared.link_id() };
            let cache = config.plugin_cache.clone().unwrap_or_else(|| config.data.join("plugin-cache"));
            // Plugins start before the node actor; what their `init` sends waits in its inbox.
            Ok(match &config.store {
                StoreKind::Fjall => {
                    let dir = config.data.join("store");
                    let store = FjallStore::open(&dir, config.capacity_bytes)
                        .with_context(|| format!("opening the store in {}", dir.display()))?;
                    let plugins = plugin::start_all(&config.plugins, &cache, &host, |name| {
                        Ok(Box::new(store.plugin_state(name)?) as Box<dyn StateStore>)
                    })?;
                    // Fjall's writes can block on the disk: its turns stay on the node's thread.
                    (actor::spawn(Node::new(node_config, store, has_parent), parts, false)?, plugins)
                }
                // A front-end's (Redis) own store is left with nothing to hold: it has no
                // parent, so no outbox, and its chunks are in Redis. Plugins keep their state in
                // memory.
                StoreKind::Memory | StoreKind::Redis { .. } => {
                    let plugins = plugin::start_all(&config.plugins, &cache, &host, |_| {
                        Ok(Box::new(MemoryState::new()) as Box<dyn StateStore>)
                    })?;
                    let store = MemoryStore::new(config.capacity_bytes);
                    (actor::spawn(Node::new(node_config, store, has_parent), parts, true)?, plugins)
                }
            })
        })?;
        let actor::Started { done: node_done, turns } = node_done;
        if let Some(turns) = turns {
            let _ = shared.turns.set(turns);
        }

        let mut tasks = Vec::new();
        let (mut endpoint, mut socket_released, mut local_addr) = (None, None, None);
        if config.quic_listen {
            let (quic, released) = bind_listener(tls::server_config(&identity, config.max_udp_payload)?, config.listen, config.max_udp_payload)
                .with_context(|| format!("binding {}", config.listen))?;
            local_addr = Some(quic.local_addr()?);
            tasks.push(tokio::spawn(accept_loop(quic.clone(), shared.clone())));
            (endpoint, socket_released) = (Some(quic), Some(released));
        }
        let stream_links = Arc::new(AtomicUsize::new(0));
        let mut tcp_addr = None;
        if let Some(addr) = config.tcp_listen {
            let listener = tcp::bind(addr).await?;
            tcp_addr = Some(listener.local_addr()?);
            let tls = Arc::new(tls::tls_server_config(&identity)?);
            tasks.push(tokio::spawn(tcp::accept_loop(listener, tls, shared.clone(), stream_links.clone())));
        }
        #[cfg(unix)]
        let unix_socket = match &config.unix_listen {
            Some(path) => {
                let (listener, file) = unix::bind(path)?;
                tasks.push(tokio::spawn(unix::accept_loop(listener, shared.clone(), stream_links.clone())));
                Some(file)
            }
            None => None,
        };
        #[cfg(not(unix))]
        if config.unix_listen.is_some() {
            bail!("unix_listen: Unix-domain sockets are not available on this platform");
        }
        if let Some(watchdog) = plugin::watchdog(&plugins, shared.to_node.clone()) {
            tasks.push(tokio::spawn(watchdog));
        }
        if let Some(parent) = parent {
            let refused_backoff = Duration::from_millis(config.parent_refused_backoff_ms);
            tasks.push(tokio::spawn(parent_loop(
                parent,
                refused_backoff,
                shared.clone(),
                stop_rx.clone(),
            )));
        }
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            metrics_addr = Some(listener.local_addr()?);
            let board = plugins.iter().map(|p| p.stats_handle()).collect();
            tasks.push(tokio::spawn(metrics::serve(listener, snapshot.clone(), board, stop_rx.clone())));
        }
        let advertisement = match (config.advertise, local_addr) {
            (true, Some(listen)) => {
                let role = match (config.role, &config.store) {
                    (Some(role), _) => role,
                    (None, StoreKind::Redis { .. }) => RelayRole::OriginFrontend,
                    (None, _) => RelayRole::default_for(has_parent),
                };
                let a = advertise::Announcement { listen, id, role, fingerprint: identity.fingerprint.clone() };
                let advertisement = advertise::Advertisement::start(&a)?;
                if let Some(log) = advertisement.log_events() {
                    tasks.push(tokio::spawn(log));
                }
                Some(advertisement)
            }
            _ => None,
        };
        tracing::info!(%id, listen = ?local_addr, tcp = ?tcp_addr, unix = ?config.unix_listen, cert = %identity.cert_path.display(), fingerprint = %identity.fingerprint, "relay started");
        Ok(RelayHandle {
            local_addr,
            cert_pem: identity.cert_pem,
            cert_path: identity.cert_path,
            fingerprint: identity.fingerprint,
            id,
            endpoint,
            socket_released,
            stop,
            snapshot,
            node_done: Some(node_done),
            tasks,
            metrics_addr,
            plugins,
            #[cfg(unix)]
            unix_socket,
            stream_links,
            tcp_addr,
            advertisement,
        })
    }
}

/// Binds the QUIC listener on a socket that signals when it is finally closed.
fn bind_listener(
    server_config: quinn::ServerConfig,
    addr: SocketAddr,
    max_udp_payload: u16,
) -> anyhow::Result<(quinn::Endpoint, oneshot::Receiver<()>)> {
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let socket = runtime.wrap_udp_socket(canopy_sdk::bind_udp(addr)?)?;
    let (socket, released) = socket::ReleasingSocket::new(socket);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        canopy_sdk::endpoint_config(max_udp_payload),
        Some(server_config),
        socket,
        runtime,
    )?;
    Ok((endpoint, released))
}

mod task_ext {
    //! Blocking work inside async code.
    /// Runs blocking startup work; inside a multi-threaded runtime it tells tokio first.
    pub(crate) fn block_in_place_or_run<R>(f: impl FnOnce() -> R) -> R {
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
            _ => f(),
        }
    }
}

impl RelayHandle {
    /// The address the QUIC listener is bound to (the real port when configured with 0).
    ///
    /// # Panics
    ///
    /// If the relay has no QUIC listener (`quic_listen = false`); see [`quic_addr`](Self::quic_addr).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr.expect("this relay has no QUIC listener (quic_listen = false); use quic_addr()")
    }

    /// The address the QUIC listener is bound to, or `None` if the relay runs without one
    /// (`quic_listen = false`).
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The address the TLS-over-TCP listener is bound to (`tcp_listen`), if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The path of the Unix socket the relay accepts links on (`unix_listen`), if any.
    pub fn unix_path(&self) -> Option<&Path> {
        #[cfg(unix)]
        return self.unix_socket.as_ref().map(unix::SocketFile::path);
        #[cfg(not(unix))]
        None
    }

    /// The relay's certificate in PEM, for clients and children to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Where the certificate PEM is stored (`<data>/cert.pem`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// SHA-256 of the certificate DER, lowercase hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The relay's id.
    pub fn id(&self) -> RelayId {
        self.id
    }

    /// The mDNS instance the relay announces itself as (`advertise`), fully qualified.
    pub fn advertised_instance(&self) -> Option<&str> {
        self.advertisement.as_ref().map(advertise::Advertisement::instance)
    }

    /// The bound address of the metrics endpoint, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The counters as of the node actor's last turn. They are published before the turn's
    /// deliveries and acks leave, so a chunk anyone has received or had acked is counted.
    pub fn metrics(&self) -> RelayMetrics {
        *self.snapshot.lock().expect("metrics lock")
    }

    /// The counters of the plugin called `name`.
    pub fn plugin_stats(&self, name: &str) -> Option<PluginStats> {
        self.plugins.iter().find(|p| p.name == name).map(|p| p.stats())
    }

    /// Testing aid: hands the next `chunks` chunks (at most 256) delivered to the plugin called
    /// `name` to it in one `on-chunks` call, however they arrive, so that a test can make a
    /// batch of its choosing. Returns false if there is no such plugin.
    #[doc(hidden)]
    pub fn plugin_hold_chunks(&self, name: &str, chunks: usize) -> bool {
        self.plugins.iter().find(|p| p.name == name).map(|p| p.hold_chunks(chunks)).is_some()
    }

    /// Runs a command on the plugin called `name` (its `on-command`), returning its answer.
    /// Fails if there is no such plugin, or it failed or is quarantined.
    pub async fn plugin_command(&self, name: &str, args: &[&str]) -> anyhow::Result<Result<String, String>> {
        let plugin = self.plugins.iter().find(|p| p.name == name).with_context(|| format!("no plugin called {name:?}"))?;
        plugin.command(args.iter().map(|a| (*a).to_owned()).collect()).await
    }

    /// Stops gracefully: flushes the store, sends what is queued and closes every link,
    /// stops listening, and returns once the store is closed, the UDP port released (so
    /// a new relay, or anything else, can bind it right away) and the Unix socket file
    /// removed.
    pub async fn shutdown(mut self) {
        self.stop_with(Stop::Graceful).await;
    }

    /// Stops abruptly: no final flush and no goodbyes to peers (everything acknowledged is
    /// already durable). Returns once the store is closed, the port released and the Unix
    /// socket file removed.
    pub async fn kill(mut self) {
        self.stop_with(Stop::Kill).await;
    }

    async fn stop_with(&mut self, how: Stop) {
        // Withdrawn first, so browsers stop offering a relay that is going away.
        if let Some(advertisement) = self.advertisement.take() {
            advertisement.stop().await;
        }
        let _ = self.stop.send(how);
        let mut plugins = std::mem::take(&mut self.plugins);
        let _ = tokio::task::spawn_blocking(move || {
            for p in &mut plugins {
                p.stop();
            }
        })
        .await;
        if let Some(done) = self.node_done.take() {
            let _ = done.await;
        }
        if how == Stop::Graceful {
            // Let writers send the last frames and close their links.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.endpoint.as_ref().is_some_and(|e| e.open_connections() > 0)
                    || self.stream_links.load(Ordering::Relaxed) > 0
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(quinn::VarInt::from_u32(0), b"relay stopping");
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        // The accept loop is gone (and with it the listener): nothing can connect any more.
        #[cfg(unix)]
        drop(self.unix_socket.take());
        let Some(endpoint) = self.endpoint.take() else { return };
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        // The socket closes once the endpoint, its driver and every connection have let go;
        // connection tasks end soon after the close above.
        drop(endpoint);
        if let Some(released) = self.socket_released.take()
            && tokio::time::timeout(RELEASE_TIMEOUT, released).await.is_err()
        {
            tracing::error!(listen = ?self.local_addr, "the UDP socket is still open {RELEASE_TIMEOUT:?} after stopping");
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if self.node_done.is_some() {
            let _ = self.stop.send(Stop::Kill);
            if let Some(endpoint) = &self.endpoint {
                endpoint.close(quinn::VarInt::from_u32(0), b"relay stopping");
            }
            for task in &self.tasks {
                task.abort();
            }
        }
        // (The Unix socket file, if still there, is removed as its field drops.)
    }
}

/// The relay id: from the config, else from `<data>/relay-id`, else a new random one
/// written there.
fn load_or_create_id(data: &Path, configured: Option<&str>) -> anyhow::Result<RelayId> {
    if let Some(text) = configured {
        return config::parse_relay_id(text);
    }
    let path = data.join("relay-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => config::parse_relay_id(&text).with_context(|| format!("reading {}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let id = RelayId(rand::random::<u128>());
            std::fs::write(&path, format!("{id}\n")).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(err) = serve_connection(incoming, shared).await {
                tracing::debug!(%remote, "connection ended: {err:#}");
            }
        });
    }
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) -> anyhow::Result<()> {
    let conn = incoming.await.context("handshake")?;
    let (send, recv) = tokio::time::timeout(STREAM_OPEN_TIMEOUT, conn.accept_bi())
        .await
        .context("no control stream opened in time")?
        .context("accepting the control stream")?;
    let link = shared.link_id();
    tracing::debug!(link, remote = %conn.remote_address(), "link opened");
    run_quic_link(link, conn, send, recv, &shared, false, shared.stop.clone()).await
}

/// Registers a link with the node, runs its writer and reader, and tells the node when it
/// ends.
async fn run_link<R, W>(
    link: LinkId,
    recv: R,
    send: W,
    shared: &Shared,
    parent: bool,
    stop: watch::Receiver<Stop>,
) -> anyhow::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: LinkSend,
{
    let out = LinkOut::new();
    out.sent_to_inbox();
    let msg = if parent {
        ToNode::ParentConnected { link, out: out.clone() }
    } else {
        ToNode::Accepted { link, out: out.clone() }
    };
    if shared.to_node.send(msg).await.is_err() {
        bail!("relay stopping");
    }
    // Aborted with this task: a relay that stops aborts the tasks of its TCP and Unix links
    // (their accept loops hold them), and the writer goes with them.
    let mut writer = AbortOnDrop(tokio::spawn(link::writer(send, out.clone(), shared.room.clone())));
    // The parent is always read: pausing both ends of a relay link on full writers could
    // stall them on each other (the routing core bounds what it sends the parent).
    // The parent's frames always go to the node's thread.
    let inline = if parent { None } else { shared.turns.get().map(|turns| link::Inline { turns: turns.clone(), room: shared.room.clone() }) };
    let reading = link::reader(recv, link, shared.to_node.clone(), inline, out.clone(), stop, !parent);
    tokio::pin!(reading);
    let writer_done = tokio::select! {
        () = &mut reading => false,
        _ = &mut writer.0 => true,
    };
    if writer_done {
        // This side ended the link: its last frames are sent and its stream finished. Closing a
        // QUIC connection ends the reader too; a byte stream (TCP, Unix) is only half closed, so
        // read on until the peer closes its end, LINGER at most: the peer gets the last frames
        // rather than a reset, and a peer that never closes does not keep the link open.
        let _ = tokio::time::timeout(link::LINGER, &mut reading).await;
    }
    if shared.to_node.send(ToNode::Closed { link }).await.is_err() {
        // The node is gone (the relay is being killed): it will never close the writer.
        out.close(Vec::new(), link::NORMAL);
    }
    if !writer_done {
        let _ = (&mut writer.0).await;
    }
    Ok(())
}

/// A task aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a QUIC link on its control stream, then closes the connection.
async fn run_quic_link(
    link: LinkId,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    shared: &Shared,
    parent: bool,
    stop: watch::Receiver<Stop>,
) -> anyhow::Result<()> {
    let result = run_link(link, recv, QuicSend { send, conn: conn.clone() }, shared, parent, stop).await;
    let stats = conn.stats();
    tracing::debug!(link, path_mtu = stats.path.current_mtu, packets_sent = stats.path.sent_packets, packets_lost = stats.path.lost_packets, "link stats");
    conn.close(quinn::VarInt::from_u32(0), b"closed");
    result
}

/// Keeps the parent link up: reconnects with capped exponential backoff after a lost or
/// failed connection, and after a refusal (a wrong token, a cycle, another protocol
/// version) waits `refused_backoff`, logging the parent's reason once rather than on every
/// attempt.
async fn parent_loop(
    target: ParentTarget,
    refused_backoff: Duration,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut last_refusal: Option<ParentRefusal> = None;
    let parent = target.to_string();
    loop {
        let started = Instant::now();
        let wait = match parent_session(&target, &shared).await {
            Ok(Some(refusal)) => {
                let ParentRefusal { code, message, by_parent } = &refusal;
                let who = if *by_parent { "the parent refused this relay" } else { "this relay refused the parent" };
                if last_refusal.as_ref() != Some(&refusal) {
                    tracing::error!(%parent, %code, "{who}: {message}; trying again every {refused_backoff:?}");
                } else {
                    tracing::debug!(%parent, %code, "{who} again: {message}");
                }
                last_refusal = Some(refusal);
                backoff = BACKOFF_MIN;
                refused_backoff
            }
            result => {
                match result {
                    Ok(_) => tracing::warn!(%parent, "lost the parent; reconnecting"),
                    Err(err) => tracing::warn!(%parent, "cannot reach the parent: {err:#}"),
                }
                if started.elapsed() >= STABLE_SESSION {
                    backoff = BACKOFF_MIN;
                }
                let wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        if *stop.borrow() != Stop::Running {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Where the parent is: one address, or a domain's origin service found by DNS on every
/// (re)connect, whose candidates are tried in SRV order.
enum ParentTarget {
    /// `HOST:PORT`, or several (`HOST:PORT,HOST:PORT,…`: an origin's front-ends, tried in
    /// order on every reconnect), trusted as configured.
    Addr {
        /// The addresses.
        addrs: Vec<String>,
        /// Its QUIC/TLS configuration.
        config: quinn::ClientConfig,
    },
    /// `dns:DOMAIN`.
    Dns {
        /// The domain.
        domain: String,
        /// What trusts a candidate.
        trust: canopy_sdk::discovery::TrustConfig,
        /// How to ask DNS.
        dns: canopy_sdk::discovery::DnsOptions,
        /// Path-MTU discovery's upper bound for the connections to the candidates.
        max_udp_payload: u16,
    },
}

impl std::fmt::Display for ParentTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParentTarget::Addr { addrs, .. } => f.write_str(&addrs.join(",")),
            ParentTarget::Dns { domain, .. } => write!(f, "dns:{domain}"),
        }
    }
}

/// One parent to try: what to call it, its address, the name its certificate carries, and
/// how to trust it.
struct ParentCandidate {
    label: String,
    addr: String,
    server_name: String,
    config: quinn::ClientConfig,
}

impl ParentTarget {
    /// The candidates for one attempt, best first. Only the origin service is asked for a
    /// domain, so a cloud relay never picks itself or a sibling; an untrusted candidate is
    /// left out (and said why).
    async fn candidates(&self) -> anyhow::Result<Vec<ParentCandidate>> {
        match self {
            ParentTarget::Addr { addrs, config } => Ok(addrs
                .iter()
                .map(|addr| {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    ParentCandidate { label: addr.clone(), addr: addr.clone(), server_name: host.to_string(), config: config.clone() }
                })
                .collect()),
            ParentTarget::Dns { domain, trust, dns, max_udp_payload } => {
                let found = canopy_sdk::discovery::lookup(domain, canopy_sdk::discovery::Service::Origin, dns).await?;
                let mut out = Vec::new();
                let mut untrusted = Vec::new();
                for f in found {
                    match canopy_sdk::discovery::trust_for(&f, trust) {
                        Ok((t, server_name)) => {
                            out.push(ParentCandidate { label: f.to_string(), addr: f.addr.to_string(), server_name, config: canopy_sdk::quic_client_config_with_mtu(&t, *max_udp_payload)? })
                        }
                        Err(e) => untrusted.push(e.to_string()),
                    }
                }
                if out.is_empty() {
                    bail!("{}", untrusted.join("; "));
                }
                Ok(out)
            }
        }
    }
}

/// One connection to the parent, from connecting until it is lost; `Some` when it ended in a
/// refusal. The candidates are tried in order; the first that completes the handshake is the
/// parent for this session.
async fn parent_session(target: &ParentTarget, shared: &Shared) -> anyhow::Result<Option<ParentRefusal>> {
    let mut failures = Vec::new();
    for candidate in target.candidates().await? {
        match connect_parent(&candidate, shared).await {
            Ok((endpoint, conn, send, recv)) => {
                tracing::info!(parent = %candidate.label, "connected to the parent");
                let result = async {
                    let link = shared.link_id();
                    run_quic_link(link, conn, send, recv, shared, true, shared.stop.clone()).await?;
                    // Asked after `Closed`, so the node has handled every frame of this link.
                    let (reply, refusal) = oneshot::channel();
                    shared.to_node.send(ToNode::ParentEnded { link, reply }).await.context("relay stopping")?;
                    refusal.await.context("relay stopping")
                }
                .await;
                endpoint.close(quinn::VarInt::from_u32(0), b"bye");
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                return result;
            }
            Err(e) => failures.push(format!("{}: {e:#}", candidate.label)),
        }
        if *shared.stop.borrow() != Stop::Running {
            bail!("relay stopping");
        }
    }
    bail!("{}", failures.join("; "))
}

/// The handshake with one candidate parent, bounded by [`CONNECT_TIMEOUT`].
async fn connect_parent(
    candidate: &ParentCandidate,
    shared: &Shared,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let addr = tokio::net::lookup_host(candidate.addr.as_str())
        .await
        .with_context(|| format!("resolving {}", candidate.addr))?
        .next()
        .with_context(|| format!("{} resolves to no address", candidate.addr))?;
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    // The endpoint accepts what the candidate's transport probes for (the SDK's default, or
    // the relay's `max_udp_payload`, whichever is larger).
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let socket = canopy_sdk::bind_udp(bind).context("binding a client socket")?;
    let endpoint = quinn::Endpoint::new(canopy_sdk::endpoint_config(shared.max_udp_payload), None, socket, runtime)
        .context("binding a client socket")?;
    let mut stop = shared.stop.clone();
    let result = async {
        let connecting = endpoint.connect_with(candidate.config.clone(), addr, &candidate.server_name)?;
        tokio::select! {
            _ = stop.changed() => bail!("relay stopping"),
            result = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let conn = connecting.await.context("handshake")?;
                let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
                anyhow::Ok((conn, send, recv))
            }) => result.context("timed out")?,
        }
    }
    .await;
    match result {
        Ok((conn, send, recv)) => Ok((endpoint, conn, send, recv)),
        Err(e) => {
            endpoint.close(quinn::VarInt::from_u32(0), b"bye");
            Err(e)
        }
    }
}
