//! The MLS flows of a team, end to end in one process: the committer and member devices
//! exchange chunks through a first-write-wins map standing in for the relay tree.

mod common;

use canopy_msg_core::committer::Committer;
use canopy_msg_core::device::{Device, Event};
use canopy_msg_core::names::{Parsed, Path};
use canopy_msg_core::payload::Lifetimes;
use canopy_msg_core::{Key, MemoryBackend, Message};
use common::*;

#[test]
fn two_devices_join_by_hkp_and_talk_with_a_thread_and_an_edit() {
    let mut w = World::new();
    let (mut a, da) = w.join(Key::random(), MemoryBackend::default());
    let (mut b, db) = w.join(Key::random(), MemoryBackend::default());
    assert_eq!((da, db), (1, 2));
    // a catches up on the commit that added b.
    feed(&mut a, &w.relay.all());
    let epoch = |d: &Device<MemoryBackend>| d.teams().next().unwrap().2;
    assert_eq!(epoch(&a), epoch(&b));
    assert_eq!(a.resolve_channel(w.team, "general").unwrap(), w.channel);

    let (hello, out) = a.send(w.team, w.channel, text("hello"), NOW).unwrap();
    let chunks = w.relay.publish(&out);
    let events = feed(&mut b, &chunks);
    assert_eq!(events, vec![Event::Message { group: w.team.into(), channel: w.channel, id: hello }]);

    let reply = Message { created_ms: NOW + 1, reply_to: Some(hello), ..text("hi a") };
    let (r1, out) = b.send(w.team, w.channel, reply, NOW).unwrap();
    let c1 = w.relay.publish(&out);
    let reply2 = Message { created_ms: NOW + 2, reply_to: Some(r1), ..text("reply to a reply") };
    let (r2, out) = a.send(w.team, w.channel, reply2, NOW).unwrap();
    let c2 = w.relay.publish(&out);
    let edit = Message { created_ms: NOW + 3, replaces: Some(hello), ..text("hello, edited") };
    let (_, out) = a.send(w.team, w.channel, edit, NOW).unwrap();
    let c3 = w.relay.publish(&out);
    feed(&mut a, &c1);
    feed(&mut b, &[c2, c3].concat());

    let va = a.messages(w.team, w.channel);
    let vb = b.messages(w.team, w.channel);
    assert_eq!(va, vb);
    assert_eq!(va.len(), 3);
    assert_eq!((va[0].text.as_str(), va[0].edited), ("hello, edited", true));
    assert_eq!(va[1].reply_to, Some(hello));
    assert_eq!(va[2].id, r2);
    assert_eq!(va[2].reply_to, Some(hello), "a reply to a reply attaches to the root");

    // Everything again, in reverse: nothing surfaces twice and nothing breaks.
    let mut all = w.relay.all();
    all.reverse();
    assert!(feed(&mut a, &all).iter().all(|e| !matches!(e, Event::Message { .. } | Event::Rejected { .. })));
    assert!(feed(&mut b, &all).iter().all(|e| !matches!(e, Event::Message { .. } | Event::Rejected { .. })));
    assert_eq!(a.messages(w.team, w.channel), va);

    // No plaintext on the relay.
    for (_, data) in w.relay.all() {
        assert!(!data.windows(5).any(|x| x == b"hello"));
    }
}

#[test]
fn long_texts_are_fragmented_and_overlong_ones_refused() {
    let mut w = World::new();
    let (mut a, _) = w.join(Key::random(), MemoryBackend::default());
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    feed(&mut a, &w.relay.all());
    let long = "ü".repeat(8 * 1024);
    let (id, out) = a.send(w.team, w.channel, text(&long), NOW).unwrap();
    assert!(out.len() > 16, "{} fragments", out.len());
    let mut chunks = w.relay.publish(&out);
    chunks.reverse();
    feed(&mut b, &chunks);
    assert_eq!(b.message(w.team, w.channel, id).unwrap().text, long);
    // The next message numbers skip the fragments.
    let (next, _) = a.send(w.team, w.channel, text("short"), NOW).unwrap();
    assert_eq!(next.msg, id.msg + out.len() as u32);
    let err = a.send(w.team, w.channel, text(&"x".repeat(16 * 1024 + 1)), NOW).unwrap_err();
    assert!(err.to_string().contains("limit is 16384"), "{err}");
}

