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

use canopy::node::{Event, LinkId, Node, ParentRefusal};
use canopy::wire::Frame;
use canopy::{Store, StoreStats};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::RelayMetrics;
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
}

/// Starts the actor on its own thread; the returned receiver fires when it has stopped and
/// dropped the node (and so closed the store).
pub(crate) fn spawn<S: Store + 'static>(node: Node<S>, parts: ActorParts) -> anyhow::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    std::thread::Builder::new().name("canopy-node".into()).spawn(move || {
        runtime.block_on(run(node, parts));
        let _ = done_tx.send(());
    })?;
    Ok(done_rx)
}

fn snapshot<S: Store>(node: &Node<S>) -> RelayMetrics {
    let store: StoreStats = node.store().stats();
    RelayMetrics { node: node.metrics(), store, subscriptions: node.subscriptions(), links: node.links(), parent_connected: node.parent_connected() }
}

async fn run<S: Store>(mut node: Node<S>, mut parts: ActorParts) {
    let mut outs: HashMap<LinkId, Arc<dyn Outlet>> = HashMap::new();
    let mut tick = tokio::time::interval(parts.evict_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
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
                        *parts.snapshot.lock().expect("metrics lock") = snapshot(&node);
                        return;
                    }
                }
            }
            msg = parts.inbox.recv() => {
                let Some(msg) = msg else { return };
                let now = now_ms();
                apply(&mut node, &mut outs, msg, now);
                for _ in 1..BATCH {
                    match parts.inbox.try_recv() {
                        Ok(msg) => apply(&mut node, &mut outs, msg, now),
                        Err(_) => break,
                    }
                }
            }
            () = parts.room.notified() => {}
            _ = tick.tick() => {
                if let Err(err) = node.tick(now_ms()) {
                    tracing::warn!(%err, "evicting expired chunks failed");
                }
            }
        }
        // One sync for the whole batch releases every ack waiting on it. On failure the
        // acks stay held and the next turn tries again.
        if let Err(err) = node.flush() {
            tracing::error!(%err, "syncing the store failed; acks are held");
        }
        let now = now_ms();
        while let Some(Event::Close { link, code }) = node.poll_event() {
            let frames = node.drain(link, usize::MAX, now);
            if let Some(out) = outs.remove(&link) {
                out.close(frames, code);
            }
            node.link_closed(link);
        }
        for link in node.ready_links() {
            let Some(out) = outs.get(&link) else { continue };
            let room = out.room();
            if room > 0 {
                out.push(node.drain(link, room, now));
            }
        }
        *parts.snapshot.lock().expect("metrics lock") = snapshot(&node);
    }
}

fn apply<S: Store>(node: &mut Node<S>, outs: &mut HashMap<LinkId, Arc<dyn Outlet>>, msg: ToNode, now: u64) {
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
            for frame in frames {
                node.handle(link, frame, now);
                // A queue filling up mid-turn is handed to its writer now rather than at the
                // end of the turn, which may be tens of thousands of frames away.
                node.take_urgent(&mut urgent);
                for link in urgent.drain(..) {
                    if let Some(out) = outs.get(&link) {
                        let room = out.room();
                        if room > 0 {
                            out.push(node.drain(link, room, now));
                        }
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
}
