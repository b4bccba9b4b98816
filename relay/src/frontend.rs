//! The origin front-end's side of the node actor: its store is a Redis Cluster shared with the
//! origin's other front-ends (`store = "redis://…"`, `docs/origin.md`).
//!
//! The node runs with [`NodeConfig::store_requests`](canopy::node::NodeConfig::store_requests):
//! it hands over its inserts and replay reads as requests, and the filters its live
//! subscriptions need. [`Frontend`] runs them on the cluster one batch at a time, each batch in
//! this order:
//!
//! 1. subscribe the live feed to the buckets newly needed (and unsubscribe those no longer
//!    needed), and wait for the cluster to confirm: a front-end subscribes before it reads;
//! 2. every insert, as one pipelined `insert_batch` (the insert script also publishes a newly
//!    stored chunk on its bucket's channel, atomically);
//! 3. the reads, concurrently;
//! 4. a fence through the feed, if there were reads: their results reach the node only after
//!    every live message that arrived before them. A chunk another front-end stored before a
//!    read ran is then in the read and has been seen live too, and the node settles the two
//!    (`Node::take_store_requests`): each subscriber gets it once.
//!
//! Chunks other front-ends store arrive on the feed and go to the node
//! ([`Node::stored_elsewhere`]); its own inserts it hears of from their replies. A lost
//! connection to the cluster is a gap in the feed: every live subscription is ended with
//! `SlowConsumer`, from which subscribers recover through the cache ([`Node::live_gap`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use canopy::node::{Node, StoreOp, StoreReply, StoreRequest, StoreTicket};
use canopy::{Filter, Store, StoreError};
use canopy_redis::{ClusterView, LiveEvent, LiveFeed, RedisStore, RedisStoreError};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::actor::now_ms;

/// How long read results wait for their fence before the actor gives up on it: then they are
/// applied anyway and the live subscriptions are ended, as after any gap in the feed.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a front-end sweeps the cluster's expired index entries. A sweep reads every
/// bucket; the records themselves expire in Redis on time, and reads skip expired chunks, so
/// this only bounds how long dead index entries linger.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How often a front-end asks the cluster for its view (`INFO` on every primary, for the
/// `canopy_cluster_*` metrics): at most this often, on the actor's eviction tick.
const CLUSTER_VIEW_EVERY: Duration = Duration::from_secs(1);

/// Live messages handled at most per turn of the actor, besides the ones that woke it.
const FEED_PER_TURN: usize = 4096;

/// The results of one batch of store requests.
type Replies = Vec<(StoreTicket, StoreReply)>;

/// What one batch did.
pub(crate) struct Done {
    replies: Replies,
    /// The fence sent after the batch's reads, if it had any and sending it worked.
    fence: Option<u64>,
    /// Buckets the feed is now subscribed to, and those it left.
    subscribed: Vec<u32>,
    unsubscribed: Vec<u32>,
    /// Why live chunks may have been missed (subscribing failed, or the fence could not be
    /// sent after the reads).
    gap: Option<&'static str>,
    /// Some insert or read failed.
    failed: bool,
}

/// What woke the actor for the front-end.
pub(crate) enum Wake {
    /// A batch is done.
    Done(Done),
    /// The live feed said something (`None`: it is gone).
    Feed(Option<LiveEvent>),
    /// Read results waited too long for their fence.
    FenceTimeout,
}

/// Counters of a front-end, besides the node's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontendMetrics {
    /// Batches of store requests run on the cluster.
    pub batches: u64,
    /// Store requests run (inserts and reads).
    pub requests: u64,
    /// Batches whose inserts or reads failed.
    pub failed_batches: u64,
    /// Buckets the live feed is subscribed to.
    pub buckets_subscribed: u64,
    /// Gaps in the live feed (lost connections, failed subscriptions, fences that never
    /// came).
    pub feed_gaps: u64,
    /// Live messages that did not decode (skipped).
    pub malformed: u64,
    /// The cluster's totals as its primaries last reported them (`None` until the first
    /// answer): the same for every front-end of the cluster, taken every
    /// [`CLUSTER_VIEW_EVERY`] and read on the next eviction tick.
    pub cluster: Option<ClusterView>,
    /// Times asking the cluster for its view failed (the last view is kept).
    pub cluster_view_failures: u64,
}

