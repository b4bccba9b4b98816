//! Messaging throughput and latency, side by side: Canopy's relay against nats-server and
//! mosquitto, all with TLS, all driven by Rust clients from this one process.
//!
//! ```text
//! bash scripts/install-peers.sh && cargo run --release -p canopy-benches --bin pubsub-bench
//! cargo run --release -p canopy-benches --bin pubsub-bench -- --smoke   # Canopy only, 200 chunks
//! ```
//!
//! For each system and each fan-out (1 and 10 subscribers) a fresh server process is started
//! on a free loopback port; one publisher and N subscribers connect (each its own
//! connection), subscribe and wait until the server has confirmed the subscription. The
//! publisher sends a warm-up (`--warmup`, not measured), waits until every subscriber has
//! it, then sends `--messages` payloads of 1 KiB. Each payload carries its sequence number and
//! its send time (ns since an `Instant` shared by every client), so each subscriber measures
//! publish→receive latency. Systems and semantics:
//!
//! - `canopy-memory`, `canopy-fjall`: the `canopy-relay` binary with `--store memory` or the
//!   default durable fjall store. `Client::publish` resolves on the relay's `Ack`, which for
//!   fjall comes after the batch's fsync; at most `--window` (256) publishes are outstanding.
//!   The relay's per-subscriber queue bound `max_queue` is raised from its default of 1024
//!   frames to 65 536 (`--relay-max-queue`), about nats-server's 64 MiB per-connection
//!   pending limit in 1 KiB messages: none of the three pushes back from subscribers to the
//!   publisher, and with 1024 a subscriber that falls 1024 chunks behind a full-speed
//!   publisher is ended as a slow consumer.
//! - `nats`: nats-server core publish, fire and forget (the client's buffer is the only
//!   back-pressure), one `flush` (PING/PONG) at the end.
//! - `nats-flush`: the same with a `flush` after every `--window` publishes: the publisher
//!   knows the server has processed each batch before sending the next.
//! - `mosquitto`: MQTT 3.1.1, publish at QoS 1 (each `PUBACK`ed by the broker, at most
//!   `--window` in flight); subscribers subscribe at QoS 0, so delivery to them is, like
//!   Canopy's, a reliable stream without per-message acknowledgements. `TCP_NODELAY` is on at
//!   both ends (`set_tcp_nodelay true`), as nats-server and async-nats have it by default.
//!
//! Every server process is killed when its run ends, also on error; every phase has a
//! timeout.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use canopy_sdk::{Chunk, Client, ConnectOptions, Filter, Name, ReplayMode, SubEvent, Subscription, Trust};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Size of every payload, as in the issue: 1 KiB chunks.
const PAYLOAD: usize = 1024;
/// NATS subject and MQTT topic.
const SUBJECT: &str = "bench.data";
const TOPIC: &str = "bench/data";
/// The names Canopy publishes under (`0x0b…/8`); the sequence number is the low bits.
const NAME_BASE: u128 = 0x0b << 120;
/// Connecting, subscribing, starting a server.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Warm-up publish and its delivery.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// After the publisher is done: the subscribers' last deliveries.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    CanopyMemory,
    CanopyFjall,
    Nats,
    NatsFlush,
    Mosquitto,
}

impl System {
    const ALL: [System; 5] =
        [System::CanopyMemory, System::CanopyFjall, System::Nats, System::NatsFlush, System::Mosquitto];

    fn label(self) -> &'static str {
        match self {
            System::CanopyMemory => "canopy-memory",
            System::CanopyFjall => "canopy-fjall",
            System::Nats => "nats",
            System::NatsFlush => "nats-flush",
            System::Mosquitto => "mosquitto",
        }
    }

    fn is_canopy(self) -> bool {
        matches!(self, System::CanopyMemory | System::CanopyFjall)
    }
}

