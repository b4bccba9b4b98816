//! Property tests of the wire codec: every frame round-trips, streams reassemble from any
//! split, and arbitrary or corrupted bytes never panic and never decode to the original.

use canopy::wire::{
    self, ErrorCode, Frame, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN, MAX_RELAY_PATH, RelayId, ReplayMode, Role,
    WireError,
};
use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name};
use proptest::collection::vec;
use proptest::prelude::*;

fn text(max_chars: usize) -> impl Strategy<Value = String> {
    // Any chars (up to 4 bytes each); the bound keeps every frame under the limit.
    vec(any::<char>(), 0..=max_chars).prop_map(|cs| cs.into_iter().collect())
}

fn chunk_strategy() -> impl Strategy<Value = Chunk> {
    let len = prop_oneof![0..=MAX_CHUNK_DATA, Just(0), Just(MAX_CHUNK_DATA)];
    (any::<u128>(), any::<u64>(), len.prop_flat_map(|n| vec(any::<u8>(), n)))
        .prop_map(|(name, expiry, data)| Chunk::new(Name::new(name), expiry, data).unwrap())
}

fn filter_strategy() -> impl Strategy<Value = Filter> {
    (any::<u128>(), 0u8..=128).prop_map(|(name, len)| Filter::new(Name::new(name), len).unwrap())
}

fn mode_strategy() -> impl Strategy<Value = ReplayMode> {
    prop_oneof![
        Just(ReplayMode::CachedAndLive),
        Just(ReplayMode::LiveOnly),
        Just(ReplayMode::CachedOnly),
        any::<u32>().prop_map(ReplayMode::MostRecent),
    ]
}

fn code_strategy() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        (1u16..=14).prop_map(ErrorCode::from),
        // Codes unknown to this version, which must survive unchanged.
        prop_oneof![Just(0u16), 15u16..=u16::MAX].prop_map(ErrorCode::Other),
    ]
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let path_len = prop_oneof![0..=MAX_RELAY_PATH, Just(MAX_RELAY_PATH)];
    prop_oneof![
        (
            any::<u16>(),
            prop_oneof![Just(Role::Client), Just(Role::Relay)],
            path_len.prop_flat_map(|n| vec(any::<u128>().prop_map(RelayId), n)),
            proptest::option::of(text(200)),
        )
            .prop_map(|(version, role, relay_path, token)| Frame::Hello {
                version,
                role,
                relay_path,
                token
            }),
        (any::<u64>(), filter_strategy(), mode_strategy(), any::<u32>())
            .prop_map(|(id, filter, mode, credit)| Frame::Subscribe { id, filter, mode, credit }),
        (any::<u64>(), any::<u32>()).prop_map(|(id, credit)| Frame::Credit { id, credit }),
        any::<u64>().prop_map(|id| Frame::Unsubscribe { id }),
        (any::<u64>(), chunk_strategy()).prop_map(|(seq, chunk)| Frame::Publish { seq, chunk }),
        (any::<u64>(), chunk_strategy()).prop_map(|(seq, chunk)| Frame::PublishUnacked { seq, chunk }),
        any::<u64>().prop_map(|seq| Frame::Ack { seq }),
        (any::<u64>(), chunk_strategy()).prop_map(|(id, chunk)| Frame::Deliver { id, chunk }),
        any::<u64>().prop_map(|id| Frame::ReplayDone { id }),
        (code_strategy(), proptest::option::of(any::<u64>()), text(1000))
            .prop_map(|(code, about, message)| Frame::Error { code, about, message }),
    ]
}

