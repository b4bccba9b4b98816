//! The wire protocol relays and clients (and relays among themselves) exchange.
//!
//! A connection carries a stream of **frames**. Each frame is a 4-byte big-endian payload
//! length followed by that many payload bytes; the payload is the [bincode 2] encoding of one
//! [`Frame`] with fixed-width big-endian integers. Payloads are at most [`MAX_FRAME_LEN`]
//! bytes, checked when encoding and before waiting for the bytes when decoding. Decoding
//! untrusted bytes never panics, never allocates more than the frame limit, and returns a
//! typed [`WireError`]. `docs/protocol.md` describes the byte layout for implementers in other
//! languages; the golden tests in `framework/tests/wire_cases.rs` pin it.
//!
//! This module holds the crate's only bincode configuration: nothing else should encode
//! protocol bytes.
//!
//! ```
//! use canopy::wire::{self, Frame, FrameDecoder};
//! use canopy::{Chunk, Name};
//!
//! let chunk = Chunk::new(Name::new(7), 1_700_000_000_000, &b"hi"[..]).unwrap();
//! let bytes = wire::encode_to_vec(&Frame::Publish { seq: 1, chunk: chunk.clone() }).unwrap();
//!
//! // Bytes may arrive in any pieces; the decoder hands back whole frames.
//! let mut decoder = FrameDecoder::new();
//! decoder.extend(&bytes[..5]);
//! assert_eq!(decoder.next_frame().unwrap(), None);
//! decoder.extend(&bytes[5..]);
//! assert_eq!(decoder.next_frame().unwrap(), Some(Frame::Publish { seq: 1, chunk }));
//! ```
//!
//! [bincode 2]: https://docs.rs/bincode/2

use std::fmt;

use bincode::config::{BigEndian, Configuration, Fixint, Limit};
use bincode::enc::write::Writer;
use bincode::error::{DecodeError, EncodeError};
use bytes::{Buf, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Chunk, Filter, MAX_CHUNK_DATA};

/// The protocol version this crate speaks, carried in [`Frame::Hello`].
pub const PROTOCOL_VERSION: u16 = 3;

/// The TLS ALPN protocol id for this version of the protocol.
pub const ALPN: &[u8] = b"canopy/3";

/// The largest frame payload, in bytes, not counting the 4-byte length prefix.
///
/// Room for a 1 KiB chunk plus headers, a hello with a full relay path and a token, or an
/// error with its message.
pub const MAX_FRAME_LEN: usize = 4096;

/// Size of the big-endian `u32` length prefix in front of every frame payload.
pub const LEN_PREFIX: usize = 4;

/// The most entries a [`Frame::Hello`] relay path may hold.
pub const MAX_RELAY_PATH: usize = 64;

/// The one bincode configuration of the crate: fixed-width big-endian integers, and a decode
/// limit of one frame so a forged length can never make the decoder allocate more.
type WireConfig = Configuration<BigEndian, Fixint, Limit<MAX_FRAME_LEN>>;

const CONFIG: WireConfig = bincode::config::standard()
    .with_big_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_FRAME_LEN>();

/// Which side of a connection a peer plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// An application publishing and/or subscribing (tag 0).
    Client,
    /// A relay connecting to its parent relay (tag 1).
    Relay,
}

/// Which chunks a subscription receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ReplayMode {
    /// Every cached matching chunk, then live chunks as they arrive (tag 0, the default).
    #[default]
    CachedAndLive,
    /// Only chunks that arrive after the subscription (tag 1).
    LiveOnly,
    /// Only cached chunks; the subscription delivers nothing after
    /// [`Frame::ReplayDone`] (tag 2).
    CachedOnly,
    /// At most this many cached chunks, the most recently stored, then live chunks (tag 3).
    MostRecent(u32),
}

/// A relay's 128-bit identity, used in [`Frame::Hello`] relay paths to detect cycles.
///
/// On the wire it is 16 raw big-endian bytes, like a [`Name`](crate::Name); its text form is
/// `0x` and 32 lowercase hex digits.
///
/// ```
/// use canopy::wire::RelayId;
/// assert_eq!(RelayId(0x2a).to_string(), "0x0000000000000000000000000000002a");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(pub u128);

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:032x}", self.0)
    }
}

