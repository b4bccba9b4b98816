//! The node actor: the one task that owns the routing core ([`Node`]) and its store.
//!
//! It runs on a thread of its own (with a single-threaded tokio runtime), so the store's
//! blocking writes and fsyncs never stall the network tasks. Each turn it takes a batch of
//! messages from the connection tasks, hands the frames to the node, flushes once (one fsync
//! per batch releases all the acks of the batch), closes links the node asked to close, and
//! moves queued frames into the writers' buffers as far as they have room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy::node::{Event, LinkId, Node, ParentRefusal, SyncTicket};
use canopy::wire::Frame;
use canopy::{Store, StoreError, StoreStats, Syncer};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::RelayMetrics;
use crate::frontend::Frontend;
use crate::link::{NORMAL, Outlet};

/// Messages the connection tasks send the node actor.
pub(crate) enum ToNode {
    /// A downstream connection opened its control stream.
    Accepted { link: LinkId, out: Arc<dyn Outlet> },
    /// The parent connection opened its control stream.
    ParentConnected { link: LinkId, out: Arc<dyn Outlet> },
    /// Frames read on a link, in order.
    Frames { link: LinkId, frames: Vec<Frame> },
    /// The link is gone.
    Closed { link: LinkId },
    /// The parent link (already `Closed`) has ended: was it refused? Sent after `Closed`, so
    /// the node has seen every frame of the link.
    ParentEnded { link: LinkId, reply: oneshot::Sender<Option<ParentRefusal>> },
}

/// How the relay is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Running,
    /// Flush, close every link, stop.
    Graceful,
    /// Stop now: no flush, no goodbyes (what a crash looks like to the store).
    Kill,
}

/// Messages taken per turn at most, so writers get served under a flood.
const BATCH: usize = 512;
/// How long a turn that left a filling queue with a full writer waits for that writer.
const CONGESTION_WAIT: Duration = Duration::from_millis(2);

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What the actor needs besides the node.
pub(crate) struct ActorParts {
    pub inbox: mpsc::Receiver<ToNode>,
    pub room: Arc<Notify>,
    pub stop: watch::Receiver<Stop>,
    pub snapshot: Arc<Mutex<RelayMetrics>>,
    pub evict_interval: Duration,
    /// `Some(interval)`: publishes are acknowledged once written (the node is configured
    /// with `ack_before_sync`) and the store is synced at least this often. `None`: every
    /// turn's publishes are synced, and acknowledged after.
    pub sync_interval: Option<Duration>,
    /// The Redis Cluster an origin front-end keeps its chunks in: the node (configured with
    /// `store_requests`) hands its inserts and reads over as requests, run there in batches
    /// (see [`crate::frontend`]).
    pub frontend: Option<Frontend>,
}

/// The store's syncs, run on a thread of their own (group commit): one at a time, each
/// covering everything written before it began.
struct SyncThread {
    tickets: std::sync::mpsc::Sender<SyncTicket>,
    done: mpsc::UnboundedReceiver<(SyncTicket, Result<(), StoreError>)>,
    in_flight: bool,
}

impl SyncThread {
    fn spawn(mut syncer: Box<dyn Syncer>) -> anyhow::Result<SyncThread> {
        let (tickets, rx) = std::sync::mpsc::channel::<SyncTicket>();
        let (done_tx, done) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("canopy-sync".into()).spawn(move || {
            // Ends when the actor drops its sender (the relay stopped) or stops listening.
            while let Ok(ticket) = rx.recv() {
                if done_tx.send((ticket, syncer.sync())).is_err() {
                    return;
                }
            }
        })?;
        Ok(SyncThread { tickets, done, in_flight: false })
    }
}

/// Starts the actor on its own thread; the returned receiver fires when it has stopped and
/// dropped the node (and so closed the store).
pub(crate) fn spawn<S: Store + 'static>(node: Node<S>, parts: ActorParts) -> anyhow::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let sync = node.store().syncer().map(SyncThread::spawn).transpose()?;
    std::thread::Builder::new().name("canopy-node".into()).spawn(move || {
        runtime.block_on(run(node, parts, sync));
        let _ = done_tx.send(());
    })?;
    Ok(done_rx)
}

fn snapshot<S: Store>(node: &Node<S>, frontend: Option<&Frontend>) -> RelayMetrics {
    let store: StoreStats = node.store().stats();
    RelayMetrics {
        node: node.metrics(),
        store,
        subscriptions: node.subscriptions(),
        links: node.links(),
        parent_connected: node.parent_connected(),
        frontend: frontend.map(Frontend::metrics),
    }
}

