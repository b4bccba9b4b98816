//! The relay's settings: [`RelayConfig`], read by the binary from defaults, a TOML file,
//! `CANOPY_*` environment variables and command-line flags (in that order of precedence,
//! later wins), or built directly by code that embeds a relay.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use canopy::Filter;
use canopy::access::{Access, Grant};
use canopy::plugin::{Limits, PluginKind};
use canopy::wire::RelayId;
use serde::{Deserialize, Serialize};

pub use crate::advertise::RelayRole;

/// Which storage backend holds the relay's chunks and outbox. Written as `fjall`, `memory`,
/// or the Redis Cluster's nodes as `redis://HOST:PORT,redis://HOST:PORT,…`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StoreKind {
    /// The durable fjall store under `<data>/store` (the default).
    #[default]
    Fjall,
    /// An in-memory store: everything is lost when the relay stops. For tests and
    /// throw-away relays.
    Memory,
    /// A Redis Cluster shared by the front-ends of one origin (role `origin-frontend`,
    /// `docs/origin.md`): the relay keeps no chunks of its own. `nodes` are where the cluster
    /// client starts discovering the cluster (`redis://HOST:PORT`; TLS, `rediss://`, is not
    /// built in yet): one reachable node is enough, more survive one being down.
    Redis {
        /// The seed nodes' URLs.
        nodes: Vec<String>,
    },
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(text: &str) -> Result<StoreKind, String> {
        match text {
            "fjall" => Ok(StoreKind::Fjall),
            "memory" => Ok(StoreKind::Memory),
            _ if text.starts_with("rediss://") => {
                Err(format!("store {text:?}: TLS to Redis (rediss://) is not built in yet; use redis:// on a trusted network"))
            }
            _ if text.starts_with("redis://") => {
                let nodes: Vec<String> = text.split(',').map(str::trim).map(str::to_owned).collect();
                if let Some(bad) = nodes.iter().find(|n| !n.starts_with("redis://") || n.len() <= "redis://".len()) {
                    return Err(format!("store {text:?}: {bad:?} is not a redis://HOST:PORT node"));
                }
                Ok(StoreKind::Redis { nodes })
            }
            other => Err(format!("unknown store {other:?}: use fjall, memory or redis://HOST:PORT,…")),
        }
    }
}

impl TryFrom<String> for StoreKind {
    type Error = String;

    fn try_from(text: String) -> Result<StoreKind, String> {
        text.parse()
    }
}

impl From<StoreKind> for String {
    fn from(kind: StoreKind) -> String {
        match kind {
            StoreKind::Fjall => "fjall".into(),
            StoreKind::Memory => "memory".into(),
            StoreKind::Redis { nodes } => nodes.join(","),
        }
    }
}

/// One access rule: what a connection presenting `token` may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// The token a client (or child relay) sends in its `Hello`.
    pub token: String,
    /// Filters (`0x<32 hex digits>/<len>`) under which this token may publish.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Filters (`0x<32 hex digits>/<len>`) this token may subscribe to, or narrower ones.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// One `[[plugin]]` a relay loads at start and runs for as long as it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The plugin file: a `.wasm` component, or a native library (`.so`, `.dylib`, `.dll`).
    pub file: PathBuf,
    /// The plugin's name in logs, metrics and its state's namespace. Default: the file's
    /// stem. Renaming a plugin starts it with empty state.
    #[serde(default)]
    pub name: Option<String>,
    /// `wasm` or `native`. Default: `native` for `.so`/`.dylib`/`.dll`, else `wasm`.
    #[serde(default)]
    pub kind: Option<PluginKind>,
    /// The table handed to the plugin's `init`, as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Limits overriding the defaults (deadline 100 ms, memory 64 MiB, no fuel, …).
    #[serde(default)]
    pub limits: Limits,
    /// Directories granted to a Wasm plugin through WASI, each visible under its own path.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// The token the plugin's link presents, when access rules are configured.
    #[serde(default)]
    pub token: Option<String>,
    /// Where chunks the plugin fails on are published as dead letters (`0x…/len`, at most
    /// /64), or nowhere. See `canopy::plugin::dead_letter` for their form.
    #[serde(default)]
    pub dead_letter: Option<String>,
}

