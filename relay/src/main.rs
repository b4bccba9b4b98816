//! `canopy-relay`: the Canopy relay server.
//!
//! Settings come from built-in defaults, then a TOML file (`--config`), then `CANOPY_*`
//! environment variables, then command-line flags; later sources win. See `docs/relay.md`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use canopy_relay::{Relay, RelayConfig, RelayRole, StoreKind};
use clap::Parser;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;

/// The Canopy relay server: caches chunks and forwards them along a tree of relays over QUIC.
///
/// Settings are merged from defaults, the TOML file given with --config, CANOPY_* environment
/// variables (CANOPY_LISTEN, CANOPY_DATA, CANOPY_PARENT, ...) and these flags, later winning.
#[derive(Debug, Parser, Serialize)]
#[command(name = "canopy-relay", version)]
struct Cli {
    /// TOML configuration file (keys as in docs/relay.md).
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    config: Option<PathBuf>,

    /// UDP address to listen on for QUIC (port 0 picks a free one) [default: 127.0.0.1:4433].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,

    /// Run no QUIC listener (a leaf serving only its Unix socket and plugins); --listen is
    /// then ignored.
    #[arg(long)]
    #[serde(skip)]
    no_quic: bool,

    /// Also accept links on a Unix-domain socket at PATH (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    #[serde(rename = "unix_listen", skip_serializing_if = "Option::is_none")]
    unix_listen: Option<PathBuf>,

    /// Also accept links over TLS on TCP at ADDR (same certificate; clients connect to
    /// tcp://HOST:PORT; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    #[serde(rename = "tcp_listen", skip_serializing_if = "Option::is_none")]
    tcp_listen: Option<SocketAddr>,

    /// Data directory: store, certificate, key and relay id
    /// [default: $XDG_DATA_HOME/canopy-relay or ./canopy-data].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<PathBuf>,

    /// Parent relay as HOST:PORT, or dns:DOMAIN for the domain's origin (SRV
    /// _canopy-origin._udp.DOMAIN); none for the origin relay.
    #[arg(long, value_name = "HOST:PORT|dns:DOMAIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,

    /// With --parent dns:DOMAIN: trust the fingerprints DNS publishes for the origin.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    parent_trust_dns: bool,

    /// DNS server for --parent dns:…, ADDR:PORT [default: the system's].
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dns_server: Option<SocketAddr>,

    /// PEM file with the certificate to trust for the parent (e.g. its cert.pem).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_ca: Option<PathBuf>,

    /// SHA-256 fingerprint of the parent's certificate, pinned (instead of --parent-ca).
    #[arg(long, value_name = "HEX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_fingerprint: Option<String>,

    /// Token to present to the parent.
    #[arg(long, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_token: Option<String>,

    /// Store capacity in bytes [default: 1073741824].
    #[arg(long, value_name = "BYTES")]
    #[serde(rename = "capacity_bytes", skip_serializing_if = "Option::is_none")]
    capacity: Option<u64>,

    /// Storage backend: fjall (durable, default), memory, or the Redis Cluster an origin's
    /// front-ends share, as redis://HOST:PORT,redis://HOST:PORT,… (with --role
    /// origin-frontend; docs/origin.md).
    #[arg(long, value_name = "KIND", value_parser = parse_store)]
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<StoreKind>,

    /// With a Redis store: replicas that must have each batch of inserts before its
    /// publishes are acknowledged (WAIT) [default: 0].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_min_replicas: Option<u8>,

    /// Announce this relay on the local network by mDNS (_canopy._udp.local.: its QUIC port,
    /// addresses, relay id, role, protocol version and certificate fingerprint).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    advertise: bool,

    /// The relay's role, announced with --advertise: origin, origin-frontend, cloud or local
    /// [default: origin-frontend with a Redis store, else origin without a parent and local
    /// with one].
    #[arg(long, value_name = "ROLE", value_parser = parse_role)]
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<RelayRole>,

    /// Acknowledge publishes once written and fsync the store at least every MS milliseconds
    /// (JetStream's behaviour; a crash can lose the last MS of acknowledged publishes).
    /// Without it, a publish is acknowledged after the fsync that covers it.
    #[arg(long, value_name = "MS")]
    #[serde(rename = "sync_interval_ms", skip_serializing_if = "Option::is_none")]
    sync_interval_ms: Option<u64>,

    /// The largest UDP payload the QUIC endpoints accept and probe for by path-MTU discovery
    /// [default: 1452, within an Ethernet MTU]; e.g. 8952 on a jumbo-frame network.
    #[arg(long, value_name = "BYTES")]
    #[serde(rename = "max_udp_payload", skip_serializing_if = "Option::is_none")]
    max_udp_payload: Option<u16>,

    /// TCP address for the Prometheus endpoint (GET /metrics); off by default.
    #[arg(long, value_name = "ADDR")]
    #[serde(rename = "metrics_listen", skip_serializing_if = "Option::is_none")]
    metrics: Option<SocketAddr>,
}

fn parse_role(text: &str) -> Result<RelayRole, String> {
    match text {
        "origin" => Ok(RelayRole::Origin),
        "origin-frontend" => Ok(RelayRole::OriginFrontend),
        "cloud" => Ok(RelayRole::Cloud),
        "local" => Ok(RelayRole::Local),
        other => Err(format!("unknown role {other:?}: use origin, origin-frontend, cloud or local")),
    }
}

