//! Schemas: named bit fields that give 128-bit names structure.
//!
//! Apps do not hand-pack bits. A [`Schema`] is a list of named fields, most significant first,
//! whose widths sum to exactly 128. It packs field values into a [`Name`], unpacks them again,
//! builds the [`Filter`] for "every name whose first *k* fields equal these values", and
//! converts names and filters to and from a readable `field=value/field=value` text form.
//!
//! Because fields are laid out most significant first, fixing a leading run of fields fixes a
//! prefix of the name's bits, so the filter for "this team" or "this channel" is an ordinary
//! netmask [`Filter`] and every name inside the team or channel matches it.
//!
//! ```
//! use canopy::Schema;
//!
//! let s = Schema::messenger();
//! assert_eq!(s.to_string(), "origin:24 app:8 path:8 org:18 team:20 channel:10 device:20 msg:20");
//!
//! // Message 42 from device 9 in channel 3 of team 5 of org 7, on example.com's app 1.
//! let origin = s.hash_text("origin", "example.com")?;
//! assert_eq!(origin, 0xa379a6); // top 24 bits of SHA-256("example.com")
//! let name = s.pack(&[origin, 1, 1, 7, 5, 3, 9, 42])?;
//! assert_eq!(s.get(name, "team")?, 5);
//! assert_eq!(s.unpack(name), [origin, 1, 1, 7, 5, 3, 9, 42]);
//! assert_eq!(
//!     s.render(name),
//!     "origin=10713510/app=1/path=1/org=7/team=5/channel=3/device=9/msg=42",
//! );
//! assert_eq!(s.parse_name(&s.render(name))?, name);
//!
//! // The keyed form: fields not mentioned are 0.
//! let keyed = s.pack_fields(&[("msg", 42), ("device", 9), ("channel", 3), ("team", 5),
//!                             ("org", 7), ("path", 1), ("app", 1), ("origin", origin)])?;
//! assert_eq!(keyed, name);
//!
//! // Everything in channel 3: the first six fields fixed, a /88 filter.
//! let channel = s.filter(&[origin, 1, 1, 7, 5, 3])?;
//! assert_eq!(channel.prefix_len(), 88);
//! assert!(channel.matches(name));
//! assert!(!channel.matches(s.with(name, "channel", 4)?));
//! assert_eq!(s.render_filter(channel), "origin=10713510/app=1/path=1/org=7/team=5/channel=3");
//! assert_eq!(s.parse_filter("origin=0xa379a6/app=1/path=1/org=7/team=5/channel=3/*")?, channel);
//!
//! // Values never silently truncate.
//! assert!(s.with(name, "app", 256).is_err());
//! # Ok::<(), canopy::SchemaError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::{Filter, Name, NameError};

/// The messenger's name layout, in the compact declaration form [`Schema`] parses.
///
/// Fields, most significant first:
///
/// | field     | bits | meaning                                                            |
/// |-----------|------|--------------------------------------------------------------------|
/// | `origin`  | 24   | the origin domain, hashed: [`Schema::hash_text`]`("origin", domain)` |
/// | `app`     | 8    | which app on that origin                                           |
/// | `path`    | 8    | kind of data: 1 message, 2 key package, 3 welcome, 4 commit        |
/// | `org`     | 18   | organisation                                                       |
/// | `team`    | 20   | team within the organisation                                       |
/// | `channel` | 10   | channel within the team                                            |
/// | `device`  | 20   | the sending device                                                 |
/// | `msg`     | 20   | the device's message sequence number                               |
///
/// Field ends (bit offsets from the most significant bit) are 24, 32, 40, 58, 78, 88, 108 and
/// 128, so a team filter is a `/78` and a channel filter a `/88`.
pub const MESSENGER_LAYOUT: &str =
    "origin:24 app:8 path:8 org:18 team:20 channel:10 device:20 msg:20";

