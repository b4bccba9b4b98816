//! The routing core of a relay: a sans-IO state machine.
//!
//! [`Node`] owns a [`Store`] and a [`SubscriptionTable`], and nothing else: no sockets, tasks
//! or clocks. Its driver (the `canopy-relay` server, or a test) feeds it link events and
//! decoded frames with the current time ([`Node::handle`] one at a time, or
//! [`Node::handle_batch`] for what was read from a link at once), and takes frames to send
//! from per-link queues ([`Node::ready_links`], [`Node::drain`]). The
//! same code therefore runs over QUIC in production and deterministically, many relays in one
//! process, in tests — the way quinn-proto sits under quinn.
//!
//! Data flows one way: a frame arrives on a link → the chunk is stored (insert-if-absent) →
//! matched against the subscriptions → queued to every covering subscriber except on the
//! arrival link, and forwarded to the parent through the durable outbox.
//!
//! # The forwarding contract
//!
//! - **Up always**: a chunk newly stored from a client or a child is sent to the parent, via the
//!   store's durable outbox, until the parent acknowledges it.
//! - **Down by interest**: a chunk is queued only to subscriptions whose filter covers it. The
//!   node subscribes upstream with the union of its downstream filters, dropping filters
//!   covered by a broader one.
//! - **Never back** to the link it came from.
//! - **Dedup by name**: an identical chunk already stored is acknowledged and goes no further;
//!   different bytes at a stored name are a `Conflict`.
//!
//! # Flow control
//!
//! Two bounds, one per link and one per subscription, keep memory bounded without ever
//! ending a subscription whose reader keeps up:
//!
//! - **Credit per subscription.** A subscriber grants credit in `Subscribe` and in `Credit`
//!   frames as it consumes; each `Deliver` spends one. A subscription without credit sends
//!   nothing, so a stalled subscription holds back only itself: acks, errors and the other
//!   subscriptions on the link keep flowing.
//! - **A bounded link queue.** Deliveries enter a link's queue only while it holds fewer than
//!   `max_queue` frames; the driver drains it as the transport takes bytes. Control frames
//!   (acks, errors, `ReplayDone`) always enter, and the driver stops reading a link whose
//!   queue is full ([`Node::accepts_input`]), so they stay bounded too.
//!
//! Chunks that cannot be sent yet wait in the subscription's **backlog**. Replays of cached
//! chunks wait in the store instead, paced by a cursor, so a replay of any size costs no
//! memory. A live chunk that finds the backlog at `max_backlog` ends that subscription with
//! `SlowConsumer`; the subscriber resubscribes and recovers what it missed from the cache.
//!
//! # Durability
//!
//! Acks for publishes are held until [`Node::flush`] has made the store durable. A driver
//! calls it once per batch of received frames, so one fsync covers many publishes; or, to
//! keep the fsync off its own thread (group commit), it calls [`Node::begin_sync`], runs the
//! store's [`Syncer`](crate::store::Syncer) elsewhere and reports back with
//! [`Node::sync_done`]. With [`NodeConfig::ack_before_sync`] the acks leave once the write is
//! handed to the OS ([`Node::release_written`]) and the driver syncs on a timer. Either way a
//! chunk published here reaches a child relay only once it is synced, so no child can hold a
//! chunk this relay loses in a crash.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;

use crate::access::{Access, Grant};
use crate::store::{InsertOutcome, Store, StoreError};
use crate::wire::{ErrorCode, Frame, PROTOCOL_VERSION, RelayId, ReplayMode, Role};
use crate::{Chunk, Filter, Name, SubscriptionTable};

/// A connection, as numbered by the driver. Ids are never reused while the node runs, and
/// [`NO_LINK`] is never one.
pub type LinkId = u64;

/// No link: where a chunk another front-end stored comes from ([`Node::stored_elsewhere`]).
pub const NO_LINK: LinkId = LinkId::MAX;

/// Settings of a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This relay's id, carried in hellos so a cycle in the tree is refused.
    pub id: RelayId,
    /// Token presented to the parent.
    pub parent_token: Option<String>,
    /// Who may publish and subscribe to what.
    pub access: Access,
    /// Bound on each link's outgoing queue, in frames: deliveries wait in their
    /// subscription's backlog while the queue is this full, and the driver stops reading the
    /// link ([`Node::accepts_input`]).
    pub max_queue: usize,
    /// Live chunks one subscription may have waiting (for credit or queue room) before it is
    /// ended with `SlowConsumer`.
    pub max_backlog: usize,
    /// Credit this node grants its parent for each upstream subscription, renewed as it
    /// stores what arrives.
    pub upstream_credit: u32,
    /// Upstream publishes in flight at once while the outbox drains.
    pub outbox_window: usize,
    /// Largest `MostRecent(n)` served; larger requests are capped to it.
    pub max_most_recent: u32,
    /// Acknowledge a publish once the store has written it, before it is synced
    /// ([`Node::release_written`]; the driver syncs on a timer instead, JetStream's default).
    /// Off by default: the ack waits for the sync that covers the publish. Either way, a chunk published here reaches a
    /// child relay only once it is synced (see [`Node::begin_sync`]).
    pub ack_before_sync: bool,
    /// Hand chunk inserts and replay scans to the driver as [`StoreRequest`]s
    /// ([`Node::take_store_requests`]) instead of calling the store, and finish each when the
    /// driver reports its result ([`Node::store_done`]): for a remote store (Redis Cluster),
    /// whose driver runs the requests of a turn as one pipeline rather than a round trip per
    /// chunk. The node's own store then keeps only the upstream outbox. Off by default: a
    /// local store (memory, fjall) answers at once, and the node calls it directly.
    pub store_requests: bool,
    /// With `store_requests`: how many requests may be unfinished before the node stops
    /// taking input from downstream links ([`Node::accepts_input`]).
    pub max_store_requests: usize,
    /// For a front-end of an origin made of several (over a shared store): the origin's
    /// identity, shared by all its front-ends. Hellos name it after this relay's own id, so
    /// every relay below sees the same origin at the end of its path through whichever
    /// front-end, and a relay presenting the origin's id (or this front-end's) is refused as
    /// a cycle.
    pub origin: Option<RelayId>,
}

impl NodeConfig {
    /// Defaults for a relay with id `id`: open access, 1024-frame queues.
    pub fn new(id: RelayId) -> Self {
        NodeConfig {
            id,
            parent_token: None,
            access: Access::allow_all(),
            max_queue: 1024,
            max_backlog: 4096,
            upstream_credit: 4096,
            outbox_window: 256,
            max_most_recent: 10_000,
            ack_before_sync: false,
            store_requests: false,
            max_store_requests: 4096,
            origin: None,
        }
    }
}

/// Counters a relay exposes (as Prometheus metrics in `canopy-relay`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Chunks received on any link (publishes and deliveries from the parent).
    pub chunks_in: u64,
    /// Chunk deliveries queued to subscribers.
    pub chunks_out: u64,
    /// Chunks newly stored.
    pub stored: u64,
    /// Chunks received that were already stored (identical).
    pub duplicates: u64,
    /// Chunks refused because different data was stored at their name.
    pub conflicts: u64,
    /// Publishes or subscriptions refused by access rules.
    pub denied: u64,
    /// Subscriptions ended because their backlog overflowed (the subscriber stopped granting
    /// credit, or its link stopped draining).
    pub slow_consumers: u64,
    /// Upstream subscriptions the parent ended (slow consumer) and this node renewed.
    pub upstream_resubscribed: u64,
    /// Upstream publishes the parent refused (dropped from the outbox, counted here).
    pub upstream_rejected: u64,
    /// Times a parent session ended before it began: the parent refused our hello
    /// (`Unauthenticated`, `Cycle`, `UnsupportedVersion`, ...), or we refused the parent's.
    pub parent_refusals: u64,
    /// The code of the latest of those refusals.
    pub last_parent_refusal: Option<ErrorCode>,
    /// Chunks another front-end stored in the shared store, heard from its live feed
    /// ([`Node::stored_elsewhere`]).
    pub shared_in: u64,
    /// Live subscriptions ended because the shared store's live feed had a gap
    /// ([`Node::live_gap`]).
    pub live_gaps: u64,
}

/// A sync the driver runs: see [`Node::begin_sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SyncTicket(u64);

/// A store operation handed to the driver: see [`NodeConfig::store_requests`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    /// What to hand back to [`Node::store_done`] with the result.
    pub ticket: StoreTicket,
    /// What to do.
    pub op: StoreOp,
}

/// Names a [`StoreRequest`] until it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreTicket(u64);

/// A store operation the node asks its driver to run (see [`NodeConfig::store_requests`]),
/// with the meaning of the [`Store`] method of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// [`Store::insert`]: answered with [`StoreReply::Insert`].
    Insert(Chunk),
    /// Up to `limit` chunks named `first..=last` that are unexpired at `now`, in name order
    /// ([`Store::scan_range`]): answered with [`StoreReply::Chunks`]. Fewer than `limit` means
    /// the range holds no more.
    Scan {
        /// The first name of the range.
        first: Name,
        /// The last name of the range.
        last: Name,
        /// The most chunks to return (at least 1).
        limit: usize,
        /// The time expiry is judged at (unix ms).
        now: u64,
    },
    /// The `n` greatest-named chunks under `filter` unexpired at `now`, in ascending name
    /// order ([`Store::scan_last`]): answered with [`StoreReply::Chunks`].
    ScanLast {
        /// The range.
        filter: Filter,
        /// How many.
        n: usize,
        /// The time expiry is judged at (unix ms).
        now: u64,
    },
}

impl StoreOp {
    /// Runs the operation on `store`, for a driver whose store is local (the simulator, a
    /// test): what a remote store's driver does over the network instead.
    pub fn run(&self, store: &mut dyn Store) -> StoreReply {
        match self {
            StoreOp::Insert(chunk) => StoreReply::Insert(store.insert(chunk)),
            StoreOp::Scan { first, last, limit, now } => {
                let mut chunks = Vec::new();
                let result = store.scan_range(*first, *last, *now, &mut |chunk| {
                    chunks.push(chunk);
                    if chunks.len() >= *limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                });
                StoreReply::Chunks(result.map(|()| chunks))
            }
            StoreOp::ScanLast { filter, n, now } => StoreReply::Chunks(store.scan_last(*filter, *n, *now)),
        }
    }
}

/// The result of a [`StoreOp`], handed to [`Node::store_done`].
#[derive(Debug)]
pub enum StoreReply {
    /// What [`StoreOp::Insert`] did.
    Insert(Result<InsertOutcome, StoreError>),
    /// What [`StoreOp::Scan`] or [`StoreOp::ScanLast`] found.
    Chunks(Result<Vec<Chunk>, StoreError>),
}

/// What the node does once a store request is done.
enum Pending {
    /// Finish a publish from a downstream link: ack (unless `acked` is false: a
    /// [`Frame::PublishUnacked`]), conflict or error; forward and deliver.
    Publish { link: LinkId, seq: u64, chunk: Chunk, acked: bool },
    /// Finish a chunk the parent delivered on upstream subscription `id`: deliver it, and
    /// hand back the credit it spent.
    FromParent { link: LinkId, id: u64, chunk: Chunk },
    /// Continue the replay of subscription `id` of `link` with what the store found (a scan
    /// asked for `limit` chunks).
    Replay { link: LinkId, id: u64, limit: usize },
}

/// The store requests of a node ([`NodeConfig::store_requests`]).
#[derive(Default)]
struct Requests {
    /// Made and not taken by the driver yet.
    queue: Vec<StoreRequest>,
    /// Not done yet, by ticket, with what to do once they are.
    pending: HashMap<u64, Pending>,
    /// The last ticket handed out.
    last: u64,
}

impl Requests {
    /// Records a store request for the driver, with what to do once it is done; returns its
    /// ticket.
    fn push(&mut self, op: StoreOp, then: Pending) -> u64 {
        self.last += 1;
        self.pending.insert(self.last, then);
        self.queue.push(StoreRequest { ticket: StoreTicket(self.last), op });
        self.last
    }
}

/// What a sync in flight releases once it is done.
#[derive(Debug)]
struct PendingSync {
    ticket: u64,
    /// The publishes it acknowledges.
    acks: Vec<(LinkId, u64)>,
    /// For each child relay, how many of its frames (counted like `Link::drained`) it makes
    /// safe to send.
    marks: Vec<(LinkId, u64)>,
}

/// Why a parent session ended before it began; see [`Node::take_parent_refusal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRefusal {
    /// The refusal's code: the parent's `Error` code, or ours when we refused the parent.
    pub code: ErrorCode,
    /// The parent's message, or ours.
    pub message: String,
    /// Whether the parent refused us (`true`) or we refused the parent's hello (`false`).
    pub by_parent: bool,
}

/// Something the driver must act on besides sending queued frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Close the link once its queued frames (ending with an `Error`) are sent.
    Close {
        /// The link to close.
        link: LinkId,
        /// Why.
        code: ErrorCode,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Downstream, hello not yet received.
    Pending,
    /// A client or a child relay.
    Downstream,
    /// Our parent, hello not yet received.
    ParentPending,
    /// Our parent, hello exchanged.
    Parent,
}

/// A downstream subscription. Kept small, since a relay holds one per subscription of every
/// client (`sub-memory` in `benches/` counts it): what only a subscription with work in hand
/// needs (a replay, a backlog) is boxed apart, and most subscriptions, idle between live
/// chunks, have none.
struct Sub {
    /// The filter's name as two words: a `u128` field would align the whole map entry to 16
    /// bytes and make it half as large again.
    name: [u64; 2],
    /// The filter's prefix length.
    len: u8,
    /// Whether it stays for live chunks after the replay (not for `CachedOnly`).
    live: bool,
    /// Deliveries the subscriber has room for (grants add up, saturating: a subscriber with
    /// four billion deliveries of room has no limit in practice).
    credit: u32,
    /// Its replay and backlog, while it has either (or a `ReplayDone` still to send).
    work: Option<Box<Work>>,
}

/// What a subscription has to send besides live chunks as they arrive.
#[derive(Default)]
struct Work {
    /// Cached chunks still to send, if the replay is not done.
    replay: Option<Replay>,
    /// Live chunks waiting to be sent, oldest first: during the replay, those at names it has
    /// already passed; afterwards, those waiting for credit or queue room.
    backlog: VecDeque<Chunk>,
    /// Once the replay has finished: how many backlog chunks (held during the replay) go
    /// before `ReplayDone`.
    done_after: Option<usize>,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.replay.is_none() && self.backlog.is_empty() && self.done_after.is_none()
    }
}

impl Sub {
    fn new(filter: Filter, live: bool, credit: u32, work: Option<Box<Work>>) -> Sub {
        let name = filter.name().to_u128();
        Sub { name: [(name >> 64) as u64, name as u64], len: filter.prefix_len(), live, credit, work }
    }

    fn filter(&self) -> Filter {
        let name = (u128::from(self.name[0]) << 64) | u128::from(self.name[1]);
        Filter::new(Name::new(name), self.len).expect("kept from a valid filter")
    }

    /// Whether it has anything to send besides live chunks arriving.
    fn busy(&self) -> bool {
        self.work.is_some()
    }

    fn replay(&self) -> Option<&Replay> {
        self.work.as_ref().and_then(|w| w.replay.as_ref())
    }

    fn backlog_len(&self) -> usize {
        self.work.as_ref().map_or(0, |w| w.backlog.len())
    }
}

enum Replay {
    /// Cached chunks read from the store in name order, a page at a time.
    From {
        /// Where the next page starts (inclusive); `None` once the range is read to its end.
        next: Option<Name>,
        /// Chunks read and not sent yet (a page that came back larger than the room left, or
        /// the one chunk read ahead without room to see whether the range is exhausted).
        fetched: VecDeque<Chunk>,
        /// The request for the next page, while the driver runs it
        /// ([`NodeConfig::store_requests`]).
        reading: Option<u64>,
    },
    /// A fixed list (for `MostRecent`).
    List(VecDeque<Chunk>),
    /// The list for `MostRecent`, while the driver reads it ([`NodeConfig::store_requests`]).
    Listing(u64),
}

