//! The client side of the protocol as a sans-IO state machine: what an endpoint must remember
//! so that its subscriptions survive reconnects, see each chunk once, and never overflow.
//!
//! [`ClientSession`] owns no socket, task or clock. Its driver (the async `canopy-sdk`
//! client, or the deterministic simulator in `framework/tests/sim.rs`) tells it about the
//! connection ([`connected`](ClientSession::connected),
//! [`disconnected`](ClientSession::disconnected)), hands it what the application asks for
//! and the frames the relay sends, and takes back frames to send
//! ([`poll_transmit`](ClientSession::poll_transmit)) and events for the application
//! ([`poll_event`](ClientSession::poll_event)). The same code is therefore exercised by the
//! simulator's thousands of fault schedules and used by every real client.
//!
//! # What it guarantees
//!
//! - **Resubscribe after reconnect.** Every open subscription is sent again on a new
//!   connection with its id: one that finished its replay comes back as `CachedAndLive` (or
//!   `LiveOnly`), so the relay replays what was missed; one still replaying keeps its mode.
//! - **Each name once.** Names delivered on a subscription are remembered until they expire,
//!   so a replay after a reconnect does not repeat them; `ReplayDone` is reported once. (One
//!   connection never repeats a chunk on a subscription, so until a subscription spans a
//!   reconnect its names are only listed, and looked up only after one: see [`Delivered`].)
//! - **Gaps are reported.** A `LiveOnly` subscription that spanned a reconnect may have
//!   missed chunks; it gets a [`SubEvent::Gap`].
//! - **Bounded buffers.** Each subscription has a window of `window` chunks: the relay may
//!   send only as many as the application has room for, and the session grants credit back
//!   (in `Credit` frames, half a window at a time) as the application reports it consumed
//!   them ([`consumed`](ClientSession::consumed)). Chunks handed to the application and not
//!   yet consumed therefore never exceed the window, however fast the relay replays, and a
//!   reader that keeps up is never cut off.

#[cfg(unix)]
pub mod unix;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::wire::{ErrorCode, Frame, ReplayMode};
use crate::{Chunk, Filter, Name};

/// What a subscription yields to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubEvent {
    /// A matching chunk. Each name is delivered at most once per subscription, even across
    /// reconnects.
    Chunk(Chunk),
    /// Every cached chunk the mode asked for has been delivered; live chunks follow (none for
    /// [`ReplayMode::CachedOnly`], whose subscription then ends). Delivered once.
    ReplayDone,
    /// The connection was lost and restored while this `LiveOnly` subscription was open:
    /// chunks published meanwhile may have been missed. (Other modes replay them.)
    Gap,
    /// The subscription ended: refused by the relay (`SubscribeDenied`) or dropped by it for
    /// falling behind (`SlowConsumer`). Nothing follows; subscribing again (`CachedAndLive`
    /// recovers from the cache) is up to the application.
    Error {
        /// Why it ended.
        code: ErrorCode,
        /// Detail from the relay.
        message: String,
    },
}

/// Why a publish did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishFailure {
    /// The relay refused it; its answer is final.
    Refused {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
        /// The chunk's name.
        name: Name,
        /// The chunk's data length.
        len: usize,
    },
    /// The connection ended before the relay answered, or there was none: the outcome is
    /// unknown, and publishing the identical chunk again is safe.
    Disconnected,
}

/// The bit that marks an unacked publish's number on the wire
/// ([`ClientSession::publish_unacked`]); the numbers callers give the session stay below it.
pub const UNACKED_SEQ: u64 = 1 << 63;