/// Why a schema could not be built, or a value, name or filter did not fit it.
///
/// Every message names the field and values involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The field widths do not sum to 128.
    #[error("field widths sum to {total} bits; a schema must cover exactly 128")]
    WidthSum {
        /// The sum of the declared widths.
        total: u32,
    },
    /// A field was declared with width 0.
    #[error("field `{field}` has width 0; every field needs at least 1 bit")]
    ZeroWidth {
        /// The offending field.
        field: String,
    },
    /// A field was declared wider than 128 bits.
    #[error("field `{field}` has width {width}; a field is at most 128 bits")]
    WidthTooLarge {
        /// The offending field.
        field: String,
        /// Its declared width.
        width: u8,
    },
    /// Two fields share a name.
    #[error("field `{field}` is declared twice")]
    DuplicateField {
        /// The repeated name.
        field: String,
    },
    /// A field name is empty or contains `=`, `/`, `:` or whitespace.
    #[error(
        "field name {field:?} is invalid: names must be non-empty and contain no `=`, `/`, `:` or whitespace"
    )]
    BadFieldName {
        /// The offending name.
        field: String,
    },
    /// An item of a compact declaration was not `name:width` with a numeric width.
    #[error("declaration item {item:?} must be `name:width` with a width of 1..=128")]
    BadDeclaration {
        /// The offending item.
        item: String,
    },
    /// A value does not fit its field (`value >= 2^width`).
    #[error("value {value} does not fit field `{field}` of {width} bits")]
    Overflow {
        /// The field.
        field: String,
        /// The refused value.
        value: u128,
        /// The field's width in bits.
        width: u8,
    },
    /// No field has this name.
    #[error("unknown field `{field}`")]
    UnknownField {
        /// The name that was looked up.
        field: String,
    },
    /// [`Schema::pack`] needs exactly one value per field.
    #[error("expected {expected} values, one per field, got {got}")]
    WrongValueCount {
        /// The number of fields.
        expected: usize,
        /// The number of values given.
        got: usize,
    },
    /// [`Schema::filter`] got more values than there are fields.
    #[error("{got} values given but the schema has only {fields} fields")]
    TooManyValues {
        /// The number of values given.
        got: usize,
        /// The number of fields.
        fields: usize,
    },
    /// The same field was given twice in keyed values or text.
    #[error("field `{field}` is given more than once")]
    RepeatedField {
        /// The repeated field.
        field: String,
    },
    /// A filter's fields are not a leading run of the schema's fields.
    #[error(
        "field `{field}` is fixed but `{missing}`, which comes before it, is not; \
         a filter fixes a leading run of fields starting at `{first}`"
    )]
    NotLeadingRun {
        /// The given field that breaks the run.
        field: String,
        /// The earliest field before it that was not given.
        missing: String,
        /// The schema's first field, where every run starts.
        first: String,
    },
    /// A value in text was not a decimal or `0x`-hex number that fits 128 bits.
    #[error("value {text:?} for field `{field}` is not a decimal or 0x-hex number")]
    BadValue {
        /// The field.
        field: String,
        /// The text that failed to parse.
        text: String,
    },
    /// A part of name or filter text was not `field=value`.
    #[error("expected `field=value`, got {segment:?}")]
    BadSegment {
        /// The offending part.
        segment: String,
    },
    /// Hex name or filter text was malformed.
    #[error(transparent)]
    Name(#[from] NameError),
}

/// One field with its precomputed position.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Field {
    name: Box<str>,
    width: u8,
    /// Bit offset of the field's most significant bit, counted from the name's msb.
    offset: u8,
    /// `128 - offset - width`: how far the value is shifted left inside the name.
    shift: u8,
    /// The largest value the field holds (`2^width - 1`), unshifted.
    max: u128,
}

impl Field {
    /// Offset one past the field's last bit, counted from the msb: the filter length that
    /// fixes this field and all before it.
    fn end(&self) -> u8 {
        self.offset + self.width
    }

    fn check(&self, value: u128) -> Result<u128, SchemaError> {
        if value > self.max {
            return Err(SchemaError::Overflow {
                field: self.name.to_string(),
                value,
                width: self.width,
            });
        }
        Ok(value)
    }

    fn get(&self, name: u128) -> u128 {
        (name >> self.shift) & self.max
    }

    /// `name` with this field replaced by `value` (already checked).
    fn set(&self, name: u128, value: u128) -> u128 {
        (name & !(self.max << self.shift)) | (value << self.shift)
    }
}

/// Mask of the low `n` bits (`n` ≤ 128).
fn low_bits(n: u32) -> u128 {
    if n >= 128 { u128::MAX } else { (1u128 << n) - 1 }
}

