//! Links over the relay's Unix-domain socket (`unix_listen`), driven by the blocking std
//! client `canopy::session::unix::UnixClient`; leaves without a QUIC listener under a QUIC
//! parent; the socket file's life cycle.
//!
//! The tests are plain threads: relays and QUIC SDK clients run on a tokio runtime in the
//! background, the Unix clients block, as in a process without an async runtime.

#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use canopy::session::unix::{ConnectError, Event, PublishError, UnixClient, UnixOptions};
use canopy::session::{PublishFailure, SessionEvent, SubEvent};
use canopy::wire::{self, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION, ReplayMode, Role};
use canopy::{Chunk, Name};
use canopy_relay::{AccessRule, Relay, RelayConfig, RelayHandle};
use common::*;
use tokio::runtime::Runtime;

const TEAM: u128 = 0x0a0b << 112;
const TEAM_FILTER: &str = "0x0a0b0000000000000000000000000000/16";

fn runtime() -> Runtime {
    init_tracing();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn sock(dir: &Path) -> std::path::PathBuf {
    dir.join("relay.sock")
}

/// A relay with its QUIC listener and a Unix socket in its data dir.
fn unix_config(dir: &Path) -> RelayConfig {
    RelayConfig { unix_listen: Some(sock(dir)), ..config(dir) }
}

/// A leaf under `parent`: no QUIC listener, only its Unix socket.
fn leaf_config(dir: &Path, parent: &RelayHandle) -> RelayConfig {
    RelayConfig { quic_listen: false, unix_listen: Some(sock(dir)), ..child_config(dir, parent) }
}

fn connect(relay: &RelayHandle) -> UnixClient {
    UnixClient::connect(relay.unix_path().expect("a unix socket"), None).expect("unix client connects")
}

/// Events until one satisfies `done` (included), bounded by `WAIT`.
fn events_until(client: &UnixClient, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + WAIT;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = client.next_event(left).unwrap_or_else(|| panic!("timed out; got {events:?}"));
        let stop = done(&event);
        events.push(event);
        if stop {
            return events;
        }
    }
}

/// Names of the chunks of subscription `id` among `events`.
fn chunk_names(events: &[Event], id: u64) -> Vec<u128> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Session(SessionEvent::Sub { id: i, event: SubEvent::Chunk(c) }) if *i == id => Some(c.name().to_u128()),
            _ => None,
        })
        .collect()
}

/// Chunks of subscription `id` until the one named `name` (included).
fn delivered_until(client: &UnixClient, id: u64, name: u128) -> Vec<u128> {
    let events = events_until(
        client,
        |e| matches!(e, Event::Session(SessionEvent::Sub { id: i, event: SubEvent::Chunk(c) }) if *i == id && c.name() == Name::new(name)),
    );
    chunk_names(&events, id)
}

/// Subscribes and returns the replayed names once `ReplayDone` arrives.
fn subscribe(client: &UnixClient, filter_text: &str, mode: ReplayMode) -> (u64, Vec<u128>) {
    let id = client.subscribe(filter(filter_text), mode);
    let events = events_until(client, |e| matches!(e, Event::Session(SessionEvent::Sub { id: i, event: SubEvent::ReplayDone }) if *i == id));
    (id, chunk_names(&events, id))
}

fn publish(client: &UnixClient, chunk: Chunk) {
    let name = chunk.name();
    client.publish_wait(chunk, WAIT).unwrap_or_else(|e| panic!("publishing {name}: {e}"));
}

/// Chunks from an SDK subscription until the one named `name` (included).
async fn sdk_until(sub: &mut canopy_sdk::Subscription, name: u128) -> Vec<u128> {
    let mut names = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match sub.next().await.expect("subscription open") {
                SubEvent::Chunk(c) => {
                    names.push(c.name().to_u128());
                    if c.name() == Name::new(name) {
                        return;
                    }
                }
                SubEvent::Error { code, message } => panic!("subscription ended: {code} {message}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; got {names:x?}"));
    names
}

async fn sdk_client(relay: &RelayHandle) -> canopy_sdk::Client {
    let opts =
        canopy_sdk::ConnectOptions::new(relay.local_addr(), canopy_sdk::Trust::CaPem(relay.cert_pem().to_owned()));
    canopy_sdk::Client::connect(opts).await.expect("sdk client connects")
}

