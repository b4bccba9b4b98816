//! The routing core's forwarding contract, run deterministically: several relays in one
//! process over simulated links, with a controllable clock.

use std::collections::{HashMap, HashSet};

use canopy::access::{Access, Grant};
use canopy::node::{Event, LinkId, Node, NodeConfig, ParentRefusal};
use canopy::wire::{ErrorCode, Frame, PROTOCOL_VERSION, RelayId, ReplayMode, Role};
use canopy::{Chunk, Filter, MemoryStore, Name, Store};

const T0: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum End {
    Node(usize, LinkId),
    Client(usize),
}

struct Client {
    node: usize,
    link: LinkId,
    inbox: Vec<Frame>,
    next_seq: u64,
    /// A stalled client reads nothing: its frames pile up in the relay's queue.
    stalled: bool,
}

/// Relays and clients wired together. Frames move only inside [`Net::settle`].
struct Net {
    nodes: Vec<Node<MemoryStore>>,
    clients: Vec<Client>,
    wires: HashMap<End, End>,
    now: u64,
    next_link: LinkId,
    /// The most frames ever queued on one link, per (node, link).
    peak_queue: HashMap<(usize, LinkId), usize>,
    /// Links a relay closed, with the reason.
    closed: Vec<(usize, ErrorCode)>,
}

impl Net {
    fn new() -> Self {
        Net {
            nodes: Vec::new(),
            clients: Vec::new(),
            wires: HashMap::new(),
            now: T0,
            next_link: 1,
            peak_queue: HashMap::new(),
            closed: Vec::new(),
        }
    }

    fn relay(&mut self, config: NodeConfig, has_parent: bool) -> usize {
        self.nodes.push(Node::new(config, MemoryStore::new(u64::MAX), has_parent));
        self.nodes.len() - 1
    }

    fn link_id(&mut self) -> LinkId {
        self.next_link += 1;
        self.next_link
    }

    /// Connects `child` to `parent`.
    fn connect(&mut self, child: usize, parent: usize) {
        let (c, p) = (self.link_id(), self.link_id());
        self.wires.insert(End::Node(child, c), End::Node(parent, p));
        self.wires.insert(End::Node(parent, p), End::Node(child, c));
        self.nodes[parent].accept(p);
        self.nodes[child].connect_parent(c);
        self.settle();
    }

    /// Breaks every link of `node` (the relay stops; its store survives).
    fn isolate(&mut self, node: usize) {
        let ends: Vec<End> =
            self.wires.keys().copied().filter(|e| matches!(e, End::Node(n, _) if *n == node)).collect();
        for end in ends {
            self.cut(end);
        }
    }

    fn cut(&mut self, end: End) {
        let Some(peer) = self.wires.remove(&end) else { return };
        self.wires.remove(&peer);
        for e in [end, peer] {
            match e {
                End::Node(n, l) => self.nodes[n].link_closed(l),
                End::Client(_) => {}
            }
        }
    }

