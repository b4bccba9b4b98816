//! Finding relays by DNS (`docs/relay.md`, discovery): a domain publishes its relays as SRV
//! records, and the certificate fingerprints they may present as TXT records. Relays on the
//! local network are found by mDNS instead ([`mdns`]).
//!
//! | record | what |
//! |---|---|
//! | `_canopy-cloud._udp.DOMAIN SRV prio weight port host` | a cloud relay |
//! | `_canopy-origin._udp.DOMAIN SRV prio weight port host` | a front-end of the origin |
//! | `host TXT "canopy-fp=HEX"` | a fingerprint that host's certificate may have (several allowed) |
//! | `_canopy-cloud._udp.DOMAIN TXT "canopy-fp=HEX"` | a fingerprint any host of the service may have |
//! | `TXT "canopy-ca=HEX"` (at a host or the service) | a CA certificate, sent in the relay's chain, that issued its certificate for its host name |
//!
//! **Discovery finds addresses; it does not create trust** ([`TrustConfig`]): a relay found
//! here is used only if its certificate chains to a configured CA, matches a fingerprint
//! pinned in configuration, or matches a fingerprint DNS carries and the user said to trust
//! DNS (`--trust-dns`; for a relay found by mDNS, the fingerprint its announcement carries and
//! `--trust-mdns`). Otherwise it is refused with [`DiscoveryError::Untrusted`], before any
//! connection is made.
//!
//! Every lookup is bounded by [`DnsOptions::timeout`]; finding nothing is
//! [`DiscoveryError::NotFound`], never an empty success.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::{Resolver, TokioResolver};

use crate::{Client, ClientError, ConnectOptions, Trust, parse_fingerprint};

pub mod mdns;

/// The TXT prefix of a certificate fingerprint.
pub const FINGERPRINT_TXT: &str = "canopy-fp=";
/// The TXT prefix of a CA pin: the fingerprint of a CA certificate the relay sends in its
/// chain, which issued its certificate for its host name.
pub const CA_TXT: &str = "canopy-ca=";

/// Which of a domain's relay services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Cloud relays: `_canopy-cloud._udp.DOMAIN`.
    Cloud,
    /// The origin's front-ends: `_canopy-origin._udp.DOMAIN`.
    Origin,
    /// A relay on the local network, found by mDNS ([`mdns::SERVICE_TYPE`]); its "domain" is
    /// `local`.
    Local,
}

impl Service {
    /// The SRV name of this service in `domain` (fully qualified); for [`Service::Local`],
    /// the mDNS service type whatever `domain` says.
    pub fn srv_name(self, domain: &str) -> String {
        let label = match self {
            Service::Cloud => "_canopy-cloud._udp",
            Service::Origin => "_canopy-origin._udp",
            Service::Local => return mdns::SERVICE_TYPE.to_string(),
        };
        format!("{label}.{}.", domain.trim_end_matches('.'))
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Service::Cloud => "cloud",
            Service::Origin => "origin",
            Service::Local => "local",
        })
    }
}

/// A relay that discovery found: where, and what DNS says about it. Not yet trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The domain it was found in.
    pub domain: String,
    /// Which service.
    pub service: Service,
    /// The SRV target host (no trailing dot): the name its certificate should carry.
    pub host: String,
    /// Its address.
    pub addr: SocketAddr,
    /// SRV priority (lower first).
    pub priority: u16,
    /// SRV weight (higher first among equal priorities).
    pub weight: u16,
    /// The certificate fingerprints DNS publishes for it (the host's and the service's), or
    /// its mDNS announcement carries ([`Service::Local`]), normalised to lowercase hex.
    pub fingerprints: Vec<String>,
    /// The CA certificates DNS pins for it (TXT `canopy-ca=HEX`, the host's and the
    /// service's): its certificate may instead be issued by one of them for its host name.
    pub ca_pins: Vec<String>,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.service {
            Service::Local => write!(f, "local relay {} ({}) found by mDNS", self.host, self.addr),
            _ => write!(f, "{} relay {} ({}) of {}", self.service, self.host, self.addr, self.domain),
        }
    }
}

/// How to ask DNS.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// The name server to ask (`ADDR:PORT`); `None` uses the system's (`/etc/resolv.conf`).
    pub server: Option<SocketAddr>,
    /// The most one discovery may take, all its lookups together.
    pub timeout: Duration,
}

impl Default for DnsOptions {
    /// The system's resolver, 5 s.
    fn default() -> DnsOptions {
        DnsOptions { server: None, timeout: Duration::from_secs(5) }
    }
}

