//! Discovery by DNS against an authoritative DNS server started by the test on 127.0.0.1
//! (hickory-server, in process), serving SRV and TXT records for `example.test`: the API and
//! the `canopy` CLI find the cloud relay first, connect only when something says to trust it,
//! fall back to the origin, and say plainly when nothing is found or trusted.

mod common;
mod support {
    pub mod dns;
}

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use canopy_sdk::discovery::{self, DiscoveryError, DnsOptions, Service, TrustConfig};
use canopy_sdk::{ConnectOptions, ReplayMode, Trust};
use common::*;
use support::dns::{a, dns, srv, txt};

fn options(server: SocketAddr) -> DnsOptions {
    DnsOptions { server: Some(server), timeout: Duration::from_secs(5) }
}

async fn canopy(args: Vec<String>) -> Output {
    within("the canopy binary", tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_canopy")).args(&args).output())).await.unwrap().expect("canopy runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_finds_the_cloud_relay_by_dns_and_uses_it_only_when_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = relay(&dir.path().join("cloud")).await;
    let origin = relay(&dir.path().join("origin")).await;
    let records = vec![
        srv("_canopy-cloud._udp.example.test.", 10, 5, cloud.local_addr().port(), "cloud.example.test."),
        srv("_canopy-origin._udp.example.test.", 10, 5, origin.local_addr().port(), "origin.example.test."),
        a("cloud.example.test."),
        a("origin.example.test."),
        txt("cloud.example.test.", &format!("canopy-fp={}", cloud.fingerprint())),
        txt("origin.example.test.", &format!("canopy-fp={}", origin.fingerprint())),
    ];
    let (server, _dns) = dns("example.test.", records).await;
    let opts = options(server);

    // What DNS names: the cloud relay, then the origin, each with its fingerprint.
    let found = discovery::relays("example.test", &opts).await.unwrap();
    assert_eq!(found.iter().map(|f| (f.service, f.host.as_str(), f.addr)).collect::<Vec<_>>(), [
        (Service::Cloud, "cloud.example.test", cloud.local_addr()),
        (Service::Origin, "origin.example.test", origin.local_addr()),
    ]);
    assert_eq!(found[0].fingerprints, [cloud.fingerprint().to_string()]);

    // Found is not trusted: refused before any connection, saying what would trust it.
    let base = ConnectOptions::new("unused:0", Trust::Fingerprint(String::new()));
    let err = discovery::connect_first(&found[..1], &TrustConfig::default(), &base).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("--trust-dns"), "{err}");
    assert_eq!(cloud.metrics().links, 0, "an untrusted relay is not connected to");

    // Trusting DNS: the cloud relay, and chunks flow.
    let trust_dns = TrustConfig { trust_dns: true, ..TrustConfig::default() };
    let (client, used) = discovery::connect_first(&found, &trust_dns, &base).await.unwrap();
    assert_eq!(used.service, Service::Cloud);
    client.publish(chunk(7, "via dns")).await.unwrap();
    let mut sub = client.subscribe(canopy_sdk::Filter::ALL, ReplayMode::CachedOnly).await.unwrap();
    assert_eq!(next_chunk(&mut sub).await.data().as_ref(), b"via dns");

    // A pinned fingerprint that DNS does not match: the cloud relay's certificate is refused,
    // and the pin for the origin reaches the origin.
    let pinned = TrustConfig { pinned: vec![origin.fingerprint().to_string()], ..TrustConfig::default() };
    let (_, used) = discovery::connect_first(&found, &pinned, &base).await.unwrap();
    assert_eq!(used.service, Service::Origin);
    let wrong = TrustConfig { pinned: vec!["ab".repeat(32)], ..TrustConfig::default() };
    let err = discovery::connect_first(&found, &wrong, &base).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains(&format!("certificate {} matches no pinned fingerprint", cloud.fingerprint())), "{err}");

    // Trust on first use, by DNS name: pinned under the SRV target's name, and the pin alone
    // then trusts it.
    let known = discovery::KnownRelays::at(dir.path().join("known_relays"));
    let tofu = TrustConfig { known: Some(known.clone()), first_use: true, ..TrustConfig::default() };
    let (_, used) = discovery::connect_first(&found, &tofu, &base).await.unwrap();
    assert_eq!(used.service, Service::Cloud);
    let name = format!("cloud.example.test:{}", cloud.local_addr().port());
    assert_eq!(known.get(&name).unwrap(), Some((1, cloud.fingerprint().to_string())));
    let pinned_only = TrustConfig { known: Some(known), ..TrustConfig::default() };
    let (_, used) = discovery::connect_first(&found[..1], &pinned_only, &base).await.unwrap();
    assert_eq!(used.service, Service::Cloud);

    // A domain with no relays, and a name server that does not answer: clear errors, bounded.
    let err = discovery::relays("nothing.example.test", &opts).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::NotFound(_) | DiscoveryError::Dns { .. }), "{err}");
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quiet = DnsOptions { server: Some(silent.local_addr().unwrap()), timeout: Duration::from_millis(800) };
    let started = std::time::Instant::now();
    let err = discovery::lookup("example.test", Service::Cloud, &quiet).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::Timeout { .. } | DiscoveryError::Dns { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_dns_domains_wherever_it_takes_a_relay() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = relay(&dir.path().join("cloud")).await;
    let records = vec![
        srv("_canopy-cloud._udp.example.test.", 10, 5, cloud.local_addr().port(), "cloud.example.test."),
        a("cloud.example.test."),
        // A fingerprint for every host of the service, at the service's name.
        txt("_canopy-cloud._udp.example.test.", &format!("canopy-fp={}", cloud.fingerprint())),
    ];
    let (server, _dns) = dns("example.test.", records).await;
    let server = server.to_string();
    let run = |extra: &[&str]| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--dns-server".to_string(), server.clone()]);
        v
    };

    let out = canopy(run(&["discover", "dns:example.test", "--json"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((line["service"].as_str(), line["addr"].as_str()), (Some("cloud"), Some(cloud.local_addr().to_string().as_str())));
    assert_eq!(line["fingerprints"][0], cloud.fingerprint());

    // Untrusted: refused with the reason; trusted by DNS: published and read back.
    let out = canopy(run(&["pub", "--relay", "dns:example.test", "team=1/channel=1/msg=1", "hello"])).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not trusted"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = canopy(run(&["pub", "--relay", "dns:example.test", "--trust-dns", "team=1/channel=1/msg=1", "hello"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = canopy(run(&["sub", "--relay", "dns:example.test", "--fingerprint", cloud.fingerprint(), "origin=0/app=0/path=0/org=0/team=1/channel=1", "--mode", "cached", "--count", "1", "--timeout", "10s"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));

    let out = canopy(run(&["discover", "dns:missing.test"])).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DNS") || String::from_utf8_lossy(&out.stderr).contains("no relays found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_on_first_use_pins_the_first_certificate_and_refuses_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = relay_at(&data, "127.0.0.1:0".parse().unwrap(), canopy_relay::StoreKind::Memory).await;
    let addr = relay.local_addr();
    let known = dir.path().join("known_relays");
    let run = |extra: &[&str]| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--relay".to_string(), addr.to_string(), "--known-relays".to_string(), known.to_str().unwrap().to_string()]);
        v
    };
    // Nothing to trust it by: refused, and nothing is pinned.
    let out = canopy(run(&["pub", "team=1/channel=1/msg=1", "one"])).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trust-on-first-use"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!known.exists());
    // First use: trusted, and pinned.
    let out = canopy(run(&["pub", "--trust-on-first-use", "team=1/channel=1/msg=1", "one"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&known).unwrap(), format!("{addr} {}\n", relay.fingerprint()));
    #[cfg(unix)]
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&known).unwrap().permissions()) & 0o777, 0o600);
    // The pin holds without the flag.
    let out = canopy(run(&["pub", "team=1/channel=1/msg=2", "two"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The relay comes back on the same address with another key: refused, SSH-style.
    relay.shutdown().await;
    std::fs::remove_file(data.join("cert.pem")).ok();
    std::fs::remove_file(data.join("key.pem")).ok();
    let other = relay_restart(&data, addr, canopy_relay::StoreKind::Memory).await;
    assert_ne!(other.fingerprint(), relay_fingerprint_of(&known));
    let out = canopy(run(&["pub", "--trust-on-first-use", "team=1/channel=1/msg=3", "three"])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("presents certificate {}", other.fingerprint())) && err.contains("known_relays:1 pins") && err.contains("remove that line"), "{err}");
    assert_eq!(std::fs::read_to_string(&known).unwrap().lines().count(), 1, "a changed key is never pinned over the old one");
}

fn relay_fingerprint_of(known: &std::path::Path) -> String {
    std::fs::read_to_string(known).unwrap().split_whitespace().nth(1).unwrap().to_string()
}

/// A relay in `data` whose certificate, for `name`, is issued by `ca` and sent with it.
async fn relay_issued_by(data: &std::path::Path, ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, name: &str) -> canopy_relay::RelayHandle {
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, ca).unwrap();
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("cert.pem"), format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(data.join("key.pem"), key.serialize_pem()).unwrap();
    relay_at(data, "127.0.0.1:0".parse().unwrap(), canopy_relay::StoreKind::Memory).await
}