#[derive(Debug, Clone)]
struct Args {
    messages: u64,
    warmup: u64,
    window: usize,
    fanouts: Vec<usize>,
    systems: Vec<System>,
    relay: Option<PathBuf>,
    /// The relay's per-link queue bound (`max_queue`, frames).
    relay_max_queue: usize,
    publish_timeout: Duration,
    /// Payloads per second of the paced (latency) pass; 0 skips it.
    paced_rate: u64,
    paced_messages: u64,
    /// Each configuration runs this many times (interleaved); the table shows medians.
    rounds: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        messages: 20_000,
        warmup: 2_000,
        window: 256,
        fanouts: vec![1, 10],
        systems: System::ALL.to_vec(),
        relay: None,
        relay_max_queue: 65_536,
        publish_timeout: Duration::from_secs(300),
        paced_rate: 1_000,
        paced_messages: 2_000,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--smoke" => {
                args.messages = 200;
                args.warmup = 50;
                args.systems = vec![System::CanopyMemory, System::CanopyFjall];
                args.publish_timeout = Duration::from_secs(30);
                args.paced_rate = 1_000;
                args.paced_messages = 100;
                args.rounds = 1;
            }
            "--messages" => args.messages = value()?.parse()?,
            "--warmup" => args.warmup = value()?.parse()?,
            "--window" => args.window = value()?.parse()?,
            "--fanout" => args.fanouts = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--systems" => {
                args.systems = value()?
                    .split(',')
                    .map(|s| {
                        System::ALL
                            .into_iter()
                            .find(|sys| sys.label() == s)
                            .ok_or_else(|| anyhow!("unknown system {s:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--relay" => args.relay = Some(value()?.into()),
            "--relay-max-queue" => args.relay_max_queue = value()?.parse()?,
            "--paced-rate" => args.paced_rate = value()?.parse()?,
            "--paced-messages" => args.paced_messages = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--publish-timeout" => args.publish_timeout = Duration::from_secs(value()?.parse()?),
            "-h" | "--help" => {
                println!(
                    "pubsub-bench [--smoke] [--messages N] [--warmup N] [--window N] [--fanout 1,10]\n\
                     \x20            [--systems canopy-memory,canopy-fjall,nats,nats-flush,mosquitto]\n\
                     \x20            [--relay PATH-TO-canopy-relay] [--relay-max-queue FRAMES] [--publish-timeout SECS]\n\
                     \x20            [--paced-rate PER-SEC (0: skip)] [--paced-messages N] [--rounds N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(
        args.messages > 0 && args.window > 0 && args.rounds > 0 && args.paced_messages > 0,
        "--messages, --paced-messages, --window and --rounds must be positive"
    );
    ensure!(args.window <= u16::MAX as usize, "--window must fit MQTT's 16-bit packet ids");
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Server processes

/// A server child process, killed (and reaped) when dropped.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Server> {
        let log_file = std::fs::File::create(&log)?;
        let child = cmd.stdin(Stdio::null()).stderr(log_file).spawn().with_context(|| {
            format!("starting {name} (for nats-server and mosquitto: bash scripts/install-peers.sh)")
        })?;
        Ok(Server { name, child, log })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status}); log:\n{}", self.name, self.log_tail())),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until the server accepts TCP connections on `port`.
    fn wait_tcp(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(why) = self.exited() {
                bail!(why);
            }
            ensure!(Instant::now() < deadline, "{} did not listen on {addr} within {SETUP_TIMEOUT:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set of the server process, in bytes.
    fn resident_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.child.id())).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    /// User + system CPU time the server has used so far, in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let after_comm = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer's executable: on `PATH`, else in `/usr/sbin` (where Debian installs both, and which
/// is not on every user's `PATH`).
fn peer_binary(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()));
    if !on_path && sbin.is_file() { sbin } else { PathBuf::from(name) }
}

/// User + system CPU seconds of this process (all the clients).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rfind(')').map_or(vec![], |i| stat[i + 2..].split_whitespace().collect());
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// A free loopback TCP port (bound, then released for the server to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `canopy-relay` binary: `--relay`, else next to this executable, built first when run
/// through cargo so it is never stale.
fn relay_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.relay {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable directory")?;
    let path = dir.join("canopy-relay");
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "canopy-relay", "--bin", "canopy-relay"]);
        // Drop what `cargo run` set for this package: build scripts that watch these (ring
        // watches CARGO_MANIFEST_DIR) would otherwise rebuild on every alternation between
        // this build and the outer one.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => {}
        }
        let status = cmd.status().context("building canopy-relay")?;
        ensure!(status.success(), "building canopy-relay failed");
    }
    ensure!(
        path.exists(),
        "{} not found: build it (cargo build --release -p canopy-relay) or pass --relay",
        path.display()
    );
    Ok(path)
}

