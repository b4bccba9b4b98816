//! `canopy`: publish and subscribe to a Canopy relay from the command line.
//!
//! ```text
//! canopy pub --relay 127.0.0.1:4433 --ca relay.pem [--token T] [--ttl 1h] NAME DATA
//! canopy sub --relay 127.0.0.1:4433 --fingerprint HEX FILTER [--mode cached|live|both]
//!            [--count N] [--timeout 5s] [--json]
//! canopy sub --relay dns:example.org --trust-dns [--dns-server ADDR:PORT] FILTER
//! canopy sub --relay mdns: --trust-mdns [--mdns-timeout 3s] FILTER
//! canopy discover dns:example.org [--json]
//! canopy discover [--timeout 3s] [--json]
//! canopy stat --metrics http://127.0.0.1:9100/metrics
//! canopy plugin run FILE --relay 127.0.0.1:4433 --ca relay.pem [--dir PATH]... [--config JSON]
//!            [--state DIR] -- ARGS...
//! ```
//!
//! NAME and FILTER take the hex forms (`0x` and exactly 32 hex digits, then `/len` for a
//! filter; or `*`) or the messenger schema form (`team=5/channel=3`, `origin=1/app=2/*`). Hex
//! text is never guessed at: fewer digits, or a filter with bits set below its length, is
//! refused with the intended form suggested.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use canopy_sdk::tool::{self, Progress, ToolOptions};
use canopy_sdk::{Chunk, Client, ConnectOptions, ReplayMode, Schema, SubEvent, Trust, discovery};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "canopy", version, about = "Publish to and subscribe from a Canopy relay, and run plugins against it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish one chunk; exits 0 once the relay acknowledges it.
    Pub {
        #[command(flatten)]
        relay: RelayArgs,
        /// How long the chunk lives (e.g. `30s`, `1h`, `7days`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The chunk name: `0x` and 32 hex digits, or messenger fields
        /// (`team=5/channel=3/msg=1`).
        name: String,
        /// The chunk data (UTF-8 text, at most 1024 bytes).
        data: String,
    },
    /// Subscribe to a filter and print one line per chunk.
    Sub {
        #[command(flatten)]
        relay: RelayArgs,
        /// The filter: `0x<32 hex digits>/len`, `*`, or leading messenger fields
        /// (`origin=1/app=2`).
        filter: String,
        /// `cached`: only stored chunks, stop at the end of the replay; `live`: only new
        /// chunks; `both`: stored then new.
        #[arg(long, value_enum, default_value_t = Mode::Both)]
        mode: Mode,
        /// Stop after this many chunks.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (e.g. `5s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Print `{"name": "0x…", "expiry": ms, "data": "<base64>"}` lines.
        #[arg(long)]
        json: bool,
    },
    /// List relays: without a source (or with `mdns:`), those on the local network that
    /// answer by mDNS within --timeout, with their addresses, relay id, role, protocol
    /// version and the fingerprint they announce; with `dns:DOMAIN`, those DNS names for the
    /// domain (cloud relays, then the origin's front-ends, best first) with the fingerprints
    /// DNS publishes. Finds addresses, not trust.
    Discover {
        /// `dns:DOMAIN`, or `mdns:` (the default).
        source: Option<String>,
        #[command(flatten)]
        dns: DnsArgs,
        /// How long to listen for mDNS answers (default 3s); with `dns:`, overrides
        /// --dns-timeout.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// One JSON object per relay.
        #[arg(long)]
        json: bool,
    },
    /// Print a relay's Prometheus metrics (fetched over plain HTTP).
    Stat {
        /// The metrics URL, e.g. `http://127.0.0.1:9100/metrics`.
        #[arg(long)]
        metrics: String,
    },
    /// Run plugins as tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin (`.wasm`, or a native library) against a relay: `init` with the
    /// arguments, deliver the replays of its subscriptions and fire its timers until it
    /// settles, then print what `on-command ARGS` returns (exit 1 if it is an error).
    Run {
        /// The plugin file.
        file: std::path::PathBuf,
        #[command(flatten)]
        relay: RelayArgs,
        /// Grant the plugin this directory (visible at the same path), creating it if it does
        /// not exist; repeatable. Nothing else of the file system is visible to it.
        #[arg(long = "dir")]
        dirs: Vec<std::path::PathBuf>,
        /// The plugin's configuration, a JSON object (`"args"` is added to it).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Keep the plugin's key/value state in this directory (default: in memory).
        #[arg(long)]
        state: Option<std::path::PathBuf>,
        /// Where compiled plugins are cached (default: `$XDG_CACHE_HOME/canopy/plugins` or
        /// `~/.cache/canopy/plugins`).
        #[arg(long)]
        cache: Option<std::path::PathBuf>,
        /// Wall-clock budget of one callback, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
        /// Memory the plugin may use, in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Give up after this long (e.g. `30s`, `10m`).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The plugin's command line.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Args)]
struct RelayArgs {
    /// The relay: `host:port` (QUIC) or `tcp://host:port` (TLS over TCP, to the relay's
    /// `--tcp-listen`); `dns:DOMAIN` to find the domain's relays by DNS (its cloud relays,
    /// then its origin; the first trusted and reachable one is used); or `mdns:` to find relays on the local network by mDNS (`mdns:RELAY_ID` for one relay; the first
    /// trusted and reachable one is used).
    #[arg(long, env = "CANOPY_RELAY")]
    relay: String,
    /// PEM file of the CA (or the relay's self-signed certificate) to trust.
    #[arg(long, conflicts_with = "fingerprint")]
    ca: Option<std::path::PathBuf>,
    /// Hex SHA-256 of the relay's certificate (DER) to pin; repeat to accept any of several.
    #[arg(long)]
    fingerprint: Vec<String>,
    #[command(flatten)]
    dns: DnsArgs,
    /// Trust the certificate fingerprint a relay found by mDNS announces for itself (TXT
    /// `fp`). Anyone on the local network can announce anything: without it, a relay found
    /// by mDNS needs --ca, --fingerprint or --trust-on-first-use.
    #[arg(long)]
    trust_mdns: bool,
    /// How long `mdns:` listens for relays' answers.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    mdns_timeout: Duration,
    /// Trust a relay never seen before by the certificate it presents now, and pin that in
    /// the known-relays file; a later change is refused (as SSH does for hosts).
    #[arg(long)]
    trust_on_first_use: bool,
    /// The known-relays file [default: $CANOPY_KNOWN_RELAYS, else
    /// $XDG_DATA_HOME/canopy/known_relays, else ~/.local/share/canopy/known_relays].
    #[arg(long)]
    known_relays: Option<std::path::PathBuf>,
    /// Authentication token.
    #[arg(long, env = "CANOPY_TOKEN")]
    token: Option<String>,
    /// TLS server name to expect in the relay's certificate (with `--ca`).
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Cached,
    Live,
    Both,
}

/// How DNS discovery asks.
#[derive(Args)]
struct DnsArgs {
    /// Trust the certificate fingerprints DNS publishes for a relay it finds (TXT
    /// `canopy-fp=HEX`); without it, a discovered relay needs --ca or --fingerprint.
    #[arg(long)]
    trust_dns: bool,
    /// The DNS server to ask, `ADDR:PORT` (default: the system's).
    #[arg(long, env = "CANOPY_DNS_SERVER")]
    dns_server: Option<std::net::SocketAddr>,
    /// The most DNS discovery may take.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    dns_timeout: Duration,
}

impl DnsArgs {
    fn options(&self) -> discovery::DnsOptions {
        discovery::DnsOptions { server: self.dns_server, timeout: self.dns_timeout }
    }
}

impl RelayArgs {
    async fn connect(&self) -> Result<Client> {
        self.connect_with(ConnectOptions::new(&self.relay, Trust::Fingerprint(String::new()))).await
    }

    fn known(&self) -> Option<discovery::KnownRelays> {
        self.known_relays.clone().map(discovery::KnownRelays::at).or_else(discovery::KnownRelays::default_location)
    }

    fn ca_pem(&self) -> Result<Option<String>> {
        self.ca.as_ref().map(|path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))).transpose()
    }

    /// Connects with `base`'s tuning (buffers, timeouts) and these flags' address and trust.
    async fn connect_with(&self, base: ConnectOptions) -> Result<Client> {
        let mut base = base;
        base.token = self.token.clone();
        let config = || -> Result<discovery::TrustConfig> {
            Ok(discovery::TrustConfig {
                ca_pem: self.ca_pem()?,
                pinned: self.fingerprint.clone(),
                trust_dns: self.dns.trust_dns,
                trust_mdns: self.trust_mdns,
                known: self.known(),
                first_use: self.trust_on_first_use,
            })
        };
        if let Some(domain) = self.relay.strip_prefix("dns:") {
            let found = discovery::relays(domain, &self.dns.options()).await?;
            let (client, used) = discovery::connect_first(&found, &config()?, &base).await?;
            tracing::info!(relay = %used, "connected to a relay found by DNS");
            return Ok(client);
        }
        if let Some(wanted) = self.relay.strip_prefix("mdns:") {
            let wanted = match wanted.trim() {
                "" => None,
                id => Some(canopy_sdk::discovery::mdns::parse_relay_id(id).with_context(|| format!("mdns:{id}: not a relay id"))?),
            };
            let mut candidates = Vec::new();
            for relay in discovery::mdns::browse_local(self.mdns_timeout).await? {
                if wanted.is_some() && relay.relay_id != wanted {
                    continue;
                }
                if !relay.is_compatible() {
                    tracing::warn!(%relay, protocol = ?relay.protocol, "skipped: another protocol version");
                    continue;
                }
                candidates.extend(relay.candidates());
            }
            if candidates.is_empty() {
                bail!("no relay found by mDNS{} speaks this protocol version", wanted.map(|id| format!(" has relay id {id} and")).unwrap_or_default());
            }
            let (client, used) = discovery::connect_first(&candidates, &config()?, &base).await?;
            tracing::info!(relay = %used, "connected to a relay found by mDNS");
            return Ok(client);
        }
        let known = self.known();
        let pinned = match &known {
            Some(k) => k.get(&self.relay)?,
            None => None,
        };
        let mut new_pin = None;
        let trust = match (self.ca_pem()?, self.fingerprint.as_slice()) {
            (Some(pem), _) => Trust::CaPem(pem),
            (None, [fp]) => Trust::Fingerprint(fp.clone()),
            (None, fps) if !fps.is_empty() => Trust::Fingerprints(fps.to_vec()),
            (None, _) => match &known {
                // A pin from an earlier first use, or a first use now.
                Some(file) if pinned.is_some() || self.trust_on_first_use => {
                    let addr = tokio::net::lookup_host(self.relay.as_str())
                        .await
                        .with_context(|| format!("resolving {}", self.relay))?
                        .next()
                        .with_context(|| format!("{} resolves to no address", self.relay))?;
                    let decided = discovery::first_use(file, &self.relay, addr, &self.server_name, base.connect_timeout).await?;
                    new_pin = decided.new;
                    decided.trust
                }
                _ => bail!("give --ca, --fingerprint or --trust-on-first-use"),
            },
        };
        let mut opts = ConnectOptions { trust, ..base };
        opts.server_name = self.server_name.clone();
        let client = Client::connect(opts).await?;
        if let (Some(fp), Some(file)) = (new_pin, &known) {
            file.pin(&self.relay, &fp)?;
            eprintln!("canopy: trusted {} on first use: pinned {fp} in {}", self.relay, file.path().display());
        }
        Ok(client)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("canopy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canopy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let schema = Schema::messenger();
    match cli.command {
        Command::Discover { source, dns, timeout, json } => {
            let source = source.unwrap_or_else(|| "mdns:".into());
            if source == "mdns:" || source == "mdns" {
                for relay in discovery::mdns::browse_local(timeout.unwrap_or(Duration::from_secs(3))).await? {
                    println!("{}", if json { local_json(&relay).to_string() } else { local_line(&relay) });
                }
                return Ok(());
            }
            let Some(domain) = source.strip_prefix("dns:") else { bail!("discover what? `dns:DOMAIN`, or `mdns:` (the default)") };
            let mut options = dns.options();
            options.timeout = timeout.unwrap_or(options.timeout);
            for f in discovery::relays(domain, &options).await? {
                if json {
                    let line = serde_json::json!({
                        "service": f.service.to_string(), "host": f.host, "addr": f.addr.to_string(),
                        "priority": f.priority, "weight": f.weight, "fingerprints": f.fingerprints,
                    });
                    println!("{line}");
                } else {
                    let fps = if f.fingerprints.is_empty() { "no fingerprint in DNS".to_string() } else { f.fingerprints.join(",") };
                    println!("{} {} {} priority={} weight={} {fps}", f.service, f.host, f.addr, f.priority, f.weight);
                }
            }
            Ok(())
        }
        Command::Pub { relay, ttl, name, data } => {
            let name = schema.parse_name(&name).with_context(|| format!("bad name {name:?}"))?;
            let expiry = canopy_sdk::now_ms().saturating_add(ttl.as_millis() as u64);
            let chunk = Chunk::new(name, expiry, data.into_bytes())?;
            let client = relay.connect().await?;
            client.publish(chunk).await?;
            client.close();
            Ok(())
        }
        Command::Sub { relay, filter, mode, count, timeout, json } => {
            let filter = schema.parse_filter(&filter).with_context(|| format!("bad filter {filter:?}"))?;
            let mode = match mode {
                Mode::Cached => ReplayMode::CachedOnly,
                Mode::Live => ReplayMode::LiveOnly,
                Mode::Both => ReplayMode::CachedAndLive,
            };
            let client = relay.connect().await?;
            let receive = receive(&client, filter, mode, count, json);
            let result = match timeout {
                Some(t) => tokio::time::timeout(t, receive).await.unwrap_or(Ok(())),
                None => receive.await,
            };
            client.close();
            result
        }
        Command::Stat { metrics } => stat(&metrics).await,
        Command::Plugin { command: PluginCommand::Run { file, relay, dirs, config, state, cache, deadline_ms, memory_mib, timeout, args } } => {
            let config = match serde_json::from_str(&config).context("--config must be a JSON object")? {
                serde_json::Value::Object(map) => map,
                _ => bail!("--config must be a JSON object"),
            };
            let mut options = ToolOptions::new(file, args);
            options.config = config;
            options.dirs = dirs;
            options.state = state;
            options.cache_dir = cache.or_else(default_cache_dir);
            options.limits.deadline_ms = deadline_ms;
            options.limits.memory_bytes = memory_mib << 20;
            options.timeout = timeout;
            run_plugin(&relay, options).await
        }
    }
}

/// One relay found by mDNS as a JSON object (`canopy discover --json`).
fn local_json(relay: &discovery::mdns::LocalRelay) -> serde_json::Value {
    serde_json::json!({
        "instance": relay.instance,
        "host": relay.host,
        "port": relay.port,
        "addrs": relay.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "relay_id": relay.relay_id.map(|id| id.to_string()),
        "role": relay.role,
        "protocol": relay.protocol,
        "fingerprint": relay.fingerprint,
        "problems": relay.problems,
    })
}

/// One relay found by mDNS as a line: addresses, then `key=value` fields (`?` for what the
/// announcement lacked), then the instance.
fn local_line(relay: &discovery::mdns::LocalRelay) -> String {
    let addrs = if relay.addrs.is_empty() { format!("(no address):{}", relay.port) } else { relay.addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",") };
    let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let mut line = format!(
        "{addrs} id={} role={} protocol={} fingerprint={} instance={}",
        or_unknown(relay.relay_id.map(|id| id.to_string())),
        or_unknown(relay.role.clone()),
        or_unknown(relay.protocol.map(|p| p.to_string())),
        or_unknown(relay.fingerprint.clone()),
        relay.instance,
    );
    if !relay.problems.is_empty() {
        line.push_str(&format!(" problems={:?}", relay.problems.join("; ")));
    }
    line
}

