//! The routing-core harness: builds a [`Node`] from the input and drives it through an
//! arbitrary sequence of link events and frames on a few links, checking after every step
//! that it stays within its bounds. A panic anywhere is a failure.
//!
//! Shared by the `node` fuzz target (`framework/fuzz/fuzz_targets/node.rs`) and the
//! regression test that replays `framework/fuzz/regressions/node/` on stable
//! (`framework/tests/fuzz_regressions.rs`), both of which include this file with `#[path]`.
//!
//! The harness plays a well-behaved driver and an arbitrary, possibly hostile, set of peers:
//!
//! - link ids are never reused (each of the four slots gets a fresh id when it connects);
//! - at most one parent link at a time, and only when the node is configured with a parent;
//! - frames read from a downstream link are handed over only while [`Node::accepts_input`]
//!   says so (the relay stops reading such a link);
//! - no frame is handed over from a link the node has asked to close ([`Event::Close`]), which
//!   the harness drains and closes when it chooses;
//! - it flushes at least once every [`FLUSH_EVERY`] frames handed over, as the relay flushes
//!   once per turn (acks wait for the flush, so they pile up until it);
//! - the clock mostly moves forward, sometimes jitters back (the node must take the latest).
//!
//! Frames are built structurally, from small spaces of names, ids and sequence numbers so that
//! duplicates, conflicts, resubscriptions and stale ids are common.

use arbitrary::{Result, Unstructured};
use canopy::access::{Access, Grant};
use canopy::node::{Event, LinkId, Node, NodeConfig};
use canopy::store::UNLIMITED;
use canopy::wire::{ErrorCode, Frame, PROTOCOL_VERSION, RelayId, ReplayMode, Role};
use canopy::{Chunk, Filter, MAX_CHUNK_DATA, MemoryStore, Name};

/// Slots for links; each connection in a slot gets a new id.
const SLOTS: usize = 4;
/// Most operations one input runs (keeps an execution short).
const MAX_OPS: usize = 512;
/// Most frames handed to the node between two flushes. The relay flushes once per turn; the
/// simulator's transport windows are at most 48 frames. The queue bound's 64 frames of slack
/// cover the acks released by one flush.
const FLUSH_EVERY: usize = 48;
/// This node's relay id.
const SELF_ID: RelayId = RelayId(1);

/// Runs one input. Panics if the node panics or breaks a bound.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    // Running out of input just ends the run.
    let _ = Harness::new(&mut u).and_then(|mut h| h.run(&mut u));
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Downstream,
    Parent,
}

struct Slot {
    link: LinkId,
    side: Side,
    /// The node asked to close it; nothing more is read from it.
    closing: bool,
}

struct Harness {
    node: Node<MemoryStore>,
    config: NodeConfig,
    has_parent: bool,
    slots: [Option<Slot>; SLOTS],
    next_link: LinkId,
    now: u64,
    /// Frames handed over since the last flush.
    unflushed: usize,
}

impl Harness {
    fn new(u: &mut Unstructured<'_>) -> Result<Self> {
        let mut config = NodeConfig::new(SELF_ID);
        config.max_queue = u.int_in_range(1..=16)?;
        config.max_backlog = u.int_in_range(1..=16)?;
        config.upstream_credit = u.int_in_range(1..=16)?;
        config.outbox_window = u.int_in_range(1..=8)?;
        config.max_most_recent = u.int_in_range(0..=8)?;
        if u.ratio(1, 4)? {
            // Token "all" may do everything, token "ten" only under 0x0a/8.
            let ten = Filter::new(Name::new(0x0a << 120), 8).expect("valid");
            config.access = Access::with_rules([
                ("all".to_owned(), Grant::all()),
                ("ten".to_owned(), Grant { publish: vec![ten], subscribe: vec![ten] }),
            ]);
        }
        if u.ratio(1, 3)? {
            config.parent_token = Some("up".to_owned());
        }
        let capacity = if u.ratio(1, 4)? { u.int_in_range(64..=4096)? } else { UNLIMITED };
        let has_parent = u.arbitrary()?;
        let node = Node::new(config.clone(), MemoryStore::new(capacity), has_parent);
        Ok(Harness { node, config, has_parent, slots: Default::default(), next_link: 1, now: 1_000, unflushed: 0 })
    }

    fn run(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        for _ in 0..MAX_OPS {
            if u.is_empty() {
                break;
            }
            self.step(u)?;
            self.note_closes();
            self.check_bounds();
        }
        Ok(())
    }

