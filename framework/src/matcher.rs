//! Subscription matching: which subscribers want a chunk with this name?
//!
//! [`SubscriptionTable`] maps filters to values (subscription ids, link ids, …) and, given a
//! name, visits the value of **every** filter covering it — not only the longest, as an IP
//! router would. It is the relay's hot path: every chunk that passes through a relay is matched
//! once against the subscriptions of all its links.
//!
//! # How it works
//!
//! A multibit trie with a stride of 8 bits, in the style of BART (Balanced Routing Table): a
//! node at depth `d` decides bits `8d..8d+8` of a name. Each node holds:
//!
//! - `prefixes` — the filters that end inside this node (prefix lengths `8d..8d+7`) as a
//!   255-bit set, numbered in pre-order of their binary tree (`0` is the empty prefix, `1..=127`
//!   those starting with a 0 bit, …). For each of the 256 possible next octets a precomputed
//!   mask holds the positions of all prefixes that contain it, so **one AND yields every
//!   covering filter in the node**. Their values share one array in position order, so the
//!   covering filters' values sit in a few neighbouring cache lines.
//! - `children` — which next octets lead to a leaf and which to a child node: a short sorted
//!   list inside the node's own cache line, or bitmaps for the few nodes with many children.
//!
//! Leaves and child nodes live in exactly-sized arrays indexed by rank, so sparse nodes stay
//! small. Paths are compressed: a filter that is alone below a node is stored as a leaf holding
//! its full key, and a node is only created when two filters share a longer path. A lookup of a
//! name under a long filter therefore touches a few hot upper nodes and about one cold node
//! plus its leaf — two dependent cache misses — instead of one node per 8 bits.
//!
//! [`SubscriptionTable::for_each_match_batch`] walks several names at once, one level per name
//! per round, so that the memory loads of independent lookups overlap.

use std::hash::Hash;

use rustc_hash::FxHashMap;
use thin_vec::ThinVec;

use crate::{Filter, Name};

/// A 256-bit set.
type Bits = [u64; 4];

#[inline(always)]
fn bit_test(b: &Bits, i: u8) -> bool {
    (b[usize::from(i >> 6)] >> (i & 63)) & 1 == 1
}

#[inline(always)]
fn bit_set(b: &mut Bits, i: u8) {
    b[usize::from(i >> 6)] |= 1 << (i & 63);
}

#[inline(always)]
fn bit_clear(b: &mut Bits, i: u8) {
    b[usize::from(i >> 6)] &= !(1 << (i & 63));
}

/// Number of set bits strictly below `i`: the position of entry `i` in its ranked array.
#[inline(always)]
fn rank(b: &Bits, i: u8) -> usize {
    let w = usize::from(i >> 6);
    let below = (b[w] & ((1u64 << (i & 63)) - 1)).count_ones();
    let whole: u32 = b[..w].iter().map(|x| x.count_ones()).sum();
    (whole + below) as usize
}

#[cfg(test)]
fn count(b: &Bits) -> usize {
    b.iter().map(|x| x.count_ones() as usize).sum()
}

/// Position of the in-node prefix made of the first `r` bits (0..=7) of octet `o`, in
/// pre-order of the node's binary tree of prefixes: the empty prefix is 0, the prefixes
/// starting with a 0 bit fill 1..=127, those starting with a 1 bit 128..=254.
///
/// Pre-order keeps the filters covering one name at increasing positions that crowd together
/// towards the longer prefixes, and their values, stored in position order, crowd with them.
#[inline(always)]
const fn slot(o: u8, r: u32) -> u8 {
    let mut pos = 0u32;
    let mut k = 0;
    while k < r {
        let bit = (o as u32 >> (7 - k)) & 1;
        // Going right skips the left subtree: the prefixes of lengths k+1..=7 below it.
        pos += 1 + bit * ((1 << (7 - k)) - 1);
        k += 1;
    }
    pos as u8
}

/// For each position, the prefix it stands for: its length in bits and its bits as the top of
/// an octet.
static PREFIX_AT: [(u8, u8); 255] = {
    let mut table = [(0u8, 0u8); 255];
    let mut r = 0;
    while r < 8 {
        let mut bits = 0u32;
        while bits < (1 << r) {
            let o = if r == 0 { 0 } else { (bits << (8 - r)) as u8 };
            table[slot(o, r) as usize] = (r as u8, o);
            bits += 1;
        }
        r += 1;
    }
    table
};

/// For each octet, the positions of the 8 in-node prefixes (lengths 0..=7) that contain it.
static ANCESTORS: [Bits; 256] = {
    let mut table = [[0u64; 4]; 256];
    let mut o = 0;
    while o < 256 {
        let mut r = 0;
        while r < 8 {
            let pos = slot(o as u8, r) as usize;
            table[o][pos >> 6] |= 1 << (pos & 63);
            r += 1;
        }
        o += 1;
    }
    table
};

/// Octet `d` (0 = most significant) of a 128-bit key.
#[inline(always)]
fn octet(key: u128, depth: u32) -> u8 {
    (key >> (120 - 8 * depth)) as u8
}

#[inline(always)]
fn mask(len: u32) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len) }
}

/// When a filter's extra values (beyond the inline first) exceed this, it gets a position index (kept off the lookup path, in
/// [`BigSets`]), so that adding or removing one of very many subscribers of the same filter —
/// everyone subscribing to the clock — stays O(1).
const INDEX_THRESHOLD: usize = 32;

/// Position indexes of the filters with more than [`INDEX_THRESHOLD`] values, keyed by
/// `(filter key, length)`.
type BigSets<V> = FxHashMap<(u128, u8), FxHashMap<V, usize>>;

/// One filter's values, plus the filter's length.
///
/// Almost every filter has exactly one value, held inline; more follow in one thin allocation
/// (a single pointer, so lookups reach them in one step). The length rides in what would
/// otherwise be padding, which keeps a [`Leaf`] at 32 bytes for `u32` values.
struct Entry<V> {
    more: ThinVec<V>,
    first: V,
    len: u8,
}

enum Removal {
    Absent,
    Removed,
    Emptied,
}

impl<V: Copy + Eq + Hash> Entry<V> {
    fn new(len: u8, v: V) -> Self {
        Entry { more: ThinVec::new(), first: v, len }
    }

    /// An entry holding `values` (at least one) of filter `key`/`len`.
    fn from_values(key: u128, len: u8, values: &[V], big: &mut BigSets<V>) -> Self {
        let entry = Entry { more: values[1..].iter().copied().collect(), first: values[0], len };
        if entry.more.len() > INDEX_THRESHOLD {
            let index = entry.more.iter().enumerate().map(|(i, v)| (*v, i)).collect();
            big.insert((key, len), index);
        }
        entry
    }