struct Started {
    server: Server,
    /// `host:port` to connect to.
    addr: String,
    /// PEM of the certificate to trust.
    ca_pem: String,
}

fn start_relay(relay: &Path, store: &str, max_queue: usize, dir: &Path) -> anyhow::Result<Started> {
    let data = dir.join("relay-data");
    let mut cmd = Command::new(relay);
    cmd.args(["--listen", "127.0.0.1:0", "--store", store, "--data"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .env("CANOPY_MAX_QUEUE", max_queue.to_string())
        .stdout(Stdio::piped());
    let mut server = Server::spawn("canopy-relay", &mut cmd, dir.join("relay.log"))?;
    let stdout = server.child.stdout.take().context("relay stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = match rx.recv_timeout(SETUP_TIMEOUT) {
        Ok(addr) => addr,
        Err(_) => bail!(server.exited().unwrap_or_else(|| "canopy-relay printed no `listening on` line".into())),
    };
    let ca_path = data.join("cert.pem");
    let ca_pem = std::fs::read_to_string(&ca_path).context("relay cert.pem")?;
    Ok(Started { server, addr, ca_pem })
}

/// The self-signed certificate nats-server and mosquitto serve (SANs localhost, 127.0.0.1).
struct PeerCert {
    cert: PathBuf,
    key: PathBuf,
    pem: String,
}

fn peer_cert(dir: &Path) -> anyhow::Result<PeerCert> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let cert = dir.join("peer-cert.pem");
    let key = dir.join("peer-key.pem");
    let pem = certified.cert.pem();
    std::fs::write(&cert, &pem)?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    Ok(PeerCert { cert, key, pem })
}

fn start_nats(dir: &Path, tls: &PeerCert) -> anyhow::Result<Started> {
    let port = free_port()?;
    let conf = dir.join("nats.conf");
    let mut f = std::fs::File::create(&conf)?;
    writeln!(f, "listen: 127.0.0.1:{port}")?;
    writeln!(f, "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}", tls.cert, tls.key)?;
    drop(f);
    let mut cmd = Command::new(peer_binary("nats-server"));
    cmd.arg("-c").arg(&conf).stdout(Stdio::null());
    let mut server = Server::spawn("nats-server", &mut cmd, dir.join("nats.log"))?;
    server.wait_tcp(port)?;
    Ok(Started { server, addr: format!("tls://127.0.0.1:{port}"), ca_pem: tls.pem.clone() })
}

fn start_mosquitto(dir: &Path, tls: &PeerCert) -> anyhow::Result<Started> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    let mut f = std::fs::File::create(&conf)?;
    writeln!(f, "listener {port} 127.0.0.1")?;
    writeln!(f, "certfile {}", tls.cert.display())?;
    writeln!(f, "keyfile {}", tls.key.display())?;
    writeln!(f, "allow_anonymous true")?;
    writeln!(f, "persistence false")?;
    writeln!(f, "set_tcp_nodelay true")?;
    // When started as root, stay root: the dropped-to `mosquitto` user could not read the
    // key in this private temporary directory. (Ignored when not root.)
    writeln!(f, "user root")?;
    writeln!(f, "log_dest stderr")?;
    writeln!(f, "log_type error")?;
    writeln!(f, "log_type warning")?;
    drop(f);
    let mut cmd = Command::new(peer_binary("mosquitto"));
    cmd.arg("-c").arg(&conf).stdout(Stdio::null());
    let mut server = Server::spawn("mosquitto", &mut cmd, dir.join("mosquitto.log"))?;
    server.wait_tcp(port)?;
    Ok(Started { server, addr: format!("127.0.0.1:{port}"), ca_pem: tls.pem.clone() })
}