impl Serialize for RelayId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.to_be_bytes().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RelayId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <[u8; 16]>::deserialize(deserializer).map(|b| RelayId(u128::from_be_bytes(b)))
    }
}

/// Why a peer refused something, carried in [`Frame::Error`] as a plain `u16`.
///
/// Codes this version does not know decode as [`ErrorCode::Other`] and encode back unchanged,
/// so a newer peer's codes survive. Do not build `Other` with a known code: it would travel
/// as that code and come back as the named variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// 1: the frame could not be decoded, or broke the session rules.
    Malformed,
    /// 2: the peer's [`Frame::Hello`] names a protocol version this side does not speak.
    UnsupportedVersion,
    /// 3: a frame's length prefix exceeded [`MAX_FRAME_LEN`].
    FrameTooLarge,
    /// 4: a published chunk's data exceeded [`MAX_CHUNK_DATA`](crate::MAX_CHUNK_DATA).
    ChunkTooLarge,
    /// 5: a chunk with different data is already stored at the published name.
    Conflict,
    /// 6: the published chunk had already expired.
    Expired,
    /// 7: the peer may not publish this chunk.
    PublishDenied,
    /// 8: the peer may not subscribe to this filter.
    SubscribeDenied,
    /// 9: the subscriber fell too far behind; the subscription (or connection) is dropped.
    SlowConsumer,
    /// 10: a relay's path already contains the relay it connects to.
    Cycle,
    /// 11: the subscription id is not open on this connection.
    UnknownSubscription,
    /// 12: a token is required, or the given one was not accepted.
    Unauthenticated,
    /// 13: the relay failed internally.
    Internal,
    /// 14: the store is full of chunks that outlive this one.
    StoreFull,
    /// A code this version does not know (from a newer peer).
    Other(u16),
}

impl ErrorCode {
    /// The numeric code carried on the wire.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::ChunkTooLarge => 4,
            ErrorCode::Conflict => 5,
            ErrorCode::Expired => 6,
            ErrorCode::PublishDenied => 7,
            ErrorCode::SubscribeDenied => 8,
            ErrorCode::SlowConsumer => 9,
            ErrorCode::Cycle => 10,
            ErrorCode::UnknownSubscription => 11,
            ErrorCode::Unauthenticated => 12,
            ErrorCode::Internal => 13,
            ErrorCode::StoreFull => 14,
            ErrorCode::Other(code) => code,
        }
    }

    /// The code for a number read off the wire; unknown numbers become [`ErrorCode::Other`].
    pub const fn from_code(code: u16) -> Self {
        match code {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::ChunkTooLarge,
            5 => ErrorCode::Conflict,
            6 => ErrorCode::Expired,
            7 => ErrorCode::PublishDenied,
            8 => ErrorCode::SubscribeDenied,
            9 => ErrorCode::SlowConsumer,
            10 => ErrorCode::Cycle,
            11 => ErrorCode::UnknownSubscription,
            12 => ErrorCode::Unauthenticated,
            13 => ErrorCode::Internal,
            14 => ErrorCode::StoreFull,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        ErrorCode::from_code(code)
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> Self {
        code.code()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ErrorCode::Malformed => "malformed frame",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::FrameTooLarge => "frame too large",
            ErrorCode::ChunkTooLarge => "chunk too large",
            ErrorCode::Conflict => "conflicting chunk",
            ErrorCode::Expired => "chunk expired",
            ErrorCode::PublishDenied => "publish denied",
            ErrorCode::SubscribeDenied => "subscribe denied",
            ErrorCode::SlowConsumer => "slow consumer",
            ErrorCode::Cycle => "relay cycle",
            ErrorCode::UnknownSubscription => "unknown subscription",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Internal => "internal error",
            ErrorCode::StoreFull => "store full",
            ErrorCode::Other(code) => return write!(f, "unknown error code {code}"),
        };
        write!(f, "{text} ({})", self.code())
    }
}

