//! Hostile input on a team's names, through a real relay with the org's access rules: each is
//! ignored, logged and counted, and Secure keeps serving.

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
