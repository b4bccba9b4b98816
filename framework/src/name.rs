//! 128-bit names and the netmask filters that select them.
//!
//! A [`Name`] is a `u128` that travels and is stored big-endian, so byte order equals numeric
//! order and a prefix of bits is a prefix of bytes. A [`Filter`] is a netmask over names: it
//! matches every name whose top `len` bits equal its own, which makes it a contiguous key range.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Number of bits in a [`Name`].
pub const NAME_BITS: u8 = 128;

/// A 128-bit name of a chunk.
///
/// Text form is `0x` followed by exactly 32 hex digits (lowercase when printed; parsing also
/// takes upper case). Parsing refuses fewer digits rather than guess whether they are the
/// leading or the trailing ones; the error spells out both readings.
///
/// ```
/// use canopy::Name;
/// let n: Name = "0x0000000000000000000000000000002a".parse().unwrap();
/// assert_eq!(n.to_u128(), 42);
/// assert_eq!(n.to_string(), "0x0000000000000000000000000000002a");
/// assert_eq!(n.to_bytes()[15], 42);
/// assert!("0x2a".parse::<Name>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Name(u128);

impl Name {
    /// The smallest name, all bits zero.
    pub const MIN: Name = Name(0);
    /// The largest name, all bits one.
    pub const MAX: Name = Name(u128::MAX);

    /// Wraps a raw 128-bit value.
    pub const fn new(raw: u128) -> Self {
        Name(raw)
    }

    /// The raw 128-bit value.
    pub const fn to_u128(self) -> u128 {
        self.0
    }

    /// Big-endian bytes: the form names take on the wire and as store keys.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Reads a name from its big-endian bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Name(u128::from_be_bytes(bytes))
    }
}

impl From<u128> for Name {
    fn from(raw: u128) -> Self {
        Name(raw)
    }
}

impl From<Name> for u128 {
    fn from(name: Name) -> Self {
        name.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:032x}", self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a name or filter could not be parsed or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The text did not start with `0x`.
    #[error("name {0:?} must start with 0x")]
    MissingPrefix(String),
    /// The text had no hex digits, more than 32, or a non-hex character.
    #[error("name {0:?} must be 0x followed by exactly 32 hex digits")]
    BadHex(String),
    /// A name had fewer than 32 hex digits: whether they are the leading or the trailing
    /// ones is the writer's to say.
    #[error(
        "name {text:?} has {digits} hex digits but needs exactly 32: write {leading} if they are the leading digits, or {trailing} if they are the trailing ones"
    )]
    ShortName {
        /// The text as given.
        text: String,
        /// How many hex digits it had.
        digits: usize,
        /// The digits read as the leading ones (how a filter's prefix is written).
        leading: Name,
        /// The digits read as a number (leading zeros implied).
        trailing: Name,
    },
    /// A filter's name had fewer than 32 hex digits.
    #[error("filter {text:?} must write its name with exactly 32 hex digits: did you mean {suggestion}?")]
    ShortFilter {
        /// The text as given.
        text: String,
        /// The filter with the digits read as the leading ones, in full.
        suggestion: String,
    },
    /// A filter's name had bits set below its length, so the text names a range other than
    /// it seems to.
    #[error(
        "filter {text:?} has bits set below its length /{len}: write {keep_digits} to keep every digit, or {keep_len} to keep the length"
    )]
    NotCanonical {
        /// The text as given.
        text: String,
        /// The length given.
        len: u8,
        /// The shortest filter keeping every set bit of the name.
        keep_digits: Filter,
        /// The filter with the given length (the bits below it cleared).
        keep_len: Filter,
    },
    /// A filter's prefix length was above 128.
    #[error("filter length {0} is out of range 0..=128")]
    LengthOutOfRange(u32),
    /// A filter's length part was not a decimal number.
    #[error("filter length {0:?} is not a number")]
    BadLength(String),
}

