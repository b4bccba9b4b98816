//! The node actor: the one task that owns the routing core ([`Node`]) and its store.
//!
//! It runs on a thread of its own (with a single-threaded tokio runtime), so the store's
//! blocking writes and fsyncs never stall the network tasks. The node sits behind a lock:
//! with the memory store, a link reader runs the turn for what it read itself when the node
//! is free ([`Turns`]), which saves a chunk a wake-up of this thread. Each turn it takes a batch of
//! messages from the connection tasks, hands the frames to the node, flushes once (one fsync
//! per batch releases all the acks of the batch), closes links the node asked to close, and
//! moves queued frames into the writers' buffers as far as they have room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canopy::node::{Event, LinkId, Node, ParentRefusal, SyncTicket};
use canopy::wire::Frame;
use canopy::{Store, StoreError, StoreStats, Syncer};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::RelayMetrics;
use crate::frontend::Frontend;
use crate::link::{LinkOut, NORMAL, Outlet};

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
/// How long the node waits for the writers to take frames, while a link is congested,
/// before it stops waiting: a reader that stopped (see [`wait_out_congestion`]). Long enough for a
/// reader on a busy machine: at 2 ms, a reader that kept up was given up on between two
/// writes when three relays and their clients shared two cores.
pub(crate) const CONGESTION_WAIT: Duration = Duration::from_millis(20);
/// The longest the node holds back new input for congested links at a time, however steadily
/// their writers drain: a reader that keeps up on average is carried through a burst, and
/// one slower than its publishers for longer ends as a slow consumer.
pub(crate) const CONGESTION_PAUSE: Duration = Duration::from_millis(100);

/// After a turn that left a link congested (its queue crossed half its bound and its writer
/// had no room for it): holds back new input (the caller reads nothing meanwhile, so the
/// bounded inbox and QUIC or TCP flow control push back on the publishers) while the
/// congested links' writers keep taking frames and some congested link still holds half
/// its bound or more, at most [`CONGESTION_PAUSE`]. `relieve(false)` hands the writers what
/// they have room for and says whether a congested link is still that full;
/// `relieve(true)` gives up on them. When no writer takes anything for [`CONGESTION_WAIT`],
/// the congested link's reader stopped: it is not waited for, and its queue, which stays
/// full and so never crosses half its bound again, ends it as a slow consumer.
///
/// Waiting only until the first frames were taken, as before, let the next turn route up
/// to [`BATCH`] messages into a queue already past half its bound, which ended readers
/// that kept up but drained a burst more slowly than it arrived (`relay/tests/slow_consumer.rs`,
/// pipelined, failed one run in four).
pub(crate) async fn wait_out_congestion(room: &Notify, mut relieve: impl FnMut(bool) -> bool) {
    let give_up = tokio::time::Instant::now() + CONGESTION_PAUSE;
    loop {
        let now = tokio::time::Instant::now();
        if now >= give_up {
            relieve(true);
            return;
        }
        // (A wake-up already stored counts even past the deadline: hence the check above.)
        if tokio::time::timeout_at((now + CONGESTION_WAIT).min(give_up), room.notified()).await.is_err() {
            relieve(true);
            return;
        }
        if !relieve(false) {
            return;
        }
    }
}

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
/// covering everything written before it began. The node's turns hand it tickets; the actor
/// hears back on `done`.
struct SyncThread {
    tickets: std::sync::mpsc::Sender<SyncTicket>,
    in_flight: bool,
}

type SyncDone = mpsc::UnboundedReceiver<(SyncTicket, Result<(), StoreError>)>;

impl SyncThread {
    fn spawn(mut syncer: Box<dyn Syncer>) -> anyhow::Result<(SyncThread, SyncDone)> {
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
        Ok((SyncThread { tickets, in_flight: false }, done))
    }
}

/// Frames a reader's batch holds at most to be a small turn ([`Turns`]): its writers are
/// woken so that the first runs next on the reader's thread ([`Wakes::hand_on`]).
pub(crate) const INLINE_FRAMES: usize = 8;