/// One message of the protocol. The comment on each variant gives its tag, the `u32` that
/// starts its encoding.
///
/// [`Frame::Hello`] is variant 0 and `version` is its first field, so the first six payload
/// bytes of a hello are the same in every protocol version: `00 00 00 00` then the version
/// as a big-endian `u16` (see [`peek_hello_version`]). Future versions must keep this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Tag 0. The first frame each side sends: the client (or child relay) first, then the
    /// relay's answer.
    Hello {
        /// The sender's protocol version, [`PROTOCOL_VERSION`] for this crate.
        version: u16,
        /// Whether the sender is a client or a relay.
        role: Role,
        /// For a relay, its own id followed by its ancestors up to the origin; empty for
        /// clients. At most [`MAX_RELAY_PATH`] entries.
        #[serde(with = "relay_path")]
        relay_path: Vec<RelayId>,
        /// An authentication token, if the sender has one.
        token: Option<String>,
    },
    /// Tag 1. Opens subscription `id` (chosen by the subscriber, unique on the connection).
    Subscribe {
        /// The subscription id that [`Frame::Deliver`] and [`Frame::ReplayDone`] refer to.
        id: u64,
        /// Which names to receive.
        filter: Filter,
        /// Which chunks to replay from the cache.
        mode: ReplayMode,
        /// How many [`Frame::Deliver`]s the relay may send for this subscription before it
        /// waits for [`Frame::Credit`]: the subscriber's free buffer space, in chunks.
        credit: u32,
    },
    /// Tag 2. Closes subscription `id`.
    Unsubscribe {
        /// The subscription to close.
        id: u64,
    },
    /// Tag 3. Publishes a chunk; the relay answers [`Frame::Ack`] or [`Frame::Error`] with
    /// the same `seq`.
    Publish {
        /// The publisher's sequence number for matching the answer.
        seq: u64,
        /// The chunk to store and fan out.
        chunk: Chunk,
    },
    /// Tag 4. The publish with this `seq` was accepted (or was an identical re-publish).
    Ack {
        /// The acknowledged publish.
        seq: u64,
    },
    /// Tag 5. A chunk matching subscription `id`.
    Deliver {
        /// The subscription the chunk is for.
        id: u64,
        /// The chunk.
        chunk: Chunk,
    },
    /// Tag 6. Subscription `id` has delivered every cached chunk it will replay; live
    /// chunks follow.
    ReplayDone {
        /// The subscription whose replay finished.
        id: u64,
    },
    /// Tag 7. Something was refused or went wrong.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// The publish `seq` or subscription `id` the error is about; `None` means the
        /// connection as a whole.
        about: Option<u64>,
        /// Human-readable detail.
        message: String,
    },
    /// Tag 8. The subscriber has made room for `credit` more [`Frame::Deliver`]s on
    /// subscription `id` (it consumed that many). Credit adds up; an unknown `id` is ignored,
    /// since the subscription may have ended while the frame was in flight.
    Credit {
        /// The subscription.
        id: u64,
        /// How many more deliveries the relay may send.
        credit: u32,
    },
    /// Tag 9. Publishes a chunk as [`Frame::Publish`] does, except that the relay answers
    /// only a refusal ([`Frame::Error`] with this `seq`), never an [`Frame::Ack`]: the
    /// publisher does not wait, and learns of a chunk only if it was refused (at most once,
    /// as core NATS's or MQTT QoS 0's publishes; see `docs/protocol.md`, *Publishing*).
    PublishUnacked {
        /// The publisher's sequence number for matching a refusal.
        seq: u64,
        /// The chunk to store and fan out.
        chunk: Chunk,
    },
}

/// Serde glue for the relay path: a plain sequence, but decoding refuses more than
/// [`MAX_RELAY_PATH`] entries before allocating for them.
mod relay_path {
    use std::fmt;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::{MAX_RELAY_PATH, RelayId};

