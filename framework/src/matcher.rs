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
//! node at depth `d` decides bits `8d..8d+8` of a name. Each node holds two 256-bit bitmaps:
//!
//! - `prefixes` — the filters that end inside this node (prefix lengths `8d..8d+7`), numbered as
//!   a complete binary tree (`1` is the empty prefix, `2..4` the one-bit prefixes, …, `128..256`
//!   the seven-bit ones). For each of the 256 possible next octets a precomputed mask holds the
//!   indices of all prefixes that contain it, so **one AND yields every covering filter in the
//!   node**.
//! - `children` — which next octets lead further down.
//!
//! Values and children live in exactly-sized arrays indexed by the popcount of the bitmap below
//! the entry, so sparse nodes stay small. Paths are compressed: a filter that is alone below a
//! node is stored as a leaf holding its full key, and a node is only created when two filters
//! share a longer path. A lookup of a name under a long filter therefore touches a few hot upper
//! nodes and about one cold node plus its leaf, instead of one node per 8 bits.
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

/// Index of a prefix of `r` bits (0..=7) of octet `o` in the node's complete binary tree.
#[inline(always)]
fn prefix_index(o: u8, r: u32) -> u8 {
    debug_assert!(r < 8);
    ((1u32 << r) | (u32::from(o) >> (8 - r))) as u8
}