fn parse_store(text: &str) -> Result<StoreKind, String> {
    text.parse()
}

/// Config keys that may come from `CANOPY_<KEY>` environment variables.
const ENV_KEYS: &[&str] = &[
    "listen",
    "quic_listen",
    "unix_listen",
    "tcp_listen",
    "data",
    "id",
    "parent",
    "parent_trust_dns",
    "dns_server",
    "parent_ca",
    "parent_fingerprint",
    "parent_token",
    "capacity_bytes",
    "store",
    "redis_min_replicas",
    "metrics_listen",
    "max_queue",
    "max_backlog",
    "evict_interval_ms",
    "sync_interval_ms",
    "max_udp_payload",
    "parent_refused_backoff_ms",
    "advertise",
    "role",
];

fn load_config(cli: &Cli) -> anyhow::Result<RelayConfig> {
    let mut figment = Figment::from(Serialized::defaults(RelayConfig::default()));
    if let Some(path) = &cli.config {
        anyhow::ensure!(path.exists(), "config file {} does not exist", path.display());
        figment = figment.merge(Toml::file(path));
    }
    figment = figment.merge(Env::prefixed("CANOPY_").only(ENV_KEYS)).merge(Serialized::defaults(cli));
    let mut config: RelayConfig = figment.extract().context("reading the configuration")?;
    if cli.no_quic {
        config.quic_listen = false;
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context and its causes, outermost first.
            eprintln!("Error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = load_config(&cli)?;
    let relay = Relay::spawn(config).await?;
    // Machine-readable lines on stdout (logs go to stderr).
    println!("certificate {} sha256 {}", relay.cert_path().display(), relay.fingerprint());
    if let Some(addr) = relay.quic_addr() {
        println!("listening on {addr}");
    }
    if let Some(addr) = relay.tcp_addr() {
        println!("listening on tcp://{addr}");
    }
    if let Some(path) = relay.unix_path() {
        println!("unix socket {}", path.display());
    }
    if let Some(addr) = relay.metrics_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    if let Some(instance) = relay.advertised_instance() {
        println!("advertising {instance} by mDNS");
    }
    wait_for_signal().await?;
    tracing::info!("stopping");
    relay.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:5000\"\ncapacity_bytes = 42\nstore = \"memory\"\n\n[[access]]\ntoken = \"t\"\npublish = [\"0x00000000000000000000000000000000/0\"]\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["canopy-relay", "--config", file.to_str().unwrap(), "--listen", "127.0.0.1:6000"]);
        let config = load_config(&cli).unwrap();
        assert_eq!(config.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(config.capacity_bytes, 42);
        assert_eq!(config.store, StoreKind::Memory);
        assert_eq!(config.access.len(), 1);
        assert_eq!(config.max_queue, 1024);
        assert!(config.quic_listen);
        assert_eq!(config.unix_listen, None);

        let cli = Cli::parse_from(["canopy-relay", "--no-quic", "--unix-listen", "/tmp/n.sock"]);
        let config = load_config(&cli).unwrap();
        assert!(!config.quic_listen);
        assert_eq!(config.unix_listen, Some(PathBuf::from("/tmp/n.sock")));
        std::fs::write(&file, "quic_listen = false\nunix_listen = \"/run/canopy.sock\"\n").unwrap();
        let cli = Cli::parse_from(["canopy-relay", "--config", file.to_str().unwrap()]);
        let config = load_config(&cli).unwrap();
        assert!(!config.quic_listen);
        assert_eq!(config.unix_listen, Some(PathBuf::from("/run/canopy.sock")));

        let cli = Cli::parse_from(["canopy-relay", "--advertise", "--role", "cloud"]);
        let config = load_config(&cli).unwrap();
        assert!(config.advertise);
        assert_eq!(config.role, Some(RelayRole::Cloud));
        assert!(!load_config(&Cli::parse_from(["canopy-relay"])).unwrap().advertise);
        assert!(Cli::try_parse_from(["canopy-relay", "--role", "leaf"]).is_err());
        let cli = Cli::parse_from(["canopy-relay", "--advertise", "--no-quic", "--unix-listen", "/tmp/n.sock"]);
        assert!(load_config(&cli).unwrap().validate().unwrap_err().to_string().contains("advertise needs the QUIC listener"));
    }

    #[test]
    fn tcp_listen_comes_from_flag_file_or_env_and_parents_stay_on_quic() {
        let cli = Cli::parse_from(["canopy-relay", "--no-quic", "--tcp-listen", "127.0.0.1:0"]);
        let config = load_config(&cli).unwrap();
        assert_eq!(config.tcp_listen, Some("127.0.0.1:0".parse().unwrap()));
        // A TCP listener alone is something to serve.
        config.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "tcp_listen = \"0.0.0.0:4434\"\nparent = \"tcp://origin:4434\"\n").unwrap();
        let config = load_config(&Cli::parse_from(["canopy-relay", "--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(config.tcp_listen, Some("0.0.0.0:4434".parse().unwrap()));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("reaches its parent over QUIC"), "{err}");
        assert!(Cli::try_parse_from(["canopy-relay", "--tcp-listen", "not-an-address"]).is_err());
    }
}
