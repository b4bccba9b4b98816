//! Splitting objects larger than a chunk across chunks, and putting them back together.
//!
//! Every messenger chunk, even a one-piece object, is a fragment: an 18-byte header, then a
//! piece of the object. All integers are big-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version, `1` |
//! | 1 | 1 | kind: the name's `path` (1 message, 2 key package, 3 welcome, 4 commit) |
//! | 2 | 2 | `index` of this fragment, from 0 |
//! | 4 | 2 | `count` of fragments, at least 1 |
//! | 6 | 4 | `total` length of the object in bytes |
//! | 10 | 8 | the first 8 bytes of SHA-256 of the whole object |
//! | 18 | … | the piece: bytes `index × 1006 ..` of the object |
//!
//! Every piece but the last is exactly [`PIECE`] (1,006) bytes; `count` is
//! `max(1, ceil(total / 1006))`. A receiver checks each fragment against these rules on its
//! own ([`Fragment::decode`]), and the reassembled object against the digest
//! ([`Assembly::finish`]), so pieces of two objects can never be mixed.

use std::collections::BTreeMap;

use canopy::MAX_CHUNK_DATA;
use sha2::{Digest, Sha256};

use crate::names::Path;

/// The header's length.
pub const HEADER: usize = 18;
/// The piece carried by every fragment but the last.
pub const PIECE: usize = MAX_CHUNK_DATA - HEADER;
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The largest object split into fragments: 65,535 pieces.
pub const MAX_OBJECT: usize = PIECE * u16::MAX as usize;

/// Why a fragment or a reassembled object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// Fewer bytes than a header.
    #[error("a fragment of {0} bytes is shorter than its 18-byte header")]
    Short(usize),
    /// A version this code does not read.
    #[error("fragment format version {0} is not supported (this is version 1)")]
    Version(u8),
    /// The kind byte disagrees with what the name says.
    #[error("fragment kind {found} under a name of kind {expected}")]
    Kind {
        /// What the name's path says.
        expected: u8,
        /// What the header says.
        found: u8,
    },
    /// `count` or `index` is impossible for `total`.
    #[error("fragment {index} of {count} cannot belong to an object of {total} bytes")]
    Shape {
        /// Index.
        index: u16,
        /// Count.
        count: u16,
        /// Total.
        total: u32,
    },
    /// The piece's length is not what `index`, `count` and `total` require.
    #[error("fragment {index} of {count} carries {found} bytes; it must carry {expected}")]
    Length {
        /// Index.
        index: u16,
        /// Count.
        count: u16,
        /// Required length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// The reassembled object does not match the digest its fragments carry.
    #[error("the reassembled object does not match its digest")]
    Digest,
    /// Fragments of one object disagree about it.
    #[error("fragments disagree about the object they belong to")]
    Mismatch,
    /// The object is too large to split.
    #[error("an object of {0} bytes is larger than the {MAX_OBJECT}-byte limit")]
    TooLarge(usize),
}

/// One decoded fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The object's kind (its names' path).
    pub kind: u8,
    /// This fragment's index.
    pub index: u16,
    /// How many fragments the object has.
    pub count: u16,
    /// The object's length.
    pub total: u32,
    /// The first 8 bytes of the object's SHA-256.
    pub digest: [u8; 8],
    /// This fragment's piece.
    pub piece: Vec<u8>,
}

fn count_for(total: usize) -> usize {
    total.div_ceil(PIECE).max(1)
}

fn digest8(object: &[u8]) -> [u8; 8] {
    let full = Sha256::digest(object);
    let mut d = [0u8; 8];
    d.copy_from_slice(&full[..8]);
    d
}

/// Splits `object` into fragment payloads, in index order.
pub fn split(kind: Path, object: &[u8]) -> Result<Vec<Vec<u8>>, FragmentError> {
    if object.len() > MAX_OBJECT {
        return Err(FragmentError::TooLarge(object.len()));
    }
    let count = count_for(object.len());
    let digest = digest8(object);
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let piece = &object[(index * PIECE).min(object.len())..((index + 1) * PIECE).min(object.len())];
        let mut data = Vec::with_capacity(HEADER + piece.len());
        data.push(VERSION);
        data.push(kind as u8);
        data.extend_from_slice(&(index as u16).to_be_bytes());
        data.extend_from_slice(&(count as u16).to_be_bytes());
        data.extend_from_slice(&(object.len() as u32).to_be_bytes());
        data.extend_from_slice(&digest);
        data.extend_from_slice(piece);
        out.push(data);
    }
    Ok(out)
}

