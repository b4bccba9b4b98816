//! Where a chunk lives: buckets, hash tags, key names and the record encoding.
//!
//! Everything here is pure (no I/O), so it is tested without a Redis.

use bytes::Bytes;
use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name};

use crate::RedisStoreError;

/// The largest supported bucket width in bits (65,536 buckets). `sweep_expired` visits every
/// bucket, and a short filter may read many, so wider layouts cost more than they give.
pub const MAX_BUCKET_BITS: u8 = 16;

/// The version byte that opens every record this crate writes.
pub const RECORD_VERSION: u8 = 1;

/// Bytes of a record before the payload: version (1) + expiry (8, big-endian).
pub const RECORD_HEADER: usize = 1 + 8;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// The key layout for a given bucket width: how names map to buckets and buckets to keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    bits: u8,
}

impl Layout {
    /// A layout with `bits`-bit buckets; `None` when `bits` exceeds [`MAX_BUCKET_BITS`].
    pub(crate) fn new(bits: u8) -> Option<Self> {
        (bits <= MAX_BUCKET_BITS).then_some(Layout { bits })
    }

    pub(crate) fn bits(self) -> u8 {
        self.bits
    }

    /// How many buckets there are (`2^bits`).
    pub(crate) fn bucket_count(self) -> u32 {
        1 << self.bits
    }

    /// The bucket of `name`: its top `bits` bits.
    pub(crate) fn bucket_of(self, name: Name) -> u32 {
        if self.bits == 0 { 0 } else { (name.to_u128() >> (128 - u32::from(self.bits))) as u32 }
    }

    /// The buckets `filter` covers, as an inclusive range in name order.
    pub(crate) fn buckets_of(self, filter: Filter) -> std::ops::RangeInclusive<u32> {
        let (first, last) = filter.range();
        self.bucket_of(first)..=self.bucket_of(last)
    }

    /// The inclusive range of names in `bucket`.
    pub(crate) fn bucket_range(self, bucket: u32) -> (Name, Name) {
        if self.bits == 0 {
            return (Name::MIN, Name::MAX);
        }
        let shift = 128 - u32::from(self.bits);
        let first = u128::from(bucket) << shift;
        (Name::new(first), Name::new(first | (u128::MAX >> u32::from(self.bits))))
    }

    /// The hash tag every key of `bucket` carries, braces included: `{c:03f}` for bucket
    /// `0x03f` of a 12-bit layout (one hex digit per 4 bits, at least one digit).
    pub(crate) fn tag(self, bucket: u32) -> String {
        let width = usize::from(self.bits.div_ceil(4).max(1));
        format!("{{c:{bucket:0width$x}}}")
    }

    /// The sorted set of `bucket`'s names (all scores 0, so `BYLEX` ranges are name ranges).
    pub(crate) fn names_key(self, bucket: u32) -> String {
        format!("{}:n", self.tag(bucket))
    }

    /// The sorted set of `bucket`'s names scored by expiry (unix ms), for sweeping.
    pub(crate) fn expiry_key(self, bucket: u32) -> String {
        format!("{}:x", self.tag(bucket))
    }

    /// What every record key of `bucket` starts with: the tag and `:`; the 16 name bytes follow.
    pub(crate) fn record_prefix(self, bucket: u32) -> Vec<u8> {
        format!("{}:", self.tag(bucket)).into_bytes()
    }

    /// The key of the record of `name`.
    pub(crate) fn record_key(self, name: Name) -> Vec<u8> {
        let mut key = self.record_prefix(self.bucket_of(name));
        key.extend_from_slice(&name.to_bytes());
        key
    }

    /// The sharded pub/sub channel of `bucket` (same hash tag, so same slot).
    pub(crate) fn channel(self, bucket: u32) -> String {
        format!("{}:live", self.tag(bucket))
    }

    /// The cluster slot of `bucket`'s keys.
    pub(crate) fn slot(self, bucket: u32) -> u16 {
        key_slot(self.tag(bucket).as_bytes())
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the bytes between the
/// first `{` and the next `}`, when not empty) or of the whole key, modulo 16,384.
///
/// ```
/// assert_eq!(canopy_redis::key_slot(b"foo"), 12_182);
/// assert_eq!(canopy_redis::key_slot(b"{foo}:n"), 12_182);
/// ```
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|&b| b == b'}').map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16_xmodem(tagged) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The record stored for `chunk`: [`RECORD_VERSION`], expiry (u64 big-endian), payload.
pub(crate) fn encode_record(chunk: &Chunk) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER + chunk.data().len());
    record.push(RECORD_VERSION);
    record.extend_from_slice(&chunk.expiry().to_be_bytes());
    record.extend_from_slice(chunk.data());
    record
}

/// Decodes the record stored for `name` under `key`. Untrusted input: anything malformed is
/// [`RedisStoreError::Corrupt`].
pub(crate) fn decode_record(key: &[u8], name: Name, record: Vec<u8>) -> Result<Chunk, RedisStoreError> {
    let corrupt = |reason: String| RedisStoreError::Corrupt { key: printable_key(key), reason };
    if record.len() < RECORD_HEADER {
        return Err(corrupt(format!("record is {} bytes, shorter than its {RECORD_HEADER}-byte header", record.len())));
    }
    if record[0] != RECORD_VERSION {
        return Err(corrupt(format!("record version {}, expected {RECORD_VERSION}", record[0])));
    }
    let data_len = record.len() - RECORD_HEADER;
    if data_len > MAX_CHUNK_DATA {
        return Err(corrupt(format!("payload of {data_len} bytes exceeds the {MAX_CHUNK_DATA}-byte limit")));
    }
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&record[1..RECORD_HEADER]);
    let data = Bytes::from(record).slice(RECORD_HEADER..);
    Chunk::new(name, u64::from_be_bytes(expiry), data).map_err(|e| corrupt(e.to_string()))
}