    fn client(&mut self, node: usize, token: Option<&str>) -> usize {
        let link = self.link_id();
        let id = self.clients.len();
        self.clients.push(Client { node, link, inbox: Vec::new(), next_seq: 0, stalled: false });
        self.wires.insert(End::Client(id), End::Node(node, link));
        self.wires.insert(End::Node(node, link), End::Client(id));
        self.nodes[node].accept(link);
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Client,
            relay_path: vec![],
            token: token.map(str::to_owned),
        };
        self.send(id, hello);
        id
    }

    fn send(&mut self, client: usize, frame: Frame) {
        let (node, link) = (self.clients[client].node, self.clients[client].link);
        if self.wires.contains_key(&End::Client(client)) {
            self.nodes[node].handle(link, frame, self.now);
        }
        self.settle();
    }

    /// Subscribes with unlimited credit: these tests pace deliveries with `stalled` (the
    /// link is not drained) rather than with credit.
    fn subscribe(&mut self, client: usize, id: u64, filter: Filter, mode: ReplayMode) {
        self.send(client, Frame::Subscribe { id, filter, mode, credit: u32::MAX });
    }

    fn publish(&mut self, client: usize, chunk: Chunk) -> u64 {
        self.clients[client].next_seq += 1;
        let seq = self.clients[client].next_seq;
        self.send(client, Frame::Publish { seq, chunk });
        seq
    }

    /// Moves frames until no relay has anything left to send (to a reader).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for n in 0..self.nodes.len() {
                self.nodes[n].flush().expect("memory store syncs");
                while let Some(Event::Close { link, code }) = self.nodes[n].poll_event() {
                    // Deliver what was queued (ending with the error), then cut.
                    self.closed.push((n, code));
                    let frames = self.nodes[n].drain(link, usize::MAX, self.now);
                    match self.wires.get(&End::Node(n, link)).copied() {
                        Some(End::Client(c)) => self.clients[c].inbox.extend(frames),
                        Some(End::Node(m, l)) => {
                            for frame in frames {
                                self.nodes[m].handle(l, frame, self.now);
                            }
                        }
                        None => {}
                    }
                    self.cut(End::Node(n, link));
                }
                for link in self.nodes[n].ready_links() {
                    let Some(peer) = self.wires.get(&End::Node(n, link)).copied() else { continue };
                    if let End::Client(c) = peer
                        && self.clients[c].stalled
                    {
                        continue;
                    }
                    let frames = self.nodes[n].drain(link, usize::MAX, self.now);
                    moved |= !frames.is_empty();
                    for frame in frames {
                        match peer {
                            End::Node(m, l) => self.nodes[m].handle(l, frame, self.now),
                            End::Client(c) => self.clients[c].inbox.push(frame),
                        }
                    }
                }
            }
            // Record queue depths of stalled readers.
            for (c, client) in self.clients.iter().enumerate() {
                if client.stalled && self.wires.contains_key(&End::Client(c)) {
                    let depth = self.nodes[client.node].queued(client.link);
                    let peak = self.peak_queue.entry((client.node, client.link)).or_default();
                    *peak = (*peak).max(depth);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("network did not settle");
    }

    /// Chunks delivered to `client` (in arrival order) for subscription `id`.
    fn delivered(&self, client: usize, id: u64) -> Vec<Chunk> {
        self.clients[client]
            .inbox
            .iter()
            .filter_map(|f| match f {
                Frame::Deliver { id: i, chunk } if *i == id => Some(chunk.clone()),
                _ => None,
            })
            .collect()
    }

    fn errors(&self, client: usize) -> Vec<(ErrorCode, Option<u64>, String)> {
        self.clients[client]
            .inbox
            .iter()
            .filter_map(|f| match f {
                Frame::Error { code, about, message } => Some((*code, *about, message.clone())),
                _ => None,
            })
            .collect()
    }

    fn acks(&self, client: usize) -> Vec<u64> {
        self.clients[client]
            .inbox
            .iter()
            .filter_map(|f| match f {
                Frame::Ack { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn stored(&self, node: usize, name: Name) -> Option<Chunk> {
        self.nodes[node].store().get(name).expect("memory store reads")
    }
}

fn filter(s: &str) -> Filter {
    s.parse().unwrap()
}

fn chunk(name: u128, data: &str) -> Chunk {
    Chunk::new(Name::new(name), T0 + HOUR, data.as_bytes().to_vec()).unwrap()
}

fn names(chunks: &[Chunk]) -> Vec<u128> {
    chunks.iter().map(|c| c.name().to_u128()).collect()
}

/// origin ← cloud ← local.
fn tree(net: &mut Net) -> (usize, usize, usize) {
    let origin = net.relay(NodeConfig::new(RelayId(1)), false);
    let cloud = net.relay(NodeConfig::new(RelayId(2)), true);
    let local = net.relay(NodeConfig::new(RelayId(3)), true);
    net.connect(cloud, origin);
    net.connect(local, cloud);
    (origin, cloud, local)
}

const TEAM: &str = "0x0a0b0000000000000000000000000000/16";
const OTHER: &str = "0x0c000000000000000000000000000000/8";
const IN_TEAM: u128 = 0x0a0b_0000_0000_0000_0000_0000_0000_0001;
const IN_OTHER: u128 = 0x0c00_0000_0000_0000_0000_0000_0000_0001;

#[test]
fn chunks_cross_the_tree_exactly_once_and_only_by_interest() {
    let mut net = Net::new();
    let (origin, cloud, local) = tree(&mut net);
    let a = net.client(local, None); // team
    let b = net.client(local, None); // other
    let c = net.client(cloud, None); // team
    let d = net.client(origin, None); // everything
    let p = net.client(local, None); // publisher, subscribed to everything
    let q = net.client(origin, None); // publisher at the origin
    net.subscribe(a, 1, filter(TEAM), ReplayMode::CachedAndLive);
    net.subscribe(b, 1, filter(OTHER), ReplayMode::CachedAndLive);
    net.subscribe(c, 1, filter(TEAM), ReplayMode::CachedAndLive);
    net.subscribe(d, 1, Filter::ALL, ReplayMode::CachedAndLive);
    net.subscribe(p, 1, filter(TEAM), ReplayMode::CachedAndLive);

    // Published at the local relay: every covering subscriber once, never the publisher.
    let x = chunk(IN_TEAM, "x");
    let seq = net.publish(p, x.clone());
    assert_eq!(net.acks(p), [seq]);
    assert_eq!(net.delivered(a, 1), std::slice::from_ref(&x));
    assert_eq!(net.delivered(c, 1), std::slice::from_ref(&x));
    assert_eq!(net.delivered(d, 1), std::slice::from_ref(&x));
    assert!(net.delivered(b, 1).is_empty());
    assert!(net.delivered(p, 1).is_empty(), "echoed to its publisher");
    // Up always: every ancestor caches it.
    for relay in [local, cloud, origin] {
        assert_eq!(net.stored(relay, x.name()), Some(x.clone()));
    }

    // Published at the origin: reaches local subscribers only where their filters cover it.
    let y = chunk(IN_TEAM + 1, "y");
    let z = chunk(0x0d00 << 112, "z"); // nobody below the origin wants this
    net.publish(q, y.clone());
    net.publish(q, z.clone());
    assert_eq!(net.delivered(a, 1), [x.clone(), y.clone()]);
    assert!(net.delivered(b, 1).is_empty());
    assert_eq!(net.delivered(p, 1), std::slice::from_ref(&y));
    assert_eq!(net.delivered(d, 1), [x, y.clone(), z.clone()]);
    // Down by interest: the local relay never even sees z.
    assert_eq!(net.stored(local, y.name()), Some(y));
    assert_eq!(net.stored(local, z.name()), None);
    assert_eq!(net.stored(cloud, z.name()), None);
}

#[test]
fn late_subscriber_gets_cache_in_name_order_then_replay_done_then_live() {
    let mut net = Net::new();
    let (_, _, local) = tree(&mut net);
    let p = net.client(local, None);
    for n in [5u128, 1, 4, 2, 3] {
        net.publish(p, chunk(IN_TEAM + n, "cached"));
    }
    let s = net.client(local, None);
    net.subscribe(s, 7, filter(TEAM), ReplayMode::CachedAndLive);
    net.publish(p, chunk(IN_TEAM + 10, "live"));
    let frames: Vec<String> = net.clients[s]
        .inbox
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver { chunk, .. } => Some(format!("{:x}", chunk.name().to_u128() - IN_TEAM)),
            Frame::ReplayDone { id: 7 } => Some("done".to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(frames, ["1", "2", "3", "4", "5", "done", "a"]);
}

#[test]
fn replay_modes_live_only_cached_only_and_most_recent() {
    let mut net = Net::new();
    let (_, _, local) = tree(&mut net);
    let p = net.client(local, None);
    for n in 1..=5u128 {
        net.publish(p, chunk(IN_TEAM + n, "c"));
    }
    let live = net.client(local, None);
    let query = net.client(local, None);
    let recent = net.client(local, None);
    net.subscribe(live, 1, filter(TEAM), ReplayMode::LiveOnly);
    net.subscribe(query, 1, filter(TEAM), ReplayMode::CachedOnly);
    net.subscribe(recent, 1, filter(TEAM), ReplayMode::MostRecent(2));
    net.publish(p, chunk(IN_TEAM + 9, "new"));
    assert_eq!(names(&net.delivered(live, 1)), [IN_TEAM + 9]);
    // Live-only subscriptions are confirmed at once with ReplayDone, before any chunk.
    assert!(matches!(
        net.clients[live].inbox.iter().find(|f| matches!(f, Frame::ReplayDone { .. } | Frame::Deliver { .. })),
        Some(Frame::ReplayDone { id: 1 })
    ));
    // A cached-only query ends at ReplayDone and gets no live chunks.
    assert_eq!(names(&net.delivered(query, 1)), (1..=5).map(|n| IN_TEAM + n).collect::<Vec<_>>());
    assert!(matches!(net.clients[query].inbox.last(), Some(Frame::ReplayDone { id: 1 })));
    assert_eq!(names(&net.delivered(recent, 1)), [IN_TEAM + 4, IN_TEAM + 5, IN_TEAM + 9]);
}

#[test]
fn replay_is_paced_by_the_queue_bound() {
    let mut net = Net::new();
    let mut config = NodeConfig::new(RelayId(9));
    config.max_queue = 8;
    let relay = net.relay(config, false);
    let p = net.client(relay, None);
    for n in 0..500u128 {
        net.publish(p, chunk(IN_TEAM + n, "c"));
    }
    let s = net.client(relay, None);
    net.clients[s].stalled = true;
    net.subscribe(s, 1, filter(TEAM), ReplayMode::CachedAndLive);
    assert!(net.peak_queue[&(relay, net.clients[s].link)] <= 8, "replay overfilled the queue");
    net.clients[s].stalled = false;
    net.settle();
    let got = names(&net.delivered(s, 1));
    assert_eq!(got, (0..500).map(|n| IN_TEAM + n).collect::<Vec<_>>());
    assert!(net.errors(s).is_empty());
}

#[test]
fn a_paced_replay_skips_chunks_that_expire_while_it_runs() {
    let mut net = Net::new();
    let mut config = NodeConfig::new(RelayId(9));
    config.max_queue = 4;
    let relay = net.relay(config, false);
    let p = net.client(relay, None);
    for n in 0..20u128 {
        // Odd names expire at T0 + 100, even ones in an hour.
        let expiry = if n % 2 == 1 { T0 + 100 } else { T0 + HOUR };
        net.publish(p, Chunk::new(Name::new(IN_TEAM + n), expiry, &b"c"[..]).unwrap());
    }
    let s = net.client(relay, None);
    net.clients[s].stalled = true;
    net.subscribe(s, 1, filter(TEAM), ReplayMode::CachedAndLive);
    // The first few went out while all were valid; the rest resume after expiry (not yet
    // evicted: the replay itself must skip them).
    net.now = T0 + 100;
    net.clients[s].stalled = false;
    net.settle();
    let got = names(&net.delivered(s, 1));
    let first = net.peak_queue[&(relay, net.clients[s].link)];
    for (i, n) in got.iter().enumerate() {
        let odd = (n - IN_TEAM) % 2 == 1;
        assert!(i < first || !odd, "expired chunk {n:x} replayed after expiry");
    }
    assert_eq!(got.iter().filter(|n| (**n - IN_TEAM).is_multiple_of(2)).count(), 10);
}

#[test]
fn same_chunk_twice_is_acked_twice_and_delivered_once_and_conflicts_keep_the_original() {
    let mut net = Net::new();
    let (origin, _, local) = tree(&mut net);
    let p = net.client(local, None);
    let s = net.client(local, None);
    let far = net.client(origin, None);
    net.subscribe(s, 1, Filter::ALL, ReplayMode::LiveOnly);
    net.subscribe(far, 1, Filter::ALL, ReplayMode::LiveOnly);
    let x = chunk(IN_TEAM, "original");
    let s1 = net.publish(p, x.clone());
    let s2 = net.publish(p, x.clone());
    assert_eq!(net.acks(p), [s1, s2]);
    assert_eq!(net.delivered(s, 1), std::slice::from_ref(&x));
    assert_eq!(net.delivered(far, 1), std::slice::from_ref(&x));

    let forged = chunk(IN_TEAM, "forged!");
    let s3 = net.publish(p, forged);
    let errors = net.errors(p);
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].0, errors[0].1), (ErrorCode::Conflict, Some(s3)));
    assert!(errors[0].2.contains(&x.name().to_string()), "{}", errors[0].2);
    assert_eq!(net.stored(local, x.name()), Some(x.clone()));
    assert_eq!(net.stored(origin, x.name()), Some(x.clone()));
    assert_eq!(net.delivered(s, 1), [x]);
}

#[test]
fn expired_chunks_are_refused_never_delivered_and_evicted() {
    let mut net = Net::new();
    let (_, _, local) = tree(&mut net);
    let p = net.client(local, None);
    let stale = Chunk::new(Name::new(IN_TEAM), T0, &b"old"[..]).unwrap();
    let seq = net.publish(p, stale.clone());
    assert_eq!(net.errors(p)[0].0, ErrorCode::Expired);
    assert_eq!(net.errors(p)[0].1, Some(seq));
    assert_eq!(net.stored(local, stale.name()), None);

    let brief = Chunk::new(Name::new(IN_TEAM + 1), T0 + 10, &b"brief"[..]).unwrap();
    net.publish(p, brief.clone());
    assert!(net.stored(local, brief.name()).is_some());
    net.now = T0 + 10;
    let late = net.client(local, None);
    net.subscribe(late, 1, Filter::ALL, ReplayMode::CachedAndLive);
    assert!(net.delivered(late, 1).is_empty(), "expired chunk delivered");
    net.nodes[local].tick(net.now).unwrap();
    assert_eq!(net.stored(local, brief.name()), None);
    assert!(net.delivered(late, 1).is_empty());
    assert!(net.nodes[local].store().stats().evicted_expired >= 1);
}

#[test]
fn partition_heals_to_the_union_exactly_once_everywhere() {
    let mut net = Net::new();
    let (origin, cloud, local) = tree(&mut net);
    let l1 = net.client(local, None);
    let l2 = net.client(local, None);
    let o1 = net.client(origin, None);
    for (c, id) in [(l1, 1), (l2, 1), (o1, 1)] {
        net.subscribe(c, id, Filter::ALL, ReplayMode::CachedAndLive);
    }
    net.publish(l1, chunk(IN_TEAM, "before"));

    // The cloud relay stops.
    net.isolate(cloud);
    // Local clients keep exchanging chunks; origin clients publish too.
    net.publish(l1, chunk(IN_TEAM + 1, "local-during"));
    net.publish(l2, chunk(IN_TEAM + 2, "local-during"));
    net.publish(o1, chunk(IN_OTHER, "origin-during"));
    assert_eq!(names(&net.delivered(l2, 1)), [IN_TEAM, IN_TEAM + 1]);
    assert_eq!(names(&net.delivered(l1, 1)), [IN_TEAM + 2]);
    assert_eq!(net.nodes[local].store().stats().outbox, 2);

    // The cloud relay comes back.
    net.connect(cloud, origin);
    net.connect(local, cloud);

    let all: HashSet<u128> = [IN_TEAM, IN_TEAM + 1, IN_TEAM + 2, IN_OTHER].into();
    for (c, own) in [(l1, vec![IN_TEAM, IN_TEAM + 1]), (l2, vec![IN_TEAM + 2]), (o1, vec![IN_OTHER])] {
        let got = names(&net.delivered(c, 1));
        let unique: HashSet<u128> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len(), "client {c} got duplicates: {got:x?}");
        let want: HashSet<u128> = all.iter().copied().filter(|n| !own.contains(n)).collect();
        assert_eq!(unique, want, "client {c}");
    }
    for relay in [local, cloud, origin] {
        for n in &all {
            assert!(net.stored(relay, Name::new(*n)).is_some(), "relay {relay} lacks {n:x}");
        }
    }
    assert_eq!(net.nodes[local].store().stats().outbox, 0);
    assert_eq!(net.nodes[cloud].store().stats().outbox, 0);
}

#[test]
fn upstream_subscriptions_are_aggregated() {
    let mut net = Net::new();
    let (_, cloud, local) = tree(&mut net);
    let a = net.client(local, None);
    let b = net.client(local, None);
    let wide = filter("0x0a0b0c0d0e0000000000000000000000/80");
    let narrow = filter("0x0a0b0c0d0e0000000000000100000000/96");
    net.subscribe(a, 1, narrow, ReplayMode::CachedAndLive);
    assert_eq!(net.nodes[local].upstream_filters(), [narrow]);
    net.subscribe(b, 1, wide, ReplayMode::CachedAndLive);
    assert_eq!(net.nodes[local].upstream_filters(), [wide]);
    // The cloud holds one subscription from the local relay.
    assert_eq!(net.nodes[cloud].upstream_filters(), [wide]);
    net.send(b, Frame::Unsubscribe { id: 1 });
    assert_eq!(net.nodes[local].upstream_filters(), [narrow]);
    assert_eq!(net.nodes[cloud].upstream_filters(), [narrow]);
    net.send(a, Frame::Unsubscribe { id: 1 });
    assert!(net.nodes[local].upstream_filters().is_empty());
    assert!(net.nodes[cloud].upstream_filters().is_empty());
}

#[test]
fn access_rules_refuse_with_errors_naming_the_filter() {
    let mut net = Net::new();
    let team = filter(TEAM);
    let mut config = NodeConfig::new(RelayId(5));
    config.access = Access::with_rules([("alice".to_owned(), Grant { publish: vec![team], subscribe: vec![team] })]);
    let relay = net.relay(config, false);
    let alice = net.client(relay, Some("alice"));
    let seq = net.publish(alice, chunk(IN_OTHER, "nope"));
    net.subscribe(alice, 3, filter(OTHER), ReplayMode::CachedAndLive);
    let errors = net.errors(alice);
    assert_eq!(errors[0].0, ErrorCode::PublishDenied);
    assert_eq!(errors[0].1, Some(seq));
    assert!(errors[0].2.contains(&Name::new(IN_OTHER).to_string()));
    assert_eq!(errors[1].0, ErrorCode::SubscribeDenied);
    assert!(errors[1].2.contains(&filter(OTHER).to_string()));
    // What is granted still works on the same connection.
    net.subscribe(alice, 4, team, ReplayMode::LiveOnly);
    let other = net.client(relay, Some("alice"));
    net.publish(other, chunk(IN_TEAM, "ok"));
    assert_eq!(names(&net.delivered(alice, 4)), [IN_TEAM]);
    // Unknown tokens are turned away at hello.
    let mallory = net.client(relay, Some("mallory"));
    assert_eq!(net.errors(mallory)[0].0, ErrorCode::Unauthenticated);
    assert!(!net.wires.contains_key(&End::Client(mallory)));
}

#[test]
fn slow_consumer_is_told_and_recovers_from_the_cache() {
    let mut net = Net::new();
    let mut config = NodeConfig::new(RelayId(9));
    config.max_queue = 8;
    config.max_backlog = 8;
    let relay = net.relay(config, false);
    let p = net.client(relay, None);
    let slow = net.client(relay, None);
    let fast = net.client(relay, None);
    net.subscribe(slow, 1, Filter::ALL, ReplayMode::LiveOnly);
    net.subscribe(fast, 1, Filter::ALL, ReplayMode::LiveOnly);
    net.clients[slow].stalled = true;
    for n in 0..50u128 {
        net.publish(p, chunk(IN_TEAM + n, "burst"));
    }
    // Memory stays bounded: the stalled link never holds more than the bound plus the error.
    assert!(net.peak_queue[&(relay, net.clients[slow].link)] <= 9);
    assert_eq!(net.delivered(fast, 1).len(), 50);
    net.clients[slow].stalled = false;
    net.settle();
    let errors = net.errors(slow);
    assert_eq!((errors[0].0, errors[0].1), (ErrorCode::SlowConsumer, Some(1)));
    assert_eq!(net.nodes[relay].metrics().slow_consumers, 1);
    // Resubscribing recovers everything from the cache.
    net.clients[slow].inbox.clear();
    net.subscribe(slow, 2, Filter::ALL, ReplayMode::CachedAndLive);
    assert_eq!(names(&net.delivered(slow, 2)), (0..50).map(|n| IN_TEAM + n).collect::<Vec<_>>());
}

#[test]
fn a_cycle_in_the_tree_is_refused_from_either_side() {
    let mut net = Net::new();
    let a = net.relay(NodeConfig::new(RelayId(10)), true);
    let b = net.relay(NodeConfig::new(RelayId(11)), true);
    net.connect(b, a);
    assert_eq!(net.nodes[b].path(), [RelayId(11), RelayId(10)]);
    // Misconfigured: a's parent is b, which is already below a.
    net.connect(a, b);
    assert!(net.closed.contains(&(b, ErrorCode::Cycle)), "{:?}", net.closed);
    assert!(net.closed.contains(&(a, ErrorCode::Cycle)), "{:?}", net.closed);
    // The original link still works.
    let pa = net.client(a, None);
    let sb = net.client(b, None);
    net.subscribe(sb, 1, Filter::ALL, ReplayMode::LiveOnly);
    net.publish(pa, chunk(IN_TEAM, "still fine"));
    assert_eq!(names(&net.delivered(sb, 1)), [IN_TEAM]);
}

#[test]
fn parent_refusals_are_counted_and_handed_to_the_driver_once() {
    let mut child = Node::new(NodeConfig::new(RelayId(2)), MemoryStore::new(u64::MAX), true);
    let parent_hello = |version| Frame::Hello { version, role: Role::Relay, relay_path: vec![RelayId(1)], token: None };
    // The parent refuses our hello.
    child.connect_parent(7);
    let message = "token refused".to_owned();
    child.handle(7, Frame::Error { code: ErrorCode::Unauthenticated, about: None, message: message.clone() }, T0);
    assert_eq!(child.poll_event(), Some(Event::Close { link: 7, code: ErrorCode::Unauthenticated }));
    child.link_closed(7);
    let m = child.metrics();
    assert_eq!((m.parent_refusals, m.last_parent_refusal), (1, Some(ErrorCode::Unauthenticated)));
    assert_eq!(child.take_parent_refusal(8), None, "another link's");
    let want = ParentRefusal { code: ErrorCode::Unauthenticated, message, by_parent: true };
    assert_eq!(child.take_parent_refusal(7), Some(want));
    assert_eq!(child.take_parent_refusal(7), None, "handed out once");
    // We refuse the parent's hello (another protocol version).
    child.connect_parent(8);
    child.handle(8, parent_hello(PROTOCOL_VERSION + 1), T0);
    child.link_closed(8);
    let refusal = child.take_parent_refusal(8).expect("refused");
    assert_eq!((refusal.code, refusal.by_parent), (ErrorCode::UnsupportedVersion, false));
    assert_eq!(child.metrics().parent_refusals, 2);
    // An accepted session is no refusal.
    child.connect_parent(9);
    child.handle(9, parent_hello(PROTOCOL_VERSION), T0);
    child.link_closed(9);
    assert_eq!(child.take_parent_refusal(9), None);
    assert_eq!(child.metrics().parent_refusals, 2);
}

#[test]
fn bad_hellos_are_refused() {
    let mut net = Net::new();
    let relay = net.relay(NodeConfig::new(RelayId(1)), false);
    // A frame before hello.
    let link = net.link_id();
    let id = net.clients.len();
    net.clients.push(Client { node: relay, link, inbox: Vec::new(), next_seq: 0, stalled: false });
    net.wires.insert(End::Client(id), End::Node(relay, link));
    net.wires.insert(End::Node(relay, link), End::Client(id));
    net.nodes[relay].accept(link);
    net.send(id, Frame::Unsubscribe { id: 1 });
    assert_eq!(net.errors(id)[0].0, ErrorCode::Malformed);
    assert!(!net.wires.contains_key(&End::Client(id)));

    // An unknown protocol version.
    let old = net.clients.len();
    let link = net.link_id();
    net.clients.push(Client { node: relay, link, inbox: Vec::new(), next_seq: 0, stalled: false });
    net.wires.insert(End::Client(old), End::Node(relay, link));
    net.wires.insert(End::Node(relay, link), End::Client(old));
    net.nodes[relay].accept(link);
    net.send(old, Frame::Hello { version: 9, role: Role::Client, relay_path: vec![], token: None });
    assert_eq!(net.errors(old)[0].0, ErrorCode::UnsupportedVersion);

    // Other connections are still served.
    let fine = net.client(relay, None);
    net.publish(fine, chunk(IN_TEAM, "ok"));
    assert_eq!(net.acks(fine), [1]);
}

#[test]
fn a_queue_filling_past_half_its_bound_is_flagged_urgent_once() {
    let mut config = NodeConfig::new(RelayId(1));
    config.max_queue = 8;
    let mut node = Node::new(config, MemoryStore::new(u64::MAX), false);
    let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
    for link in [1, 2] {
        node.accept(link);
        node.handle(link, hello.clone(), T0);
        node.drain(link, usize::MAX, T0);
    }
    node.handle(1, Frame::Subscribe { id: 1, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 100 }, T0);
    node.drain(1, usize::MAX, T0);
    let mut urgent = Vec::new();
    for n in 0..6u64 {
        node.handle(2, Frame::Publish { seq: n, chunk: chunk(IN_TEAM + u128::from(n), "x") }, T0);
        node.take_urgent(&mut urgent);
        // Crossing half of 8 happens on the fourth delivery, and only then.
        assert_eq!(urgent, if n >= 3 { vec![1] } else { vec![] }, "after publish {n}");
    }
    assert_eq!(node.queued(1), 6);
    assert_eq!(node.metrics().slow_consumers, 0);
}

/// A subscription without credit holds back only itself: publishes on the same link are
/// acknowledged and its other subscription keeps receiving; granting credit releases what
/// waited, in order; a stall past the backlog bound ends it, and resubscribing recovers.
#[test]
fn a_stalled_subscription_holds_back_only_itself() {
    let mut net = Net::new();
    let mut config = NodeConfig::new(RelayId(9));
    config.max_queue = 8;
    config.max_backlog = 20;
    let relay = net.relay(config, false);
    let p = net.client(relay, None);
    let c = net.client(relay, None);
    net.send(c, Frame::Subscribe { id: 1, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 0 });
    net.subscribe(c, 2, Filter::ALL, ReplayMode::LiveOnly);
    let mut seqs = Vec::new();
    for n in 0..15u128 {
        net.publish(p, chunk(IN_TEAM + n, "x"));
        // The stalled client publishes too, on the same link.
        seqs.push(net.publish(c, chunk(IN_OTHER + n, "y")));
    }
    assert_eq!(net.acks(c), seqs, "acks keep flowing past the stalled subscription");
    assert_eq!(net.delivered(c, 2).len(), 15, "the other subscription keeps receiving");
    assert!(net.delivered(c, 1).is_empty());
    let usage = net.nodes[relay].link_usage(net.clients[c].link).unwrap();
    assert_eq!(usage.backlog, 15);
    // Credit releases the backlog in arrival order, then live chunks flow directly.
    net.send(c, Frame::Credit { id: 1, credit: 100 });
    let want: Vec<u128> = (0..15).map(|n| IN_TEAM + n).collect();
    assert_eq!(names(&net.delivered(c, 1)), want);
    // Stalled past the bound: ended, and only that subscription.
    net.clients[c].inbox.clear();
    net.send(c, Frame::Subscribe { id: 3, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 0 });
    for n in 15..40u128 {
        net.publish(p, chunk(IN_TEAM + n, "x"));
    }
    let errors = net.errors(c);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].0, errors[0].1), (ErrorCode::SlowConsumer, Some(3)));
    assert_eq!(net.delivered(c, 2).len(), 25);
    assert!(net.nodes[relay].link_usage(net.clients[c].link).unwrap().max_backlog <= 20);
    // Resubscribing recovers everything from the cache, paced by credit.
    net.clients[c].inbox.clear();
    net.send(c, Frame::Subscribe { id: 4, filter: filter(TEAM), mode: ReplayMode::CachedOnly, credit: 10 });
    assert_eq!(net.delivered(c, 4).len(), 10);
    net.send(c, Frame::Credit { id: 4, credit: 1000 });
    assert_eq!(names(&net.delivered(c, 4)), (0..40).map(|n| IN_TEAM + n).collect::<Vec<_>>());
    assert!(matches!(net.clients[c].inbox.last(), Some(Frame::ReplayDone { id: 4 })));
}