/// For each octet, the indices of the 8 in-node prefixes (lengths 0..=7) that contain it.
static ANCESTORS: [Bits; 256] = {
    let mut table = [[0u64; 4]; 256];
    let mut o = 0;
    while o < 256 {
        let mut r = 0;
        while r < 8 {
            let idx = (1usize << r) | (o >> (8 - r));
            table[o][idx >> 6] |= 1 << (idx & 63);
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

/// Most nodes below the hot upper levels have a handful of children; up to this many octets of
/// each kind are kept as a sorted list inside the node instead of a 256-bit bitmap.
const SPARSE: usize = 14;

/// A set of next octets, with the rank of each member (how many smaller members there are),
/// which is its position in the node's array.
///
/// Sparse sets live inline in the node, so that a node is one 64-byte cache line; dense sets
/// (from [`SPARSE`] + 1 members) are a boxed bitmap.
enum OctetSet {
    Sparse { len: u8, octets: [u8; SPARSE] },
    Dense(Box<Bits>),
}

impl OctetSet {
    const EMPTY: OctetSet = OctetSet::Sparse { len: 0, octets: [0; SPARSE] };

    /// The rank of `o` if it is a member.
    #[inline(always)]
    fn find(&self, o: u8) -> Option<usize> {
        match self {
            OctetSet::Sparse { len, octets } => octets[..usize::from(*len)].iter().position(|x| *x == o),
            OctetSet::Dense(bits) => bit_test(bits, o).then(|| rank(bits, o)),
        }
    }

    /// How many members are smaller than `o`.
    fn rank(&self, o: u8) -> usize {
        match self {
            OctetSet::Sparse { len, octets } => octets[..usize::from(*len)].iter().filter(|x| **x < o).count(),
            OctetSet::Dense(bits) => rank(bits, o),
        }
    }

    fn len(&self) -> usize {
        match self {
            OctetSet::Sparse { len, .. } => usize::from(*len),
            OctetSet::Dense(bits) => bits.iter().map(|w| w.count_ones() as usize).sum(),
        }
    }

    /// Adds `o` (not yet a member) and returns its rank.
    fn insert(&mut self, o: u8) -> usize {
        let at = self.rank(o);
        match self {
            OctetSet::Sparse { len, octets } if usize::from(*len) < SPARSE => {
                let n = usize::from(*len);
                octets.copy_within(at..n, at + 1);
                octets[at] = o;
                *len += 1;
            }
            OctetSet::Sparse { len, octets } => {
                let mut bits = [0u64; 4];
                for x in &octets[..usize::from(*len)] {
                    bit_set(&mut bits, *x);
                }
                bit_set(&mut bits, o);
                *self = OctetSet::Dense(Box::new(bits));
            }
            OctetSet::Dense(bits) => bit_set(bits, o),
        }
        at
    }

    /// Removes `o` (a member) at rank `at`.
    fn remove(&mut self, o: u8, at: usize) {
        match self {
            OctetSet::Sparse { len, octets } => {
                let n = usize::from(*len);
                octets.copy_within(at + 1..n, at);
                *len -= 1;
            }
            OctetSet::Dense(bits) => {
                bit_clear(bits, o);
                // Back to the inline form once well below the threshold (hysteresis avoids
                // flapping at the boundary).
                if self.len() <= SPARSE / 2 {
                    *self = OctetSet::from_iter(self.iter());
                }
            }
        }
    }

    /// Members in increasing order.
    fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        let (sparse, dense) = match self {
            OctetSet::Sparse { len, octets } => (&octets[..usize::from(*len)], None),
            OctetSet::Dense(bits) => (&[][..], Some(bits)),
        };
        sparse
            .iter()
            .copied()
            .chain(dense.into_iter().flat_map(|bits| (0u8..=255).filter(|o| bit_test(bits, *o))))
    }

    fn from_iter(members: impl Iterator<Item = u8>) -> Self {
        let mut set = OctetSet::EMPTY;
        for o in members {
            set.insert(o);
        }
        set
    }

    fn heap_bytes(&self) -> usize {
        match self {
            OctetSet::Sparse { .. } => 0,
            OctetSet::Dense(_) => std::mem::size_of::<Bits>(),
        }
    }
}

/// Filters ending in a node: the complete-binary-tree bitmap (see the module docs) and their
/// entries, in bitmap order. Boxed, because most nodes below the upper levels have none.
struct Prefixes<V> {
    bits: Bits,
    items: ThinVec<Entry<V>>,
}

/// One level of the trie, deciding 8 bits: exactly one cache line.
///
/// Child nodes are stored inline in their parent's `nodes` array, so a lookup reads one line
/// per level, and with sparse child sets the line holds everything needed to find the next
/// node or leaf.
#[repr(align(64))]
struct Node<V> {
    prefixes: Option<Box<Prefixes<V>>>,
    leaf_set: OctetSet,
    node_set: OctetSet,
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
    #[inline(always)]
    fn touch(&self) -> u64 {
        match self {
            // The header line, and behind it the prefix bitmap when the node has one.
            Next::Node(node) => node.prefixes.as_ref().map_or(1, |p| p.bits[0]),
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

/// The bits of in-node prefix `idx` placed at depth `depth` of a key.
fn prefix_bits(idx: u8, depth: u32) -> u128 {
    let r = 7 - idx.leading_zeros();
    let bits = u128::from(idx) - (1 << r);
    if r == 0 { 0 } else { bits << (128 - (8 * depth + r)) }
}

impl<V: Copy + Eq + Hash> Node<V> {
    fn empty() -> Self {
        Node {
            prefixes: None,
            leaf_set: OctetSet::EMPTY,
            node_set: OctetSet::EMPTY,
            leaves: ThinVec::new(),
            nodes: ThinVec::new(),
        }
    }

    fn entries(&self) -> usize {
        self.prefixes.as_ref().map_or(0, |p| p.items.len()) + self.leaves.len() + self.nodes.len()
    }

    /// Places a filter's entry in the subtree of this node at `depth`. Returns true if anything
    /// was added (false only when every value was already there).
    fn insert(&mut self, depth: u32, key: u128, entry: Entry<V>, big: &mut BigSets<V>) -> bool {
        let base = 8 * depth;
        let len = u32::from(entry.len);
        let o = octet(key, depth);
        if len < base + 8 {
            let idx = prefix_index(o, len - base);
            let prefixes = self
                .prefixes
                .get_or_insert_with(|| Box::new(Prefixes { bits: [0; 4], items: ThinVec::new() }));
            let at = rank(&prefixes.bits, idx);
            if bit_test(&prefixes.bits, idx) {
                return prefixes.items[at].merge(key, entry, big);
            }
            bit_set(&mut prefixes.bits, idx);
            vec_insert(&mut prefixes.items, at, entry);
            return true;
        }
        if let Some(at) = self.node_set.find(o) {
            return self.nodes[at].insert(depth + 1, key, entry, big);
        }
        let Some(at) = self.leaf_set.find(o) else {
            let at = self.leaf_set.insert(o);
            vec_insert(&mut self.leaves, at, Leaf::new(key, entry));
            return true;
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
        self.leaf_set.remove(o, at);
        let mut node = Node::empty();
        node.insert(depth + 1, old.key(), old.entry, big);
        let added = node.insert(depth + 1, key, entry, big);
        let at = self.node_set.insert(o);
        vec_insert(&mut self.nodes, at, node);
        added
    }

    /// Removes `v` from the filter; returns whether it was present.
    fn remove(&mut self, depth: u32, key: u128, len: u8, v: V, big: &mut BigSets<V>) -> bool {
        let base = 8 * depth;
        let o = octet(key, depth);
        if u32::from(len) < base + 8 {
            let idx = prefix_index(o, u32::from(len) - base);
            let Some(prefixes) = &mut self.prefixes else { return false };
            if !bit_test(&prefixes.bits, idx) {
                return false;
            }
            let at = rank(&prefixes.bits, idx);
            return match prefixes.items[at].remove(key, v, big) {
                Removal::Absent => false,
                Removal::Removed => true,
                Removal::Emptied => {
                    bit_clear(&mut prefixes.bits, idx);
                    vec_remove(&mut prefixes.items, at);
                    if prefixes.items.is_empty() {
                        self.prefixes = None;
                    }
                    true
                }
            };
        }
        if let Some(at) = self.leaf_set.find(o) {
            let leaf = &mut self.leaves[at];
            if leaf.entry.len != len || leaf.key() != key {
                return false;
            }
            return match leaf.entry.remove(key, v, big) {
                Removal::Absent => false,
                Removal::Removed => true,
                Removal::Emptied => {
                    self.leaf_set.remove(o, at);
                    vec_remove(&mut self.leaves, at);
                    true
                }
            };
        }
        let Some(at) = self.node_set.find(o) else { return false };
        let removed = self.nodes[at].remove(depth + 1, key, len, v, big);
        if removed {
            self.compact_child(depth, key, o, at);
        }
        removed
    }

    /// Restores path compression below child `o` after a removal: an empty child node goes
    /// away, and a child node left with a single filter becomes a leaf again.
    fn compact_child(&mut self, depth: u32, key: u128, o: u8, at: usize) {
        let node = &mut self.nodes[at];
        let lone = match node.entries() {
            0 => None,
            1 if node.leaves.len() == 1 => Some(vec_remove(&mut node.leaves, 0)),
            1 => match node.prefixes.take() {
                Some(prefixes) if prefixes.items.len() == 1 => {
                    let idx = (1u8..=255).find(|i| bit_test(&prefixes.bits, *i)).expect("one prefix");
                    let child_base = 8 * (depth + 1);
                    let key = (key & mask(child_base)) | prefix_bits(idx, depth + 1);
                    let mut items = prefixes.items;
                    let entry = items.pop().expect("one item");
                    Some(Leaf::new(key, entry))
                }
                other => {
                    node.prefixes = other;
                    return;
                }
            },
            _ => return,
        };
        vec_remove(&mut self.nodes, at);
        self.node_set.remove(o, at);
        if let Some(leaf) = lone {
            let at = self.leaf_set.insert(o);
            vec_insert(&mut self.leaves, at, leaf);
        }
    }

    /// Visits the values of every filter in this node that covers octet `o`.
    ///
    /// Two passes: the first finds the (at most 8) covering entries and touches their value
    /// lists, so the loads of all of them are in flight together; the second visits.
    #[inline(always)]
    fn visit_prefixes(&self, o: u8, f: &mut impl FnMut(V)) {
        let Some(prefixes) = &self.prefixes else { return };
        let a = &ANCESTORS[usize::from(o)];
        let mut found = [0usize; 8];
        let mut n = 0;
        let mut warm = 0usize;
        let mut before = 0usize;
        for (&p, &ancestors) in prefixes.bits.iter().zip(a) {
            let mut hits = p & ancestors;
            while hits != 0 {
                let bit = hits.trailing_zeros();
                let at = before + (p & ((1u64 << bit) - 1)).count_ones() as usize;
                warm ^= prefixes.items[at].more.len();
                found[n] = at;
                n += 1;
                hits &= hits - 1;
            }
            before += p.count_ones() as usize;
        }
        std::hint::black_box(warm);
        for at in &found[..n] {
            prefixes.items[*at].for_each(f);
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
        if let Some(at) = self.node_set.find(o) {
            Next::Node(&self.nodes[at])
        } else if let Some(at) = self.leaf_set.find(o) {
            Next::Leaf(&self.leaves[at])
        } else {
            Next::Done
        }
    }

    /// The entry stored for exactly this filter, if any.
    fn find(&self, depth: u32, key: u128, len: u8) -> Option<&Entry<V>> {
        let base = 8 * depth;
        let o = octet(key, depth);
        if u32::from(len) < base + 8 {
            let idx = prefix_index(o, u32::from(len) - base);
            let prefixes = self.prefixes.as_ref()?;
            return bit_test(&prefixes.bits, idx).then(|| &prefixes.items[rank(&prefixes.bits, idx)]);
        }
        if let Some(at) = self.node_set.find(o) {
            return self.nodes[at].find(depth + 1, key, len);
        }
        let leaf = &self.leaves[self.leaf_set.find(o)?];
        (leaf.entry.len == len && leaf.key() == key).then_some(&leaf.entry)
    }

    fn heap_bytes(&self) -> usize {
        let prefixes = self.prefixes.as_ref().map_or(0, |p| {
            std::mem::size_of::<Prefixes<V>>()
                + thin_heap_bytes(&p.items)
                + p.items.iter().map(Entry::heap_bytes).sum::<usize>()
        });
        prefixes
            + self.leaf_set.heap_bytes()
            + self.node_set.heap_bytes()
            + thin_heap_bytes(&self.leaves)
            + thin_heap_bytes(&self.nodes)
            + self.leaves.iter().map(|l| l.entry.heap_bytes()).sum::<usize>()
            + self.nodes.iter().map(Node::heap_bytes).sum::<usize>()
    }

    fn for_each_entry(&self, depth: u32, path: u128, f: &mut impl FnMut(Filter, V)) {
        let filter = |key: u128, len: u8| Filter::new(Name::new(key), len).expect("len <= 128");
        if let Some(prefixes) = &self.prefixes {
            let mut items = prefixes.items.iter();
            for idx in (1u8..=255).filter(|i| bit_test(&prefixes.bits, *i)) {
                let entry = items.next().expect("one item per prefix bit");
                let filter = filter(path | prefix_bits(idx, depth), entry.len);
                entry.for_each(&mut |v| f(filter, v));
            }
        }
        for leaf in self.leaves.iter() {
            let filter = filter(leaf.key(), leaf.entry.len);
            leaf.entry.for_each(&mut |v| f(filter, v));
        }
        for (o, node) in self.node_set.iter().zip(self.nodes.iter()) {
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
        let key = filter.name().to_u128();
        self.root
            .find(0, key, filter.prefix_len())
            .is_some_and(|entry| entry.contains(key, value, &self.big))
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
    /// indices interleave.
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
            assert_eq!(count(&ANCESTORS[usize::from(o)]), 8);
            assert!(bit_test(&ANCESTORS[usize::from(o)], 1));
            assert!(bit_test(&ANCESTORS[usize::from(o)], 128 | (o >> 1)));
        }
    }

    #[test]
    fn layout_stays_small() {
        assert_eq!(std::mem::size_of::<Leaf<u32>>(), 32);
        assert_eq!(std::mem::size_of::<Entry<u32>>(), 16);
        assert_eq!(std::mem::size_of::<Node<u32>>(), 64);
        assert_eq!(std::mem::size_of::<OctetSet>(), 16);
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
        assert_eq!(t.root.node_set.len(), 0);
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
    fn for_each_lists_pairs() {
        let mut t = SubscriptionTable::new();
        let fs = [
            filter("0x0/0"),
            filter("0x80000000000000000000000000000000/1"),
            filter("0xff000000000000000000000000000000/8"),
            filter("0xff010000000000000000000000000000/15"),
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