// ---------------------------------------------------------------------------------------------
// Payloads and measurements

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// 1 KiB: sequence number, send time (ns since `epoch`), zero filler.
fn payload(seq: u64, epoch: Instant) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD);
    b.put_u64_le(seq);
    b.put_u64_le(now_ns(epoch));
    b.resize(PAYLOAD, 0);
    b.freeze()
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Received {
    /// Latencies of the measured (post-warm-up) deliveries, ns.
    latencies: Vec<u64>,
    /// Time of the last measured delivery, ns since the epoch.
    last_ns: u64,
    /// Deliveries, warm-up included.
    total: u64,
    /// Why the subscription ended early, if it did.
    error: Option<String>,
}

struct Recorder {
    epoch: Instant,
    warmup: u64,
    expected: u64,
    progress: Arc<AtomicU64>,
    got: Received,
}

impl Recorder {
    /// Records one delivery; true once every expected payload has arrived.
    fn on(&mut self, data: &[u8]) -> bool {
        let now = now_ns(self.epoch);
        if data.len() >= 16 {
            let seq = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
            let sent = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
            if seq >= self.warmup {
                self.got.latencies.push(now.saturating_sub(sent));
                self.got.last_ns = now;
            }
        }
        self.got.total += 1;
        self.progress.store(self.got.total, Ordering::Release);
        self.got.total >= self.expected
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn rustls_config(ca_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

async fn canopy_client(s: &Started) -> anyhow::Result<Client> {
    let mut opts = ConnectOptions::new(&s.addr, Trust::CaPem(s.ca_pem.clone()));
    // Like async-nats's default per-subscription capacity (64 Ki messages).
    opts.subscription_buffer = 65_536;
    Ok(Client::connect(opts).await?)
}

async fn nats_client(s: &Started) -> anyhow::Result<async_nats::Client> {
    Ok(async_nats::ConnectOptions::new()
        .require_tls(true)
        .tls_client_config(rustls_config(&s.ca_pem)?)
        .connect(s.addr.as_str())
        .await?)
}

fn mqtt_client(s: &Started, id: String, inflight: u16) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let (host, port) = s.addr.rsplit_once(':').context("mqtt address")?;
    let mut opts = rumqttc::MqttOptions::new(id, host, port.parse()?);
    opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
        rustls_config(&s.ca_pem)?,
    ))));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_inflight(inflight);
    opts.set_clean_session(true);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, usize::from(inflight).max(64));
    // Nagle off, as async-nats and nats-server (Go's default) have it.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    Ok((client, events))
}