impl Replay {
    fn from(first: Name) -> Replay {
        Replay::From { next: Some(first), fetched: VecDeque::new(), reading: None }
    }
}

struct Link {
    peer: Peer,
    grant: Grant,
    queue: Queue,
    subs: HashMap<u64, Sub>,
    /// Subscriptions with a replay, a backlog or a `ReplayDone` still to send.
    busy: BTreeSet<u64>,
    /// Where the next pump starts in `busy`, so every busy subscription gets its turn.
    rotor: u64,
    /// The peer said it is a relay (a child): it gets chunks published here only once they
    /// are synced (see [`Node::begin_sync`]).
    child_relay: bool,
    /// Frames drained from `queue` so far.
    drained: u64,
    /// For a child relay: frames (counted like `drained`) that the last completed sync made
    /// safe to send while publishes are unsynced.
    released: u64,
}

/// A link's frames to send, oldest first. Frames enter only through [`Queue::enqueue`];
/// reading, draining or withdrawing one goes through the `VecDeque`.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    /// Whether the link is on the node's list of links with frames waiting (`Node::dirty`):
    /// set when a frame is queued, cleared when [`Node::drain`] leaves the queue empty.
    listed: bool,
}

impl Queue {
    /// Queues `frame` to send on link `id`. The first frame queued since the link was last
    /// drained empty also puts it on `dirty`, the node's list of links with frames waiting,
    /// which [`Node::ready_links`] reads instead of scanning every link.
    #[inline]
    fn enqueue(&mut self, id: LinkId, dirty: &mut Vec<LinkId>, frame: Frame) {
        if !self.listed {
            self.listed = true;
            dirty.push(id);
        }
        self.frames.push_back(frame);
    }
}

impl std::ops::Deref for Queue {
    type Target = VecDeque<Frame>;

    fn deref(&self) -> &VecDeque<Frame> {
        &self.frames
    }
}

impl std::ops::DerefMut for Queue {
    fn deref_mut(&mut self) -> &mut VecDeque<Frame> {
        &mut self.frames
    }
}

impl Link {
    fn new(peer: Peer) -> Self {
        Link {
            peer,
            grant: Grant::default(),
            queue: Queue::default(),
            subs: HashMap::new(),
            busy: BTreeSet::new(),
            rotor: 0,
            child_relay: false,
            drained: 0,
            released: 0,
        }
    }
}

/// How full one link's buffers are, from [`Node::link_usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkUsage {
    /// Frames in the link's queue.
    pub queued: usize,
    /// `Deliver` frames among them (at most `max_queue`).
    pub deliveries: usize,
    /// The longest subscription backlog on the link (at most `max_backlog`).
    pub max_backlog: usize,
    /// Chunks in all the link's backlogs.
    pub backlog: usize,
}

/// The upstream side: our parent link and what we asked of it.
#[derive(Default)]
struct Upstream {
    link: Option<LinkId>,
    /// Path from our parent to the origin, from the parent's hello.
    path: Vec<RelayId>,
    /// Downstream filters that need live chunks from above, with how many subscriptions
    /// use each.
    wanted: BTreeMap<Filter, usize>,
    /// The minimal cover of `wanted` (no filter covered by another) → upstream subscription id.
    subscribed: BTreeMap<Filter, u64>,
    /// Upstream subscription id → (its filter, deliveries received since credit was last
    /// granted).
    by_id: HashMap<u64, (Filter, u32)>,
    /// Numbers upstream publishes and subscriptions alike, so an `Error` from the parent
    /// about a number names exactly one of them.
    next_seq: u64,
    /// Publishes sent and not yet acknowledged: seq → name.
    inflight: HashMap<u64, Name>,
    inflight_names: HashSet<Name>,
    /// The refusal that ended the parent session on this link, until the driver takes it.
    refused: Option<(LinkId, ParentRefusal)>,
    /// The highest number of a `Publish` or `Subscribe` the driver has taken from a parent
    /// link's queue. Numbers are queued in increasing order, so one above this is still in
    /// the queue: the parent has not seen it, cannot answer it, and can be spared it.
    sent: u64,
}

/// The routing core of one relay. See the [module docs](self).
pub struct Node<S> {
    config: NodeConfig,
    store: S,
    table: SubscriptionTable<(LinkId, u64)>,
    links: HashMap<LinkId, Link>,
    up: Upstream,
    /// Publishes accepted since the last sync began, acknowledged once the store is durable.
    unacked: Vec<(LinkId, u64)>,
    /// A publish was newly stored since the last sync began.
    unsynced: bool,
    /// Syncs begun and not yet done, oldest first.
    syncing: VecDeque<PendingSync>,
    /// The number of the next sync.
    next_sync: u64,
    /// The links of child relays (few), so a sync marks them without a scan of every link.
    child_relays: Vec<LinkId>,
    events: VecDeque<Event>,
    metrics: Metrics,
    has_parent: bool,
    /// The latest time the driver gave us.
    now: u64,
    /// Links whose queue crossed half its bound since [`Node::take_urgent`] was last called.
    urgent: Vec<LinkId>,
    /// The subscriptions a chunk is delivered to, kept between chunks (see `deliver`).
    targets: Vec<(LinkId, u64)>,
    /// Buffers [`Node::handle_batch`] matches a run of chunks with, kept between runs.
    run: RunBuffers,
    /// Links that may have frames queued: every link with a non-empty queue is here (see
    /// [`Queue::enqueue`]). Entries of links since drained empty or closed linger, and a link
    /// drained empty then queued to again is here twice, until the list is compacted (see
    /// [`Node::unlist`]).
    dirty: Vec<LinkId>,
    /// Entries of `dirty` known to be stale (their link drained empty or closed): once they
    /// are half the list, it is compacted.
    dirty_stale: usize,
    /// Store requests ([`NodeConfig::store_requests`]).
    requests: Requests,
    /// With store requests: the filters of live subscriptions, with how many use each, whose
    /// chunks stored by others the driver must hear of (see [`Node::take_interest`]).
    shared: BTreeMap<Filter, usize>,
    /// Changes to `shared`'s filters not yet taken by the driver.
    interest: Vec<(Filter, bool)>,
}

/// The most frames [`Node::handle_batch`] matches against the subscriptions at once. A run
/// stops early after a frame that made a link urgent, and the lookups done for the frames
/// after it are done again next time; a few batches of [`BATCH_LANES`] bound that waste
/// while keeping the lookups' memory loads overlapping.
///
/// [`BATCH_LANES`]: crate::matcher::BATCH_LANES
const MATCH_RUN: usize = 4 * crate::matcher::BATCH_LANES;

/// The buffers a run of chunks is matched with, reused from run to run so that matching
/// allocates nothing per chunk.
#[derive(Default)]
struct RunBuffers {
    /// The names of the run's chunks.
    names: Vec<Name>,
    /// The matches as `for_each_match_batch` reports them: (index in the run, link, id).
    hits: Vec<(u32, LinkId, u64)>,
    /// The matches grouped by index, each group in the order the matcher reported it.
    targets: Vec<(LinkId, u64)>,
    /// `ends[i]` is where the group of index `i` ends in `targets` (and the next one starts).
    ends: Vec<usize>,
}

impl RunBuffers {
    /// The subscriptions (not on `except`) that the chunk at index `i` of the run matched.
    fn targets(&self, i: usize) -> &[(LinkId, u64)] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.targets[start..self.ends[i]]
    }
}

impl<S: Store> Node<S> {
    /// A node with no links. `has_parent` says whether this relay is configured with a
    /// parent (the origin has none): only then is the outbox kept.
    pub fn new(config: NodeConfig, store: S, has_parent: bool) -> Self {
        // A front-end's path to the origin is the origin itself (it has no parent).
        let up = Upstream { path: config.origin.filter(|_| !has_parent).into_iter().collect(), ..Upstream::default() };
        Node {
            config,
            store,
            table: SubscriptionTable::new(),
            links: HashMap::new(),
            up,
            unacked: Vec::new(),
            unsynced: false,
            syncing: VecDeque::new(),
            next_sync: 1,
            child_relays: Vec::new(),
            events: VecDeque::new(),
            metrics: Metrics::default(),
            has_parent,
            now: 0,
            urgent: Vec::new(),
            targets: Vec::new(),
            run: RunBuffers::default(),
            dirty: Vec::new(),
            dirty_stale: 0,
            requests: Requests::default(),
            shared: BTreeMap::new(),
            interest: Vec::new(),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Metrics {
        self.metrics
    }

    /// The store, for inspection.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Stops the node and hands back its store, as it is (a driver simulating a crash
    /// discards what was not synced, then starts a new node on it).
    pub fn into_store(self) -> S {
        self.store
    }

    /// The store, for a driver that runs [`StoreRequest`]s on it itself (see
    /// [`StoreOp::run`]).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Moves into `out` the store requests made since the last call, oldest first
    /// ([`NodeConfig::store_requests`]; without it there are none). The driver runs them, in
    /// batches as it likes, and reports each result with [`store_done`](Self::store_done).
    ///
    /// Results may come back in any order, with one rule: two requests whose names overlap
    /// (an insert and a scan covering its name, say) must be reported in the order the store
    /// ran them, since what the scan found decides whether the node still sends the inserted
    /// chunk live. A driver that reports each pipeline's replies in order, as Redis answers
    /// them, keeps it.
    pub fn take_store_requests(&mut self, out: &mut Vec<StoreRequest>) {
        out.append(&mut self.requests.queue);
    }

    /// Store requests made and not reported done yet.
    pub fn store_requests_pending(&self) -> usize {
        self.requests.pending.len()
    }

    /// The store request `ticket` is done, with `reply`: the node finishes what waited on it
    /// (a publish's ack or refusal and its deliveries, a chunk from the parent, a page of a
    /// replay) at time `now`. A ticket not pending (reported twice) is ignored.
    pub fn store_done(&mut self, ticket: StoreTicket, reply: StoreReply, now: u64) {
        self.now = self.now.max(now);
        let Some(pending) = self.requests.pending.remove(&ticket.0) else { return };
        match (pending, reply) {
            (Pending::Publish { link, seq, chunk, acked }, StoreReply::Insert(outcome)) => {
                self.publish_stored(link, seq, &chunk, outcome, None, acked)
            }
            (Pending::FromParent { link, id, chunk }, StoreReply::Insert(outcome)) => {
                self.spend_upstream_credit(link, id);
                self.parent_chunk_stored(link, &chunk, outcome, None)
            }
            (Pending::Replay { link, id, limit }, StoreReply::Chunks(found)) => {
                self.replay_read(link, id, ticket.0, limit, found)
            }
            // A driver answering an insert with chunks (or the reverse) is a bug in the driver;
            // what waited on the request would wait for ever, so it fails loudly in tests.
            (_, reply) => debug_assert!(false, "store reply {reply:?} does not answer its request"),
        }
    }

    /// Moves into `out` the changes, since the last call, to the filters whose new chunks this
    /// node needs to hear of when others store them in a shared store
    /// ([`NodeConfig::store_requests`]): `(filter, true)` when a live subscription first
    /// needs `filter`, `(filter, false)` when the last one using it ends. The driver subscribes
    /// the store's live feed accordingly, and must have subscribed before it runs the store
    /// requests taken in the same turn (a replay's read), so that no chunk falls between the
    /// read and the feed.
    pub fn take_interest(&mut self, out: &mut Vec<(Filter, bool)>) {
        out.append(&mut self.interest);
    }

    /// Another front-end of a shared store stored `chunk` (the driver heard it on the store's
    /// live feed): it goes to this node's covering live subscriptions, as a chunk stored here
    /// would. A replay reading the store meanwhile settles it against what it reads (see
    /// [`take_store_requests`](Self::take_store_requests)), so each subscriber gets it once,
    /// provided the driver hands over every chunk the feed delivered before the reply to a
    /// read ahead of that reply.
    pub fn stored_elsewhere(&mut self, chunk: &Chunk, now: u64) {
        self.now = self.now.max(now);
        if chunk.is_expired(now) {
            return;
        }
        self.metrics.shared_in += 1;
        self.deliver(chunk, NO_LINK, None);
    }

    /// The shared store's live feed had a gap (a connection to it was lost): chunks stored
    /// meanwhile may not have been heard. Every live subscription ends with `SlowConsumer`,
    /// the error a subscriber already recovers from: it subscribes again, and its replay
    /// brings back what it missed. Subscriptions still replaying (`CachedOnly` ones) read the
    /// store and are not affected.
    pub fn live_gap(&mut self) {
        let mut ended: Vec<(LinkId, u64)> = self
            .links
            .iter()
            .flat_map(|(&link, l)| l.subs.iter().filter(|(_, sub)| sub.live).map(move |(&id, _)| (link, id)))
            .collect();
        ended.sort_unstable();
        for (link, id) in ended {
            let ended = self.end_slow(link, id, |id, sub| {
                format!(
                    "subscription {id} to {} was ended: the origin's shared store lost its live feed for a moment; resubscribe to recover from the cache",
                    sub.filter()
                )
            });
            if ended {
                self.metrics.live_gaps += 1;
            }
        }
    }

    /// This node's settings.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Live subscriptions of downstream links.
    pub fn subscriptions(&self) -> usize {
        self.table.len()
    }

    /// Links currently known.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Filters this node holds subscribed upstream (the minimal cover of its downstream
    /// filters).
    pub fn upstream_filters(&self) -> Vec<Filter> {
        self.up.subscribed.keys().copied().collect()
    }

    /// Our path to the origin: this relay, then the parent's path.
    pub fn path(&self) -> Vec<RelayId> {
        std::iter::once(self.config.id).chain(self.up.path.iter().copied()).collect()
    }

    /// A downstream connection arrived on `link`; its first frame must be a hello.
    pub fn accept(&mut self, link: LinkId) {
        self.links.insert(link, Link::new(Peer::Pending));
    }

    /// The driver connected to the parent on `link`; the node greets it. Once the parent
    /// answers, upstream subscriptions are renewed and the outbox drains.
    pub fn connect_parent(&mut self, link: LinkId) {
        let mut l = Link::new(Peer::ParentPending);
        l.grant = Grant::all();
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Relay,
            relay_path: self.path(),
            token: self.config.parent_token.clone(),
        };
        l.queue.enqueue(link, &mut self.dirty, hello);
        self.links.insert(link, l);
        self.up.link = Some(link);
    }

    /// The link is gone (closed by either side, or lost). Its subscriptions end; if it was
    /// the parent, chunks keep collecting in the outbox until the next [`connect_parent`].
    ///
    /// [`connect_parent`]: Self::connect_parent
    pub fn link_closed(&mut self, link: LinkId) {
        let Some(l) = self.links.remove(&link) else { return };
        if l.child_relay {
            self.child_relays.retain(|other| *other != link);
        }
        if l.queue.listed {
            self.unlist();
        }
        if self.up.link == Some(link) {
            self.up.link = None;
            self.up.inflight.clear();
            self.up.inflight_names.clear();
            self.up.subscribed.clear();
            self.up.by_id.clear();
        }
        // In id order, so the upstream frames this causes are the same on every run (the
        // simulator replays a seed exactly).
        let mut subs: Vec<(u64, Sub)> = l.subs.into_iter().collect();
        subs.sort_unstable_by_key(|(id, _)| *id);
        for (id, sub) in subs {
            self.drop_sub(link, id, &sub);
        }
    }

    /// Up to `max` frames queued for `link`, oldest first, at time `now`. Draining resumes
    /// paced replays, so call this until it returns nothing or the link cannot take more.
    pub fn drain(&mut self, link: LinkId, max: usize, now: u64) -> Vec<Frame> {
        self.now = self.now.max(now);
        let holding = self.unsynced || !self.syncing.is_empty();
        let Some(l) = self.links.get_mut(&link) else { return Vec::new() };
        let mut n = max.min(l.queue.len());
        if l.child_relay && holding {
            // Publishes are not all synced: the child gets what the last sync covered.
            n = n.min(usize::try_from(l.released.saturating_sub(l.drained)).unwrap_or(usize::MAX));
        }
        l.drained += n as u64;
        let frames: Vec<Frame> = l.queue.drain(..n).collect();
        if self.up.link == Some(link) {
            for frame in &frames {
                if let Frame::Publish { seq: n, .. } | Frame::Subscribe { id: n, .. } = frame {
                    self.up.sent = self.up.sent.max(*n);
                }
            }
        }
        self.pump(link);
        // Drained empty (the pump queued nothing more): off the list of links with frames.
        if let Some(l) = self.links.get_mut(&link)
            && l.queue.listed
            && l.queue.is_empty()
        {
            l.queue.listed = false;
            self.unlist();
        }
        frames
    }

    /// Counts one more stale entry in `dirty` (a link drained empty or closed), and compacts
    /// the list once they are half of it: what stays is each listed link once, in id order.
    /// A link drained empty and queued to again is on the list twice until then.
    fn unlist(&mut self) {
        self.dirty_stale += 1;
        if self.dirty_stale * 2 < self.dirty.len() {
            return;
        }
        let links = &self.links;
        self.dirty.retain(|id| links.get(id).is_some_and(|l| l.queue.listed));
        self.dirty.sort_unstable();
        self.dirty.dedup();
        self.dirty_stale = 0;
    }

    /// Frames queued for `link`.
    pub fn queued(&self, link: LinkId) -> usize {
        self.links.get(&link).map_or(0, |l| l.queue.len())
    }

    /// Whether the driver may hand the node more frames read from `link`: not while a
    /// downstream link's queue is full, which means its peer is not reading what it is sent.
    /// Pausing the reader then pushes back on the peer (through the transport's flow control)
    /// and bounds the acks and errors the node queues for it. The parent is always read: what
    /// this node sends it is bounded by the outbox window and credit (one `Credit` per
    /// upstream subscription at most, merged while queued), a `Subscribe` still queued is
    /// withdrawn rather than followed by its `Unsubscribe`, and answers about numbers not yet
    /// sent are ignored; pausing both ends of a relay link could stall them on each other.
    pub fn accepts_input(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| {
            matches!(l.peer, Peer::Parent | Peer::ParentPending)
                || (l.queue.len() < self.config.max_queue && self.requests.pending.len() < self.config.max_store_requests)
        })
    }

