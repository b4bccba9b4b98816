//! Key package supply in the users' space (`canopy_msg_core::supply`), in one process: one-time
//! key packages claimed once and replaced, the last-resort one when they run out, a request
//! that makes the user's devices publish more, and a race for one key package that still
//! joins both conversations within the grace period, and no later one after it.

mod common;

use canopy::Name;
use canopy_msg_core::device::{Device, Event};
use canopy_msg_core::names::{Gid, ParsedUser, Users};
use canopy_msg_core::payload::ConvKind;
use canopy_msg_core::supply::{CLAIM_FRAGMENT, GRACE_MS, ONE_TIME, REQUEST_FRAGMENT, Request};
use canopy_msg_core::{Key, MemoryBackend, Org, Outgoing};
use common::*;

const TTL: u64 = 30 * 24 * 3600 * 1000;

fn user(org: u32) -> Device<MemoryBackend> {
    Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", org).unwrap()).unwrap()
}

/// The fragment byte of a name in a users' key package space, if it is one.
fn kp_fragment(name: Name) -> Option<u16> {
    matches!(Users::parse(name), Some(ParsedUser::KeyPackage { .. })).then_some((name.to_u128() & 0xff) as u16)
}

/// Whole key packages among `out` (their fragment 0), claims and requests.
fn kinds(out: &[Outgoing]) -> (usize, usize, usize) {
    let f: Vec<u16> = out.iter().filter_map(|o| kp_fragment(o.name)).collect();
    (f.iter().filter(|x| **x == 0).count(), f.iter().filter(|x| **x == CLAIM_FRAGMENT).count(), f.iter().filter(|x| **x == REQUEST_FRAGMENT).count())
}