impl PluginConfig {
    /// The plugin's name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let stem = self.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            stem.strip_prefix("lib").map(str::to_owned).unwrap_or(stem)
        })
    }

    /// The plugin's kind, from the setting or the file's extension.
    pub fn kind(&self) -> PluginKind {
        self.kind.unwrap_or_else(|| PluginKind::of(&self.file))
    }

    /// The dead-letter filter, parsed; fails on text that is not a filter of at most /64.
    pub fn dead_letter_filter(&self) -> anyhow::Result<Option<Filter>> {
        let Some(text) = &self.dead_letter else { return Ok(None) };
        let filter: Filter =
            text.parse().map_err(|e| anyhow::anyhow!("plugin {}: dead_letter {text:?}: {e}", self.name()))?;
        if filter.prefix_len() > canopy::plugin::MAX_DEAD_LETTER_LEN {
            bail!(
                "plugin {}: dead_letter {text:?} is longer than /{}; dead letters need at least 64 bits of their own",
                self.name(),
                canopy::plugin::MAX_DEAD_LETTER_LEN
            );
        }
        Ok(Some(filter))
    }

    /// The configuration text handed to `init`.
    pub fn config_json(&self) -> String {
        if self.config.is_null() { "{}".to_owned() } else { self.config.to_string() }
    }
}

