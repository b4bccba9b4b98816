//! Finding relays on the local network by mDNS (`docs/relay.md`, discovery): a relay started
//! with `--advertise` announces the service [`SERVICE_TYPE`] (`_canopy._udp.local.`) with its
//! QUIC port, its addresses and these TXT properties:
//!
//! | key | value |
//! |---|---|
//! | [`TXT_ID`] (`id`) | the relay id, `0x` and 32 hex digits |
//! | [`TXT_ROLE`] (`role`) | `origin`, `cloud` or `local` |
//! | [`TXT_PROTOCOL`] (`proto`) | the wire protocol version it speaks, decimal |
//! | [`TXT_FINGERPRINT`] (`fp`) | SHA-256 of its certificate, 64 hex digits ([`crate::fingerprint`]) |
//!
//! [`browse_local`] lists what answers within a timeout, one [`LocalRelay`] per service
//! instance.
//!
//! **Discovery finds addresses; it does not create trust.** Anyone on the link can announce
//! anything. A relay found here is used under the same rules as one found by DNS
//! ([`super::TrustConfig`], [`super::trust_for`]): a configured CA, a pinned fingerprint, the
//! known-relays file (trust on first use), or — only with the explicit opt-in
//! [`super::TrustConfig::trust_mdns`] (`--trust-mdns`) — the fingerprint its own announcement
//! carries. [`LocalRelay::candidates`] turns a found relay into candidates for
//! [`super::connect_first`].
//!
//! Values that do not parse (a TXT property from the network is anything) never fail a
//! browse: the field is left `None` and the reason is kept in [`LocalRelay::problems`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use canopy::wire::{PROTOCOL_VERSION, RelayId};
use mdns_sd::{DaemonEvent, IfKind, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent};

use super::{DiscoveryError, Found, Service};
use crate::parse_fingerprint;

/// The mDNS service type relays announce.
pub const SERVICE_TYPE: &str = "_canopy._udp.local.";
/// TXT key of the relay id (`0x` and 32 hex digits).
pub const TXT_ID: &str = "id";
/// TXT key of the relay's role (`origin`, `cloud` or `local`).
pub const TXT_ROLE: &str = "role";
/// TXT key of the wire protocol version (decimal).
pub const TXT_PROTOCOL: &str = "proto";
/// TXT key of the certificate fingerprint (64 hex digits, as [`crate::fingerprint`] prints it).
pub const TXT_FINGERPRINT: &str = "fp";

/// The longest role accepted from the network.
const MAX_ROLE_LEN: usize = 32;

/// The TXT properties a relay announces, in the order they are sent.
pub fn txt_properties(id: RelayId, role: &str, fingerprint: &str) -> Vec<(String, String)> {
    vec![
        (TXT_ID.to_string(), id.to_string()),
        (TXT_ROLE.to_string(), role.to_string()),
        (TXT_PROTOCOL.to_string(), PROTOCOL_VERSION.to_string()),
        (TXT_FINGERPRINT.to_string(), fingerprint.to_string()),
    ]
}

/// The service instance name a relay announces itself as: `canopy-` and its id in hex.
pub fn instance_name(id: RelayId) -> String {
    format!("canopy-{:032x}", id.0)
}

/// A relay found by mDNS: what its announcement says. Not yet trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRelay {
    /// The service instance, fully qualified (`canopy-<id>._canopy._udp.local.`); one entry
    /// per instance.
    pub instance: String,
    /// The mDNS host name its addresses belong to (`….local.`).
    pub host: String,
    /// The announced port: its QUIC listener's.
    pub port: u16,
    /// Where its QUIC listener is: every announced address with the announced port, IPv4
    /// first.
    pub addrs: Vec<SocketAddr>,
    /// Its relay id (TXT `id`), if announced and well formed.
    pub relay_id: Option<RelayId>,
    /// Its role (TXT `role`: `origin`, `cloud`, `local`), if announced and well formed.
    pub role: Option<String>,
    /// The protocol version it speaks (TXT `proto`), if announced and well formed.
    pub protocol: Option<u16>,
    /// Its certificate fingerprint (TXT `fp`), normalised to lowercase hex, if announced and
    /// well formed. Trusted only with [`super::TrustConfig::trust_mdns`].
    pub fingerprint: Option<String>,
    /// What was wrong with the announcement (a TXT property missing or malformed); empty
    /// when it was complete.
    pub problems: Vec<String>,
}

impl std::fmt::Display for LocalRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "local relay {}", self.instance.trim_end_matches('.'))
    }
}