    fn count(&self) -> usize {
        1 + self.more.len()
    }

    fn values(&self) -> impl Iterator<Item = V> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }

    #[inline(always)]
    fn for_each(&self, f: &mut impl FnMut(V)) {
        f(self.first);
        self.more.iter().for_each(|v| f(*v));
    }

    fn position(&self, key: u128, v: V, big: &BigSets<V>) -> Option<usize> {
        match big.get(&(key, self.len)) {
            Some(index) => index.get(&v).copied(),
            None => self.more.iter().position(|x| *x == v),
        }
    }

    fn contains(&self, key: u128, v: V, big: &BigSets<V>) -> bool {
        self.first == v || self.position(key, v, big).is_some()
    }

    /// Adds `v` to this entry of filter `key`; false if it was already present.
    fn insert(&mut self, key: u128, v: V, big: &mut BigSets<V>) -> bool {
        if self.first == v || self.position(key, v, big).is_some() {
            return false;
        }
        if self.more.len() == self.more.capacity() {
            // Grow by half: the insert cost stays amortised O(1) for very popular filters.
            self.more.reserve_exact(1 + self.more.len() / 2);
        }
        self.more.push(v);
        if let Some(index) = big.get_mut(&(key, self.len)) {
            index.insert(v, self.more.len() - 1);
        } else if self.more.len() > INDEX_THRESHOLD {
            let index = self.more.iter().enumerate().map(|(i, v)| (*v, i)).collect();
            big.insert((key, self.len), index);
        }
        true
    }

    /// Removes `v`, saying whether the entry is now empty (the caller then drops it).
    fn remove(&mut self, key: u128, v: V, big: &mut BigSets<V>) -> Removal {
        let pos = if self.first == v {
            if self.more.is_empty() {
                return Removal::Emptied;
            }
            // Refill the inline slot from the end of the list.
            let last = self.more.len() - 1;
            self.first = self.more[last];
            last
        } else {
            match self.position(key, v, big) {
                Some(pos) => pos,
                None => return Removal::Absent,
            }
        };
        let gone = self.more.swap_remove(pos);
        if let Some(index) = big.get_mut(&(key, self.len)) {
            index.remove(&gone);
            if let Some(moved) = self.more.get(pos) {
                index.insert(*moved, pos);
            }
            if self.more.len() <= INDEX_THRESHOLD / 2 {
                big.remove(&(key, self.len));
            }
        }
        if self.more.is_empty() {
            self.more = ThinVec::new();
        } else if self.more.len() <= self.more.capacity() / 4 {
            // A filter that had many subscribers gives the memory back as they leave.
            self.more.shrink_to_fit();
        }
        Removal::Removed
    }

    /// Moves every value of `other` (same filter) into `self`; true if any was new.
    fn merge(&mut self, key: u128, other: Entry<V>, big: &mut BigSets<V>) -> bool {
        let mut added = false;
        other.for_each(&mut |v| added |= self.insert(key, v, big));
        added
    }

    fn heap_bytes(&self) -> usize {
        if self.more.is_empty() {
            0
        } else {
            2 * std::mem::size_of::<usize>() + self.more.capacity() * std::mem::size_of::<V>()
        }
    }
}

/// A filter stored whole below the node where its path stops being shared.
struct Leaf<V> {
    // Two halves rather than a u128 keep the leaf 8-byte aligned and 16 bytes smaller.
    hi: u64,
    lo: u64,
    entry: Entry<V>,
}

impl<V> Leaf<V> {
    fn new(key: u128, entry: Entry<V>) -> Self {
        Leaf { hi: (key >> 64) as u64, lo: key as u64, entry }
    }

    #[inline(always)]
    fn key(&self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }

    #[inline(always)]
    fn matches(&self, name: u128) -> bool {
        name & mask(u32::from(self.entry.len)) == self.key()
    }
}

/// Children kept inline in a node, before it switches to bitmaps. Below the hot upper levels
/// almost every node has fewer (about 14 at a million random filters).
const INLINE_CHILDREN: usize = 32;

/// What a next octet leads to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Leaf,
    Node,
}

/// A node's next octets, each leading to a leaf or a child node, with each child's rank among
/// the children of its kind: its position in the node's `leaves` or `nodes` array.
enum Children {
    /// Up to [`INLINE_CHILDREN`] octets in increasing order; bit `i` of `nodes` is set when
    /// `octets[i]` leads to a node. Held inside the node's cache line, so that finding the next
    /// step costs no further memory access.
    Inline { len: u8, nodes: u32, octets: [u8; INLINE_CHILDREN] },
    /// One bitmap per kind, for the nodes with more children (the upper levels).
    Dense(Box<DenseChildren>),
}

struct DenseChildren {
    leaves: Bits,
    nodes: Bits,
}

/// Index of `o` in the first `len` bytes of `octets`, eight bytes per step: a byte of
/// `word ^ pattern` is zero where `o` sits, and the lowest flagged byte of the classic
/// zero-byte test is always a true zero.
#[inline(always)]
fn find_octet(octets: &[u8; INLINE_CHILDREN], len: u8, o: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let len = usize::from(len);
    let pattern = ONES * u64::from(o);
    for (w, chunk) in octets.chunks_exact(8).enumerate().take(len.div_ceil(8)) {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes")) ^ pattern;
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            let i = 8 * w + (zeros.trailing_zeros() / 8) as usize;
            // Bytes past `len` are stale; a hit there means `o` is not a member.
            return (i < len).then_some(i);
        }
    }
    None
}

impl Children {
    const EMPTY: Children = Children::Inline { len: 0, nodes: 0, octets: [0; INLINE_CHILDREN] };

    /// The kind of child `o` leads to and its rank among that kind, if `o` is a member.
    #[inline(always)]
    fn find(&self, o: u8) -> Option<(Kind, usize)> {
        match self {
            Children::Inline { len, nodes, octets } => {
                let i = find_octet(octets, *len, o)?;
                let below = (nodes & ((1u32 << i) - 1)).count_ones() as usize;
                Some(if (nodes >> i) & 1 == 1 { (Kind::Node, below) } else { (Kind::Leaf, i - below) })
            }
            Children::Dense(d) => {
                if bit_test(&d.nodes, o) {
                    Some((Kind::Node, rank(&d.nodes, o)))
                } else if bit_test(&d.leaves, o) {
                    Some((Kind::Leaf, rank(&d.leaves, o)))
                } else {
                    None
                }
            }
        }
    }