/// Which of `b`'s key packages a start used: (one-time?) from the claims it published.
fn start(relay: &mut Relay, consumer: &mut Device<MemoryBackend>, peer: &Device<MemoryBackend>) -> (canopy_msg_core::names::ConvId, Vec<Outgoing>) {
    let (conv, out) = consumer.start_conv(ConvKind::Dm, "", &[peer.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    (conv, out)
}

#[test]
fn one_time_key_packages_are_claimed_once_and_replaced_and_the_last_resort_one_serves_when_they_run_out() {
    let mut relay = Relay::default();
    let mut b = user(8);
    let out = b.ensure_key_package(NOW, TTL).unwrap();
    assert_eq!(kinds(&out), (ONE_TIME + 1, 0, 0), "three one-time key packages and a last-resort one");
    relay.publish(&out);
    assert!(b.ensure_key_package(NOW + 1, TTL).unwrap().is_empty(), "supplied: nothing more");
    let s = b.supply();
    assert_eq!((s.one_time, s.claimed, s.used, s.last_resort), (ONE_TIME, 0, 0, 1));

    // Three users start conversations with b while b is offline, each after seeing the
    // others' claims: each takes a different one-time key package.
    let mut claimed = std::collections::BTreeSet::new();
    let mut convs = Vec::new();
    for org in 9..9 + ONE_TIME as u32 {
        let mut c = user(org);
        feed(&mut c, &relay.all());
        let (conv, out) = start(&mut relay, &mut c, &b);
        assert_eq!(kinds(&out).1, 1, "a claim for the one-time key package it used");
        assert_eq!(kinds(&out).2, 0, "no request while one-time key packages last");
        let claim = out.iter().find(|o| kp_fragment(o.name) == Some(CLAIM_FRAGMENT)).unwrap();
        assert!(claimed.insert(claim.name.to_u128() >> 8), "a key package claimed twice");
        convs.push(conv);
    }
    // The next one finds every one-time key package claimed: the last-resort one serves at
    // once, and b's devices are asked for more.
    let mut late = user(20);
    feed(&mut late, &relay.all());
    let (late_conv, out) = start(&mut relay, &mut late, &b);
    assert_eq!((kinds(&out).1, kinds(&out).2), (0, 1), "no claim on a last-resort key package, one request");
    let request = out.iter().find(|o| kp_fragment(o.name) == Some(REQUEST_FRAGMENT)).unwrap();
    assert_eq!(Request::decode(&request.data), Some(Request { target: b.user_id(), requester: late.user_id(), created_ms: NOW }));
    convs.push(late_conv);

    // b comes back: it joins all four, sees the claims and the request, and publishes three
    // fresh one-time key packages.
    let events = feed(&mut b, &relay.all());
    for conv in &convs {
        assert!(events.iter().any(|e| matches!(e, Event::Joined { group: Gid::Conv(c), .. } if c == conv)), "{events:?}");
    }
    assert!(events.contains(&Event::KeyPackagesRequested { by: late.user_id() }), "{events:?}");
    assert_eq!(b.counters.requests, 1);
    let s = b.supply();
    assert_eq!((s.one_time, s.claimed, s.used), (0, 0, ONE_TIME), "{s:?}");
    let out = b.ensure_key_package(NOW + 2, TTL).unwrap();
    assert_eq!(kinds(&out), (ONE_TIME, 0, 0), "the response: fresh one-time key packages");
    relay.publish(&out);
    // The request is seen once, even when the relay sends it again.
    let events = feed(&mut b, &relay.all());
    assert!(!events.iter().any(|e| matches!(e, Event::KeyPackagesRequested { .. })), "{events:?}");

    // A new consumer takes one of the fresh ones.
    let mut next = user(30);
    feed(&mut next, &relay.all());
    let (_, out) = start(&mut relay, &mut next, &b);
    assert_eq!((kinds(&out).1, kinds(&out).2), (1, 0));

    // After the grace period, the used keys are erased.
    assert!(b.ensure_key_package(NOW + 3 + GRACE_MS, TTL).unwrap().is_empty());
    let s = b.supply();
    assert_eq!((s.used, s.last_resort), (0, 1), "{s:?}");
}

#[test]
fn a_race_for_one_key_package_joins_both_within_the_grace_period_and_none_after_it() {
    let mut relay = Relay::default();
    let mut b = user(8);
    let out = b.ensure_key_package(NOW, TTL).unwrap();
    // Two consumers on opposite sides of a partition see only one of b's one-time key
    // packages, and not each other's claim.
    let first_kp: Vec<(Name, Vec<u8>)> = {
        let whole = out.iter().filter(|o| kp_fragment(o.name) == Some(0)).map(|o| o.name.to_u128() >> 8).find(|w| {
            // A one-time one: not the last-resort (the first published is the last-resort).
            out.iter().position(|o| o.name.to_u128() >> 8 == *w) != Some(0)
        });
        let whole = whole.unwrap();
        out.iter().filter(|o| o.name.to_u128() >> 8 == whole).map(|o| (o.name, o.data.clone())).collect()
    };
    let (mut c, mut d) = (user(9), user(10));
    feed(&mut c, &first_kp);
    feed(&mut d, &first_kp);
    let (conv_c, out_c) = c.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).unwrap();
    let (conv_d, out_d) = d.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW).unwrap();
    let claim = |out: &[Outgoing]| out.iter().find(|o| kp_fragment(o.name) == Some(CLAIM_FRAGMENT)).map(|o| o.name);
    assert_eq!(claim(&out_c), claim(&out_d), "both claim the same key package");
    // Both welcomes reach b; the relay keeps the first claim.
    relay.publish(&out_c);
    relay.publish(&out_d);
    let events = feed(&mut b, &relay.all());
    assert!(events.contains(&Event::Joined { group: Gid::Conv(conv_c), device: 1 }), "{events:?}");
    assert!(events.contains(&Event::Joined { group: Gid::Conv(conv_d), device: 1 }), "the racing second welcome joins too: {events:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Rejected { .. })), "{events:?}");

    // Once the grace period is over, the key package's keys are gone: a welcome made with it
    // later (by someone who never saw the claim) is refused.
    b.ensure_key_package(NOW + 1, TTL).unwrap();
    b.ensure_key_package(NOW + 2 + GRACE_MS, TTL).unwrap();
    let mut e = user(11);
    feed(&mut e, &first_kp);
    let (conv_e, out_e) = e.start_conv(ConvKind::Dm, "", &[b.user_id()].into(), NOW + 2 + GRACE_MS).unwrap();
    let events = feed(&mut b, &relay.publish(&out_e));
    assert!(!events.contains(&Event::Joined { group: Gid::Conv(conv_e), device: 1 }), "{events:?}");
    assert!(events.iter().any(|ev| matches!(ev, Event::Rejected { reason, .. } if reason.contains("welcome"))), "{events:?}");
}

#[test]
fn requests_and_claims_that_are_not_are_refused_and_a_blocked_users_request_is_not_answered() {
    let mut b = user(8);
    let users = b.users();
    b.ensure_key_package(NOW, TTL).unwrap();
    let bad = vec![
        (users.key_package(&b.user_id(), &[1, 2, 3], CLAIM_FRAGMENT).unwrap(), vec![9; 17]),
        (users.key_package(&b.user_id(), &[1, 2, 3], REQUEST_FRAGMENT).unwrap(), vec![2; 40]),
    ];
    let events = feed(&mut b, &bad);
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Rejected { .. })).count(), 2, "{events:?}");
    let mut m = user(9);
    b.set_blocked(m.user_id(), true, NOW).unwrap();
    let r = m.request(users.origin(), b.user_id(), NOW).unwrap();
    let events = feed(&mut b, &[(r.name, r.data)]);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(b.counters.requests, 0);
}