#[test]
fn unix_client_publishes_and_subscribes_cached_and_live() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let relay = rt.block_on(spawn(unix_config(dir.path())));
    assert_eq!(relay.unix_path(), Some(sock(dir.path()).as_path()));
    assert!(relay.quic_addr().is_some());

    let publisher = connect(&relay);
    let first = chunk(TEAM | 1, "cached");
    publish(&publisher, first.clone());
    // The identical chunk again is acknowledged; different bytes at the name are a conflict
    // naming the chunk.
    publish(&publisher, first);
    match publisher.publish_wait(chunk(TEAM | 1, "other bytes"), WAIT) {
        Err(PublishError::Refused { code: ErrorCode::Conflict, name, .. }) => assert_eq!(name, Name::new(TEAM | 1)),
        other => panic!("expected a conflict, got {other:?}"),
    }

    // A small window: a replay longer than it arrives whole, paced by credit.
    let mut opts = UnixOptions::new(relay.unix_path().unwrap());
    opts.window = 4;
    let subscriber = UnixClient::connect_with(opts).unwrap();
    for n in 2..=40 {
        publish(&publisher, chunk(TEAM | n, "more"));
    }
    let (id, replayed) = subscribe(&subscriber, TEAM_FILTER, ReplayMode::CachedAndLive);
    assert_eq!(replayed, (1..=40).map(|n| TEAM | n).collect::<Vec<_>>());

    // Live, in both directions.
    publish(&publisher, chunk(TEAM | 41, "live"));
    assert_eq!(delivered_until(&subscriber, id, TEAM | 41), vec![TEAM | 41]);
    let (back, _) = subscribe(&publisher, TEAM_FILTER, ReplayMode::LiveOnly);
    publish(&subscriber, chunk(TEAM | 42, "reply"));
    assert_eq!(delivered_until(&publisher, back, TEAM | 42), vec![TEAM | 42]);

    // A CachedOnly query ends after its replay.
    let query = subscriber.subscribe(filter(TEAM_FILTER), ReplayMode::CachedOnly);
    let events = events_until(&subscriber, |e| *e == Event::Session(SessionEvent::Ended { id: query }));
    assert_eq!(chunk_names(&events, query).len(), 42);
    assert_eq!(subscriber.pending_publishes(), 0);
    drop((publisher, subscriber));
    rt.block_on(relay.shutdown());
}

#[test]
fn leaf_without_quic_bridges_its_unix_socket_and_a_quic_parent() {
    let rt = runtime();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let parent = rt.block_on(spawn(config(dirs[0].path())));
    let leaf = rt.block_on(spawn(leaf_config(dirs[1].path(), &parent)));
    assert_eq!(leaf.quic_addr(), None);
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| leaf.local_addr())).is_err());

    let quic = rt.block_on(sdk_client(&parent));
    let mut quic_sub = rt.block_on(quic.subscribe(filter(TEAM_FILTER), ReplayMode::CachedAndLive)).unwrap();
    let local = connect(&leaf);
    let (id, _) = subscribe(&local, TEAM_FILTER, ReplayMode::CachedAndLive);

    // Up: Unix client → leaf → parent → QUIC subscriber.
    publish(&local, chunk(TEAM | 1, "up"));
    assert_eq!(rt.block_on(sdk_until(&mut quic_sub, TEAM | 1)), vec![TEAM | 1]);
    // Down: QUIC publisher at the parent → leaf → Unix subscriber.
    rt.block_on(quic.publish(chunk(TEAM | 2, "down"))).unwrap();
    assert_eq!(delivered_until(&local, id, TEAM | 2), vec![TEAM | 2]);

    drop(local);
    rt.block_on(async {
        quic.close();
        leaf.shutdown().await;
        parent.shutdown().await;
    });
}

