//! Groups with admins, in one process: create, rename, describe, add, remove and revoke by
//! the admin's committer; a non-admin's operation refused by every member; a removed
//! member reads nothing sent after its removal.

mod common;

use canopy_msg_core::device::{CONV_CHANNEL, Device, Event};
use canopy_msg_core::names::Gid;
use canopy_msg_core::payload::Control;
use canopy_msg_core::{Key, MemoryBackend, Message, Org};
use common::*;

const TTL: u64 = 30 * 24 * 3600 * 1000;

fn user(relay: &mut Relay, org: u32) -> Device<MemoryBackend> {
    let mut d = Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", org).unwrap()).unwrap();
    relay.publish(&d.ensure_key_package(NOW, TTL).unwrap());
    d
}

/// Feeds everything the relay holds to every device, twice (a welcome, then what its
/// conversation's subscription brings).
fn sync(relay: &Relay, devices: &mut [&mut Device<MemoryBackend>]) -> Vec<Vec<Event>> {
    let mut out = vec![Vec::new(); devices.len()];
    for _ in 0..2 {
        for (i, d) in devices.iter_mut().enumerate() {
            out[i].extend(feed(d, &relay.all()));
        }
    }
    out
}

fn names_of(d: &Device<MemoryBackend>, conv: canopy_msg_core::names::ConvId) -> (String, String, usize) {
    let r = d.conv_record(conv).unwrap();
    (r.name.clone(), r.description.clone(), r.users.len())
}

