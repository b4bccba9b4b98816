//! Names, filters and chunks as a plugin sees them.

use std::fmt;
use std::str::FromStr;

/// The largest payload a chunk may carry, in bytes.
pub const MAX_CHUNK_DATA: usize = 1024;

/// A 128-bit name, written `0x` followed by exactly 32 hex digits (fewer are refused rather
/// than guessed at: are they the leading or the trailing ones?).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Name(pub u128);

impl Name {
    /// The high 64 bits.
    pub const fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }

    /// The low 64 bits.
    pub const fn lo(self) -> u64 {
        self.0 as u64
    }

    /// Joins high and low halves.
    pub const fn from_parts(hi: u64, lo: u64) -> Self {
        Name(((hi as u128) << 64) | lo as u128)
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

impl FromStr for Name {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match parse_hex(s)? {
            (value, 32) => Ok(Name(value)),
            (value, digits) => Err(format!(
                "name {s:?} has {digits} hex digits but needs exactly 32: write {} if they are the leading digits, or {} if they are the trailing ones",
                Name(value << (4 * (32 - digits))),
                Name(value)
            )),
        }
    }
}

/// Reads `0x` and 1 to 32 hex digits: the value and the number of digits.
fn parse_hex(s: &str) -> Result<(u128, usize), String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| format!("name {s:?} must start with 0x"))?;
    if hex.is_empty() || hex.len() > 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("name {s:?} must be 0x followed by exactly 32 hex digits"));
    }
    let value = u128::from_str_radix(hex, 16)
        .map_err(|_| format!("name {s:?} must be 0x followed by exactly 32 hex digits"))?;
    Ok((value, hex.len()))
}

/// Every name whose first `len` bits equal those of `name`; always canonical (the bits of
/// `name` below `len` are zero).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Filter {
    name: Name,
    len: u8,
}

const fn mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len as u32) }
}

impl Filter {
    /// Builds a filter, clearing the bits of `name` below `len`; fails when `len > 128`.
    pub fn new(name: Name, len: u8) -> Result<Self, String> {
        if len > 128 {
            return Err(format!("filter length {len} is out of range 0..=128"));
        }
        Ok(Filter { name: Name(name.0 & mask(len)), len })
    }

    /// The canonical base name.
    pub const fn name(&self) -> Name {
        self.name
    }

    /// The prefix length in bits.
    pub const fn len(&self) -> u8 {
        self.len
    }

    /// Whether the filter matches every name.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `name` lies in this filter.
    pub const fn matches(&self, name: Name) -> bool {
        name.0 & mask(self.len) == self.name.0
    }

    /// The name with this filter's prefix and `name`'s remaining low bits: maps a name under
    /// one filter to the corresponding name under another.
    pub const fn with_suffix(&self, name: Name) -> Name {
        Name(self.name.0 | (name.0 & !mask(self.len)))
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
    type Err = String;

    /// Parses `0x<32 hex digits>/len`, or a bare name as `/128`; refuses (suggesting what
    /// was probably meant) fewer digits, and bits set below `len`, as the host does.
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((name, len)) = s.split_once('/') else {
            return Filter::new(s.parse()?, 128);
        };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("filter length {len:?} is not a number in 0..=128"))?;
        let (value, digits) = parse_hex(name)?;
        if digits < 32 && len == 128 {
            return Err(name.parse::<Name>().expect_err("fewer than 32 digits"));
        }
        let value = if digits == 32 { value } else { value << (4 * (32 - digits)) };
        let keep_len = Filter::new(Name(value), len)?;
        if digits == 32 && keep_len.name.0 == value {
            return Ok(keep_len);
        }
        let needed = if value == 0 { 0 } else { (128 - value.trailing_zeros()) as u8 };
        let keep_digits = Filter { name: Name(value), len: len.max(needed) };
        if digits < 32 {
            let suggestion = if keep_digits == keep_len {
                keep_len.to_string()
            } else {
                format!("{keep_digits} (every digit kept) or {keep_len} (the length kept)")
            };
            return Err(format!(
                "filter {s:?} must write its name with exactly 32 hex digits: did you mean {suggestion}?"
            ));
        }
        Err(format!(
            "filter {s:?} has bits set below its length /{len}: write {keep_digits} to keep every digit, or {keep_len} to keep the length"
        ))
    }
}

/// An immutable chunk: a name, an expiry (unix milliseconds) and at most
/// [`MAX_CHUNK_DATA`] bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Chunk {
    /// The chunk's name.
    pub name: Name,
    /// When the chunk expires, unix milliseconds.
    pub expiry_ms: u64,
    /// The payload.
    pub data: Vec<u8>,
}

/// Severity of a log line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Level {
    /// Very fine detail.
    Trace = 0,
    /// Detail for debugging.
    Debug = 1,
    /// Normal operation.
    Info = 2,
    /// Something is off but the plugin carries on.
    Warn = 3,
    /// Something failed.
    Error = 4,
}