impl Fragment {
    /// Decodes and checks one fragment found under a name of kind `kind`. Never panics.
    pub fn decode(kind: Path, data: &[u8]) -> Result<Fragment, FragmentError> {
        if data.len() < HEADER {
            return Err(FragmentError::Short(data.len()));
        }
        if data[0] != VERSION {
            return Err(FragmentError::Version(data[0]));
        }
        if data[1] != kind as u8 {
            return Err(FragmentError::Kind { expected: kind as u8, found: data[1] });
        }
        let index = u16::from_be_bytes([data[2], data[3]]);
        let count = u16::from_be_bytes([data[4], data[5]]);
        let total = u32::from_be_bytes([data[6], data[7], data[8], data[9]]);
        if total as usize > MAX_OBJECT || usize::from(count) != count_for(total as usize) || index >= count {
            return Err(FragmentError::Shape { index, count, total });
        }
        let expected = if index + 1 < count { PIECE } else { total as usize - PIECE * usize::from(count - 1) };
        let piece = &data[HEADER..];
        if piece.len() != expected {
            return Err(FragmentError::Length { index, count, expected, found: piece.len() });
        }
        let mut digest = [0u8; 8];
        digest.copy_from_slice(&data[10..18]);
        Ok(Fragment { kind: data[1], index, count, total, digest, piece: piece.to_vec() })
    }
}

/// The fragments of one object gathered so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assembly {
    shape: Option<(u16, u32, [u8; 8])>,
    pieces: BTreeMap<u16, Vec<u8>>,
}

impl Assembly {
    /// An empty assembly.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a fragment. Fails if it contradicts fragments already added (another object's
    /// piece under the same names); a repeated index is ignored.
    pub fn add(&mut self, fragment: Fragment) -> Result<(), FragmentError> {
        let shape = (fragment.count, fragment.total, fragment.digest);
        match self.shape {
            Some(s) if s != shape => return Err(FragmentError::Mismatch),
            _ => self.shape = Some(shape),
        }
        self.pieces.entry(fragment.index).or_insert(fragment.piece);
        Ok(())
    }

    /// How many fragments the object has, once one is known.
    pub fn count(&self) -> Option<u16> {
        self.shape.map(|(c, _, _)| c)
    }

    /// The indices still missing (empty before the first fragment arrives).
    pub fn missing(&self) -> Vec<u16> {
        match self.shape {
            Some((count, _, _)) => (0..count).filter(|i| !self.pieces.contains_key(i)).collect(),
            None => Vec::new(),
        }
    }

    /// Whether every fragment is here.
    pub fn is_complete(&self) -> bool {
        self.shape.is_some_and(|(count, _, _)| self.pieces.len() == usize::from(count))
    }

    /// The object, checked against its digest, once every fragment is here.
    pub fn finish(&self) -> Option<Result<Vec<u8>, FragmentError>> {
        if !self.is_complete() {
            return None;
        }
        let (_, total, digest) = self.shape?;
        let mut object = Vec::with_capacity(total as usize);
        for piece in self.pieces.values() {
            object.extend_from_slice(piece);
        }
        Some(if digest8(&object) == digest { Ok(object) } else { Err(FragmentError::Digest) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(len: usize) {
        let object: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let parts = split(Path::Commit, &object).unwrap();
        assert_eq!(parts.len(), count_for(len));
        assert!(parts.iter().all(|p| p.len() <= MAX_CHUNK_DATA));
        let mut asm = Assembly::new();
        // Out of order, with a duplicate.
        for p in parts.iter().rev().chain(parts.first()) {
            asm.add(Fragment::decode(Path::Commit, p).unwrap()).unwrap();
        }
        assert_eq!(asm.finish().unwrap().unwrap(), object);
    }

    #[test]
    fn objects_of_every_size_round_trip() {
        for len in [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE, 20_000] {
            roundtrip(len);
        }
    }

    #[test]
    fn wrong_lengths_and_shapes_are_refused() {
        let object = vec![9u8; PIECE + 10];
        let parts = split(Path::Message, &object).unwrap();
        let mut short = parts[0].clone();
        short.pop();
        assert!(matches!(Fragment::decode(Path::Message, &short), Err(FragmentError::Length { .. })));
        let mut long = parts[1].clone();
        long.push(0);
        assert!(matches!(Fragment::decode(Path::Message, &long), Err(FragmentError::Length { .. })));
        assert!(matches!(Fragment::decode(Path::Commit, &parts[0]), Err(FragmentError::Kind { .. })));
        assert_eq!(Fragment::decode(Path::Message, &parts[0][..5]), Err(FragmentError::Short(5)));
        let mut bad_count = parts[0].clone();
        bad_count[5] = 9;
        assert!(matches!(Fragment::decode(Path::Message, &bad_count), Err(FragmentError::Shape { .. })));
    }

    #[test]
    fn pieces_of_two_objects_never_mix() {
        let a = split(Path::Message, &vec![1u8; PIECE + 5]).unwrap();
        let b = split(Path::Message, &vec![2u8; PIECE + 5]).unwrap();
        let mut asm = Assembly::new();
        asm.add(Fragment::decode(Path::Message, &a[0]).unwrap()).unwrap();
        assert_eq!(asm.add(Fragment::decode(Path::Message, &b[1]).unwrap()), Err(FragmentError::Mismatch));
        assert_eq!(asm.missing(), vec![1]);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let mut state = 0x1234_5678u32;
        for len in 0..2_000 {
            let bytes: Vec<u8> = (0..len % 1100)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state as u8
                })
                .collect();
            let _ = Fragment::decode(Path::Message, &bytes);
        }
    }
}