    pub(super) fn serialize<S: Serializer>(path: &[RelayId], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(path)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RelayId>, D::Error> {
        d.deserialize_seq(PathVisitor)
    }

    struct PathVisitor;

    impl<'de> Visitor<'de> for PathVisitor {
        type Value = Vec<RelayId>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a relay path of at most {MAX_RELAY_PATH} ids")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > MAX_RELAY_PATH {
                return Err(A::Error::invalid_length(hint, &self));
            }
            let mut path = Vec::with_capacity(hint);
            while let Some(id) = seq.next_element()? {
                if path.len() == MAX_RELAY_PATH {
                    return Err(A::Error::invalid_length(MAX_RELAY_PATH + 1, &self));
                }
                path.push(id);
            }
            Ok(path)
        }
    }
}

/// Why bytes could not be decoded into a frame, or a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A payload (declared or encoded) is longer than [`MAX_FRAME_LEN`].
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The payload length.
        len: usize,
        /// The limit, [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// A hello to encode has a relay path longer than [`MAX_RELAY_PATH`].
    #[error("relay path of {len} entries exceeds the limit of {max}")]
    PathTooLong {
        /// The path length.
        len: usize,
        /// The limit, [`MAX_RELAY_PATH`].
        max: usize,
    },
    /// The payload ended in the middle of a value.
    #[error("frame payload ended early: at least {additional} more bytes were needed")]
    Truncated {
        /// How many more bytes the value being read needed, at least.
        additional: usize,
    },
    /// The payload is not a valid frame (bad tag, bad UTF-8, a non-canonical filter, a
    /// delivered chunk over the size limit, a relay path over the limit, ...).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A [`Frame::Publish`] (or [`Frame::PublishUnacked`]) that is well formed except that its chunk carries more than
    /// [`MAX_CHUNK_DATA`] bytes. Not fatal: the frame's boundary is intact, so the stream
    /// stays in sync ([`FrameDecoder`] has already skipped the frame); answer
    /// `Error{ChunkTooLarge, about: seq}` and go on.
    #[error("publish {seq}: the chunk carries {len} bytes; the limit is {max} bytes", max = MAX_CHUNK_DATA)]
    ChunkTooLarge {
        /// The publish's `seq`, for the answer.
        seq: u64,
        /// The chunk's data length.
        len: u64,
    },
    /// The payload holds a whole frame followed by more bytes.
    #[error("{extra} bytes left over after the frame")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// A hello names a protocol version this crate does not speak.
    #[error("protocol version {got} is not supported; this side speaks version {supported}")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u16,
        /// The version this side speaks, [`PROTOCOL_VERSION`].
        supported: u16,
    },
    /// Encoding failed for a reason other than size (not expected for any frame).
    #[error("frame could not be encoded: {0}")]
    Encode(String),
}

impl WireError {
    /// The [`ErrorCode`] to send the peer whose bytes caused this error.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::Encode(_) => ErrorCode::Internal,
            WireError::ChunkTooLarge { .. } => ErrorCode::ChunkTooLarge,
            WireError::PathTooLong { .. }
            | WireError::Truncated { .. }
            | WireError::Malformed(_)
            | WireError::TrailingBytes { .. } => ErrorCode::Malformed,
        }
    }
}