/// A declared layout of named bit fields over a 128-bit [`Name`], most significant first,
/// whose widths sum to exactly 128.
///
/// Offsets and masks are computed once in [`Schema::new`]; [`pack`](Schema::pack),
/// [`get`](Schema::get), [`with`](Schema::with) and [`filter`](Schema::filter) do not
/// allocate (except to report an error), and [`unpack`](Schema::unpack) allocates only the
/// returned vector. See the [module docs](self) for a tour.
///
/// The compact text form is `name:width` items separated by spaces, e.g.
/// [`MESSENGER_LAYOUT`]; it is what [`Display`](fmt::Display) prints and
/// [`FromStr`] parses.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Schema {
    fields: Box<[Field]>,
}

impl Schema {
    /// Builds a schema from `(name, width)` pairs, most significant field first.
    ///
    /// Fails if the widths do not sum to 128 ([`SchemaError::WidthSum`]), a width is 0 or
    /// above 128, two fields share a name, or a name is empty or contains `=`, `/`, `:` or
    /// whitespace.
    ///
    /// ```
    /// use canopy::Schema;
    /// let s = Schema::new([("hi", 64), ("lo", 64)]).unwrap();
    /// assert_eq!(s.to_string(), "hi:64 lo:64");
    /// assert!(Schema::new([("hi", 64), ("lo", 63)]).is_err());
    /// ```
    pub fn new(
        fields: impl IntoIterator<Item = (impl Into<String>, u8)>,
    ) -> Result<Schema, SchemaError> {
        let mut out: Vec<Field> = Vec::new();
        let mut total: u32 = 0;
        for (name, width) in fields {
            let name: String = name.into();
            if name.is_empty()
                || name.chars().any(|c| matches!(c, '=' | '/' | ':') || c.is_whitespace())
            {
                return Err(SchemaError::BadFieldName { field: name });
            }
            if width == 0 {
                return Err(SchemaError::ZeroWidth { field: name });
            }
            if width > 128 {
                return Err(SchemaError::WidthTooLarge { field: name, width });
            }
            if out.iter().any(|f| *f.name == *name) {
                return Err(SchemaError::DuplicateField { field: name });
            }
            // Past 128 the schema is already invalid: keep validating and summing so the error
            // reports the full total, but stop storing fields (so at most 128 are kept).
            let offset = total;
            total = total.saturating_add(u32::from(width));
            if total <= 128 {
                out.push(Field {
                    name: name.into_boxed_str(),
                    width,
                    offset: offset as u8,
                    shift: (128 - total) as u8,
                    max: low_bits(width.into()),
                });
            }
        }
        if total != 128 {
            return Err(SchemaError::WidthSum { total });
        }
        Ok(Schema { fields: out.into_boxed_slice() })
    }

    /// The messenger's layout, [`MESSENGER_LAYOUT`]; see there for what each field means.
    ///
    /// ```
    /// use canopy::Schema;
    /// let ends: Vec<u8> = Schema::messenger().fields().map(|(_, w, o)| o + w).collect();
    /// assert_eq!(ends, [24, 32, 40, 58, 78, 88, 108, 128]);
    /// ```
    pub fn messenger() -> Schema {
        MESSENGER_LAYOUT.parse().expect("MESSENGER_LAYOUT is a valid schema")
    }