/// Reads `0x` and 1 to 32 hex digits: the value (leading zeros implied) and the number of
/// digits.
fn parse_hex(s: &str) -> Result<(u128, usize), NameError> {
    let hex =
        s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).ok_or_else(|| NameError::MissingPrefix(s.to_owned()))?;
    if hex.is_empty() || hex.len() > 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NameError::BadHex(s.to_owned()));
    }
    let value = u128::from_str_radix(hex, 16).map_err(|_| NameError::BadHex(s.to_owned()))?;
    Ok((value, hex.len()))
}

/// `digits` hex digits of `value` moved to the top of the 128 bits.
fn left_aligned(value: u128, digits: usize) -> u128 {
    // 1 ≤ digits < 32 here, so the shift is below 128.
    value << (4 * (32 - digits))
}

impl FromStr for Name {
    type Err = NameError;

    /// Parses `0x` and exactly 32 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match parse_hex(s)? {
            (value, 32) => Ok(Name(value)),
            (value, digits) => Err(NameError::ShortName {
                text: s.to_owned(),
                digits,
                leading: Name(left_aligned(value, digits)),
                trailing: Name(value),
            }),
        }
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <[u8; 16]>::deserialize(deserializer).map(Name::from_bytes)
    }
}

/// Mask with the top `len` bits set (`len` ≤ 128).
#[inline]
pub(crate) const fn prefix_mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len as u32) }
}

/// A netmask over names: `(name, len)` matches every name whose top `len` bits equal `name`'s.
///
/// Filters are always canonical: the bits of `name` below `len` are zero. `len = 0` matches
/// everything, `len = 128` exactly one name. Text form is `0x`, exactly 32 hex digits, `/len`;
/// a bare name parses as `/128`. Parsing text never guesses: it refuses a name of fewer digits
/// (suggesting the digits as the leading ones, `0x0a0b/16` → `0x0a0b0000…0000/16`) and set
/// bits below the length (suggesting the filter that keeps every digit and the one that
/// keeps the length). [`Filter::new`] does canonicalise.
///
/// ```
/// use canopy::{Filter, Name};
/// let f: Filter = "0xab000000000000000000000000000000/8".parse().unwrap();
/// assert!(f.matches(Name::new(0xab12 << 112)));
/// assert!(!f.matches(Name::new(0xac << 120)));
/// let (lo, hi) = f.range();
/// assert_eq!(lo, Name::new(0xab << 120));
/// assert_eq!(hi, Name::new((0xab << 120) | (u128::MAX >> 8)));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Filter {
    name: Name,
    len: u8,
}

impl Filter {
    /// The filter that matches every name (`len = 0`).
    pub const ALL: Filter = Filter { name: Name::MIN, len: 0 };

    /// Builds a filter, clearing the bits of `name` below `len`.
    ///
    /// Fails with [`NameError::LengthOutOfRange`] when `len > 128`.
    pub fn new(name: Name, len: u8) -> Result<Self, NameError> {
        if len > NAME_BITS {
            return Err(NameError::LengthOutOfRange(len.into()));
        }
        Ok(Filter { name: Name(name.0 & prefix_mask(len)), len })
    }

    /// The filter matching exactly one name.
    pub const fn exact(name: Name) -> Self {
        Filter { name, len: NAME_BITS }
    }

    /// The canonical base name (low bits cleared).
    pub const fn name(&self) -> Name {
        self.name
    }

    /// The prefix length in bits, 0..=128.
    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The mask with the top `prefix_len` bits set.
    pub const fn mask(&self) -> u128 {
        prefix_mask(self.len)
    }

    /// Whether `name` lies in this filter.
    #[inline]
    pub const fn matches(&self, name: Name) -> bool {
        name.0 & prefix_mask(self.len) == self.name.0
    }

    /// Whether every name matched by `other` is also matched by `self`.
    pub const fn covers(&self, other: &Filter) -> bool {
        self.len <= other.len && self.matches(other.name)
    }