    /// How full `link`'s queue and backlogs are (for metrics and for checking the bounds).
    pub fn link_usage(&self, link: LinkId) -> Option<LinkUsage> {
        let l = self.links.get(&link)?;
        let deliveries = l.queue.iter().filter(|f| matches!(f, Frame::Deliver { .. })).count();
        let backlogs = l.subs.values().map(Sub::backlog_len);
        Some(LinkUsage {
            queued: l.queue.len(),
            deliveries,
            max_backlog: backlogs.clone().max().unwrap_or(0),
            backlog: backlogs.sum(),
        })
    }

    /// The links of this node, in id order.
    pub fn link_ids(&self) -> Vec<LinkId> {
        let mut ids: Vec<LinkId> = self.links.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Moves into `out` the links whose queue has filled past half its bound since the last
    /// call. A driver that handles many frames per turn drains these right away, so a reader
    /// that keeps up is never mistaken for a slow one just because the driver had not yet
    /// reached the end of its turn.
    pub fn take_urgent(&mut self, out: &mut Vec<LinkId>) {
        out.append(&mut self.urgent);
    }

    /// Links that have frames queued, in id order.
    pub fn ready_links(&self) -> Vec<LinkId> {
        let mut ready = Vec::new();
        self.ready_links_into(&mut ready);
        ready
    }

    /// Sets `out` to the links that have frames queued, in id order, like
    /// [`ready_links`](Self::ready_links) but into a buffer the driver keeps. Either reads
    /// only the links queued to since they were last drained empty (see [`drain`]), not
    /// every link.
    ///
    /// [`drain`]: Self::drain
    pub fn ready_links_into(&self, out: &mut Vec<LinkId>) {
        out.clear();
        out.extend(self.dirty.iter().copied().filter(|id| self.links.get(id).is_some_and(|l| !l.queue.is_empty())));
        out.sort_unstable();
        out.dedup();
    }

    /// The refusal that ended the parent session on `link`, if it ended that way: the parent
    /// refused our hello, or we refused the parent's (a cycle, another protocol version).
    /// Each refusal is handed out once. A driver asks once the link is closed and backs off
    /// for longer than after a lost connection, since retrying soon would be refused again.
    pub fn take_parent_refusal(&mut self, link: LinkId) -> Option<ParentRefusal> {
        match self.up.refused.take() {
            Some((l, refusal)) if l == link => Some(refusal),
            other => {
                self.up.refused = other;
                None
            }
        }
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Makes everything accepted so far durable and releases what waits on it: the acks of
    /// publishes and, for child relays, the chunks published here. The same as
    /// [`Node::begin_sync`], the store's [`Store::sync`] and [`Node::sync_done`] in a row.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let Some(ticket) = self.begin_sync()? else { return Ok(()) };
        match self.store.sync() {
            Ok(()) => {
                self.sync_done(ticket);
                Ok(())
            }
            Err(err) => {
                self.sync_failed(ticket);
                Err(err)
            }
        }
    }

    /// With [`NodeConfig::ack_before_sync`]: hands what was written to the operating system
    /// ([`Store::prepare_sync`]), so a killed process loses nothing, and queues the acks of
    /// the publishes held so far; only a crash of the machine before the next sync can lose
    /// them. A driver calls it once per batch, before sending. Does nothing in the default
    /// mode, where acks wait for the sync.
    pub fn release_written(&mut self) -> Result<(), StoreError> {
        if !self.config.ack_before_sync || self.unacked.is_empty() {
            return Ok(());
        }
        self.store.prepare_sync()?;
        for (link, seq) in std::mem::take(&mut self.unacked) {
            if let Some(l) = self.links.get_mut(&link) {
                l.queue.enqueue(link, &mut self.dirty, Frame::Ack { seq });
            }
        }
        Ok(())
    }

    /// Whether anything waits for a sync: publishes to acknowledge, or publishes stored and
    /// not yet synced.
    pub fn needs_sync(&self) -> bool {
        self.unsynced || !self.unacked.is_empty()
    }

    /// Whether a child relay has frames held back until a sync: a driver that syncs on a
    /// timer ([`NodeConfig::ack_before_sync`]) syncs now instead, or the child would wait.
    pub fn child_waits_for_sync(&self) -> bool {
        (self.unsynced || !self.syncing.is_empty())
            && self.child_relays.iter().any(|link| self.links.get(link).is_some_and(|l| !l.queue.is_empty()))
    }

    /// Begins a sync of everything stored so far (group commit), for a driver that syncs on
    /// another thread: readies the store ([`Store::prepare_sync`]) and returns the ticket to
    /// hand to [`Node::sync_done`] once the store is synced (or [`Node::sync_failed`]).
    /// `None` when nothing waits for a sync. Syncs complete in the order they began.
    ///
    /// Until then the acks of the publishes it covers are held (unless
    /// [`NodeConfig::ack_before_sync`]), and so is every frame queued for a child relay
    /// since: a chunk published here goes to clients at once, but reaches a child relay only
    /// once it is durable here, so a crash can never leave a child holding a chunk this relay
    /// lost (and that another publisher might then take with different bytes). Chunks that
    /// came from our parent were synced there and are not held.
    pub fn begin_sync(&mut self) -> Result<Option<SyncTicket>, StoreError> {
        if !self.needs_sync() {
            return Ok(None);
        }
        self.store.prepare_sync()?;
        let ticket = self.next_sync;
        self.next_sync += 1;
        let marks = self
            .child_relays
            .iter()
            .filter_map(|link| self.links.get(link).map(|l| (*link, l.drained + l.queue.len() as u64)))
            .collect();
        self.syncing.push_back(PendingSync { ticket, acks: std::mem::take(&mut self.unacked), marks });
        self.unsynced = false;
        Ok(Some(SyncTicket(ticket)))
    }

    /// The sync `ticket` (and every one begun before it) is done: queues the acks it held
    /// and releases the frames it held for child relays.
    pub fn sync_done(&mut self, ticket: SyncTicket) {
        while self.syncing.front().is_some_and(|p| p.ticket <= ticket.0) {
            let done = self.syncing.pop_front().expect("checked");
            for (link, seq) in done.acks {
                if let Some(l) = self.links.get_mut(&link) {
                    l.queue.enqueue(link, &mut self.dirty, Frame::Ack { seq });
                }
            }
            for (link, mark) in done.marks {
                if let Some(l) = self.links.get_mut(&link) {
                    l.released = l.released.max(mark);
                }
            }
        }
    }

    /// The sync `ticket` failed: what it covered waits for the next one (its acks stay
    /// held, its child-relay frames too).
    pub fn sync_failed(&mut self, ticket: SyncTicket) {
        let mut acks = Vec::new();
        while self.syncing.back().is_some_and(|p| p.ticket >= ticket.0) {
            let failed = self.syncing.pop_back().expect("checked");
            acks.splice(0..0, failed.acks);
        }
        acks.append(&mut self.unacked);
        self.unacked = acks;
        self.unsynced = true;
    }

    /// Periodic work: evicts expired chunks (counted in the store's stats), and gives back
    /// the buffers of links that are idle now. A link's queue grows with a burst (a client's
    /// subscriptions all answering `ReplayDone` at once, a flood of deliveries) and would keep
    /// that buffer for good; found empty on a tick, it gives it back. Doing it here, not whenever a
    /// queue empties, spares a busy link a reallocation per burst.
    pub fn tick(&mut self, now: u64) -> Result<(), StoreError> {
        self.now = self.now.max(now);
        for l in self.links.values_mut() {
            if l.queue.is_empty() && l.queue.capacity() > 0 {
                l.queue.shrink_to_fit();
            }
            // A link that dropped most of its subscriptions.
            if l.subs.capacity() > 4 * l.subs.len().max(8) {
                l.subs.shrink_to_fit();
            }
        }
        self.store.evict_expired(now)?;
        Ok(())
    }

    /// Handles one frame received on `link` at time `now` (unix ms).
    pub fn handle(&mut self, link: LinkId, frame: Frame, now: u64) {
        self.now = self.now.max(now);
        let Some(peer) = self.links.get(&link).map(|l| l.peer) else { return };
        match (peer, frame) {
            (Peer::Pending, Frame::Hello { version, role, relay_path, token }) => {
                self.on_downstream_hello(link, version, role, &relay_path, token.as_deref())
            }
            (Peer::Pending, _) => self.fail(link, None, ErrorCode::Malformed, "expected hello first"),
            (Peer::ParentPending, Frame::Hello { version, relay_path, .. }) => {
                self.on_parent_hello(link, version, relay_path)
            }
            (Peer::ParentPending, Frame::Error { code, message, .. }) => {
                self.parent_refused(link, ParentRefusal { code, message, by_parent: true })
            }
            (Peer::ParentPending, _) => self.fail(link, None, ErrorCode::Malformed, "expected hello first"),
            (_, Frame::Hello { .. }) => self.fail(link, None, ErrorCode::Malformed, "second hello"),
            (Peer::Downstream, Frame::Subscribe { id, filter, mode, credit }) => {
                self.on_subscribe(link, id, filter, mode, credit, now)
            }
            (Peer::Downstream, Frame::Credit { id, credit }) => self.on_credit(link, id, credit),
            (Peer::Downstream, Frame::Unsubscribe { id }) => self.on_unsubscribe(link, id),
            (Peer::Downstream, Frame::Publish { seq, chunk }) => self.on_publish(link, seq, &chunk, now, None, true),
            (Peer::Downstream, Frame::PublishUnacked { seq, chunk }) => {
                self.on_publish(link, seq, &chunk, now, None, false)
            }
            (Peer::Parent, Frame::Deliver { id, chunk }) => self.on_chunk_from_parent(link, id, &chunk, now, None),
            // An answer about a number still in our queue is not about anything the parent
            // received: ignored, like an unknown number. Otherwise a parent acking (or ending)
            // what it was never sent would let the outbox (or resubscriptions) refill the
            // queue without bound while the link does not drain.
            (Peer::Parent, Frame::Ack { seq } | Frame::Error { about: Some(seq), .. }) if seq > self.up.sent => {}
            (Peer::Parent, Frame::Ack { seq }) => self.on_upstream_ack(seq, false),
            (Peer::Parent, Frame::Error { about: Some(seq), .. }) if self.up.inflight.contains_key(&seq) => {
                // The parent will never take this chunk (conflict, expired, denied): drop it
                // from the outbox rather than retry forever, and count it.
                self.on_upstream_ack(seq, true)
            }
            (Peer::Parent, Frame::Error { code, about: Some(id), .. }) if self.up.by_id.contains_key(&id) => {
                self.on_upstream_sub_error(id, code)
            }
            (Peer::Parent, Frame::ReplayDone { .. } | Frame::Error { .. }) => {}
            (_, _) => self.fail(link, None, ErrorCode::Malformed, "frame not valid in this direction"),
        }
    }

    /// Handles the frames of `frames` received on `link` at time `now`, from the front,
    /// removing each one handled: exactly as [`handle`](Self::handle) would, one by one, but
    /// each run of consecutive chunks (publishes from a client or a child, deliveries from the
    /// parent) is matched against the subscriptions with one
    /// [`for_each_match_batch`](SubscriptionTable::for_each_match_batch) lookup, up to 64
    /// chunks at a time — most of the work of a publish in a relay with many subscriptions.
    ///
    /// Everything else happens frame by frame, in order, as in `handle`: each chunk is stored
    /// (deciding duplicates and conflicts), forwarded up and delivered before the next one is
    /// stored, so what the link queues hold afterwards, in what order, is exactly what calling
    /// `handle` for each frame would have left. Only the lookups move ahead, which is sound
    /// because nothing in a run adds a subscription: any other frame (`Subscribe`,
    /// `Unsubscribe`, `Credit`, ...) ends the run, and a subscription ended within it (a slow
    /// consumer) is skipped when later chunks of the run reach it, as a lookup then would
    /// have. The names of chunks that turn out to be duplicates are looked up for nothing.
    ///
    /// Returns early, leaving the frames not yet handled in `frames`, after a frame that made
    /// a link's queue cross half its bound: the driver calls [`take_urgent`](Self::take_urgent),
    /// drains those links, and calls again with what is left — what a driver calling `handle`
    /// then `take_urgent` for each frame does, with the same result. A run cut short this way
    /// looks up the names after the cut again next time. Frames for a link the node does not
    /// know are dropped, as `handle` drops them.
    ///
    /// ```ignore
    /// let mut frames = VecDeque::from(frames); // O(1) from a Vec
    /// while !frames.is_empty() {
    ///     node.handle_batch(link, &mut frames, now);
    ///     node.take_urgent(&mut urgent);
    ///     // ... drain the urgent links ...
    /// }
    /// ```
    pub fn handle_batch(&mut self, link: LinkId, frames: &mut VecDeque<Frame>, now: u64) {
        self.now = self.now.max(now);
        let urgent = self.urgent.len();
        while self.urgent.len() == urgent {
            let Some(peer) = self.links.get(&link).map(|l| l.peer) else {
                frames.clear();
                return;
            };
            // With store requests, chunks are matched when the store has answered, not here.
            let run = if self.config.store_requests {
                0
            } else {
                frames.iter().take(MATCH_RUN).take_while(|f| run_chunk(peer, f).is_some()).count()
            };
            if run < 2 {
                // Not a chunk, or a lone one: the frame-by-frame path.
                let Some(frame) = frames.pop_front() else { return };
                self.handle(link, frame, now);
                continue;
            }
            // The run's buffers stay out of `self` while its frames are handled.
            let mut buffers = std::mem::take(&mut self.run);
            buffers.names.clear();
            buffers.names.extend(frames.iter().take(run).filter_map(|f| run_chunk(peer, f)).map(Chunk::name));
            self.match_run(&mut buffers, link);
            for i in 0..run {
                let frame = frames.pop_front().expect("counted in the run");
                let targets = Some(buffers.targets(i));
                match frame {
                    Frame::Publish { seq, chunk } => self.on_publish(link, seq, &chunk, now, targets, true),
                    Frame::PublishUnacked { seq, chunk } => self.on_publish(link, seq, &chunk, now, targets, false),
                    Frame::Deliver { id, chunk } => self.on_chunk_from_parent(link, id, &chunk, now, targets),
                    _ => unreachable!("a run holds only chunks"),
                }
                if self.urgent.len() != urgent {
                    break;
                }
            }
            self.run = buffers;
        }
    }

    /// Matches the names in `buffers.names` against the subscriptions in one batched lookup,
    /// leaving in `buffers.targets` the subscriptions not on `except` that each name matched,
    /// grouped by name in the order given (a counting sort, stable: within a name, the order
    /// in which [`SubscriptionTable::for_each_match`] would have visited them).
    fn match_run(&self, buffers: &mut RunBuffers, except: LinkId) {
        let RunBuffers { names, hits, targets, ends } = buffers;
        hits.clear();
        self.table.for_each_match_batch(names, |i, (link, id)| {
            if link != except {
                hits.push((i as u32, link, id));
            }
        });
        // Count the hits of each name, then turn the counts into where each group starts.
        ends.clear();
        ends.resize(names.len(), 0);
        for &(i, _, _) in hits.iter() {
            ends[i as usize] += 1;
        }
        let mut start = 0;
        for end in ends.iter_mut() {
            let count = *end;
            *end = start;
            start += count;
        }
        // Each hit goes to its group's cursor, which ends at the group's end.
        targets.clear();
        targets.resize(hits.len(), (0, 0));
        for &(i, link, id) in hits.iter() {
            let at = &mut ends[i as usize];
            targets[*at] = (link, id);
            *at += 1;
        }
    }

    fn on_downstream_hello(&mut self, link: LinkId, version: u16, role: Role, path: &[RelayId], token: Option<&str>) {
        if version != PROTOCOL_VERSION {
            let msg = format!("protocol version {version} is not supported; this relay speaks {PROTOCOL_VERSION}");
            return self.fail(link, None, ErrorCode::UnsupportedVersion, &msg);
        }
        if role == Role::Relay {
            // A relay's hello names itself first. If it is already on our own path to the
            // origin, it is our ancestor, and taking it as a child would close a cycle.
            let Some(child) = path.first() else {
                return self.fail(link, None, ErrorCode::Malformed, "a relay's hello must name the relay");
            };
            if self.path().contains(child) {
                let msg = format!("relay {child} is on this relay's path to the origin: connecting would make a cycle");
                return self.fail(link, None, ErrorCode::Cycle, &msg);
            }
        }
        let grant = match self.config.access.grant(token) {
            Ok(grant) => grant,
            Err(err) => return self.fail(link, None, ErrorCode::Unauthenticated, &err.to_string()),
        };
        let hello =
            Frame::Hello { version: PROTOCOL_VERSION, role: Role::Relay, relay_path: self.path(), token: None };
        let l = self.links.get_mut(&link).expect("link exists");
        l.peer = Peer::Downstream;
        l.grant = grant;
        if role == Role::Relay {
            l.child_relay = true;
            // Frames queued so far (none but this hello) need no sync.
            l.released = l.drained + l.queue.len() as u64 + 1;
            self.child_relays.push(link);
        }
        l.queue.enqueue(link, &mut self.dirty, hello);
    }

    fn on_parent_hello(&mut self, link: LinkId, version: u16, path: Vec<RelayId>) {
        if version != PROTOCOL_VERSION {
            let message = format!("parent speaks protocol version {version}, we speak {PROTOCOL_VERSION}");
            return self.parent_refused(
                link,
                ParentRefusal { code: ErrorCode::UnsupportedVersion, message, by_parent: false },
            );
        }
        if path.contains(&self.config.id) {
            let message = "we are on our parent's path to the origin".to_owned();
            return self.parent_refused(link, ParentRefusal { code: ErrorCode::Cycle, message, by_parent: false });
        }
        self.up.path = path;
        self.links.get_mut(&link).expect("link exists").peer = Peer::Parent;
        // Renew every upstream subscription (the parent replays what we missed), then drain
        // the outbox.
        let cover = minimal_cover(self.up.wanted.keys().copied());
        for filter in cover {
            self.subscribe_up(filter);
        }
        self.refill_outbox();
    }

    fn on_subscribe(&mut self, link: LinkId, id: u64, filter: Filter, mode: ReplayMode, credit: u32, now: u64) {
        let l = self.links.get_mut(&link).expect("link exists");
        if !l.grant.may_subscribe(&filter) {
            self.metrics.denied += 1;
            let msg = format!("subscribing to {filter} is not allowed for this token");
            return self.error(link, Some(id), ErrorCode::SubscribeDenied, &msg);
        }
        if let Some(old) = l.subs.remove(&id) {
            l.busy.remove(&id);
            self.drop_sub(link, id, &old);
        }
        let replay = match mode {
            // With a shared store, `ReplayDone` promises that chunks stored from then on by
            // anyone arrive: it waits for an empty read, which the driver runs only once it has
            // subscribed to the store's live feed for this filter (see `take_interest`).
            ReplayMode::LiveOnly if self.config.store_requests => {
                let op = StoreOp::ScanLast { filter, n: 0, now };
                Some(Replay::Listing(self.requests.push(op, Pending::Replay { link, id, limit: 0 })))
            }
            ReplayMode::LiveOnly => None,
            ReplayMode::CachedAndLive | ReplayMode::CachedOnly => Some(Replay::from(filter.name())),
            ReplayMode::MostRecent(n) => {
                let n = n.min(self.config.max_most_recent) as usize;
                if self.config.store_requests {
                    let op = StoreOp::ScanLast { filter, n, now };
                    Some(Replay::Listing(self.requests.push(op, Pending::Replay { link, id, limit: n })))
                } else {
                    match self.store.scan_last(filter, n, now) {
                        Ok(list) => Some(Replay::List(list.into())),
                        Err(err) => return self.error(link, Some(id), ErrorCode::Internal, &err.to_string()),
                    }
                }
            }
        };
        let live = mode != ReplayMode::CachedOnly;
        let live_only = replay.is_none();
        let work = replay.map(|replay| Box::new(Work { replay: Some(replay), ..Work::default() }));
        let sub = Sub::new(filter, live, credit, work);
        let l = self.links.get_mut(&link).expect("link exists");
        l.subs.insert(id, sub);
        if live_only {
            l.queue.enqueue(link, &mut self.dirty, Frame::ReplayDone { id });
        } else {
            l.busy.insert(id);
        }
        self.table.insert(filter, (link, id));
        if live {
            self.want(filter);
        }
        self.pump_sub(link, id, usize::MAX);
    }

    fn on_credit(&mut self, link: LinkId, id: u64, credit: u32) {
        let Some(l) = self.links.get_mut(&link) else { return };
        // An unknown id is a subscription that ended while the credit was in flight.
        let Some(sub) = l.subs.get_mut(&id) else { return };
        sub.credit = sub.credit.saturating_add(credit);
        if l.busy.contains(&id) {
            self.pump_sub(link, id, usize::MAX);
        }
    }

    fn on_unsubscribe(&mut self, link: LinkId, id: u64) {
        let l = self.links.get_mut(&link).expect("link exists");
        l.busy.remove(&id);
        match l.subs.remove(&id) {
            Some(sub) => self.drop_sub(link, id, &sub),
            None => self.error(link, Some(id), ErrorCode::UnknownSubscription, "no such subscription"),
        }
    }

    /// Forgets a subscription already taken out of its link.
    fn drop_sub(&mut self, link: LinkId, id: u64, sub: &Sub) {
        let filter = sub.filter();
        self.table.remove(filter, (link, id));
        if sub.live {
            self.unwant(filter);
        }
    }

    /// Stores a chunk a client or a child published, forwards it up and queues it to the
    /// covering subscriptions: those in `matched` if the caller looked them up already (see
    /// [`handle_batch`](Self::handle_batch)), else looked up here.
    ///
    /// `acked` is false for a [`Frame::PublishUnacked`]: it is answered only if refused.
    fn on_publish(
        &mut self,
        link: LinkId,
        seq: u64,
        chunk: &Chunk,
        now: u64,
        matched: Option<&[(LinkId, u64)]>,
        acked: bool,
    ) {
        self.metrics.chunks_in += 1;
        let name = chunk.name();
        if !self.links[&link].grant.may_publish(name) {
            self.metrics.denied += 1;
            let msg = format!("publishing {name} is not allowed for this token");
            return self.error(link, Some(seq), ErrorCode::PublishDenied, &msg);
        }
        if chunk.is_expired(now) {
            let msg = format!("chunk {name} expired at {} (now {now})", chunk.expiry());
            return self.error(link, Some(seq), ErrorCode::Expired, &msg);
        }
        if self.config.store_requests {
            self.requests.push(StoreOp::Insert(chunk.clone()), Pending::Publish { link, seq, chunk: chunk.clone(), acked });
            return;
        }
        let outcome = self.store.insert(chunk);
        self.publish_stored(link, seq, chunk, outcome, matched, acked);
    }

    /// Finishes a publish once the store has decided what it is: acks it (once synced),
    /// forwards it up and delivers it if it is new; refuses it if it conflicts.
    fn publish_stored(
        &mut self,
        link: LinkId,
        seq: u64,
        chunk: &Chunk,
        outcome: Result<InsertOutcome, StoreError>,
        matched: Option<&[(LinkId, u64)]>,
        acked: bool,
    ) {
        let name = chunk.name();
        match outcome {
            Ok(InsertOutcome::Inserted) => {
                self.metrics.stored += 1;
                if self.has_parent {
                    if let Err(err) = self.store.outbox_push(name) {
                        return self.error(link, Some(seq), ErrorCode::Internal, &err.to_string());
                    }
                    self.send_up(chunk);
                }
                self.deliver(chunk, link, matched);
                self.unsynced = true;
                if acked {
                    self.ack(link, seq);
                }
            }
            Ok(InsertOutcome::Duplicate) => {
                self.metrics.duplicates += 1;
                // The copy we hold may have come down from the parent, which delivers before
                // it syncs and so may since have lost it in a crash. Forwarding this publish
                // up too (the parent acknowledges duplicates) makes an acknowledged chunk
                // reach the origin whatever path its first copy took.
                if self.has_parent {
                    if let Err(err) = self.store.outbox_push(name) {
                        return self.error(link, Some(seq), ErrorCode::Internal, &err.to_string());
                    }
                    if !self.up.inflight_names.contains(&name) {
                        self.send_up(chunk);
                    }
                }
                if acked {
                    self.ack(link, seq);
                }
            }
            Ok(InsertOutcome::Conflict) => {
                self.metrics.conflicts += 1;
                let msg = format!("chunk {name} is already stored with different data; the original is kept");
                self.error(link, Some(seq), ErrorCode::Conflict, &msg);
            }
            Err(err @ StoreError::Full { .. }) => self.error(link, Some(seq), ErrorCode::StoreFull, &err.to_string()),
            Err(err) => self.error(link, Some(seq), ErrorCode::Internal, &err.to_string()),
        }
    }

    /// Holds a publish's ack until [`Node::release_written`] (with
    /// [`NodeConfig::ack_before_sync`]) or the sync covering it.
    fn ack(&mut self, link: LinkId, seq: u64) {
        self.unacked.push((link, seq));
    }

    /// Stores a chunk the parent delivered and queues it to the covering subscriptions, those
    /// in `matched` if the caller looked them up already (as [`on_publish`](Self::on_publish)).
    ///
    /// It spent a delivery of upstream subscription `id`'s credit, handed back once the chunk
    /// is stored: at once, or when the store request is done ([`NodeConfig::store_requests`]),
    /// so the parent can have no more chunks in flight here than the credit allows.
    fn on_chunk_from_parent(
        &mut self,
        link: LinkId,
        id: u64,
        chunk: &Chunk,
        now: u64,
        matched: Option<&[(LinkId, u64)]>,
    ) {
        self.metrics.chunks_in += 1;
        if chunk.is_expired(now) {
            return self.spend_upstream_credit(link, id);
        }
        if self.config.store_requests {
            self.requests.push(StoreOp::Insert(chunk.clone()), Pending::FromParent { link, id, chunk: chunk.clone() });
            return;
        }
        self.spend_upstream_credit(link, id);
        let outcome = self.store.insert(chunk);
        self.parent_chunk_stored(link, chunk, outcome, matched);
    }

    /// Finishes a chunk from the parent once the store has decided what it is.
    fn parent_chunk_stored(
        &mut self,
        link: LinkId,
        chunk: &Chunk,
        outcome: Result<InsertOutcome, StoreError>,
        matched: Option<&[(LinkId, u64)]>,
    ) {
        match outcome {
            Ok(InsertOutcome::Inserted) => {
                self.metrics.stored += 1;
                self.deliver(chunk, link, matched);
            }
            Ok(InsertOutcome::Duplicate) => self.metrics.duplicates += 1,
            Ok(InsertOutcome::Conflict) => self.metrics.conflicts += 1,
            // Our cache is full of longer-lived chunks; the chunk still reaches live
            // subscribers, it just is not cached here.
            Err(StoreError::Full { .. }) => self.deliver(chunk, link, matched),
            Err(_) => {}
        }
    }

    /// Queues a newly stored chunk to every covering subscription not on `except`: those in
    /// `matched` (looked up with the chunks of a run, before the frames ahead of this one
    /// were handled), else looked up now.
    fn deliver(&mut self, chunk: &Chunk, except: LinkId, matched: Option<&[(LinkId, u64)]>) {
        if let Some(targets) = matched {
            return self.deliver_to(chunk, targets);
        }
        // The targets' list is kept between chunks: no allocation per chunk.
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        self.table.for_each_match(chunk.name(), |(link, id)| {
            if link != except {
                targets.push((link, id));
            }
        });
        self.deliver_to(chunk, &targets);
        self.targets = targets;
    }

    /// Queues a chunk to `targets`, or to their backlogs. A target whose subscription has
    /// ended since it was looked up (only a slow consumer, within a run) is skipped, as a
    /// lookup now would have skipped it.
    fn deliver_to(&mut self, chunk: &Chunk, targets: &[(LinkId, u64)]) {
        let (max_queue, max_backlog) = (self.config.max_queue, self.config.max_backlog);
        for &(link, id) in targets {
            let Some(l) = self.links.get_mut(&link) else { continue };
            let Some(sub) = l.subs.get_mut(&id) else { continue };
            match sub.replay() {
                // The replay has not reached this name yet: it will send the chunk from the
                // store, in order. (While a page is being read, the page may or may not hold
                // the chunk: it waits in the backlog until the page tells, see `settle_page`.)
                Some(Replay::From { next: Some(next), reading: None, .. }) if chunk.name() >= *next => continue,
                // A `CachedOnly` subscription finishing its replay takes nothing live.
                None if !sub.live => continue,
                _ => {}
            }
            if !sub.busy() && sub.credit > 0 && l.queue.len() < max_queue {
                // The hot path: nothing waiting ahead of it, and room all the way.
                sub.credit -= 1;
                l.queue.enqueue(link, &mut self.dirty, Frame::Deliver { id, chunk: chunk.clone() });
                self.metrics.chunks_out += 1;
                if l.queue.len() == max_queue.div_ceil(2) {
                    self.urgent.push(link);
                }
            } else if sub.backlog_len() < max_backlog {
                sub.work.get_or_insert_with(Box::default).backlog.push_back(chunk.clone());
                l.busy.insert(id);
            } else {
                self.slow_consumer(link, id);
            }
        }
    }

    fn slow_consumer(&mut self, link: LinkId, id: u64) {
        if self.end_slow(link, id, |id, sub| {
            format!(
                "subscription {id} to {} fell {} chunks behind and was ended; resubscribe to recover from the cache",
                sub.filter(),
                sub.backlog_len()
            )
        }) {
            self.metrics.slow_consumers += 1;
        }
    }

    /// Ends subscription `id` of `link` with `SlowConsumer` and the message `why` gives, the
    /// error subscribers recover from by subscribing again; returns whether it was open.
    fn end_slow(&mut self, link: LinkId, id: u64, why: impl FnOnce(u64, &Sub) -> String) -> bool {
        let Some(l) = self.links.get_mut(&link) else { return false };
        l.busy.remove(&id);
        let Some(sub) = l.subs.remove(&id) else { return false };
        self.drop_sub(link, id, &sub);
        self.error(link, Some(id), ErrorCode::SlowConsumer, &why(id, &sub));
        true
    }

    /// Continues the busy subscriptions of `link` (replays and backlogs) while its queue has
    /// room, giving each a fair share before any takes the rest.
    fn pump(&mut self, link: LinkId) {
        let Some(l) = self.links.get_mut(&link) else { return };
        if l.busy.is_empty() {
            return;
        }
        // Start after the subscription that started last time, wrapping around. Those without
        // credit can send nothing (they resume when `Credit` arrives).
        let rotor = l.rotor;
        let mut order: Vec<u64> = l
            .busy
            .range(rotor..)
            .chain(l.busy.range(..rotor))
            .copied()
            .filter(|id| l.subs.get(id).is_some_and(|s| s.credit > 0))
            .collect();
        if order.is_empty() {
            return;
        }
        l.rotor = order[0].wrapping_add(1);
        let share = self.config.max_queue.saturating_sub(l.queue.len()).div_ceil(order.len()).max(1);
        for &id in &order {
            self.pump_sub(link, id, share);
        }
        order.retain(|id| self.links.get(&link).is_some_and(|l| l.busy.contains(id)));
        for id in order {
            self.pump_sub(link, id, usize::MAX);
        }
    }

    /// Moves up to `quota` chunks of one subscription into its link's queue, as far as its
    /// credit and the queue bound allow: first its replay (cached chunks from the store), then
    /// its backlog; sends `ReplayDone` once the replay and the chunks held during it are out.
    fn pump_sub(&mut self, link: LinkId, id: u64, quota: usize) {
        let (max_queue, now) = (self.config.max_queue, self.now);
        let Some(l) = self.links.get_mut(&link) else { return };
        let Some(sub) = l.subs.get_mut(&id) else { return };
        let filter = sub.filter();
        let Some(work) = sub.work.as_deref_mut() else {
            l.busy.remove(&id);
            return;
        };
        let room = |queued: usize, credit: u64, quota: usize| {
            max_queue.saturating_sub(queued).min(usize::try_from(credit).unwrap_or(usize::MAX)).min(quota)
        };
        let mut sent = 0usize;
        let replay_room = room(l.queue.len(), sub.credit.into(), quota);
        if let Some(replay) = &mut work.replay {
            let room = replay_room;
            let finished = match replay {
                Replay::List(list) => {
                    while sent < room {
                        let Some(chunk) = list.pop_front() else { break };
                        // Listed when the subscription opened; it may have expired since.
                        if !chunk.is_expired(now) {
                            l.queue.enqueue(link, &mut self.dirty, Frame::Deliver { id, chunk });
                            sent += 1;
                        }
                    }
                    list.is_empty()
                }
                // Waiting for the driver to read the list.
                Replay::Listing(_) => return,
                Replay::From { next, fetched, reading } => {
                    if reading.is_some() {
                        // Waiting for the driver to read the next page.
                        return;
                    }
                    let (_, end) = filter.range();
                    if fetched.is_empty()
                        && let Some(first) = *next
                    {
                        // Without room, still read one chunk ahead: an exhausted range
                        // finishes the replay (and sends `ReplayDone`) even with no credit.
                        let limit = room.max(1);
                        if self.config.store_requests {
                            let op = StoreOp::Scan { first, last: end, limit, now };
                            *reading = Some(self.requests.push(op, Pending::Replay { link, id, limit }));
                            return;
                        }
                        let mut page = Vec::new();
                        let result = self.store.scan_range(first, end, now, &mut |chunk| {
                            page.push(chunk);
                            if page.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                        });
                        if let Err(err) = result {
                            let msg = err.to_string();
                            return self.error(link, Some(id), ErrorCode::Internal, &msg);
                        }
                        settle_page(next, &mut work.backlog, &page, limit, end);
                        // Read just now with room for all of it (but the chunk read ahead
                        // without room): straight into the queue.
                        let mut page = page.into_iter();
                        for chunk in page.by_ref().take(room) {
                            l.queue.enqueue(link, &mut self.dirty, Frame::Deliver { id, chunk });
                            sent += 1;
                        }
                        fetched.extend(page);
                    }
                    while sent < room {
                        let Some(chunk) = fetched.pop_front() else { break };
                        // Read ahead earlier, it may have expired since.
                        if !chunk.is_expired(now) {
                            l.queue.enqueue(link, &mut self.dirty, Frame::Deliver { id, chunk });
                            sent += 1;
                        }
                    }
                    fetched.is_empty() && next.is_none()
                }
            };
            sub.credit -= u32::try_from(sent).expect("at most the credit");
            if !finished {
                self.metrics.chunks_out += sent as u64;
                return;
            }
            // The chunks held during the replay go next, in name order, then `ReplayDone`.
            work.replay = None;
            work.backlog.make_contiguous().sort_by_key(Chunk::name);
            work.done_after = Some(work.backlog.len());
        }
        let room = room(l.queue.len(), sub.credit.into(), quota.saturating_sub(sent));
        let take = room.min(work.backlog.len());
        for chunk in work.backlog.drain(..take) {
            l.queue.enqueue(link, &mut self.dirty, Frame::Deliver { id, chunk });
        }
        sub.credit -= u32::try_from(take).expect("at most the credit");
        sent += take;
        self.metrics.chunks_out += sent as u64;
        if let Some(held) = &mut work.done_after {
            *held = held.saturating_sub(take);
            if *held == 0 {
                work.done_after = None;
                l.queue.enqueue(link, &mut self.dirty, Frame::ReplayDone { id });
                if !sub.live {
                    l.busy.remove(&id);
                    let sub = l.subs.remove(&id).expect("present");
                    return self.drop_sub(link, id, &sub);
                }
            }
        }
        if work.is_empty() {
            sub.work = None;
            l.busy.remove(&id);
        }
    }

    /// The store has read what store request `ticket` asked for subscription `id` of `link`:
    /// a page of its replay, or its `MostRecent` list. Continues the replay with it, if the
    /// subscription is still the one that asked.
    fn replay_read(&mut self, link: LinkId, id: u64, ticket: u64, limit: usize, found: Result<Vec<Chunk>, StoreError>) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let Some(sub) = l.subs.get_mut(&id) else { return };
        let filter = sub.filter();
        let Some(work) = sub.work.as_deref_mut() else { return };
        let Some(replay) = work.replay.as_mut() else { return };
        match replay {
            Replay::From { next, fetched, reading } if *reading == Some(ticket) => {
                *reading = None;
                match found {
                    Ok(page) => {
                        settle_page(next, &mut work.backlog, &page, limit, filter.range().1);
                        fetched.extend(page);
                    }
                    // The next pump reads the page again.
                    Err(err) => return self.error(link, Some(id), ErrorCode::Internal, &err.to_string()),
                }
            }
            Replay::Listing(t) if *t == ticket => match found {
                Ok(list) => {
                    // Live chunks held while the list was read: those it holds go with it.
                    work.backlog.retain(|held| list.binary_search_by_key(&held.name(), Chunk::name).is_err());
                    *replay = Replay::List(list.into());
                }
                Err(err) => {
                    *replay = Replay::List(VecDeque::new());
                    self.error(link, Some(id), ErrorCode::Internal, &err.to_string());
                }
            },
            // Another subscription under the same id, or a request already answered.
            _ => return,
        }
        self.pump_sub(link, id, usize::MAX);
    }