    /// The time for the next call: mostly later, sometimes a little earlier.
    fn clock(&mut self, u: &mut Unstructured<'_>) -> Result<u64> {
        Ok(match u.int_in_range(0..=9u8)? {
            0 => self.now.saturating_sub(u.int_in_range(1..=50)?),
            1 => {
                self.now += u.int_in_range(100..=100_000)?;
                self.now
            }
            _ => {
                self.now += u.int_in_range(0..=20)?;
                self.now
            }
        })
    }

    fn step(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let slot = u.choose_index(SLOTS)?;
        match u.int_in_range(0..=15u8)? {
            0 => {
                if self.slots[slot].is_none() {
                    let link = self.fresh_link();
                    self.node.accept(link);
                    self.slots[slot] = Some(Slot { link, side: Side::Downstream, closing: false });
                }
            }
            1 => {
                let parent_open = self.slots.iter().flatten().any(|s| s.side == Side::Parent);
                if self.has_parent && !parent_open && self.slots[slot].is_none() {
                    let link = self.fresh_link();
                    self.node.connect_parent(link);
                    self.slots[slot] = Some(Slot { link, side: Side::Parent, closing: false });
                }
            }
            2 => {
                if let Some(s) = self.slots[slot].take() {
                    self.node.link_closed(s.link);
                }
            }
            3 | 4 => {
                if let Some(s) = &self.slots[slot] {
                    let link = s.link;
                    let max = if u.ratio(1, 4)? { usize::MAX } else { u.int_in_range(0..=8)? };
                    let now = self.clock(u)?;
                    let frames = self.node.drain(link, max, now);
                    assert!(frames.len() <= max);
                }
            }
            5 => self.flush(),
            6 => {
                let now = self.clock(u)?;
                self.node.tick(now).expect("memory stores evict");
            }
            7 => self.close_closing(),
            8 => {
                // What the relay does when a queue fills mid-turn: drain it right away.
                let mut urgent = Vec::new();
                self.node.take_urgent(&mut urgent);
                let now = self.now;
                for link in urgent {
                    let n = u.int_in_range(0..=8)?;
                    self.node.drain(link, n, now);
                }
            }
            _ => {
                let Some(s) = self.slots[slot].as_ref().filter(|s| !s.closing) else { return Ok(()) };
                let (link, side) = (s.link, s.side);
                // The driver does not read a downstream link whose queue is full.
                if side == Side::Downstream && !self.node.accepts_input(link) {
                    return Ok(());
                }
                let frame = self.frame(u, side)?;
                let now = self.clock(u)?;
                self.node.handle(link, frame, now);
                self.unflushed += 1;
                if self.unflushed >= FLUSH_EVERY {
                    self.flush();
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        self.node.flush().expect("memory stores sync");
        self.unflushed = 0;
    }

    fn fresh_link(&mut self) -> LinkId {
        let link = self.next_link;
        self.next_link += 1;
        link
    }

    /// Stops reading every link the node asked to close.
    fn note_closes(&mut self) {
        while let Some(Event::Close { link, .. }) = self.node.poll_event() {
            for slot in self.slots.iter_mut().flatten() {
                if slot.link == link {
                    slot.closing = true;
                }
            }
        }
    }

    /// Does what the relay does with each link it was asked to close: sends what is queued,
    /// then closes it.
    fn close_closing(&mut self) {
        for slot in &mut self.slots {
            if let Some(s) = slot.take_if(|s| s.closing) {
                self.node.drain(s.link, usize::MAX, self.now);
                self.node.link_closed(s.link);
            }
        }
    }

    fn check_bounds(&self) {
        let cfg = &self.config;
        let upstream_filters = self.node.upstream_filters().len();
        for link in self.node.link_ids() {
            let usage = self.node.link_usage(link).expect("listed");
            assert!(usage.deliveries <= cfg.max_queue, "link {link}: {usage:?}, max_queue {}", cfg.max_queue);
            assert!(usage.max_backlog <= cfg.max_backlog, "link {link}: {usage:?}, max_backlog {}", cfg.max_backlog);
            assert_eq!(usage.queued, self.node.queued(link));
            let bound = 2 * cfg.max_queue + 64 + cfg.outbox_window + 2 * upstream_filters;
            assert!(usage.queued <= bound, "link {link}: {usage:?} > {bound} frames queued");
        }
    }

    fn frame(&self, u: &mut Unstructured<'_>, side: Side) -> Result<Frame> {
        // Mostly what the peer on this side sends; sometimes anything at all.
        let tag = match (side, u.ratio(7, 8)?) {
            (Side::Downstream, true) => *u.choose(&[0, 1, 1, 1, 2, 3, 3, 3, 8, 8, 9])?,
            (Side::Parent, true) => *u.choose(&[0, 4, 5, 5, 5, 6, 7])?,
            (_, false) => u.int_in_range(0..=9)?,
        };
        Ok(match tag {
            0 => Frame::Hello {
                version: if u.ratio(15, 16)? { PROTOCOL_VERSION } else { u.arbitrary()? },
                role: if u.arbitrary()? { Role::Relay } else { Role::Client },
                relay_path: {
                    let len = u.int_in_range(0..=3)?;
                    (0..len).map(|_| Ok(RelayId(u.int_in_range(0..=4)?))).collect::<Result<_>>()?
                },
                token: match u.int_in_range(0..=3u8)? {
                    0 => None,
                    1 => Some("all".to_owned()),
                    2 => Some("ten".to_owned()),
                    _ => Some("nobody".to_owned()),
                },
            },
            1 => Frame::Subscribe { id: small_id(u)?, filter: filter(u)?, mode: mode(u)?, credit: credit(u)? },
            2 => Frame::Unsubscribe { id: small_id(u)? },
            3 => Frame::Publish { seq: small_id(u)?, chunk: self.chunk(u)? },
            4 => Frame::Ack { seq: upstream_seq(u)? },
            5 => Frame::Deliver { id: upstream_seq(u)?, chunk: self.chunk(u)? },
            6 => Frame::ReplayDone { id: upstream_seq(u)? },
            7 => Frame::Error {
                code: *u.choose(&[
                    ErrorCode::Malformed,
                    ErrorCode::Conflict,
                    ErrorCode::Expired,
                    ErrorCode::PublishDenied,
                    ErrorCode::SubscribeDenied,
                    ErrorCode::SlowConsumer,
                    ErrorCode::Cycle,
                    ErrorCode::UnknownSubscription,
                    ErrorCode::Internal,
                    ErrorCode::StoreFull,
                    ErrorCode::Other(99),
                ])?,
                about: if u.ratio(1, 8)? { None } else { Some(upstream_seq(u)?) },
                message: String::new(),
            },
            8 => Frame::Credit { id: small_id(u)?, credit: credit(u)? },
            _ => Frame::PublishUnacked { seq: small_id(u)?, chunk: self.chunk(u)? },
        })
    }

    fn chunk(&self, u: &mut Unstructured<'_>) -> Result<Chunk> {
        let name = name(u)?;
        let expiry = match u.int_in_range(0..=7u8)? {
            0 => self.now.saturating_sub(u.int_in_range(0..=10)?),
            1 => u64::MAX,
            2 | 3 => self.now + u.int_in_range(1..=100)?,
            _ => 10_000_000,
        };
        // A tiny alphabet, so that identical re-publishes and conflicts are both common;
        // sometimes large, so that a small store fills up.
        let data: Vec<u8> = match u.int_in_range(0..=7u8)? {
            0 => vec![7; u.int_in_range(0..=MAX_CHUNK_DATA)?],
            n => vec![n % 2; usize::from(n % 3)],
        };
        Ok(Chunk::new(name, expiry, data).expect("at most MAX_CHUNK_DATA"))
    }
}

/// A name from a small space: four top bytes × four tails (including `Name::MAX`).
fn name(u: &mut Unstructured<'_>) -> Result<Name> {
    let top: u128 = *u.choose(&[0x00, 0x0a, 0x0b, 0xff])?;
    let tail: u128 = *u.choose(&[0, 1, 2, (1 << 120) - 1])?;
    Ok(Name::new(top << 120 | tail))
}

fn filter(u: &mut Unstructured<'_>) -> Result<Filter> {
    let len = *u.choose(&[0, 1, 4, 8, 9, 120, 127, 128])?;
    Ok(Filter::new(name(u)?, len).expect("len <= 128"))
}

fn mode(u: &mut Unstructured<'_>) -> Result<ReplayMode> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => ReplayMode::CachedAndLive,
        1 => ReplayMode::LiveOnly,
        2 => ReplayMode::CachedOnly,
        _ => ReplayMode::MostRecent(if u.ratio(1, 8)? { u32::MAX } else { u.int_in_range(0..=10)? }),
    })
}

fn credit(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(if u.ratio(1, 8)? { u32::MAX } else { u.int_in_range(0..=8)? })
}

/// A subscription id or publish seq chosen by a downstream peer.
fn small_id(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(1, 16)? { Ok(u64::MAX) } else { u.int_in_range(0..=4) }
}

/// An upstream subscription id or publish seq (the node numbers both from 1 upwards).
fn upstream_seq(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(1, 16)? { Ok(u64::MAX) } else { u.int_in_range(0..=63) }
}