    /// Adds `o` (not a member) leading to a child of `kind`; returns its rank among that kind.
    fn insert(&mut self, o: u8, kind: Kind) -> usize {
        if let Children::Inline { len, .. } = self
            && usize::from(*len) == INLINE_CHILDREN
        {
            let mut dense = DenseChildren { leaves: [0; 4], nodes: [0; 4] };
            for (o, kind) in self.iter() {
                bit_set(if kind == Kind::Node { &mut dense.nodes } else { &mut dense.leaves }, o);
            }
            *self = Children::Dense(Box::new(dense));
        }
        match self {
            Children::Inline { len, nodes, octets } => {
                let n = usize::from(*len);
                let i = octets[..n].iter().take_while(|x| **x < o).count();
                octets.copy_within(i..n, i + 1);
                octets[i] = o;
                *len += 1;
                // i < 32 here, and bit 31 is free, so the shift loses nothing.
                let low = (1u32 << i) - 1;
                *nodes = (*nodes & low) | ((*nodes & !low) << 1) | (u32::from(kind == Kind::Node) << i);
                let below = (*nodes & low).count_ones() as usize;
                if kind == Kind::Node { below } else { i - below }
            }
            Children::Dense(d) => {
                let bits = if kind == Kind::Node { &mut d.nodes } else { &mut d.leaves };
                bit_set(bits, o);
                rank(bits, o)
            }
        }
    }

    /// Removes member `o`.
    fn remove(&mut self, o: u8) {
        match self {
            Children::Inline { len, nodes, octets } => {
                let n = usize::from(*len);
                let i = find_octet(octets, *len, o).expect("a member");
                octets.copy_within(i + 1..n, i);
                *len -= 1;
                let low = (1u32 << i) - 1;
                *nodes = (*nodes & low) | ((*nodes >> 1) & !low);
            }
            Children::Dense(d) => {
                bit_clear(&mut d.nodes, o);
                bit_clear(&mut d.leaves, o);
                // Back inline once well below the threshold (hysteresis avoids flapping).
                if self.len() <= INLINE_CHILDREN / 2 {
                    let mut inline = Children::EMPTY;
                    for (o, kind) in self.iter() {
                        inline.insert(o, kind);
                    }
                    *self = inline;
                }
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Children::Inline { len, .. } => usize::from(*len),
            Children::Dense(d) => d.nodes.iter().chain(&d.leaves).map(|w| w.count_ones() as usize).sum(),
        }
    }

    /// Members and their kinds, in increasing order.
    fn iter(&self) -> impl Iterator<Item = (u8, Kind)> + '_ {
        let (inline, dense) = match self {
            Children::Inline { len, nodes, octets } => (Some((&octets[..usize::from(*len)], *nodes)), None),
            Children::Dense(d) => (None, Some(d)),
        };
        let inline = inline.into_iter().flat_map(|(octets, nodes)| {
            octets.iter().enumerate().map(move |(i, o)| {
                (*o, if (nodes >> i) & 1 == 1 { Kind::Node } else { Kind::Leaf })
            })
        });
        let dense = dense.into_iter().flat_map(|d| {
            (0u8..=255).filter_map(move |o| {
                if bit_test(&d.nodes, o) {
                    Some((o, Kind::Node))
                } else {
                    bit_test(&d.leaves, o).then_some((o, Kind::Leaf))
                }
            })
        });
        inline.chain(dense)
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Children::Inline { .. } => 0,
            Children::Dense(_) => std::mem::size_of::<DenseChildren>(),
        }
    }
}

/// A filter ending in a node keeps up to this many values in the node's shared pool. One with
/// more moves them to an [`Entry`] of its own (which grows a position index), so that adding
/// or removing one of its many subscribers never shifts the pool.
const POOLED: usize = 64;

/// Set in an `ends` slot whose filter keeps its values in `spills` (its pool range is empty).
const SPILLED: u16 = 1 << 15;

/// The filters ending in a node and their values. Boxed, because most nodes below the upper
/// levels have none.
///
/// The values of all the node's filters share one array in position order (see [`slot`]), so
/// the up to eight filters covering a name read a few neighbouring cache lines of one small
/// array instead of one scattered list each.
struct Prefixes<V> {
    /// Positions of the filters present.
    bits: Bits,
    /// For each filter present, in position order: where its values end in `values` (they
    /// start where the previous filter's end), plus [`SPILLED`] if they are in `spills`.
    /// Pool sizes stay far below `SPILLED`: at most 255 filters of [`POOLED`] values.
    ends: ThinVec<u16>,
    values: ThinVec<V>,
    /// Filters with more than [`POOLED`] values, by position. Rare: a handful of very popular
    /// filters.
    spills: ThinVec<(u8, Entry<V>)>,
}

impl<V: Copy + Eq + Hash> Prefixes<V> {
    fn new() -> Self {
        Prefixes { bits: [0; 4], ends: ThinVec::new(), values: ThinVec::new(), spills: ThinVec::new() }
    }

    /// How many filters are present.
    fn count(&self) -> usize {
        self.ends.len()
    }

    /// The pool range of the filter of rank `at`, and whether it is spilled instead.
    #[inline(always)]
    fn range(&self, at: usize) -> (usize, usize, bool) {
        let start = if at == 0 { 0 } else { usize::from(self.ends[at - 1] & !SPILLED) };
        let end = self.ends[at];
        (start, usize::from(end & !SPILLED), end & SPILLED != 0)
    }

    /// Index in `spills` of the spilled filter at position `pos`.
    fn spill_index(&self, pos: u8) -> usize {
        self.spills.iter().position(|(p, _)| *p == pos).expect("a spilled filter")
    }

    fn spill(&self, pos: u8) -> &Entry<V> {
        &self.spills[self.spill_index(pos)].1
    }

    fn grow_ends(&mut self, from: usize, by: usize) {
        let by = by as u16;
        self.ends[from..].iter_mut().for_each(|e| *e += by);
    }

    fn shrink_ends(&mut self, from: usize, by: usize) {
        let by = by as u16;
        self.ends[from..].iter_mut().for_each(|e| *e -= by);
    }

    /// Puts `values` into the pool at `at`, growing it by a quarter at a time.
    fn pool_insert(&mut self, at: usize, n: usize, values: impl Iterator<Item = V>) {
        if self.values.len() + n > self.values.capacity() {
            self.values.reserve_exact(n + self.values.len() / 4);
        }
        for (i, v) in values.enumerate() {
            self.values.insert(at + i, v);
        }
    }