/// Everything a relay is configured with. Every field has a default, so an empty TOML file
/// (or `RelayConfig::default()`) is a working loopback relay without a parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address the QUIC listener binds. Default `127.0.0.1:4433`; port 0 picks a free
    /// port (the binary prints `listening on ADDR`).
    pub listen: SocketAddr,
    /// Whether to run the QUIC listener at all. Default true. A relay with `false` takes no
    /// QUIC connections (`listen` is ignored): a leaf that serves only its Unix socket
    /// (`unix_listen`) and its plugins, and dials its parent. It still has a TLS identity in
    /// `data`, unused.
    pub quic_listen: bool,
    /// A Unix-domain stream socket to accept links on as well, speaking the same protocol
    /// (same frames and framing as the QUIC control stream, no TLS). The socket file is
    /// created with mode 0600 (the owner only may connect), replaces a stale socket file left
    /// by a relay that is gone, and is removed at shutdown. Default none.
    pub unix_listen: Option<PathBuf>,
    /// A TCP address to accept links on as well, over TLS 1.3 with the same certificate as
    /// QUIC (ALPN `canopy/3`): the same frames and framing as the QUIC control stream, for
    /// networks that block UDP and for clients that want TCP's cheaper per-message path
    /// (SDK address `tcp://HOST:PORT`). Port 0 picks a free port (the binary prints
    /// `listening on tcp://ADDR`). Default none.
    pub tcp_listen: Option<SocketAddr>,
    /// Directory for the store, the TLS certificate and key, and the relay id. Default:
    /// `$XDG_DATA_HOME/canopy-relay`, or `./canopy-data` when `XDG_DATA_HOME` is unset.
    pub data: PathBuf,
    /// This relay's 128-bit id in hex (`0x` prefix optional). Default: random on first start,
    /// then persisted in `<data>/relay-id`.
    pub id: Option<String>,
    /// The parent relay, as `HOST:PORT`; or a list, `HOST:PORT,HOST:PORT,…` (an origin's
    /// front-ends, tried in order on every reconnect, so a child fails over between them); or
    /// `dns:DOMAIN` for the domain's origin service (`_canopy-origin._udp.DOMAIN` SRV, resolved
    /// again on every reconnect; the candidates are tried in SRV order). None for the origin
    /// relay.
    pub parent: Option<String>,
    /// With `parent = "dns:DOMAIN"`: trust the certificate fingerprints DNS publishes for
    /// the origin's front-ends (TXT `canopy-fp=HEX`). Without it, `parent_ca` or
    /// `parent_fingerprint` must vouch for them.
    pub parent_trust_dns: bool,
    /// The DNS server for `parent = "dns:…"`, `ADDR:PORT`. Default: the system's.
    pub dns_server: Option<SocketAddr>,
    /// PEM file with the certificate (or CA) to trust for the parent, e.g. the parent's
    /// `<data>/cert.pem`.
    pub parent_ca: Option<PathBuf>,
    /// Alternative to `parent_ca`: the SHA-256 fingerprint (hex of the DER, colons allowed)
    /// of the parent's certificate, pinned.
    pub parent_fingerprint: Option<String>,
    /// Token presented to the parent in the `Hello`.
    pub parent_token: Option<String>,
    /// Store capacity in bytes; the earliest-expiring chunks are evicted beyond it.
    /// Default 1 GiB.
    pub capacity_bytes: u64,
    /// Storage backend: `fjall` (default, durable), `memory`, or a Redis Cluster shared by an
    /// origin's front-ends, `redis://HOST:PORT,…` (needs role `origin-frontend`).
    pub store: StoreKind,
    /// With a Redis store: how many replicas must have each batch of inserts before its
    /// publishes are acknowledged (`WAIT`; `docs/origin.md` says what this guarantees and what
    /// not). Default 0: acknowledged once the primaries applied them.
    pub redis_min_replicas: u8,
    /// TCP address for the Prometheus endpoint (`GET /metrics`). None disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Access rules. With none, every connection may publish and subscribe everything (a
    /// warning is logged when the relay listens on a non-loopback address).
    pub access: Vec<AccessRule>,
    /// Bound on each link's outgoing queue, in frames. Deliveries beyond it wait in their
    /// subscription's backlog, and the relay stops reading a link whose queue is full.
    /// Default 1024.
    pub max_queue: usize,
    /// Live chunks one subscription may have waiting (for its subscriber's credit, or for its
    /// link to drain) before the relay ends it with `SlowConsumer`. Default 4096.
    pub max_backlog: usize,
    /// How often expired chunks are evicted, in milliseconds. Default 1000.
    pub evict_interval_ms: u64,
    /// How publishes are made durable (fjall store; the memory store keeps nothing across a
    /// restart either way). Unset (the default): a publish is acknowledged after the fsync
    /// that covers it; fsyncs run on a thread of their own, one for all the publishes that
    /// arrived meanwhile (group commit). Set to N: a publish is acknowledged once written,
    /// and the store is synced at least every N milliseconds, so a crash (of the machine or
    /// the process killed mid-write) can lose the publishes acknowledged in the last N ms.
    /// That is NATS JetStream's behaviour. Either way a child relay receives a chunk
    /// published here only once it is synced (see `docs/relay.md`, "Durability").
    pub sync_interval_ms: Option<u64>,
    /// The largest UDP payload the QUIC endpoints accept and probe for by path-MTU discovery,
    /// in bytes (1,200 to 65,527). Default 1452, within an Ethernet MTU. Larger values let a
    /// packet carry several chunks where the path allows it (jumbo frames, loopback); probes
    /// above a path's real MTU are lost and cost nothing else. On loopback 9000 measured
    /// slower than 1452 (`docs/relay.md`, "Packet size").
    pub max_udp_payload: u16,
    /// How long to wait before connecting again after the parent refused this relay (a wrong
    /// token, a cycle, another protocol version), in milliseconds. Retrying sooner would only
    /// be refused again; a lost connection is retried within 5 s instead. Default 300000
    /// (5 minutes).
    pub parent_refused_backoff_ms: u64,
    /// Announce the relay on the local network by mDNS (`_canopy._udp.local.`, with its QUIC
    /// port, addresses, id, role, protocol version and certificate fingerprint; see
    /// [`crate::advertise`]). Needs the QUIC listener. Default false.
    pub advertise: bool,
    /// The relay's role, announced with `advertise`: `origin`, `origin-frontend` (one of
    /// several front-ends of an origin over a Redis store), `cloud` or `local`. Default:
    /// `origin-frontend` with a Redis store, else `origin` without a parent and `local` with
    /// one.
    pub role: Option<RelayRole>,
    /// Plugins to load, each a `[[plugin]]` table.
    #[serde(rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    /// Where compiled Wasm plugins are cached. Default `<data>/plugin-cache`.
    pub plugin_cache: Option<PathBuf>,
}

/// The default data directory: `$XDG_DATA_HOME/canopy-relay`, else `./canopy-data`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("canopy-relay"),
        _ => PathBuf::from("./canopy-data"),
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            quic_listen: true,
            unix_listen: None,
            tcp_listen: None,
            data: default_data_dir(),
            id: None,
            parent: None,
            parent_trust_dns: false,
            dns_server: None,
            parent_ca: None,
            parent_fingerprint: None,
            parent_token: None,
            capacity_bytes: 1 << 30,
            store: StoreKind::Fjall,
            redis_min_replicas: 0,
            metrics_listen: None,
            access: Vec::new(),
            max_queue: 1024,
            max_backlog: 4096,
            evict_interval_ms: 1000,
            sync_interval_ms: None,
            max_udp_payload: canopy_sdk::DEFAULT_MAX_UDP_PAYLOAD,
            parent_refused_backoff_ms: 300_000,
            advertise: false,
            role: None,
            plugins: Vec::new(),
            plugin_cache: None,
        }
    }
}