/// A replay far larger than every bound arrives whole and in order when the reader grants
/// credit as it reads, and nothing it holds ever exceeds its window.
#[test]
fn a_replay_larger_than_every_bound_arrives_whole_with_credit() {
    let mut net = Net::new();
    let mut config = NodeConfig::new(RelayId(9));
    config.max_queue = 16;
    config.max_backlog = 16;
    let relay = net.relay(config, false);
    let p = net.client(relay, None);
    for n in 0..5_000u128 {
        net.publish(p, chunk(IN_TEAM + n, "c"));
    }
    let s = net.client(relay, None);
    let window = 100u32;
    net.send(s, Frame::Subscribe { id: 1, filter: filter(TEAM), mode: ReplayMode::CachedAndLive, credit: window });
    let mut got = Vec::new();
    let mut done = false;
    while !done {
        let frames = std::mem::take(&mut net.clients[s].inbox);
        assert!(!frames.is_empty(), "the replay stalled after {} chunks", got.len());
        let mut read = 0u32;
        for frame in frames {
            match frame {
                Frame::Deliver { chunk, .. } => {
                    got.push(chunk.name().to_u128());
                    read += 1;
                }
                Frame::ReplayDone { .. } => done = true,
                Frame::Hello { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(read <= window, "more deliveries than credit");
        if read > 0 {
            net.send(s, Frame::Credit { id: 1, credit: read });
        }
    }
    assert_eq!(got, (0..5_000).map(|n| IN_TEAM + n).collect::<Vec<_>>());
}

/// A conflicting chunk refused by the parent leaves the outbox, and the outbox keeps
/// draining behind it, even with a window of one.
#[test]
fn the_outbox_drains_past_a_conflict() {
    let mut net = Net::new();
    let origin = net.relay(NodeConfig::new(RelayId(1)), false);
    let mut config = NodeConfig::new(RelayId(2));
    config.outbox_window = 1;
    let leaf = net.relay(config, true);
    let at_origin = net.client(origin, None);
    net.publish(at_origin, chunk(IN_TEAM, "origin's value"));
    net.isolate(leaf);
    let at_leaf = net.client(leaf, None);
    net.publish(at_leaf, chunk(IN_TEAM, "leaf's value"));
    for n in 1..5u128 {
        net.publish(at_leaf, chunk(IN_TEAM + n, "more"));
    }
    net.connect(leaf, origin);
    for n in 1..5u128 {
        assert!(net.stored(origin, Name::new(IN_TEAM + n)).is_some(), "{n} did not reach the origin");
    }
    assert_eq!(net.stored(origin, Name::new(IN_TEAM)).unwrap().data().as_ref(), b"origin's value");
    assert_eq!(net.nodes[leaf].metrics().upstream_rejected, 1);
    assert_eq!(net.nodes[leaf].store().stats().outbox, 0);
}

/// Outbox entries whose chunk expired (and was evicted) while the parent was away are
/// dropped without stalling the ones behind them. (Found by the simulator, seed 187.)
#[test]
fn the_outbox_drains_past_expired_entries() {
    let mut net = Net::new();
    let origin = net.relay(NodeConfig::new(RelayId(1)), false);
    let mut config = NodeConfig::new(RelayId(2));
    config.outbox_window = 1;
    let leaf = net.relay(config, true);
    let at_leaf = net.client(leaf, None);
    for n in 0..3u128 {
        net.publish(at_leaf, Chunk::new(Name::new(IN_TEAM + n), T0 + 100, &b"short"[..]).unwrap());
    }
    net.publish(at_leaf, chunk(IN_TEAM + 3, "long"));
    net.now = T0 + 200;
    net.nodes[leaf].tick(net.now).unwrap();
    net.connect(leaf, origin);
    assert!(net.stored(origin, Name::new(IN_TEAM + 3)).is_some(), "the outbox stalled behind expired entries");
    assert_eq!(net.nodes[leaf].store().stats().outbox, 0);
}

/// A publish of a chunk a relay already holds is forwarded up all the same: the copy may
/// have come down from the parent, which delivers before it syncs and may have lost it in a
/// crash since. (Found by the simulator, seed 18825: an acknowledged chunk never reached the
/// origin.)
#[test]
fn a_duplicate_publish_is_forwarded_up() {
    let mut net = Net::new();
    let (origin, cloud, local) = tree(&mut net);
    let watcher = net.client(local, None);
    net.subscribe(watcher, 1, filter(TEAM), ReplayMode::LiveOnly);
    let at_origin = net.client(origin, None);
    net.publish(at_origin, chunk(IN_TEAM, "x"));
    assert!(net.stored(local, Name::new(IN_TEAM)).is_some(), "delivered down to local");
    let before = net.nodes[origin].metrics().duplicates;
    let at_local = net.client(local, None);
    let seq = net.publish(at_local, chunk(IN_TEAM, "x"));
    assert!(net.acks(at_local).contains(&seq));
    assert_eq!(net.nodes[origin].metrics().duplicates, before + 1, "the duplicate went all the way up");
    assert_eq!(net.nodes[cloud].store().stats().outbox, 0);
    assert_eq!(net.nodes[local].store().stats().outbox, 0);
}