    /// The fields in order, most significant first, as `(name, width, offset)` where
    /// `offset` is the position of the field's first bit counted from the name's most
    /// significant bit (the first field has offset 0).
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (&str, u8, u8)> + '_ {
        self.fields.iter().map(|f| (&*f.name, f.width, f.offset))
    }

    /// The number of fields (at least 1, at most 128).
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// The position of the field called `name`, if there is one.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| *f.name == *name)
    }

    fn field(&self, name: &str) -> Result<(usize, &Field), SchemaError> {
        self.fields
            .iter()
            .enumerate()
            .find(|(_, f)| *f.name == *name)
            .ok_or_else(|| SchemaError::UnknownField { field: name.to_owned() })
    }

    /// Packs one value per field, in field order, into a name.
    ///
    /// Fails with [`SchemaError::WrongValueCount`] unless there is exactly one value per
    /// field, and with [`SchemaError::Overflow`] if a value does not fit its field.
    pub fn pack(&self, values: &[u128]) -> Result<Name, SchemaError> {
        if values.len() != self.fields.len() {
            return Err(SchemaError::WrongValueCount {
                expected: self.fields.len(),
                got: values.len(),
            });
        }
        self.pack_prefix(values)
    }

    /// Packs values into the first `values.len()` fields; the rest are 0.
    fn pack_prefix(&self, values: &[u128]) -> Result<Name, SchemaError> {
        let mut raw = 0u128;
        for (field, &value) in self.fields.iter().zip(values) {
            raw |= field.check(value)? << field.shift;
        }
        Ok(Name::new(raw))
    }

    /// Packs `(field, value)` pairs, in any order, into a name; fields not mentioned are 0.
    ///
    /// Fails on an unknown field, a field given twice, or a value that does not fit.
    ///
    /// ```
    /// use canopy::Schema;
    /// let s = Schema::messenger();
    /// let n = s.pack_fields(&[("team", 5), ("channel", 3)]).unwrap();
    /// assert_eq!(s.unpack(n), [0, 0, 0, 0, 5, 3, 0, 0]);
    /// ```
    pub fn pack_fields(&self, values: &[(&str, u128)]) -> Result<Name, SchemaError> {
        self.pack_keyed(values).map(|(raw, _)| Name::new(raw))
    }

    /// Packs keyed values; returns the bits and the set of field indexes given.
    fn pack_keyed(&self, values: &[(&str, u128)]) -> Result<(u128, u128), SchemaError> {
        let mut raw = 0u128;
        let mut seen = 0u128;
        for &(name, value) in values {
            let (i, field) = self.field(name)?;
            if seen & (1 << i) != 0 {
                return Err(SchemaError::RepeatedField { field: name.to_owned() });
            }
            seen |= 1 << i;
            raw |= field.check(value)? << field.shift;
        }
        Ok((raw, seen))
    }

    /// Every field's value, in field order.
    pub fn unpack(&self, name: Name) -> Vec<u128> {
        let raw = name.to_u128();
        self.fields.iter().map(|f| f.get(raw)).collect()
    }

    /// The value of one field of `name`.
    pub fn get(&self, name: Name, field: &str) -> Result<u128, SchemaError> {
        Ok(self.field(field)?.1.get(name.to_u128()))
    }

    /// `name` with one field set to `value`, the other fields unchanged.
    ///
    /// Fails on an unknown field or a value that does not fit.
    pub fn with(&self, name: Name, field: &str, value: u128) -> Result<Name, SchemaError> {
        let (_, f) = self.field(field)?;
        Ok(Name::new(f.set(name.to_u128(), f.check(value)?)))
    }

    /// The filter length that fixes exactly the first `k` fields.
    fn run_len(&self, k: usize) -> u8 {
        match k {
            0 => 0,
            k => self.fields[k - 1].end(),
        }
    }

    /// The filter matching every name whose first `values.len()` fields equal `values`.
    ///
    /// Its length is the sum of those fields' widths: no values give [`Filter::ALL`], one
    /// value per field gives the exact filter for that name. Fails with
    /// [`SchemaError::TooManyValues`] or [`SchemaError::Overflow`].
    pub fn filter(&self, values: &[u128]) -> Result<Filter, SchemaError> {
        if values.len() > self.fields.len() {
            return Err(SchemaError::TooManyValues {
                got: values.len(),
                fields: self.fields.len(),
            });
        }
        let name = self.pack_prefix(values)?;
        Ok(Filter::new(name, self.run_len(values.len()))?)
    }

    /// Like [`filter`](Self::filter), keyed: the given fields, in any order, must be a leading
    /// run of the schema's fields (the first *k* fields, for some *k*).
    ///
    /// Fails with [`SchemaError::NotLeadingRun`] naming the field that breaks the run, or on
    /// an unknown field, a repeated field, or an overflowing value.
    ///
    /// ```
    /// use canopy::{Schema, SchemaError};
    /// let s = Schema::new([("org", 8), ("team", 8), ("rest", 112)]).unwrap();
    /// let team = s.filter_fields(&[("team", 2), ("org", 1)]).unwrap();
    /// assert_eq!(team, s.filter(&[1, 2]).unwrap());
    /// assert!(matches!(s.filter_fields(&[("team", 2)]), Err(SchemaError::NotLeadingRun { .. })));
    /// ```
    pub fn filter_fields(&self, values: &[(&str, u128)]) -> Result<Filter, SchemaError> {
        let (raw, seen) = self.pack_keyed(values)?;
        self.run_filter(raw, seen)
    }

    /// The filter for bits `raw` where the fields in the index set `seen` are given.
    fn run_filter(&self, raw: u128, seen: u128) -> Result<Filter, SchemaError> {
        let k = seen.trailing_ones();
        if seen != low_bits(k) {
            // `k` is the first field not given; some later field was given.
            let breaker = k + (seen >> k).trailing_zeros();
            return Err(SchemaError::NotLeadingRun {
                field: self.fields[breaker as usize].name.to_string(),
                missing: self.fields[k as usize].name.to_string(),
                first: self.fields[0].name.to_string(),
            });
        }
        Ok(Filter::new(Name::new(raw), self.run_len(k as usize))?)
    }

    /// The top `width` bits of SHA-256 of `text`, for use as the value of `field`.
    ///
    /// Exactly: compute SHA-256 over the UTF-8 bytes of `text`, read the digest as a
    /// big-endian number, and keep its first (most significant) `width` bits, where `width`
    /// is the field's width. Any language can reproduce it; for the 24-bit messenger
    /// `origin`, `"example.com"` hashes to digest `a379a6f6…`, so the value is `0xa379a6`.
    ///
    /// ```
    /// use canopy::Schema;
    /// assert_eq!(Schema::messenger().hash_text("origin", "example.com").unwrap(), 0xa379a6);
    /// ```
    pub fn hash_text(&self, field: &str, text: &str) -> Result<u128, SchemaError> {
        let (_, f) = self.field(field)?;
        let digest = Sha256::digest(text.as_bytes());
        let mut top = [0u8; 16];
        top.copy_from_slice(&digest[..16]);
        Ok(u128::from_be_bytes(top) >> (128 - u32::from(f.width)))
    }

    /// The text form `field=value/field=value/…` of `name`: every field, in order, with
    /// decimal values. [`parse_name`](Self::parse_name) reads it back.
    pub fn render(&self, name: Name) -> String {
        self.render_run(name.to_u128(), self.fields.len())
    }

    /// `field=value/…` for the first `k` fields of `raw`.
    fn render_run(&self, raw: u128, k: usize) -> String {
        use fmt::Write as _;
        let mut out = String::with_capacity(k * 12);
        for (i, f) in self.fields[..k].iter().enumerate() {
            let sep = if i > 0 { "/" } else { "" };
            // Writing to a String cannot fail.
            let _ = write!(out, "{sep}{}={}", f.name, f.get(raw));
        }
        out
    }

    /// The text form of `filter`.
    ///
    /// If the filter's length falls on a field boundary it fixes a leading run of fields, and
    /// those fields are rendered like [`render`](Self::render) (`team=5/channel=3`); the
    /// filter fixing no field, [`Filter::ALL`], renders as `*`. Otherwise it falls back to
    /// the hex form of [`Filter`]'s `Display` (`0x…/len`). Either form parses back with
    /// [`parse_filter`](Self::parse_filter).
    pub fn render_filter(&self, filter: Filter) -> String {
        let len = filter.prefix_len();
        if len == 0 {
            return "*".to_owned();
        }
        match self.fields.iter().position(|f| f.end() == len) {
            Some(last) => self.render_run(filter.name().to_u128(), last + 1),
            None => filter.to_string(),
        }
    }

    /// Parses `field=value/field=value/…` with the fields in any order; fields not mentioned
    /// are 0. Values are decimal or `0x` hex. Text without `=` is read as a hex [`Name`]
    /// (`0x` and exactly 32 digits).
    ///
    /// Fails on an unknown field ([`SchemaError::UnknownField`]), a field given twice, a
    /// malformed part or value, or a value that does not fit its field.
    pub fn parse_name(&self, text: &str) -> Result<Name, SchemaError> {
        let text = text.trim();
        if !text.contains('=') {
            return text.parse::<Name>().map_err(|e| match e {
                NameError::MissingPrefix(_) => SchemaError::BadSegment { segment: text.to_owned() },
                e => e.into(),
            });
        }
        self.parse_assignments(text).map(|(raw, _)| Name::new(raw))
    }

    /// Parses a filter: `field=value/…` naming a leading run of the schema's fields (in any
    /// order), optionally followed by `/*`; or `*` alone for [`Filter::ALL`]; or the hex form
    /// `0x<32 hex digits>/len`, which must be canonical (see [`Filter`]'s `FromStr`).
    ///
    /// Fails with [`SchemaError::NotLeadingRun`] naming the field that breaks the run, and
    /// otherwise as [`parse_name`](Self::parse_name) does.
    ///
    /// ```
    /// use canopy::Schema;
    /// let s = Schema::messenger();
    /// let f = s.parse_filter("origin=1/app=2/*").unwrap();
    /// assert_eq!(f, s.filter(&[1, 2]).unwrap());
    /// assert_eq!(s.render_filter(f), "origin=1/app=2");
    /// assert!(s.parse_filter("origin=1/path=2").is_err()); // skips `app`
    /// ```
    pub fn parse_filter(&self, text: &str) -> Result<Filter, SchemaError> {
        let text = text.trim();
        if text == "*" {
            return Ok(Filter::ALL);
        }
        if !text.contains('=') {
            return text.parse::<Filter>().map_err(|e| match e {
                NameError::MissingPrefix(_) => SchemaError::BadSegment { segment: text.to_owned() },
                e => e.into(),
            });
        }
        let text = text.strip_suffix("/*").unwrap_or(text);
        let (raw, seen) = self.parse_assignments(text)?;
        self.run_filter(raw, seen)
    }

    /// Parses `field=value` parts separated by `/`; returns the bits and the set of field
    /// indexes given.
    fn parse_assignments(&self, text: &str) -> Result<(u128, u128), SchemaError> {
        let mut raw = 0u128;
        let mut seen = 0u128;
        for segment in text.split('/') {
            let (name, value) = segment
                .split_once('=')
                .ok_or_else(|| SchemaError::BadSegment { segment: segment.to_owned() })?;
            let (i, field) = self.field(name)?;
            if seen & (1 << i) != 0 {
                return Err(SchemaError::RepeatedField { field: name.to_owned() });
            }
            seen |= 1 << i;
            let value = parse_value(value).ok_or_else(|| SchemaError::BadValue {
                field: name.to_owned(),
                text: value.to_owned(),
            })?;
            raw |= field.check(value)? << field.shift;
        }
        Ok((raw, seen))
    }
}

