//! TLS for the relay: its self-signed identity, and the server configs of QUIC and of TLS
//! over TCP.
//!
//! Only the `ring` crypto provider is used, and only TLS 1.3 (QUIC requires it). The client
//! side — trusting a parent by CA or pinned fingerprint — is the SDK's
//! [`canopy_sdk::quic_client_config`], since a relay is a client of its parent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use canopy::wire::ALPN;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The relay's certificate and key, as loaded from (or first written to) its data directory.
#[derive(Debug)]
pub struct Identity {
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The whole chain `cert.pem` holds, the certificate first (then its issuers, up to a CA a
    /// client may pin), as the handshake sends it.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key, DER.
    pub key_der: PrivateKeyDer<'static>,
    /// The certificate, PEM (what a child's `parent_ca` trusts).
    pub cert_pem: String,
    /// Where the certificate PEM is.
    pub cert_path: PathBuf,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint: String,
    /// Whether this start created the certificate.
    pub created: bool,
}

pub use canopy_sdk::{Trust, fingerprint};

/// Loads `cert.pem`/`key.pem` from `data`, or creates a self-signed pair (SANs `localhost`,
/// `127.0.0.1` and the listen IP when it is a specific other address) and writes it there.
/// `cert.pem` may hold a chain: the relay's certificate first, then its issuers.
pub fn load_or_create(data: &Path, listen: SocketAddr) -> anyhow::Result<Identity> {
    let cert_path = data.join("cert.pem");
    let key_path = data.join("key.pem");
    let created = !cert_path.exists() || !key_path.exists();
    if created {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let ip = listen.ip();
        if !ip.is_unspecified() && ip.to_string() != "127.0.0.1" {
            names.push(ip.to_string());
        }
        let certified = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
        write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, certified.cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
    }
    let cert_pem =
        std::fs::read_to_string(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .with_context(|| format!("parsing certificate {}", cert_path.display()))?;
    let key_der =
        PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("parsing key {}", key_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the chain in {}", cert_path.display()))?;
    let fingerprint = fingerprint(&cert_der);
    Ok(Identity { cert_der, chain, key_der, cert_pem, cert_path, fingerprint, created })
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Keep-alives and idle timeout shared by both directions, so a vanished peer is noticed.
fn transport(max_udp_payload: u16) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    canopy_sdk::tune_mtu(&mut transport, max_udp_payload);
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(Duration::from_secs(20).try_into().expect("20 s fits")));
    Arc::new(transport)
}

/// The TLS 1.3 server config for `identity`, offering ALPN `canopy/3`: QUIC's, and the TCP
/// listener's (`tcp_listen`) as it is.
pub fn tls_server_config(identity: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key_der.clone_key())
        .context("building the TLS server config")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// The QUIC server config for `identity`, offering ALPN `canopy/3`, probing paths up to
/// `max_udp_payload` bytes.
pub fn server_config(identity: &Identity, max_udp_payload: u16) -> anyhow::Result<quinn::ServerConfig> {
    let tls = tls_server_config(identity)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC server config")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(max_udp_payload));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = load_or_create(dir.path(), listen).unwrap();
        assert!(first.created);
        let second = load_or_create(dir.path(), listen).unwrap();
        assert!(!second.created);
        assert_eq!(first.fingerprint, second.fingerprint);
        assert_eq!(first.fingerprint.len(), 64);
    }
}
