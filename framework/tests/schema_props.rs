//! Property tests for `Schema`: packing, text forms and filters over random field layouts.

use canopy::{Filter, Name, Schema, SchemaError};
use proptest::prelude::*;

/// A random split of 128 bits into 1..=128 fields named `f0`, `f1`, …
fn schema() -> impl Strategy<Value = Schema> {
    prop_oneof![
        // Few fields: the common shape.
        prop::sample::subsequence((1u8..128).collect::<Vec<_>>(), 0..12),
        // Any number of fields, up to 128 one-bit fields.
        prop::sample::subsequence((1u8..128).collect::<Vec<_>>(), 0..=127),
    ]
    .prop_map(|cuts| {
        let mut widths = Vec::new();
        let mut prev = 0u8;
        for cut in cuts.into_iter().chain([128]) {
            widths.push(cut - prev);
            prev = cut;
        }
        Schema::new(widths.into_iter().enumerate().map(|(i, w)| (format!("f{i}"), w))).unwrap()
    })
}

fn max_of(width: u8) -> u128 {
    if width == 128 { u128::MAX } else { (1 << width) - 1 }
}

/// A schema and one in-range value per field (from raw random bits, biased towards edges).
fn schema_and_values() -> impl Strategy<Value = (Schema, Vec<u128>)> {
    schema().prop_flat_map(|s| {
        let widths: Vec<u8> = s.fields().map(|(_, w, _)| w).collect();
        let values = widths
            .into_iter()
            .map(|w| {
                prop_oneof![
                    Just(0),
                    Just(max_of(w)),
                    any::<u128>().prop_map(move |v| v & max_of(w))
                ]
            })
            .collect::<Vec<_>>();
        (Just(s), values)
    })
}