/// The state of an origin front-end's shared store, driven by the node actor.
pub(crate) struct Frontend {
    store: RedisStore,
    feed: Option<LiveFeed>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// A batch is running (or its results wait for their fence).
    in_flight: bool,
    /// Results waiting for the fence numbered so, and until when.
    held: Option<(u64, Replies, Instant)>,
    /// The highest fence the feed has given back.
    fences_seen: u64,
    next_fence: u64,
    /// How many live filters need each bucket.
    refs: HashMap<u32, usize>,
    /// Buckets the feed is subscribed to (confirmed).
    subscribed: HashSet<u32>,
    /// Buckets whose need changed since the last batch began.
    changed: HashSet<u32>,
    requests: Vec<StoreRequest>,
    interest: Vec<(Filter, bool)>,
    /// Sweeps of the expired index entries, every [`SWEEP_EVERY`].
    sweep: Periodic<()>,
    /// Asking the cluster for its view, every [`CLUSTER_VIEW_EVERY`].
    view: Periodic<Result<ClusterView, RedisStoreError>>,
    metrics: FrontendMetrics,
}

/// A background job the front-end runs now and then on the cluster (the sweep, the cluster's
/// view): one run at a time, started at most every `every`.
struct Periodic<T> {
    every: Duration,
    /// When the last run began.
    started: Option<Instant>,
    task: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Periodic<T> {
    fn new(every: Duration) -> Self {
        Periodic { every, started: None, task: None }
    }

    /// What the last run returned, once it has ended (given once; `None` for a run that
    /// panicked).
    fn finished(&mut self) -> Option<T> {
        if !self.task.as_ref()?.is_finished() {
            return None;
        }
        self.task.take()?.now_or_never()?.ok()
    }

    /// Starts `job` unless a run is still going or the last one began less than `every` ago.
    fn start_if_due<F: Future<Output = T> + Send + 'static>(&mut self, job: impl FnOnce() -> F) {
        let running = self.task.as_ref().is_some_and(|task| !task.is_finished());
        if running || self.started.is_some_and(|at| at.elapsed() < self.every) {
            return;
        }
        self.started = Some(Instant::now());
        self.task = Some(tokio::spawn(job()));
    }
}

impl Frontend {
    pub(crate) fn new(store: RedisStore, feed: LiveFeed) -> Frontend {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Frontend {
            store,
            feed: Some(feed),
            done_tx,
            done_rx,
            in_flight: false,
            held: None,
            fences_seen: 0,
            next_fence: 1,
            refs: HashMap::new(),
            subscribed: HashSet::new(),
            changed: HashSet::new(),
            requests: Vec::new(),
            interest: Vec::new(),
            sweep: Periodic::new(SWEEP_EVERY),
            view: Periodic::new(CLUSTER_VIEW_EVERY),
            metrics: FrontendMetrics::default(),
        }
    }

    pub(crate) fn metrics(&self) -> FrontendMetrics {
        FrontendMetrics { buckets_subscribed: self.subscribed.len() as u64, ..self.metrics }
    }

    /// Waits for the next thing the front-end must handle.
    pub(crate) async fn next(&mut self) -> Wake {
        let deadline = self.held.as_ref().map(|(_, _, until)| *until);
        let waiting_batch = self.in_flight && self.held.is_none();
        // Fairness, not order, decides here: read results wait for their fence anyway.
        tokio::select! {
            event = async { self.feed.as_mut().expect("guarded").recv().await }, if self.feed.is_some() => Wake::Feed(event),
            Some(done) = self.done_rx.recv(), if waiting_batch => Wake::Done(done),
            () = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => Wake::FenceTimeout,
        }
    }

