//! Users and their devices: every leaf's credential must be signed by the user it claims,
//! checked by the committer and by every member; messages carry their sender's user; a
//! blocked user's messages are not shown.

mod common;

use std::collections::BTreeMap;

use canopy_msg_core::device::{Device, Event};
use canopy_msg_core::engine::{self, CIPHERSUITE};
use canopy_msg_core::fragment;
use canopy_msg_core::identity::{Binding, UserId};
use canopy_msg_core::names::Path;
use canopy_msg_core::payload::{Lifetimes, TeamRecord};
use canopy_msg_core::{Key, MemoryBackend, MlsError, Outgoing};
use common::*;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

fn ed25519() -> SignatureKeyPair {
    SignatureKeyPair::new(SignatureScheme::ED25519).unwrap()
}

/// A device key whose credential claims `claimed`'s user but is signed by `signer`.
fn credential(claimed: &SignatureKeyPair, signer: &SignatureKeyPair, device: &SignatureKeyPair) -> CredentialWithKey {
    let signature = Binding::sign(signer, signer.public(), device.public()).unwrap().signature;
    let binding = Binding { user_key: claimed.public().try_into().unwrap(), signature };
    CredentialWithKey { credential: binding.credential(), signature_key: device.public().into() }
}

/// A key package of `device` with `cred`: its bytes and hKP.
fn key_package(provider: &OpenMlsRustCrypto, device: &SignatureKeyPair, cred: CredentialWithKey) -> (Vec<u8>, Vec<u8>) {
    let bundle = KeyPackage::builder().leaf_node_capabilities(engine::capabilities()).build(CIPHERSUITE, provider, device, cred).unwrap();
    let kp = bundle.key_package();
    let hkp = kp.hash_ref(provider.crypto()).unwrap().as_slice().to_vec();
    (MlsMessageOut::from(kp.clone()).tls_serialize_detached().unwrap(), hkp)
}

/// A group of `team` in the test org, made by hand as a rogue committer would, with
/// `creator` at leaf 0.
fn rogue_group(provider: &OpenMlsRustCrypto, team: u32, creator: &SignatureKeyPair, cred: CredentialWithKey) -> MlsGroup {
    let record = TeamRecord {
        org: 7,
        team,
        name: "rogue".into(),
        lifetimes: Lifetimes::default(),
        channels: BTreeMap::new(),
        next_device: 3,
        devices: [(0, 0), (1, 1), (2, 2)].into(),
    };
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .capabilities(engine::capabilities())
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .with_group_context_extensions(engine::record_extensions(&record).unwrap())
        .build();
    MlsGroup::new_with_group_id(provider, creator, &config, engine::group_id(&org(), team), cred).unwrap()
}

fn chunks(path: Path, bytes: &[u8], name: impl Fn(u16) -> canopy::Name) -> Vec<(canopy::Name, Vec<u8>)> {
    fragment::split(path, bytes).unwrap().into_iter().enumerate().map(|(i, d)| (name(i as u16), d)).collect()
}

fn reasons(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| if let Event::Rejected { reason, .. } = e { Some(reason.clone()) } else { None }).collect()
}

/// Publishes a key package of `device` and returns it as the committer would fetch it.
fn published_key_package(relay: &mut Relay, device: &mut Device<MemoryBackend>) -> (Vec<u8>, Vec<u8>) {
    let (hkp, out) = device.key_package(NOW, 3_600_000, false).unwrap();
    relay.publish(&out);
    (relay.object(Path::KeyPackage, org().key_package_filter(&hkp)), hkp)
}