#[test]
fn a_partitioned_leaf_keeps_serving_its_unix_clients_and_drains_on_heal() {
    let rt = runtime();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let parent = rt.block_on(spawn(config(dirs[0].path())));
    let parent_addr = parent.local_addr();
    let leaf = rt.block_on(spawn(leaf_config(dirs[1].path(), &parent)));
    let quic = rt.block_on(sdk_client(&parent));
    let mut quic_sub = rt.block_on(quic.subscribe(filter(TEAM_FILTER), ReplayMode::CachedAndLive)).unwrap();
    let u1 = connect(&leaf);
    let u2 = connect(&leaf);
    let (id2, _) = subscribe(&u2, TEAM_FILTER, ReplayMode::CachedAndLive);
    publish(&u1, chunk(TEAM | 1, "before"));
    assert_eq!(rt.block_on(sdk_until(&mut quic_sub, TEAM | 1)), vec![TEAM | 1]);
    assert_eq!(delivered_until(&u2, id2, TEAM | 1), vec![TEAM | 1]);

    rt.block_on(eventually("the parent acknowledged chunk 1", || leaf.metrics().store.outbox == 0));

    // Partition: the parent dies.
    rt.block_on(parent.kill());
    rt.block_on(eventually("the leaf notices its parent is gone", || leaf.metrics().links == 2));
    for n in 2..=4 {
        publish(&u1, chunk(TEAM | n, "during the partition"));
    }
    assert_eq!(delivered_until(&u2, id2, TEAM | 4), vec![TEAM | 2, TEAM | 3, TEAM | 4]);
    rt.block_on(eventually("the leaf keeps what the parent has not acknowledged", || leaf.metrics().store.outbox == 3));

    // Heal: the parent comes back from its data dir on the same port.
    let parent = rt.block_on(spawn_on(RelayConfig { listen: parent_addr, ..config(dirs[0].path()) }));
    assert_eq!(rt.block_on(sdk_until(&mut quic_sub, TEAM | 4)), vec![TEAM | 2, TEAM | 3, TEAM | 4]);
    rt.block_on(eventually("the outbox drains", || leaf.metrics().store.outbox == 0));
    // Nothing twice: a sentinel is the next thing the parent's subscriber sees.
    publish(&u1, chunk(TEAM | 5, "sentinel"));
    assert_eq!(rt.block_on(sdk_until(&mut quic_sub, TEAM | 5)), vec![TEAM | 5]);
    rt.block_on(eventually("the parent holds all five", || parent.metrics().store.chunks == 5));

    drop((u1, u2));
    rt.block_on(async {
        quic.close();
        leaf.shutdown().await;
        parent.shutdown().await;
    });
}

#[test]
fn unix_client_reconnects_and_resubscribes_after_the_relay_restarts() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let relay = rt.block_on(spawn(unix_config(dir.path())));
    let mut opts = UnixOptions::new(sock(dir.path()));
    opts.min_backoff = Duration::from_millis(20);
    opts.max_backoff = Duration::from_millis(200);
    let client = UnixClient::connect_with(opts).unwrap();
    let (id, _) = subscribe(&client, TEAM_FILTER, ReplayMode::CachedAndLive);
    let other = connect(&relay);
    publish(&other, chunk(TEAM | 1, "before"));
    assert_eq!(delivered_until(&client, id, TEAM | 1), vec![TEAM | 1]);
    drop(other);

    rt.block_on(relay.shutdown());
    assert!(!sock(dir.path()).exists(), "the socket file is removed at shutdown");
    let events = events_until(&client, |e| matches!(e, Event::Disconnected { .. }));
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(!client.is_connected());
    assert_eq!(client.publish_wait(chunk(TEAM | 9, "nowhere"), WAIT), Err(PublishError::Disconnected));

    // While it is down another publisher adds a chunk; the restarted relay has both.
    let relay = rt.block_on(spawn(unix_config(dir.path())));
    let other = connect(&relay);
    publish(&other, chunk(TEAM | 2, "while away"));
    let events = events_until(
        &client,
        |e| matches!(e, Event::Session(SessionEvent::Sub { event: SubEvent::Chunk(c), .. }) if c.name() == Name::new(TEAM | 2)),
    );
    assert!(events.contains(&Event::Reconnected { subscriptions: 1 }), "{events:?}");
    // The replay repeats chunk 1; the session drops it.
    assert_eq!(chunk_names(&events, id), vec![TEAM | 2]);
    publish(&client, chunk(TEAM | 3, "after"));
    let (_, cached) = subscribe(&other, TEAM_FILTER, ReplayMode::CachedOnly);
    assert_eq!(cached, vec![TEAM | 1, TEAM | 2, TEAM | 3]);
    drop((client, other));
    rt.block_on(relay.shutdown());
}

#[test]
fn the_socket_is_private_replaces_a_stale_one_and_goes_at_shutdown() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = sock(dir.path());
    // A stale socket: bound, nobody listening any more.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let relay = rt.block_on(spawn(unix_config(dir.path())));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    drop(connect(&relay));

    // A live socket is not taken over.
    let other = tempfile::tempdir().unwrap();
    let err = rt
        .block_on(Relay::spawn(RelayConfig { unix_listen: Some(path.clone()), ..config(other.path()) }))
        .err()
        .expect("a second relay on the same socket fails");
    assert!(format!("{err:#}").contains("another process is listening"), "{err:#}");
    rt.block_on(relay.kill());
    assert!(!path.exists(), "removed after kill");

    // Nor is a file that is not a socket.
    std::fs::write(&path, "not a socket").unwrap();
    let err = rt.block_on(Relay::spawn(unix_config(dir.path()))).err().expect("refused");
    assert!(format!("{err:#}").contains("is not a socket"), "{err:#}");
    std::fs::remove_file(&path).unwrap();

    // Graceful shutdown removes it too.
    let relay = rt.block_on(spawn(unix_config(dir.path())));
    assert!(path.exists());
    rt.block_on(relay.shutdown());
    assert!(!path.exists());
}