    // ----- upstream -----

    /// A downstream filter needs live chunks from above.
    fn want(&mut self, filter: Filter) {
        if self.config.store_requests {
            let count = self.shared.entry(filter).or_insert(0);
            *count += 1;
            if *count == 1 {
                self.interest.push((filter, true));
            }
        }
        if !self.has_parent {
            return;
        }
        let count = self.up.wanted.entry(filter).or_insert(0);
        *count += 1;
        if *count > 1 || self.covered_upstream(&filter) {
            return;
        }
        // `filter` joins the cover and replaces any narrower filters it now covers.
        let (lo, hi) = filter.range();
        let narrower: Vec<Filter> = self
            .up
            .subscribed
            .range(Filter::new(lo, 0).expect("len 0")..)
            .map(|(f, _)| *f)
            .take_while(|f| f.name() <= hi)
            .filter(|f| filter.covers(f))
            .collect();
        for f in narrower {
            self.unsubscribe_up(f);
        }
        self.subscribe_up(filter);
    }

    /// A downstream filter no longer needs live chunks.
    fn unwant(&mut self, filter: Filter) {
        if self.config.store_requests
            && let Some(count) = self.shared.get_mut(&filter)
        {
            *count -= 1;
            if *count == 0 {
                self.shared.remove(&filter);
                self.interest.push((filter, false));
            }
        }
        if !self.has_parent {
            return;
        }
        let Some(count) = self.up.wanted.get_mut(&filter) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.up.wanted.remove(&filter);
        if !self.up.subscribed.contains_key(&filter) {
            return;
        }
        self.unsubscribe_up(filter);
        // The filters it was covering need their own upstream subscriptions again.
        let (lo, hi) = filter.range();
        let inside = self
            .up
            .wanted
            .range(Filter::new(lo, 0).expect("len 0")..)
            .map(|(f, _)| *f)
            .take_while(|f| f.name() <= hi)
            .filter(|f| filter.covers(f));
        for f in minimal_cover(inside) {
            self.subscribe_up(f);
        }
    }

