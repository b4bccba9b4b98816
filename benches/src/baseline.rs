//! The structures Canopy's [`SubscriptionTable`](canopy::SubscriptionTable) is measured
//! against, behind one small trait so the benches treat all of them alike.

use canopy::{Filter, Name, SubscriptionTable};
use prefix_trie::PrefixMap;
use rustc_hash::FxHashMap;

/// What the name-matching bench needs from a structure.
pub trait Matcher {
    /// Label for reports.
    const LABEL: &'static str;
    /// Builds the structure from `(filter, value)` pairs.
    fn build(subs: &[(Filter, u32)]) -> Self;
    /// Calls `f` for every value whose filter covers `name`.
    fn lookup(&self, name: Name, f: impl FnMut(u32));
}

impl Matcher for SubscriptionTable<u32> {
    const LABEL: &'static str = "canopy";

    fn build(subs: &[(Filter, u32)]) -> Self {
        let mut table = SubscriptionTable::new();
        for (f, v) in subs {
            table.insert(*f, *v);
        }
        table
    }

    fn lookup(&self, name: Name, f: impl FnMut(u32)) {
        self.for_each_match(name, f)
    }
}

/// The `prefix-trie` crate's `PrefixMap` over `(u128, u8)` prefixes, each holding the values
/// of its filter; lookups use `cover()`.
pub struct PrefixTrie(PrefixMap<(u128, u8), Vec<u32>>);

impl Matcher for PrefixTrie {
    const LABEL: &'static str = "prefix-trie";

    fn build(subs: &[(Filter, u32)]) -> Self {
        let mut map: PrefixMap<(u128, u8), Vec<u32>> = PrefixMap::new();
        for (f, v) in subs {
            map.entry((f.name().to_u128(), f.prefix_len())).or_default().push(*v);
        }
        PrefixTrie(map)
    }

    fn lookup(&self, name: Name, mut f: impl FnMut(u32)) {
        for (_, values) in self.0.cover(&(name.to_u128(), 128)) {
            values.iter().for_each(|v| f(*v));
        }
    }
}

/// One hash table per prefix length, with a bitmap of the lengths present: a lookup probes
/// every present length.
pub struct PerLengthHash {
    present: [u64; 3],
    tables: Vec<FxHashMap<u128, Vec<u32>>>,
}

impl Matcher for PerLengthHash {
    const LABEL: &'static str = "hash-per-length";

    fn build(subs: &[(Filter, u32)]) -> Self {
        let mut tables: Vec<FxHashMap<u128, Vec<u32>>> = (0..=128).map(|_| FxHashMap::default()).collect();
        let mut present = [0u64; 3];
        for (f, v) in subs {
            let len = usize::from(f.prefix_len());
            present[len / 64] |= 1 << (len % 64);
            tables[len].entry(f.name().to_u128()).or_default().push(*v);
        }
        PerLengthHash { present, tables }
    }

    fn lookup(&self, name: Name, mut f: impl FnMut(u32)) {
        let name = name.to_u128();
        for (w, word) in self.present.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let len = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                if let Some(values) = self.tables[len].get(&(name & mask)) {
                    values.iter().for_each(|v| f(*v));
                }
            }
        }
    }
}