/// `$XDG_CACHE_HOME/canopy/plugins`, else `~/.cache/canopy/plugins`.
fn default_cache_dir() -> Option<std::path::PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
        _ => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("canopy").join("plugins"))
}

async fn run_plugin(relay: &RelayArgs, options: ToolOptions) -> Result<()> {
    // A plugin's replays arrive in bursts larger than the default event buffer; the tool
    // forwards them as fast as they come, so a deep buffer only absorbs the bursts.
    let mut base = ConnectOptions::new(&relay.relay, Trust::Fingerprint(String::new()));
    base.subscription_buffer = 1 << 16;
    let client = relay.connect_with(base).await?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("a valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let shown = bar.clone();
    let outcome = tool::run(&client, options, move |p: Progress| {
        shown.set_message(format!("{} chunks in · {} published · {} refused", p.chunks_in, p.published, p.refused));
    })
    .await;
    bar.finish_and_clear();
    client.close();
    let outcome = outcome?;
    eprintln!(
        "plugin done: {} chunks in, {} published, {} refused",
        outcome.chunks_in, outcome.published, outcome.refused
    );
    match outcome.answer {
        Ok(text) => {
            println!("{text}");
            Ok(())
        }
        Err(text) => Err(anyhow!("{text}")),
    }
}

async fn receive(client: &Client, filter: canopy_sdk::Filter, mode: ReplayMode, count: Option<u64>, json: bool) -> Result<()> {
    if count == Some(0) {
        return Ok(());
    }
    let mut sub = client.subscribe(filter, mode).await?;
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    while let Some(event) = sub.next().await {
        match event {
            SubEvent::Chunk(chunk) => {
                writeln!(out, "{}", render(&chunk, json))?;
                out.flush()?;
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            SubEvent::ReplayDone if mode == ReplayMode::CachedOnly => break,
            SubEvent::ReplayDone => {}
            SubEvent::Gap => eprintln!("warning: reconnected to the relay; chunks published meanwhile may be missing"),
            SubEvent::Error { code, message } => return Err(anyhow!("subscription ended: {code}: {message}")),
        }
    }
    Ok(())
}

fn render(chunk: &Chunk, json: bool) -> String {
    if json {
        serde_json::json!({
            "name": chunk.name().to_string(),
            "expiry": chunk.expiry(),
            "data": base64::engine::general_purpose::STANDARD.encode(chunk.data()),
        })
        .to_string()
    } else {
        let data = match std::str::from_utf8(chunk.data()) {
            Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
            _ => format!("0x{}", chunk.data().iter().map(|b| format!("{b:02x}")).collect::<String>()),
        };
        format!("{} {} {}", chunk.name(), chunk.expiry(), data)
    }
}

/// Fetches `http://host:port/path` with a bare HTTP/1.0 GET and prints the metric samples,
/// aligned, without the `# HELP`/`# TYPE` comments.
async fn stat(url: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("only http:// metrics URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let mut stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(host))
        .await
        .context("timed out connecting")?
        .with_context(|| format!("connecting to {host}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("timed out reading")??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("metrics endpoint answered {status:?}");
    }
    let samples: Vec<(&str, &str)> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    let width = samples.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in samples {
        println!("{key:<width$}  {value}");
    }
    Ok(())
}
