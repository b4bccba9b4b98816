//! Hostile input on a team's names, through a real relay with the org's access rules: each is
//! ignored, logged and counted, and Secure keeps serving. And a hostile member of a group and
//! a mailbox: malformed and oversized operations and mail, each refused once, nothing lost.

mod common;

use canopy::{Chunk, Filter};
use canopy_msg_core::Org;
use canopy_relay::{AccessRule, Relay, RelayConfig, StoreKind};
use canopy_sdk::{Client, ConnectOptions, PublishError, Trust};
use common::{Home, await_epoch, texts};

const COMMITTER: &str = "committer-secret";
const DEVICE: &str = "device-secret";

fn rules(org: &Org) -> Vec<AccessRule> {
    use canopy_msg_core::names::Path;
    let f = |p: Path| org.all(p).to_string();
    vec![
        AccessRule {
            token: COMMITTER.into(),
            publish: [Path::Message, Path::KeyPackage, Path::Welcome, Path::Commit].map(f).to_vec(),
            subscribe: vec![f(Path::KeyPackage)],
        },
        AccessRule {
            token: DEVICE.into(),
            publish: [Path::Message, Path::KeyPackage].map(f).to_vec(),
            subscribe: [Path::Message, Path::Welcome, Path::Commit].map(f).to_vec(),
        },
    ]
}

