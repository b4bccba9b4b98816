//! `SubscriptionTable` paths the property test rarely reaches: position indexes of filters
//! with many values while their entries move between trie levels, dense child sets below the
//! root, and the deepest level of the trie.

use std::collections::HashSet;

use canopy::{Filter, Name, SubscriptionTable};

fn f(n: u128, l: u8) -> Filter {
    Filter::new(Name::new(n), l).unwrap()
}

fn hits(t: &SubscriptionTable<u32>, n: u128) -> Vec<u32> {
    let mut v = vec![];
    t.for_each_match(Name::new(n), |x| v.push(x));
    v.sort();
    v
}

#[test]
fn big_value_set_survives_leaf_moves() {
    let (a, b) = (f(0xab00 << 112, 12), f(0xab05 << 112, 16));
    let mut t = SubscriptionTable::new();
    let mut live: HashSet<u32> = (0..100).collect();
    for v in 0..100 {
        assert!(t.insert(a, v));
    }
    // Push-down: `a` becomes a prefix one level below the root.
    assert!(t.insert(b, 1000));
    for v in (0..100).step_by(3) {
        assert!(t.remove(a, v));
        live.remove(&v);
    }
    // Prefix → leaf collapse, key rebuilt from the path.
    assert!(t.remove(b, 1000));
    for v in (0..100).rev() {
        assert_eq!(t.contains(a, v), live.contains(&v));
        assert_eq!(t.remove(a, v), live.remove(&v));
        let mut want: Vec<_> = live.iter().copied().collect();
        want.sort();
        assert_eq!(hits(&t, 0xab0f << 112), want);
    }
    assert!(t.is_empty());
    assert_eq!(t.heap_bytes(), 0);
}

#[test]
fn dense_sets_below_the_root_and_batches() {
    let base = 0x77u128 << 120;
    let mut t = SubscriptionTable::new();
    for o in 0..=255u128 {
        t.insert(f(base | o << 112, 16), o as u32);
        if o.is_multiple_of(2) {
            t.insert(f(base | o << 112 | 0x5 << 104, 24), 1000 + o as u32);
        }
    }
    let names: Vec<Name> = (0..=255u128).map(|o| Name::new(base | o << 112 | 0x5 << 104 | 1)).collect();
    let mut got = vec![vec![]; names.len()];
    t.for_each_match_batch(&names, |i, v| got[i].push(v));
    for (i, n) in names.iter().enumerate() {
        got[i].sort();
        assert_eq!(got[i], hits(&t, n.to_u128()));
        let o = i as u32;
        let want: Vec<u32> = if o.is_multiple_of(2) { vec![o, 1000 + o] } else { vec![o] };
        assert_eq!(got[i], want);
    }
    for o in 0..=252u128 {
        assert!(t.remove(f(base | o << 112, 16), o as u32));
    }
    let mut n = 0;
    t.for_each(|fl, v| {
        assert!(t.contains(fl, v));
        n += 1
    });
    assert_eq!(n, t.len());
}

#[test]
fn deepest_level() {
    let base = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f00u128;
    let mut t = SubscriptionTable::new();
    for l in 120..=127u8 {
        t.insert(f(base, l), l as u32);
    }
    for o in 0..=255u128 {
        t.insert(f(base | o, 128), 1000 + o as u32);
    }
    for o in 0..=255u128 {
        let mut want: Vec<u32> = (120..=127).filter(|&l| (o >> (128 - l)) == 0).collect();
        want.push(1000 + o as u32);
        want.sort();
        assert_eq!(hits(&t, base | o), want);
    }
    for o in 0..=255u128 {
        assert!(t.remove(f(base | o, 128), 1000 + o as u32));
    }
    for l in 120..=127u8 {
        assert!(t.remove(f(base, l), l as u32));
    }
    assert!(t.is_empty());
    assert_eq!(t.heap_bytes(), 0);
}

#[test]
fn many_subscribers_of_one_filter_give_memory_back() {
    let mut t = SubscriptionTable::new();
    for v in 0..100_000 {
        t.insert(Filter::ALL, v);
    }
    let full = t.heap_bytes();
    for v in 2..100_000 {
        assert!(t.remove(Filter::ALL, v));
    }
    assert_eq!(hits(&t, 7), [0, 1]);
    assert!(t.heap_bytes() < full / 100, "{} of {full} bytes kept", t.heap_bytes());
}