/// A name read from an index (a sorted-set member): exactly 16 bytes, or `Corrupt`.
pub(crate) fn decode_name(index_key: &[u8], member: &[u8]) -> Result<Name, RedisStoreError> {
    let bytes: [u8; 16] = member.try_into().map_err(|_| RedisStoreError::Corrupt {
        key: printable_key(index_key),
        reason: format!("index member of {} bytes, expected a 16-byte name", member.len()),
    })?;
    Ok(Name::from_bytes(bytes))
}

/// A key for messages: printable ASCII kept, the binary name shown as `0x…`.
pub(crate) fn printable_key(key: &[u8]) -> String {
    match key.iter().position(|&b| b == b'}') {
        Some(close) if key.len() == close + 2 + 16 && key[close + 1] == b':' => {
            let mut name = [0u8; 16];
            name.copy_from_slice(&key[close + 2..]);
            format!("{}{}", String::from_utf8_lossy(&key[..close + 2]), Name::from_bytes(name))
        }
        _ => key.iter().map(|&b| if b.is_ascii_graphic() { char::from(b) } else { '.' }).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"{}foo"), key_slot(b"{}foo"));
        assert_ne!(key_slot(b"{}foo"), key_slot(b"foo"));
    }

    #[test]
    fn buckets_and_keys() {
        let l = Layout::new(12).unwrap();
        let name = Name::new(0x03f1_2345 << 96);
        assert_eq!(l.bucket_of(name), 0x03f);
        assert_eq!(l.tag(0x03f), "{c:03f}");
        assert_eq!(l.names_key(0x03f), "{c:03f}:n");
        assert_eq!(l.expiry_key(0x03f), "{c:03f}:x");
        let key = l.record_key(name);
        assert_eq!(&key[..8], b"{c:03f}:");
        assert_eq!(&key[8..], &name.to_bytes());
        assert_eq!(printable_key(&key), format!("{{c:03f}}:{name}"));
        assert_eq!(l.bucket_range(0x03f), (Name::new(0x03f << 116), Name::new((0x040 << 116) - 1)));
        assert_eq!(l.buckets_of(Filter::ALL), 0..=4095);
        assert_eq!(l.buckets_of(Filter::new(name, 8).unwrap()), 0x030..=0x03f);
        assert_eq!(l.buckets_of(Filter::new(name, 12).unwrap()), 0x03f..=0x03f);
        assert_eq!(l.buckets_of(Filter::new(name, 100).unwrap()), 0x03f..=0x03f);

        let zero = Layout::new(0).unwrap();
        assert_eq!(zero.bucket_of(Name::MAX), 0);
        assert_eq!(zero.tag(0), "{c:0}");
        assert_eq!(zero.bucket_range(0), (Name::MIN, Name::MAX));
        let one = Layout::new(1).unwrap();
        assert_eq!(one.bucket_of(Name::MAX), 1);
        assert_eq!(one.tag(1), "{c:1}");
        let sixteen = Layout::new(16).unwrap();
        assert_eq!(sixteen.tag(0xabcd), "{c:abcd}");
        assert_eq!(sixteen.bucket_range(0xffff).1, Name::MAX);
        assert!(Layout::new(17).is_none());
    }

    #[test]
    fn record_round_trip_and_corruption() {
        let chunk = Chunk::new(Name::new(9), 1_700_000_000_123, &b"payload"[..]).unwrap();
        let record = encode_record(&chunk);
        assert_eq!(record.len(), RECORD_HEADER + 7);
        assert_eq!(decode_record(b"k", chunk.name(), record.clone()).unwrap(), chunk);

        let corrupt = |r: Vec<u8>| match decode_record(b"k", Name::new(9), r) {
            Err(RedisStoreError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        };
        assert!(corrupt(vec![]).contains("shorter"));
        assert!(corrupt(record[..5].to_vec()).contains("shorter"));
        let mut v2 = record.clone();
        v2[0] = 2;
        assert!(corrupt(v2).contains("version 2"));
        let mut big = record[..RECORD_HEADER].to_vec();
        big.extend(std::iter::repeat_n(0, MAX_CHUNK_DATA + 1));
        assert!(corrupt(big).contains("exceeds"));
        assert!(decode_name(b"{c:0}:n", &[1, 2, 3]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = decode_record(&bytes, Name::new(1), bytes.clone());
            let _ = decode_name(&bytes, &bytes);
            let _ = printable_key(&bytes);
        }

        #[test]
        fn buckets_partition_names(bits in 0u8..=16, raw in any::<u128>()) {
            let l = Layout::new(bits).unwrap();
            let name = Name::new(raw);
            let (first, last) = l.bucket_range(l.bucket_of(name));
            prop_assert!(first <= name && name <= last);
            prop_assert!(l.bucket_of(first) == l.bucket_of(last));
        }
    }
}