impl RelayConfig {
    /// The access rules as the routing core takes them; fails on a filter that does not
    /// parse.
    pub fn access_rules(&self) -> anyhow::Result<Access> {
        let parse = |token: &str, list: &[String]| -> anyhow::Result<Vec<Filter>> {
            list.iter()
                .map(|s| {
                    s.parse::<Filter>()
                        .map_err(|e| anyhow::anyhow!("access rule for token {token:?}: filter {s:?}: {e}"))
                })
                .collect()
        };
        let mut rules = Vec::new();
        for rule in &self.access {
            let grant =
                Grant { publish: parse(&rule.token, &rule.publish)?, subscribe: parse(&rule.token, &rule.subscribe)? };
            rules.push((rule.token.clone(), grant));
        }
        Ok(Access::with_rules(rules))
    }

    /// Checks settings that serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(parent) = &self.parent
            && parent.split(',').any(|p| p.trim().starts_with("tcp://"))
        {
            bail!("parent {parent:?}: a relay reaches its parent over QUIC; tcp:// addresses are for clients");
        }
        if self.max_queue == 0 {
            bail!("max_queue must be at least 1");
        }
        if self.max_backlog == 0 {
            bail!("max_backlog must be at least 1");
        }
        if self.evict_interval_ms == 0 {
            bail!("evict_interval_ms must be at least 1");
        }
        if self.sync_interval_ms == Some(0) {
            bail!("sync_interval_ms must be at least 1 (or unset: acknowledge after each fsync)");
        }
        if !(1200..=65_527).contains(&self.max_udp_payload) {
            bail!("max_udp_payload must be between 1200 and 65527 bytes, not {}", self.max_udp_payload);
        }
        if self.parent_refused_backoff_ms == 0 {
            bail!("parent_refused_backoff_ms must be at least 1");
        }
        let by_dns = self.parent.as_deref().is_some_and(|p| p.starts_with("dns:"));
        if self.parent.is_some() && self.parent_ca.is_none() && self.parent_fingerprint.is_none() && !(by_dns && self.parent_trust_dns) {
            bail!("a parent needs parent_ca (a PEM file to trust) or parent_fingerprint (SHA-256 of its certificate){}", if by_dns { ", or parent_trust_dns" } else { "" });
        }
        if let Some(id) = &self.id {
            parse_relay_id(id)?;
        }
        let redis = matches!(self.store, StoreKind::Redis { .. });
        let frontend = self.role == Some(RelayRole::OriginFrontend);
        if frontend && !redis {
            bail!("role origin-frontend needs a Redis store (store = \"redis://HOST:PORT,…\"): the front-ends of an origin share it");
        }
        if redis && self.role.is_some_and(|role| role != RelayRole::OriginFrontend) {
            bail!("a Redis store is for the origin's front-ends: role must be origin-frontend, not {}", self.role.expect("checked"));
        }
        if redis && self.parent.is_some() {
            bail!("an origin front-end (Redis store) has no parent: it is the root of the tree");
        }
        if let Some(path) = &self.unix_listen
            && path.as_os_str().is_empty()
        {
            bail!("unix_listen is an empty path");
        }
        if self.advertise && !self.quic_listen {
            bail!("advertise needs the QUIC listener (quic_listen = true): mDNS announces its port");
        }
        if !self.quic_listen && self.unix_listen.is_none() && self.tcp_listen.is_none() && self.plugins.is_empty() {
            bail!("quic_listen = false needs unix_listen, tcp_listen or a plugin: the relay would serve nothing");
        }
        self.access_rules()?;
        let mut names = std::collections::HashSet::new();
        for plugin in &self.plugins {
            let name = plugin.name();
            if name.is_empty() || name.contains('\0') {
                bail!("plugin {} needs a name", plugin.file.display());
            }
            if !names.insert(name.clone()) {
                bail!("two plugins are called {name:?}; give one a different `name`");
            }
            plugin.dead_letter_filter()?;
        }
        Ok(())
    }
}