async fn run<S: Store>(mut node: Node<S>, mut parts: ActorParts, mut sync: Option<SyncThread>) {
    let mut outs: HashMap<LinkId, Arc<dyn Outlet>> = HashMap::new();
    let mut tick = tokio::time::interval(parts.evict_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // With a sync interval: when the next timed sync is due.
    let mut sync_tick = parts.sync_interval.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut sync_due = false;
    // The links with frames waiting, kept between turns for its buffer.
    let mut ready = Vec::new();
    // A queue crossed half its bound this turn and its writer had no room for it.
    let mut congested = false;
    let mut frontend = parts.frontend.take();
    let max_requests = node.config().max_store_requests;
    loop {
        // With as many store requests unfinished as the node allows, read no more input until
        // the store catches up: the connections' readers then wait on the bounded inbox, and
        // QUIC flow control pushes back on the publishers.
        let store_full = node.store_requests_pending() >= max_requests;
        tokio::select! {
            biased;
            wake = async { frontend.as_mut().expect("guarded").next().await }, if frontend.is_some() => {
                frontend.as_mut().expect("guarded").handle(wake, &mut node);
            }
            done = async { sync.as_mut().expect("guarded").done.recv().await }, if sync.is_some() => match done {
                Some((ticket, result)) => {
                    sync.as_mut().expect("guarded").in_flight = false;
                    match result {
                        Ok(()) => node.sync_done(ticket),
                        Err(err) => {
                            tracing::error!(%err, "syncing the store failed; acks are held");
                            node.sync_failed(ticket);
                        }
                    }
                }
                // The sync thread died: sync here from now on (a sync here covers what it had
                // in hand too).
                None => {
                    tracing::error!("the sync thread is gone; syncing on the node's thread");
                    sync = None;
                }
            },
            changed = parts.stop.changed() => {
                // A dropped handle (no sender left) is a kill.
                let stop = if changed.is_err() { Stop::Kill } else { *parts.stop.borrow() };
                match stop {
                    Stop::Running => continue,
                    Stop::Kill => return,
                    Stop::Graceful => {
                        if let Err(err) = node.flush() {
                            tracing::error!(%err, "final flush failed");
                        }
                        for (link, out) in outs.drain() {
                            let frames = node.drain(link, usize::MAX, now_ms());
                            out.close(frames, NORMAL);
                        }
                        *parts.snapshot.lock().expect("metrics lock") = snapshot(&node, frontend.as_ref());
                        return;
                    }
                }
            }
            msg = parts.inbox.recv(), if !store_full => {
                let Some(msg) = msg else { return };
                let now = now_ms();
                congested = apply(&mut node, &mut outs, msg, now);
                for _ in 1..BATCH {
                    if congested {
                        break;
                    }
                    match parts.inbox.try_recv() {
                        Ok(msg) => congested = apply(&mut node, &mut outs, msg, now),
                        Err(_) => break,
                    }
                }
            }
            () = parts.room.notified() => {}
            _ = tick.tick() => {
                if let Err(err) = node.tick(now_ms()) {
                    tracing::warn!(%err, "evicting expired chunks failed");
                }
                if let Some(frontend) = &mut frontend {
                    frontend.tick();
                }
            }
            _ = async { sync_tick.as_mut().expect("guarded").tick().await }, if sync_tick.is_some() => sync_due = true,
        }
        // Deliveries to clients and to the parent leave before the sync, so they never wait
        // for this relay's disk. Acks wait for it (unless the operator chose a sync
        // interval): one sync for everything written meanwhile releases every ack held on it,
        // so a publisher hears of a publish only once it is durable, and a crash before the
        // sync loses only chunks whose publishers were never acked and so send them again.
        // Chunks published here reach child relays only after the sync too (the node holds
        // them), so no child can hold a chunk this relay lost. On failure the acks stay held
        // and a later sync covers them. The metrics go first, so whoever has seen a delivery
        // sees it counted too.
        if let Some(frontend) = &mut frontend {
            frontend.after_turn(&mut node);
        }
        *parts.snapshot.lock().expect("metrics lock") = snapshot(&node, frontend.as_ref());
        if let Err(err) = node.release_written() {
            tracing::error!(%err, "writing the store failed; acks are held");
        }
        push_ready(&mut node, &outs, &mut ready);
        // Sync when publishes wait for their acks, when a timed sync is due, or when a child
        // relay waits for chunks.
        let want = match parts.sync_interval {
            None => node.needs_sync(),
            Some(_) => (sync_due && node.needs_sync()) || node.child_waits_for_sync(),
        };
        if want {
            sync_due = false;
            match &mut sync {
                // On the sync thread: at most one at a time, each covering all writes so far.
                Some(thread) if !thread.in_flight => match node.begin_sync() {
                    Ok(Some(ticket)) => {
                        thread.in_flight = true;
                        if thread.tickets.send(ticket).is_err() {
                            tracing::error!("the sync thread is gone; syncing here");
                            sync = None;
                            node.sync_failed(ticket);
                        }
                    }
                    Ok(None) => {}
                    Err(err) => tracing::error!(%err, "readying the store for a sync failed"),
                },
                Some(_) => {}
                None => {
                    if let Err(err) = node.flush() {
                        tracing::error!(%err, "syncing the store failed; acks are held");
                    }
                }
            }
        }
        let now = now_ms();
        while let Some(Event::Close { link, code }) = node.poll_event() {
            let frames = node.drain(link, usize::MAX, now);
            if let Some(out) = outs.remove(&link) {
                out.close(frames, code);
            }
            node.link_closed(link);
        }
        push_ready(&mut node, &outs, &mut ready);
        *parts.snapshot.lock().expect("metrics lock") = snapshot(&node, frontend.as_ref());
        // A subscriber's queue is filling faster than its writer drains it: give the writer a
        // moment (until it takes frames, at most `CONGESTION_WAIT`) before reading more, so a
        // burst arriving faster than a reader's path carries it pushes back on the publishers
        // (through the bounded inbox and QUIC flow control) instead of ending a reader that
        // keeps up. A reader that stopped is not waited for again: its queue stays full and
        // never crosses half its bound a second time, so it ends as a slow consumer.
        if std::mem::take(&mut congested) {
            let _ = tokio::time::timeout(CONGESTION_WAIT, parts.room.notified()).await;
        }
    }
}

/// Hands each link with frames waiting as many as its outlet has room for.
fn push_ready<S: Store>(node: &mut Node<S>, outs: &HashMap<LinkId, Arc<dyn Outlet>>, ready: &mut Vec<LinkId>) {
    let now = now_ms();
    node.ready_links_into(ready);
    for &link in ready.iter() {
        let Some(out) = outs.get(&link) else { continue };
        let room = out.room();
        if room > 0 {
            out.push(node.drain(link, room, now));
        }
    }
}

/// Hands one message to the node; returns whether a queue crossed half its bound and its
/// writer could not take all of it (the turn should let writers catch up).
fn apply<S: Store>(node: &mut Node<S>, outs: &mut HashMap<LinkId, Arc<dyn Outlet>>, msg: ToNode, now: u64) -> bool {
    let mut congested = false;
    match msg {
        ToNode::Accepted { link, out } => {
            node.accept(link);
            outs.insert(link, out);
        }
        ToNode::ParentConnected { link, out } => {
            tracing::info!(link, "connected to the parent");
            node.connect_parent(link);
            outs.insert(link, out);
        }
        ToNode::Frames { link, frames } => {
            let mut urgent = Vec::new();
            // A run of chunks is matched against the subscriptions in one batched lookup.
            let mut frames = std::collections::VecDeque::from(frames);
            while !frames.is_empty() {
                node.handle_batch(link, &mut frames, now);
                // A queue filling up mid-turn is handed to its writer now rather than at the
                // end of the turn, which may be tens of thousands of frames away.
                node.take_urgent(&mut urgent);
                for link in urgent.drain(..) {
                    if let Some(out) = outs.get(&link) {
                        let room = out.room();
                        if room > 0 {
                            out.push(node.drain(link, room, now));
                        }
                        congested |= node.queued(link) > 0;
                    }
                }
            }
        }
        ToNode::Closed { link } => {
            if let Some(out) = outs.remove(&link) {
                out.close(Vec::new(), NORMAL);
            }
            node.link_closed(link);
        }
        ToNode::ParentEnded { link, reply } => {
            let _ = reply.send(node.take_parent_refusal(link));
        }
    }
    congested
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;
    use std::sync::mpsc as std_mpsc;

    use canopy::node::NodeConfig;
    use canopy::store::UNLIMITED;
    use canopy::wire::{ErrorCode, PROTOCOL_VERSION, RelayId, ReplayMode, Role};
    use canopy::{Chunk, Filter, InsertOutcome, MemoryStore, Name, StoreError};

    use super::*;

    /// A memory store whose `sync` reports that it started, then waits for the test's go.
    struct GatedSync {
        inner: MemoryStore,
        started: std_mpsc::Sender<()>,
        go: std_mpsc::Receiver<()>,
    }

    impl Store for GatedSync {
        fn insert(&mut self, chunk: &Chunk) -> Result<InsertOutcome, StoreError> {
            self.inner.insert(chunk)
        }
        fn get(&self, name: Name) -> Result<Option<Chunk>, StoreError> {
            self.inner.get(name)
        }
        fn scan_range(&self, first: Name, last: Name, now_ms: u64, f: &mut dyn FnMut(Chunk) -> ControlFlow<()>) -> Result<(), StoreError> {
            self.inner.scan_range(first, last, now_ms, f)
        }
        fn scan_last(&self, filter: Filter, n: usize, now_ms: u64) -> Result<Vec<Chunk>, StoreError> {
            self.inner.scan_last(filter, n, now_ms)
        }
        fn evict_expired(&mut self, now_ms: u64) -> Result<u64, StoreError> {
            self.inner.evict_expired(now_ms)
        }
        fn sync(&mut self) -> Result<(), StoreError> {
            let _ = self.started.send(());
            let _ = self.go.recv();
            self.inner.sync()
        }
        fn stats(&self) -> StoreStats {
            self.inner.stats()
        }
        fn outbox_push(&mut self, name: Name) -> Result<(), StoreError> {
            self.inner.outbox_push(name)
        }
        fn outbox_remove(&mut self, name: Name) -> Result<bool, StoreError> {
            self.inner.outbox_remove(name)
        }
        fn outbox_pending(&self, limit: usize) -> Result<Vec<Name>, StoreError> {
            self.inner.outbox_pending(limit)
        }
    }

    /// An outlet that hands every frame to the test.
    struct Tap(std_mpsc::Sender<Frame>);

    impl Outlet for Tap {
        fn room(&self) -> usize {
            1024
        }
        fn push(&self, frames: Vec<Frame>) {
            frames.into_iter().for_each(|f| drop(self.0.send(f)));
        }
        fn close(&self, frames: Vec<Frame>, _: ErrorCode) {
            self.push(frames);
        }
    }

    fn next(rx: &std_mpsc::Receiver<Frame>, what: &str, mut want: impl FnMut(&Frame) -> bool) -> Frame {
        loop {
            let frame = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no {what}"));
            if want(&frame) {
                return frame;
            }
        }
    }

    #[test]
    fn subscribers_get_a_chunk_while_its_sync_is_still_running_and_the_ack_waits_for_it() {
        let (started_tx, started) = std_mpsc::channel();
        let (go, go_rx) = std_mpsc::channel();
        let store = GatedSync { inner: MemoryStore::new(UNLIMITED), started: started_tx, go: go_rx };
        let node = Node::new(NodeConfig::new(RelayId(1)), store, false);
        let (inbox_tx, inbox) = mpsc::channel(64);
        let (stop_tx, stop) = watch::channel(Stop::Running);
        let parts = ActorParts {
            inbox,
            room: Arc::new(Notify::new()),
            stop,
            snapshot: Arc::new(Mutex::new(RelayMetrics::default())),
            evict_interval: Duration::from_secs(3600),
            sync_interval: None,
            frontend: None,
        };
        let done = spawn(node, parts).unwrap();

        let hello = || Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
        let (sub_tx, sub) = std_mpsc::channel();
        let (pub_tx, publisher) = std_mpsc::channel();
        let send = |msg| inbox_tx.blocking_send(msg).unwrap();
        send(ToNode::Accepted { link: 1, out: Arc::new(Tap(sub_tx)) });
        send(ToNode::Frames { link: 1, frames: vec![hello(), Frame::Subscribe { id: 7, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 100 }] });
        next(&sub, "hello", |f| matches!(f, Frame::Hello { .. }));
        send(ToNode::Accepted { link: 2, out: Arc::new(Tap(pub_tx)) });
        let chunk = Chunk::new(Name::new(42), now_ms() + 60_000, b"hot".to_vec()).unwrap();
        send(ToNode::Frames { link: 2, frames: vec![hello(), Frame::Publish { seq: 1, chunk: chunk.clone() }] });

        // The sync has started and is held: the subscriber has the chunk already, the
        // publisher has no ack yet.
        started.recv_timeout(Duration::from_secs(10)).expect("the publish is synced");
        let delivered = next(&sub, "delivery", |f| matches!(f, Frame::Deliver { .. }));
        assert!(matches!(delivered, Frame::Deliver { id: 7, chunk: c } if c == chunk));
        next(&publisher, "hello", |f| matches!(f, Frame::Hello { .. }));
        assert!(publisher.recv_timeout(Duration::from_millis(100)).is_err(), "no ack before the sync ends");
        go.send(()).unwrap();
        assert!(matches!(next(&publisher, "ack", |_| true), Frame::Ack { seq: 1 }));

        stop_tx.send(Stop::Kill).unwrap();
        drop(inbox_tx);
        done.blocking_recv().unwrap();
    }
}