impl WireError {
    /// Whether the stream can no longer be split into frames. Only
    /// [`WireError::ChunkTooLarge`] is not fatal: its frame is skipped and decoding goes on.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, WireError::ChunkTooLarge { .. })
    }

    /// The publish `seq` the error is about, for the `about` of the `Error` frame answering
    /// it; `None` when it concerns the connection.
    pub fn about(&self) -> Option<u64> {
        match self {
            WireError::ChunkTooLarge { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

impl From<DecodeError> for WireError {
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::UnexpectedEnd { additional } => WireError::Truncated { additional },
            other => WireError::Malformed(other.to_string()),
        }
    }
}

/// Checks that a [`Frame::Hello`] speaks [`PROTOCOL_VERSION`]; other frames pass.
///
/// ```
/// use canopy::wire::{check_version, Frame, Role, WireError};
/// let hello = Frame::Hello { version: 9, role: Role::Client, relay_path: vec![], token: None };
/// assert_eq!(check_version(&hello), Err(WireError::UnsupportedVersion { got: 9, supported: 3 }));
/// ```
pub fn check_version(frame: &Frame) -> Result<(), WireError> {
    match frame {
        Frame::Hello { version, .. } if *version != PROTOCOL_VERSION => {
            Err(WireError::UnsupportedVersion { got: *version, supported: PROTOCOL_VERSION })
        }
        _ => Ok(()),
    }
}

/// The version in a payload that starts like a [`Frame::Hello`] (tag 0), without decoding
/// the rest, which may follow another version's layout. `None` for other payloads.
pub fn peek_hello_version(payload: &[u8]) -> Option<u16> {
    match payload {
        [0, 0, 0, 0, hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// A bincode writer that appends to a `Vec` until [`MAX_FRAME_LEN`] bytes, then only counts,
/// so an oversized frame is measured exactly without buffering it.
struct BoundedWriter<'a> {
    out: &'a mut Vec<u8>,
    written: usize,
}

impl Writer for BoundedWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.written = self.written.saturating_add(bytes.len());
        if self.written <= MAX_FRAME_LEN {
            self.out.extend_from_slice(bytes);
        }
        Ok(())
    }
}

/// Appends `frame` to `out`: the 4-byte big-endian payload length, then the payload.
///
/// Fails with [`WireError::FrameTooLarge`] when the payload would exceed [`MAX_FRAME_LEN`]
/// and [`WireError::PathTooLong`] for a hello with more than [`MAX_RELAY_PATH`] relays;
/// `out` is left as it was on error.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    if let Frame::Hello { relay_path, .. } = frame
        && relay_path.len() > MAX_RELAY_PATH
    {
        return Err(WireError::PathTooLong { len: relay_path.len(), max: MAX_RELAY_PATH });
    }
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    let mut writer = BoundedWriter { out: &mut *out, written: 0 };
    let result = bincode::serde::encode_into_writer(frame, &mut writer, CONFIG);
    let len = writer.written;
    if let Err(err) = result {
        out.truncate(start);
        return Err(WireError::Encode(err.to_string()));
    }
    let Some(prefix) = u32::try_from(len).ok().filter(|_| len <= MAX_FRAME_LEN) else {
        out.truncate(start);
        return Err(WireError::FrameTooLarge { len, max: MAX_FRAME_LEN });
    };
    out[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Encodes `frame` (length prefix and payload) into a new vector.
pub fn encode_to_vec(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode(frame, &mut out)?;
    Ok(out)
}

/// Decodes the frame at the start of `buf`, a stream of length-prefixed frames.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole frame, and
/// `Ok(Some((frame, consumed)))` with the number of bytes (prefix included) the frame took.
/// A length prefix above [`MAX_FRAME_LEN`] fails at once, without waiting for the payload.
/// Every error but [`WireError::ChunkTooLarge`] is fatal for the stream: the frame boundary
/// can no longer be trusted. After `ChunkTooLarge` the next frame starts `LEN_PREFIX` plus
/// the length prefix bytes in ([`FrameDecoder`] skips it by itself).
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = usize::try_from(u32::from_be_bytes(*prefix)).unwrap_or(usize::MAX);
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge { len, max: MAX_FRAME_LEN });
    }
    let end = LEN_PREFIX + len;
    let Some(payload) = buf.get(LEN_PREFIX..end) else {
        return Ok(None);
    };
    decode_payload(payload).map(|frame| Some((frame, end)))
}