impl DnsOptions {
    /// [`DnsOptions::default`], with the server from `CANOPY_DNS_SERVER` if it is set.
    pub fn from_env() -> Result<DnsOptions, DiscoveryError> {
        let mut options = DnsOptions::default();
        if let Ok(server) = std::env::var("CANOPY_DNS_SERVER") {
            options.server = Some(server.parse().map_err(|_| DiscoveryError::Config(format!("CANOPY_DNS_SERVER={server:?} is not ADDR:PORT")))?);
        }
        Ok(options)
    }
}

/// Why discovery found nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// DNS has no such records.
    #[error("no relays found: {0}")]
    NotFound(String),
    /// The lookups took longer than allowed.
    #[error("DNS discovery of {name} took longer than {timeout:?}")]
    Timeout {
        /// What was looked up.
        name: String,
        /// The bound.
        timeout: Duration,
    },
    /// A lookup failed (the server refused, or answered nonsense).
    #[error("DNS lookup of {name} failed: {message}")]
    Dns {
        /// What was looked up.
        name: String,
        /// The resolver's words.
        message: String,
    },
    /// A relay was found but nothing says to trust it.
    #[error(
        "{found} is not trusted: {why}. Discovery finds addresses, not trust: give --ca, pin its fingerprint with --fingerprint, or pass --trust-dns to trust the fingerprints DNS publishes (--trust-mdns: those mDNS announces)"
    )]
    Untrusted {
        /// The relay.
        found: String,
        /// What was missing.
        why: String,
    },
    /// Every candidate was tried and none could be connected to (each reason, in order).
    #[error("no relay could be reached: {0}")]
    Unreachable(String),
    /// A relay trusted on first use presents another certificate now.
    #[error(
        "the relay {name} presents certificate {seen}, but {path}:{line} pins {pinned}. Someone may be intercepting the connection, or the relay's key changed; if you know it changed, remove that line and connect again"
    )]
    Changed {
        /// The relay, as it was reached (`host:port`).
        name: String,
        /// What it presents.
        seen: String,
        /// What was pinned.
        pinned: String,
        /// The known-relays file.
        path: String,
        /// The line of the pin.
        line: usize,
    },
    /// mDNS could not be used (the daemon could not start, or stopped).
    #[error("mDNS: {0}")]
    Mdns(String),
    /// The known-relays file cannot be read or written.
    #[error("known relays file {path}: {message}")]
    Known {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

fn resolver(options: &DnsOptions) -> Result<TokioResolver, DiscoveryError> {
    let dns = |e: hickory_resolver::net::NetError| DiscoveryError::Dns { name: "the resolver".into(), message: e.to_string() };
    let mut builder = match options.server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
            let mut b = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        }
        None => TokioResolver::builder_tokio().map_err(dns)?,
    };
    let opts = builder.options_mut();
    opts.timeout = options.timeout.min(Duration::from_secs(2));
    opts.attempts = 1;
    builder.build().map_err(dns)
}

fn fingerprints_in(lookup: &hickory_resolver::lookup::Lookup, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for record in lookup.answers() {
        let RData::TXT(txt) = &record.data else { continue };
        let text = txt.to_string();
        if let Some(fp) = text.trim().strip_prefix(prefix) {
            match parse_fingerprint(fp) {
                Ok(bytes) => out.push(bytes.iter().map(|b| format!("{b:02x}")).collect()),
                Err(_) => tracing::warn!(txt = %text, "a canopy TXT record that is not a fingerprint: ignored"),
            }
        }
    }
    out
}

/// The relays of `service` in `domain`, best first (SRV priority, then weight).
pub async fn lookup(domain: &str, service: Service, options: &DnsOptions) -> Result<Vec<Found>, DiscoveryError> {
    let srv = service.srv_name(domain);
    tokio::time::timeout(options.timeout, lookup_inner(domain, service, &srv, options))
        .await
        .unwrap_or(Err(DiscoveryError::Timeout { name: srv, timeout: options.timeout }))
}