fn status(home: &Home) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&home.ok(&["status", "--json"])).unwrap()["secure"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_forgeries_and_squatters_are_refused_and_secure_keeps_serving() {
    common::logs();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let org = Org::new("example.com", 7).unwrap();
    let config = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: root.join("relay"),
        store: StoreKind::Fjall,
        access: rules(&org),
        ..RelayConfig::default()
    };
    let relay = Relay::spawn(config).await.unwrap();

    let admin = Home::new(root, "admin");
    admin.init_with(&relay, &["--token", COMMITTER]);
    admin.ok(&["admin", "org", "init"]);
    admin.ok(&["admin", "team", "create", "ops"]);
    admin.ok(&["admin", "channel", "create", "ops", "general"]);
    let mut devices = Vec::new();
    for name in ["a", "b"] {
        let home = Home::new(root, name);
        home.init_with(&relay, &["--token", DEVICE]);
        home.ok(&["up"]);
        let hkp = home.ok(&["device", "key-package"]);
        admin.ok(&["admin", "team", "add", "ops", &hkp]);
        home.await_team("ops");
        devices.push(home);
    }
    let (a, b) = (&devices[0], &devices[1]);
    await_epoch(&admin, &[a, b]);
    let hello = a.ok(&["send", "ops/general", "hello"]);
    assert_eq!(hello, "2/2/1/1");
    b.await_text("ops/general", "hello");

    // A hostile client holding the devices' token.
    let mut opts = ConnectOptions::new(relay.local_addr(), Trust::CaPem(relay.cert_pem().to_string()));
    opts.token = Some(DEVICE.into());
    let mallory = Client::connect(opts).await.unwrap();
    let expiry = canopy_sdk::now_ms() + 3_600_000;
    let publish = |name, data: Vec<u8>| {
        let mallory = mallory.clone();
        async move { mallory.publish(Chunk::new(name, expiry, data).unwrap()).await }
    };

    // A hostile member: a device of the team running code of its own (holding its own keys,
    // publishing with the devices' token), added by hKP like any other.
    let now = canopy_sdk::now_ms();
    let mut rogue = canopy_msg_core::Device::open(canopy_msg_core::Key::random(), canopy_msg_core::MemoryBackend::default(), org).unwrap();
    let (hkp, kp) = rogue.key_package(now, 3_600_000, false).unwrap();
    for o in kp {
        publish(o.name, o.data).await.unwrap();
    }
    assert_eq!(admin.ok(&["admin", "team", "add", "ops", &canopy_msg_core::engine::hex(&hkp)]), "3");
    await_epoch(&admin, &[a, b]);
    let mut joined = Vec::new();
    for filter in [org.welcome_filter(&hkp), org.team_commits(2).unwrap(), org.team_messages(2).unwrap()] {
        let mut sub = mallory.subscribe(filter, canopy::wire::ReplayMode::CachedOnly).await.unwrap();
        while let Some(canopy_sdk::SubEvent::Chunk(c)) = sub.next().await {
            joined.push(c);
        }
    }
    let events = rogue.ingest(joined.iter().map(|c| (c.name(), c.data().as_ref()))).unwrap();
    assert!(events.contains(&canopy_msg_core::Event::Joined { group: canopy_msg_core::names::Gid::Team(2), device: 3 }), "{events:?}");
    let before = status(b)["rejected"].as_u64().unwrap();

    // 1. Garbage under the team's messages.
    publish(org.message(2, 2, 9, 1).unwrap(), b"\x01\x01not a fragment at all".to_vec()).await.unwrap();
    // 2. A fragment of the wrong length: a copy of a's message, one byte short.
    let mut sub = mallory.subscribe(Filter::exact(org.message(2, 2, 1, 1).unwrap()), canopy::wire::ReplayMode::CachedOnly).await.unwrap();
    let real = loop {
        match sub.next().await.unwrap() {
            canopy_sdk::SubEvent::Chunk(c) => break c,
            _ => continue,
        }
    };
    let mut short = real.data().to_vec();
    short.pop();
    publish(org.message(2, 2, 9, 2).unwrap(), short).await.unwrap();
    // 3. A valid MLS message moved under another device's name: the sender is not that
    //    device. (a's own message 1, re-published as device 2's message 7.)
    publish(org.message(2, 2, 2, 7).unwrap(), real.data().to_vec()).await.unwrap();
    // 4. A squatted commit name: the access rules refuse it.
    let commit = publish(org.commit(2, 99, 0).unwrap(), b"squat".to_vec()).await;
    assert!(matches!(commit, Err(PublishError::Denied { .. })), "{commit:?}");
    // 5. A squatted message name: a's next message number, taken first.
    publish(org.message(2, 2, 1, 2).unwrap(), b"\x01\x01squatted".to_vec()).await.unwrap();

    // 6. A message signed by someone who is not a member: an outsider's own group with the
    //    team's group id.
    publish(org.message(2, 2, 9, 20).unwrap(), outsider_message(&org)).await.unwrap();

    // 7. A forged edit: the hostile member replaces a's hello with a text of its own.
    let forged = canopy_msg_core::Message { replaces: Some(canopy_msg_core::MsgRef { device: 1, msg: 1 }), ..canopy_msg_core::Message::text(now, "forged edit") };
    let (_, out) = rogue.send(2, 2, forged, now).unwrap();
    for o in out {
        publish(o.name, o.data).await.unwrap();
    }

    // b refuses 1, 2, 3, 5, 6 (a's next name holds garbage) and 7, counts them, and still
    // serves.
    let deadline = std::time::Instant::now() + common::WAIT;
    while status(b)["rejected"].as_u64().unwrap() < before + 6 {
        assert!(std::time::Instant::now() < deadline, "b never counted the refusals: {}", status(b));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // a skips the name squatted before it sends.
    a.await_team("ops");
    let deadline = std::time::Instant::now() + common::WAIT;
    while status(a)["rejected"].as_u64().unwrap() < 1 {
        assert!(std::time::Instant::now() < deadline, "a never saw the squatter: {}", status(a));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let next = a.ok(&["send", "ops/general", "after the squatter"]);
    assert_eq!(next, "2/2/1/3", "a skipped the taken name");
    b.await_text("ops/general", "after the squatter");
    assert_eq!(texts(b), ["hello", "after the squatter"]);
    assert_eq!(texts(a), texts(b));
    assert_eq!(b.read("ops/general")[0]["edited"], false, "the forged edit changed nothing");
    mallory.close();
}

/// A real MLS message for team 2's group id, from a group the team's members are not in.
fn outsider_message(org: &Org) -> Vec<u8> {
    use canopy_msg_core::fragment::{Assembly, Fragment};
    use canopy_msg_core::names::Path;
    use canopy_msg_core::payload::Lifetimes;
    use canopy_msg_core::{Committer, Device, Key, MemoryBackend, Message};
    let now = canopy_sdk::now_ms();
    let mut rogue = Committer::open(Key::random(), MemoryBackend::default(), *org).unwrap();
    rogue.org_init().unwrap();
    rogue.create_team("ops", Lifetimes::default()).unwrap();
    let (_, _, mut chunks) = rogue.create_channel(2, "general", now).unwrap();
    let mut outsider = Device::open(Key::random(), MemoryBackend::default(), *org).unwrap();
    let (hkp, kp) = outsider.key_package(now, 60_000, false).unwrap();
    let mut asm = Assembly::new();
    for o in &kp {
        asm.add(Fragment::decode(Path::KeyPackage, &o.data).unwrap()).unwrap();
    }
    let added = rogue.add_device(2, &asm.finish().unwrap().unwrap(), &hkp, now).unwrap();
    chunks.extend(added.outgoing);
    outsider.ingest(chunks.iter().map(|o| (o.name, o.data.as_slice()))).unwrap();
    let text = Message::text(now, "not a member");
    let (_, out) = outsider.send(2, 2, text, now).unwrap();
    out[0].data.clone()
}

mod member_payloads {
    //! A member running its own code: a real user (in this process, with the real MLS core)
    //! in a group and a mailbox with a real `canopy-msg` device, sending well-encrypted
    //! messages whose plaintext is malformed or oversized.

    use std::collections::BTreeSet;

    use canopy_msg_core::device::{CONV_CHANNEL, Device};
    use canopy_msg_core::payload::{ConvKind, MAX_LABEL_TEXT, MAX_TEXT, MailRef};
    use canopy_msg_core::{Key, MemoryBackend, Org};

    use super::common::{self, Home, catch_up, eventually, publish, relay};

    const TTL: u64 = 30 * 24 * 3600 * 1000;

    fn rejected(home: &Home) -> u64 {
        super::status(home)["rejected"].as_u64().unwrap()
    }

    /// `[version 1, kind, created_ms]`, the head of every payload.
    fn head(kind: u8) -> Vec<u8> {
        let mut b = vec![1, kind];
        b.extend_from_slice(&canopy_sdk::now_ms().to_be_bytes());
        b
    }

    fn with_string(mut b: Vec<u8>, declared: u16, bytes: &[u8]) -> Vec<u8> {
        b.extend_from_slice(&declared.to_be_bytes());
        b.extend_from_slice(bytes);
        b
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn malformed_and_oversized_group_operations_and_mail_from_a_member_are_refused_and_nothing_is_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
        let alice = Home::new(tmp.path(), "alice");
        alice.init_org(&origin, 7);
        alice.ok(&["up"]);
        let client = common::client(&origin).await;
        let mut m = Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", 8).unwrap()).unwrap();
        publish(&client, m.ensure_key_package(canopy_sdk::now_ms(), TTL).unwrap()).await;
        let mallory = m.user_id().to_string();
        alice.ok(&["contact", "add", &mallory, "mallory"]);
        eventually("alice knows mallory's device", || alice.ok(&["contacts", "--json"]).contains("\"devices\":1").then_some(()));

        // A group and a mailbox, both with mallory in them.
        let group = alice.ok(&["group", "create", "pals", "mallory"]);
        alice.ok(&["mail", "send", "--to", "mallory", "--subject", "hello", "welcome"]);
        let kind_of = |m: &Device<MemoryBackend>, kind: ConvKind| m.convs().find(|(_, r, ..)| r.kind == kind).map(|(id, ..)| id);
        let conv = catch_up(&mut m, &origin, "the group", |m| kind_of(m, ConvKind::Group)).await;
        let mailbox = catch_up(&mut m, &origin, "the mailbox", |m| kind_of(m, ConvKind::Mail)).await;
        assert_eq!(conv.to_string(), group);
        let before = rejected(&alice);

        let rename = |name: &[u8], declared: u16| {
            let mut b = head(2);
            b.push(1);
            with_string(b, declared, name)
        };
        let mail = |subject: &[u8], declared: u16, body: &[u8]| {
            let mut b = head(3);
            b.extend_from_slice(&[7; 8]);
            b.push(0);
            let mut b = with_string(b, declared, subject);
            b.extend_from_slice(body);
            b
        };
        let long_label = vec![b'x'; MAX_LABEL_TEXT + 1];
        let group_payloads: Vec<(&str, Vec<u8>)> = vec![
            ("an unknown group operation", [head(2), vec![9]].concat()),
            ("a rename whose name is cut short", rename(b"abc", 10)),
            ("a rename over the label limit", rename(&long_label, long_label.len() as u16)),
            ("an add that promises 65535 users and carries none", [head(2), vec![3, 0xff, 0xff]].concat()),
            ("an unknown message kind", [head(9), b"?".to_vec()].concat()),
            ("a bare version byte", vec![1]),
        ];
        let mail_payloads: Vec<(&str, Vec<u8>)> = vec![
            ("a mail cut inside its reference", [head(3), vec![7; 3]].concat()),
            ("a mail whose prev flag is not 0 or 1", { let mut b = head(3); b.extend_from_slice(&[7; 8]); b.push(5); b }),
            ("a mail subject over the label limit", mail(&long_label, long_label.len() as u16, b"body")),
            ("a mail body over the text limit", mail(b"s", 1, &vec![b'b'; MAX_TEXT + 1])),
        ];
        let count = (group_payloads.len() + mail_payloads.len()) as u64;
        for (_, payload) in &group_payloads {
            publish(&client, m.send_raw(conv, CONV_CHANNEL, payload, canopy_sdk::now_ms()).unwrap().1).await;
        }
        for (_, payload) in &mail_payloads {
            publish(&client, m.send_raw(mailbox, CONV_CHANNEL, payload, canopy_sdk::now_ms()).unwrap().1).await;
        }
        // Then good ones, after the bad: nothing in between is lost.
        publish(&client, m.send(conv, CONV_CHANNEL, canopy_msg_core::Message::text(canopy_sdk::now_ms(), "still friends?"), canopy_sdk::now_ms()).unwrap().1).await;
        let to: BTreeSet<_> = [canopy_msg_core::identity::UserId::parse(&alice.user()).unwrap()].into();
        let (reference, ..) = {
            let (r, c, id, out) = m.send_mail(&to, "a real one", "with a body", None::<MailRef>, canopy_sdk::now_ms()).unwrap();
            publish(&client, out).await;
            (r, c, id)
        };

        alice.await_text(&format!("group:{group}"), "still friends?");
        eventually("alice has the real mail", || alice.ok(&["mail", "list"]).contains(&reference.to_string()).then_some(()));
        let refused = eventually("every bad payload is counted as refused", || Some(rejected(&alice) - before).filter(|n| *n >= count));
        assert_eq!(refused, count, "each refused once: {:?}", group_payloads.iter().chain(&mail_payloads).map(|(w, _)| *w).collect::<Vec<_>>());

        // Nothing of them shows, nothing changed, and everything before and after is there.
        let texts: Vec<String> = alice.read(&format!("group:{group}")).iter().map(|m| m["text"].as_str().unwrap().to_string()).collect();
        assert_eq!(texts, vec!["still friends?"], "only the good message");
        let info: serde_json::Value = serde_json::from_str(&alice.ok(&["group", "info", &group, "--json"])).unwrap();
        assert_eq!((info["name"].as_str(), info["description"].as_str()), (Some("pals"), Some("")), "{info}");
        assert_eq!(info["members"].as_array().unwrap().len(), 2, "{info}");
        let mails = alice.ok(&["mail", "list", "--json"]);
        assert_eq!(mails.lines().count(), 2, "alice's own mail and the real one: {mails}");
        assert!(alice.run(&["status"]).status.success(), "Secure keeps serving");
        let log = std::fs::read_to_string(alice.dir.join("logs/secure.log")).unwrap_or_default();
        assert!(log.contains("payload"), "each refusal is logged with its reason: {log}");
        client.close();
        origin.shutdown().await;
    }
}

mod forged_device {
    //! A device credential not signed by the user it claims, published as a key package
    //! under that user's names on a real relay: the real device that follows the user refuses
    //! it, counts it, and never adds it to anything.

    use canopy_msg_core::engine::{self, CIPHERSUITE};
    use canopy_msg_core::fragment;
    use canopy_msg_core::identity::{Binding, UserId};
    use canopy_msg_core::names::{Path, Users};
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use super::common::{self, Home, eventually, relay};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_key_package_whose_device_is_not_signed_by_its_claimed_user_is_refused_and_never_added() {
        let tmp = tempfile::tempdir().unwrap();
        let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
        let alice = Home::new(tmp.path(), "alice");
        alice.init_org(&origin, 7);
        alice.ok(&["up"]);

        // bob is a user (his identity key); mallory holds another key and makes a device that
        // claims to be bob's.
        let bob = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let mallory = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let device = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let signature = Binding::sign(&mallory, mallory.public(), device.public()).unwrap().signature;
        let binding = Binding { user_key: bob.public().try_into().unwrap(), signature };
        let credential = CredentialWithKey { credential: binding.credential(), signature_key: device.public().into() };
        let provider = OpenMlsRustCrypto::default();
        let bundle = KeyPackage::builder().leaf_node_capabilities(engine::capabilities()).mark_as_last_resort().build(CIPHERSUITE, &provider, &device, credential).unwrap();
        let hkp = bundle.key_package().hash_ref(provider.crypto()).unwrap().as_slice().to_vec();
        let bytes = MlsMessageOut::from(bundle.key_package().clone()).tls_serialize_detached().unwrap();
        let bob_id = UserId::of(bob.public());

        alice.ok(&["contact", "add", &bob_id.to_string(), "bob"]);
        let before = super::status(&alice)["rejected"].as_u64().unwrap();
        let client = common::client(&origin).await;
        let users = Users::new("example.com");
        let out: Vec<_> = fragment::split(Path::KeyPackage, &bytes)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, data)| canopy_msg_core::Outgoing { name: users.key_package(&bob_id, &hkp, i as u16).unwrap(), expiry_ms: canopy_sdk::now_ms() + 3_600_000, data })
            .collect();
        common::publish(&client, out).await;

        eventually("alice refuses the forged key package", || (super::status(&alice)["rejected"].as_u64().unwrap() > before).then_some(()));
        let log = std::fs::read_to_string(alice.dir.join("logs/secure.log")).unwrap();
        assert!(log.contains(&format!("the device is not signed by its claimed user {bob_id}")), "the refusal is logged with its reason: {log}");
        let contacts = alice.ok(&["contacts", "--json"]);
        assert!(contacts.contains("\"devices\":0"), "no device of bob known: {contacts}");
        // A message to bob waits: there is no device of his to start a conversation with.
        let id = alice.ok(&["dm", "bob", "hello bob?"]);
        assert!(id.starts_with("pending/"), "{id}");
        assert!(common::status(&alice)["secure"]["conversations"].as_array().unwrap().is_empty());
        client.close();
        origin.shutdown().await;
    }
}