/// What a turn a link reader ran did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Turn {
    /// A subscriber's queue is filling faster than its writer drains it.
    pub(crate) congested: bool,
    /// Frames the turn handed to writers (deliveries, acks, answers).
    pub(crate) handed: usize,
}

/// Runs a turn of the node for a link reader's frames on the reader's own thread.
///
/// Handing a chunk to the node's thread wakes that thread, and on an idle machine the
/// scheduler puts it on another, idle, CPU, which takes tens of microseconds to wake (a
/// third of a delivery's latency on a 2-vCPU VM, docs/performance.md), and under load the
/// hand-over costs a context switch and a futex wake per batch. A reader routes its batch
/// itself instead while the node is free: the chunk goes from the publisher's socket to the
/// subscriber's writer on one thread. The reader decides which batches ([`Turn::handed`]):
/// chunks that fan out wide go to the node's thread, so their routing overlaps the reading.
pub(crate) trait Turns: Send + Sync {
    /// Runs the turn if the node is free, nothing this link sent earlier waits in the inbox
    /// (so frames stay in order) and no link is congested; otherwise gives the frames back
    /// for the inbox.
    fn try_turn(&self, link: LinkId, out: &LinkOut, frames: Vec<Frame>) -> Result<Turn, Vec<Frame>>;
    /// For [`wait_out_congestion`] after a congested turn; `true` (keep waiting) while the
    /// node's thread holds the node, which hands the writers their frames itself then. A
    /// give-up that finds the node held is left undone: congestion older than
    /// [`CONGESTION_PAUSE`] is dropped by the next turn anyway.
    fn relieve(&self, give_up: bool) -> bool;
}

/// The node and what a turn needs. The actor's thread holds it for its turns; a link reader
/// holds it for an inline turn ([`Turns`]). `None` once the actor has stopped (the node,
/// and so the store, is dropped then).
type Shared<S> = Mutex<Option<Core<S>>>;

/// The outlets a turn handed frames to, to wake once their frames are in.
///
/// Which task runs next, and where, matters on tokio's multi-threaded scheduler: a task
/// woken on a worker thread goes to that worker's one-task "next" slot and pushes the task
/// already there to the run queue, and that wakes an idle worker to steal it, which costs
/// 45–60 µs on the machines measured when its vCPU idles, or preempts the thread that woke
/// it when both CPUs are busy (`docs/performance.md`, "Wake-ups across CPUs").
///
/// So a turn a link reader runs on a worker (inline) holds its wakes and wakes only the
/// first writer it handed frames to (the deliveries come first; the acks follow the sync)
/// if that writer waits for frames: that one runs next on this worker, and wakes the rest
/// once it has taken its frames ([`Outlet::wake_then`]), so a publish answered with one
/// delivery and one ack wakes no other worker at all. Otherwise it wakes them all, the
/// first last, so it still runs next here. The node's own thread is not a worker: its wakes
/// all go to the run queue, in order, and it wakes each batch at once, before the sync, so
/// deliveries never wait for the disk.
#[derive(Default)]
struct Wakes {
    outlets: Vec<Arc<dyn Outlet>>,
    /// Held for [`Wakes::hand_on`] at the end of the turn (an inline turn).
    hold: bool,
    /// Frames handed over since the count was last reset.
    handed: usize,
}

impl Wakes {
    /// Wakes what was handed frames so far, first-first, unless the turn holds its wakes.
    fn now(&mut self) {
        if !self.hold {
            self.outlets.drain(..).for_each(|out| out.wake());
        }
    }

    /// Wakes what was handed frames this turn, the last handed first.
    fn last_first(&mut self) {
        self.outlets.drain(..).rev().for_each(|out| out.wake());
    }

    /// Wakes the first writer handed frames and leaves the rest to it, if it waits for
    /// frames; otherwise wakes them all, the first last.
    fn hand_on(&mut self) {
        let mut outlets = self.outlets.drain(..);
        let Some(first) = outlets.next() else { return };
        let rest: Vec<_> = outlets.collect();
        if rest.is_empty() {
            first.wake();
        } else if let Err(rest) = first.wake_then(rest) {
            rest.iter().rev().for_each(|out| out.wake());
            first.wake();
        }
    }
}