    fn covered_upstream(&self, filter: &Filter) -> bool {
        // Any covering filter starts at or before `filter` and covers its first name.
        self.up
            .subscribed
            .range(..=*filter)
            .rev()
            .any(|(f, _)| f.covers(filter))
    }

    fn subscribe_up(&mut self, filter: Filter) {
        self.up.next_seq += 1;
        let id = self.up.next_seq;
        self.up.subscribed.insert(filter, id);
        if let Some(link) = self.parent_ready() {
            let credit = self.config.upstream_credit;
            let frame = Frame::Subscribe { id, filter, mode: ReplayMode::CachedAndLive, credit };
            self.links.get_mut(&link).expect("parent").queue.enqueue(link, &mut self.dirty, frame);
            self.up.by_id.insert(id, (filter, 0));
        }
    }

    fn unsubscribe_up(&mut self, filter: Filter) {
        let Some(id) = self.up.subscribed.remove(&filter) else { return };
        self.up.by_id.remove(&id);
        if let Some(link) = self.parent_ready() {
            let l = self.links.get_mut(&link).expect("parent");
            // A `Subscribe` the parent has not been sent yet is withdrawn instead: otherwise a
            // client subscribing and unsubscribing in a loop while the parent link is slow
            // would grow its queue by two frames a turn, without bound.
            let queued = (id > self.up.sent)
                .then(|| l.queue.iter().position(|f| matches!(f, Frame::Subscribe { id: i, .. } if *i == id)))
                .flatten();
            match queued {
                Some(pos) => {
                    l.queue.remove(pos);
                }
                None => l.queue.enqueue(link, &mut self.dirty, Frame::Unsubscribe { id }),
            }
        }
    }

    /// Counts a delivery on upstream subscription `id`. The node stores (and fans out) every
    /// chunk as it arrives, so it hands the credit straight back, half a window at a time.
    fn spend_upstream_credit(&mut self, link: LinkId, id: u64) {
        let window = self.config.upstream_credit;
        let Some((_, used)) = self.up.by_id.get_mut(&id) else { return };
        *used += 1;
        if *used >= window.div_ceil(2) {
            let credit = std::mem::take(used);
            let Some(l) = self.links.get_mut(&link) else { return };
            // Credit adds up, so a grant still queued for this subscription takes this one
            // too: one `Credit` per subscription in the queue at most, however many
            // deliveries arrive while the parent link does not drain.
            let queued = l.queue.iter_mut().rev().find_map(|f| match f {
                Frame::Credit { id: i, credit } if *i == id => Some(credit),
                _ => None,
            });
            match queued {
                Some(queued) => *queued = queued.saturating_add(credit),
                None => l.queue.enqueue(link, &mut self.dirty, Frame::Credit { id, credit }),
            }
        }
    }

    /// The parent ended upstream subscription `id`. After `SlowConsumer` (this link could not
    /// take deliveries fast enough) the node subscribes again, and the parent's replay brings
    /// back what was missed; any other refusal is counted and not retried on this link.
    fn on_upstream_sub_error(&mut self, id: u64, code: ErrorCode) {
        let Some((filter, _)) = self.up.by_id.remove(&id) else { return };
        if self.up.subscribed.get(&filter) != Some(&id) {
            return;
        }
        if code == ErrorCode::SlowConsumer {
            self.metrics.upstream_resubscribed += 1;
            self.subscribe_up(filter);
        } else {
            self.metrics.upstream_rejected += 1;
        }
    }

    /// Whether a link to the parent is up (its `Hello`s exchanged).
    pub fn parent_connected(&self) -> bool {
        self.parent_ready().is_some()
    }

    fn parent_ready(&self) -> Option<LinkId> {
        let link = self.up.link?;
        (self.links.get(&link)?.peer == Peer::Parent).then_some(link)
    }

    /// Sends a chunk up now if the window allows; it stays in the outbox either way.
    fn send_up(&mut self, chunk: &Chunk) {
        let Some(link) = self.parent_ready() else { return };
        if self.up.inflight.len() >= self.config.outbox_window {
            return;
        }
        self.up.next_seq += 1;
        let seq = self.up.next_seq;
        self.up.inflight.insert(seq, chunk.name());
        self.up.inflight_names.insert(chunk.name());
        let frame = Frame::Publish { seq, chunk: chunk.clone() };
        self.links.get_mut(&link).expect("parent").queue.enqueue(link, &mut self.dirty, frame);
    }

    fn on_upstream_ack(&mut self, seq: u64, rejected: bool) {
        let Some(name) = self.up.inflight.remove(&seq) else { return };
        self.up.inflight_names.remove(&name);
        if rejected {
            self.metrics.upstream_rejected += 1;
        }
        let _ = self.store.outbox_remove(name);
        if self.up.inflight.len() <= self.config.outbox_window / 2 {
            self.refill_outbox();
        }
    }