/// A connected subscriber whose subscription the server has confirmed.
enum Sub {
    Canopy(Client, Subscription),
    Nats(async_nats::Client, async_nats::Subscriber),
    Mqtt(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

async fn subscriber(system: System, s: &Started, index: usize) -> anyhow::Result<Sub> {
    match system {
        System::CanopyMemory | System::CanopyFjall => {
            let client = canopy_client(s).await?;
            let filter = Filter::new(Name::new(NAME_BASE), 8)?;
            let mut sub = client.subscribe(filter, ReplayMode::LiveOnly).await?;
            match sub.next().await {
                Some(SubEvent::ReplayDone) => Ok(Sub::Canopy(client, sub)),
                other => bail!("canopy subscription not confirmed: {other:?}"),
            }
        }
        System::Nats | System::NatsFlush => {
            let client = nats_client(s).await?;
            let sub = client.subscribe(SUBJECT).await?;
            client.flush().await?; // the server has processed the SUB
            Ok(Sub::Nats(client, sub))
        }
        System::Mosquitto => {
            let (client, mut events) = mqtt_client(s, format!("bench-sub-{index}"), 100)?;
            client.subscribe(TOPIC, rumqttc::QoS::AtMostOnce).await?;
            loop {
                match events.poll().await? {
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        return Ok(Sub::Mqtt(client, Box::new(events)));
                    }
                    _ => continue,
                }
            }
        }
    }
}

/// Receives until every expected payload arrived, the subscription fails, or `stop`.
async fn receive(sub: Sub, mut rec: Recorder, mut stop: watch::Receiver<bool>) -> Received {
    match sub {
        Sub::Canopy(_client, mut sub) => loop {
            tokio::select! {
                event = sub.next() => match event {
                    Some(SubEvent::Chunk(chunk)) => if rec.on(chunk.data()) { break },
                    Some(SubEvent::ReplayDone | SubEvent::Gap) => {}
                    Some(SubEvent::Error { code, message }) => { rec.got.error = Some(format!("{code}: {message}")); break }
                    None => { rec.got.error = Some("subscription closed".into()); break }
                },
                _ = stop.changed() => break,
            }
        },
        Sub::Nats(_client, mut sub) => loop {
            tokio::select! {
                msg = sub.next() => match msg {
                    Some(msg) => if rec.on(&msg.payload) { break },
                    None => { rec.got.error = Some("subscription closed".into()); break }
                },
                _ = stop.changed() => break,
            }
        },
        Sub::Mqtt(_client, mut events) => loop {
            tokio::select! {
                event = events.poll() => match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => if rec.on(&p.payload) { break },
                    Ok(_) => {}
                    Err(e) => { rec.got.error = Some(e.to_string()); break }
                },
                _ = stop.changed() => break,
            }
        },
    }
    rec.got
}

/// The publishing side of one system.
enum Publisher {
    Canopy(Client),
    Nats { client: async_nats::Client, flush_every: Option<u64> },
    Mqtt { client: rumqttc::AsyncClient, acks: Arc<AtomicU64>, acked: Arc<Notify>, driver: JoinHandle<()> },
}

