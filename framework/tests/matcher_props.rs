//! `SubscriptionTable` against a naive reference: a set of pairs scanned on every lookup.

use std::collections::HashSet;

use canopy::{Filter, Name, SubscriptionTable};
use proptest::prelude::*;

/// Names drawn near a few bases, so filters nest, share paths and collide often.
fn name_strategy() -> impl Strategy<Value = u128> {
    let bases = [
        0u128,
        u128::MAX,
        0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00,
        0x1122_3344_5566_0000_0000_0000_0000_0000,
        0x8000_0000_0000_0000_0000_0000_0000_0001,
    ];
    prop_oneof![
        any::<u128>(),
        (prop::sample::select(bases.to_vec()), 0u32..128, any::<u128>())
            .prop_map(|(base, keep, noise)| {
                // Keep the top `keep` bits of a base, randomise the rest.
                let mask = if keep == 0 { 0 } else { u128::MAX << (128 - keep) };
                (base & mask) | (noise & !mask)
            }),
        prop::sample::select(bases.to_vec()),
    ]
}

fn len_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![0u8..=128, Just(0u8), Just(128u8), prop::sample::select(vec![7u8, 8, 9, 64, 120, 127])]
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u128, u8, u8),
    Remove(u128, u8, u8),
    Lookup(u128),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (name_strategy(), len_strategy(), 0u8..4).prop_map(|(n, l, v)| Op::Insert(n, l, v)),
        2 => (name_strategy(), len_strategy(), 0u8..4).prop_map(|(n, l, v)| Op::Remove(n, l, v)),
        3 => name_strategy().prop_map(Op::Lookup),
    ]
}

/// Few filters, many values each: short filters outgrow their node's shared value pool and
/// return to it as values leave.
fn crowded_op_strategy() -> impl Strategy<Value = Op> {
    let base = 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00u128;
    let filter = prop::sample::select(vec![(base, 8u8), (base, 12), (base, 21), (0, 0)]);
    prop_oneof![
        8 => (filter.clone(), 0u8..200).prop_map(|((n, l), v)| Op::Insert(n, l, v)),
        3 => (filter, 0u8..200).prop_map(|((n, l), v)| Op::Remove(n, l, v)),
        1 => name_strategy().prop_map(Op::Lookup),
    ]
}

fn reference_matches(pairs: &HashSet<(Filter, u8)>, name: Name) -> Vec<(u8, Filter)> {
    let mut out: Vec<_> = pairs.iter().filter(|(f, _)| f.matches(name)).map(|(f, v)| (*v, *f)).collect();
    out.sort();
    out
}

/// Applies `ops` to a table and to the reference, checking every answer, then lists, looks up in
/// batches and empties the table.
fn agrees_with_reference(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut table: SubscriptionTable<(u8, Filter)> = SubscriptionTable::new();
    let mut reference: HashSet<(Filter, u8)> = HashSet::new();
    let mut lookups = Vec::new();
    for op in ops {
        match op {
            Op::Insert(n, l, v) => {
                let f = Filter::new(Name::new(n), l).unwrap();
                // The value carries its filter, so the check below also proves each value
                // is reported for the right filter.
                prop_assert_eq!(table.insert(f, (v, f)), reference.insert((f, v)));
            }
            Op::Remove(n, l, v) => {
                let f = Filter::new(Name::new(n), l).unwrap();
                prop_assert_eq!(table.remove(f, (v, f)), reference.remove(&(f, v)));
            }
            Op::Lookup(n) => {
                let name = Name::new(n);
                let mut got = Vec::new();
                table.for_each_match(name, |v| got.push(v));
                got.sort();
                prop_assert_eq!(&got, &reference_matches(&reference, name));
                lookups.push(name);
            }
        }
        prop_assert_eq!(table.len(), reference.len());
    }
    // Every pair is listed exactly once, and contains() agrees.
    let mut listed = Vec::new();
    table.for_each(|f, (v, g)| { assert_eq!(f, g); listed.push((f, v)); });
    listed.sort();
    let mut want: Vec<_> = reference.iter().copied().collect();
    want.sort();
    prop_assert_eq!(&listed, &want);
    for (f, v) in &want {
        prop_assert!(table.contains(*f, (*v, *f)));
    }
    // The batched lookup reports the same as single lookups, per index.
    let mut batched = vec![Vec::new(); lookups.len()];
    table.for_each_match_batch(&lookups, |i, v| batched[i].push(v));
    for (name, mut got) in lookups.iter().zip(batched) {
        got.sort();
        prop_assert_eq!(got, reference_matches(&reference, *name));
    }
    // Removing everything leaves an empty table that matches nothing.
    for (f, v) in want {
        prop_assert!(table.remove(f, (v, f)));
    }
    prop_assert!(table.is_empty());
    let mut any = false;
    table.for_each_match(Name::new(0), |_| any = true);
    prop_assert!(!any);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_reference_on_mixed_tables(ops in prop::collection::vec(op_strategy(), 1..300)) {
        agrees_with_reference(ops)?;
    }

    #[test]
    fn agrees_with_reference_on_crowded_filters(ops in prop::collection::vec(crowded_op_strategy(), 200..1500)) {
        agrees_with_reference(ops)?;
    }

    #[test]
    fn every_name_under_a_filter_matches_it(n in any::<u128>(), l in 0u8..=128, noise in any::<u128>()) {
        let f = Filter::new(Name::new(n), l).unwrap();
        let mut table = SubscriptionTable::new();
        table.insert(f, 1u8);
        let (lo, hi) = f.range();
        let inside = lo.to_u128() | (noise & (hi.to_u128() ^ lo.to_u128()));
        let mut hits = 0;
        table.for_each_match(Name::new(inside), |_| hits += 1);
        prop_assert_eq!(hits, 1);
        if l > 0 {
            let outside = inside ^ (1u128 << (128 - u32::from(l)));
            let mut hits = 0;
            table.for_each_match(Name::new(outside), |_| hits += 1);
            prop_assert_eq!(hits, 0);
        }
    }
}