#[test]
fn a_device_not_signed_by_its_claimed_user_is_refused_by_the_committer_and_by_every_member() {
    let provider = OpenMlsRustCrypto::default();
    let (victim, attacker) = (ed25519(), ed25519());

    // The committer refuses the key package outright.
    let mut w = World::new();
    let before = w.admin.record(w.team).unwrap();
    let device = ed25519();
    let (kp, hkp) = key_package(&provider, &device, credential(&victim, &attacker, &device));
    let err = w.admin.add_device(w.team, &kp, &hkp, NOW).unwrap_err();
    assert!(matches!(err, MlsError::Binding(_)), "{err:?}");
    assert!(err.to_string().contains(&format!("not signed by its claimed user {}", UserId::of(victim.public()))), "{err}");
    assert_eq!(w.admin.record(w.team).unwrap(), before, "nothing changed");

    // A welcome from a group whose creator's credential is forged: the joiner refuses it.
    let mut x = Device::open(Key::random(), MemoryBackend::default(), org()).unwrap();
    let mut relay = Relay::default();
    let creator = ed25519();
    let mut group = rogue_group(&provider, 9, &creator, credential(&victim, &attacker, &creator));
    let (x_kp, x_hkp) = published_key_package(&mut relay, &mut x);
    let x_kp = engine::verify_key_package(provider.crypto(), &x_kp, &x_hkp).unwrap();
    let (_, welcome, _) = group.add_members(&provider, &creator, &[x_kp]).unwrap();
    let welcome = chunks(Path::Welcome, &welcome.tls_serialize_detached().unwrap(), |i| org().welcome(&x_hkp, i));
    let events = feed(&mut x, &welcome);
    let why = reasons(&events);
    assert_eq!(why.len(), 1, "{events:?}");
    assert!(why[0].contains("member at leaf 0") && why[0].contains("not signed by its claimed user"), "{}", why[0]);
    assert_eq!(x.teams().count(), 0, "x joined nothing");
    assert_eq!(x.waiting().count(), 1, "x still waits for a good welcome");

    // A commit adding a forged device to a group x is in: x refuses it and stays put.
    let user = ed25519();
    let creator = ed25519();
    let mut group = rogue_group(&provider, 10, &creator, credential(&user, &user, &creator));
    let (x_kp, x_hkp) = published_key_package(&mut relay, &mut x);
    let x_kp = engine::verify_key_package(provider.crypto(), &x_kp, &x_hkp).unwrap();
    let (_, welcome, _) = group.add_members(&provider, &creator, &[x_kp]).unwrap();
    group.merge_pending_commit(&provider).unwrap();
    let welcome = chunks(Path::Welcome, &welcome.tls_serialize_detached().unwrap(), |i| org().welcome(&x_hkp, i));
    let events = feed(&mut x, &welcome);
    assert!(events.contains(&Event::Joined { group: canopy_msg_core::names::Gid::Team(10), device: 1 }), "{events:?}");
    let epoch = group.epoch().as_u64();
    let forged_device = ed25519();
    let (kp, hkp) = key_package(&provider, &forged_device, credential(&victim, &attacker, &forged_device));
    let kp = {
        // The rogue committer skips the check the member plugin makes.
        let msg = MlsMessageIn::tls_deserialize_exact(&kp).unwrap();
        let MlsMessageBodyIn::KeyPackage(kp_in) = msg.extract() else { panic!("a key package") };
        let kp = kp_in.validate(provider.crypto(), ProtocolVersion::Mls10).unwrap();
        assert_eq!(kp.hash_ref(provider.crypto()).unwrap().as_slice(), hkp.as_slice());
        kp
    };
    let (commit, _, _) = group.add_members(&provider, &creator, &[kp]).unwrap();
    let commit = chunks(Path::Commit, &commit.tls_serialize_detached().unwrap(), |i| org().commit(10, epoch + 1, i).unwrap());
    let events = feed(&mut x, &commit);
    let why = reasons(&events);
    assert_eq!(why.len(), 1, "{events:?}");
    assert!(why[0].contains(&format!("commit for epoch {}", epoch + 1)) && why[0].contains("not signed by its claimed user"), "{}", why[0]);
    assert_eq!(x.teams().find(|t| t.0 == 10).unwrap().2, epoch, "x stays at its epoch");
    // And says why it cannot move on: the group is stalled until it leaves and is added again.
    assert!(x.stalled(10).is_some_and(|why| why.contains("not signed")), "{:?}", x.stalled(10));
    x.leave(10).unwrap();
    assert!(x.is_removed(10));
    assert_eq!(x.groups().count(), 0, "a group left is no longer followed");
}