/// Parses a relay id written in hex, with or without `0x`.
pub fn parse_relay_id(text: &str) -> anyhow::Result<RelayId> {
    let hex = text.trim();
    let hex = hex.strip_prefix("0x").unwrap_or(hex);
    let value = u128::from_str_radix(hex, 16).with_context(|| format!("relay id {text:?} is not 128-bit hex"))?;
    Ok(RelayId(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_is_default() {
        let config: RelayConfig = toml_like_default();
        assert_eq!(config.max_queue, 1024);
        assert_eq!(config.capacity_bytes, 1 << 30);
        assert_eq!(config.store, StoreKind::Fjall);
    }

    fn toml_like_default() -> RelayConfig {
        RelayConfig::default()
    }

    #[test]
    fn sync_interval_and_udp_payload_are_checked() {
        let ok = RelayConfig { sync_interval_ms: Some(200), max_udp_payload: 9000, ..RelayConfig::default() };
        ok.validate().unwrap();
        assert_eq!(RelayConfig::default().max_udp_payload, 1452);
        assert_eq!(RelayConfig::default().sync_interval_ms, None, "ack after fsync by default");
        let zero = RelayConfig { sync_interval_ms: Some(0), ..RelayConfig::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("sync_interval_ms"));
        for bad in [1199, 65_528] {
            let config = RelayConfig { max_udp_payload: bad, ..RelayConfig::default() };
            assert!(config.validate().unwrap_err().to_string().contains("max_udp_payload"), "{bad}");
        }
    }

    #[test]
    fn relay_ids_parse_with_or_without_prefix() {
        assert_eq!(parse_relay_id("0x2a").unwrap(), RelayId(42));
        assert_eq!(parse_relay_id("2A").unwrap(), RelayId(42));
        assert!(parse_relay_id("xyz").is_err());
    }

    #[test]
    fn access_rules_parse_filters() {
        let config = RelayConfig {
            access: vec![AccessRule {
                token: "alice".into(),
                publish: vec!["0x0a000000000000000000000000000000/8".into()],
                subscribe: vec!["0x00000000000000000000000000000000/0".into()],
            }],
            ..RelayConfig::default()
        };
        let access = config.access_rules().unwrap();
        assert!(!access.is_open());
        let bad = RelayConfig {
            access: vec![AccessRule { token: "t".into(), publish: vec!["nope".into()], subscribe: vec![] }],
            ..RelayConfig::default()
        };
        assert!(bad.access_rules().is_err());
    }

    #[test]
    fn plugins_are_read_from_plugin_tables() {
        use figment::Figment;
        use figment::providers::{Format, Serialized, Toml};
        let toml = r#"
            [[plugin]]
            file = "plugins/echo.wasm"
            [plugin.config]
            requests = "0x0e010000000000000000000000000000/16"
            replies = "0x0e020000000000000000000000000000/16"
            [plugin.limits]
            deadline_ms = 250

            [[plugin]]
            file = "/opt/canopy/libaudit.so"
            name = "audit"
            dead_letter = "0x0dea0000000000000000000000000000/16"
        "#;
        let config: RelayConfig =
            Figment::from(Serialized::defaults(RelayConfig::default())).merge(Toml::string(toml)).extract().unwrap();
        config.validate().unwrap();
        let [echo, audit] = config.plugins.as_slice() else { panic!("two plugins") };
        assert_eq!((echo.name(), echo.kind()), ("echo".to_owned(), PluginKind::Wasm));
        assert_eq!(echo.limits, Limits { deadline_ms: 250, ..Limits::default() });
        assert_eq!(
            echo.config_json(),
            r#"{"replies":"0x0e020000000000000000000000000000/16","requests":"0x0e010000000000000000000000000000/16"}"#
        );
        assert_eq!(
            (audit.name(), audit.kind(), audit.config_json()),
            ("audit".to_owned(), PluginKind::Native, "{}".into())
        );
        assert_eq!(echo.dead_letter, None);
        assert_eq!(audit.dead_letter_filter().unwrap(), Some("0x0dea0000000000000000000000000000/16".parse().unwrap()));
        let long = PluginConfig { dead_letter: Some("0x0dea0000000000000000000000000000/72".into()), ..audit.clone() };
        assert!(long.dead_letter_filter().unwrap_err().to_string().contains("/64"));

        let twice = RelayConfig { plugins: vec![echo.clone(), echo.clone()], ..RelayConfig::default() };
        assert!(twice.validate().unwrap_err().to_string().contains("two plugins are called \"echo\""));
    }
}
