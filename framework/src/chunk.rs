//! Chunks: the immutable unit of data Canopy names, caches and delivers.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};

use crate::Name;

/// The largest payload a chunk may carry, in bytes.
pub const MAX_CHUNK_DATA: usize = 1024;

/// Why a chunk could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The payload exceeded [`MAX_CHUNK_DATA`].
    #[error("chunk {name} carries {len} bytes; the limit is {MAX_CHUNK_DATA} bytes")]
    TooLarge {
        /// Name of the refused chunk.
        name: Name,
        /// Size of the refused payload.
        len: usize,
    },
}

/// A named, immutable piece of data of at most [`MAX_CHUNK_DATA`] bytes with an expiry time.
///
/// The first chunk stored at a name wins; publishing identical bytes again is harmless, and
/// different bytes at the same name are a conflict. The payload is a [`Bytes`], so fanning a
/// chunk out to many subscribers shares one buffer.
///
/// ```
/// use canopy::{Chunk, Name, MAX_CHUNK_DATA};
/// let c = Chunk::new(Name::new(1), 1_700_000_000_000, &b"hello"[..]).unwrap();
/// assert_eq!(c.data().as_ref(), b"hello");
/// assert!(Chunk::new(Name::new(1), 0, vec![0u8; MAX_CHUNK_DATA + 1]).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Chunk {
    name: Name,
    expiry: u64,
    data: Bytes,
}

impl Chunk {
    /// Builds a chunk that expires at `expiry_ms` (unix milliseconds).
    ///
    /// Fails with [`ChunkError::TooLarge`] when `data` is longer than [`MAX_CHUNK_DATA`].
    pub fn new(name: Name, expiry_ms: u64, data: impl Into<Bytes>) -> Result<Self, ChunkError> {
        let data = data.into();
        if data.len() > MAX_CHUNK_DATA {
            return Err(ChunkError::TooLarge { name, len: data.len() });
        }
        Ok(Chunk { name, expiry: expiry_ms, data })
    }

    /// The chunk's name.
    pub fn name(&self) -> Name {
        self.name
    }

    /// Expiry time in unix milliseconds.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// The payload.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Whether the chunk has expired at `now_ms` (expiry is exclusive: a chunk expiring at
    /// `t` is no longer served at `t`).
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expiry
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("name", &self.name)
            .field("expiry", &self.expiry)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Decoding enforces the size limit, so a chunk read off the wire is as valid as a built one.
impl<'de> Deserialize<'de> for Chunk {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            name: Name,
            expiry: u64,
            data: Bytes,
        }
        let raw = Raw::deserialize(deserializer)?;
        Chunk::new(raw.name, raw.expiry, raw.data).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_inclusive_and_error_states_it() {
        assert!(Chunk::new(Name::new(5), 1, vec![0u8; MAX_CHUNK_DATA]).is_ok());
        let err = Chunk::new(Name::new(5), 1, vec![0u8; MAX_CHUNK_DATA + 1]).unwrap_err();
        assert_eq!(err, ChunkError::TooLarge { name: Name::new(5), len: 1025 });
        assert!(err.to_string().contains("limit is 1024 bytes"), "{err}");
    }

    #[test]
    fn expiry_is_exclusive() {
        let c = Chunk::new(Name::new(1), 100, Bytes::new()).unwrap();
        assert!(!c.is_expired(99));
        assert!(c.is_expired(100));
    }
}