/// Decodes `buf` and, on success, checks the frame re-encodes to exactly the consumed bytes.
fn decode_checked(buf: &[u8]) {
    if let Ok(Some((frame, used))) = wire::decode(buf) {
        assert_eq!(wire::encode_to_vec(&frame).unwrap(), &buf[..used]);
    }
    if let Some(payload) = buf.get(LEN_PREFIX..)
        && let Ok(frame) = wire::decode_payload(payload)
    {
        assert_eq!(&wire::encode_to_vec(&frame).unwrap()[LEN_PREFIX..], payload);
    }
    let mut decoder = FrameDecoder::new();
    decoder.extend(buf);
    loop {
        match decoder.next_frame() {
            Ok(Some(_)) => {}
            // Skipped a refused frame (at least the prefix): go on.
            Err(err) if !err.is_fatal() => {}
            Ok(None) | Err(_) => break,
        }
    }
    assert!(decoder.buffered() <= buf.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_round_trips(frame in frame_strategy()) {
        let bytes = wire::encode_to_vec(&frame).unwrap();
        prop_assert!(bytes.len() <= LEN_PREFIX + MAX_FRAME_LEN);
        let declared = u32::from_be_bytes(bytes[..LEN_PREFIX].try_into().unwrap()) as usize;
        prop_assert_eq!(declared, bytes.len() - LEN_PREFIX);
        prop_assert_eq!(wire::decode(&bytes).unwrap(), Some((frame.clone(), bytes.len())));
        prop_assert_eq!(wire::decode_payload(&bytes[LEN_PREFIX..]).unwrap(), frame.clone());
        // encode appends.
        let mut out = vec![0xee; 3];
        wire::encode(&frame, &mut out).unwrap();
        prop_assert_eq!(&out[..3], &[0xee; 3]);
        prop_assert_eq!(&out[3..], &bytes[..]);
    }

    #[test]
    fn every_strict_prefix_needs_more(frame in frame_strategy()) {
        let bytes = wire::encode_to_vec(&frame).unwrap();
        for end in 0..bytes.len() {
            prop_assert_eq!(wire::decode(&bytes[..end]), Ok(None), "prefix of {} bytes", end);
        }
    }

    #[test]
    fn oversized_chunks_are_refused_in_sync(
        before in vec(frame_strategy(), 0..4),
        after in vec(frame_strategy(), 0..4),
        seq in any::<u64>(),
        len in (MAX_CHUNK_DATA + 1)..=(MAX_FRAME_LEN - 44),
        cuts in vec(any::<prop::sample::Index>(), 0..16),
    ) {
        // A Publish whose chunk is too large, framed honestly, between valid frames.
        let mut stream = Vec::new();
        for frame in &before {
            wire::encode(frame, &mut stream).unwrap();
        }
        stream.extend_from_slice(&u32::try_from(44 + len).unwrap().to_be_bytes());
        stream.extend_from_slice(&[0, 0, 0, 3]);
        stream.extend_from_slice(&seq.to_be_bytes());
        stream.extend_from_slice(&[0x5a; 16]);
        stream.extend_from_slice(&u64::MAX.to_be_bytes());
        stream.extend_from_slice(&(len as u64).to_be_bytes());
        stream.extend(std::iter::repeat_n(0xab, len));
        for frame in &after {
            wire::encode(frame, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.extend([0, stream.len()]);
        cuts.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in cuts.windows(2) {
            decoder.extend(&stream[piece[0]..piece[1]]);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => got.push(Ok(frame)),
                    Ok(None) => break,
                    Err(err) => got.push(Err(err)),
                }
            }
        }
        let want: Vec<Result<Frame, WireError>> = before
            .into_iter()
            .map(Ok)
            .chain([Err(WireError::ChunkTooLarge { seq, len: len as u64 })])
            .chain(after.into_iter().map(Ok))
            .collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn split_streams_reassemble_in_order(
        frames in vec(frame_strategy(), 0..8),
        cuts in vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let mut stream = Vec::new();
        for frame in &frames {
            wire::encode(frame, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in cuts.windows(2) {
            decoder.extend(&stream[piece[0]..piece[1]]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                got.push(frame);
            }
            prop_assert!(decoder.buffered() < LEN_PREFIX + MAX_FRAME_LEN);
        }
        prop_assert_eq!(got, frames);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..8192)) {
        decode_checked(&bytes);
    }

    #[test]
    fn random_payloads_behind_a_valid_prefix_never_panic(
        tag in 0u32..10,
        rest in vec(any::<u8>(), 0..MAX_FRAME_LEN),
    ) {
        // A plausible tag and an honest length get past the first checks into the fields.
        let mut payload = tag.to_be_bytes().to_vec();
        payload.extend_from_slice(&rest);
        payload.truncate(MAX_FRAME_LEN);
        let mut buf = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(&payload);
        decode_checked(&buf);
    }

    #[test]
    fn flipped_bytes_decode_to_another_frame_or_fail(
        frame in frame_strategy(),
        flips in vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let bytes = wire::encode_to_vec(&frame).unwrap();
        let mut payload = bytes[LEN_PREFIX..].to_vec();
        for (at, mask) in &flips {
            let at = at.index(payload.len());
            payload[at] ^= mask;
        }
        if payload == bytes[LEN_PREFIX..] {
            return Ok(()); // the flips cancelled out
        }
        if let Ok(other) = wire::decode_payload(&payload) {
            prop_assert_ne!(&other, &frame);
            // Decoding is canonical: the new frame encodes to exactly the corrupted bytes.
            prop_assert_eq!(&wire::encode_to_vec(&other).unwrap()[LEN_PREFIX..], &payload[..]);
        }
        let mut buf = bytes[..LEN_PREFIX].to_vec();
        buf.extend_from_slice(&payload);
        decode_checked(&buf);
    }

    #[test]
    fn truncated_payloads_fail(frame in frame_strategy(), cut in any::<prop::sample::Index>()) {
        let bytes = wire::encode_to_vec(&frame).unwrap();
        let payload = &bytes[LEN_PREFIX..];
        let short = &payload[..cut.index(payload.len())];
        prop_assert!(wire::decode_payload(short).is_err());
        // With an honest (shorter) length prefix the stream decoder must fail too.
        let mut buf = u32::try_from(short.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(short);
        prop_assert!(wire::decode(&buf).is_err());
        decode_checked(&buf);
    }
}
