//! Direct messages between users of different orgs, in one process: key packages published
//! in advance, a start while the peer is offline, messages queued before any key package is
//! known, simultaneous starts that converge, and blocking.

mod common;

use canopy_msg_core::device::{CONV_CHANNEL, Device, Event};
use canopy_msg_core::names::Gid;
use canopy_msg_core::payload::ConvKind;
use canopy_msg_core::{Key, MemoryBackend, Message, Org};
use common::*;

const TTL: u64 = 30 * 24 * 3600 * 1000;

fn user(org: u32) -> Device<MemoryBackend> {
    Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", org).unwrap()).unwrap()
}

/// A device up: publishes its last-resort key package.
fn up(relay: &mut Relay, d: &mut Device<MemoryBackend>) {
    let out = d.ensure_key_package(NOW, TTL).unwrap();
    assert!(!out.is_empty());
    relay.publish(&out);
    assert!(d.ensure_key_package(NOW + 1, TTL).unwrap().is_empty(), "one fresh key package is enough");
}

fn texts(d: &Device<MemoryBackend>, peer: &Device<MemoryBackend>) -> Vec<String> {
    let mut all: Vec<_> = d.dm_convs(&peer.user_id()).into_iter().flat_map(|c| d.messages(c, CONV_CHANNEL)).collect();
    all.sort_by_key(|s| (s.sent_ms, s.id));
    all.into_iter().map(|s| s.text).collect()
}

#[test]
fn a_dm_starts_while_the_peer_is_offline_and_both_read_it() {
    let mut relay = Relay::default();
    let (mut a, mut b) = (user(7), user(8));
    up(&mut relay, &mut b);
    // b goes offline; a learns b's key package from the relay's cache.
    let events = feed(&mut a, &relay.all());
    assert_eq!(events, vec![Event::KeyPackage { user: b.user_id() }]);
    let (conv, out) = a.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    let (_, out) = a.send(conv, CONV_CHANNEL, text("hello b"), NOW).unwrap();
    relay.publish(&out);
    assert_eq!(a.dm(&b.user_id()), Some(conv));

    // b comes back and catches up from the cache: the welcome, then the message.
    let events = feed(&mut b, &relay.all());
    assert!(events.contains(&Event::Joined { group: Gid::Conv(conv), device: 1 }), "{events:?}");
    let events = feed(&mut b, &relay.all());
    assert!(events.iter().any(|e| matches!(e, Event::Message { group: Gid::Conv(c), .. } if *c == conv)), "{events:?}");
    assert_eq!(b.dm(&a.user_id()), Some(conv));
    assert_eq!(texts(&b, &a), vec!["hello b"]);
    assert_eq!(b.messages(conv, CONV_CHANNEL)[0].user, Some(a.user_id()));

    let (_, out) = b.send(conv, CONV_CHANNEL, text("hi a"), NOW + 1).unwrap();
    feed(&mut a, &relay.publish(&out));
    assert_eq!(texts(&a, &b), vec!["hello b", "hi a"]);
    // a took one of b's one-time key packages; the rest, and the last-resort one, stay for
    // anyone else (the supply tests in key_packages.rs go further).
    let s = b.supply();
    assert_eq!((s.one_time, s.used, s.last_resort), (2, 1, 1), "{s:?}");
    let mut c = user(9);
    feed(&mut c, &relay.all());
    let (conv_c, out) = c.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    let events = feed(&mut b, &relay.all());
    assert!(events.contains(&Event::Joined { group: Gid::Conv(conv_c), device: 1 }), "{events:?}");
}

#[test]
fn messages_written_before_any_key_package_is_known_wait_and_then_go() {
    let mut relay = Relay::default();
    let (mut a, mut b) = (user(7), user(8));
    assert!(a.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).is_err(), "no key package of b yet");
    a.queue_dm(b.user_id(), text("first")).unwrap();
    a.queue_dm(b.user_id(), text("second")).unwrap();
    assert_eq!(a.flush_pending(&b.user_id(), NOW).unwrap().map(|p| p.0), None, "still nothing known of b");
    assert_eq!(a.pending_for(&b.user_id()).len(), 2);
    assert!(a.watched_users().contains(&b.user_id()), "a follows b's key packages");

    up(&mut relay, &mut b);
    feed(&mut a, &relay.all());
    let (conv, ids, out) = a.flush_pending(&b.user_id(), NOW).unwrap().expect("started");
    assert_eq!(ids.len(), 2);
    assert!(a.pending_for(&b.user_id()).is_empty());
    relay.publish(&out);
    feed(&mut b, &relay.all());
    feed(&mut b, &relay.all());
    assert_eq!(b.dm(&a.user_id()), Some(conv));
    assert_eq!(texts(&b, &a), vec!["first", "second"]);
}