/// Decodes one whole frame payload (without its length prefix); every byte must be used.
///
/// A hello from another protocol version is returned as decoded when it has this version's
/// layout (check it with [`check_version`]); when it does not decode, the error is
/// [`WireError::UnsupportedVersion`] rather than [`WireError::Malformed`], so the peer can be
/// told why.
pub fn decode_payload(payload: &[u8]) -> Result<Frame, WireError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let result = match bincode::serde::decode_from_slice::<Frame, _>(payload, CONFIG) {
        Ok((frame, used)) if used == payload.len() => return Ok(frame),
        Ok((_, used)) => WireError::TrailingBytes { extra: payload.len() - used },
        Err(err) => match oversized_publish(payload) {
            Some((seq, len)) => return Err(WireError::ChunkTooLarge { seq, len }),
            None => WireError::from(err),
        },
    };
    match peek_hello_version(payload) {
        Some(got) if got != PROTOCOL_VERSION => {
            Err(WireError::UnsupportedVersion { got, supported: PROTOCOL_VERSION })
        }
        _ => Err(result),
    }
}

/// The `seq` and data length of a payload that is a [`Frame::Publish`] or
/// [`Frame::PublishUnacked`] in every respect but a chunk over [`MAX_CHUNK_DATA`] bytes: tag 3
/// or 9, then `seq`, name, expiry, and a data length that is exactly the rest of the payload.
fn oversized_publish(payload: &[u8]) -> Option<(u64, u64)> {
    const HEADER: usize = 4 + 8 + 16 + 8 + 8;
    let header = payload.first_chunk::<HEADER>()?;
    let word = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let (tag, seq, len) = (&header[..4], word(4), word(36));
    let rest = u64::try_from(payload.len() - HEADER).ok()?;
    ((tag == [0, 0, 0, 3] || tag == [0, 0, 0, 9]) && len == rest && len > MAX_CHUNK_DATA as u64).then_some((seq, len))
}

/// Reassembles frames from bytes that arrive in arbitrary pieces.
///
/// Push bytes with [`extend`](Self::extend), pop frames with
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`. Once `next_frame` has
/// returned `Ok(None)` the buffer holds less than one frame (at most
/// `LEN_PREFIX + MAX_FRAME_LEN - 1` bytes). A [fatal](WireError::is_fatal) error means the
/// stream is out of sync, and later calls return the same error; after
/// [`WireError::ChunkTooLarge`] the decoder has skipped that frame and goes on with the next.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// The largest buffer kept once every byte has been returned as frames.
    const KEEP: usize = 16 * 1024;

    /// An empty decoder.
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer, with room to receive into directly (with
    /// `tokio::io::AsyncReadExt::read_buf`, say) rather than copy each byte in from a buffer
    /// of one's own with [`FrameDecoder::extend`]: it is made at least `size` bytes long,
    /// counting the bytes it holds, with at least [`FrameDecoder::MIN_ROOM`] of room (a read
    /// may fill all of its spare capacity, which can be more). Only append to it.
    ///
    /// Room is counted that way so the buffer keeps its size from read to read, its space
    /// reused once the frames in it are taken: asking for `size` bytes more each time would
    /// grow it by a read's size whenever a read left part of a frame behind.
    pub fn buffer_for(&mut self, size: usize) -> &mut BytesMut {
        self.buf.reserve(size.saturating_sub(self.buf.len()).max(Self::MIN_ROOM));
        &mut self.buf
    }

    /// The least room [`FrameDecoder::buffer_for`] makes.
    pub const MIN_ROOM: usize = 1024;

    /// The next whole frame, or `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match decode(&self.buf) {
            Ok(Some((frame, consumed))) => {
                self.buf.advance(consumed);
                Ok(Some(frame))
            }
            Ok(None) => {
                // Drained after a burst: give the burst's buffer back rather than keep it
                // for the life of the link.
                if self.buf.is_empty() && self.buf.capacity() > Self::KEEP {
                    self.buf = BytesMut::new();
                }
                Ok(None)
            }
            Err(err) => {
                if !err.is_fatal()
                    && let Some(prefix) = self.buf.first_chunk::<LEN_PREFIX>()
                {
                    // `decode` only returns a non-fatal error for a whole frame in the buffer.
                    let end = LEN_PREFIX + u32::from_be_bytes(*prefix) as usize;
                    self.buf.advance(end.min(self.buf.len()));
                }
                Err(err)
            }
        }
    }

    /// Number of buffered bytes not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of memory the decoder holds for its buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}
