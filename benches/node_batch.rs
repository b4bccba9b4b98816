//! The routing core taking a link's publishes one frame at a time (`Node::handle`) against a
//! whole read at once (`Node::handle_batch`, which matches up to 64 chunks per batched lookup):
//! 1,000 publishes from one client into a relay holding 10,000 subscriptions (the messenger's
//! filter lengths) spread over 100 subscriber links, each publish under at least one of them.
//!
//! `CANOPY_BENCH_SUBSCRIPTIONS=1000000` sets another number of subscriptions.
//!
//! Only the handling is timed; the flush that releases the acks and the draining of the
//! subscribers' queues happen between iterations. Before criterion's two benches, the two
//! ways alternate for a few rounds on two identical relays, so that a drift of the machine
//! affects both alike, and the medians are printed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use canopy::node::{LinkId, Node, NodeConfig};
use canopy::store::stored_size;
use canopy::wire::{Frame, PROTOCOL_VERSION, RelayId, ReplayMode, Role};
use canopy::{Chunk, MemoryStore, Name};
use canopy_benches::workload::{LengthMix, Traffic, lookups, subscriptions};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// How many subscriptions the relay holds: 10,000 unless `CANOPY_BENCH_SUBSCRIPTIONS` says.
fn subscription_count() -> usize {
    std::env::var("CANOPY_BENCH_SUBSCRIPTIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000)
}

const SUBSCRIBER_LINKS: u64 = 100;
const PUBLISHES: usize = 1_000;
/// Names published, cycled through: the store holds at most a tenth of them, so a name comes
/// round again only once it has been evicted, and every publish is stored and delivered.
const NAMES: usize = 1 << 20;
const PUBLISHER: LinkId = 1;

/// One of the two relays: a node and the names it publishes next.
struct Relay {
    node: Node<MemoryStore>,
    names: Vec<Name>,
    next: usize,
    seq: u64,
    batched: bool,
}

impl Relay {
    fn new(names: Vec<Name>, batched: bool) -> Relay {
        let sample = Chunk::new(Name::new(0), 0, vec![0u8; 8]).expect("small");
        let store = MemoryStore::new(stored_size(&sample) * (NAMES as u64 / 10));
        let mut node = Node::new(NodeConfig::new(RelayId(1)), store, false);
        let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
        let links = std::iter::once(PUBLISHER).chain((0..SUBSCRIBER_LINKS).map(|i| 100 + i));
        for link in links {
            node.accept(link);
            node.handle(link, hello.clone(), 0);
        }
        // The messenger's filter lengths, none of them the publisher's own link.
        for (filter, i) in subscriptions(subscription_count(), LengthMix::Messenger, 1) {
            let link = 100 + u64::from(i) % SUBSCRIBER_LINKS;
            let frame = Frame::Subscribe { id: u64::from(i), filter, mode: ReplayMode::LiveOnly, credit: u32::MAX };
            node.handle(link, frame, 0);
        }
        let mut relay = Relay { node, names, next: 0, seq: 0, batched };
        relay.settle();
        relay
    }

    /// The next 1,000 publishes; each expires after the one before, so the store evicts the
    /// oldest once full.
    fn publishes(&mut self) -> Vec<Frame> {
        (0..PUBLISHES)
            .map(|_| {
                self.seq += 1;
                let name = self.names[self.next];
                self.next = (self.next + 1) % self.names.len();
                let chunk = Chunk::new(name, (1 << 40) | self.seq, self.seq.to_le_bytes().to_vec()).expect("small");
                Frame::Publish { seq: self.seq, chunk }
            })
            .collect()
    }

    /// Handles one read of 1,000 publishes as the relay's driver would, timed; returns how
    /// long it took.
    fn handle(&mut self, frames: Vec<Frame>) -> Duration {
        let mut urgent = Vec::new();
        let start = Instant::now();
        if self.batched {
            let mut frames = VecDeque::from(frames);
            while !frames.is_empty() {
                self.node.handle_batch(PUBLISHER, &mut frames, 0);
                self.node.take_urgent(&mut urgent);
                for link in urgent.drain(..) {
                    std::hint::black_box(self.node.drain(link, usize::MAX, 0));
                }
            }
        } else {
            for frame in frames {
                self.node.handle(PUBLISHER, frame, 0);
                self.node.take_urgent(&mut urgent);
                for link in urgent.drain(..) {
                    std::hint::black_box(self.node.drain(link, usize::MAX, 0));
                }
            }
        }
        start.elapsed()
    }

    /// Releases the acks and empties every queue, untimed.
    fn settle(&mut self) {
        self.node.flush().expect("memory store");
        for link in self.node.ready_links() {
            std::hint::black_box(self.node.drain(link, usize::MAX, 0));
        }
    }

    /// One timed read, then the untimed rest of the driver's turn.
    fn round(&mut self) -> Duration {
        let frames = self.publishes();
        let took = self.handle(frames);
        self.settle();
        took
    }
}

/// Names under the subscriptions' filters (all but exact-name ones, whose names would repeat),
/// low bits random: every publish is delivered to at least one subscriber.
fn names() -> Vec<Name> {
    let subs: Vec<_> = subscriptions(subscription_count(), LengthMix::Messenger, 1)
        .into_iter()
        .filter(|(f, _)| f.prefix_len() < 128)
        .collect();
    lookups(&subs, Traffic::Hit, NAMES, 2)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn node_batch(c: &mut Criterion) {
    let names = names();
    let mut one = Relay::new(names.clone(), false);
    let mut batch = Relay::new(names, true);
    let deliveries = one.node.metrics().chunks_out;
    one.round();
    eprintln!(
        "{} subscriptions on {SUBSCRIBER_LINKS} links: {:.2} deliveries per publish",
        subscription_count(),
        (one.node.metrics().chunks_out - deliveries) as f64 / PUBLISHES as f64
    );
    batch.round();

    // Alternating rounds: handle, handle_batch, handle, ...
    let (mut t_one, mut t_batch) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        t_one.push(one.round());
        t_batch.push(batch.round());
    }
    let (m_one, m_batch) = (median(t_one), median(t_batch));
    eprintln!(
        "alternating, median of 15 reads of {PUBLISHES} publishes: handle {:.0} ns/publish, handle_batch {:.0} ns/publish ({:.2}×)",
        m_one.as_nanos() as f64 / PUBLISHES as f64,
        m_batch.as_nanos() as f64 / PUBLISHES as f64,
        m_one.as_secs_f64() / m_batch.as_secs_f64()
    );

    let mut g = c.benchmark_group(format!("node/{PUBLISHES}-publishes/{}-subscriptions", subscription_count()));
    g.throughput(Throughput::Elements(PUBLISHES as u64));
    for relay in [&mut one, &mut batch] {
        let label = if relay.batched { "handle_batch" } else { "handle" };
        g.bench_function(label, |b| b.iter_custom(|iters| (0..iters).map(|_| relay.round()).sum()));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = node_batch
}
criterion_main!(benches);
