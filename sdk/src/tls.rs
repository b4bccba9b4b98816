//! TLS 1.3 configuration for connecting to a relay: trust a CA (or the relay's self-signed
//! certificate) from PEM, or pin the relay's certificate by its SHA-256 fingerprint.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::ClientError;

/// How the client decides to trust the relay's certificate.
///
/// ```
/// use canopy_sdk::Trust;
/// // A CA (or the relay's own self-signed certificate) in PEM form:
/// let by_ca = Trust::CaPem("-----BEGIN CERTIFICATE-----\n…".into());
/// // Or pin the relay certificate: hex SHA-256 of its DER bytes (colons allowed).
/// let pinned = Trust::Fingerprint("ab12…".into());
/// # let _ = (by_ca, pinned);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// One or more PEM certificates used as trust anchors. The relay's certificate chain must
    /// lead to one of them and name [`ConnectOptions::server_name`](crate::ConnectOptions).
    CaPem(String),
    /// The hex SHA-256 of the relay's end-entity certificate (DER). Only that exact
    /// certificate is accepted, whatever its names or dates; the TLS 1.3 handshake signature
    /// is still verified, so the relay must hold the matching private key.
    Fingerprint(String),
    /// Any one of these fingerprints ([`Trust::Fingerprint`] for each): for a name served by
    /// several relays, or a key being rotated.
    Fingerprints(Vec<String>),
    /// A certificate pinned directly (`certs`, as [`Trust::Fingerprints`]), or issued for
    /// [`ConnectOptions::server_name`](crate::ConnectOptions) by a CA whose own certificate is
    /// pinned (`cas`) and sent in the relay's chain: what a domain publishes in DNS.
    Pinned {
        /// Fingerprints of end-entity certificates.
        certs: Vec<String>,
        /// Fingerprints of CA certificates.
        cas: Vec<String>,
    },
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::CaPem(pem) => write!(f, "CaPem({} bytes)", pem.len()),
            Trust::Fingerprint(fp) => write!(f, "Fingerprint({fp})"),
            Trust::Fingerprints(fps) => write!(f, "Fingerprints({})", fps.join(", ")),
            Trust::Pinned { certs, cas } => write!(f, "Pinned(certs: {}; CAs: {})", certs.join(", "), cas.join(", ")),
        }
    }
}

/// Hex SHA-256 (lowercase, no separators) of a certificate's DER bytes — the form
/// [`Trust::Fingerprint`] expects.
///
/// ```
/// let fp = canopy_sdk::fingerprint(b"not really a certificate");
/// assert_eq!(fp.len(), 64);
/// ```
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a certificate fingerprint as [`fingerprint`] prints it: 64 hex digits, either case,
/// colons and spaces allowed between them.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientError> {
    let hex: String = text.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    let bad = || ClientError::Config(format!("fingerprint {text:?} is not 64 hex digits"));
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The QUIC client configuration for connecting to a relay: TLS 1.3 with ALPN `canopy/3`,
/// trusting the relay as `trust` says, with keep-alives so a vanished relay is noticed.
///
/// [`Client`](crate::Client) uses it; so does a relay connecting to its parent.
///
/// ```
/// use canopy_sdk::{Trust, quic_client_config};
/// let pinned = Trust::Fingerprint("ab".repeat(32));
/// assert!(quic_client_config(&pinned).is_ok());
/// assert!(quic_client_config(&Trust::Fingerprint("nope".into())).is_err());
/// ```
pub fn quic_client_config(trust: &Trust) -> Result<quinn::ClientConfig, ClientError> {
    quic_client_config_with_mtu(trust, DEFAULT_MAX_UDP_PAYLOAD)
}

/// [`quic_client_config`] probing paths up to `max_udp_payload` bytes instead of
/// [`DEFAULT_MAX_UDP_PAYLOAD`].
pub fn quic_client_config_with_mtu(trust: &Trust, max_udp_payload: u16) -> Result<quinn::ClientConfig, ClientError> {
    let tls = client_config(trust)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Config(format!("QUIC TLS setup: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    tune_mtu(&mut transport, max_udp_payload);
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(4)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(15)).expect("15 s is a valid idle timeout"),
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The largest UDP payload (bytes of a datagram, without IP and UDP headers) a Canopy QUIC
/// endpoint accepts and probes for with path-MTU discovery, unless configured otherwise:
/// quinn's own default, which fits an Ethernet MTU.
///
/// Larger values let path-MTU discovery use larger datagrams where the path allows them
/// (loopback, jumbo frames), so a packet carries several 1 KiB chunks; probes larger than the
/// path are lost and cost nothing else. They were measured slower, not faster, on loopback
/// (`docs/performance.md`, "Packet size"), hence this default.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1452;

/// Socket buffer size asked for on every Canopy UDP socket (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). The default of about 200 KiB overflows under a burst of
/// full-size datagrams; every datagram lost that way costs a retransmission, halves the
/// congestion window and makes path-MTU discovery fall back to 1,200 bytes.
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Sets path-MTU discovery to probe up to `max_udp_payload` (at least 1,200).
pub fn tune_mtu(transport: &mut quinn::TransportConfig, max_udp_payload: u16) {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.max(1200));
    transport.mtu_discovery_config(Some(mtu));
}

/// An endpoint configuration that accepts datagrams of up to `max_udp_payload` bytes, and at
/// least quinn's default of 1,472 (and tells peers so). Values above 65,527 are clamped.
pub fn endpoint_config(max_udp_payload: u16) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    let value = max_udp_payload.clamp(1472, 65_527);
    config.max_udp_payload_size(value).expect("clamped to the allowed range");
    config
}