    /// Adds the values of `entry` to the filter at position `pos` (filter `key`); true if any
    /// was new.
    fn insert(&mut self, pos: u8, key: u128, entry: Entry<V>, big: &mut BigSets<V>) -> bool {
        let at = rank(&self.bits, pos);
        if bit_test(&self.bits, pos) {
            let mut added = false;
            entry.for_each(&mut |v| added |= self.insert_value(at, pos, key, entry.len, v, big));
            return added;
        }
        bit_set(&mut self.bits, pos);
        let start = if at == 0 { 0 } else { usize::from(self.ends[at - 1] & !SPILLED) };
        if entry.count() > POOLED {
            vec_insert(&mut self.ends, at, start as u16 | SPILLED);
            self.spills.push((pos, entry));
        } else {
            if entry.more.len() > INDEX_THRESHOLD / 2 {
                // Only spilled filters keep a position index.
                big.remove(&(key, entry.len));
            }
            vec_insert(&mut self.ends, at, start as u16);
            self.pool_insert(start, entry.count(), entry.values());
            self.grow_ends(at, entry.count());
        }
        true
    }

    /// Adds `v` to the filter of rank `at` (position `pos`, filter `key`/`len`).
    fn insert_value(&mut self, at: usize, pos: u8, key: u128, len: u8, v: V, big: &mut BigSets<V>) -> bool {
        let (start, end, spilled) = self.range(at);
        if spilled {
            let i = self.spill_index(pos);
            return self.spills[i].1.insert(key, v, big);
        }
        if self.values[start..end].contains(&v) {
            return false;
        }
        if end - start < POOLED {
            self.pool_insert(end, 1, std::iter::once(v));
            self.grow_ends(at, 1);
            return true;
        }
        let mut entry = Entry::from_values(key, len, &self.values[start..end], big);
        entry.insert(key, v, big);
        self.values.drain(start..end);
        self.ends[at] = start as u16 | SPILLED;
        self.shrink_ends(at + 1, POOLED);
        self.spills.push((pos, entry));
        true
    }

    /// Removes `v` from the filter at position `pos` (filter `key`/`len`). `Emptied` means the
    /// filter is gone (the caller drops the whole set once [`count`](Self::count) is 0).
    fn remove(&mut self, pos: u8, key: u128, len: u8, v: V, big: &mut BigSets<V>) -> Removal {
        if !bit_test(&self.bits, pos) {
            return Removal::Absent;
        }
        let at = rank(&self.bits, pos);
        let (start, end, spilled) = self.range(at);
        if spilled {
            let i = self.spill_index(pos);
            match self.spills[i].1.remove(key, v, big) {
                Removal::Absent => return Removal::Absent,
                Removal::Removed if self.spills[i].1.count() > POOLED / 2 => return Removal::Removed,
                Removal::Removed => {
                    // Few enough to share the pool again.
                    let (_, entry) = self.spills.swap_remove(i);
                    big.remove(&(key, len));
                    self.ends[at] = start as u16;
                    self.pool_insert(start, entry.count(), entry.values());
                    self.grow_ends(at, entry.count());
                    return Removal::Removed;
                }
                Removal::Emptied => {
                    self.spills.swap_remove(i);
                }
            }
        } else {
            let Some(i) = self.values[start..end].iter().position(|x| *x == v) else {
                return Removal::Absent;
            };
            vec_remove(&mut self.values, start + i);
            self.shrink_ends(at, 1);
            if end - start > 1 {
                return Removal::Removed;
            }
        }
        bit_clear(&mut self.bits, pos);
        vec_remove(&mut self.ends, at);
        Removal::Emptied
    }

    /// Whether the filter at position `pos` (filter `key`) has value `v`.
    fn contains(&self, pos: u8, key: u128, v: V, big: &BigSets<V>) -> bool {
        if !bit_test(&self.bits, pos) {
            return false;
        }
        match self.range(rank(&self.bits, pos)) {
            (_, _, true) => self.spill(pos).contains(key, v, big),
            (start, end, false) => self.values[start..end].contains(&v),
        }
    }

    /// Visits the values of every filter here that covers octet `o`.
    ///
    /// Two passes: the first finds the (at most 8) covering filters, so that the loads of all
    /// their values can be in flight together; the second visits.
    #[inline(always)]
    fn visit(&self, o: u8, f: &mut impl FnMut(V)) {
        let ancestors = &ANCESTORS[usize::from(o)];
        let mut found = [(0u16, 0u16, 0u8); 8];
        let mut n = 0;
        let mut before = 0usize;
        for (w, (&present, &a)) in self.bits.iter().zip(ancestors).enumerate() {
            let mut hits = present & a;
            while hits != 0 {
                let bit = hits.trailing_zeros();
                let at = before + (present & ((1u64 << bit) - 1)).count_ones() as usize;
                let start = if at == 0 { 0 } else { self.ends[at - 1] & !SPILLED };
                let end = self.ends[at];
                found[n] = (start, end, (64 * w) as u8 + bit as u8);
                n += 1;
                hits &= hits - 1;
            }
            before += present.count_ones() as usize;
        }
        for &(start, end, pos) in &found[..n] {
            if end & SPILLED == 0 {
                self.values[usize::from(start)..usize::from(end)].iter().for_each(|v| f(*v));
            } else {
                self.spill(pos).for_each(f);
            }
        }
    }

    /// Calls `f(pos, value)` for every value of every filter, in position order.
    fn for_each(&self, mut f: impl FnMut(u8, V)) {
        let positions = (0u8..255).filter(|pos| bit_test(&self.bits, *pos));
        for (at, pos) in positions.enumerate() {
            match self.range(at) {
                (_, _, true) => self.spill(pos).for_each(&mut |v| f(pos, v)),
                (start, end, false) => self.values[start..end].iter().for_each(|v| f(pos, *v)),
            }
        }
    }

    /// Position of the first filter present.
    fn first_position(&self) -> Option<u8> {
        (0u8..255).find(|pos| bit_test(&self.bits, *pos))
    }

    /// The values of the only filter present, as an entry for that filter (`key`/`len`).
    fn into_only(mut self, key: u128, len: u8, big: &mut BigSets<V>) -> Entry<V> {
        debug_assert_eq!(self.count(), 1);
        match self.spills.pop() {
            Some((_, entry)) => entry,
            None => Entry::from_values(key, len, &self.values, big),
        }
    }

    fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + thin_heap_bytes(&self.ends)
            + thin_heap_bytes(&self.values)
            + thin_heap_bytes(&self.spills)
            + self.spills.iter().map(|(_, e)| e.heap_bytes()).sum::<usize>()
    }
}

/// One level of the trie, deciding 8 bits: exactly one cache line.
///
/// Child nodes are stored inline in their parent's `nodes` array, so a lookup reads one line
/// per level, and the line holds everything needed to find the next node or leaf.
#[repr(align(64))]
struct Node<V> {
    prefixes: Option<Box<Prefixes<V>>>,
    children: Children,
    leaves: ThinVec<Leaf<V>>,
    nodes: ThinVec<Node<V>>,
}

