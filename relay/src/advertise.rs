//! Announcing a relay on the local network by mDNS (`advertise = true`, `--advertise`;
//! `docs/relay.md`, discovery).
//!
//! The relay announces the service `_canopy._udp.local.`
//! ([`canopy_sdk::discovery::mdns::SERVICE_TYPE`]) as the instance `canopy-<relay id>`, on the
//! host name `canopy-<relay id>.local.`, with its QUIC port and the TXT properties `id`,
//! `role`, `proto` and `fp` ([`canopy_sdk::discovery::mdns::txt_properties`]). A relay
//! listening on an unspecified address (`0.0.0.0`, `[::]`) announces the host's interface
//! addresses and follows their changes (IPv4 ones only for `0.0.0.0`); one listening on a
//! specific address announces that address. Loopback is included, so a relay on 127.0.0.1 is
//! found on the same host (or in a network namespace that has only `lo`).
//!
//! Announcing creates no trust: clients use what they find only under their trust rules
//! (`canopy_sdk::discovery::TrustConfig`).

use std::net::SocketAddr;
use std::time::Duration;

use canopy::wire::RelayId;
use canopy_sdk::discovery::mdns::{SERVICE_TYPE, instance_name, txt_properties};
use mdns_sd::{DaemonEvent, IfKind, ServiceDaemon, ServiceInfo};
use serde::{Deserialize, Serialize};

/// The role a relay has, and announces (TXT `role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayRole {
    /// The root of a tree: no parent.
    Origin,
    /// One of several stateless front-ends that together are the origin, over a shared Redis
    /// Cluster (`store = "redis://…"`): no parent, no chunks of its own.
    OriginFrontend,
    /// A cloud relay, between local relays and the origin.
    Cloud,
    /// A relay on the local network, near its endpoints.
    Local,
}

impl RelayRole {
    /// The role a relay has unless configured: `origin` without a parent, else `local`.
    pub fn default_for(has_parent: bool) -> RelayRole {
        if has_parent { RelayRole::Local } else { RelayRole::Origin }
    }

    /// As announced: `origin`, `cloud`, `local`.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayRole::Origin => "origin",
            RelayRole::OriginFrontend => "origin-frontend",
            RelayRole::Cloud => "cloud",
            RelayRole::Local => "local",
        }
    }
}

impl std::fmt::Display for RelayRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a relay announces about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The QUIC listener's bound address (the real port, not 0).
    pub listen: SocketAddr,
    /// The relay id.
    pub id: RelayId,
    /// The role.
    pub role: RelayRole,
    /// SHA-256 of its certificate, lowercase hex ([`crate::tls::fingerprint`]).
    pub fingerprint: String,
}

/// Why a relay cannot announce itself.
#[derive(Debug, thiserror::Error)]
pub enum AdvertiseError {
    /// The announcement is not a valid mDNS service (say, port 0).
    #[error("the mDNS announcement is invalid: {0}")]
    Invalid(String),
    /// The mDNS daemon could not be started or refused the service.
    #[error("mDNS: {0}")]
    Mdns(String),
}

/// The service mdns-sd announces for `a`.
pub fn service_info(a: &Announcement) -> Result<ServiceInfo, AdvertiseError> {
    let invalid = |e: mdns_sd::Error| AdvertiseError::Invalid(e.to_string());
    if a.listen.port() == 0 {
        return Err(AdvertiseError::Invalid("port 0: announce the bound address".into()));
    }
    let instance = instance_name(a.id);
    let host = format!("{instance}.local.");
    let txt = txt_properties(a.id, a.role.as_str(), &a.fingerprint);
    let ip = a.listen.ip();
    if ip.is_unspecified() {
        let mut info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, (), a.listen.port(), txt.as_slice())
            .map_err(invalid)?
            .enable_addr_auto();
        if ip.is_ipv4() {
            // A socket bound to 0.0.0.0 takes no IPv6.
            info.set_interfaces(vec![IfKind::IPv4]);
        }
        Ok(info)
    } else {
        ServiceInfo::new(SERVICE_TYPE, &instance, &host, ip, a.listen.port(), txt.as_slice()).map_err(invalid)
    }
}

/// A running announcement. [`Advertisement::stop`] withdraws it (mDNS goodbye) and stops the
/// daemon; dropping it stops the daemon too, which says goodbye on its way out.
pub struct Advertisement {
    daemon: Option<ServiceDaemon>,
    fullname: String,
}