/// Binds a UDP socket for QUIC with [`UDP_SOCKET_BUFFER`]-sized buffers. An IPv6 wildcard
/// address binds dual-stack.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the system allows it; an IPv6-only system still binds.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: smaller buffers still work, they just drop more under bursts.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Sets what a Canopy link's TCP socket needs (`tcp://` relays, the relay's `tcp_listen`):
/// no Nagle delay, since each side already sends a turn's frames as one write; and
/// keep-alives (first probe after 5 s of silence, then every 5 s, dropped after 3 unanswered),
/// so a peer that vanished is noticed in about 20 s, as QUIC's idle timeout notices it. The
/// kernel sends no keep-alives while sent data waits for its acknowledgement, so on Linux a
/// user timeout (`TCP_USER_TIMEOUT`, 20 s) covers that case: without it a link with a publish
/// in flight would wait out TCP's retransmissions, about 15 minutes.
pub fn tune_tcp(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(KEEPALIVE);
    #[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple", target_os = "freebsd", target_os = "windows"))]
    let keepalive = keepalive.with_retries(3);
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    socket.set_tcp_user_timeout(Some(std::time::Duration::from_secs(20)))?;
    Ok(())
}

/// Builds the rustls client configuration (TLS 1.3 only, ALPN `canopy/3`).
pub(crate) fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?;
    let mut config = match trust {
        Trust::CaPem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Config("CA PEM holds no certificate".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pinned { certs, cas } => {
            if certs.is_empty() && cas.is_empty() {
                return Err(ClientError::Config("no fingerprint to pin".into()));
            }
            let parse = |list: &[String]| list.iter().map(|t| parse_fingerprint(t)).collect::<Result<Vec<_>, _>>();
            let verifier = PinVerifier { certs: parse(certs)?, cas: parse(cas)?, provider: provider.clone() };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
        Trust::Fingerprint(_) | Trust::Fingerprints(_) => {
            let texts = match trust {
                Trust::Fingerprint(text) => std::slice::from_ref(text),
                Trust::Fingerprints(texts) => texts.as_slice(),
                Trust::CaPem(_) | Trust::Pinned { .. } => &[],
            };
            if texts.is_empty() {
                return Err(ClientError::Config("no fingerprint to pin".into()));
            }
            let expected = texts.iter().map(|t| parse_fingerprint(t)).collect::<Result<Vec<_>, _>>()?;
            let verifier = PinnedVerifier {
                expected,
                algorithms: provider.signature_verification_algorithms,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![canopy::wire::ALPN.to_vec()];
    Ok(config)
}

/// [`Trust::Pinned`]: a pinned end-entity certificate, or a chain that verifies (names, dates,
/// signatures, as any CA-issued certificate) up to a pinned CA certificate the relay sends.
#[derive(Debug)]
struct PinVerifier {
    certs: Vec<[u8; 32]>,
    cas: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let leaf: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if self.certs.contains(&leaf) {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(anchor) = intermediates.iter().find(|c| self.cas.contains(&Sha256::digest(c.as_ref()).into())) else {
            return Err(rustls::Error::General(format!(
                "the relay's certificate {} matches no pinned fingerprint, and its chain holds no pinned CA",
                fingerprint(end_entity.as_ref())
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(anchor.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the pinned CA certificate: {e}")))?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS configuration of a probe ([`crate::probe_fingerprint`]): it trusts nothing, but
/// notes the fingerprint of the certificate the relay presents before failing the handshake.
pub(crate) fn probe_config(seen: Arc<std::sync::Mutex<Option<String>>>) -> Result<quinn::ClientConfig, ClientError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProbeVerifier { seen, algorithms: provider.signature_verification_algorithms }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![canopy::wire::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Config(format!("QUIC TLS setup: {e}")))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// Notes the presented certificate's fingerprint and refuses it: a probe learns, it never
/// trusts.
#[derive(Debug)]
struct ProbeVerifier {
    seen: Arc<std::sync::Mutex<Option<String>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ProbeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fingerprint(end_entity.as_ref()));
        Err(rustls::Error::General("a probe: the certificate is noted, not trusted".into()))
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts exactly the certificates whose SHA-256 is one of `expected`, and checks the
/// handshake signature with it.
#[derive(Debug)]
struct PinnedVerifier {
    expected: Vec<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if self.expected.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            // Say what was presented, so a changed key is plain to see.
            let seen: String = got.iter().map(|b| format!("{b:02x}")).collect();
            Err(rustls::Error::General(format!("the relay's certificate {seen} matches no pinned fingerprint")))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration only enables TLS 1.3.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parsing_accepts_colons_and_case() {
        let fp = fingerprint(b"x");
        let upper_colons: String = fp
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&fp).unwrap(), parse_fingerprint(&upper_colons).unwrap());
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn empty_ca_pem_is_a_config_error() {
        assert!(matches!(client_config(&Trust::CaPem(String::new())), Err(ClientError::Config(_))));
    }
}