    /// Handles what [`next`](Self::next) returned.
    pub(crate) fn handle<S: Store>(&mut self, wake: Wake, node: &mut Node<S>) {
        match wake {
            Wake::Done(done) => {
                for bucket in done.subscribed {
                    self.subscribed.insert(bucket);
                }
                for bucket in &done.unsubscribed {
                    self.subscribed.remove(bucket);
                }
                if let Some(why) = done.gap {
                    self.gap(node, why);
                }
                if done.failed {
                    self.metrics.failed_batches += 1;
                }
                match done.fence {
                    Some(fence) if fence > self.fences_seen => {
                        self.held = Some((fence, done.replies, Instant::now() + FENCE_TIMEOUT));
                    }
                    _ => self.apply(done.replies, node),
                }
            }
            Wake::Feed(Some(LiveEvent::Chunk(chunk))) => node.stored_elsewhere(&chunk, now_ms()),
            Wake::Feed(Some(LiveEvent::Fence(fence))) => {
                self.fences_seen = self.fences_seen.max(fence);
                if self.held.as_ref().is_some_and(|(waiting, _, _)| *waiting <= self.fences_seen) {
                    let (_, replies, _) = self.held.take().expect("checked");
                    self.apply(replies, node);
                }
            }
            Wake::Feed(Some(LiveEvent::Disconnected)) => self.gap(node, "a connection to the cluster was lost"),
            Wake::Feed(Some(LiveEvent::Malformed(what))) => {
                self.metrics.malformed += 1;
                tracing::warn!(%what, "skipped a malformed message on the cluster's live feed");
            }
            Wake::Feed(None) => {
                self.feed = None;
                self.gap(node, "the live feed ended");
            }
            Wake::FenceTimeout => {
                if let Some((_, replies, _)) = self.held.take() {
                    self.gap(node, "a fence did not come back through the live feed in time");
                    self.apply(replies, node);
                }
            }
        }
    }

    fn gap<S: Store>(&mut self, node: &mut Node<S>, why: &str) {
        self.metrics.feed_gaps += 1;
        tracing::warn!(why, "gap in the cluster's live feed: ending live subscriptions so they recover from the cache");
        node.live_gap();
    }

    fn apply<S: Store>(&mut self, replies: Replies, node: &mut Node<S>) {
        self.in_flight = false;
        let now = now_ms();
        for (ticket, reply) in replies {
            node.store_done(ticket, reply, now);
        }
    }

    /// After a turn of the actor: handles what the feed and the running batch have ready (so
    /// that neither waits while the actor is busy with its links), takes the node's changes of
    /// interest and its store requests and, unless a batch is running, starts the next one.
    pub(crate) fn after_turn<S: Store>(&mut self, node: &mut Node<S>) {
        for _ in 0..FEED_PER_TURN {
            let Some(event) = self.feed.as_mut().and_then(LiveFeed::try_recv) else { break };
            self.handle(Wake::Feed(Some(event)), node);
        }
        if self.in_flight
            && self.held.is_none()
            && let Ok(done) = self.done_rx.try_recv()
        {
            self.handle(Wake::Done(done), node);
        }
        node.take_interest(&mut self.interest);
        for (filter, added) in self.interest.drain(..) {
            for bucket in self.store.buckets_of(filter) {
                if added {
                    *self.refs.entry(bucket).or_insert(0) += 1;
                } else if let Some(count) = self.refs.get_mut(&bucket) {
                    *count -= 1;
                    if *count == 0 {
                        self.refs.remove(&bucket);
                    }
                }
                self.changed.insert(bucket);
            }
        }
        if self.in_flight {
            return;
        }
        node.take_store_requests(&mut self.requests);
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        for bucket in self.changed.drain() {
            match (self.refs.contains_key(&bucket), self.subscribed.contains(&bucket)) {
                (true, false) => subscribe.push(bucket),
                (false, true) => unsubscribe.push(bucket),
                _ => {}
            }
        }
        if self.requests.is_empty() && subscribe.is_empty() && unsubscribe.is_empty() {
            return;
        }
        self.in_flight = true;
        self.metrics.batches += 1;
        self.metrics.requests += self.requests.len() as u64;
        let fence = self.next_fence;
        self.next_fence += 1;
        let batch = Batch { subscribe, unsubscribe, requests: std::mem::take(&mut self.requests), fence };
        tokio::spawn(run(self.store.clone(), batch, self.done_tx.clone()));
    }