fn names(s: &Schema) -> Vec<String> {
    s.fields().map(|(n, _, _)| n.to_owned()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn layout_is_contiguous_and_declaration_round_trips(s in schema()) {
        let mut end = 0u32;
        for (_, width, offset) in s.fields() {
            prop_assert_eq!(u32::from(offset), end);
            end += u32::from(width);
        }
        prop_assert_eq!(end, 128);
        prop_assert_eq!(s.to_string().parse::<Schema>().unwrap(), s.clone());
        for (i, name) in names(&s).iter().enumerate() {
            prop_assert_eq!(s.field_index(name), Some(i));
        }
    }

    #[test]
    fn pack_unpack_round_trip((s, values) in schema_and_values()) {
        let name = s.pack(&values).unwrap();
        prop_assert_eq!(s.unpack(name), values.clone());
        // Each field sits exactly at its offset.
        for ((field, width, offset), &v) in s.fields().zip(&values) {
            let shift = 128 - u32::from(offset) - u32::from(width);
            prop_assert_eq!((name.to_u128() >> shift) & max_of(width), v);
            prop_assert_eq!(s.get(name, field).unwrap(), v);
        }
        let keyed: Vec<(String, u128)> = names(&s).into_iter().zip(values.iter().copied()).collect();
        let keyed: Vec<(&str, u128)> = keyed.iter().rev().map(|(n, v)| (n.as_str(), *v)).collect();
        prop_assert_eq!(s.pack_fields(&keyed).unwrap(), name);
    }

    #[test]
    fn unpack_pack_round_trip(s in schema(), raw in any::<u128>()) {
        let name = Name::new(raw);
        prop_assert_eq!(s.pack(&s.unpack(name)).unwrap(), name);
    }

    #[test]
    fn with_sets_one_field((s, values) in schema_and_values(), raw in any::<u128>(), pick in any::<prop::sample::Index>()) {
        let name = Name::new(raw);
        let i = pick.index(values.len());
        let field = names(&s)[i].clone();
        let updated = s.with(name, &field, values[i]).unwrap();
        let mut want = s.unpack(name);
        want[i] = values[i];
        prop_assert_eq!(s.unpack(updated), want);
    }

    #[test]
    fn render_parse_round_trip(s in schema(), raw in any::<u128>()) {
        let name = Name::new(raw);
        let text = s.render(name);
        prop_assert_eq!(s.parse_name(&text).unwrap(), name);
        // Any order of the parts parses the same.
        let mut parts: Vec<&str> = text.split('/').collect();
        parts.reverse();
        prop_assert_eq!(s.parse_name(&parts.join("/")).unwrap(), name);
    }

    #[test]
    fn filter_matches_exactly_the_leading_fields(
        (s, values) in schema_and_values(),
        k_pick in any::<prop::sample::Index>(),
        other in any::<u128>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let n = values.len();
        let k = k_pick.index(n + 1);
        let filter = s.filter(&values[..k]).unwrap();
        let len: u32 = s.fields().take(k).map(|(_, w, _)| u32::from(w)).sum();
        prop_assert_eq!(u32::from(filter.prefix_len()), len);

        // A name with the first k fields fixed and random other fields matches.
        let mut fields = s.unpack(Name::new(other));
        fields[..k].copy_from_slice(&values[..k]);
        let inside = s.pack(&fields).unwrap();
        prop_assert!(filter.matches(inside));

        // Changing any one of the first k fields leaves the filter.
        if k > 0 {
            let i = flip.index(k);
            let mut moved = fields.clone();
            moved[i] ^= 1;
            prop_assert!(!filter.matches(s.pack(&moved).unwrap()));
        }

        // The keyed form and the text form agree.
        let names = names(&s);
        let keyed: Vec<(&str, u128)> =
            names.iter().zip(&values).take(k).rev().map(|(n, v)| (n.as_str(), *v)).collect();
        prop_assert_eq!(s.filter_fields(&keyed).unwrap(), filter);
        prop_assert_eq!(s.parse_filter(&s.render_filter(filter)).unwrap(), filter);
        if k > 0 {
            let open = format!("{}/*", s.render_filter(filter));
            prop_assert_eq!(s.parse_filter(&open).unwrap(), filter);
        }
    }

    #[test]
    fn keyed_filter_rejects_gaps((s, values) in schema_and_values(), skip in any::<prop::sample::Index>(), upto in any::<prop::sample::Index>()) {
        let n = values.len();
        prop_assume!(n >= 2);
        let gap = skip.index(n - 1); // a field that is left out ...
        let last = gap + 1 + upto.index(n - gap - 1); // ... below a field that is given
        let names = names(&s);
        let keyed: Vec<(&str, u128)> = (0..=last)
            .filter(|&i| i != gap)
            .map(|i| (names[i].as_str(), values[i]))
            .collect();
        let err = s.filter_fields(&keyed).unwrap_err();
        let (field, missing) = match &err {
            SchemaError::NotLeadingRun { field, missing, .. } => (field.clone(), missing.clone()),
            other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
        };
        prop_assert_eq!(&missing, &names[gap]);
        prop_assert_eq!(&field, &names[gap + 1]);
        let text = keyed.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("/");
        prop_assert_eq!(s.parse_filter(&text).unwrap_err(), err);
    }

    #[test]
    fn any_filter_renders_and_parses_back(s in schema(), raw in any::<u128>(), len in 0u8..=128) {
        let filter = Filter::new(Name::new(raw), len).unwrap();
        prop_assert_eq!(s.parse_filter(&s.render_filter(filter)).unwrap(), filter);
    }

    #[test]
    fn overflow_is_an_error_never_truncation(
        (s, values) in schema_and_values(),
        pick in any::<prop::sample::Index>(),
        extra in any::<u128>(),
    ) {
        let widths: Vec<u8> = s.fields().map(|(_, w, _)| w).collect();
        let i = pick.index(values.len());
        prop_assume!(widths[i] < 128);
        let too_big = (max_of(widths[i]) + 1).saturating_add(extra >> widths[i]);
        let field = names(&s)[i].clone();
        let want = SchemaError::Overflow { field: field.clone(), value: too_big, width: widths[i] };
        let mut bad = values.clone();
        bad[i] = too_big;
        prop_assert_eq!(s.pack(&bad), Err(want.clone()));
        prop_assert_eq!(s.filter(&bad[..=i]), Err(want.clone()));
        prop_assert_eq!(s.pack_fields(&[(field.as_str(), too_big)]), Err(want.clone()));
        prop_assert_eq!(s.with(Name::MIN, &field, too_big), Err(want.clone()));
        prop_assert_eq!(s.parse_name(&format!("{field}={too_big}")), Err(want.clone()));
        prop_assert_eq!(s.parse_name(&format!("{field}=0x{too_big:x}")), Err(want));
    }

    #[test]
    fn hash_fits_its_field(s in schema(), text in ".{0,40}") {
        let full = Schema::new([("all", 128)]).unwrap().hash_text("all", &text).unwrap();
        for (field, width, _) in s.fields() {
            let h = s.hash_text(field, &text).unwrap();
            prop_assert!(h <= max_of(width));
            prop_assert_eq!(h, full >> (128 - u32::from(width)));
        }
    }
}

#[test]
fn messenger_field_boundaries() {
    let s = Schema::messenger();
    let ends: Vec<u32> = s.fields().map(|(_, w, o)| u32::from(o) + u32::from(w)).collect();
    assert_eq!(ends, [24, 32, 40, 58, 78, 88, 108, 128]);
    let names: Vec<&str> = s.fields().map(|(n, _, _)| n).collect();
    assert_eq!(names, ["origin", "app", "path", "org", "team", "channel", "device", "msg"]);
    assert_eq!(s.to_string(), canopy::MESSENGER_LAYOUT);
    for (k, end) in [0u8, 24, 32, 40, 58, 78, 88, 108, 128].into_iter().enumerate() {
        assert_eq!(s.filter(&vec![0; k]).unwrap().prefix_len(), end);
    }
}

#[test]
fn hash_text_pinned_vector() {
    // printf 'example.com' | sha256sum
    // a379a6f6eeafb9a55e378c118034e2751e682fab9f2d30ab13d2125586ce1947
    let s = Schema::messenger();
    assert_eq!(s.hash_text("origin", "example.com").unwrap(), 0xa379a6);
    let whole = Schema::new([("all", 128)]).unwrap();
    assert_eq!(whole.hash_text("all", "example.com").unwrap(), 0xa379a6f6eeafb9a55e378c118034e275);
}
