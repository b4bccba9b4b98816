//! HPKE with X25519 from outside (what the `member` plugin installs: the plugin host's
//! native X25519) against the stock provider: what one seals the other opens, both derive
//! the same node keys, and a committer's add into a team really goes through the installed
//! function. Its own test binary, since the function is installed once per process.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use canopy_msg_core::crypto::{Provider, use_x25519};
use canopy_msg_core::{Key, MemoryBackend};
use common::*;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{HpkeAeadType, HpkeConfig, HpkeKdfType, HpkeKemType};

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// Stands in for the host: x25519-dalek, counted.
fn host_x25519(scalar: &[u8; 32], point: Option<&[u8; 32]>) -> [u8; 32] {
    CALLS.fetch_add(1, Ordering::SeqCst);
    let secret = x25519_dalek::StaticSecret::from(*scalar);
    match point {
        Some(p) => *secret.diffie_hellman(&x25519_dalek::PublicKey::from(*p)).as_bytes(),
        None => *x25519_dalek::PublicKey::from(&secret).as_bytes(),
    }
}

fn config() -> HpkeConfig {
    HpkeConfig(HpkeKemType::DhKem25519, HpkeKdfType::HkdfSha256, HpkeAeadType::AesGcm128)
}

#[test]
fn hpke_through_an_installed_x25519_interoperates_with_the_stock_provider_and_carries_a_team() {
    assert!(use_x25519(host_x25519));
    let ours = Provider::default();
    let stock = OpenMlsRustCrypto::default();

    // Node keys derived from the same secret are the same.
    let ikm = [7u8; 32];
    let before = CALLS.load(Ordering::SeqCst);
    let kp = ours.crypto().derive_hpke_keypair(config(), &ikm).unwrap();
    assert!(CALLS.load(Ordering::SeqCst) > before, "derivation went through the installed X25519");
    let stock_kp = stock.crypto().derive_hpke_keypair(config(), &ikm).unwrap();
    assert_eq!(kp.public, stock_kp.public);
    assert_eq!(&kp.private[..], &stock_kp.private[..]);

    // Sealed by ours, opened by the stock provider, and the other way round.
    let before = CALLS.load(Ordering::SeqCst);
    let sealed = ours.crypto().hpke_seal(config(), &kp.public, b"info", b"aad", b"path secret").unwrap();
    assert!(CALLS.load(Ordering::SeqCst) >= before + 2, "an HPKE seal takes two X25519s");
    let opened = stock.crypto().hpke_open(config(), &sealed, &stock_kp.private, b"info", b"aad").unwrap();
    assert_eq!(opened, b"path secret");
    let sealed = stock.crypto().hpke_seal(config(), &stock_kp.public, b"info", b"aad", b"the other way").unwrap();
    assert_eq!(ours.crypto().hpke_open(config(), &sealed, &kp.private, b"info", b"aad").unwrap(), b"the other way");
    // A wrong key or aad is still refused.
    assert!(ours.crypto().hpke_open(config(), &sealed, &kp.private, b"info", b"other aad").is_err());
    // A small-order point (all zeros) gives an all-zero secret: refused, as the stock code does.
    assert!(ours.crypto().hpke_seal(config(), &[0u8; 32], b"info", b"aad", b"x").is_err());

    // A committer's adds into a team, and the members reading what it then sends.
    let mut w = World::new();
    let before = CALLS.load(Ordering::SeqCst);
    let (mut a, _) = w.join(Key::random(), MemoryBackend::default());
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    assert!(CALLS.load(Ordering::SeqCst) > before, "the adds went through the installed X25519");
    feed(&mut a, &w.relay.all());
    let (_, out) = a.send(w.team, w.channel, text("after the adds"), NOW).unwrap();
    feed(&mut b, &w.relay.publish(&out));
    assert_eq!(b.messages(w.team, w.channel)[0].text, "after the adds");
}