impl LocalRelay {
    /// Reads one announcement: the instance, host, port, addresses (each with that port) and
    /// the TXT properties as they arrived (key, value). A missing or malformed property leaves
    /// its field `None` and is noted in `problems`.
    pub fn from_parts(
        instance: &str,
        host: &str,
        port: u16,
        addrs: impl IntoIterator<Item = SocketAddr>,
        txt: &[(String, Option<Vec<u8>>)],
    ) -> LocalRelay {
        let mut problems = Vec::new();
        let mut text = |key: &str| -> Option<String> {
            let Some((_, value)) = txt.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)) else {
                problems.push(format!("no TXT {key}"));
                return None;
            };
            match value.as_deref().map(std::str::from_utf8) {
                Some(Ok(v)) => Some(v.trim().to_string()),
                Some(Err(_)) => {
                    problems.push(format!("TXT {key} is not UTF-8"));
                    None
                }
                None => {
                    problems.push(format!("TXT {key} has no value"));
                    None
                }
            }
        };
        let id = text(TXT_ID);
        let role = text(TXT_ROLE);
        let protocol = text(TXT_PROTOCOL);
        let fingerprint = text(TXT_FINGERPRINT);
        let shown = |v: &str| v.chars().take(80).collect::<String>();
        let relay_id = id.and_then(|v| match parse_relay_id(&v) {
            Some(id) => Some(id),
            None => {
                problems.push(format!("TXT {TXT_ID}={:?} is not a relay id", shown(&v)));
                None
            }
        });
        let role = role.and_then(|v| {
            let ok = !v.is_empty()
                && v.len() <= MAX_ROLE_LEN
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if ok {
                Some(v.to_ascii_lowercase())
            } else {
                problems.push(format!("TXT {TXT_ROLE}={:?} is not a role", shown(&v)));
                None
            }
        });
        let protocol = protocol.and_then(|v| match v.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                problems.push(format!("TXT {TXT_PROTOCOL}={:?} is not a protocol version", shown(&v)));
                None
            }
        });
        let fingerprint = fingerprint.and_then(|v| match parse_fingerprint(&v) {
            Ok(bytes) => Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
            Err(_) => {
                problems.push(format!("TXT {TXT_FINGERPRINT}={:?} is not a fingerprint", shown(&v)));
                None
            }
        });
        let mut addrs: Vec<SocketAddr> = addrs.into_iter().collect();
        addrs.sort_by_key(|a| (a.is_ipv6(), *a));
        addrs.dedup();
        LocalRelay {
            instance: instance.to_string(),
            host: host.to_string(),
            port,
            addrs,
            relay_id,
            role,
            protocol,
            fingerprint,
            problems,
        }
    }

    /// Reads a service mdns-sd resolved.
    pub fn from_resolved(service: &ResolvedService) -> LocalRelay {
        let port = service.get_port();
        let ips = service.get_addresses().iter().filter_map(|ip| match ip {
            ScopedIp::V4(v4) => Some(SocketAddr::new(IpAddr::V4(*v4.addr()), port)),
            ScopedIp::V6(v6) => {
                let scope = if v6.addr().is_unicast_link_local() { v6.scope_id().index } else { 0 };
                Some(SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, scope)))
            }
            _ => None,
        });
        let txt: Vec<(String, Option<Vec<u8>>)> =
            service.get_properties().iter().map(|p| (p.key().to_string(), p.val().map(<[u8]>::to_vec))).collect();
        LocalRelay::from_parts(service.get_fullname(), service.get_hostname(), port, ips, &txt)
    }

    /// Whether it speaks this SDK's protocol version.
    pub fn is_compatible(&self) -> bool {
        self.protocol == Some(PROTOCOL_VERSION)
    }

    /// Candidates for [`super::connect_first`]: one per address, in order, with
    /// [`Service::Local`], the mDNS host name (without the trailing dot) as the name its
    /// certificate is checked against with a CA and as its name in the known-relays file, and
    /// the announced fingerprint as the one discovery publishes (trusted only with
    /// [`super::TrustConfig::trust_mdns`]).
    pub fn candidates(&self) -> Vec<Found> {
        let host = self.host.trim_end_matches('.').to_string();
        self.addrs
            .iter()
            .map(|addr| Found {
                domain: "local".into(),
                service: Service::Local,
                host: host.clone(),
                addr: *addr,
                priority: 0,
                weight: 0,
                fingerprints: self.fingerprint.iter().cloned().collect(),
                ca_pins: Vec::new(),
            })
            .collect()
    }
}

/// A relay id as announced (and as `mdns:RELAY_ID` names one): `0x` (optional) and at most
/// 32 hex digits.
pub fn parse_relay_id(text: &str) -> Option<RelayId> {
    let hex = text.strip_prefix("0x").unwrap_or(text);
    if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(RelayId)
}

/// An mDNS daemon (a thread of mdns-sd's) that is shut down when dropped.
struct Daemon(ServiceDaemon);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// Starts an mDNS daemon on the standard port, loopback included (so a relay on this host,
/// or in a network namespace with only `lo`, is found as well).
pub(crate) fn daemon() -> Result<ServiceDaemon, DiscoveryError> {
    let daemon =
        ServiceDaemon::new().map_err(|e| DiscoveryError::Mdns(format!("cannot start the mDNS daemon: {e}")))?;
    // mdns-sd 0.21 uses loopback by default; said explicitly, since a relay listening on
    // 127.0.0.1 is announced there only.
    daemon.enable_interface(IfKind::LoopbackV4).map_err(|e| DiscoveryError::Mdns(format!("mDNS daemon: {e}")))?;
    Ok(daemon)
}