    /// Sends pending outbox entries up to the window.
    fn refill_outbox(&mut self) {
        if self.parent_ready().is_none() {
            return;
        }
        // Entries whose chunk expired (or was evicted) are dropped on the way; when a page
        // held some, read on, or the outbox would stall with nothing in flight to restart it.
        loop {
            let want = self.config.outbox_window.saturating_sub(self.up.inflight.len());
            if want == 0 {
                return;
            }
            let limit = want + self.up.inflight_names.len();
            let Ok(pending) = self.store.outbox_pending(limit) else { return };
            let exhausted = pending.len() < limit;
            let mut dropped = false;
            for name in pending {
                if self.up.inflight.len() >= self.config.outbox_window {
                    return;
                }
                if self.up.inflight_names.contains(&name) {
                    continue;
                }
                match self.store.get(name) {
                    Ok(Some(chunk)) if !chunk.is_expired(self.now) => self.send_up(&chunk),
                    // Expired or evicted before it could be sent: nothing left to forward.
                    _ => {
                        let _ = self.store.outbox_remove(name);
                        dropped = true;
                    }
                }
            }
            if exhausted || !dropped {
                return;
            }
        }
    }

    // ----- errors -----

    /// Queues an error frame about a publish or subscription; the link stays open.
    fn error(&mut self, link: LinkId, about: Option<u64>, code: ErrorCode, message: &str) {
        if let Some(l) = self.links.get_mut(&link) {
            l.queue.enqueue(link, &mut self.dirty, Frame::Error { code, about, message: message.to_owned() });
        }
    }

    /// The parent session on `link` ended before it began: counts and records the refusal
    /// for the driver (see [`take_parent_refusal`](Self::take_parent_refusal)) and closes the
    /// link.
    fn parent_refused(&mut self, link: LinkId, refusal: ParentRefusal) {
        self.metrics.parent_refusals += 1;
        self.metrics.last_parent_refusal = Some(refusal.code);
        let message =
            if refusal.by_parent { format!("parent refused us: {}", refusal.message) } else { refusal.message.clone() };
        let code = refusal.code;
        self.up.refused = Some((link, refusal));
        self.fail(link, None, code, &message);
    }

    /// Queues an error frame and asks the driver to close the link after sending it.
    fn fail(&mut self, link: LinkId, about: Option<u64>, code: ErrorCode, message: &str) {
        self.error(link, about, code, message);
        self.events.push_back(Event::Close { link, code });
    }
}

/// Takes a page the store read for a replay from `*next` onwards (asking for `limit` chunks,
/// up to `end`): moves the cursor past it (to `None` once the range is exhausted). The caller
/// then sends the page's chunks or keeps them to send.
///
/// Live chunks at names from the old cursor on that were held in `backlog` while the page was
/// read (see `deliver_to`) are settled here, so that each reaches the subscriber exactly once:
/// one the page holds goes with the page; one past the new cursor is left to the next page
/// (it is stored, and that page is read after); the others, behind the new cursor and not in
/// the page, stay in the backlog and go after the replay, as live chunks the replay passed.
fn settle_page(next: &mut Option<Name>, backlog: &mut VecDeque<Chunk>, page: &[Chunk], limit: usize, end: Name) {
    let Some(from) = *next else { return };
    *next = match page.last() {
        Some(last) if page.len() >= limit && last.name() < end => Some(Name::new(last.name().to_u128() + 1)),
        _ => None,
    };
    if !backlog.is_empty() {
        let after = *next;
        backlog.retain(|held| {
            let name = held.name();
            name < from
                || (page.binary_search_by_key(&name, Chunk::name).is_err() && after.is_none_or(|after| name < after))
        });
    }
}

/// The chunk of `frame` if, arriving from a peer of kind `peer`, it is one that
/// [`Node::handle_batch`] matches in a run: a client's or child's `Publish` or
/// `PublishUnacked`, the parent's `Deliver`.
fn run_chunk(peer: Peer, frame: &Frame) -> Option<&Chunk> {
    match (peer, frame) {
        (Peer::Downstream, Frame::Publish { chunk, .. } | Frame::PublishUnacked { chunk, .. })
        | (Peer::Parent, Frame::Deliver { chunk, .. }) => Some(chunk),
        _ => None,
    }
}