struct Core<S: Store> {
    node: Node<S>,
    outs: HashMap<LinkId, Arc<dyn Outlet>>,
    /// The links with frames waiting, kept between turns for its buffer.
    ready: Vec<LinkId>,
    room: Arc<Notify>,
    snapshot: Arc<Mutex<RelayMetrics>>,
    sync_interval: Option<Duration>,
    /// The outlets this turn handed frames to, to wake.
    wakes: Wakes,
    /// Links whose queue crossed half its bound while their writer had no room for it, not
    /// yet relieved (see [`wait_out_congestion`]).
    congested: Vec<LinkId>,
    /// When `congested` last went from empty to not.
    congested_since: Instant,
    /// With a sync interval: a timed sync is due.
    sync_due: bool,
    /// `None`: sync on this thread (no syncer, or the sync thread died).
    sync: Option<SyncThread>,
}

impl<S: Store + Send + 'static> Turns for Shared<S> {
    fn try_turn(&self, link: LinkId, out: &LinkOut, frames: Vec<Frame>) -> Result<Turn, Vec<Frame>> {
        let Ok(mut guard) = self.try_lock() else { return Err(frames) };
        let Some(core) = guard.as_mut() else { return Err(frames) };
        // While the node waits out congestion, input waits in the inbox (and, once that is
        // full, in the transport), not in the congested queues.
        if out.in_inbox() > 0 || core.is_congested() {
            return Err(frames);
        }
        // A small turn (a paced publish) holds its wakes for `hand_on`; a large one wakes
        // its writers as the node's thread would, so other workers take some of them.
        let small = frames.len() <= INLINE_FRAMES;
        core.wakes.hold = small;
        core.wakes.handed = 0;
        let congested = core.apply(ToNode::Frames { link, frames }, now_ms());
        core.end_turn(None);
        core.wakes.hand_on();
        core.wakes.hold = false;
        Ok(Turn { congested, handed: core.wakes.handed })
    }

    fn relieve(&self, give_up: bool) -> bool {
        let Ok(mut guard) = self.try_lock() else { return !give_up };
        guard.as_mut().is_some_and(|core| core.relieve(give_up))
    }
}

/// Locks the node for the actor's thread.
fn lock<S: Store>(shared: &Shared<S>) -> std::sync::MutexGuard<'_, Option<Core<S>>> {
    shared.lock().expect("node lock")
}

/// [`Core::relieve`] from the node's own thread, which waits for the lock (a reader's
/// [`Turns::relieve`] does not).
fn relieve<S: Store>(shared: &Shared<S>, give_up: bool) -> bool {
    lock(shared).as_mut().is_some_and(|core| core.relieve(give_up))
}

/// Starts the actor on its own thread. With `inline`, link readers may run turns
/// themselves ([`Turns`], returned); only for stores whose writes do not block.
pub(crate) fn spawn<S: Store + Send + 'static>(
    node: Node<S>,
    parts: ActorParts,
    inline: bool,
) -> anyhow::Result<Started> {
    let (done_tx, done_rx) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let (sync, sync_done) = node.store().syncer().map(SyncThread::spawn).transpose()?.unzip();
    // An origin front-end's turns run store requests against Redis: they stay on the actor.
    let inline = inline && parts.frontend.is_none();
    let core = Core {
        node,
        outs: HashMap::new(),
        ready: Vec::new(),
        room: parts.room.clone(),
        snapshot: parts.snapshot.clone(),
        sync_interval: parts.sync_interval,
        wakes: Wakes::default(),
        congested: Vec::new(),
        congested_since: Instant::now(),
        sync_due: false,
        sync,
    };
    let shared: Arc<Shared<S>> = Arc::new(Mutex::new(Some(core)));
    let turns = inline.then(|| shared.clone() as Arc<dyn Turns>);
    std::thread::Builder::new().name("canopy-node".into()).spawn(move || {
        runtime.block_on(run(&shared, parts, sync_done));
        // Drops the node and its store, whoever else holds the lock's `Arc`.
        drop(lock(&shared).take());
        let _ = done_tx.send(());
    })?;
    Ok(Started { done: done_rx, turns })
}