async fn lookup_inner(domain: &str, service: Service, srv: &str, options: &DnsOptions) -> Result<Vec<Found>, DiscoveryError> {
    let failed = |name: &str, e: hickory_resolver::net::NetError| {
        if e.is_no_records_found() { DiscoveryError::NotFound(format!("no {name} records")) } else { DiscoveryError::Dns { name: name.to_string(), message: e.to_string() } }
    };
    let name = Name::from_utf8(srv).map_err(|e| DiscoveryError::Config(format!("{domain:?} is no domain: {e}")))?;
    let resolver = resolver(options)?;
    let records = resolver.srv_lookup(name.clone()).await.map_err(|e| failed(srv, e))?;
    // Fingerprints and CA pins for every host of the service.
    let (shared, shared_cas) = match resolver.txt_lookup(name).await {
        Ok(l) => (fingerprints_in(&l, FINGERPRINT_TXT), fingerprints_in(&l, CA_TXT)),
        Err(e) if e.is_no_records_found() => (Vec::new(), Vec::new()),
        Err(e) => return Err(failed(srv, e)),
    };
    let mut found = Vec::new();
    for record in records.answers() {
        let RData::SRV(s) = &record.data else { continue };
        // A target of "." says the service is not offered.
        if s.target.is_root() {
            continue;
        }
        let host = s.target.to_ascii().trim_end_matches('.').to_string();
        let ips: Vec<IpAddr> = resolver.lookup_ip(s.target.clone()).await.map_err(|e| failed(&host, e))?.iter().collect();
        let (mut fingerprints, mut ca_pins) = match resolver.txt_lookup(s.target.clone()).await {
            Ok(l) => (fingerprints_in(&l, FINGERPRINT_TXT), fingerprints_in(&l, CA_TXT)),
            Err(e) if e.is_no_records_found() => (Vec::new(), Vec::new()),
            Err(e) => return Err(failed(&host, e)),
        };
        fingerprints.extend(shared.iter().cloned());
        fingerprints.sort();
        fingerprints.dedup();
        ca_pins.extend(shared_cas.iter().cloned());
        ca_pins.sort();
        ca_pins.dedup();
        for ip in ips {
            found.push(Found {
                domain: domain.trim_end_matches('.').to_string(),
                service,
                host: host.clone(),
                addr: SocketAddr::new(ip, s.port),
                priority: s.priority,
                weight: s.weight,
                fingerprints: fingerprints.clone(),
                ca_pins: ca_pins.clone(),
            });
        }
    }
    if found.is_empty() {
        return Err(DiscoveryError::NotFound(format!("{srv} names no reachable host")));
    }
    found.sort_by_key(|f| (f.priority, std::cmp::Reverse(f.weight), f.host.clone(), f.addr));
    Ok(found)
}