fn sent(w: &mut World, device: &mut Device<MemoryBackend>, text_: &str) -> (canopy_msg_core::MsgRef, Vec<(canopy::Name, Vec<u8>)>) {
    let (id, out): (_, Vec<Outgoing>) = device.send(w.team, w.channel, text(text_), NOW).unwrap();
    (id, w.relay.publish(&out))
}

#[test]
fn messages_carry_their_senders_user_and_a_blocked_users_are_neither_shown_nor_kept() {
    let mut w = World::new();
    let (mut a, _) = w.join(Key::random(), MemoryBackend::default());
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    feed(&mut a, &w.relay.all());
    assert_ne!(a.user_id(), b.user_id());
    assert_eq!(a.user_id(), UserId::of(a.user_key()));

    // b sees a's message as a's user's, and a's own copy says the same.
    let (hello, out) = sent(&mut w, &mut a, "hello");
    feed(&mut b, &out);
    assert_eq!(b.message(w.team, w.channel, hello).unwrap().user, Some(a.user_id()));
    assert_eq!(a.message(w.team, w.channel, hello).unwrap().user, Some(a.user_id()));
    let members = b.members(w.team).unwrap();
    assert_eq!(members.len(), 3, "the committer and two devices: {members:?}");
    assert!(members.iter().any(|m| m.user == Some(a.user_id()) && !m.me));
    assert!(members.iter().any(|m| m.user == Some(b.user_id()) && m.me));

    // Contacts: a name for a's user works wherever a user id does.
    b.name_contact(a.user_id(), "alice").unwrap();
    assert_eq!(b.resolve_user("alice").unwrap(), a.user_id());
    assert!(b.set_blocked(b.user_id(), true, NOW).is_err(), "nobody blocks themselves");

    // Blocked: what a sends now is dropped unread; what b kept before is hidden.
    b.set_blocked(a.user_id(), true, NOW).unwrap();
    assert!(b.messages(w.team, w.channel).is_empty());
    let (while_blocked, out) = sent(&mut w, &mut a, "while blocked");
    let events = feed(&mut b, &out);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(b.counters.blocked, 1);
    // Unblocked: the old message is back, the one sent while blocked never appears, new
    // ones do.
    b.set_blocked(a.user_id(), false, NOW).unwrap();
    let (after, out) = sent(&mut w, &mut a, "after");
    feed(&mut b, &out);
    let shown: Vec<_> = b.messages(w.team, w.channel).into_iter().map(|s| s.id).collect();
    assert_eq!(shown, vec![hello, after]);
    assert!(b.message(w.team, w.channel, while_blocked).is_none());
    feed(&mut b, &w.relay.all());
    assert!(b.message(w.team, w.channel, while_blocked).is_none(), "not even when replayed");
    assert_eq!(b.contacts().name(&a.user_id()), Some("alice"));
}

#[test]
fn contacts_and_blocks_survive_a_restart() {
    let key = Key::random();
    let mut d = Device::open(key.clone(), MemoryBackend::default(), org()).unwrap();
    let me = d.user_id();
    let (x, y) = (UserId([1; 16]), UserId([2; 16]));
    d.name_contact(x, "xavier").unwrap();
    d.set_blocked(y, true, NOW).unwrap();
    assert!(d.name_contact(y, "xavier").is_err(), "names are unique");
    let backend = d.backend().clone();
    drop(d);
    let d = Device::open(key, backend, org()).unwrap();
    assert_eq!(d.user_id(), me, "the same user after a restart");
    assert_eq!(d.contacts().name(&x), Some("xavier"));
    assert!(d.contacts().is_blocked(&y));
    assert!(!d.contacts().is_blocked(&x));
}