/// Where a lookup goes after a node.
#[derive(Clone, Copy)]
enum Next<'a, V> {
    Node(&'a Node<V>),
    Leaf(&'a Leaf<V>),
    Done,
}

impl<V: Copy + Eq + Hash> Next<'_, V> {
    /// Reads a word of the next node or leaf so that its cache line starts loading; the
    /// result only feeds `black_box`.
    ///
    /// Nothing may branch on the loaded word: the branch would be predicted while the load is
    /// still in flight, and a misprediction, found only when the line arrives, throws away
    /// all the work done in its shadow.
    #[inline(always)]
    fn touch(&self) -> u64 {
        match self {
            Next::Node(node) => u64::from(node.prefixes.is_some()),
            Next::Leaf(leaf) => leaf.lo,
            Next::Done => 0,
        }
    }
}

/// Inserts `x` at `i`. Arrays grow by a quarter at a time: little slack, and far fewer
/// reallocations than exact sizing (whose freed blocks fragment the heap).
fn vec_insert<T>(v: &mut ThinVec<T>, i: usize, x: T) {
    if v.len() == v.capacity() {
        v.reserve_exact(1 + v.len() / 4);
    }
    v.insert(i, x);
}

/// Removes the element at `i`, giving memory back once the array is half empty.
fn vec_remove<T>(v: &mut ThinVec<T>, i: usize) -> T {
    let x = v.remove(i);
    if v.len() <= v.capacity() / 2 {
        v.shrink_to_fit();
    }
    x
}

fn thin_heap_bytes<T>(v: &ThinVec<T>) -> usize {
    // A thin vector's 16-byte header is padded to the element alignment.
    let header = std::mem::align_of::<T>().max(16);
    if v.capacity() == 0 { 0 } else { header + v.capacity() * std::mem::size_of::<T>() }
}

impl<V: Copy + Eq + Hash> Node<V> {
    fn empty() -> Self {
        Node { prefixes: None, children: Children::EMPTY, leaves: ThinVec::new(), nodes: ThinVec::new() }
    }

    fn entries(&self) -> usize {
        self.prefixes.as_ref().map_or(0, |p| p.count()) + self.leaves.len() + self.nodes.len()
    }

    /// Places a filter's entry in the subtree of this node at `depth`. Returns true if anything
    /// was added (false only when every value was already there).
    fn insert(&mut self, depth: u32, key: u128, entry: Entry<V>, big: &mut BigSets<V>) -> bool {
        let base = 8 * depth;
        let len = u32::from(entry.len);
        let o = octet(key, depth);
        if len < base + 8 {
            let prefixes = self.prefixes.get_or_insert_with(|| Box::new(Prefixes::new()));
            return prefixes.insert(slot(o, len - base), key, entry, big);
        }
        let at = match self.children.find(o) {
            Some((Kind::Node, at)) => return self.nodes[at].insert(depth + 1, key, entry, big),
            None => {
                let at = self.children.insert(o, Kind::Leaf);
                vec_insert(&mut self.leaves, at, Leaf::new(key, entry));
                return true;
            }
            Some((Kind::Leaf, at)) => at,
        };
        let leaf = &mut self.leaves[at];
        if u32::from(leaf.entry.len) == len && leaf.key() == key {
            return leaf.entry.merge(key, entry, big);
        }
        // Two filters now share this path: push the resident leaf one level down. Only
        // 128-bit filters reach depth 15's children, and two of those sharing a slot are the
        // same filter, so depth never exceeds 15.
        debug_assert!(depth < 15);
        let old = vec_remove(&mut self.leaves, at);
        self.children.remove(o);
        let mut node = Node::empty();
        node.insert(depth + 1, old.key(), old.entry, big);
        let added = node.insert(depth + 1, key, entry, big);
        let at = self.children.insert(o, Kind::Node);
        vec_insert(&mut self.nodes, at, node);
        added
    }

    /// Removes `v` from the filter; returns whether it was present.
    fn remove(&mut self, depth: u32, key: u128, len: u8, v: V, big: &mut BigSets<V>) -> bool {
        let base = 8 * depth;
        let o = octet(key, depth);
        if u32::from(len) < base + 8 {
            let Some(prefixes) = &mut self.prefixes else { return false };
            return match prefixes.remove(slot(o, u32::from(len) - base), key, len, v, big) {
                Removal::Absent => false,
                Removal::Removed => true,
                Removal::Emptied => {
                    if prefixes.count() == 0 {
                        self.prefixes = None;
                    }
                    true
                }
            };
        }
        match self.children.find(o) {
            None => false,
            Some((Kind::Leaf, at)) => {
                let leaf = &mut self.leaves[at];
                if leaf.entry.len != len || leaf.key() != key {
                    return false;
                }
                match leaf.entry.remove(key, v, big) {
                    Removal::Absent => false,
                    Removal::Removed => true,
                    Removal::Emptied => {
                        self.children.remove(o);
                        vec_remove(&mut self.leaves, at);
                        true
                    }
                }
            }
            Some((Kind::Node, at)) => {
                let removed = self.nodes[at].remove(depth + 1, key, len, v, big);
                if removed {
                    self.compact_child(depth, key, o, at, big);
                }
                removed
            }
        }
    }

    /// Restores path compression below child `o` after a removal: an empty child node goes
    /// away, and a child node left with a single filter becomes a leaf again.
    fn compact_child(&mut self, depth: u32, key: u128, o: u8, at: usize, big: &mut BigSets<V>) {
        let node = &mut self.nodes[at];
        let lone = match node.entries() {
            0 => None,
            1 if node.leaves.len() == 1 => Some(vec_remove(&mut node.leaves, 0)),
            1 if node.nodes.is_empty() => {
                let prefixes = node.prefixes.take().expect("the one entry is a prefix");
                let pos = prefixes.first_position().expect("one filter");
                let (r, bits) = PREFIX_AT[usize::from(pos)];
                let child = 8 * (depth + 1);
                let full = (key & mask(child)) | (u128::from(bits) << (120 - child));
                let entry = prefixes.into_only(full, (child + u32::from(r)) as u8, big);
                Some(Leaf::new(full, entry))
            }
            _ => return,
        };
        vec_remove(&mut self.nodes, at);
        self.children.remove(o);
        if let Some(leaf) = lone {
            let at = self.children.insert(o, Kind::Leaf);
            vec_insert(&mut self.leaves, at, leaf);
        }
    }