/// Something the application should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Publish `seq` was answered (or failed).
    Published {
        /// The publish, as numbered by [`ClientSession::publish`]'s caller.
        seq: u64,
        /// `Ok` on `Ack` (also for an identical re-publish).
        result: Result<(), PublishFailure>,
    },
    /// An event of subscription `id`.
    Sub {
        /// The subscription.
        id: u64,
        /// What happened.
        event: SubEvent,
    },
    /// Subscription `id` has ended: its last event (an error, or the `ReplayDone` of a
    /// `CachedOnly` query) came just before. Nothing more comes for it.
    Ended {
        /// The subscription.
        id: u64,
    },
    /// The relay reported an error about the connection as a whole (it will close it).
    ConnectionError {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// The relay refused publish `seq`, sent without an ack
    /// ([`ClientSession::publish_unacked`]). The session keeps nothing per unacked publish:
    /// `seq` is the number its caller gave it.
    UnackedRefused {
        /// The publish, as numbered by [`ClientSession::publish_unacked`]'s caller.
        seq: u64,
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// Publish `seq`, to be sent without an ack, was not sent: there was no connection.
    UnackedNotSent {
        /// The publish.
        seq: u64,
        /// The chunk's name.
        name: Name,
    },
}

struct Sub {
    filter: Filter,
    mode: ReplayMode,
    window: u32,
    /// Whether a `Subscribe` for it went out on some connection.
    sent: bool,
    replay_done: bool,
    /// Chunks handed to the application and not yet reported consumed.
    buffered: u32,
    /// Credit freed (consumed, or a duplicate dropped) and not yet granted to the relay.
    freed: u32,
    /// Names delivered so far, with their expiry, to drop repeats after a reconnect.
    seen: Delivered,
    prune_at: usize,
}

/// The names delivered on a subscription, each with its expiry: what a replay after a
/// reconnect must not repeat.
///
/// One connection delivers each chunk of a subscription once (the relay holds live chunks
/// at names its replay has yet to pass until the replay passes them, `docs/protocol.md`), so
/// until the subscription is sent again on a new connection nothing can repeat, and names
/// only go on the end of a list. Checking each delivery in a map of every name delivered
/// instead costs a cache miss per delivery once the map outgrows the CPU's caches: the
/// costliest step of handling a delivery (`docs/performance.md`). Once the subscription is
/// sent on a second connection, the list becomes a map, and each delivery is checked.
#[derive(Debug)]
enum Delivered {
    /// In delivery order; nothing has been sent twice yet.
    List(Vec<(Name, u64)>),
    /// Looked up on every delivery.
    Map(HashMap<Name, u64>),
}

impl Delivered {
    /// Records a delivery of `name`: `false` if it was delivered before (a repeat to drop).
    fn insert(&mut self, name: Name, expiry: u64) -> bool {
        match self {
            Delivered::List(list) => {
                list.push((name, expiry));
                true
            }
            Delivered::Map(map) => match map.entry(name) {
                Entry::Occupied(_) => false,
                Entry::Vacant(v) => {
                    v.insert(expiry);
                    true
                }
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            Delivered::List(list) => list.len(),
            Delivered::Map(map) => map.len(),
        }
    }

    /// Forgets the names expired at `now`: their chunks are gone from every cache, so no
    /// replay can bring them again.
    fn prune(&mut self, now: u64) {
        match self {
            Delivered::List(list) => list.retain(|&(_, expiry)| expiry > now),
            Delivered::Map(map) => map.retain(|_, expiry| *expiry > now),
        }
    }

    /// From now on, deliveries may repeat (the subscription goes out on another connection).
    fn look_up_from_now(&mut self) {
        if let Delivered::List(list) = self {
            *self = Delivered::Map(std::mem::take(list).into_iter().collect());
        }
    }
}

impl Sub {
    /// The mode to (re)subscribe with on a fresh connection.
    fn wire_mode(&self) -> ReplayMode {
        match self.mode {
            _ if !self.sent || !self.replay_done => self.mode,
            ReplayMode::LiveOnly => ReplayMode::LiveOnly,
            _ => ReplayMode::CachedAndLive,
        }
    }

    fn prune_seen(&mut self, now: u64) {
        self.seen.prune(now);
        self.prune_at = (self.seen.len() * 2).max(1024);
    }
}

/// The client side of one relay connection, across reconnects. See the [module docs](self).
#[derive(Default)]
pub struct ClientSession {
    subs: BTreeMap<u64, Sub>,
    /// Publishes sent and not yet answered: seq → (name, data length).
    pending: BTreeMap<u64, (Name, usize)>,
    connected: bool,
    out: VecDeque<Frame>,
    events: VecDeque<SessionEvent>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("connected", &self.connected)
            .field("subscriptions", &self.subs.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ClientSession {
    /// A session with no connection and no subscriptions.
    pub fn new() -> Self {
        ClientSession::default()
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Open subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.subs.len()
    }

    /// Publishes waiting for the relay's answer.
    pub fn pending_publishes(&self) -> usize {
        self.pending.len()
    }

    /// A connection is up (the `Hello`s are exchanged) at time `now`: every open subscription
    /// is sent again, and `LiveOnly` ones that were open before get a [`SubEvent::Gap`].
    /// Returns how many subscriptions were sent.
    pub fn connected(&mut self, now: u64) -> usize {
        self.connected = true;
        for (&id, sub) in self.subs.iter_mut() {
            if sub.sent && sub.mode == ReplayMode::LiveOnly {
                self.events.push_back(SessionEvent::Sub { id, event: SubEvent::Gap });
            }
            sub.prune_seen(now);
            if sub.sent {
                sub.seen.look_up_from_now();
            }
            let credit = sub.window.saturating_sub(sub.buffered);
            self.out.push_back(Frame::Subscribe { id, filter: sub.filter, mode: sub.wire_mode(), credit });
            sub.sent = true;
            sub.freed = 0;
        }
        self.subs.len()
    }

    /// The connection is gone: frames not yet sent are dropped, and every publish waiting for
    /// an answer fails with [`PublishFailure::Disconnected`].
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.out.clear();
        for (seq, _) in std::mem::take(&mut self.pending) {
            let result = Err(PublishFailure::Disconnected);
            self.events.push_back(SessionEvent::Published { seq, result });
        }
    }

    /// Publishes `chunk` as `seq` (unique among this session's publish numbers and
    /// subscription ids, so an error's `about` names one of them). Without a connection it
    /// fails at once with [`PublishFailure::Disconnected`].
    pub fn publish(&mut self, seq: u64, chunk: Chunk) {
        if !self.connected {
            let result = Err(PublishFailure::Disconnected);
            self.events.push_back(SessionEvent::Published { seq, result });
            return;
        }
        self.pending.insert(seq, (chunk.name(), chunk.data().len()));
        self.out.push_back(Frame::Publish { seq, chunk });
    }

    /// Publishes `chunk` as `seq` (below [`UNACKED_SEQ`], unique like
    /// [`publish`](Self::publish)'s) without asking for an ack ([`Frame::PublishUnacked`]):
    /// nothing is kept for it, and only a refusal comes back, as
    /// [`SessionEvent::UnackedRefused`]. Delivery is at most once: a chunk in flight when the
    /// connection drops may be lost unseen. Without a connection it is not sent, and
    /// [`SessionEvent::UnackedNotSent`] says so.
    ///
    /// On the wire its number is `seq | UNACKED_SEQ`, so a refusal is told from an error
    /// about a subscription (even one that has ended) without keeping anything per publish.
    pub fn publish_unacked(&mut self, seq: u64, chunk: Chunk) {
        if !self.connected {
            self.events.push_back(SessionEvent::UnackedNotSent { seq, name: chunk.name() });
            return;
        }
        self.out.push_back(Frame::PublishUnacked { seq: seq | UNACKED_SEQ, chunk });
    }

    /// Opens subscription `id` with room for `window` undelivered chunks (at least 1). It is
    /// sent now if connected, else on the next connection.
    pub fn subscribe(&mut self, id: u64, filter: Filter, mode: ReplayMode, window: u32) {
        let window = window.max(1);
        let mut sub = Sub {
            filter,
            mode,
            window,
            sent: false,
            replay_done: false,
            buffered: 0,
            freed: 0,
            seen: Delivered::List(Vec::new()),
            prune_at: 1024,
        };
        if self.connected {
            self.out.push_back(Frame::Subscribe { id, filter, mode, credit: window });
            sub.sent = true;
        }
        self.subs.insert(id, sub);
    }

    /// Closes subscription `id`.
    pub fn unsubscribe(&mut self, id: u64) {
        if let Some(sub) = self.subs.remove(&id)
            && sub.sent
            && self.connected
        {
            self.out.push_back(Frame::Unsubscribe { id });
        }
    }

    /// The application consumed `n` chunks of subscription `id`; their room is granted to
    /// the relay again.
    pub fn consumed(&mut self, id: u64, n: u32) {
        let Some(sub) = self.subs.get_mut(&id) else { return };
        let n = n.min(sub.buffered);
        sub.buffered -= n;
        sub.freed += n;
        self.grant(id);
    }

    /// Chunks handed to the application on subscription `id` and not yet consumed.
    pub fn buffered(&self, id: u64) -> Option<u32> {
        self.subs.get(&id).map(|s| s.buffered)
    }

    /// Sends freed credit once it reaches half the window (fewer, larger `Credit` frames).
    fn grant(&mut self, id: u64) {
        let Some(sub) = self.subs.get_mut(&id) else { return };
        if self.connected && sub.sent && sub.freed >= sub.window.div_ceil(2) {
            let credit = std::mem::take(&mut sub.freed);
            self.out.push_back(Frame::Credit { id, credit });
        }
    }

    /// Handles a frame from the relay at time `now` (unix ms, for forgetting expired names).
    pub fn handle(&mut self, frame: Frame, now: u64) {
        match frame {
            Frame::Ack { seq } if self.pending.remove(&seq).is_some() => {
                self.events.push_back(SessionEvent::Published { seq, result: Ok(()) });
            }
            Frame::Deliver { id, chunk } => {
                let Some(sub) = self.subs.get_mut(&id) else { return };
                if !sub.seen.insert(chunk.name(), chunk.expiry()) {
                    // Delivered before a reconnect: drop it, and give its room back.
                    sub.freed += 1;
                    self.grant(id);
                    return;
                }
                if sub.seen.len() > sub.prune_at {
                    sub.prune_seen(now);
                }
                sub.buffered += 1;
                self.events.push_back(SessionEvent::Sub { id, event: SubEvent::Chunk(chunk) });
            }
            Frame::ReplayDone { id } => {
                let Some(sub) = self.subs.get_mut(&id) else { return };
                if !sub.replay_done {
                    sub.replay_done = true;
                    self.events.push_back(SessionEvent::Sub { id, event: SubEvent::ReplayDone });
                }
                if sub.mode == ReplayMode::CachedOnly {
                    // The relay has closed it.
                    self.subs.remove(&id);
                    self.events.push_back(SessionEvent::Ended { id });
                }
            }
            Frame::Error { code, about: Some(about), message } => {
                if about & UNACKED_SEQ != 0 {
                    // An unacked publish, of which nothing is kept (see `publish_unacked`).
                    let seq = about & !UNACKED_SEQ;
                    self.events.push_back(SessionEvent::UnackedRefused { seq, code, message });
                } else if let Some((name, len)) = self.pending.remove(&about) {
                    let result = Err(PublishFailure::Refused { code, message, name, len });
                    self.events.push_back(SessionEvent::Published { seq: about, result });
                } else if code == ErrorCode::UnknownSubscription {
                    // An unsubscribe crossed the subscription's end on the wire.
                } else if self.subs.remove(&about).is_some() {
                    let event = SubEvent::Error { code, message };
                    self.events.push_back(SessionEvent::Sub { id: about, event });
                    self.events.push_back(SessionEvent::Ended { id: about });
                }
            }
            Frame::Error { code, about: None, message } => {
                self.events.push_back(SessionEvent::ConnectionError { code, message });
            }
            // Nothing else is valid from a relay after the hello; the driver logs it.
            _ => {}
        }
    }

    /// The next frame to send on the connection.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(name: u128) -> Chunk {
        Chunk::new(Name::new(name), u64::MAX, &b"x"[..]).unwrap()
    }

    fn drain(s: &mut ClientSession) -> Vec<Frame> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    #[test]
    fn credit_comes_back_as_the_application_consumes() {
        let mut s = ClientSession::new();
        s.connected(0);
        s.subscribe(1, Filter::ALL, ReplayMode::CachedAndLive, 4);
        assert_eq!(
            drain(&mut s),
            [Frame::Subscribe { id: 1, filter: Filter::ALL, mode: ReplayMode::CachedAndLive, credit: 4 }]
        );
        for n in 0..4 {
            s.handle(Frame::Deliver { id: 1, chunk: chunk(n) }, 0);
        }
        assert_eq!(s.buffered(1), Some(4));
        s.consumed(1, 1);
        assert!(drain(&mut s).is_empty(), "less than half a window is not granted yet");
        s.consumed(1, 1);
        assert_eq!(drain(&mut s), [Frame::Credit { id: 1, credit: 2 }]);
        assert_eq!(s.buffered(1), Some(2));
    }

    /// An unacked publish goes out with `UNACKED_SEQ` set and keeps nothing; a refusal
    /// about it comes back under the caller's number. An error about a subscription that
    /// has ended is not taken for one, whatever its code; without a connection nothing is
    /// sent and the caller hears so.
    #[test]
    fn unacked_publishes_keep_nothing_and_only_their_refusals_come_back() {
        let mut s = ClientSession::new();
        s.publish_unacked(4, chunk(1));
        assert_eq!(s.poll_event(), Some(SessionEvent::UnackedNotSent { seq: 4, name: Name::new(1) }));
        s.connected(0);
        s.subscribe(1, Filter::ALL, ReplayMode::LiveOnly, 4);
        s.publish_unacked(5, chunk(2));
        assert_eq!(
            drain(&mut s)[1..],
            [Frame::PublishUnacked { seq: 5 | UNACKED_SEQ, chunk: chunk(2) }]
        );
        assert_eq!(s.pending_publishes(), 0);
        let error = |code, about| Frame::Error { code, about: Some(about), message: "m".into() };
        s.handle(error(ErrorCode::Conflict, 5 | UNACKED_SEQ), 0);
        assert_eq!(
            s.poll_event(),
            Some(SessionEvent::UnackedRefused { seq: 5, code: ErrorCode::Conflict, message: "m".into() })
        );
        // The subscription ends on its first error; a second one about it is dropped.
        s.handle(error(ErrorCode::Internal, 1), 0);
        assert!(matches!(s.poll_event(), Some(SessionEvent::Sub { id: 1, .. })));
        assert_eq!(s.poll_event(), Some(SessionEvent::Ended { id: 1 }));
        s.handle(error(ErrorCode::Internal, 1), 0);
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn reconnect_resubscribes_with_the_room_left_and_drops_repeats() {
        let mut s = ClientSession::new();
        s.connected(0);
        s.subscribe(1, Filter::ALL, ReplayMode::CachedAndLive, 10);
        s.subscribe(2, Filter::ALL, ReplayMode::LiveOnly, 10);
        drain(&mut s);
        s.handle(Frame::Deliver { id: 1, chunk: chunk(7) }, 0);
        s.handle(Frame::ReplayDone { id: 1 }, 0);
        s.publish(3, chunk(9));
        s.disconnected();
        s.connected(0);
        assert_eq!(
            drain(&mut s),
            [
                Frame::Subscribe { id: 1, filter: Filter::ALL, mode: ReplayMode::CachedAndLive, credit: 9 },
                Frame::Subscribe { id: 2, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 10 },
            ]
        );
        // The replay repeats chunk 7: dropped, and its credit comes back with the next grant.
        s.handle(Frame::Deliver { id: 1, chunk: chunk(7) }, 0);
        s.handle(Frame::ReplayDone { id: 1 }, 0);
        let events: Vec<SessionEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(
            events,
            [
                SessionEvent::Sub { id: 1, event: SubEvent::Chunk(chunk(7)) },
                SessionEvent::Sub { id: 1, event: SubEvent::ReplayDone },
                SessionEvent::Published { seq: 3, result: Err(PublishFailure::Disconnected) },
                SessionEvent::Sub { id: 2, event: SubEvent::Gap },
            ]
        );
    }

    #[test]
    fn a_subscription_first_sent_on_a_later_connection_drops_repeats_once_it_spans_a_reconnect() {
        let mut s = ClientSession::new();
        s.subscribe(1, Filter::ALL, ReplayMode::CachedAndLive, 10);
        s.connected(0);
        drain(&mut s);
        let expiring = Chunk::new(Name::new(8), 50, &b"x"[..]).unwrap();
        s.handle(Frame::Deliver { id: 1, chunk: chunk(7) }, 0);
        s.handle(Frame::Deliver { id: 1, chunk: expiring.clone() }, 0);
        s.handle(Frame::ReplayDone { id: 1 }, 0);
        let first: Vec<SessionEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(first.len(), 3);
        // Two reconnects, the second after chunk 8 expired: 7 is still a repeat on both, 8 is
        // forgotten (a chunk at that name now is a new one), 9 is new and then a repeat.
        for (round, now) in [(0, 10), (1, 60)] {
            s.disconnected();
            s.connected(now);
            drain(&mut s);
            s.handle(Frame::Deliver { id: 1, chunk: chunk(7) }, now);
            s.handle(Frame::Deliver { id: 1, chunk: chunk(9) }, now);
            s.handle(Frame::Deliver { id: 1, chunk: expiring.clone() }, now);
            let events: Vec<SessionEvent> = std::iter::from_fn(|| s.poll_event()).collect();
            let mut want = Vec::new();
            if round == 0 {
                want.push(SessionEvent::Sub { id: 1, event: SubEvent::Chunk(chunk(9)) });
            } else {
                want.push(SessionEvent::Sub { id: 1, event: SubEvent::Chunk(expiring.clone()) });
            }
            assert_eq!(events, want, "round {round}");
        }
    }

    #[test]
    fn errors_go_to_their_publish_or_subscription() {
        let mut s = ClientSession::new();
        s.publish(1, chunk(1));
        assert_eq!(s.poll_event(), Some(SessionEvent::Published { seq: 1, result: Err(PublishFailure::Disconnected) }));
        s.connected(0);
        s.publish(2, chunk(2));
        s.subscribe(3, Filter::ALL, ReplayMode::LiveOnly, 8);
        s.handle(Frame::Error { code: ErrorCode::Conflict, about: Some(2), message: "c".into() }, 0);
        s.handle(Frame::Error { code: ErrorCode::SlowConsumer, about: Some(3), message: "s".into() }, 0);
        let events: Vec<SessionEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        let refused =
            PublishFailure::Refused { code: ErrorCode::Conflict, message: "c".into(), name: Name::new(2), len: 1 };
        assert_eq!(
            events,
            [
                SessionEvent::Published { seq: 2, result: Err(refused) },
                SessionEvent::Sub {
                    id: 3,
                    event: SubEvent::Error { code: ErrorCode::SlowConsumer, message: "s".into() }
                },
                SessionEvent::Ended { id: 3 },
            ]
        );
        assert_eq!(s.subscriptions(), 0);
    }
}