/// The relays an endpoint should use in `domain` (`--relay dns:DOMAIN`): its cloud relays,
/// then the origin's front-ends. Not found only if the domain has neither.
pub async fn relays(domain: &str, options: &DnsOptions) -> Result<Vec<Found>, DiscoveryError> {
    let cloud = lookup(domain, Service::Cloud, options).await;
    let origin = lookup(domain, Service::Origin, options).await;
    match (cloud, origin) {
        (Ok(mut c), Ok(o)) => {
            c.extend(o);
            Ok(c)
        }
        (Ok(c), Err(DiscoveryError::NotFound(_))) => Ok(c),
        (Err(DiscoveryError::NotFound(_)), Ok(o)) => Ok(o),
        (Err(DiscoveryError::NotFound(a)), Err(DiscoveryError::NotFound(b))) => Err(DiscoveryError::NotFound(format!("{a}; {b}"))),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// What makes a discovered relay trusted (discovery itself never does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustConfig {
    /// A CA (PEM) the relay's certificate must chain to, naming the SRV target host.
    pub ca_pem: Option<String>,
    /// Fingerprints pinned in configuration: the relay's certificate must be one of them.
    pub pinned: Vec<String>,
    /// Trust the fingerprints DNS publishes for the relay (`--trust-dns`).
    pub trust_dns: bool,
    /// Trust the fingerprint a relay found by mDNS announces for itself (`--trust-mdns`):
    /// anyone on the local network can announce anything, so this trusts the network.
    pub trust_mdns: bool,
    /// The relays trusted on first use before: an entry for a relay pins it, whatever else
    /// says. `None`: no such file is read or written.
    pub known: Option<KnownRelays>,
    /// Trust a relay with no entry in [`TrustConfig::known`] on first use, and pin it there
    /// (`--trust-on-first-use`).
    pub first_use: bool,
}

/// How to trust `found` under `config`, and the TLS server name to expect; refused, with
/// what was missing, when nothing makes it trusted.
pub fn trust_for(found: &Found, config: &TrustConfig) -> Result<(Trust, String), DiscoveryError> {
    if let Some(pem) = &config.ca_pem {
        return Ok((Trust::CaPem(pem.clone()), found.host.clone()));
    }
    let mut accept: Vec<String> = config.pinned.clone();
    let mut cas = Vec::new();
    let (trust_published, source, flag) = match found.service {
        Service::Local => (config.trust_mdns, "mDNS", "--trust-mdns"),
        Service::Cloud | Service::Origin => (config.trust_dns, "DNS", "--trust-dns"),
    };
    if trust_published {
        accept.extend(found.fingerprints.iter().cloned());
        cas.extend(found.ca_pins.iter().cloned());
    }
    if accept.is_empty() && cas.is_empty() {
        let published: Vec<String> = found.fingerprints.iter().chain(&found.ca_pins).cloned().collect();
        let why = if published.is_empty() {
            format!("no CA is configured, no fingerprint is pinned, and {source} publishes none for it")
        } else {
            format!("no CA is configured, no fingerprint is pinned, and {source}'s ({}) are not trusted without {flag}", published.join(", "))
        };
        return Err(DiscoveryError::Untrusted { found: found.to_string(), why });
    }
    if cas.is_empty() {
        return Ok((Trust::Fingerprints(accept), found.host.clone()));
    }
    Ok((Trust::Pinned { certs: accept, cas }, found.host.clone()))
}

/// Connects to the first of `candidates` that is trusted and reachable, in order; returns
/// the client and the candidate it reached. `base` gives everything but the address and
/// trust (token, buffers, timeouts). An untrusted candidate is never contacted.
pub async fn connect_first(candidates: &[Found], config: &TrustConfig, base: &ConnectOptions) -> Result<(Client, Found), DiscoveryError> {
    let mut reasons = Vec::new();
    for found in candidates {
        let name = format!("{}:{}", found.host, found.addr.port());
        let known = config.known.as_ref().map(|k| k.get(&name)).transpose()?.flatten();
        let configured = trust_for(found, config);
        // A pin in the known-relays file decides; else what is configured; else, with
        // --trust-on-first-use, the certificate presented now (pinned once connected).
        let decided = match (&config.known, configured) {
            (Some(file), configured) if known.is_some() || (config.first_use && configured.is_err()) => {
                first_use(file, &name, found.addr, &found.host, base.connect_timeout).await.map(|f| (f.trust, found.host.clone(), f.new))
            }
            (_, configured) => configured.map(|(trust, server_name)| (trust, server_name, None)),
        };
        let (trust, server_name, new) = match decided {
            Ok(d) => d,
            Err(e) if candidates.len() == 1 || matches!(e, DiscoveryError::Changed { .. }) => return Err(e),
            Err(e) => {
                reasons.push(e.to_string());
                continue;
            }
        };
        // mDNS and DNS announce the QUIC port.
        let opts = ConnectOptions { addr: found.addr.to_string(), transport: crate::Transport::Quic, trust, server_name, ..base.clone() };
        match Client::connect(opts).await {
            Ok(client) => {
                if let (Some(fp), Some(file)) = (new, &config.known) {
                    file.pin(&name, &fp)?;
                }
                return Ok((client, found.clone()));
            }
            Err(e) => reasons.push(format!("{found}: {}", explain(&e))),
        }
    }
    Err(DiscoveryError::Unreachable(reasons.join("; ")))
}

/// The relays this user trusted on first use, as SSH's `known_hosts` is for hosts: one line
/// per relay, `NAME FINGERPRINT`, NAME being `host:port` as it was reached. Lines starting
/// with `#` are comments. A relay with an entry must present that certificate; a different
/// one is refused ([`DiscoveryError::Changed`]) until the line is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRelays {
    path: std::path::PathBuf,
}

impl KnownRelays {
    /// The file at `path`.
    pub fn at(path: impl Into<std::path::PathBuf>) -> KnownRelays {
        KnownRelays { path: path.into() }
    }

    /// `CANOPY_KNOWN_RELAYS`, else `$XDG_DATA_HOME/canopy/known_relays`, else
    /// `~/.local/share/canopy/known_relays`; `None` if none of those can be named.
    pub fn default_location() -> Option<KnownRelays> {
        if let Some(p) = std::env::var_os("CANOPY_KNOWN_RELAYS").filter(|p| !p.is_empty()) {
            return Some(KnownRelays::at(p));
        }
        let data = match std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
            Some(d) => std::path::PathBuf::from(d),
            None => std::path::PathBuf::from(std::env::var_os("HOME").filter(|p| !p.is_empty())?).join(".local/share"),
        };
        Some(KnownRelays::at(data.join("canopy/known_relays")))
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn error(&self, message: impl std::fmt::Display) -> DiscoveryError {
        DiscoveryError::Known { path: self.path.display().to_string(), message: message.to_string() }
    }