impl Publisher {
    async fn connect(system: System, s: &Started, window: usize) -> anyhow::Result<Publisher> {
        Ok(match system {
            System::CanopyMemory | System::CanopyFjall => Publisher::Canopy(canopy_client(s).await?),
            System::Nats => Publisher::Nats { client: nats_client(s).await?, flush_every: None },
            System::NatsFlush => Publisher::Nats { client: nats_client(s).await?, flush_every: Some(window as u64) },
            System::Mosquitto => {
                let (client, mut events) = mqtt_client(s, "bench-pub".into(), window as u16)?;
                let acks = Arc::new(AtomicU64::new(0));
                let acked = Arc::new(Notify::new());
                let (a, n) = (acks.clone(), acked.clone());
                let (up_tx, up_rx) = tokio::sync::oneshot::channel();
                let mut up_tx = Some(up_tx);
                let driver = tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                                if let Some(tx) = up_tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                                a.fetch_add(1, Ordering::AcqRel);
                                n.notify_one();
                            }
                            Ok(_) => {}
                            Err(e) => {
                                eprintln!("mqtt publisher: {e}");
                                a.store(u64::MAX, Ordering::Release);
                                n.notify_one();
                                return;
                            }
                        }
                    }
                });
                tokio::time::timeout(SETUP_TIMEOUT, up_rx).await.context("mqtt connack")?.context("mqtt connack")?;
                Publisher::Mqtt { client, acks, acked, driver }
            }
        })
    }

    /// Publishes `seqs` and returns once they are acknowledged (acked systems) or flushed.
    /// With `rate`, payload `i` of the range is sent no earlier than `i / rate` after the start.
    async fn publish(
        &self,
        seqs: std::ops::Range<u64>,
        epoch: Instant,
        window: usize,
        rate: Option<u64>,
    ) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        let first = seqs.start;
        let due = |seq: u64| {
            rate.map(|r| start + Duration::from_nanos((seq - first).saturating_mul(1_000_000_000) / r.max(1)))
        };
        match self {
            Publisher::Canopy(client) => {
                let expiry = canopy_sdk::now_ms() + 3_600_000;
                let mut inflight = FuturesUnordered::new();
                for seq in seqs {
                    if inflight.len() >= window {
                        inflight.next().await.expect("non-empty")?;
                    }
                    if let Some(due) = due(seq) {
                        // Keep the outstanding publishes moving while waiting.
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep_until(due) => break,
                                Some(answer) = inflight.next(), if !inflight.is_empty() => answer?,
                            }
                        }
                    }
                    let chunk = Chunk::new(Name::new(NAME_BASE | u128::from(seq)), expiry, payload(seq, epoch))?;
                    inflight.push(client.publish(chunk));
                }
                while let Some(answer) = inflight.next().await {
                    answer?;
                }
            }
            Publisher::Nats { client, flush_every } => {
                for seq in seqs {
                    if let Some(due) = due(seq) {
                        tokio::time::sleep_until(due).await;
                    }
                    client.publish(SUBJECT, payload(seq, epoch)).await?;
                    if flush_every.is_some_and(|k| (seq + 1) % k == 0) {
                        client.flush().await?;
                    }
                }
                client.flush().await?;
            }
            Publisher::Mqtt { client, acks, acked, .. } => {
                let end = seqs.end;
                for seq in seqs {
                    if let Some(due) = due(seq) {
                        tokio::time::sleep_until(due).await;
                    }
                    client.publish_bytes(TOPIC, rumqttc::QoS::AtLeastOnce, false, payload(seq, epoch)).await?;
                }
                loop {
                    let notified = acked.notified();
                    match acks.load(Ordering::Acquire) {
                        u64::MAX => bail!("mqtt publisher connection failed"),
                        n if n >= end => break,
                        _ => notified.await,
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Publisher::Mqtt { driver, .. } = self {
            driver.abort();
        }
    }
}

/// The two passes: as fast as the window allows, and paced at a fixed rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Throughput,
    Paced(u64),
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Row {
    /// Measured payloads per second the publisher got acknowledged (or flushed).
    publish_rate: f64,
    /// Measured deliveries per second, mean over subscribers.
    per_sub_rate: f64,
    /// All subscribers' measured deliveries per second.
    total_rate: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Measured payloads that did not arrive, summed over subscribers.
    missing: u64,
    /// Server CPU (user + system) per measured payload published, µs.
    server_us_per_msg: f64,
    /// Client-side CPU (this process: publisher and subscribers) per measured payload, µs.
    client_us_per_msg: f64,
    /// Server resident set at the end, MiB.
    server_rss_mib: f64,
    errors: Vec<String>,
}

async fn run_one(system: System, n_subs: usize, pass: Pass, args: &Args, relay: Option<&Path>) -> anyhow::Result<Row> {
    let (messages, rate) = match pass {
        Pass::Throughput => (args.messages, None),
        Pass::Paced(rate) => (args.paced_messages, Some(rate)),
    };
    let dir = tempfile::tempdir()?;
    let started = match system {
        System::CanopyMemory => {
            start_relay(relay.context("relay binary")?, "memory", args.relay_max_queue, dir.path())?
        }
        System::CanopyFjall => start_relay(relay.context("relay binary")?, "fjall", args.relay_max_queue, dir.path())?,
        System::Nats | System::NatsFlush => start_nats(dir.path(), &peer_cert(dir.path())?)?,
        System::Mosquitto => start_mosquitto(dir.path(), &peer_cert(dir.path())?)?,
    };
    let epoch = Instant::now();
    let expected = args.warmup + messages;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut progress = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n_subs {
        let sub = tokio::time::timeout(SETUP_TIMEOUT, subscriber(system, &started, i))
            .await
            .context("subscribe timed out")??;
        let p = Arc::new(AtomicU64::new(0));
        progress.push(p.clone());
        let rec = Recorder { epoch, warmup: args.warmup, expected, progress: p, got: Received::default() };
        tasks.push(tokio::spawn(receive(sub, rec, stop_rx.clone())));
    }
    let publisher = tokio::time::timeout(SETUP_TIMEOUT, Publisher::connect(system, &started, args.window))
        .await
        .context("publisher connect timed out")??;

    // Warm-up: connections, TLS sessions, allocators and caches; not measured.
    tokio::time::timeout(WARMUP_TIMEOUT, async {
        publisher.publish(0..args.warmup, epoch, args.window, None).await?;
        while progress.iter().any(|p| p.load(Ordering::Acquire) < args.warmup) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(())
    })
    .await
    .context("warm-up timed out")??;

    let server_cpu_before = started.server.cpu_seconds().unwrap_or(0.0);
    let client_cpu_before = own_cpu_seconds();
    let t0 = now_ns(epoch);
    tokio::time::timeout(args.publish_timeout, publisher.publish(args.warmup..expected, epoch, args.window, rate))
        .await
        .context("publishing timed out")??;
    let published_ns = now_ns(epoch) - t0;

    let drain = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while tokio::time::Instant::now() < drain && tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let server_cpu = started.server.cpu_seconds().unwrap_or(0.0) - server_cpu_before;
    let client_cpu = own_cpu_seconds() - client_cpu_before;
    let _ = stop_tx.send(true);
    let mut received = Vec::new();
    for task in tasks {
        received.push(task.await?);
    }
    let server_rss_mib = started.server.resident_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0);
    drop(publisher);
    drop(started); // kills the server

    let mut all: Vec<u64> = received.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    all.sort_unstable();
    let pct = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0
    };
    let secs = |ns: u64| ns.saturating_sub(t0).max(1) as f64 / 1e9;
    let per_sub: Vec<f64> = received.iter().map(|r| r.latencies.len() as f64 / secs(r.last_ns)).collect();
    let last = received.iter().map(|r| r.last_ns).max().unwrap_or(t0);
    let delivered: u64 = received.iter().map(|r| r.latencies.len() as u64).sum();
    Ok(Row {
        publish_rate: messages as f64 / (published_ns.max(1) as f64 / 1e9),
        per_sub_rate: per_sub.iter().sum::<f64>() / per_sub.len() as f64,
        total_rate: delivered as f64 / secs(last),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: all.last().map_or(f64::NAN, |&v| v as f64 / 1000.0),
        missing: messages * n_subs as u64 - delivered,
        server_us_per_msg: server_cpu * 1e6 / messages as f64,
        client_us_per_msg: client_cpu * 1e6 / messages as f64,
        server_rss_mib,
        errors: received.into_iter().filter_map(|r| r.error).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Rounds, medians, tables

/// Median of each figure over the rounds (each figure on its own).
fn median_row(rows: &[Row]) -> Row {
    let med = |f: fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Row {
        publish_rate: med(|r| r.publish_rate),
        per_sub_rate: med(|r| r.per_sub_rate),
        total_rate: med(|r| r.total_rate),
        p50_us: med(|r| r.p50_us),
        p99_us: med(|r| r.p99_us),
        max_us: med(|r| r.max_us),
        missing: rows.iter().map(|r| r.missing).max().unwrap_or(0),
        server_us_per_msg: med(|r| r.server_us_per_msg),
        client_us_per_msg: med(|r| r.client_us_per_msg),
        server_rss_mib: med(|r| r.server_rss_mib),
        errors: rows.iter().flat_map(|r| r.errors.iter().cloned()).collect(),
    }
}

fn print_header() {
    println!(
        "{:<14} {:>4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>7}",
        "system",
        "subs",
        "publish/s",
        "per-sub/s",
        "total/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "missing",
        "srv µs/m",
        "cli µs/m",
        "srv MiB"
    );
}

fn print_row(system: System, subs: usize, r: &Row) {
    println!(
        "{:<14} {:>4} {:>10.0} {:>10.0} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>7} {:>8.1} {:>8.1} {:>7.1}{}",
        system.label(),
        subs,
        r.publish_rate,
        r.per_sub_rate,
        r.total_rate,
        r.p50_us,
        r.p99_us,
        r.max_us,
        r.missing,
        r.server_us_per_msg,
        r.client_us_per_msg,
        r.server_rss_mib,
        error_summary(&r.errors)
    );
}

/// "  errors: 3× why; 1× other" (empty when there are none).
fn error_summary(errors: &[String]) -> String {
    let mut counted: Vec<(&String, usize)> = Vec::new();
    for e in errors {
        match counted.iter_mut().find(|(seen, _)| *seen == e) {
            Some((_, n)) => *n += 1,
            None => counted.push((e, 1)),
        }
    }
    if counted.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = counted.iter().map(|(e, n)| format!("{n}× {e}")).collect();
    format!("  errors: {}", parts.join("; "))
}

type Results = Vec<((Pass, usize, System), Row)>;

fn print_ratios(pass: Pass, fanouts: &[usize], results: &Results) {
    println!("\nratios, canopy ÷ peer (total/s above 1 and latency below 1 favour Canopy)");
    println!("{:<14} {:<12} {:>4} {:>9} {:>9} {:>9}", "canopy", "peer", "subs", "total/s", "p50", "p99");
    for &n in fanouts {
        let find = |s: System| results.iter().find(|(k, _)| *k == (pass, n, s)).map(|(_, r)| r);
        for canopy in [System::CanopyMemory, System::CanopyFjall] {
            for peer in [System::Nats, System::NatsFlush, System::Mosquitto] {
                if let (Some(c), Some(p)) = (find(canopy), find(peer)) {
                    println!(
                        "{:<14} {:<12} {:>4} {:>8.2}× {:>8.2}× {:>8.2}×",
                        canopy.label(),
                        peer.label(),
                        n,
                        c.total_rate / p.total_rate,
                        c.p50_us / p.p50_us,
                        c.p99_us / p.p99_us
                    );
                }
            }
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let relay = if args.systems.iter().any(|s| s.is_canopy()) { Some(relay_binary(&args)?) } else { None };
    let mut passes = vec![Pass::Throughput];
    if args.paced_rate > 0 {
        passes.push(Pass::Paced(args.paced_rate));
    }
    println!(
        "pubsub-bench: payloads of {PAYLOAD} B; throughput pass {} + {} warm-up, window {}; paced pass {} at {}/s; \
         fan-out {:?}; relay max_queue {}; {} round(s), medians shown; load average {}",
        args.messages,
        args.warmup,
        args.window,
        args.paced_messages,
        args.paced_rate,
        args.fanouts,
        args.relay_max_queue,
        args.rounds,
        loadavg()
    );
    let mut runs: Vec<((Pass, usize, System), Vec<Row>)> = Vec::new();
    let mut failures = 0;
    for round in 0..args.rounds {
        for &pass in &passes {
            for &n in &args.fanouts {
                for &system in &args.systems {
                    match run_one(system, n, pass, &args, relay.as_deref()).await {
                        Ok(row) => {
                            let key = (pass, n, system);
                            match runs.iter_mut().find(|(k, _)| *k == key) {
                                Some((_, rows)) => rows.push(row),
                                None => runs.push((key, vec![row])),
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            println!("round {round}: {} {n} {pass:?} FAILED: {e:#}", system.label());
                        }
                    }
                }
            }
        }
        eprintln!("round {} of {} done (load average {})", round + 1, args.rounds, loadavg());
    }
    let results: Results = runs.iter().map(|(k, rows)| (*k, median_row(rows))).collect();
    for &pass in &passes {
        match pass {
            Pass::Throughput => {
                println!("\nthroughput pass: {} payloads, up to {} outstanding", args.messages, args.window)
            }
            Pass::Paced(rate) => println!("\npaced pass: {} payloads at {rate}/s", args.paced_messages),
        }
        print_header();
        for &n in &args.fanouts {
            for &system in &args.systems {
                if let Some((_, row)) = results.iter().find(|(k, _)| *k == (pass, n, system)) {
                    print_row(system, n, row);
                }
            }
        }
        print_ratios(pass, &args.fanouts, &results);
    }
    println!("\nload average at the end: {}", loadavg());
    let incomplete = results.iter().filter(|(_, r)| r.missing > 0 || !r.errors.is_empty()).count();
    ensure!(failures == 0 && incomplete == 0, "{failures} run(s) failed, {incomplete} incomplete");
    Ok(())
}