    /// On the actor's eviction tick: takes the cluster's view the last request brought and
    /// asks again (at most every [`CLUSTER_VIEW_EVERY`]), and sweeps the cluster's expired
    /// index entries (Redis drops the records itself) every [`SWEEP_EVERY`]; one of each at a
    /// time.
    pub(crate) fn tick(&mut self) {
        match self.view.finished() {
            Some(Ok(view)) => self.metrics.cluster = Some(view),
            Some(Err(err)) => {
                self.metrics.cluster_view_failures += 1;
                tracing::debug!(%err, "asking the Redis Cluster for its view failed");
            }
            None => {}
        }
        let store = self.store.clone();
        self.view.start_if_due(|| async move { store.cluster_view().await });
        let store = self.store.clone();
        self.sweep.start_if_due(|| async move {
            if let Err(err) = store.sweep_expired(now_ms()).await {
                tracing::warn!(%err, "sweeping expired chunks from the Redis store failed");
            }
        });
    }
}

/// One batch of work for the cluster.
struct Batch {
    subscribe: Vec<u32>,
    unsubscribe: Vec<u32>,
    requests: Vec<StoreRequest>,
    fence: u64,
}

/// Runs one batch (see the module docs for the order) and sends back what it did.
async fn run(store: RedisStore, batch: Batch, done: mpsc::UnboundedSender<Done>) {
    let Batch { subscribe, unsubscribe, requests, fence } = batch;
    let mut gap = None;
    let mut failed = false;
    if let Err(err) = store.subscribe_buckets(&subscribe).await {
        tracing::warn!(%err, buckets = subscribe.len(), "subscribing the live feed failed");
        gap = Some("subscribing the live feed to a bucket failed");
    }
    if let Err(err) = store.unsubscribe_buckets(&unsubscribe).await {
        tracing::warn!(%err, "unsubscribing the live feed failed");
    }
    let (inserts, reads): (Vec<StoreRequest>, Vec<StoreRequest>) =
        requests.into_iter().partition(|r| matches!(r.op, StoreOp::Insert(_)));
    let mut replies: Replies = Vec::with_capacity(inserts.len() + reads.len());
    if !inserts.is_empty() {
        let chunks: Vec<canopy::Chunk> = inserts
            .iter()
            .map(|r| match &r.op {
                StoreOp::Insert(chunk) => chunk.clone(),
                _ => unreachable!("partitioned"),
            })
            .collect();
        match store.insert_batch(&chunks).await {
            Ok(outcomes) => {
                replies.extend(inserts.iter().zip(outcomes).map(|(r, outcome)| (r.ticket, StoreReply::Insert(Ok(outcome)))));
            }
            // Not one of them is acknowledged: their publishers retry, and a retry of a chunk
            // that was written after all comes back a duplicate, which is acknowledged.
            Err(err) => {
                failed = true;
                tracing::warn!(%err, chunks = chunks.len(), "inserting into the Redis store failed");
                let message = err.to_string();
                replies.extend(
                    inserts.iter().map(|r| (r.ticket, StoreReply::Insert(Err(StoreError::Backend(message.clone()))))),
                );
            }
        }
    }
    let had_reads = !reads.is_empty();
    let reads: Vec<_> = reads
        .into_iter()
        .map(|request| {
            let store = store.clone();
            async move {
                let found = match request.op {
                    StoreOp::Scan { first, last, limit, now } => store.scan_range(first, last, limit, now).await,
                    StoreOp::ScanLast { filter, n, now } => store.scan_last(filter, n, now).await,
                    StoreOp::Insert(_) => unreachable!("partitioned"),
                };
                (request.ticket, StoreReply::Chunks(found.map_err(|err| StoreError::Backend(err.to_string()))))
            }
        })
        .collect();
    let found = futures_util::future::join_all(reads).await;
    failed |= found.iter().any(|(_, reply)| matches!(reply, StoreReply::Chunks(Err(_))));
    replies.extend(found);
    let fence = if had_reads {
        match store.fence(fence).await {
            Ok(()) => Some(fence),
            Err(err) => {
                tracing::warn!(%err, "sending a fence through the live feed failed");
                gap = gap.or(Some("a fence could not be sent after a read"));
                None
            }
        }
    } else {
        None
    };
    let subscribed = if gap.is_some() { Vec::new() } else { subscribe };
    let _ = done.send(Done { replies, fence, subscribed, unsubscribed: unsubscribe, gap, failed });
}