/// A started actor.
pub(crate) struct Started {
    /// Fires when the actor has stopped and dropped the node (and so closed the store).
    pub(crate) done: oneshot::Receiver<()>,
    /// For link readers to run turns themselves; `None` unless asked for.
    pub(crate) turns: Option<Arc<dyn Turns>>,
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

impl<S: Store> Core<S> {
    /// What ends every turn, on whichever thread ran it.
    fn end_turn(&mut self, mut frontend: Option<&mut Frontend>) {
        // Deliveries to clients and to the parent leave before the sync, so they never wait
        // for this relay's disk. Acks wait for it (unless the operator chose a sync
        // interval): one sync for everything written meanwhile releases every ack held on it,
        // so a publisher hears of a publish only once it is durable, and a crash before the
        // sync loses only chunks whose publishers were never acked and so send them again.
        // Chunks published here reach child relays only after the sync too (the node holds
        // them), so no child can hold a chunk this relay lost. On failure the acks stay held
        // and a later sync covers them. The metrics go first, so whoever has seen a delivery
        // sees it counted too.
        let node = &mut self.node;
        if let Some(frontend) = frontend.as_deref_mut() {
            frontend.after_turn(node);
        }
        *self.snapshot.lock().expect("metrics lock") = snapshot(node, frontend.as_deref());
        if let Err(err) = node.release_written() {
            tracing::error!(%err, "writing the store failed; acks are held");
        }
        push_ready(node, &self.outs, &self.room, &mut self.ready, &mut self.wakes);
        self.wakes.now();
        // Sync when publishes wait for their acks, when a timed sync is due, or when a child
        // relay waits for chunks.
        let want = match self.sync_interval {
            None => node.needs_sync(),
            Some(_) => (self.sync_due && node.needs_sync()) || node.child_waits_for_sync(),
        };
        if want {
            self.sync_due = false;
            match &mut self.sync {
                // On the sync thread: at most one at a time, each covering all writes so far.
                Some(thread) if !thread.in_flight => match node.begin_sync() {
                    Ok(Some(ticket)) => {
                        thread.in_flight = true;
                        if thread.tickets.send(ticket).is_err() {
                            tracing::error!("the sync thread is gone; syncing here");
                            self.sync = None;
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
            if let Some(out) = self.outs.remove(&link) {
                out.close(frames, code);
            }
            node.link_closed(link);
        }
        push_ready(node, &self.outs, &self.room, &mut self.ready, &mut self.wakes);
        self.wakes.now();
        *self.snapshot.lock().expect("metrics lock") = snapshot(node, frontend.as_deref());
    }

    /// Hands one message to the node; returns whether a queue crossed half its bound and
    /// its writer could not take all of it (the turn should let writers catch up).
    fn apply(&mut self, msg: ToNode, now: u64) -> bool {
        let was = !self.congested.is_empty();
        let congested = apply(&mut self.node, &mut self.outs, &self.room, &mut self.wakes, &mut self.congested, msg, now);
        if !was && !self.congested.is_empty() {
            self.congested_since = Instant::now();
        }
        congested
    }

    /// Whether a link is congested: input waits until its writer drains it. Congestion
    /// older than [`CONGESTION_PAUSE`] is dropped here, should its waiter have stopped
    /// without giving it up (a reader that ended, or found the node held).
    fn is_congested(&mut self) -> bool {
        if !self.congested.is_empty() && self.congested_since.elapsed() >= CONGESTION_PAUSE {
            self.congested.clear();
        }
        !self.congested.is_empty()
    }

    /// Hands the writers what they have room for now; returns whether a congested link
    /// still holds half its bound or more. With `give_up`, stops waiting for them instead.
    fn relieve(&mut self, give_up: bool) -> bool {
        if give_up {
            self.congested.clear();
            return false;
        }
        push_ready(&mut self.node, &self.outs, &self.room, &mut self.ready, &mut self.wakes);
        self.wakes.now();
        let (node, half) = (&self.node, self.node.config().max_queue.div_ceil(2));
        self.congested.retain(|&link| node.queued(link) >= half);
        !self.congested.is_empty()
    }

    /// [`Core::apply`] for a message taken from the inbox: the link's count of messages
    /// waiting there goes down.
    fn apply_queued(&mut self, msg: ToNode, now: u64) -> bool {
        let link = match &msg {
            ToNode::Frames { link, .. } | ToNode::Accepted { link, .. } | ToNode::ParentConnected { link, .. } => Some(*link),
            _ => None,
        };
        let congested = self.apply(msg, now);
        if let Some(out) = link.and_then(|link| self.outs.get(&link)) {
            out.taken_from_inbox();
        }
        congested
    }
}

async fn run<S: Store>(shared: &Shared<S>, mut parts: ActorParts, mut sync_done: Option<SyncDone>) {
    let mut tick = tokio::time::interval(parts.evict_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // With a sync interval: when the next timed sync is due.
    let mut sync_tick = parts.sync_interval.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    // A queue crossed half its bound this turn and its writer had no room for it.
    let mut congested = false;
    let mut frontend = parts.frontend.take();
    loop {
        // With as many store requests unfinished as the node allows, read no more input until
        // the store catches up: the connections' readers then wait on the bounded inbox, and
        // QUIC flow control pushes back on the publishers.
        let store_full = {
            let guard = lock(shared);
            let node = &guard.as_ref().expect("held until the actor ends").node;
            node.store_requests_pending() >= node.config().max_store_requests
        };
        tokio::select! {
            biased;
            wake = async { frontend.as_mut().expect("guarded").next().await }, if frontend.is_some() => {
                let mut guard = lock(shared);
                let core = guard.as_mut().expect("held until the actor ends");
                frontend.as_mut().expect("guarded").handle(wake, &mut core.node);
            }
            done = async { sync_done.as_mut().expect("guarded").recv().await }, if sync_done.is_some() => {
                let mut guard = lock(shared);
                let core = guard.as_mut().expect("held until the actor ends");
                match done {
                    Some((ticket, result)) => {
                        if let Some(thread) = &mut core.sync {
                            thread.in_flight = false;
                        }
                        match result {
                            Ok(()) => core.node.sync_done(ticket),
                            Err(err) => {
                                tracing::error!(%err, "syncing the store failed; acks are held");
                                core.node.sync_failed(ticket);
                            }
                        }
                    }
                    // The sync thread died: sync here from now on (a sync here covers what it
                    // had in hand too).
                    None => {
                        tracing::error!("the sync thread is gone; syncing on the node's thread");
                        core.sync = None;
                        sync_done = None;
                    }
                }
            }
            changed = parts.stop.changed() => {
                // A dropped handle (no sender left) is a kill.
                let stop = if changed.is_err() { Stop::Kill } else { *parts.stop.borrow() };
                match stop {
                    Stop::Running => continue,
                    Stop::Kill => return,
                    Stop::Graceful => {
                        let mut guard = lock(shared);
                        let core = guard.as_mut().expect("held until the actor ends");
                        if let Err(err) = core.node.flush() {
                            tracing::error!(%err, "final flush failed");
                        }
                        for (link, out) in core.outs.drain() {
                            let frames = core.node.drain(link, usize::MAX, now_ms());
                            out.close(frames, NORMAL);
                        }
                        *parts.snapshot.lock().expect("metrics lock") = snapshot(&core.node, frontend.as_ref());
                        return;
                    }
                }
            }
            msg = parts.inbox.recv(), if !store_full => {
                let Some(msg) = msg else { return };
                // A reader's own turn found a link congested: its writer drains before more
                // is routed into it (the readers send their frames here meanwhile).
                if lock(shared).as_mut().is_some_and(|core| core.is_congested()) {
                    wait_out_congestion(&parts.room, |give_up| relieve(shared, give_up)).await;
                }
                let mut guard = lock(shared);
                let core = guard.as_mut().expect("held until the actor ends");
                let now = now_ms();
                congested = core.apply_queued(msg, now);
                for _ in 1..BATCH {
                    if congested {
                        break;
                    }
                    match parts.inbox.try_recv() {
                        Ok(msg) => congested = core.apply_queued(msg, now),
                        Err(_) => break,
                    }
                }
            }
            () = parts.room.notified() => {}
            _ = tick.tick() => {
                let mut guard = lock(shared);
                let core = guard.as_mut().expect("held until the actor ends");
                if let Err(err) = core.node.tick(now_ms()) {
                    tracing::warn!(%err, "evicting expired chunks failed");
                }
                if let Some(frontend) = &mut frontend {
                    frontend.tick();
                }
            }
            _ = async { sync_tick.as_mut().expect("guarded").tick().await }, if sync_tick.is_some() => {
                lock(shared).as_mut().expect("held until the actor ends").sync_due = true;
            }
        }
        lock(shared).as_mut().expect("held until the actor ends").end_turn(frontend.as_mut());
        // A subscriber's queue is filling faster than its writer drains it: read no more
        // while it drains, so a burst arriving faster than a reader's path carries it pushes
        // back on the publishers instead of ending a reader that keeps up.
        if std::mem::take(&mut congested) {
            wait_out_congestion(&parts.room, |give_up| relieve(shared, give_up)).await;
        }
    }
}

/// Hands each link with frames waiting as many as its outlet has room for.
fn push_ready<S: Store>(node: &mut Node<S>, outs: &HashMap<LinkId, Arc<dyn Outlet>>, room: &Notify, ready: &mut Vec<LinkId>, wakes: &mut Wakes) {
    let now = now_ms();
    node.ready_links_into(ready);
    for &link in ready.iter() {
        if let Some(out) = outs.get(&link) {
            hand_over(node, link, out, room, now, wakes);
        }
    }
}

/// Moves as many of `link`'s queued frames into its outlet as it has room for (the outlet
/// goes on `wakes`); if some are left, the outlet notifies `room` once it has room again.
/// Returns whether some are left.
fn hand_over<S: Store>(node: &mut Node<S>, link: LinkId, out: &Arc<dyn Outlet>, room: &Notify, now: u64, wakes: &mut Wakes) -> bool {
    let space = out.room();
    if space > 0 {
        let frames = node.drain(link, space, now);
        wakes.handed += frames.len();
        // (A link handed frames twice in a row, say a hello's answer and then an ack, is
        // woken once.)
        if out.queue(frames) && !wakes.outlets.last().is_some_and(|last| std::ptr::addr_eq(Arc::as_ptr(last), Arc::as_ptr(out))) {
            wakes.outlets.push(out.clone());
        }
    }
    let left = node.queued(link) > 0;
    if left {
        out.wait_for_room(room);
    }
    left
}

/// Hands one message to the node; returns whether a queue crossed half its bound and its
/// writer could not take all of it (the turn should let writers catch up).
fn apply<S: Store>(
    node: &mut Node<S>,
    outs: &mut HashMap<LinkId, Arc<dyn Outlet>>,
    room: &Notify,
    wakes: &mut Wakes,
    congested_links: &mut Vec<LinkId>,
    msg: ToNode,
    now: u64,
) -> bool {
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
                    if let Some(out) = outs.get(&link)
                        && hand_over(node, link, out, room, now, wakes)
                    {
                        congested = true;
                        congested_links.push(link);
                    }
                }
                // Those writers are to drain now, inline turn or not.
                wakes.last_first();
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
        fn queue(&self, frames: Vec<Frame>) -> bool {
            frames.into_iter().for_each(|f| drop(self.0.send(f)));
            false
        }
        fn wake(&self) {}
        fn close(&self, frames: Vec<Frame>, _: ErrorCode) {
            self.queue(frames);
        }
    }

    /// An outlet that logs its wakes by name, and takes the writers left to it while `idle`.
    struct Probe {
        name: &'static str,
        idle: bool,
        log: Arc<Mutex<Vec<&'static str>>>,
        then: Mutex<Vec<Arc<dyn Outlet>>>,
    }

    impl Outlet for Probe {
        fn room(&self) -> usize {
            1024
        }
        fn queue(&self, _: Vec<Frame>) -> bool {
            true
        }
        fn wake(&self) {
            self.log.lock().unwrap().push(self.name);
        }
        fn wake_then(&self, next: Vec<Arc<dyn Outlet>>) -> Result<(), Vec<Arc<dyn Outlet>>> {
            if !self.idle {
                return Err(next);
            }
            self.then.lock().unwrap().extend(next);
            self.wake();
            Ok(())
        }
        fn close(&self, _: Vec<Frame>, _: ErrorCode) {}
    }

    #[tokio::test(start_paused = true)]
    async fn congestion_holds_input_while_writers_drain_and_not_for_a_stalled_one() {
        use tokio::time::Instant;
        // Relieved at the first frames a writer takes: one look, and done.
        let room = Notify::new();
        room.notify_one();
        let mut looks = Vec::new();
        wait_out_congestion(&room, |give_up| {
            looks.push(give_up);
            false
        })
        .await;
        assert_eq!(looks, [false]);

        // Writers keep taking frames but a queue stays over half its bound: input is held,
        // but for no longer than CONGESTION_PAUSE.
        let room = Arc::new(Notify::new());
        let writer = tokio::spawn({
            let room = room.clone();
            async move {
                loop {
                    tokio::time::sleep(CONGESTION_WAIT / 4).await;
                    room.notify_one();
                }
            }
        });
        let start = Instant::now();
        let mut looks = 0;
        wait_out_congestion(&room, |give_up| {
            looks += 1;
            !give_up
        })
        .await;
        writer.abort();
        assert_eq!(start.elapsed(), CONGESTION_PAUSE);
        assert!(looks > 10, "waited through many writes: {looks}");

        // A writer that takes nothing: given up on (`relieve(true)`) after CONGESTION_WAIT.
        let room = Notify::new();
        let start = Instant::now();
        let mut looks = Vec::new();
        wait_out_congestion(&room, |give_up| {
            looks.push(give_up);
            true
        })
        .await;
        assert_eq!((looks, start.elapsed()), (vec![true], CONGESTION_WAIT));
    }

    #[test]
    fn an_inline_turn_wakes_one_waiting_writer_and_leaves_the_rest_to_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let probe = |name, idle| Arc::new(Probe { name, idle, log: log.clone(), then: Mutex::new(Vec::new()) });
        let woken = || std::mem::take(&mut *log.lock().unwrap());
        let mut wakes = Wakes { hold: true, ..Wakes::default() };

        // The delivery's writer waits for frames: only it is woken, and it holds the ack's.
        let (delivery, ack) = (probe("delivery", true), probe("ack", false));
        wakes.outlets = vec![delivery.clone(), ack.clone()];
        wakes.now();
        assert_eq!(woken(), Vec::<&str>::new(), "an inline turn holds its wakes to the end");
        wakes.hand_on();
        assert_eq!(woken(), ["delivery"]);
        assert_eq!(delivery.then.lock().unwrap().len(), 1);

        // The first writer is busy: all are woken, the first last (so it runs next here).
        let (busy, a, b) = (probe("busy", false), probe("a", true), probe("b", true));
        wakes.outlets = vec![busy, a, b];
        wakes.hand_on();
        assert_eq!(woken(), ["b", "a", "busy"]);

        // One writer: woken, nothing left to it.
        wakes.outlets = vec![probe("one", true)];
        wakes.hand_on();
        assert_eq!(woken(), ["one"]);

        // The node's own thread wakes at once, in order.
        wakes.hold = false;
        wakes.outlets = vec![probe("x", true), probe("y", true)];
        wakes.now();
        assert_eq!(woken(), ["x", "y"]);
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
    fn a_reader_routes_its_frames_itself_only_while_none_of_its_earlier_ones_wait_in_the_inbox() {
        let node = Node::new(NodeConfig::new(RelayId(1)), MemoryStore::new(UNLIMITED), false);
        let core = Core {
            node,
            outs: HashMap::new(),
            ready: Vec::new(),
            room: Arc::new(Notify::new()),
            snapshot: Arc::new(Mutex::new(RelayMetrics::default())),
            sync_interval: None,
            wakes: Wakes::default(),
            congested: Vec::new(),
            congested_since: Instant::now(),
            sync_due: false,
            sync: None,
        };
        let shared: Shared<MemoryStore> = Mutex::new(Some(core));
        let hello = || Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None };
        let now = now_ms();
        // A subscriber, through the inbox as the actor's thread would take it.
        let (sub_tx, sub) = std_mpsc::channel();
        {
            let mut guard = lock(&shared);
            let core = guard.as_mut().unwrap();
            core.apply_queued(ToNode::Accepted { link: 1, out: Arc::new(Tap(sub_tx)) }, now);
            let subscribe = Frame::Subscribe { id: 7, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 100 };
            core.apply_queued(ToNode::Frames { link: 1, frames: vec![hello(), subscribe] }, now);
            core.end_turn(None);
        }
        next(&sub, "hello", |f| matches!(f, Frame::Hello { .. }));

        // The publisher's link is in the inbox, not yet known to the node: its reader may not
        // pass it.
        let publisher = LinkOut::new();
        publisher.sent_to_inbox();
        let chunk = |n: u128| Chunk::new(Name::new(n), now + 60_000, b"hot".to_vec()).unwrap();
        let refused = shared.try_turn(2, &publisher, vec![hello()]).expect_err("the link's Accepted waits in the inbox");
        assert_eq!(refused.len(), 1, "the frames come back whole");
        lock(&shared).as_mut().unwrap().apply_queued(ToNode::Accepted { link: 2, out: publisher.clone() }, now);
        assert_eq!(publisher.in_inbox(), 0);

        // Now it routes on its own thread: the subscriber's outlet has the chunk and the
        // publisher's writer its hello and ack, with no actor running.
        let room = publisher.room();
        let turn = shared.try_turn(2, &publisher, vec![hello(), Frame::Publish { seq: 1, chunk: chunk(42) }]);
        assert_eq!(turn, Ok(Turn { congested: false, handed: 3 }), "the delivery, the hello and the ack");
        let delivered = next(&sub, "delivery", |f| matches!(f, Frame::Deliver { .. }));
        assert!(matches!(delivered, Frame::Deliver { id: 7, chunk: c } if c == chunk(42)));
        assert_eq!(publisher.room(), room - 2, "hello and ack queued for the publisher's writer");

        // A batch of its in the inbox again: later frames wait behind it.
        publisher.sent_to_inbox();
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 3, chunk: chunk(44) }]).is_err());
        lock(&shared).as_mut().unwrap().apply_queued(ToNode::Frames { link: 2, frames: vec![Frame::Publish { seq: 2, chunk: chunk(43) }] }, now);
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 3, chunk: chunk(44) }]).is_ok());
        lock(&shared).as_mut().unwrap().end_turn(None);
        for name in [43, 44] {
            let delivered = next(&sub, "delivery", |f| matches!(f, Frame::Deliver { .. }));
            assert!(matches!(delivered, Frame::Deliver { chunk: c, .. } if c == chunk(name)), "in order");
        }

        // While the node waits out a congested link, frames go back (to wait in the inbox);
        // once it gives up on it, they are routed here again.
        let congest = |since: Instant| {
            let mut guard = lock(&shared);
            let core = guard.as_mut().unwrap();
            core.congested.push(1);
            core.congested_since = since;
        };
        congest(Instant::now());
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 4, chunk: chunk(45) }]).is_err());
        assert!(!shared.relieve(true), "given up on");
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 4, chunk: chunk(45) }]).is_ok());
        // Congestion nobody gave up on (its waiter ended) lapses after CONGESTION_PAUSE.
        congest(Instant::now() - CONGESTION_PAUSE);
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 5, chunk: chunk(46) }]).is_ok());

        // While the actor's thread holds the node, and once it has stopped, frames go back.
        let guard = lock(&shared);
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 6, chunk: chunk(47) }]).is_err());
        drop(guard);
        *lock(&shared) = None;
        assert!(shared.try_turn(2, &publisher, vec![Frame::Publish { seq: 6, chunk: chunk(47) }]).is_err());
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
        let done = spawn(node, parts, false).unwrap().done;

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