    /// Visits the values of every filter in this node that covers octet `o`.
    #[inline(always)]
    fn visit_prefixes(&self, o: u8, f: &mut impl FnMut(V)) {
        if let Some(prefixes) = &self.prefixes {
            prefixes.visit(o, f);
        }
    }

    /// One lookup step: visits the covering filters that end in this node and says where the
    /// name goes next.
    ///
    /// The next node or leaf is located and touched *before* the values here are visited, so
    /// its cache miss — the one that matters at scale — overlaps with that work instead of
    /// following it.
    #[inline(always)]
    fn step(&self, name: u128, depth: u32, f: &mut impl FnMut(V)) -> Next<'_, V> {
        let o = octet(name, depth);
        let next = self.next(o);
        let warm = next.touch();
        self.visit_prefixes(o, f);
        std::hint::black_box(warm);
        next
    }

    /// Where octet `o` leads from this node.
    #[inline(always)]
    fn next(&self, o: u8) -> Next<'_, V> {
        match self.children.find(o) {
            Some((Kind::Node, at)) => Next::Node(&self.nodes[at]),
            Some((Kind::Leaf, at)) => Next::Leaf(&self.leaves[at]),
            None => Next::Done,
        }
    }

    /// Whether filter `key`/`len` has value `v`.
    fn contains(&self, depth: u32, key: u128, len: u8, v: V, big: &BigSets<V>) -> bool {
        let base = 8 * depth;
        let o = octet(key, depth);
        if u32::from(len) < base + 8 {
            let pos = slot(o, u32::from(len) - base);
            return self.prefixes.as_ref().is_some_and(|p| p.contains(pos, key, v, big));
        }
        match self.children.find(o) {
            Some((Kind::Node, at)) => self.nodes[at].contains(depth + 1, key, len, v, big),
            Some((Kind::Leaf, at)) => {
                let leaf = &self.leaves[at];
                leaf.entry.len == len && leaf.key() == key && leaf.entry.contains(key, v, big)
            }
            None => false,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.prefixes.as_ref().map_or(0, |p| p.heap_bytes())
            + self.children.heap_bytes()
            + thin_heap_bytes(&self.leaves)
            + thin_heap_bytes(&self.nodes)
            + self.leaves.iter().map(|l| l.entry.heap_bytes()).sum::<usize>()
            + self.nodes.iter().map(Node::heap_bytes).sum::<usize>()
    }

    fn for_each_entry(&self, depth: u32, path: u128, f: &mut impl FnMut(Filter, V)) {
        let filter = |key: u128, len: u32| Filter::new(Name::new(key), len as u8).expect("len <= 128");
        if let Some(prefixes) = &self.prefixes {
            prefixes.for_each(|pos, v| {
                let (r, bits) = PREFIX_AT[usize::from(pos)];
                f(filter(path | (u128::from(bits) << (120 - 8 * depth)), 8 * depth + u32::from(r)), v);
            });
        }
        for leaf in self.leaves.iter() {
            let filter = filter(leaf.key(), u32::from(leaf.entry.len));
            leaf.entry.for_each(&mut |v| f(filter, v));
        }
        let nodes = self.children.iter().filter(|(_, kind)| *kind == Kind::Node);
        for ((o, _), node) in nodes.zip(self.nodes.iter()) {
            node.for_each_entry(depth + 1, path | (u128::from(o) << (120 - 8 * depth)), f);
        }
    }
}

/// How many lookups [`SubscriptionTable::for_each_match_batch`] keeps in flight at once.
pub const BATCH_LANES: usize = 16;

/// A set of `(Filter, V)` pairs that answers "which values' filters cover this name?".
///
/// `V` is typically a small id (a link, a subscription). Each pair is stored once; inserting
/// it again is a no-op that returns `false`. Lookups visit the values of **all** covering
/// filters, each pair exactly once, in no particular order.
///
/// ```
/// use canopy::{Filter, Name, SubscriptionTable};
///
/// let mut table = SubscriptionTable::new();
/// let org: Filter = "0x0a000000000000000000000000000000/8".parse().unwrap();
/// let team: Filter = "0x0a0b0000000000000000000000000000/16".parse().unwrap();
/// assert!(table.insert(org, 'o'));
/// assert!(table.insert(team, 't'));
/// assert!(!table.insert(team, 't'));
///
/// let mut hits = Vec::new();
/// table.for_each_match(Name::new(0x0a0b_0c << 104), |v| hits.push(v));
/// hits.sort();
/// assert_eq!(hits, ['o', 't']);
///
/// assert!(table.remove(org, 'o'));
/// assert_eq!(table.len(), 1);
/// ```
pub struct SubscriptionTable<V> {
    root: Node<V>,
    big: BigSets<V>,
    len: usize,
}