    /// The pin for `name`: its line number (from 1) and fingerprint.
    pub fn get(&self, name: &str) -> Result<Option<(usize, String)>, DiscoveryError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (n, fp) = line.split_once(char::is_whitespace).ok_or_else(|| self.error(format!("line {} is not `NAME FINGERPRINT`", i + 1)))?;
            if n == name {
                parse_fingerprint(fp.trim()).map_err(|e| self.error(format!("line {}: {e}", i + 1)))?;
                return Ok(Some((i + 1, fp.trim().to_ascii_lowercase())));
            }
        }
        Ok(None)
    }

    /// Pins `fingerprint` for `name` (appended; the file and its directory are created, 0600).
    pub fn pin(&self, name: &str, fingerprint: &str) -> Result<(), DiscoveryError> {
        use std::io::Write as _;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.error(e))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.path).map_err(|e| self.error(e))?;
        writeln!(file, "{name} {fingerprint}").map_err(|e| self.error(e))?;
        tracing::info!(relay = name, fingerprint, path = %self.path.display(), "trusted on first use: pinned");
        Ok(())
    }
}

/// What trust on first use decided for one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstUse {
    /// How to trust it now: exactly the certificate it presented, or the one pinned.
    pub trust: Trust,
    /// Set on a first use: the fingerprint to pin once the connection succeeds.
    pub new: Option<String>,
}

/// Trust on first use for the relay `name` at `addr`: with a pin in `known`, the relay must
/// present it (else [`DiscoveryError::Changed`]); without one, the certificate it presents
/// now is the one trusted, to be pinned once connected. Learns the certificate with
/// [`crate::probe_fingerprint`], bounded by `timeout`.
pub async fn first_use(known: &KnownRelays, name: &str, addr: SocketAddr, server_name: &str, timeout: Duration) -> Result<FirstUse, DiscoveryError> {
    let seen = crate::probe_fingerprint(addr, server_name, timeout).await.map_err(|e| DiscoveryError::Unreachable(format!("{name}: {e}")))?;
    match known.get(name)? {
        Some((_, pinned)) if pinned == seen => Ok(FirstUse { trust: Trust::Fingerprint(pinned), new: None }),
        Some((line, pinned)) => Err(DiscoveryError::Changed { name: name.into(), seen, pinned, path: known.path().display().to_string(), line }),
        None => Ok(FirstUse { trust: Trust::Fingerprint(seen.clone()), new: Some(seen) }),
    }
}

/// A connection error in words a user acts on.
fn explain(e: &ClientError) -> String {
    let text = e.to_string();
    if text.contains("matches no pinned fingerprint") || text.contains("invalid peer certificate") {
        format!("its certificate is not one it is trusted with ({text})")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(fingerprints: &[&str]) -> Found {
        Found {
            domain: "example.test".into(),
            service: Service::Cloud,
            host: "cloud.example.test".into(),
            addr: "127.0.0.1:4433".parse().unwrap(),
            priority: 10,
            weight: 5,
            fingerprints: fingerprints.iter().map(|s| s.to_string()).collect(),
            ca_pins: Vec::new(),
        }
    }

    #[test]
    fn a_discovered_relay_is_trusted_only_by_configuration() {
        let fp = "ab".repeat(32);
        let f = found(&[&fp]);
        let err = trust_for(&f, &TrustConfig::default()).unwrap_err();
        assert!(matches!(&err, DiscoveryError::Untrusted { why, .. } if why.contains("--trust-dns")), "{err}");
        assert!(err.to_string().contains("cloud relay cloud.example.test (127.0.0.1:4433) of example.test is not trusted"), "{err}");
        let (trust, name) = trust_for(&f, &TrustConfig { trust_dns: true, ..TrustConfig::default() }).unwrap();
        assert_eq!((trust, name.as_str()), (Trust::Fingerprints(vec![fp.clone()]), "cloud.example.test"));
        let pinned = "cd".repeat(32);
        let (trust, _) = trust_for(&found(&[]), &TrustConfig { pinned: vec![pinned.clone()], ..TrustConfig::default() }).unwrap();
        assert_eq!(trust, Trust::Fingerprints(vec![pinned]));
        let none = trust_for(&found(&[]), &TrustConfig { trust_dns: true, ..TrustConfig::default() }).unwrap_err();
        assert!(none.to_string().contains("DNS publishes none"), "{none}");
        let (trust, _) = trust_for(&f, &TrustConfig { ca_pem: Some("PEM".into()), ..TrustConfig::default() }).unwrap();
        assert_eq!(trust, Trust::CaPem("PEM".into()));
    }

    #[test]
    fn service_names_are_fully_qualified() {
        assert_eq!(Service::Cloud.srv_name("example.test"), "_canopy-cloud._udp.example.test.");
        assert_eq!(Service::Origin.srv_name("example.test."), "_canopy-origin._udp.example.test.");
    }
}