#[test]
fn a_wrong_token_is_refused_on_the_unix_socket() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let rule = AccessRule {
        token: "secure".into(),
        publish: vec![TEAM_FILTER.into()],
        subscribe: vec!["0x0a000000000000000000000000000000/8".into()],
    };
    let relay = rt.block_on(spawn(RelayConfig { access: vec![rule], ..unix_config(dir.path()) }));
    let path = relay.unix_path().unwrap().to_owned();
    for token in [Some("wrong"), None] {
        match UnixClient::connect(&path, token) {
            Err(ConnectError::Refused { code: ErrorCode::Unauthenticated, .. }) => {}
            other => panic!("token {token:?}: expected Unauthenticated, got {other:?}"),
        }
    }
    let client = UnixClient::connect(&path, Some("secure")).unwrap();
    publish(&client, chunk(TEAM | 1, "allowed"));
    match client.publish_wait(chunk(0x0c << 120, "elsewhere"), WAIT) {
        Err(PublishError::Refused { code: ErrorCode::PublishDenied, .. }) => {}
        other => panic!("expected PublishDenied, got {other:?}"),
    }
    let denied = client.subscribe(filter("0x00000000000000000000000000000000/0"), ReplayMode::LiveOnly);
    let events = events_until(&client, |e| *e == Event::Session(SessionEvent::Ended { id: denied }));
    assert!(
        matches!(
            &events[..],
            [.., Event::Session(SessionEvent::Sub { event: SubEvent::Error { code: ErrorCode::SubscribeDenied, .. }, .. }), _]
        ),
        "{events:?}"
    );
    drop(client);
    rt.block_on(relay.shutdown());
}

#[test]
fn oversized_and_malformed_frames_on_the_unix_socket_close_only_that_link() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let relay = rt.block_on(spawn(unix_config(dir.path())));
    let good = connect(&relay);

    let mut raw = std::os::unix::net::UnixStream::connect(relay.unix_path().unwrap()).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
    raw.write_all(&wire::encode_to_vec(&hello).unwrap()).unwrap();
    // A length prefix above the 4096-byte limit.
    raw.write_all(&(wire::MAX_FRAME_LEN as u32 + 1).to_be_bytes()).unwrap();
    let mut bytes = Vec::new();
    raw.read_to_end(&mut bytes).unwrap();
    let mut decoder = FrameDecoder::new();
    decoder.extend(&bytes);
    // The relay's Hello comes first unless the reader refused the bad prefix before the node
    // answered the Hello (it reads both at once).
    let mut next = decoder.next_frame();
    if matches!(next, Ok(Some(Frame::Hello { .. }))) {
        next = decoder.next_frame();
    }
    match next {
        Ok(Some(Frame::Error { code: ErrorCode::FrameTooLarge, about: None, .. })) => {}
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // The other link is unaffected.
    publish(&good, chunk(TEAM | 1, "still here"));
    assert_eq!(good.wait_published(12345, Duration::ZERO), None::<Result<(), PublishFailure>>);
    drop(good);
    rt.block_on(relay.shutdown());
}

#[test]
fn a_refused_peer_that_never_closes_its_end_is_dropped_after_the_linger() {
    // The relay ends the link (a wrong token) and half-closes the socket; a peer that never
    // closes its end must not keep the link (and its reader task) for ever: the relay drops
    // the socket after LINGER (3 s), and the peer's writes fail from then on.
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let rule = AccessRule { token: "secure".into(), publish: vec![], subscribe: vec![] };
    let relay = rt.block_on(spawn(RelayConfig { access: vec![rule], ..unix_config(dir.path()) }));
    let mut peer = std::os::unix::net::UnixStream::connect(relay.unix_path().unwrap()).unwrap();
    let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: Some("wrong".into()) };
    peer.write_all(&wire::encode_to_vec(&hello).unwrap()).unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = Vec::new();
    peer.read_to_end(&mut bytes).expect("the relay's answer, then the end of its stream");
    let mut decoder = FrameDecoder::new();
    decoder.extend(&bytes);
    assert!(
        matches!(decoder.next_frame(), Ok(Some(Frame::Error { code: ErrorCode::Unauthenticated, .. }))),
        "{bytes:?}"
    );
    // Still open on this side: a frame now is read (and ignored) while the relay lingers, and
    // refused once it has dropped the socket.
    let started = Instant::now();
    let ping = wire::encode_to_vec(&hello).unwrap();
    let dropped = loop {
        if peer.write_all(&ping).is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "the relay still holds a refused link after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(dropped < Duration::from_secs(10), "{dropped:?}");
    rt.block_on(relay.shutdown());
}