/// The relays that answer on the local network within `timeout`, one per service instance,
/// ordered by instance name. The whole `timeout` is spent listening (mDNS has no "that was
/// all"); an instance that says goodbye meanwhile is dropped. Finding none is
/// [`DiscoveryError::NotFound`]; a daemon that cannot start is [`DiscoveryError::Mdns`].
pub async fn browse_local(timeout: Duration) -> Result<Vec<LocalRelay>, DiscoveryError> {
    let daemon = Daemon(daemon()?);
    let monitor = daemon.0.monitor().map_err(|e| DiscoveryError::Mdns(format!("mDNS daemon: {e}")))?;
    let events =
        daemon.0.browse(SERVICE_TYPE).map_err(|e| DiscoveryError::Mdns(format!("browsing {SERVICE_TYPE}: {e}")))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut found: BTreeMap<String, LocalRelay> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    let mut monitoring = true;
    loop {
        tokio::select! {
            event = events.recv_async() => match event {
                Ok(ServiceEvent::ServiceResolved(service)) => {
                    let relay = LocalRelay::from_resolved(&service);
                    if !relay.problems.is_empty() {
                        tracing::warn!(instance = %relay.instance, problems = ?relay.problems, "a malformed canopy mDNS announcement");
                    }
                    found.insert(relay.instance.to_ascii_lowercase(), relay);
                }
                Ok(ServiceEvent::ServiceRemoved(_, fullname)) => {
                    found.remove(&fullname.to_ascii_lowercase());
                }
                Ok(_) => {}
                // The daemon ended the browse (it stopped, or fell behind).
                Err(_) => {
                    errors.push("the mDNS daemon stopped browsing".into());
                    break;
                }
            },
            event = monitor.recv_async(), if monitoring => match event {
                Ok(DaemonEvent::Error(e)) => {
                    tracing::debug!(error = %e, "mDNS daemon");
                    errors.push(e.to_string());
                }
                Ok(_) => {}
                Err(_) => monitoring = false,
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let _ = daemon.0.stop_browse(SERVICE_TYPE);
    if let Ok(status) = daemon.0.shutdown() {
        let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
    }
    if found.is_empty() {
        let mut why = format!("no relay answered for {SERVICE_TYPE} within {timeout:?}");
        if !errors.is_empty() {
            errors.dedup();
            why.push_str(&format!(" (mDNS: {})", errors.join("; ")));
        }
        return Err(DiscoveryError::NotFound(why));
    }
    Ok(found.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(pairs: &[(&str, &[u8])]) -> Vec<(String, Option<Vec<u8>>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), Some(v.to_vec()))).collect()
    }

    #[test]
    fn an_announcement_reads_back() {
        let fp = "AB".repeat(32);
        let props: Vec<(String, Option<Vec<u8>>)> =
            txt_properties(RelayId(42), "local", &fp).into_iter().map(|(k, v)| (k, Some(v.into_bytes()))).collect();
        let addrs = ["[::1]:4433".parse().unwrap(), "127.0.0.1:4433".parse().unwrap()];
        let r = LocalRelay::from_parts("canopy-x._canopy._udp.local.", "h.local.", 4433, addrs, &props);
        assert_eq!(r.problems, Vec::<String>::new());
        assert_eq!(r.addrs, vec!["127.0.0.1:4433".parse().unwrap(), "[::1]:4433".parse().unwrap()]);
        assert_eq!(
            (r.relay_id, r.role.as_deref(), r.protocol),
            (Some(RelayId(42)), Some("local"), Some(PROTOCOL_VERSION))
        );
        assert_eq!(r.fingerprint, Some("ab".repeat(32)));
        assert!(r.is_compatible());
        let c = r.candidates();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].service, c[0].host.as_str(), c[0].fingerprints.clone()),
            (Service::Local, "h.local", vec!["ab".repeat(32)])
        );
        assert_eq!(instance_name(RelayId(42)), format!("canopy-{}", "0".repeat(30) + "2a"));
    }

    #[test]
    fn malformed_txt_is_reported_not_fatal() {
        let mut props = txt(&[("id", b"0xnothex"), ("role", b"x y"), ("proto", b"99999"), ("fp", &[0xff, 0xfe])]);
        props.push(("extra".into(), None));
        let r = LocalRelay::from_parts("i", "h", 1, [], &props);
        assert_eq!((r.relay_id, r.role, r.protocol, r.fingerprint), (None, None, None, None));
        assert_eq!(r.problems.len(), 4, "{:?}", r.problems);
        assert!(r.problems.iter().any(|p| p.contains("TXT fp is not UTF-8")), "{:?}", r.problems);
        let r = LocalRelay::from_parts("i", "h", 1, [], &txt(&[("fp", "x".repeat(300).as_bytes())]));
        assert_eq!(r.problems.len(), 4, "{:?}", r.problems);
        assert!(r.problems.iter().any(|p| p.contains("no TXT id")));
        assert!(!r.is_compatible());
        assert!(r.candidates().is_empty());
        let r = LocalRelay::from_parts("i", "h", 1, [], &[("id".into(), None)]);
        assert!(r.problems.iter().any(|p| p.contains("TXT id has no value")), "{:?}", r.problems);
    }
}