/// Decimal digits, or `0x`/`0X` and 1..=32 hex digits; no signs, no spaces.
fn parse_value(text: &str) -> Option<u128> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u128::from_str_radix(digits, radix).ok()
}

impl fmt::Display for Schema {
    /// The compact declaration, e.g. `origin:24 app:8 …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}:{}", field.name, field.width)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schema({self})")
    }
}

impl FromStr for Schema {
    type Err = SchemaError;

    /// Parses the compact declaration: `name:width` items separated by whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut fields = Vec::new();
        for item in s.split_whitespace() {
            let bad = || SchemaError::BadDeclaration { item: item.to_owned() };
            let (name, width) = item.split_once(':').ok_or_else(bad)?;
            if width.is_empty() || !width.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let width: u8 = width.parse().map_err(|_| bad())?;
            fields.push((name, width));
        }
        Schema::new(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg_name(s: &Schema) -> Name {
        let origin = s.hash_text("origin", "example.com").unwrap();
        s.pack(&[origin, 1, 1, 7, 5, 3, 9, 42]).unwrap()
    }

    #[test]
    fn messenger_layout() {
        let s = Schema::messenger();
        assert_eq!(s.to_string(), MESSENGER_LAYOUT);
        let ends: Vec<u8> = s.fields().map(|(_, w, o)| o + w).collect();
        assert_eq!(ends, [24, 32, 40, 58, 78, 88, 108, 128]);
        assert_eq!(s.field_index("team"), Some(4));
        assert_eq!(s.field_index("nope"), None);
        assert_eq!(s.field_count(), 8);
    }

    #[test]
    fn hash_vector() {
        // printf 'example.com' | sha256sum → a379a6f6eeafb9a55e378c118034e2751e682fab9f2d30ab13d2125586ce1947
        let s = Schema::messenger();
        assert_eq!(s.hash_text("origin", "example.com").unwrap(), 0xa379a6);
        assert_eq!(s.hash_text("app", "example.com").unwrap(), 0xa3);
        let whole = Schema::new([("all", 128)]).unwrap();
        assert_eq!(
            whole.hash_text("all", "example.com").unwrap(),
            0xa379a6f6eeafb9a55e378c118034e275
        );
        let bit = Schema::new([("b", 1), ("rest", 127)]).unwrap();
        assert_eq!(bit.hash_text("b", "example.com").unwrap(), 1);
        assert!(matches!(s.hash_text("x", "a"), Err(SchemaError::UnknownField { .. })));
    }

    #[test]
    fn construction_errors() {
        assert_eq!(Schema::new([("a", 64), ("b", 63)]), Err(SchemaError::WidthSum { total: 127 }));
        assert_eq!(
            Schema::new([("a", 128), ("b", 128)]),
            Err(SchemaError::WidthSum { total: 256 })
        );
        assert_eq!(
            Schema::new(Vec::<(String, u8)>::new()),
            Err(SchemaError::WidthSum { total: 0 })
        );
        assert_eq!(
            Schema::new([("a", 0), ("b", 128)]),
            Err(SchemaError::ZeroWidth { field: "a".into() })
        );
        assert_eq!(
            Schema::new([("a", 129)]),
            Err(SchemaError::WidthTooLarge { field: "a".into(), width: 129 })
        );
        assert_eq!(
            Schema::new([("a", 64), ("a", 64)]),
            Err(SchemaError::DuplicateField { field: "a".into() })
        );
        for bad in ["", "a=b", "a/b", "a:b", "a b", "a\tb"] {
            assert_eq!(
                Schema::new([(bad, 128)]),
                Err(SchemaError::BadFieldName { field: bad.into() }),
                "{bad:?}"
            );
        }
        assert!(Schema::new([("ok", 128)]).is_ok());
        let one_bit: Vec<(String, u8)> = (0..128).map(|i| (format!("b{i}"), 1)).collect();
        assert_eq!(Schema::new(one_bit).unwrap().field_count(), 128);
    }

    #[test]
    fn declaration_text() {
        let s: Schema = "a:100  b:28".parse().unwrap();
        assert_eq!(s.to_string(), "a:100 b:28");
        assert_eq!(s.to_string().parse::<Schema>().unwrap(), s);
        for bad in ["a", "a:", "a:x", "a:+128", "a:300", "a:-1"] {
            assert_eq!(
                bad.parse::<Schema>(),
                Err(SchemaError::BadDeclaration { item: bad.into() }),
                "{bad:?}"
            );
        }
        assert_eq!("a:64".parse::<Schema>(), Err(SchemaError::WidthSum { total: 64 }));
        assert_eq!(":128".parse::<Schema>(), Err(SchemaError::BadFieldName { field: "".into() }));
    }

    #[test]
    fn pack_get_with() {
        let s = Schema::messenger();
        let n = msg_name(&s);
        assert_eq!(n.to_u128() >> 104, 0xa379a6);
        assert_eq!(n.to_u128() & 0xfffff, 42);
        assert_eq!(s.unpack(n), [0xa379a6, 1, 1, 7, 5, 3, 9, 42]);
        assert_eq!(s.get(n, "device").unwrap(), 9);
        let m = s.with(n, "device", 10).unwrap();
        assert_eq!(s.unpack(m), [0xa379a6, 1, 1, 7, 5, 3, 10, 42]);
        assert_eq!(s.with(m, "device", 9).unwrap(), n);
        assert_eq!(s.pack(&[1, 2]), Err(SchemaError::WrongValueCount { expected: 8, got: 2 }));
        assert_eq!(
            s.pack_fields(&[("team", 1), ("team", 2)]),
            Err(SchemaError::RepeatedField { field: "team".into() })
        );
        assert_eq!(
            s.pack_fields(&[("tema", 1)]),
            Err(SchemaError::UnknownField { field: "tema".into() })
        );
        let max = s.pack(&[
            (1 << 24) - 1,
            255,
            255,
            (1 << 18) - 1,
            (1 << 20) - 1,
            1023,
            (1 << 20) - 1,
            (1 << 20) - 1,
        ]);
        assert_eq!(max.unwrap(), Name::MAX);
    }

    #[test]
    fn overflow_is_an_error() {
        let s = Schema::messenger();
        let n = msg_name(&s);
        let want = SchemaError::Overflow { field: "app".into(), value: 256, width: 8 };
        assert_eq!(s.pack(&[0, 256, 0, 0, 0, 0, 0, 0]), Err(want.clone()));
        assert_eq!(s.pack_fields(&[("app", 256)]), Err(want.clone()));
        assert_eq!(s.with(n, "app", 256), Err(want.clone()));
        assert_eq!(s.filter(&[0, 256]), Err(want.clone()));
        assert_eq!(s.parse_name("app=256"), Err(want.clone()));
        assert_eq!(s.parse_filter("origin=0/app=0x100"), Err(want.clone()));
        assert!(want.to_string().contains("256") && want.to_string().contains("`app`"));
        let whole = Schema::new([("all", 128)]).unwrap();
        assert_eq!(whole.pack(&[u128::MAX]).unwrap(), Name::MAX);
    }

    #[test]
    fn filters() {
        let s = Schema::messenger();
        let n = msg_name(&s);
        let values = s.unpack(n);
        assert_eq!(s.filter(&[]).unwrap(), Filter::ALL);
        assert_eq!(s.filter(&values).unwrap(), Filter::exact(n));
        let team = s.filter(&values[..5]).unwrap();
        assert_eq!(team.prefix_len(), 78);
        assert!(team.matches(n));
        assert!(team.matches(s.with(n, "channel", 1000).unwrap()));
        assert!(!team.matches(s.with(n, "team", 6).unwrap()));
        assert_eq!(s.filter(&[0; 9]), Err(SchemaError::TooManyValues { got: 9, fields: 8 }));
        let keyed = s
            .filter_fields(&[
                ("team", 5),
                ("org", 7),
                ("path", 1),
                ("app", 1),
                ("origin", 0xa379a6),
            ])
            .unwrap();
        assert_eq!(keyed, team);
        assert_eq!(s.filter_fields(&[]).unwrap(), Filter::ALL);
        assert_eq!(
            s.filter_fields(&[("origin", 1), ("app", 1), ("org", 1), ("team", 1)]),
            Err(SchemaError::NotLeadingRun {
                field: "org".into(),
                missing: "path".into(),
                first: "origin".into()
            })
        );
    }

    #[test]
    fn text_forms() {
        let s = Schema::messenger();
        let n = msg_name(&s);
        let text = s.render(n);
        assert_eq!(text, "origin=10713510/app=1/path=1/org=7/team=5/channel=3/device=9/msg=42");
        assert_eq!(s.parse_name(&text).unwrap(), n);
        assert_eq!(s.parse_name(&n.to_string()).unwrap(), n);
        assert_eq!(
            s.parse_name("msg=42/device=9/channel=3/team=5/org=7/path=1/app=1/origin=0xA379A6")
                .unwrap(),
            n
        );
        assert_eq!(s.parse_name("team=5").unwrap(), s.pack_fields(&[("team", 5)]).unwrap());
        assert_eq!(
            s.parse_name("bogus=1"),
            Err(SchemaError::UnknownField { field: "bogus".into() })
        );
        assert_eq!(s.parse_name("team"), Err(SchemaError::BadSegment { segment: "team".into() }));
        assert_eq!(s.parse_name(""), Err(SchemaError::BadSegment { segment: "".into() }));
        assert_eq!(s.parse_name("team=5/"), Err(SchemaError::BadSegment { segment: "".into() }));
        for bad in ["", "x", "+5", "-1", "0x", " 5", "0x1g", "1e3"] {
            assert_eq!(
                s.parse_name(&format!("team={bad}")),
                Err(SchemaError::BadValue { field: "team".into(), text: bad.into() }),
                "{bad:?}"
            );
        }
        assert!(matches!(s.parse_name("0xzz"), Err(SchemaError::Name(_))));

        let channel = s.filter(&s.unpack(n)[..6]).unwrap();
        let ct = s.render_filter(channel);
        assert_eq!(ct, "origin=10713510/app=1/path=1/org=7/team=5/channel=3");
        assert_eq!(s.parse_filter(&ct).unwrap(), channel);
        assert_eq!(s.parse_filter(&format!("{ct}/*")).unwrap(), channel);
        assert_eq!(s.render_filter(Filter::ALL), "*");
        assert_eq!(s.parse_filter("*").unwrap(), Filter::ALL);
        assert_eq!(s.render_filter(Filter::exact(n)), text);
        assert_eq!(s.parse_filter(&text).unwrap(), Filter::exact(n));
        let odd = Filter::new(n, 30).unwrap();
        assert_eq!(s.render_filter(odd), odd.to_string());
        assert_eq!(s.parse_filter(&s.render_filter(odd)).unwrap(), odd);
        assert_eq!(
            s.parse_filter("team=5/channel=3/*"),
            Err(SchemaError::NotLeadingRun {
                field: "team".into(),
                missing: "origin".into(),
                first: "origin".into()
            })
        );
        let err = s.parse_filter("origin=1/app=1/team=5").unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `team` is fixed but `path`, which comes before it, is not; \
             a filter fixes a leading run of fields starting at `origin`"
        );
        assert_eq!(
            s.parse_filter("teem=5"),
            Err(SchemaError::UnknownField { field: "teem".into() })
        );
    }
}