#[test]
fn commits_apply_in_epoch_order_and_future_messages_wait_for_theirs() {
    let mut w = World::new();
    let (mut a, _) = w.join(Key::random(), MemoryBackend::default());
    let start = a.teams().next().unwrap().2;
    // Three more commits a has not seen: two channels and a device.
    let (_, e1, c1) = w.admin.create_channel(w.team, "random", NOW).unwrap();
    let (_, e2, c2) = w.admin.create_channel(w.team, "ops-log", NOW).unwrap();
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    let e3 = e2 + 1;
    assert_eq!((e1, e2), (start + 1, start + 2));
    // b, already at e3, sends; a gets the message before any commit.
    let (id, out) = b.send(w.team, w.channel, text("from the future"), NOW).unwrap();
    let events = feed(&mut a, &w.relay.publish(&out));
    assert!(events.is_empty(), "held, not shown: {events:?}");
    assert_eq!(a.counters.held, 1);
    // Then commit e2 alone: a gap.
    feed(&mut a, &w.relay.publish(&c2));
    assert_eq!(a.missing_commits(w.team), Some((e1, e1)));
    assert_eq!(a.teams().next().unwrap().2, start);
    // Then e3 and e1: all apply, in order, and the held message shows.
    // Every fragment of commit e3 (an add with bound credentials takes more than one).
    let commit3: Vec<_> =
        w.relay.all().into_iter().filter(|(n, _)| matches!(org().parse(*n), Some(Parsed::Commit { epoch, .. }) if epoch == e3)).collect();
    let mut events = feed(&mut a, &commit3);
    events.extend(feed(&mut a, &w.relay.publish(&c1)));
    let epochs: Vec<u64> = events.iter().filter_map(|e| if let Event::Epoch { epoch, .. } = e { Some(*epoch) } else { None }).collect();
    assert_eq!(epochs, vec![e1, e2, e3]);
    assert!(events.contains(&Event::Message { group: w.team.into(), channel: w.channel, id }));
    assert_eq!(a.missing_commits(w.team), None);
    assert_eq!(a.resolve_channel(w.team, "ops-log").unwrap(), 4);
}

#[test]
fn messages_dropped_while_too_many_were_held_are_fetched_again_once_caught_up() {
    let mut w = World::new();
    let (mut a, _) = w.join(Key::random(), MemoryBackend::default());
    a.set_max_held(2);
    // A commit a has not seen, and five messages from the epoch after it.
    let (_, _, c1) = w.admin.create_channel(w.team, "random", NOW).unwrap();
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    let mut ids = Vec::new();
    let mut sent = Vec::new();
    for i in 0..5 {
        let (id, out) = b.send(w.team, w.channel, text(&format!("early {i}")), NOW + i).unwrap();
        ids.push(id);
        sent.extend(w.relay.publish(&out));
    }
    assert!(feed(&mut a, &sent).is_empty());
    assert_eq!((a.counters.held, a.counters.held_dropped), (2, 3));
    // The commits arrive (c1, then b's add): the two held messages show, and a asks for the
    // rest again.
    let mut commits = w.relay.publish(&c1);
    commits.extend(w.relay.all().into_iter().filter(|(n, _)| matches!(org().parse(*n), Some(canopy_msg_core::names::Parsed::Commit { .. }))));
    let events = feed(&mut a, &commits);
    let shown = |events: &[Event]| events.iter().filter(|e| matches!(e, Event::Message { .. })).count();
    assert_eq!(shown(&events), 2, "{events:?}");
    assert!(events.contains(&Event::Refetch { group: w.team.into() }), "{events:?}");
    // The replay from the cache: the three dropped ones show, the two shown do not again.
    let events = feed(&mut a, &sent);
    assert_eq!(shown(&events), 3, "{events:?}");
    assert!(!events.contains(&Event::Refetch { group: w.team.into() }));
    let texts: Vec<String> = a.messages(w.team, w.channel).into_iter().map(|m| m.text).collect();
    assert_eq!(texts, (0..5).map(|i| format!("early {i}")).collect::<Vec<_>>());
}