    /// The inclusive range `[first, last]` of names this filter matches.
    pub const fn range(&self) -> (Name, Name) {
        (self.name, Name(self.name.0 | !prefix_mask(self.len)))
    }

    /// Whether the two filters share any name (for prefixes: one covers the other).
    pub const fn overlaps(&self, other: &Filter) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl Default for Filter {
    fn default() -> Self {
        Filter::ALL
    }
}

impl From<Name> for Filter {
    fn from(name: Name) -> Self {
        Filter::exact(name)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.len)
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Filter {
    type Err = NameError;

    /// Parses `0x<32 hex digits>/len`, or a bare name (`/128`). Refuses, with a suggestion,
    /// fewer digits and bits set below `len`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((name, len)) = s.split_once('/') else {
            return Ok(Filter::exact(s.parse()?));
        };
        let len: u32 = len.parse().map_err(|_| NameError::BadLength(len.to_owned()))?;
        let len = u8::try_from(len).ok().filter(|l| *l <= NAME_BITS).ok_or(NameError::LengthOutOfRange(len))?;
        let (value, digits) = parse_hex(name)?;
        if digits < 32 && len == NAME_BITS {
            // One name: no prefix to align, so both readings are offered, as for a name.
            return Err(name.parse::<Name>().expect_err("fewer than 32 digits"));
        }
        let value = if digits == 32 { value } else { left_aligned(value, digits) };
        let keep_len = Filter::new(Name(value), len)?;
        if digits == 32 && keep_len.name.0 == value {
            return Ok(keep_len);
        }
        // Every set bit kept: the length ends at the lowest set bit (at least `len`).
        let needed = if value == 0 { 0 } else { (128 - value.trailing_zeros()) as u8 };
        let keep_digits = Filter { name: Name(value), len: len.max(needed) };
        if digits < 32 {
            let suggestion = if keep_digits == keep_len {
                keep_len.to_string()
            } else {
                format!("{keep_digits} (every digit kept) or {keep_len} (the length kept)")
            };
            return Err(NameError::ShortFilter { text: s.to_owned(), suggestion });
        }
        Err(NameError::NotCanonical { text: s.to_owned(), len, keep_digits, keep_len })
    }
}