/// The filters of `sorted` (in `Filter` order) not covered by another one of them.
///
/// Sorted by (name, length), a covering filter comes before everything it covers, and a
/// filter covered by an earlier kept one is also covered by the last kept one, so one pass
/// comparing with the last kept filter suffices.
fn minimal_cover(sorted: impl IntoIterator<Item = Filter>) -> Vec<Filter> {
    let mut cover: Vec<Filter> = Vec::new();
    for f in sorted {
        if cover.last().is_some_and(|last| last.covers(&f)) {
            continue;
        }
        cover.push(f);
    }
    cover
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::store::UNLIMITED;

    const TEN: u128 = 0x0a << 120;

    /// A node with a parent on link 1 (hello exchanged, queue drained) and a client on link 2.
    fn child_with_client(config: NodeConfig) -> Node<MemoryStore> {
        let mut node = Node::new(config, MemoryStore::new(UNLIMITED), true);
        node.connect_parent(1);
        let hello = |role, relay_path| Frame::Hello { version: PROTOCOL_VERSION, role, relay_path, token: None };
        node.handle(1, hello(Role::Relay, vec![RelayId(9)]), 0);
        node.accept(2);
        node.handle(2, hello(Role::Client, vec![]), 0);
        node.drain(1, usize::MAX, 0);
        node.drain(2, usize::MAX, 0);
        node
    }

    fn chunk(name: u128) -> Chunk {
        Chunk::new(Name::new(name), u64::MAX, vec![1]).unwrap()
    }

    /// Found working out the bounds the `node` fuzz target checks: a client subscribing and
    /// unsubscribing in a loop grew the parent link's queue by a `Subscribe` and an `Unsubscribe`
    /// per turn while the parent link was not draining, and the client's own queue stayed empty, so
    /// nothing paused it.
    #[test]
    fn subscription_churn_does_not_grow_the_parent_queue() {
        let mut node = child_with_client(NodeConfig::new(RelayId(1)));
        node.handle(2, Frame::Publish { seq: 0, chunk: chunk(TEN) }, 0);
        node.flush().unwrap();
        node.drain(2, usize::MAX, 0);
        let queued = node.queued(1); // the publish, on its way up
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        for _ in 0..1000 {
            // Credit 0 and a cached chunk in range: nothing is queued for the client either.
            node.handle(2, Frame::Subscribe { id: 1, filter, mode: ReplayMode::CachedAndLive, credit: 0 }, 0);
            node.handle(2, Frame::Unsubscribe { id: 1 }, 0);
        }
        assert_eq!(node.queued(1), queued);
        assert_eq!(node.queued(2), 0);
        // Once a `Subscribe` has been sent, withdrawing it takes an `Unsubscribe`.
        node.handle(2, Frame::Subscribe { id: 1, filter, mode: ReplayMode::LiveOnly, credit: 0 }, 0);
        let sent = node.drain(1, usize::MAX, 0);
        let Some(Frame::Subscribe { id, .. }) = sent.last() else { panic!("{sent:?}") };
        node.handle(2, Frame::Unsubscribe { id: 1 }, 0);
        assert_eq!(node.drain(1, usize::MAX, 0), vec![Frame::Unsubscribe { id: *id }]);
    }

    /// Found working out the bounds the `node` fuzz target checks: deliveries from the parent while
    /// its link was not draining queued one `Credit` per half window, without bound. Grants still
    /// queued now merge.
    #[test]
    fn credit_grants_merge_while_queued() {
        let mut config = NodeConfig::new(RelayId(1));
        config.upstream_credit = 2;
        let mut node = child_with_client(config);
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        node.handle(2, Frame::Subscribe { id: 1, filter, mode: ReplayMode::LiveOnly, credit: 0 }, 0);
        let sent = node.drain(1, usize::MAX, 0);
        let Some(Frame::Subscribe { id, .. }) = sent.last() else { panic!("{sent:?}") };
        for i in 0..100 {
            node.handle(1, Frame::Deliver { id: *id, chunk: chunk(TEN + i) }, 0);
        }
        assert_eq!(node.drain(1, usize::MAX, 0), vec![Frame::Credit { id: *id, credit: 100 }]);
    }

    /// Found working out the bounds the `node` fuzz target checks: a parent acknowledging publishes
    /// it had not been sent yet emptied the in-flight window, and the outbox refilled the undrained
    /// queue with another window each time, without bound. Such acks are now ignored.
    #[test]
    fn acks_for_publishes_not_yet_sent_are_ignored() {
        let mut config = NodeConfig::new(RelayId(1));
        config.outbox_window = 2;
        let mut node = child_with_client(config);
        for i in 0..10 {
            node.handle(2, Frame::Publish { seq: i, chunk: chunk(TEN + u128::from(i)) }, 0);
        }
        assert_eq!(node.queued(1), 2);
        for seq in 0..100 {
            node.handle(1, Frame::Ack { seq }, 0);
        }
        assert_eq!(node.queued(1), 2);
        assert_eq!(node.store().stats().outbox, 10);
        // Once sent, the acks count and the outbox drains.
        let sent = node.drain(1, usize::MAX, 0);
        for frame in sent {
            let Frame::Publish { seq, .. } = frame else { panic!("{frame:?}") };
            node.handle(1, Frame::Ack { seq }, 0);
        }
        assert_eq!(node.store().stats().outbox, 8);
        assert_eq!(node.queued(1), 2);
    }

    /// Every per-link and per-subscription entry, everywhere in the node.
    fn footprint(node: &Node<MemoryStore>) -> [usize; 11] {
        let (subs, busy) = node.links.values().fold((0, 0), |(s, b), l| (s + l.subs.len(), b + l.busy.len()));
        [
            node.links.len(),
            subs,
            busy,
            node.table.len(),
            node.table.heap_bytes(),
            node.up.wanted.len(),
            node.up.subscribed.len(),
            node.up.by_id.len(),
            node.up.inflight.len() + node.up.inflight_names.len(),
            node.unacked.len(),
            node.events.len() + node.urgent.len(),
        ]
    }

    /// The soak's churn in miniature: clients come and go with subscriptions of every mode,
    /// some overlapping, some stalled without credit, some with queues left undrained when
    /// their link closes. Once they are gone and the parent has answered, nothing of them is
    /// left in the node.
    #[test]
    fn nothing_of_closed_links_is_left_behind() {
        let mut config = NodeConfig::new(RelayId(1));
        config.max_queue = 16;
        config.max_backlog = 8;
        let mut node = child_with_client(config);
        let baseline = footprint(&node);
        let modes = [ReplayMode::CachedAndLive, ReplayMode::LiveOnly, ReplayMode::CachedOnly, ReplayMode::MostRecent(3)];
        let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
        let mut urgent = Vec::new();
        let mut seq = 0;
        for round in 0..50u64 {
            let links: Vec<LinkId> = (0..20).map(|i| 100 + round * 20 + i).collect();
            for (i, &link) in links.iter().enumerate() {
                node.accept(link);
                node.handle(link, hello.clone(), 0);
                for id in 0..=(i as u64 % 6) {
                    let topic = (round + id * 7 + i as u64) % 9;
                    let len = if id % 3 == 0 { 8 } else { 16 };
                    let filter = Filter::new(Name::new(TEN | (u128::from(topic) << 112)), len).unwrap();
                    let mode = modes[(id as usize + i) % modes.len()];
                    let credit = if i % 4 == 0 { 0 } else { 64 };
                    node.handle(link, Frame::Subscribe { id, filter, mode, credit }, 0);
                }
            }
            // Publishers among them, so queues, backlogs and slow consumers fill up.
            for (i, &link) in links.iter().enumerate().take(5) {
                for _ in 0..20 {
                    seq += 1;
                    let name = TEN | (u128::from(seq % 9) << 112) | u128::from(seq);
                    node.handle(link, Frame::Publish { seq, chunk: chunk(name) }, 0);
                }
                node.handle(link, Frame::Unsubscribe { id: i as u64 % 2 }, 0);
            }
            node.flush().unwrap();
            node.take_urgent(&mut urgent);
            // Half the links drain before they go, half close with full queues.
            for &link in links.iter().step_by(2) {
                node.drain(link, usize::MAX, 0);
            }
            for link in links {
                node.link_closed(link);
            }
            while node.poll_event().is_some() {}
            urgent.clear();
            // The parent takes what went up and answers it.
            for frame in node.drain(1, usize::MAX, 0) {
                match frame {
                    Frame::Publish { seq, .. } => node.handle(1, Frame::Ack { seq }, 0),
                    Frame::Subscribe { id, .. } => node.handle(1, Frame::ReplayDone { id }, 0),
                    _ => {}
                }
            }
        }
        node.take_urgent(&mut urgent);
        assert!(node.metrics().slow_consumers > 0, "some subscriptions overflowed");
        assert_eq!(footprint(&node), baseline, "links, subs, busy, table, table heap, wanted, subscribed, by_id, inflight, unacked, events");
        assert_eq!(node.links[&2].queue.len(), 0);
    }

    /// A relay holds one entry per subscription of every client: what only a subscription
    /// with work in hand needs is boxed apart, and the filter is kept unaligned.
    #[test]
    fn a_subscription_entry_stays_small() {
        assert!(std::mem::size_of::<(u64, Sub)>() <= 40, "{} bytes", std::mem::size_of::<(u64, Sub)>());
    }

    /// Subscriptions keep working through the box their replay and backlog live in: a
    /// subscription without credit holds chunks in its backlog, and takes them once credit
    /// comes; then it is idle (no box) again. An idle link gives back its queue's buffer on a
    /// tick.
    #[test]
    fn backlogs_come_and_go_and_an_idle_link_gives_its_buffer_back_on_a_tick() {
        let mut node = child_with_client(NodeConfig::new(RelayId(1)));
        // The publisher: a second client (a link gets nothing it published itself).
        node.accept(3);
        node.handle(3, Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None }, 0);
        node.drain(3, usize::MAX, 0);
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        node.handle(2, Frame::Subscribe { id: 7, filter, mode: ReplayMode::LiveOnly, credit: 0 }, 0);
        assert_eq!(node.drain(2, usize::MAX, 0), vec![Frame::ReplayDone { id: 7 }]);
        for i in 0..3 {
            node.handle(3, Frame::Publish { seq: i, chunk: chunk(TEN + u128::from(i)) }, 0);
        }
        node.flush().unwrap();
        assert_eq!(node.drain(2, usize::MAX, 0), vec![], "no credit: held");
        assert_eq!(node.link_usage(2).unwrap().backlog, 3);
        assert!(node.links[&2].subs[&7].busy());
        node.handle(2, Frame::Credit { id: 7, credit: 10 }, 0);
        let names: Vec<u128> = node
            .drain(2, usize::MAX, 0)
            .into_iter()
            .map(|f| match f {
                Frame::Deliver { id: 7, chunk } => chunk.name().to_u128(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, vec![TEN, TEN + 1, TEN + 2]);
        let sub = &node.links[&2].subs[&7];
        assert!(!sub.busy() && sub.credit == 7 && sub.filter() == filter);

        // A burst of 300 `ReplayDone`s grows the queue; drained, it keeps its buffer until a
        // tick gives it back.
        for id in 100..400 {
            node.handle(2, Frame::Subscribe { id, filter, mode: ReplayMode::LiveOnly, credit: 1 }, 0);
        }
        assert_eq!(node.drain(2, usize::MAX, 0).len(), 300);
        assert!(node.links[&2].queue.capacity() >= 300);
        node.tick(0).unwrap();
        assert_eq!(node.links[&2].queue.capacity(), 0);
        // And works on as before.
        node.handle(3, Frame::Publish { seq: 9, chunk: chunk(TEN + 9) }, 0);
        node.flush().unwrap();
        assert_eq!(node.drain(2, usize::MAX, 0).len(), 301, "a delivery to each of the 301 subscriptions");
    }

    /// An origin with a client publisher on link 2, a client subscriber on link 3 and a
    /// child relay on link 4, both subscribed to `TEN/8`, every queue drained.
    fn origin_with_child_relay(config: NodeConfig) -> Node<MemoryStore> {
        let mut node = Node::new(config, MemoryStore::new(UNLIMITED), false);
        let hello = |role, relay_path| Frame::Hello { version: PROTOCOL_VERSION, role, relay_path, token: None };
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        for (link, role, path) in [(2, Role::Client, vec![]), (3, Role::Client, vec![]), (4, Role::Relay, vec![RelayId(7)])] {
            node.accept(link);
            node.handle(link, hello(role, path), 0);
            assert!(matches!(node.drain(link, usize::MAX, 0)[..], [Frame::Hello { .. }]));
        }
        for link in [3, 4] {
            node.handle(link, Frame::Subscribe { id: 1, filter, mode: ReplayMode::LiveOnly, credit: 100 }, 0);
            assert_eq!(node.drain(link, usize::MAX, 0), vec![Frame::ReplayDone { id: 1 }]);
        }
        node
    }

    fn delivered(frames: &[Frame]) -> Vec<u128> {
        frames.iter().filter_map(|f| if let Frame::Deliver { chunk, .. } = f { Some(chunk.name().to_u128()) } else { None }).collect()
    }

    /// Issue 15, part 3: a chunk published here goes to clients at once but to a child relay
    /// only once the sync covering it is done, so a crash before the sync cannot leave the
    /// child holding a chunk this relay lost. Syncs finish in order, each releasing what it
    /// covered; a failed one releases nothing.
    #[test]
    fn a_child_relay_gets_a_published_chunk_only_once_it_is_synced() {
        let mut node = origin_with_child_relay(NodeConfig::new(RelayId(1)));
        node.handle(2, Frame::Publish { seq: 1, chunk: chunk(TEN) }, 0);
        assert!(node.needs_sync());
        assert_eq!(delivered(&node.drain(3, usize::MAX, 0)), vec![TEN], "the client gets it before the sync");
        assert_eq!(node.drain(4, usize::MAX, 0), vec![], "the child relay waits for the sync");
        assert_eq!(node.drain(2, usize::MAX, 0), vec![], "the ack waits too");
        assert!(node.child_waits_for_sync());

        let first = node.begin_sync().unwrap().expect("something to sync");
        // Published while the first sync runs: a second sync covers it.
        node.handle(2, Frame::Publish { seq: 2, chunk: chunk(TEN + 1) }, 0);
        let second = node.begin_sync().unwrap().expect("something to sync");
        assert_eq!(node.drain(4, usize::MAX, 0), vec![]);
        node.sync_done(first);
        assert_eq!(delivered(&node.drain(4, usize::MAX, 0)), vec![TEN], "the first sync releases only its own");
        assert_eq!(node.drain(2, usize::MAX, 0), vec![Frame::Ack { seq: 1 }]);
        node.sync_failed(second);
        assert_eq!(node.drain(4, usize::MAX, 0), vec![], "a failed sync releases nothing");
        assert_eq!(node.drain(2, usize::MAX, 0), vec![]);
        assert!(node.needs_sync(), "what it covered waits for the next one");
        node.flush().unwrap();
        assert_eq!(delivered(&node.drain(4, usize::MAX, 0)), vec![TEN + 1]);
        assert_eq!(node.drain(2, usize::MAX, 0), vec![Frame::Ack { seq: 2 }]);
        assert!(!node.needs_sync() && !node.child_waits_for_sync());
        assert_eq!(node.begin_sync().unwrap(), None, "nothing left to sync");

        // Nothing unsynced: control frames and chunks reach the child at once.
        let filter = Filter::new(Name::new(TEN + (1 << 100)), 16).unwrap();
        node.handle(4, Frame::Subscribe { id: 2, filter, mode: ReplayMode::LiveOnly, credit: 1 }, 0);
        assert_eq!(node.drain(4, usize::MAX, 0), vec![Frame::ReplayDone { id: 2 }]);
    }

    /// A `PublishUnacked` is stored, synced and delivered like a `Publish` (to a child relay
    /// once synced), but never acknowledged: only a refusal answers it, with its `seq`. In a
    /// batch it is matched with the run like any publish.
    #[test]
    fn an_unacked_publish_is_answered_only_when_refused() {
        let mut node = origin_with_child_relay(NodeConfig::new(RelayId(1)));
        node.handle(2, Frame::PublishUnacked { seq: 1, chunk: chunk(TEN) }, 0);
        assert_eq!(delivered(&node.drain(3, usize::MAX, 0)), vec![TEN]);
        assert!(node.needs_sync(), "stored, so a sync is owed");
        node.flush().unwrap();
        assert_eq!(node.drain(2, usize::MAX, 0), vec![], "no ack, even once synced");
        assert_eq!(delivered(&node.drain(4, usize::MAX, 0)), vec![TEN], "the child gets it once synced");

        // A duplicate is not answered either; a conflict, an expired chunk and a batch.
        let other = Chunk::new(Name::new(TEN), u64::MAX, vec![2]).unwrap();
        let expired = Chunk::new(Name::new(TEN + 5), 1, vec![1]).unwrap();
        let mut batch: VecDeque<Frame> = [
            Frame::PublishUnacked { seq: 2, chunk: chunk(TEN) },
            Frame::PublishUnacked { seq: 3, chunk: other },
            Frame::PublishUnacked { seq: 4, chunk: chunk(TEN + 1) },
            Frame::Publish { seq: 5, chunk: chunk(TEN + 2) },
            Frame::PublishUnacked { seq: 6, chunk: chunk(TEN + 3) },
            Frame::PublishUnacked { seq: 7, chunk: expired },
        ]
        .into();
        node.handle_batch(2, &mut batch, 10);
        node.flush().unwrap();
        let answers = node.drain(2, usize::MAX, 10);
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert!(matches!(answers[0], Frame::Error { code: ErrorCode::Conflict, about: Some(3), .. }), "{answers:?}");
        assert!(matches!(answers[1], Frame::Error { code: ErrorCode::Expired, about: Some(7), .. }), "{answers:?}");
        assert_eq!(answers[2], Frame::Ack { seq: 5 }, "an acked publish in the same batch still is");
        assert_eq!(delivered(&node.drain(3, usize::MAX, 10)), vec![TEN + 1, TEN + 2, TEN + 3]);
        let m = node.metrics();
        assert_eq!((m.stored, m.duplicates, m.conflicts), (4, 1, 1));
    }

    /// The same through store requests: the store's answer finishes an unacked publish
    /// without an ack.
    #[test]
    fn with_store_requests_an_unacked_publish_is_not_acknowledged() {
        let mut node = origin_with_store_requests(64);
        let other = Chunk::new(Name::new(TEN), u64::MAX, vec![2]).unwrap();
        node.handle(2, Frame::PublishUnacked { seq: 1, chunk: chunk(TEN) }, 0);
        node.handle(2, Frame::PublishUnacked { seq: 2, chunk: other }, 0);
        for request in take_requests(&mut node) {
            run(&mut node, request);
        }
        node.flush().unwrap();
        let answers = node.drain(2, usize::MAX, 0);
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert!(matches!(answers[0], Frame::Error { code: ErrorCode::Conflict, about: Some(2), .. }), "{answers:?}");
        assert_eq!(node.metrics().stored, 1);
    }

    /// With `ack_before_sync` (a relay run with a sync interval) the ack leaves once the write
    /// is handed to the OS, before the sync; the child relay still waits for the sync.
    #[test]
    fn with_ack_before_sync_the_ack_is_immediate_and_the_child_still_waits() {
        let config = NodeConfig { ack_before_sync: true, ..NodeConfig::new(RelayId(1)) };
        let mut node = origin_with_child_relay(config);
        node.handle(2, Frame::Publish { seq: 1, chunk: chunk(TEN) }, 0);
        node.release_written().unwrap();
        assert_eq!(node.drain(2, usize::MAX, 0), vec![Frame::Ack { seq: 1 }]);
        assert_eq!(delivered(&node.drain(3, usize::MAX, 0)), vec![TEN]);
        assert_eq!(node.drain(4, usize::MAX, 0), vec![]);
        assert!(node.needs_sync() && node.child_waits_for_sync());
        node.flush().unwrap();
        assert_eq!(delivered(&node.drain(4, usize::MAX, 0)), vec![TEN]);
        // A duplicate publish is acked at once too, and needs no sync of its own.
        node.handle(2, Frame::Publish { seq: 2, chunk: chunk(TEN) }, 0);
        node.release_written().unwrap();
        assert_eq!(node.drain(2, usize::MAX, 0), vec![Frame::Ack { seq: 2 }]);
        assert!(!node.needs_sync());
    }

    /// A small deterministic generator (xorshift64*), so a failing seed replays exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform in `0..n`.
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// The links with frames queued, found the old way: by looking at every link.
    fn scan_ready(node: &Node<MemoryStore>) -> Vec<LinkId> {
        let mut ready: Vec<LinkId> =
            node.links.iter().filter(|(_, l)| !l.queue.is_empty()).map(|(id, _)| *id).collect();
        ready.sort_unstable();
        ready
    }

    /// A relay under pressure: tiny queues, backlogs, credit and outbox window, a store that
    /// evicts, and a token that may publish under two of the four topics.
    fn batch_test_node() -> Node<MemoryStore> {
        let mut config = NodeConfig::new(RelayId(1));
        config.max_queue = 8;
        config.max_backlog = 6;
        config.upstream_credit = 4;
        config.outbox_window = 3;
        config.max_most_recent = 3;
        let topic = |t: u128| Filter::new(Name::new(TEN | (t << 112)), 16).unwrap();
        let publish = vec![topic(0), topic(1), topic(2)];
        config.access = Access::with_rules([("t".to_owned(), Grant { publish, subscribe: vec![Filter::ALL] })]);
        let capacity = 60 * crate::store::stored_size(&chunk(TEN));
        let mut node = Node::new(config, MemoryStore::new(capacity), true);
        node.connect_parent(1);
        node.handle(
            1,
            Frame::Hello { version: PROTOCOL_VERSION, role: Role::Relay, relay_path: vec![RelayId(9)], token: None },
            0,
        );
        node
    }

    /// The `n`th name of the random test below, in one of four topics.
    fn test_name(n: u64) -> Name {
        let topic = u128::from(n.wrapping_mul(0x9e37_79b9) >> 7) % 4;
        Name::new(TEN | (topic << 112) | u128::from(n))
    }

    /// One random frame for `link`: `seq` numbers publishes and `names` counts the chunk
    /// names used so far; `up_ids` and `up_seqs` are the upstream subscription ids and publish
    /// numbers seen going to the parent.
    fn random_frame(
        rng: &mut Rng,
        link: LinkId,
        seq: &mut u64,
        names: &mut u64,
        up_ids: &[u64],
        up_seqs: &[u64],
    ) -> Frame {
        let chunk = |rng: &mut Rng, names: &mut u64| {
            // Mostly a fresh name, sometimes a recent one again.
            let n = if rng.chance(75) {
                *names += 1;
                *names
            } else {
                names.saturating_sub(rng.below(30))
            };
            // The expiry goes with the name, so a chunk published again is a duplicate, but the
            // data differs now and then (a conflict). Time moves on about one unit per ten
            // names: some expire soon, some arrive expired.
            let expiry = n / 10 + (n % 5) * 8;
            Chunk::new(test_name(n), expiry, vec![1 + u8::from(rng.chance(3))]).unwrap()
        };
        let pick =
            |rng: &mut Rng, from: &[u64]| from.get(rng.below(from.len() as u64 + 1) as usize).copied().unwrap_or(0);
        if link == 1 {
            match rng.below(100) {
                0..75 => Frame::Deliver { id: pick(rng, up_ids), chunk: chunk(rng, names) },
                75..88 => Frame::Ack { seq: pick(rng, up_seqs) },
                88..95 => Frame::Error {
                    code: if rng.chance(70) { ErrorCode::SlowConsumer } else { ErrorCode::Conflict },
                    about: Some(if rng.chance(50) { pick(rng, up_ids) } else { pick(rng, up_seqs) }),
                    message: String::new(),
                },
                _ => Frame::ReplayDone { id: pick(rng, up_ids) },
            }
        } else {
            match rng.below(100) {
                0..72 => {
                    *seq += 1;
                    let chunk = chunk(rng, names);
                    if rng.chance(25) {
                        Frame::PublishUnacked { seq: *seq, chunk }
                    } else {
                        Frame::Publish { seq: *seq, chunk }
                    }
                }
                72..84 => {
                    let filter = match rng.below(4) {
                        0 => Filter::new(Name::new(TEN), 8).unwrap(),
                        1 | 2 => Filter::new(Name::new(TEN | (u128::from(rng.below(4)) << 112)), 16).unwrap(),
                        // One name, recent or about to come.
                        _ => Filter::new(test_name((*names + rng.below(10)).saturating_sub(5)), 128).unwrap(),
                    };
                    let modes = [
                        ReplayMode::LiveOnly,
                        ReplayMode::CachedAndLive,
                        ReplayMode::CachedOnly,
                        ReplayMode::MostRecent(2),
                    ];
                    let mode = modes[rng.below(4) as usize];
                    Frame::Subscribe { id: rng.below(5), filter, mode, credit: rng.below(30) as u32 }
                }
                84..92 => Frame::Credit { id: rng.below(5), credit: 1 + rng.below(20) as u32 },
                92..99 => Frame::Unsubscribe { id: rng.below(5) },
                _ => Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None },
            }
        }
    }

    /// `handle_batch` leaves exactly what `handle` frame by frame leaves: for random frames
    /// (runs of publishes and of deliveries from the parent, among subscribes, unsubscribes,
    /// credit, acks and errors) on several links of a relay whose queues, backlogs, store and
    /// outbox all overflow, a driver that takes the urgent links after each `handle` and one
    /// that takes them after each `handle_batch` drain the same frames, in the same order,
    /// at every step; `ready_links` names exactly the links with frames queued throughout.
    #[test]
    fn handle_batch_equals_handle_frame_by_frame() {
        let mut totals = Metrics::default();
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let (mut one, mut batch) = (batch_test_node(), batch_test_node());
            let hello = Frame::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Client,
                relay_path: vec![],
                token: Some("t".to_owned()),
            };
            let mut clients: Vec<LinkId> = vec![2, 3, 4, 5];
            for &link in &clients {
                one.accept(link);
                batch.accept(link);
                one.handle(link, hello.clone(), 0);
                batch.handle_batch(link, &mut VecDeque::from([hello.clone()]), 0);
            }
            let (mut next_link, mut seq, mut names, mut now) = (6, 0u64, 0u64, 0);
            let (mut up_ids, mut up_seqs) = (Vec::new(), Vec::new());
            let mut urgent = Vec::new();
            // The numbers of what went to the parent, for its answers to name.
            fn note_sent(frames: &[Frame], up_ids: &mut Vec<u64>, up_seqs: &mut Vec<u64>) {
                for frame in frames {
                    match frame {
                        Frame::Subscribe { id, .. } => up_ids.push(*id),
                        Frame::Publish { seq, .. } => up_seqs.push(*seq),
                        _ => {}
                    }
                }
            }
            for step in 0..300 {
                let context = format!("seed {seed} step {step}");
                now = names / 10;
                match rng.below(100) {
                    0..55 => {
                        let link = if rng.chance(30) { 1 } else { clients[rng.below(clients.len() as u64) as usize] };
                        let len = if rng.chance(20) { 1 + rng.below(150) } else { 1 + rng.below(20) };
                        let frames: Vec<Frame> = (0..len)
                            .map(|_| random_frame(&mut rng, link, &mut seq, &mut names, &up_ids, &up_seqs))
                            .collect();
                        let mut sent_one = Vec::new();
                        for frame in frames.clone() {
                            one.handle(link, frame, now);
                            one.take_urgent(&mut urgent);
                            for l in urgent.drain(..) {
                                sent_one.push((l, one.drain(l, 3, now)));
                            }
                        }
                        let mut sent_batch = Vec::new();
                        let mut frames = VecDeque::from(frames);
                        while !frames.is_empty() {
                            batch.handle_batch(link, &mut frames, now);
                            batch.take_urgent(&mut urgent);
                            for l in urgent.drain(..) {
                                sent_batch.push((l, batch.drain(l, 3, now)));
                            }
                        }
                        assert_eq!(sent_one, sent_batch, "{context}");
                        for (_, frames) in &sent_one {
                            note_sent(frames, &mut up_ids, &mut up_seqs);
                        }
                    }
                    55..80 => {
                        let ready = one.ready_links();
                        if let Some(&link) = ready.get(rng.below(ready.len() as u64 + 1) as usize) {
                            let max = if rng.chance(30) { usize::MAX } else { rng.below(6) as usize };
                            let sent = one.drain(link, max, now);
                            assert_eq!(sent, batch.drain(link, max, now), "{context}");
                            note_sent(&sent, &mut up_ids, &mut up_seqs);
                        }
                    }
                    80..92 => {
                        one.flush().unwrap();
                        batch.flush().unwrap();
                    }
                    92..96 => {
                        one.tick(now).unwrap();
                        batch.tick(now).unwrap();
                    }
                    _ => {
                        // A client leaves, with whatever it had queued; another arrives.
                        let gone = clients.remove(rng.below(clients.len() as u64) as usize);
                        one.link_closed(gone);
                        batch.link_closed(gone);
                        clients.push(next_link);
                        for node in [&mut one, &mut batch] {
                            node.accept(next_link);
                            node.handle(next_link, hello.clone(), now);
                        }
                        next_link += 1;
                    }
                }
                let events =
                    |node: &mut Node<MemoryStore>| std::iter::from_fn(|| node.poll_event()).collect::<Vec<_>>();
                assert_eq!(events(&mut one), events(&mut batch), "{context}");
                assert_eq!(one.ready_links(), scan_ready(&one), "{context}");
                assert_eq!(batch.ready_links(), scan_ready(&batch), "{context}");
                assert_eq!(one.metrics(), batch.metrics(), "{context}");
            }
            for link in one.link_ids() {
                assert_eq!(one.drain(link, usize::MAX, now), batch.drain(link, usize::MAX, now), "seed {seed}");
            }
            assert_eq!(one.store().stats(), batch.store().stats());
            let m = one.metrics();
            totals.chunks_out += m.chunks_out;
            totals.slow_consumers += m.slow_consumers;
            totals.duplicates += m.duplicates;
            totals.conflicts += m.conflicts;
            totals.denied += m.denied;
            totals.upstream_resubscribed += m.upstream_resubscribed;
        }
        // The runs met every case.
        assert!(totals.chunks_out > 1000, "{totals:?}");
        for count in
            [totals.slow_consumers, totals.duplicates, totals.conflicts, totals.denied, totals.upstream_resubscribed]
        {
            assert!(count > 0, "{totals:?}");
        }
    }

    /// `ready_links` names exactly the links with frames queued: a link joins when a frame is
    /// queued to it (an answer, a delivery, an ack after a flush, a frame to the parent),
    /// stays while drained partly, leaves when drained empty or closed, and one whose only
    /// frame was withdrawn is not named. The list behind it stays as small as the links.
    #[test]
    fn ready_links_names_the_links_with_frames_queued() {
        let mut node = child_with_client(NodeConfig::new(RelayId(1)));
        let mut into = vec![99];
        node.ready_links_into(&mut into);
        assert!(node.ready_links().is_empty() && into.is_empty());
        node.accept(3);
        node.handle(
            3,
            Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None },
            0,
        );
        assert_eq!(node.ready_links(), vec![3]);
        node.drain(3, usize::MAX, 0);
        assert!(node.ready_links().is_empty());

        // A subscription: `ReplayDone` for the client, `Subscribe` for the parent.
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        node.handle(2, Frame::Subscribe { id: 1, filter, mode: ReplayMode::LiveOnly, credit: 10 }, 0);
        assert_eq!(node.ready_links(), vec![1, 2]);
        // Withdrawn before it was sent: the parent's queue is empty again.
        node.handle(2, Frame::Unsubscribe { id: 1 }, 0);
        assert_eq!(node.queued(1), 0);
        assert_eq!(node.ready_links(), vec![2]);
        node.drain(1, usize::MAX, 0);
        node.drain(2, usize::MAX, 0);
        assert!(node.ready_links().is_empty());

        // Publishes from 3 reach the subscriber on 2 and the parent; acks wait for the flush.
        node.handle(2, Frame::Subscribe { id: 1, filter, mode: ReplayMode::LiveOnly, credit: 10 }, 0);
        node.drain(1, usize::MAX, 0);
        node.drain(2, usize::MAX, 0);
        for i in 0..3 {
            node.handle(3, Frame::Publish { seq: i, chunk: chunk(TEN + u128::from(i)) }, 0);
        }
        assert_eq!(node.ready_links(), vec![1, 2]);
        node.flush().unwrap();
        assert_eq!(node.ready_links(), vec![1, 2, 3]);
        // Drained in part, a link stays; drained empty, it leaves.
        assert_eq!(node.drain(2, 2, 0).len(), 2);
        assert_eq!(node.ready_links(), vec![1, 2, 3]);
        node.drain(2, usize::MAX, 0);
        node.ready_links_into(&mut into);
        assert_eq!(into, vec![1, 3]);
        // Closed, it leaves too.
        node.link_closed(3);
        assert_eq!(node.ready_links(), vec![1]);
        assert_eq!(node.ready_links(), scan_ready(&node));

        // Clients come and go, publish and are drained, some closing with frames queued: the
        // list stays within twice the links.
        let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
        for link in 10..2000u64 {
            node.accept(link);
            node.handle(link, hello.clone(), 0);
            node.handle(link, Frame::Publish { seq: link, chunk: chunk(TEN + u128::from(link)) }, 0);
            node.flush().unwrap();
            if link % 3 == 0 {
                node.link_closed(link - 1);
            }
            for ready in node.ready_links() {
                if ready != link {
                    node.drain(ready, usize::MAX, 0);
                }
            }
            assert_eq!(node.ready_links(), scan_ready(&node));
            assert!(
                node.dirty.len() <= 2 * node.links.len() + 2,
                "{} listed, {} links",
                node.dirty.len(),
                node.links.len()
            );
        }
    }

    // ----- store requests -----

    /// A node in request mode: an origin with a client publisher on link 2 and a client
    /// subscriber on link 3, hellos drained.
    fn origin_with_store_requests(max_store_requests: usize) -> Node<MemoryStore> {
        let mut config = NodeConfig::new(RelayId(1));
        config.store_requests = true;
        config.max_store_requests = max_store_requests;
        let mut node = Node::new(config, MemoryStore::new(UNLIMITED), false);
        for link in [2, 3] {
            node.accept(link);
            let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
            node.handle(link, hello, 0);
            node.drain(link, usize::MAX, 0);
        }
        node
    }

    fn take_requests(node: &mut Node<MemoryStore>) -> Vec<StoreRequest> {
        let mut out = Vec::new();
        node.take_store_requests(&mut out);
        out
    }

    /// Runs `request` on the node's own store and reports it done.
    fn run(node: &mut Node<MemoryStore>, request: StoreRequest) {
        let reply = request.op.run(node.store_mut());
        node.store_done(request.ticket, reply, 0);
    }

    /// Publishes `name` from link 2 and runs its insert at once.
    fn stored(node: &mut Node<MemoryStore>, seq: u64, name: u128) {
        node.handle(2, Frame::Publish { seq, chunk: chunk(name) }, 0);
        for request in take_requests(node) {
            run(node, request);
        }
    }

    /// Issue 16, part 1: with store requests, a publish is decided when the store answers,
    /// not when it arrives. Nothing is delivered or acknowledged before; the store's answer
    /// decides between new, duplicate and conflict, whatever order the requests run in.
    #[test]
    fn with_store_requests_a_publish_is_finished_by_the_stores_answer() {
        let mut node = origin_with_store_requests(64);
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        node.handle(3, Frame::Subscribe { id: 1, filter, mode: ReplayMode::LiveOnly, credit: 100 }, 0);
        // `ReplayDone` waits for an empty read, which the driver runs once it hears the
        // filter's chunks stored by others.
        let mut interest = Vec::new();
        node.take_interest(&mut interest);
        assert_eq!(interest, vec![(filter, true)]);
        assert_eq!(node.drain(3, usize::MAX, 0), vec![]);
        for request in take_requests(&mut node) {
            assert_eq!(request.op, StoreOp::ScanLast { filter, n: 0, now: 0 });
            run(&mut node, request);
        }
        assert_eq!(node.drain(3, usize::MAX, 0), vec![Frame::ReplayDone { id: 1 }]);

        let other = Chunk::new(Name::new(TEN), u64::MAX, vec![2]).unwrap();
        node.handle(2, Frame::Publish { seq: 1, chunk: chunk(TEN) }, 0);
        node.handle(2, Frame::Publish { seq: 2, chunk: chunk(TEN) }, 0);
        node.handle(2, Frame::Publish { seq: 3, chunk: other }, 0);
        let requests = take_requests(&mut node);
        assert_eq!(requests.len(), 3);
        assert!(requests.iter().all(|r| matches!(r.op, StoreOp::Insert(_))));
        assert_eq!(node.store_requests_pending(), 3);
        node.flush().unwrap();
        assert_eq!(node.drain(3, usize::MAX, 0), vec![], "nothing is delivered before the store answers");
        assert_eq!(node.drain(2, usize::MAX, 0), vec![], "nor acknowledged");

        // The store runs the second request first: that copy is the one stored.
        let mut requests = requests.into_iter();
        let (first, second, third) = (requests.next().unwrap(), requests.next().unwrap(), requests.next().unwrap());
        run(&mut node, second);
        assert_eq!(delivered(&node.drain(3, usize::MAX, 0)), vec![TEN]);
        assert_eq!(node.drain(2, usize::MAX, 0), vec![], "the ack waits for the sync");
        node.flush().unwrap();
        assert_eq!(node.drain(2, usize::MAX, 0), vec![Frame::Ack { seq: 2 }]);
        run(&mut node, third);
        run(&mut node, first);
        node.flush().unwrap();
        let answers = node.drain(2, usize::MAX, 0);
        assert!(matches!(answers[0], Frame::Error { code: ErrorCode::Conflict, about: Some(3), .. }), "{answers:?}");
        assert_eq!(answers[1], Frame::Ack { seq: 1 }, "the duplicate is acknowledged");
        assert_eq!(node.drain(3, usize::MAX, 0), vec![], "and delivered once only");
        let m = node.metrics();
        assert_eq!((m.stored, m.duplicates, m.conflicts), (1, 1, 1));
        assert_eq!(node.store_requests_pending(), 0);
        // A ticket reported twice is ignored.
        node.store_done(StoreTicket(1), StoreReply::Insert(Ok(InsertOutcome::Inserted)), 0);
        assert_eq!(node.metrics().stored, 1);
    }

    /// Issue 16, part 1: a live chunk stored while a page of a replay is being read reaches the
    /// subscriber exactly once, whether the page holds it, stops before it or passes it.
    #[test]
    fn a_live_chunk_racing_a_replay_page_reaches_the_subscriber_once() {
        let mut node = origin_with_store_requests(64);
        for (seq, n) in [(1, 0), (2, 2), (3, 4)] {
            stored(&mut node, seq, TEN + n);
        }
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        node.handle(3, Frame::Subscribe { id: 1, filter, mode: ReplayMode::CachedAndLive, credit: 2 }, 0);
        let page = take_requests(&mut node);
        assert!(
            matches!(&page[..], [StoreRequest { op: StoreOp::Scan { limit: 2, .. }, .. }]),
            "one page, as large as the credit: {page:?}"
        );
        // Stored before the page is read: the page holds TEN+1; TEN+5 lies past it.
        node.handle(2, Frame::Publish { seq: 4, chunk: chunk(TEN + 1) }, 0);
        node.handle(2, Frame::Publish { seq: 5, chunk: chunk(TEN + 5) }, 0);
        for request in take_requests(&mut node) {
            run(&mut node, request);
        }
        assert_eq!(node.drain(3, usize::MAX, 0), vec![], "held while the page is read");
        run(&mut node, page.into_iter().next().unwrap());
        let mut got = delivered(&node.drain(3, usize::MAX, 0));
        assert_eq!(got, vec![TEN, TEN + 1]);

        node.handle(3, Frame::Credit { id: 1, credit: 100 }, 0);
        let page = take_requests(&mut node);
        assert!(matches!(&page[..], [StoreRequest { op: StoreOp::Scan { .. }, .. }]), "{page:?}");
        // Stored after the page is read: the page ends the range, so it goes live.
        node.handle(2, Frame::Publish { seq: 6, chunk: chunk(TEN + 3) }, 0);
        let insert = take_requests(&mut node);
        run(&mut node, page.into_iter().next().unwrap());
        for request in insert {
            run(&mut node, request);
        }
        let frames = node.drain(3, usize::MAX, 0);
        got.extend(delivered(&frames));
        assert!(frames.contains(&Frame::ReplayDone { id: 1 }), "{frames:?}");
        got.sort_unstable();
        assert_eq!(got, (0..=5).map(|n| TEN + n).collect::<Vec<_>>(), "each chunk exactly once");
    }

    /// Issue 16, part 1: `MostRecent` reads its list through the store too; a live chunk stored
    /// meanwhile is sent once, with the list if it is on it, after it otherwise.
    #[test]
    fn a_most_recent_list_read_later_sends_each_chunk_once() {
        let mut node = origin_with_store_requests(64);
        for n in 0..4 {
            stored(&mut node, n + 1, TEN + u128::from(n));
        }
        let filter = Filter::new(Name::new(TEN), 8).unwrap();
        node.handle(3, Frame::Subscribe { id: 1, filter, mode: ReplayMode::MostRecent(2), credit: 100 }, 0);
        let list = take_requests(&mut node);
        assert!(matches!(&list[..], [StoreRequest { op: StoreOp::ScanLast { n: 2, .. }, .. }]), "{list:?}");
        stored(&mut node, 9, TEN + 9);
        assert_eq!(node.drain(3, usize::MAX, 0), vec![], "held while the list is read");
        run(&mut node, list.into_iter().next().unwrap());
        let frames = node.drain(3, usize::MAX, 0);
        assert_eq!(delivered(&frames), vec![TEN + 3, TEN + 9]);
        assert_eq!(frames.last(), Some(&Frame::ReplayDone { id: 1 }));
    }

    /// With store requests, the node stops taking input from downstream links while the
    /// driver holds `max_store_requests` unfinished, so a slow store bounds what waits on it.
    #[test]
    fn unfinished_store_requests_pause_the_input() {
        let mut node = origin_with_store_requests(2);
        node.handle(2, Frame::Publish { seq: 1, chunk: chunk(TEN) }, 0);
        assert!(node.accepts_input(2));
        node.handle(2, Frame::Publish { seq: 2, chunk: chunk(TEN + 1) }, 0);
        assert!(!node.accepts_input(2) && !node.accepts_input(3));
        let first = take_requests(&mut node).into_iter().next().unwrap();
        run(&mut node, first);
        assert!(node.accepts_input(2));
    }

    #[test]
    fn minimal_cover_drops_covered_filters() {
        let f = |s: &str| s.parse::<Filter>().unwrap();
        let mut filters = vec![
            f("0x0a000000000000000000000000000000/8"),
            f("0x0a0b0000000000000000000000000000/16"),
            f("0x0b000000000000000000000000000000/16"),
            f("0x0b000000000000000000000000000000/24"),
            f("0x0c000000000000000000000000000000/128"),
        ];
        filters.sort();
        assert_eq!(
            minimal_cover(filters),
            vec![
                f("0x0a000000000000000000000000000000/8"),
                f("0x0b000000000000000000000000000000/16"),
                f("0x0c000000000000000000000000000000/128"),
            ]
        );
    }
}