#[test]
fn bad_input_is_refused_counted_and_changes_nothing() {
    let mut w = World::new();
    let (mut a, da) = w.join(Key::random(), MemoryBackend::default());
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    feed(&mut a, &w.relay.all());
    let (hello, out) = a.send(w.team, w.channel, text("hello"), NOW).unwrap();
    let hello_chunks = w.relay.publish(&out);
    feed(&mut b, &hello_chunks);
    let before = b.messages(w.team, w.channel);

    // Garbage under the team, and a fragment of the wrong length.
    let garbage = (org().message(w.team, w.channel, 9, 1).unwrap(), b"\x01\x01garbage".to_vec());
    let mut short = hello_chunks[0].1.clone();
    short.pop();
    let wrong_length = (org().message(w.team, w.channel, 9, 2).unwrap(), short);
    // An outsider with a group of the same id: signed, but not by a member.
    let mut outsider = Device::open(Key::random(), MemoryBackend::default(), org()).unwrap();
    let mut rogue_admin = Committer::open(Key::random(), MemoryBackend::default(), org()).unwrap();
    rogue_admin.org_init().unwrap();
    rogue_admin.create_team("ops", Lifetimes::default()).unwrap();
    let (_, rogue_out) = rogue_admin.create_channel(w.team, "general", NOW).map(|(c, _, o)| (c, o)).unwrap();
    let (hkp, kp_out) = outsider.key_package(NOW, 1000, false).unwrap();
    let mut rogue_relay = Relay::default();
    rogue_relay.publish(&kp_out);
    rogue_relay.publish(&rogue_out);
    let kp = rogue_relay.object(Path::KeyPackage, org().key_package_filter(&hkp));
    let added = rogue_admin.add_device(w.team, &kp, &hkp, NOW).unwrap();
    rogue_relay.publish(&added.outgoing);
    feed(&mut outsider, &rogue_relay.all());
    let (_, forged) = outsider.send(w.team, w.channel, text("i am not a member"), NOW).unwrap();
    let forged: Vec<_> = forged.iter().map(|o| (org().message(w.team, w.channel, 7, 1).unwrap(), o.data.clone())).collect();
    // A forged edit: b tries to replace a's message.
    let (_, out) = b.send(w.team, w.channel, Message { replaces: Some(hello), ..text("forged edit") }, NOW).unwrap();
    let forged_edit = w.relay.publish(&out);
    // b publishes under a's name: the MLS sender is not the device the name says.
    let (_, out) = b.send(w.team, w.channel, text("posing as a"), NOW).unwrap();
    let posing = vec![(org().message(w.team, w.channel, da, 50).unwrap(), out[0].data.clone())];

    let mut events = Vec::new();
    for batch in [vec![garbage], vec![wrong_length], forged, forged_edit, posing] {
        events.extend(feed(&mut a, &batch));
    }
    let reasons: Vec<String> = events.iter().filter_map(|e| if let Event::Rejected { reason, .. } = e { Some(reason.clone()) } else { None }).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons[1].contains("must carry"), "{}", reasons[1]);
    assert!(reasons[3].contains("tried to edit"), "{}", reasons[3]);
    assert!(reasons[4].contains("under device"), "{}", reasons[4]);
    assert_eq!(a.counters.rejected, 5);
    assert_eq!(a.messages(w.team, w.channel), before, "nothing changed");
    // And a keeps working.
    let (id, out) = a.send(w.team, w.channel, text("still here"), NOW).unwrap();
    assert_eq!(id.msg, 51, "a skipped the name b took");
    feed(&mut b, &w.relay.publish(&out));
    assert_eq!(b.message(w.team, w.channel, id).unwrap().text, "still here");
}