impl<V: Copy + Eq + Hash> Default for SubscriptionTable<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Copy + Eq + Hash> SubscriptionTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        SubscriptionTable { root: Node::empty(), big: BigSets::default(), len: 0 }
    }

    /// Adds the pair; returns `false` if it was already present.
    pub fn insert(&mut self, filter: Filter, value: V) -> bool {
        let entry = Entry::new(filter.prefix_len(), value);
        let added = self.root.insert(0, filter.name().to_u128(), entry, &mut self.big);
        self.len += usize::from(added);
        added
    }

    /// Removes the pair; returns `false` if it was not present.
    pub fn remove(&mut self, filter: Filter, value: V) -> bool {
        let key = filter.name().to_u128();
        let removed = self.root.remove(0, key, filter.prefix_len(), value, &mut self.big);
        self.len -= usize::from(removed);
        removed
    }

    /// Whether the pair is present.
    pub fn contains(&self, filter: Filter, value: V) -> bool {
        self.root.contains(0, filter.name().to_u128(), filter.prefix_len(), value, &self.big)
    }

    /// Number of `(filter, value)` pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no pairs.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every pair.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Calls `f` with the value of every pair whose filter covers `name`.
    #[inline]
    pub fn for_each_match(&self, name: Name, mut f: impl FnMut(V)) {
        let name = name.to_u128();
        let mut node = &self.root;
        let mut depth = 0;
        loop {
            match node.step(name, depth, &mut f) {
                Next::Node(next) => node = next,
                Next::Leaf(leaf) => {
                    if leaf.matches(name) {
                        leaf.entry.for_each(&mut f);
                    }
                    return;
                }
                Next::Done => return,
            }
            depth += 1;
        }
    }

    /// Like [`for_each_match`](Self::for_each_match) for many names at once, calling
    /// `f(i, value)` for every value matching `names[i]`.
    ///
    /// Up to [`BATCH_LANES`] lookups advance in lock-step, one trie level each per round. Each
    /// round first reads one word of every lane's next node or leaf — independent loads the
    /// processor issues together — and only then does the work that depends on them, so the
    /// cache misses of a batch overlap instead of following one another. Calls for different
    /// indices interleave; those for one index come in the order `for_each_match` makes them
    /// for that name (the routing core relies on it to deliver a run of chunks exactly as it
    /// would one by one).
    pub fn for_each_match_batch(&self, names: &[Name], mut f: impl FnMut(usize, V)) {
        for (group, chunk) in names.chunks(BATCH_LANES).enumerate() {
            let offset = group * BATCH_LANES;
            let mut lanes = [Next::Done; BATCH_LANES];
            let mut keys = [0u128; BATCH_LANES];
            for (i, name) in chunk.iter().enumerate() {
                lanes[i] = Next::Node(&self.root);
                keys[i] = name.to_u128();
            }
            let mut depth = 0;
            let mut active = chunk.len();
            while active > 0 {
                let mut touched = 0u64;
                for lane in &lanes[..chunk.len()] {
                    touched ^= lane.touch();
                }
                std::hint::black_box(touched);
                active = 0;
                for (i, lane) in lanes[..chunk.len()].iter_mut().enumerate() {
                    let mut visit = |v| f(offset + i, v);
                    *lane = match *lane {
                        // The touch round already started this level's loads.
                        Next::Node(node) => {
                            let o = octet(keys[i], depth);
                            node.visit_prefixes(o, &mut visit);
                            node.next(o)
                        }
                        Next::Leaf(leaf) => {
                            if leaf.matches(keys[i]) {
                                leaf.entry.for_each(&mut visit);
                            }
                            Next::Done
                        }
                        Next::Done => Next::Done,
                    };
                    active += usize::from(!matches!(lane, Next::Done));
                }
                depth += 1;
            }
        }
    }

    /// Calls `f` for every `(filter, value)` pair, in filter order within each node.
    pub fn for_each(&self, mut f: impl FnMut(Filter, V)) {
        self.root.for_each_entry(0, 0, &mut f);
    }

    /// Bytes of heap memory the table owns, for capacity accounting and benchmarks. Exact for
    /// the trie; approximate (from reported capacities) for the position indexes of filters
    /// with very many values. Allocator overhead is not included.
    pub fn heap_bytes(&self) -> usize {
        let index_entry = std::mem::size_of::<(V, usize)>() + 1;
        let big: usize = self
            .big
            .values()
            .map(|index| index.capacity() * index_entry + std::mem::size_of::<((u128, u8), FxHashMap<V, usize>)>() + 1)
            .sum();
        self.root.heap_bytes() + big
    }
}