impl Advertisement {
    /// Starts an mDNS daemon and announces `a` (after mDNS's probing, within a second or so).
    pub fn start(a: &Announcement) -> Result<Advertisement, AdvertiseError> {
        let info = service_info(a)?;
        let fullname = info.get_fullname().to_string();
        let mdns = |e: mdns_sd::Error| AdvertiseError::Mdns(e.to_string());
        let daemon = ServiceDaemon::new().map_err(mdns)?;
        let advertisement = Advertisement { daemon: Some(daemon), fullname };
        let daemon = advertisement.daemon.as_ref().expect("just set");
        // mdns-sd 0.21 uses loopback by default; said explicitly, since a relay listening on
        // 127.0.0.1 is announced there only.
        daemon.enable_interface(IfKind::LoopbackV4).map_err(mdns)?;
        daemon.register(info).map_err(mdns)?;
        tracing::info!(instance = %advertisement.fullname, listen = %a.listen, role = %a.role, "announcing the relay by mDNS");
        Ok(advertisement)
    }

    /// The announced instance, fully qualified (`canopy-<id>._canopy._udp.local.`).
    pub fn instance(&self) -> &str {
        &self.fullname
    }

    /// A task that logs what the mDNS daemon reports (errors, name changes) until it stops.
    pub fn log_events(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let events = self.daemon.as_ref()?.monitor().ok()?;
        Some(async move {
            while let Ok(event) = events.recv_async().await {
                match event {
                    DaemonEvent::Error(e) => tracing::warn!(error = %e, "mDNS"),
                    DaemonEvent::NameChange(change) => {
                        tracing::warn!(from = %change.original, to = %change.new_name, "mDNS renamed the announcement after a conflict")
                    }
                    _ => {}
                }
            }
        })
    }

    /// Withdraws the announcement (mDNS goodbye: browsers drop it at once) and stops the
    /// daemon; each step bounded by a second.
    pub async fn stop(mut self) {
        let Some(daemon) = self.daemon.take() else { return };
        match daemon.unregister(&self.fullname) {
            Ok(status) => match tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await {
                Ok(Ok(status)) => tracing::debug!(?status, instance = %self.fullname, "mDNS announcement withdrawn"),
                _ => tracing::warn!(instance = %self.fullname, "the mDNS daemon did not confirm the withdrawal"),
            },
            Err(e) => tracing::warn!(error = %e, "withdrawing the mDNS announcement"),
        }
        if let Ok(status) = daemon.shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
        }
    }
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            let _ = daemon.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(listen: &str) -> Announcement {
        Announcement {
            listen: listen.parse().unwrap(),
            id: RelayId(7),
            role: RelayRole::Local,
            fingerprint: "ab".repeat(32),
        }
    }

    #[test]
    fn a_specific_address_is_announced_as_is() {
        let info = service_info(&announcement("192.0.2.7:4433")).unwrap();
        assert_eq!(info.get_fullname(), format!("canopy-{:032x}._canopy._udp.local.", 7));
        assert_eq!(info.get_port(), 4433);
        assert!(!info.is_addr_auto());
        assert_eq!(
            info.get_addresses().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            vec!["192.0.2.7".to_string()]
        );
        assert_eq!(info.get_property_val_str("fp"), Some("ab".repeat(32).as_str()));
        assert_eq!(info.get_property_val_str("role"), Some("local"));
        assert_eq!(info.get_property_val_str("proto"), Some(canopy::wire::PROTOCOL_VERSION.to_string().as_str()));
        assert_eq!(info.get_property_val_str("id"), Some(RelayId(7).to_string().as_str()));
    }

    #[test]
    fn an_unspecified_address_announces_the_interfaces() {
        let info = service_info(&announcement("0.0.0.0:4433")).unwrap();
        assert!(info.is_addr_auto());
        assert!(info.get_addresses().is_empty());
        assert!(service_info(&announcement("127.0.0.1:0")).is_err());
    }

    #[test]
    fn roles_read_from_config() {
        assert_eq!(RelayRole::default_for(false), RelayRole::Origin);
        assert_eq!(RelayRole::default_for(true), RelayRole::Local);
        let r: RelayRole = serde_json::from_str("\"cloud\"").unwrap();
        assert_eq!((r, r.to_string()), (RelayRole::Cloud, "cloud".to_string()));
    }
}
