//! Every decoder of untrusted bytes (`canopy_msg_core::fuzz::untrusted`) over arbitrary bytes
//! and over valid encodings with bytes changed, cut or added: nothing panics, and what decodes
//! re-encodes to itself. The cargo-fuzz target `payloads` (`apps/messenger/core/fuzz`) runs
//! the same function without end.

use canopy_msg_core::fuzz::untrusted;
use canopy_msg_core::payload::{Control, ConvKind, ConvRecord, Lifetimes, MailHeader, MailRef, Message, MsgRef, Pipeline, TeamRecord};
use canopy_msg_core::identity::UserId;
use proptest::prelude::*;

fn valid() -> Vec<Vec<u8>> {
    let users: std::collections::BTreeSet<UserId> = [UserId([1; 16]), UserId([2; 16])].into();
    vec![
        Message { reply_to: Some(MsgRef { device: 1, msg: 2 }), ..Message::text(5, "hello") }.encode().unwrap(),
        Message::control(5, Control::Add { users: vec![UserId([3; 16])], note: "hi".into() }).encode().unwrap(),
        Message::mail(5, MailHeader { reference: MailRef([1; 8]), prev: Some(MailRef([2; 8])), subject: "s".into() }, "b").encode().unwrap(),
        Message::pipeline(5, Pipeline::Step { kind: "vote".into(), body: "{}".into(), prior: Some([4; 32]) }).encode().unwrap(),
        Message::pipeline(5, Pipeline::ModelPart { model: [1; 32], index: 2, bytes: vec![3; 40] }).encode().unwrap(),
        TeamRecord { org: 7, team: 2, name: "ops".into(), lifetimes: Lifetimes::default(), channels: [(2, "general".into())].into(), next_device: 3, devices: [(0, 0), (1, 2)].into() }.encode(),
        ConvRecord {
            kind: ConvKind::Group,
            conv: canopy_msg_core::names::ConvId { origin: 5, conv: 9 },
            name: "g".into(),
            description: "d".into(),
            lifetimes: Lifetimes::default(),
            creator: UserId([1; 16]),
            users: users.clone(),
            admins: users,
            next_device: 2,
            devices: [(0, 0)].into(),
        }
        .encode(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        untrusted(&data);
    }

    #[test]
    fn damaged_valid_encodings_never_panic(which in 0usize..7, at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>(), extra in proptest::collection::vec(any::<u8>(), 0..8)) {
        let mut data = valid()[which].clone();
        let n = data.len();
        data[at % n] = byte;
        untrusted(&data);
        data.truncate(cut % (n + 1));
        untrusted(&data);
        data.extend_from_slice(&extra);
        untrusted(&data);
    }
}