#[test]
fn an_admin_runs_the_group_and_every_member_holds_the_same_record() {
    let mut relay = Relay::default();
    let (mut a, mut b, mut c, mut d) = (user(&mut relay, 7), user(&mut relay, 8), user(&mut relay, 9), user(&mut relay, 10));
    sync(&relay, &mut [&mut a]);
    let (conv, out) = a.create_group("friends", &[b.user_id(), c.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    sync(&relay, &mut [&mut a, &mut b, &mut c]);
    for x in [&b, &c] {
        assert_eq!(names_of(x, conv), ("friends".into(), String::new(), 3));
        assert_eq!(x.resolve_group("friends").unwrap(), conv);
        assert_eq!(x.conv_record(conv).unwrap().admins, [a.user_id()].into());
    }

    // Rename and describe: a commit each, the same record everywhere.
    relay.publish(&a.group_op(conv, &Control::Rename { name: "pals".into() }, NOW).unwrap());
    relay.publish(&a.group_op(conv, &Control::Describe { description: "weekend plans".into() }, NOW).unwrap());
    sync(&relay, &mut [&mut b, &mut c]);
    for x in [&a, &b, &c] {
        assert_eq!(names_of(x, conv), ("pals".into(), "weekend plans".into(), 3));
    }

    // Add d: it joins, and reads what is sent from then on.
    sync(&relay, &mut [&mut a]);
    relay.publish(&a.group_op(conv, &Control::Add { users: vec![d.user_id()], note: "meet d".into() }, NOW).unwrap());
    sync(&relay, &mut [&mut b, &mut c, &mut d]);
    assert_eq!(names_of(&d, conv), ("pals".into(), "weekend plans".into(), 4));

    // A non-admin's rename: every member refuses it, and nothing changes.
    let (_, out) = b.send(conv, CONV_CHANNEL, Message::control(NOW, Control::Rename { name: "bobs".into() }), NOW).unwrap();
    relay.publish(&out);
    let events = sync(&relay, &mut [&mut a, &mut c, &mut d]);
    for e in &events {
        let refused: Vec<_> = e.iter().filter_map(|e| if let Event::Rejected { reason, .. } = e { Some(reason.clone()) } else { None }).collect();
        assert_eq!(refused.len(), 1, "{e:?}");
        assert!(refused[0].contains("not an admin"), "{}", refused[0]);
    }
    let (ops, failed) = a.run_ops(NOW);
    assert!(ops.is_empty() && failed.is_empty(), "the committer does nothing");
    assert_eq!(names_of(&c, conv).0, "pals");

    // An admin's operation sent as a message is carried out by the committer.
    let (_, out) = a.send(conv, CONV_CHANNEL, Message::control(NOW, Control::Describe { description: "by message".into() }), NOW).unwrap();
    relay.publish(&out);
    assert!(a.run_ops(NOW).0.is_empty(), "a's own message is not an op to it: it commits directly");

    // Remove c: c reads nothing sent afterwards.
    relay.publish(&a.group_op(conv, &Control::Remove { users: vec![c.user_id()], note: "bye".into() }, NOW).unwrap());
    sync(&relay, &mut [&mut b, &mut c, &mut d]);
    assert!(c.is_removed(Gid::Conv(conv)));
    assert_eq!(names_of(&b, conv).2, 3);
    let (_, out) = a.send(conv, CONV_CHANNEL, Message::text(NOW + 5, "after c left"), NOW).unwrap();
    let chunks = relay.publish(&out);
    sync(&relay, &mut [&mut b, &mut d]);
    let texts = |x: &Device<MemoryBackend>| x.messages(conv, CONV_CHANNEL).into_iter().map(|s| s.text).collect::<Vec<_>>();
    assert!(texts(&b).contains(&"after c left".to_string()));
    assert!(texts(&d).contains(&"after c left".to_string()));
    let before = texts(&c);
    assert!(feed(&mut c, &chunks).is_empty());
    assert_eq!(texts(&c), before, "c cannot read it");
    assert!(c.send(conv, CONV_CHANNEL, Message::text(NOW, "still here?"), NOW).is_err());

    // Revoke: a new epoch with fresh keys for the members that remain.
    let epoch = b.group_state(conv).unwrap().0;
    relay.publish(&a.group_op(conv, &Control::Revoke, NOW).unwrap());
    sync(&relay, &mut [&mut b, &mut d]);
    assert_eq!(b.group_state(conv).unwrap().0, epoch + 1);
    assert_eq!(d.group_state(conv).unwrap().0, epoch + 1);
    assert!(b.group_op(conv, &Control::Revoke, NOW).is_err(), "only the committer commits");
}

#[test]
fn a_non_members_operation_under_the_groups_names_is_refused() {
    let mut relay = Relay::default();
    let (mut a, mut b) = (user(&mut relay, 7), user(&mut relay, 8));
    sync(&relay, &mut [&mut a]);
    let (conv, out) = a.create_group("club", &[b.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    sync(&relay, &mut [&mut b]);
    // An outsider (not a member, so without the group's keys) sends a rename in a group of
    // its own and publishes it under the real group's names.
    let mut outsider = user(&mut relay, 9);
    let (fake, _) = outsider.create_group("club", &Default::default(), NOW).unwrap();
    let (_, out) = outsider.send(fake, CONV_CHANNEL, Message::control(NOW, Control::Rename { name: "owned".into() }), NOW).unwrap();
    let forged: Vec<_> = out
        .iter()
        .enumerate()
        .map(|(i, o)| (canopy_msg_core::names::Users::message(conv, 5, 1 + i as u32).unwrap(), o.data.clone()))
        .collect();
    for d in [&mut a, &mut b] {
        let events = feed(d, &forged);
        assert!(events.iter().any(|e| matches!(e, Event::Rejected { .. })), "{events:?}");
        assert_eq!(d.conv_record(conv).unwrap().name, "club");
    }
    assert!(a.run_ops(NOW).0.is_empty());
}

#[test]
fn group_names_and_operations_are_checked() {
    let mut relay = Relay::default();
    let mut a = user(&mut relay, 7);
    for bad in ["", "42", "a/b", "x:y", "0123456789abcdef01"] {
        assert!(a.create_group(bad, &Default::default(), NOW).is_err(), "{bad:?}");
    }
    let (conv, _) = a.create_group("solo", &Default::default(), NOW).unwrap();
    assert!(a.group_op(conv, &Control::Rename { name: "x".repeat(65) }, NOW).is_err());
    assert!(a.group_op(conv, &Control::Remove { users: vec![a.user_id()], note: String::new() }, NOW).is_err(), "the admin stays");
    let (other, _) = a.create_group("solo", &Default::default(), NOW).unwrap();
    let err = a.resolve_group("solo").unwrap_err().to_string();
    assert!(err.contains("2 groups") && err.contains(&conv.to_string()) && err.contains(&other.to_string()), "{err}");
    assert_eq!(a.resolve_group(&conv.to_string()).unwrap(), conv);
}