impl<V: Copy + Eq + Hash + std::fmt::Debug> std::fmt::Debug for SubscriptionTable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        self.for_each(|filter, v| {
            list.entry(&(filter, v));
        });
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(s: &str) -> Filter {
        s.parse().unwrap()
    }

    fn matches(t: &SubscriptionTable<u32>, name: u128) -> Vec<u32> {
        let mut out = Vec::new();
        t.for_each_match(Name::new(name), |v| out.push(v));
        out.sort_unstable();
        out
    }

    #[test]
    fn ancestor_masks_hold_eight_prefixes() {
        for o in 0..=255u8 {
            let ancestors = &ANCESTORS[usize::from(o)];
            assert_eq!(count(ancestors), 8);
            for r in 0..8 {
                let pos = slot(o, r);
                assert!(bit_test(ancestors, pos));
                let (len, bits) = PREFIX_AT[usize::from(pos)];
                assert_eq!((u32::from(len), bits), (r, o & !(0xffu8.checked_shr(r).unwrap_or(0))));
            }
        }
        // Every position stands for exactly one prefix.
        let mut seen = [false; 255];
        for r in 0..8 {
            for bits in 0..(1u32 << r) {
                let pos = usize::from(slot((bits << (8 - r)) as u8, r));
                assert!(!seen[pos]);
                seen[pos] = true;
            }
        }
    }

    #[test]
    fn inline_children_find_and_rank() {
        let mut c = Children::EMPTY;
        // Every third octet; multiples of 9 lead to nodes.
        let members: Vec<u8> = (0..=255u8).step_by(3).take(INLINE_CHILDREN).collect();
        for o in members.iter().rev() {
            c.insert(*o, if o % 9 == 0 { Kind::Node } else { Kind::Leaf });
        }
        assert!(matches!(c, Children::Inline { .. }));
        let (mut leaves, mut nodes) = (0, 0);
        for o in 0..=255u8 {
            let want = members.contains(&o).then(|| {
                let kind = if o % 9 == 0 { Kind::Node } else { Kind::Leaf };
                let rank = if kind == Kind::Node { &mut nodes } else { &mut leaves };
                *rank += 1;
                (kind, *rank - 1)
            });
            assert_eq!(c.find(o), want, "octet {o}");
        }
        c.insert(1, Kind::Leaf);
        assert!(matches!(c, Children::Dense(_)));
        assert_eq!(c.find(1), Some((Kind::Leaf, 0)));
        assert_eq!(c.find(9), Some((Kind::Node, 1)));
        for o in members.iter().skip(5) {
            c.remove(*o);
        }
        assert!(matches!(c, Children::Inline { .. }));
        assert_eq!(c.iter().map(|(o, _)| o).collect::<Vec<_>>(), [0, 1, 3, 6, 9, 12]);
        assert_eq!(c.find(12), Some((Kind::Leaf, 3)));
        assert_eq!(c.find(15), None);
    }

    #[test]
    fn layout_stays_small() {
        assert_eq!(std::mem::size_of::<Leaf<u32>>(), 32);
        assert_eq!(std::mem::size_of::<Entry<u32>>(), 16);
        assert_eq!(std::mem::size_of::<Node<u32>>(), 64);
        assert_eq!(std::mem::size_of::<Children>(), 40);
    }

    #[test]
    fn all_covering_filters_are_visited() {
        let mut t = SubscriptionTable::new();
        let name = 0xabcd_ef01_2345_6789_abcd_ef01_2345_6789u128;
        for len in 0..=128u8 {
            assert!(t.insert(Filter::new(Name::new(name), len).unwrap(), u32::from(len)));
        }
        assert_eq!(t.len(), 129);
        assert_eq!(matches(&t, name), (0..=128).collect::<Vec<_>>());
        // Flipping bit k (from the top) leaves exactly the filters shorter than k+1.
        for k in 0..128u32 {
            let other = name ^ (1u128 << (127 - k));
            assert_eq!(matches(&t, other), (0..=k).collect::<Vec<_>>(), "bit {k}");
        }
    }

    #[test]
    fn split_and_collapse_keep_results() {
        let mut t = SubscriptionTable::new();
        let a = filter("0x11223344556677880000000000000000/64");
        let b = filter("0x11223344556677990000000000000000/64");
        let c = filter("0x11223344000000000000000000000000/32");
        t.insert(a, 1);
        t.insert(b, 2);
        t.insert(c, 3);
        assert_eq!(matches(&t, 0x1122_3344_5566_7788_0000_0000_0000_0001), [1, 3]);
        assert_eq!(matches(&t, 0x1122_3344_5566_7799_0000_0000_0000_0001), [2, 3]);
        assert!(t.remove(a, 1));
        assert!(!t.remove(a, 1));
        assert_eq!(matches(&t, 0x1122_3344_5566_7788_0000_0000_0000_0001), [3]);
        assert!(t.remove(c, 3));
        assert_eq!(matches(&t, 0x1122_3344_5566_7799_0000_0000_0000_0001), [2]);
        // After the removals, the lone survivor collapses back into one leaf under the root.
        assert_eq!(t.root.leaves.len(), 1);
        assert!(t.root.nodes.is_empty());
        assert_eq!(t.root.children.len(), 1);
        assert!(t.remove(b, 2));
        assert!(t.is_empty());
        assert_eq!(t.root.entries(), 0);
    }

    #[test]
    fn child_sets_grow_dense_and_shrink_back() {
        let mut t = SubscriptionTable::new();
        let base = 0x4242_0000_0000_0000_0000_0000_0000_0000u128;
        // 256 /24 filters under one /16: the node at depth 2 sees every octet as a leaf, and
        // 64-bit filters below some of them make child nodes too.
        for o in 0..=255u128 {
            t.insert(Filter::new(Name::new(base | (o << 104)), 24).unwrap(), o as u32);
            if o % 3 == 0 {
                let deep = base | (o << 104) | (0xab << 96);
                t.insert(Filter::new(Name::new(deep), 64).unwrap(), 1000 + o as u32);
            }
        }
        for o in 0..=255u128 {
            let want: Vec<u32> = if o % 3 == 0 { vec![o as u32, 1000 + o as u32] } else { vec![o as u32] };
            assert_eq!(matches(&t, base | (o << 104) | (0xab << 96) | 5), want, "octet {o}");
        }
        // Remove most of them again: sets go back to the inline form and results stay right.
        for o in 0..=250u128 {
            assert!(t.remove(Filter::new(Name::new(base | (o << 104)), 24).unwrap(), o as u32));
        }
        for o in 0..=255u128 {
            let mut want = Vec::new();
            if o > 250 {
                want.push(o as u32);
            }
            if o % 3 == 0 {
                want.push(1000 + o as u32);
            }
            assert_eq!(matches(&t, base | (o << 104) | (0xab << 96) | 5), want, "octet {o}");
        }
        let mut listed = 0;
        t.for_each(|_, _| listed += 1);
        assert_eq!(listed, t.len());
    }

    #[test]
    fn many_values_on_one_filter() {
        let mut t = SubscriptionTable::new();
        for v in 0..1000 {
            assert!(t.insert(Filter::ALL, v));
        }
        assert!(!t.insert(Filter::ALL, 500));
        assert_eq!(matches(&t, 42).len(), 1000);
        for v in (0..1000).step_by(2) {
            assert!(t.remove(Filter::ALL, v));
        }
        assert!(!t.remove(Filter::ALL, 0));
        assert_eq!(matches(&t, 42), (1..1000).step_by(2).collect::<Vec<_>>());
        assert!(t.contains(Filter::ALL, 999) && !t.contains(Filter::ALL, 998));
    }

    #[test]
    fn popular_short_filters_spill_and_return_to_the_pool() {
        let mut t = SubscriptionTable::new();
        // Three filters ending in the same depth-1 node; the middle one gets many values.
        let at = |top: u128, len: u8| Filter::new(Name::new(top << 112), len).unwrap();
        let (short, popular, long) = (at(0x4280, 9), at(0x4280, 12), at(0x42f0, 15));
        let name = 0x4288_0000_0000_0000_0000_0000_0000_0000u128;
        t.insert(short, 1);
        t.insert(long, 2);
        let many = 1000..1000 + 3 * POOLED as u32;
        for v in many.clone() {
            assert!(t.insert(popular, v));
            assert!(!t.insert(popular, v));
        }
        let mut want: Vec<u32> = many.clone().chain([1]).collect();
        want.sort_unstable();
        assert_eq!(matches(&t, name), want);
        assert_eq!(matches(&t, 0x42f0 << 112), [1, 2]);
        // Back below half the pool limit, the values return to the shared pool.
        for v in many.clone().skip(POOLED / 2 - 1) {
            assert!(t.remove(popular, v));
            assert!(!t.remove(popular, v));
        }
        let mut want: Vec<u32> = many.clone().take(POOLED / 2 - 1).chain([1]).collect();
        want.sort_unstable();
        assert_eq!(matches(&t, name), want);
        assert!(t.contains(popular, 1000) && !t.contains(popular, 1000 + POOLED as u32));
        assert!(t.big.is_empty(), "pooled filters keep no position index");
        assert_eq!(matches(&t, 0x42f0 << 112), [1, 2]);
        // A node whose last filter is a spilled one collapses into a leaf that keeps them all.
        let (deep, other) = (at(0x7766, 20), at(0x7766, 32));
        for v in 0..200 {
            t.insert(deep, v);
        }
        t.insert(other, 7);
        assert!(t.remove(other, 7));
        assert_eq!(matches(&t, 0x0077_6605 << 104), (0..200).collect::<Vec<_>>());
        assert_eq!(t.root.children.find(0x77).map(|(kind, _)| kind), Some(Kind::Leaf));
        assert_eq!(t.len(), 2 + POOLED / 2 - 1 + 200);
    }

    #[test]
    fn for_each_lists_pairs() {
        let mut t = SubscriptionTable::new();
        let fs = [
            filter("0x00000000000000000000000000000000/0"),
            filter("0x80000000000000000000000000000000/1"),
            filter("0xff000000000000000000000000000000/8"),
            filter("0xff000000000000000000000000000000/15"),
            filter("0xff01ab00000000000000000000000000/24"),
            filter("0xff01ac00000000000000000000000001"),
        ];
        for (i, f) in fs.iter().enumerate() {
            t.insert(*f, i as u32);
        }
        let mut seen = Vec::new();
        t.for_each(|f, v| seen.push((f, v)));
        seen.sort_by_key(|p| p.1);
        let want: Vec<_> = fs.iter().copied().zip(0..).collect();
        assert_eq!(seen, want);
    }
}