#[test]
fn simultaneous_starts_on_both_sides_of_a_partition_converge_on_one_conversation() {
    let mut relay = Relay::default();
    let (mut a, mut b) = (user(7), user(8));
    up(&mut relay, &mut a);
    up(&mut relay, &mut b);
    feed(&mut a, &relay.all());
    feed(&mut b, &relay.all());
    // Partitioned: each starts its own and writes in it.
    let mut side_a = Relay::default();
    let mut side_b = Relay::default();
    let (conv_a, out) = a.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).unwrap();
    side_a.publish(&out);
    let (_, out) = a.send(conv_a, CONV_CHANNEL, Message { created_ms: NOW + 1, ..text("a, alone") }, NOW + 1).unwrap();
    side_a.publish(&out);
    let (conv_b, out) = b.start_conv(ConvKind::Dm, "", &[a.user_id()].into(), NOW).unwrap();
    side_b.publish(&out);
    let (_, out) = b.send(conv_b, CONV_CHANNEL, Message { created_ms: NOW + 2, ..text("b, alone") }, NOW + 2).unwrap();
    side_b.publish(&out);
    assert_ne!(conv_a, conv_b);
    // Healed: each side gets the other's chunks.
    for (name, data) in side_a.all().into_iter().chain(side_b.all()) {
        relay.chunks.insert(name, data);
    }
    for _ in 0..2 {
        feed(&mut a, &relay.all());
        feed(&mut b, &relay.all());
    }
    assert_eq!(a.dm_convs(&b.user_id()).len(), 2, "a is in both");
    assert_eq!(a.dm(&b.user_id()), b.dm(&a.user_id()), "both pick the same one");
    assert_eq!(texts(&a, &b), vec!["a, alone", "b, alone"]);
    assert_eq!(texts(&b, &a), texts(&a, &b));
    // And what they write next lands in that one.
    let chosen = a.dm(&b.user_id()).unwrap();
    let (_, out) = b.send(chosen, CONV_CHANNEL, Message { created_ms: NOW + 3, ..text("together") }, NOW + 3).unwrap();
    feed(&mut a, &relay.publish(&out));
    assert_eq!(texts(&a, &b), vec!["a, alone", "b, alone", "together"]);
}

#[test]
fn a_blocked_users_conversation_never_appears() {
    let mut relay = Relay::default();
    let (mut a, mut b) = (user(7), user(8));
    up(&mut relay, &mut b);
    b.set_blocked(a.user_id(), true, NOW).unwrap();
    feed(&mut a, &relay.all());
    let (conv, out) = a.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    let (_, out) = a.send(conv, CONV_CHANNEL, text("let me in"), NOW).unwrap();
    relay.publish(&out);
    feed(&mut b, &relay.all());
    assert_eq!(b.convs().count(), 0);
    assert_eq!(b.dm(&a.user_id()), None);
    assert_eq!(b.counters.blocked, 1);
    // After the unblock, the conversation a started meanwhile appears (its welcome is taken
    // again), but what a wrote while blocked does not; what a writes now does.
    b.set_blocked(a.user_id(), false, NOW + 10).unwrap();
    feed(&mut b, &relay.all());
    feed(&mut b, &relay.all());
    assert_eq!(b.dm(&a.user_id()), Some(conv));
    assert!(texts(&b, &a).is_empty(), "{:?}", texts(&b, &a));
    let (_, out) = a.send(conv, CONV_CHANNEL, Message { created_ms: NOW + 20, ..text("now?") }, NOW + 20).unwrap();
    feed(&mut b, &relay.publish(&out));
    assert_eq!(texts(&b, &a), vec!["now?"]);
}