/// On the wire a filter is its 16 name bytes then one length byte; decoding rejects a length
/// above 128 or set bits below the length, so a decoded filter is always canonical.
impl Serialize for Filter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (self.name, self.len).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (name, len) = <(Name, u8)>::deserialize(deserializer)?;
        let filter = Filter::new(name, len).map_err(serde::de::Error::custom)?;
        if filter.name != name {
            return Err(serde::de::Error::custom(format!(
                "filter {name}/{len} has bits set below its length"
            )));
        }
        Ok(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_text_round_trip() {
        let n = Name::new(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(n.to_string(), "0x0123456789abcdef0011223344556677");
        assert_eq!(n.to_string().parse::<Name>().unwrap(), n);
        assert_eq!("0X0123456789ABCDEF0011223344556677".parse::<Name>().unwrap(), n);
    }

    #[test]
    fn bad_names_are_errors() {
        assert!(matches!("123".parse::<Name>(), Err(NameError::MissingPrefix(_))));
        assert!(matches!("0x".parse::<Name>(), Err(NameError::BadHex(_))));
        assert!(matches!("0xg".parse::<Name>(), Err(NameError::BadHex(_))));
        assert!(matches!("0x+1".parse::<Name>(), Err(NameError::BadHex(_))));
        let long = format!("0x{}", "1".repeat(33));
        assert!(matches!(long.parse::<Name>(), Err(NameError::BadHex(_))));
    }

    #[test]
    fn big_endian_bytes_keep_order() {
        let a = Name::new(1);
        let b = Name::new(1 << 120);
        assert!(a < b);
        assert!(a.to_bytes() < b.to_bytes());
        assert_eq!(Name::from_bytes(b.to_bytes()), b);
    }

    #[test]
    fn filter_canonicalises_and_bounds() {
        let f = Filter::new(Name::new(u128::MAX), 4).unwrap();
        assert_eq!(f.name(), Name::new(0xf << 124));
        assert_eq!(Filter::new(Name::MIN, 129), Err(NameError::LengthOutOfRange(129)));
        let one = "0x00000000000000000000000000000001";
        assert!(matches!(format!("{one}/300").parse::<Filter>(), Err(NameError::LengthOutOfRange(300))));
        assert!(matches!(format!("{one}/x").parse::<Filter>(), Err(NameError::BadLength(_))));
    }

    #[test]
    fn filter_edges() {
        let all = Filter::ALL;
        assert!(all.matches(Name::MIN) && all.matches(Name::MAX));
        assert_eq!(all.range(), (Name::MIN, Name::MAX));
        let one = Filter::exact(Name::new(7));
        assert!(one.matches(Name::new(7)) && !one.matches(Name::new(6)));
        assert_eq!(one.range(), (Name::new(7), Name::new(7)));
        assert!(all.covers(&one) && !one.covers(&all) && one.covers(&one));
        assert_eq!("0x00000000000000000000000000000007".parse::<Filter>().unwrap(), one);
        assert_eq!(one.to_string().parse::<Filter>().unwrap(), one);
    }

    #[test]
    fn covers_is_prefix_relation() {
        let wide: Filter = "0xab000000000000000000000000000000/8".parse().unwrap();
        let narrow: Filter = "0xabcd0000000000000000000000000000/16".parse().unwrap();
        let other: Filter = "0xac000000000000000000000000000000/8".parse().unwrap();
        assert!(wide.covers(&narrow) && !narrow.covers(&wide));
        assert!(!wide.covers(&other) && !wide.overlaps(&other));
    }
}

#[cfg(test)]
mod text_form_tests {
    use super::*;

    const TEAM: &str = "0x0a0b0000000000000000000000000000/16";

    #[test]
    fn short_filter_text_is_refused_with_the_left_aligned_form() {
        let err = "0x0a0b/16".parse::<Filter>().unwrap_err();
        assert!(err.to_string().contains(TEAM), "{err}");
        assert_eq!(TEAM.parse::<Filter>().unwrap().to_string(), TEAM);
    }

    #[test]
    fn bits_below_the_length_are_refused_with_both_readings() {
        let err = "0x0a0b0000000000000000000000000000/8".parse::<Filter>().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(TEAM), "{text}");
        assert!(text.contains("0x0a000000000000000000000000000000/8"), "{text}");
        // A short form that would be non-canonical even left-aligned suggests both too.
        let text = "0x0a0b/8".parse::<Filter>().unwrap_err().to_string();
        assert!(text.contains(TEAM) && text.contains("0x0a000000000000000000000000000000/8"), "{text}");
        // The API may still canonicalise.
        assert_eq!(
            Filter::new(Name::new(0x0a0b << 112), 8).unwrap().to_string(),
            "0x0a000000000000000000000000000000/8"
        );
    }

    #[test]
    fn names_need_all_32_digits() {
        let err = "0x2a".parse::<Name>().unwrap_err().to_string();
        assert!(err.contains("0x0000000000000000000000000000002a"), "{err}");
        assert!(err.contains("0x2a000000000000000000000000000000"), "{err}");
        assert!("0x2a".parse::<Filter>().is_err(), "a bare short name is no filter either");
        assert!("0x0/0".parse::<Filter>().unwrap_err().to_string().contains("0x00000000000000000000000000000000/0"));
        assert_eq!("0x0000000000000000000000000000002A".parse::<Name>().unwrap(), Name::new(42));
    }

    #[test]
    fn errors_are_one_line() {
        for text in ["0x0a0b/16", "0x0a0b0000000000000000000000000000/8", "0x2a", "0x2a/128", "0xzz", "2a"] {
            let err = text.parse::<Filter>().unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
