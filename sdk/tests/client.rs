//! The SDK against real in-process relays over QUIC (and TLS over TCP) on 127.0.0.1.

mod common;

use canopy_relay::StoreKind;
use canopy_sdk::{
    Client, ClientError, ConnectOptions, ConnectionEvent, Filter, Name, PublishError, ReplayMode, SubEvent, Trust,
};
use common::*;

#[tokio::test]
async fn publish_then_subscribe_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let subscriber = client(&relay).await;
    let publisher = client(&relay).await;

    let mut sub = subscriber.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);

    let c = chunk(7, "hello");
    within("ack", publisher.publish(c.clone())).await.unwrap();
    assert_eq!(next_chunk(&mut sub).await, c);

    // Many publishes in flight at once, each answered by its own ack.
    let all: Vec<_> = (100..140).map(|n| chunk(n, "x")).collect();
    let results = within("acks", futures_join(&publisher, all.clone())).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut got = Vec::new();
    for _ in 0..all.len() {
        got.push(next_chunk(&mut sub).await);
    }
    got.sort_by_key(|c| c.name());
    assert_eq!(got, all);
    relay.shutdown().await;
}

async fn futures_join(client: &Client, chunks: Vec<canopy_sdk::Chunk>) -> Vec<Result<(), PublishError>> {
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|c| {
            let client = client.clone();
            tokio::spawn(async move { client.publish(c).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn late_subscriber_gets_cache_in_name_order_then_replay_done_then_live() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let publisher = client(&relay).await;
    for n in [3u128, 1, 2] {
        within("ack", publisher.publish(chunk(n, &format!("c{n}")))).await.unwrap();
    }
    // A chunk outside the filter is not delivered.
    within("ack", publisher.publish(chunk(1 << 120, "other"))).await.unwrap();

    let subscriber = client(&relay).await;
    let filter = Filter::new(Name::new(0), 64).unwrap();
    let mut sub = subscriber.subscribe(filter, ReplayMode::CachedAndLive).await.unwrap();
    for n in 1..=3u128 {
        let c = next_chunk(&mut sub).await;
        assert_eq!((c.name(), c.data().as_ref()), (Name::new(n), format!("c{n}").as_bytes()));
    }
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
    within("ack", publisher.publish(chunk(4, "live"))).await.unwrap();
    assert_eq!(next_chunk(&mut sub).await.name(), Name::new(4));

    // CachedOnly ends after ReplayDone.
    let mut cached = subscriber.subscribe(filter, ReplayMode::CachedOnly).await.unwrap();
    for n in 1..=4u128 {
        assert_eq!(next_chunk(&mut cached).await.name(), Name::new(n));
    }
    assert_eq!(next(&mut cached).await, SubEvent::ReplayDone);
    assert_eq!(within("end", cached.next()).await, None);
    relay.shutdown().await;
}

#[tokio::test]
async fn publish_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let client = client(&relay).await;
    let first = chunk(9, "first");
    within("ack", client.publish(first.clone())).await.unwrap();
    // An identical re-publish is acknowledged.
    within("ack", client.publish(first)).await.unwrap();
    match within("answer", client.publish(chunk(9, "second"))).await {
        Err(PublishError::Conflict { name, message }) => {
            assert_eq!(name, Name::new(9));
            assert!(!message.is_empty());
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let expired = canopy_sdk::Chunk::new(Name::new(10), 1, &b"old"[..]).unwrap();
    assert!(matches!(within("answer", client.publish(expired)).await, Err(PublishError::Expired { .. })));
    // The connection is still fine afterwards.
    within("ack", client.publish(chunk(11, "ok"))).await.unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn pinned_fingerprint_trust() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let opts = ConnectOptions::new(relay.local_addr(), Trust::Fingerprint(relay.fingerprint().to_uppercase()));
    let client = within("connect", Client::connect(opts)).await.expect("pinned fingerprint accepted");
    within("ack", client.publish(chunk(1, "pinned"))).await.unwrap();

    let wrong = canopy_sdk::fingerprint(b"some other certificate");
    let opts = ConnectOptions::new(relay.local_addr(), Trust::Fingerprint(wrong));
    match within("refusal", Client::connect(opts)).await {
        Err(ClientError::Connect { .. }) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
    // A CA that is not the relay's fails too.
    let other_dir = tempfile::tempdir().unwrap();
    let other = common::relay(other_dir.path()).await;
    let opts = ConnectOptions::new(relay.local_addr(), Trust::CaPem(other.cert_pem().to_string()));
    assert!(matches!(within("refusal", Client::connect(opts)).await, Err(ClientError::Connect { .. })));
    relay.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn subscription_resumes_after_relay_restart_and_sees_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = relay_at(dir.path(), "127.0.0.1:0".parse().unwrap(), StoreKind::Fjall).await;
    let addr = first.local_addr();
    let subscriber = client(&first).await;
    let mut sub = subscriber.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
    {
        let publisher = client(&first).await;
        for n in 1..=2u128 {
            within("ack", publisher.publish(chunk(n, "before"))).await.unwrap();
            assert_eq!(next_chunk(&mut sub).await.name(), Name::new(n));
        }
    }
    first.shutdown().await;

    // Same port, same data directory (so the same certificate and stored chunks).
    let second = relay_restart(dir.path(), addr, StoreKind::Fjall).await;
    let publisher = client(&second).await;
    within("ack", publisher.publish(chunk(3, "after"))).await.unwrap();
    // The resubscription replays 1, 2 and 3 in name order; 1 and 2 were already delivered.
    let c = next_chunk(&mut sub).await;
    assert_eq!((c.name(), c.data().as_ref()), (Name::new(3), &b"after"[..]));
    within("ack", publisher.publish(chunk(4, "live"))).await.unwrap();
    assert_eq!(next_chunk(&mut sub).await.name(), Name::new(4));

    // The subscriber's client has reconnected (it got chunk 3 on the new connection), so it
    // can publish again. (The relay does not echo a chunk to the connection it came from.)
    within("ack", subscriber.publish(chunk(5, "from subscriber"))).await.unwrap();
    within("ack", publisher.publish(chunk(6, "live"))).await.unwrap();
    assert_eq!(next_chunk(&mut sub).await.name(), Name::new(6));
    second.shutdown().await;
}

#[tokio::test]
async fn a_replay_larger_than_the_buffer_arrives_whole_into_a_bounded_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let publisher = client(&relay).await;
    for n in 1..=40u128 {
        within("ack", publisher.publish(chunk(n, "x"))).await.unwrap();
    }
    let mut opts = options(&relay);
    opts.subscription_buffer = 4;
    let client = within("connect", Client::connect(opts)).await.unwrap();
    let mut sub = client.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    // A second subscription on the same connection, opened after the first: once its replay
    // is done, the first one has had every chance to overfill its buffer.
    let mut barrier = client.subscribe(Filter::exact(Name::new(1)), ReplayMode::CachedOnly).await.unwrap();
    assert_eq!(next_chunk(&mut barrier).await.name(), Name::new(1));
    assert_eq!(next(&mut barrier).await, SubEvent::ReplayDone);
    assert!(sub.buffered() <= 4, "{} buffered with a window of 4", sub.buffered());
    for n in 1..=40u128 {
        assert_eq!(next_chunk(&mut sub).await.name(), Name::new(n));
    }
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
    assert!(sub.peak_buffered() <= sub.buffer_bound(), "peak {}", sub.peak_buffered());
    relay.shutdown().await;
}

/// The SDK reports each step of a reconnect, and a `LiveOnly` subscription that spanned the
/// gap says so (it may have missed chunks); a `CachedAndLive` one does not need to.
#[tokio::test]
async fn reconnects_are_reported_and_a_live_only_subscription_reports_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let first = relay_at(dir.path(), "127.0.0.1:0".parse().unwrap(), StoreKind::Fjall).await;
    let addr = first.local_addr();
    let subscriber = client(&first).await;
    assert!(subscriber.is_connected());
    let mut events = subscriber.connection_events();
    let mut live = subscriber.subscribe(Filter::ALL, ReplayMode::LiveOnly).await.unwrap();
    let mut cached = subscriber.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    assert_eq!(next(&mut live).await, SubEvent::ReplayDone);
    assert_eq!(next(&mut cached).await, SubEvent::ReplayDone);
    first.shutdown().await;
    match within("disconnected", events.recv()).await.unwrap() {
        ConnectionEvent::Disconnected { reason } => assert!(!reason.is_empty()),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(!subscriber.is_connected());

    // Published while the subscriber is away.
    let second = relay_restart(dir.path(), addr, StoreKind::Fjall).await;
    let publisher = client(&second).await;
    within("ack", publisher.publish(chunk(1, "while away"))).await.unwrap();
    assert_eq!(within("connected", events.recv()).await.unwrap(), ConnectionEvent::Connected);
    assert_eq!(
        within("resubscribed", events.recv()).await.unwrap(),
        ConnectionEvent::Resubscribed { subscriptions: 2 }
    );
    assert!(subscriber.is_connected());
    // The live-only subscription is told first that it may have missed something (chunk 1,
    // unless the client reconnected before it was published); the other replays it.
    assert_eq!(next(&mut live).await, SubEvent::Gap);
    assert_eq!(next_chunk(&mut cached).await.name(), Name::new(1));
    within("ack", publisher.publish(chunk(2, "live"))).await.unwrap();
    let mut c = next_chunk(&mut live).await;
    if c.name() == Name::new(1) {
        c = next_chunk(&mut live).await;
    }
    assert_eq!(c.name(), Name::new(2));
    assert_eq!(next_chunk(&mut cached).await.name(), Name::new(2));
    second.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// TLS over TCP (`tcp://`, the relay's `tcp_listen`)

#[tokio::test]
async fn tcp_and_quic_clients_share_one_relay() {
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let relay = relay_with_tcp(dir.path(), any, any, StoreKind::Memory).await;
    let tcp = within("connect over TCP", Client::connect(tcp_options(&relay))).await.expect("TCP client connects");
    let quic = client(&relay).await;

    // Cached chunks replay over TCP, in name order, then live ones from QUIC arrive.
    for n in [3u128, 1, 2] {
        within("ack", quic.publish(chunk(n, "quic"))).await.unwrap();
    }
    let mut over_tcp = tcp.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    for n in 1..=3u128 {
        assert_eq!(next_chunk(&mut over_tcp).await.name(), Name::new(n));
    }
    assert_eq!(next(&mut over_tcp).await, SubEvent::ReplayDone);
    let mut over_quic = quic.subscribe(Filter::ALL, ReplayMode::LiveOnly).await.unwrap();
    assert_eq!(next(&mut over_quic).await, SubEvent::ReplayDone);
    within("ack", quic.publish(chunk(4, "live from quic"))).await.unwrap();
    let c = next_chunk(&mut over_tcp).await;
    assert_eq!((c.name(), c.data().as_ref()), (Name::new(4), &b"live from quic"[..]));

    // Publishes over TCP: acked, delivered to QUIC, typed errors, and the link stays up.
    within("ack", tcp.publish(chunk(5, "from tcp"))).await.unwrap();
    let c = next_chunk(&mut over_quic).await;
    assert_eq!((c.name(), c.data().as_ref()), (Name::new(5), &b"from tcp"[..]));
    assert!(matches!(within("answer", tcp.publish(chunk(5, "other"))).await, Err(PublishError::Conflict { .. })));
    // A burst of concurrent 1 KB publishes: every chunk acked, and delivered exactly once.
    let burst: Vec<_> = (100..400u128).map(|n| chunk(n, &"x".repeat(1000))).collect();
    for r in futures_join(&tcp, burst).await {
        r.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 100..400u128 {
        assert!(seen.insert(next_chunk(&mut over_quic).await.name()), "a chunk arrived twice");
    }
    assert_eq!(seen, (100..400u128).map(Name::new).collect());
    tcp.close();
    relay.shutdown().await;
}

#[tokio::test]
async fn tcp_trust_is_checked_like_quic() {
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let relay = relay_with_tcp(dir.path(), any, any, StoreKind::Memory).await;
    let addr = format!("tcp://{}", relay.tcp_addr().unwrap());
    let pinned = ConnectOptions::new(&addr, Trust::Fingerprint(relay.fingerprint().into()));
    let client = within("connect", Client::connect(pinned)).await.expect("pinned fingerprint accepted over TCP");
    within("ack", client.publish(chunk(1, "pinned"))).await.unwrap();
    let wrong = ConnectOptions::new(&addr, Trust::Fingerprint(canopy_sdk::fingerprint(b"another certificate")));
    match within("refusal", Client::connect(wrong)).await {
        Err(ClientError::Connect { message, .. }) => assert!(message.contains("certificate") || message.contains("fingerprint"), "{message}"),
        other => panic!("expected a connect error, got {other:?}"),
    }
    // A relay without a TCP listener: refused at once, with the address in the error.
    let quic_only = relay.local_addr();
    let refused = ConnectOptions::new(format!("tcp://{quic_only}"), Trust::CaPem(relay.cert_pem().into()));
    match within("refusal", Client::connect(refused)).await {
        Err(e @ ClientError::Connect { .. }) => assert!(e.to_string().contains(&format!("tcp://{quic_only}")), "{e}"),
        other => panic!("expected a connect error, got {other:?}"),
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn a_tcp_subscription_resumes_after_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let first = relay_with_tcp(dir.path(), any, any, StoreKind::Fjall).await;
    let (quic_addr, tcp_addr) = (first.local_addr(), first.tcp_addr().unwrap());
    let subscriber = within("connect", Client::connect(tcp_options(&first))).await.unwrap();
    let mut events = subscriber.connection_events();
    let mut sub = subscriber.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
    within("ack", subscriber.publish(chunk(1, "before"))).await.unwrap();
    first.shutdown().await;
    match within("the loss", events.recv()).await.unwrap() {
        ConnectionEvent::Disconnected { .. } => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }

    // Same ports, same data: the TCP client reconnects by itself and resubscribes.
    let second = within("the ports to be free again", async {
        loop {
            let config = canopy_relay::RelayConfig {
                listen: quic_addr,
                tcp_listen: Some(tcp_addr),
                data: dir.path().to_path_buf(),
                store: StoreKind::Fjall,
                ..canopy_relay::RelayConfig::default()
            };
            match canopy_relay::Relay::spawn(config).await {
                Ok(relay) => return relay,
                Err(e) if format!("{e:#}").contains("binding") => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Err(e) => panic!("relay restart: {e:#}"),
            }
        }
    })
    .await;
    let publisher = client(&second).await;
    within("ack", publisher.publish(chunk(2, "after"))).await.unwrap();
    assert_eq!(within("connected", events.recv()).await.unwrap(), ConnectionEvent::Connected);
    // Its own chunk 1 was never delivered to it (no echo), so the resubscription replays it,
    // then 2, whether 2 came before the reconnect (replayed) or after (live).
    let c = next_chunk(&mut sub).await;
    assert_eq!((c.name(), c.data().as_ref()), (Name::new(1), &b"before"[..]));
    let c = next_chunk(&mut sub).await;
    assert_eq!((c.name(), c.data().as_ref()), (Name::new(2), &b"after"[..]));
    within("ack", subscriber.publish(chunk(3, "from the resumed client"))).await.unwrap();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_replay_arrives_whole_over_tcp() {
    // Megabytes each way over TLS on TCP (4 MB of publishes, their acks, a 4 MB replay), then
    // one chunk on its own: nothing is left behind in a TLS stream at the end of a burst.
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let relay = relay_with_tcp(dir.path(), any, any, StoreKind::Memory).await;
    let publisher = within("connect", Client::connect(tcp_options(&relay))).await.unwrap();
    const N: u128 = 4000;
    let data = "r".repeat(1000);
    for batch in (0..N).collect::<Vec<_>>().chunks(500) {
        let chunks = batch.iter().map(|&n| chunk(n, &data)).collect();
        for r in within("acks", futures_join(&publisher, chunks)).await {
            r.unwrap();
        }
    }
    let mut opts = tcp_options(&relay);
    opts.subscription_buffer = 1 << 16;
    let subscriber = within("connect", Client::connect(opts)).await.unwrap();
    let mut sub = subscriber.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    for n in 0..N {
        let c = next_chunk(&mut sub).await;
        assert_eq!((c.name(), c.data().len()), (Name::new(n), 1000));
    }
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
    // The last publish after the burst arrives live, on its own.
    within("ack", publisher.publish(chunk(N, "last"))).await.unwrap();
    assert_eq!(next_chunk(&mut sub).await.name(), Name::new(N));
    relay.shutdown().await;
}

/// Publishes without acks, over QUIC and over TCP: a burst several times the SDK's backlog
/// limit arrives whole and in order (the publisher is slowed, not cut off, and nothing is
/// lost); an identical re-publish is silent; a conflict comes back as an event naming the
/// chunk; acked publishes on the same connection are unaffected; and without a connection
/// the publish fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_publishes_arrive_and_only_refusals_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let relay = relay_with_tcp(dir.path(), any, any, StoreKind::Memory).await;
    let subscriber = client(&relay).await;
    let mut sub = subscriber.subscribe(Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
    let quic = client(&relay).await;
    let tcp = within("connect over TCP", Client::connect(tcp_options(&relay))).await.unwrap();
    let data = "u".repeat(1000);
    const BURST: u128 = 3_000;
    for (base, publisher) in [(1u128 << 64, &quic), (2 << 64, &tcp)] {
        let mut events = publisher.connection_events();
        let reader = async {
            for n in 0..BURST {
                let c = next_chunk(&mut sub).await;
                assert_eq!(c.name(), Name::new(base + n), "in publish order");
            }
        };
        let first = chunk(base, &data);
        let writer = async {
            publisher.publish_unacked(first.clone()).await.unwrap();
            for n in 1..BURST {
                publisher.publish_unacked(chunk(base + n, &data)).await.unwrap();
            }
        };
        within("the burst", async { tokio::join!(reader, writer) }).await;

        // Only refusals come back: the identical re-publish says nothing, the conflict does.
        let refusals = publisher.unacked_refusals();
        publisher.publish_unacked(first).await.unwrap();
        let conflict = publisher.publish_unacked(chunk(base, "other data")).await.unwrap();
        match within("the refusal", events.recv()).await.unwrap() {
            ConnectionEvent::UnackedRefused { seq, code, message } => {
                assert_eq!((seq, code), (conflict, canopy_sdk::ErrorCode::Conflict));
                assert!(message.contains(&Name::new(base).to_string()), "{message}");
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
        assert_eq!(publisher.unacked_refusals(), refusals + 1);
        // An acked publish after them is answered, and nothing else came back meanwhile.
        within("ack", publisher.publish(chunk(base + BURST, "acked"))).await.unwrap();
        assert_eq!(next_chunk(&mut sub).await.name(), Name::new(base + BURST));
        let extra = events.try_recv();
        assert!(extra.is_err(), "only the conflict is reported: {extra:?}");
    }

    // Published and closed at once: what was queued still reaches the relay, over QUIC as
    // over TCP, before the connection closes.
    for (base, options) in [(3u128 << 64, options(&relay)), (4 << 64, tcp_options(&relay))] {
        let publisher = within("connect", Client::connect(options)).await.unwrap();
        for n in 0..200 {
            publisher.publish_unacked(chunk(base + n, &data)).await.unwrap();
        }
        publisher.close();
        for n in 0..200 {
            assert_eq!(next_chunk(&mut sub).await.name(), Name::new(base + n), "sent before the close");
        }
    }

    // Without a connection nothing is sent, and the publisher hears so at once.
    let mut events = tcp.connection_events();
    relay.shutdown().await;
    loop {
        if let ConnectionEvent::Disconnected { .. } = within("the loss", events.recv()).await.unwrap() {
            break;
        }
    }
    assert!(matches!(tcp.publish_unacked(chunk(9, "lost")).await, Err(PublishError::Disconnected)));
}