fn ca() -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_pinned_in_dns_vouches_for_the_relays_it_issued_for_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (ca(), ca());
    let good = relay_issued_by(&dir.path().join("good"), &ours, "cloud.example.test").await;
    let misnamed = relay_issued_by(&dir.path().join("misnamed"), &ours, "elsewhere.example.test").await;
    let foreign = relay_issued_by(&dir.path().join("foreign"), &theirs, "foreign.example.test").await;
    let records = vec![
        srv("_canopy-cloud._udp.example.test.", 10, 0, good.local_addr().port(), "cloud.example.test."),
        srv("_canopy-cloud._udp.example.test.", 20, 0, misnamed.local_addr().port(), "misnamed.example.test."),
        srv("_canopy-cloud._udp.example.test.", 30, 0, foreign.local_addr().port(), "foreign.example.test."),
        a("cloud.example.test."),
        a("misnamed.example.test."),
        a("foreign.example.test."),
        // One CA for every host of the service.
        txt("_canopy-cloud._udp.example.test.", &format!("canopy-ca={}", canopy_sdk::fingerprint(ours.der()))),
    ];
    let (server, _dns) = dns("example.test.", records).await;
    let found = discovery::lookup("example.test", Service::Cloud, &options(server)).await.unwrap();
    assert_eq!(found[0].ca_pins, [canopy_sdk::fingerprint(ours.der())]);
    let trust_dns = TrustConfig { trust_dns: true, ..TrustConfig::default() };
    let base = ConnectOptions::new("unused:0", Trust::Fingerprint(String::new()));

    // Issued by the pinned CA for the SRV target's name: trusted, and chunks flow.
    let (client, used) = discovery::connect_first(&found[..1], &trust_dns, &base).await.unwrap();
    assert_eq!(used.host, "cloud.example.test");
    client.publish(chunk(9, "vouched for")).await.unwrap();
    // Issued by it for another name: refused. By another CA: refused, saying so.
    let err = discovery::connect_first(&found[1..2], &trust_dns, &base).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("name"), "{err}");
    let err = discovery::connect_first(&found[2..], &trust_dns, &base).await.unwrap_err();
    assert!(err.to_string().contains("holds no pinned CA"), "{err}");
}