#[test]
fn a_device_restarts_from_its_sealed_state_and_carries_on() {
    let mut w = World::new();
    let key = Key::random();
    let (mut a, _) = w.join(key.clone(), MemoryBackend::default());
    let (mut b, _) = w.join(Key::random(), MemoryBackend::default());
    feed(&mut a, &w.relay.all());
    let (h1, out) = a.send(w.team, w.channel, text("before the crash"), NOW).unwrap();
    feed(&mut b, &w.relay.publish(&out));
    let (_, out) = b.send(w.team, w.channel, text("hi"), NOW + 1).unwrap();
    feed(&mut a, &w.relay.publish(&out));
    let history = a.messages(w.team, w.channel);

    // "Crash": keep only what a persisted.
    let backend = {
        let (state, _) = (a, ());
        // A device's backend is inside its vault; reopen from a copy of it.
        state_backend(state)
    };
    assert!(Device::open(Key::random(), backend.clone(), org()).is_err(), "a wrong key is refused");
    let mut a = Device::open(key, backend, org()).unwrap();
    assert_eq!(a.messages(w.team, w.channel), history);
    // Replays of everything change nothing; new messages flow both ways in the current epoch.
    assert!(feed(&mut a, &w.relay.all()).is_empty());
    let (_, out) = w.admin.create_channel(w.team, "after", NOW).map(|(c, e, o)| ((c, e), o)).unwrap();
    let commit = w.relay.publish(&out);
    feed(&mut a, &commit);
    feed(&mut b, &commit);
    let (h2, out) = a.send(w.team, w.channel, text("after the crash"), NOW + 2).unwrap();
    assert!(h2.msg > h1.msg);
    feed(&mut b, &w.relay.publish(&out));
    assert_eq!(b.messages(w.team, w.channel).len(), 3);
}

fn state_backend(device: Device<MemoryBackend>) -> MemoryBackend {
    device.backend().clone()
}

#[test]
fn the_committer_resolves_teams_by_name_after_a_restart_and_from_state_without_the_index() {
    let key = Key::random();
    let mut admin = Committer::open(key.clone(), MemoryBackend::default(), org()).unwrap();
    assert!(!admin.initialised());
    assert!(admin.create_team("ops", Lifetimes::default()).unwrap_err().to_string().contains("not initialised"));
    admin.org_init().unwrap();
    let ops = admin.create_team("ops", Lifetimes::default()).unwrap();
    let dev = admin.create_team("dev", Lifetimes::default()).unwrap();
    assert_eq!((ops, dev), (2, 3));
    assert!(admin.create_team("ops", Lifetimes::default()).unwrap_err().to_string().contains("exists"));
    admin.create_channel(dev, "general", NOW).unwrap();

    let backend = admin.backend().clone();
    let again = Committer::open(key.clone(), backend.clone(), org()).unwrap();
    assert_eq!((again.resolve("dev").unwrap(), again.resolve("2").unwrap()), (dev, ops));
    assert!(again.resolve("qa").is_err() && again.resolve("9").is_err());

    // State written before the name index existed: the committer rebuilds it from the groups.
    let index = |b: &MemoryBackend| b.records.keys().filter(|k| k.starts_with(b"a/name/")).count();
    assert_eq!(index(&backend), 3);
    let mut old = backend.clone();
    old.records.retain(|k, _| !k.starts_with(b"a/name/"));
    let mut migrated = Committer::open(key, old, org()).unwrap();
    assert_eq!(index(migrated.backend()), 3, "the index was written back");
    assert_eq!(migrated.resolve("dev").unwrap(), dev);
    assert_eq!(migrated.create_team("qa", Lifetimes::default()).unwrap(), 4);
    let mut admin = admin;
    assert_eq!(migrated.teams().unwrap()[..3], admin.teams().unwrap()[..]);
}
