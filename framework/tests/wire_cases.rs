//! Hand-crafted wire cases: golden bytes that pin the layout documented in
//! `docs/protocol.md`, and malformed inputs that must fail with the right error.

use canopy::wire::{
    self, ALPN, ErrorCode, Frame, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN, MAX_RELAY_PATH,
    PROTOCOL_VERSION, RelayId, ReplayMode, Role, WireError,
};
use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name};

/// The worked example of `docs/protocol.md`: a Publish of `"hi"`.
const GOLDEN_PUBLISH: &[u8] = &[
    0x00, 0x00, 0x00, 0x2e, // payload length 46
    0x00, 0x00, 0x00, 0x03, // tag 3 = Publish
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // seq = 1
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // chunk name, 16 bytes
    0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, //
    0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00, // expiry = 1_700_000_000_000 ms
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, // data length 2
    0x68, 0x69, // "hi"
];

/// A relay's Hello with a one-entry path and a token.
const GOLDEN_HELLO: &[u8] = &[
    0x00, 0x00, 0x00, 0x2c, // payload length 44
    0x00, 0x00, 0x00, 0x00, // tag 0 = Hello
    0x00, 0x03, // version 3
    0x00, 0x00, 0x00, 0x01, // role: tag 1 = Relay
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // relay_path: 1 entry
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // RelayId 0xaa, 16 bytes
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xaa, //
    0x01, // token: Some
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // string length 1
    0x74, // "t"
];

fn golden_publish() -> Frame {
    let name = Name::new(0x0001_0203_0405_0607_0809_0a0b_0c0d_0e0f);
    Frame::Publish { seq: 1, chunk: Chunk::new(name, 1_700_000_000_000, &b"hi"[..]).unwrap() }
}

fn golden_hello() -> Frame {
    Frame::Hello {
        version: 3,
        role: Role::Relay,
        relay_path: vec![RelayId(0xaa)],
        token: Some("t".to_owned()),
    }
}

/// Prefixes `payload` with its length.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A Publish payload with `data_len` declared and `data` following.
fn publish_payload(name: [u8; 16], data_len: u64, data: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 3];
    p.extend_from_slice(&7u64.to_be_bytes());
    p.extend_from_slice(&name);
    p.extend_from_slice(&u64::MAX.to_be_bytes());
    p.extend_from_slice(&data_len.to_be_bytes());
    p.extend_from_slice(data);
    p
}

/// A Subscribe payload with a raw filter.
fn subscribe_payload(name: [u8; 16], len: u8) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 1];
    p.extend_from_slice(&9u64.to_be_bytes());
    p.extend_from_slice(&name);
    p.push(len);
    p.extend_from_slice(&[0, 0, 0, 0]); // CachedAndLive
    p.extend_from_slice(&[0, 0, 4, 0]); // credit 1024
    p
}

/// A Hello payload with a raw relay-path length and `entries` ids.
fn hello_payload(version: u16, path_len: u64, entries: usize) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&version.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1]);
    p.extend_from_slice(&path_len.to_be_bytes());
    for i in 0..entries {
        p.extend_from_slice(&(i as u128).to_be_bytes());
    }
    p.push(0); // token: None
    p
}

fn assert_malformed(result: Result<Frame, WireError>) {
    assert!(matches!(result, Err(WireError::Malformed(_))), "{result:?}");
}

#[test]
fn golden_publish_bytes() {
    assert_eq!(wire::encode_to_vec(&golden_publish()).unwrap(), GOLDEN_PUBLISH);
    assert_eq!(
        wire::decode(GOLDEN_PUBLISH).unwrap(),
        Some((golden_publish(), GOLDEN_PUBLISH.len()))
    );
    // The answer shown in the doc's worked example.
    assert_eq!(
        wire::encode_to_vec(&Frame::Ack { seq: 1 }).unwrap(),
        [0, 0, 0, 0x0c, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1]
    );
}

#[test]
fn golden_hello_bytes() {
    assert_eq!(wire::encode_to_vec(&golden_hello()).unwrap(), GOLDEN_HELLO);
    assert_eq!(wire::decode(GOLDEN_HELLO).unwrap(), Some((golden_hello(), GOLDEN_HELLO.len())));
    assert_eq!(wire::peek_hello_version(&GOLDEN_HELLO[LEN_PREFIX..]), Some(3));
}

#[test]
fn golden_small_frames() {
    // Every other variant, pinned byte for byte.
    let filter: Filter = "0xab000000000000000000000000000000/8".parse().unwrap();
    let cases: Vec<(Frame, Vec<u8>)> = vec![
        (
            Frame::Subscribe { id: 2, filter, mode: ReplayMode::MostRecent(5), credit: 1024 },
            [
                &[0, 0, 0, 1][..],
                &2u64.to_be_bytes(),
                &[0xab],
                &[0; 15],
                &[8],
                &[0, 0, 0, 3],
                &[0, 0, 0, 5],
                &[0, 0, 4, 0],
            ]
            .concat(),
        ),
        (
            Frame::Subscribe { id: 2, filter: Filter::ALL, mode: ReplayMode::LiveOnly, credit: 0 },
            [&[0, 0, 0, 1][..], &2u64.to_be_bytes(), &[0; 16], &[0], &[0, 0, 0, 1], &[0; 4]].concat(),
        ),
        (
            Frame::Credit { id: 9, credit: 512 },
            [&[0, 0, 0, 8][..], &9u64.to_be_bytes(), &[0, 0, 2, 0]].concat(),
        ),
        (Frame::Unsubscribe { id: 3 }, [&[0, 0, 0, 2][..], &3u64.to_be_bytes()].concat()),
        (Frame::Ack { seq: 4 }, [&[0, 0, 0, 4][..], &4u64.to_be_bytes()].concat()),
        (
            Frame::PublishUnacked { seq: 6, chunk: Chunk::new(Name::new(1), 2, &b"z"[..]).unwrap() },
            [
                &[0, 0, 0, 9][..],
                &6u64.to_be_bytes(),
                &1u128.to_be_bytes(),
                &2u64.to_be_bytes(),
                &1u64.to_be_bytes(),
                b"z",
            ]
            .concat(),
        ),
        (
            Frame::Deliver { id: 5, chunk: Chunk::new(Name::new(1), 2, &b""[..]).unwrap() },
            [
                &[0, 0, 0, 5][..],
                &5u64.to_be_bytes(),
                &1u128.to_be_bytes(),
                &2u64.to_be_bytes(),
                &[0; 8],
            ]
            .concat(),
        ),
        (Frame::ReplayDone { id: 6 }, [&[0, 0, 0, 6][..], &6u64.to_be_bytes()].concat()),
        (
            Frame::Error { code: ErrorCode::Conflict, about: Some(7), message: "x".into() },
            [&[0, 0, 0, 7][..], &[0, 5], &[1], &7u64.to_be_bytes(), &1u64.to_be_bytes(), b"x"]
                .concat(),
        ),
        (
            Frame::Error { code: ErrorCode::Other(0x1234), about: None, message: String::new() },
            [&[0, 0, 0, 7][..], &[0x12, 0x34], &[0], &0u64.to_be_bytes()].concat(),
        ),
        (
            Frame::Hello { version: 2, role: Role::Client, relay_path: vec![], token: None },
            [&[0, 0, 0, 0][..], &[0, 2], &[0, 0, 0, 0], &0u64.to_be_bytes(), &[0]].concat(),
        ),
    ];
    for (frame, payload) in cases {
        let bytes = framed(&payload);
        assert_eq!(wire::encode_to_vec(&frame).unwrap(), bytes, "{frame:?}");
        assert_eq!(wire::decode_payload(&payload).unwrap(), frame);
    }
}

#[test]
fn constants_agree() {
    assert_eq!(ALPN, format!("canopy/{PROTOCOL_VERSION}").as_bytes());
    assert_eq!(RelayId(0xaa).to_string(), "0x000000000000000000000000000000aa");
}

#[test]
fn oversized_prefix_fails_without_the_bytes() {
    let too_big = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
    assert_eq!(wire::decode(&too_big), Err(WireError::FrameTooLarge { len: 4097, max: 4096 }));
    assert_eq!(
        wire::decode(&[0xff; 4]),
        Err(WireError::FrameTooLarge { len: u32::MAX as usize, max: MAX_FRAME_LEN })
    );
    let mut decoder = FrameDecoder::new();
    decoder.extend(&too_big);
    assert!(matches!(decoder.next_frame(), Err(WireError::FrameTooLarge { .. })));
    // Exactly the limit just waits for the payload.
    let at_limit = u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes();
    assert_eq!(wire::decode(&at_limit), Ok(None));
    assert_eq!(wire::decode(&[]), Ok(None));
    assert_eq!(wire::decode(&[0, 0, 0]), Ok(None));
}

#[test]
fn frame_at_the_limit_round_trips_and_one_more_byte_is_refused() {
    // An Error payload is 4 + 2 + 1 + 8 bytes plus the message.
    let message = "m".repeat(MAX_FRAME_LEN - 15);
    let frame = Frame::Error { code: ErrorCode::Internal, about: None, message };
    let bytes = wire::encode_to_vec(&frame).unwrap();
    assert_eq!(bytes.len(), LEN_PREFIX + MAX_FRAME_LEN);
    assert_eq!(wire::decode(&bytes).unwrap(), Some((frame, bytes.len())));

    let frame =
        Frame::Error { code: ErrorCode::Internal, about: None, message: "m".repeat(10_000) };
    let mut out = vec![1, 2, 3];
    assert_eq!(
        wire::encode(&frame, &mut out),
        Err(WireError::FrameTooLarge { len: 10_015, max: 4096 })
    );
    assert_eq!(out, [1, 2, 3], "a failed encode leaves the buffer alone");
}

#[test]
fn relay_path_limit() {
    let path = |n: usize| Frame::Hello {
        version: 2,
        role: Role::Relay,
        relay_path: (0..n as u128).map(RelayId).collect(),
        token: Some("token".repeat(100)),
    };
    let full = path(MAX_RELAY_PATH);
    let bytes = wire::encode_to_vec(&full).unwrap();
    assert_eq!(wire::decode(&bytes).unwrap(), Some((full, bytes.len())));
    assert_eq!(
        wire::encode_to_vec(&path(MAX_RELAY_PATH + 1)),
        Err(WireError::PathTooLong { len: 65, max: 64 })
    );
    // Crafted by hand: 65 real entries, and a declared length far beyond the frame.
    assert_malformed(wire::decode_payload(&hello_payload(PROTOCOL_VERSION, 65, 65)));
    assert_malformed(wire::decode_payload(&hello_payload(PROTOCOL_VERSION, u64::MAX, 1)));
    assert_eq!(wire::decode_payload(&hello_payload(PROTOCOL_VERSION, 64, 64)).map(|_| ()), Ok(()));
}

#[test]
fn unknown_tags_are_malformed() {
    // Frame tag 10 does not exist.
    assert_malformed(wire::decode_payload(&[0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0]));
    assert_malformed(wire::decode_payload(&[0xff, 0xff, 0xff, 0xff]));
    // Role tag 2.
    let mut hello = hello_payload(PROTOCOL_VERSION, 0, 0);
    hello[9] = 2;
    assert_malformed(wire::decode_payload(&hello));
    // ReplayMode tag 4.
    let mut sub = subscribe_payload([0; 16], 0);
    let at = sub.len() - 5;
    sub[at] = 4;
    assert_malformed(wire::decode_payload(&sub));
    // Option tag 2 for the token.
    let mut hello = hello_payload(PROTOCOL_VERSION, 0, 0);
    *hello.last_mut().unwrap() = 2;
    assert_malformed(wire::decode_payload(&hello));
    // And through the stream decoder.
    assert!(matches!(wire::decode(&framed(&[0, 0, 0, 10])), Err(WireError::Malformed(_))));
}

#[test]
fn unknown_version() {
    // Same layout, other version: decodes, and check_version refuses it.
    let frame = wire::decode_payload(&hello_payload(2, 0, 0)).unwrap();
    assert_eq!(
        wire::check_version(&frame),
        Err(WireError::UnsupportedVersion { got: 2, supported: PROTOCOL_VERSION })
    );
    assert_eq!(wire::check_version(&golden_hello()), Ok(()));
    assert_eq!(wire::check_version(&Frame::Ack { seq: 1 }), Ok(()));
    // A future hello with a layout this version cannot read still yields the version.
    let mut future = vec![0, 0, 0, 0, 0, 4, 0xde, 0xad];
    assert_eq!(
        wire::decode_payload(&future),
        Err(WireError::UnsupportedVersion { got: 4, supported: 3 })
    );
    future.extend_from_slice(&[0; 64]);
    assert_eq!(
        wire::decode(&framed(&future)),
        Err(WireError::UnsupportedVersion { got: 4, supported: 3 })
    );
    // A hello of this version that does not decode is just malformed.
    assert_malformed(wire::decode_payload(&[0, 0, 0, 0, 0, 3, 0, 0, 0, 7]));
    assert_eq!(
        WireError::UnsupportedVersion { got: 4, supported: 3 }.error_code(),
        ErrorCode::UnsupportedVersion
    );
}

#[test]
fn chunk_over_the_limit_is_refused() {
    let at_limit = publish_payload([1; 16], 1024, &[0xab; MAX_CHUNK_DATA]);
    match wire::decode_payload(&at_limit).unwrap() {
        Frame::Publish { seq: 7, chunk } => {
            assert_eq!(chunk.data().as_ref(), &[0xab; MAX_CHUNK_DATA][..]);
            assert_eq!(chunk.name(), Name::from_bytes([1; 16]));
            assert_eq!(chunk.expiry(), u64::MAX);
        }
        other => panic!("{other:?}"),
    }
    // An oversized chunk in an otherwise intact Publish is its own, non-fatal error about the
    // publish's seq (7 here), up to the largest payload a frame holds.
    let too_large = WireError::ChunkTooLarge { seq: 7, len: 1025 };
    assert_eq!(wire::decode_payload(&publish_payload([1; 16], 1025, &[0xab; 1025])), Err(too_large.clone()));
    assert_eq!(wire::decode(&framed(&publish_payload([1; 16], 1025, &[0; 1025]))), Err(too_large.clone()));
    assert!(!too_large.is_fatal());
    assert_eq!((too_large.error_code(), too_large.about()), (ErrorCode::ChunkTooLarge, Some(7)));
    let max = MAX_FRAME_LEN - 44;
    assert_eq!(
        wire::decode_payload(&publish_payload([1; 16], max as u64, &vec![0; max])),
        Err(WireError::ChunkTooLarge { seq: 7, len: max as u64 })
    );
    // The same for a PublishUnacked (tag 9), which has the same layout.
    let mut unacked = publish_payload([1; 16], 1025, &[0xab; 1025]);
    unacked[3] = 9;
    assert_eq!(wire::decode_payload(&unacked), Err(too_large.clone()));
    unacked = publish_payload([1; 16], 3, b"abc");
    unacked[3] = 9;
    assert!(matches!(wire::decode_payload(&unacked), Ok(Frame::PublishUnacked { seq: 7, .. })));
    // Anywhere else an oversized chunk is malformed: in a Deliver, or with a declared length
    // that disagrees with the payload.
    let mut deliver = publish_payload([1; 16], 1025, &[0; 1025]);
    deliver[3] = 5;
    assert_malformed(wire::decode_payload(&deliver));
    assert!(wire::decode_payload(&publish_payload([1; 16], 1025, &[0; 1026])).unwrap_err().is_fatal());
    assert!(wire::decode_payload(&publish_payload([1; 16], 1025, &[0; 1024])).unwrap_err().is_fatal());
    // The decoder skips the refused frame and stays in sync.
    let mut stream = framed(&publish_payload([1; 16], 1025, &[0; 1025]));
    wire::encode(&Frame::Ack { seq: 8 }, &mut stream).unwrap();
    let mut decoder = FrameDecoder::new();
    decoder.extend(&stream);
    assert_eq!(decoder.next_frame(), Err(too_large));
    assert_eq!(decoder.next_frame(), Ok(Some(Frame::Ack { seq: 8 })));
    assert_eq!((decoder.next_frame(), decoder.buffered()), (Ok(None), 0));
    // A declared length beyond the frame limit fails before allocating.
    assert_malformed(wire::decode_payload(&publish_payload([1; 16], u64::MAX, &[0; 8])));
    // A declared length within the limit but beyond the payload is a truncation.
    assert_eq!(
        wire::decode_payload(&publish_payload([1; 16], 10, &[0; 4])),
        Err(WireError::Truncated { additional: 6 })
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let mut payload = GOLDEN_PUBLISH[LEN_PREFIX..].to_vec();
    payload.push(0);
    assert_eq!(wire::decode_payload(&payload), Err(WireError::TrailingBytes { extra: 1 }));
    assert_eq!(wire::decode(&framed(&payload)), Err(WireError::TrailingBytes { extra: 1 }));
    // Bytes after the frame but outside its length prefix are the next frame, not trailing.
    let mut two = GOLDEN_PUBLISH.to_vec();
    two.push(0);
    assert_eq!(wire::decode(&two).unwrap().unwrap().1, GOLDEN_PUBLISH.len());
}

#[test]
fn bad_filters_are_refused() {
    assert_malformed(wire::decode_payload(&subscribe_payload([0; 16], 129)));
    assert_malformed(wire::decode_payload(&subscribe_payload([0; 16], 255)));
    let mut noisy = [0u8; 16];
    noisy[0] = 0xab;
    noisy[1] = 0x01; // below an 8-bit length
    assert_malformed(wire::decode_payload(&subscribe_payload(noisy, 8)));
    assert!(wire::decode_payload(&subscribe_payload(noisy, 16)).is_ok());
    assert!(wire::decode_payload(&subscribe_payload([0xff; 16], 128)).is_ok());
}

#[test]
fn other_bad_payloads() {
    assert_eq!(wire::decode_payload(&[]), Err(WireError::Truncated { additional: 4 }));
    assert!(matches!(wire::decode(&framed(&[])), Err(WireError::Truncated { .. })));
    // Invalid UTF-8 in an error message.
    let bad_utf8 = [&[0, 0, 0, 7][..], &[0, 1], &[0], &2u64.to_be_bytes(), &[0xc3, 0x28]].concat();
    assert_malformed(wire::decode_payload(&bad_utf8));
    // A payload longer than the limit handed straight to decode_payload.
    assert!(matches!(
        wire::decode_payload(&[0; MAX_FRAME_LEN + 1]),
        Err(WireError::FrameTooLarge { len: 4097, .. })
    ));
}

#[test]
fn error_codes() {
    for code in 0..=u16::MAX {
        let parsed = ErrorCode::from(code);
        assert_eq!(u16::from(parsed), code);
        assert_eq!(matches!(parsed, ErrorCode::Other(_)), !(1..=14).contains(&code), "{code}");
    }
    assert_eq!(ErrorCode::Conflict.code(), 5);
    assert_eq!(ErrorCode::Internal.code(), 13);
    assert_eq!(ErrorCode::Conflict.to_string(), "conflicting chunk (5)");
    assert_eq!(ErrorCode::Other(99).to_string(), "unknown error code 99");
    assert_eq!(WireError::Truncated { additional: 1 }.error_code(), ErrorCode::Malformed);
}

#[test]
fn decoder_pops_frames_and_keeps_the_rest() {
    let mut stream = GOLDEN_HELLO.to_vec();
    stream.extend_from_slice(GOLDEN_PUBLISH);
    stream.extend_from_slice(&GOLDEN_PUBLISH[..10]);
    let mut decoder = FrameDecoder::new();
    decoder.extend(&stream);
    assert_eq!(decoder.next_frame().unwrap(), Some(golden_hello()));
    assert_eq!(decoder.next_frame().unwrap(), Some(golden_publish()));
    assert_eq!(decoder.next_frame().unwrap(), None);
    assert_eq!(decoder.buffered(), 10);
    decoder.extend(&GOLDEN_PUBLISH[10..]);
    assert_eq!(decoder.next_frame().unwrap(), Some(golden_publish()));
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn decoder_gives_a_bursts_buffer_back_once_drained() {
    // A burst of frames in one read grows the buffer well past what an idle link should keep.
    let mut stream = Vec::new();
    while stream.len() < 64 * 1024 {
        stream.extend_from_slice(GOLDEN_PUBLISH);
    }
    stream.extend_from_slice(&GOLDEN_PUBLISH[..10]);
    let mut decoder = FrameDecoder::new();
    decoder.extend(&stream);
    assert!(decoder.capacity() >= 64 * 1024);
    let mut frames = 0;
    while let Some(frame) = decoder.next_frame().unwrap() {
        assert_eq!(frame, golden_publish());
        frames += 1;
    }
    // A partial frame is still held, and so is the buffer holding it.
    assert_eq!(decoder.buffered(), 10);
    assert!(frames > 0);
    decoder.extend(&GOLDEN_PUBLISH[10..]);
    assert_eq!(decoder.next_frame().unwrap(), Some(golden_publish()));
    assert_eq!(decoder.next_frame().unwrap(), None);
    assert_eq!(decoder.buffered(), 0);
    assert!(decoder.capacity() <= 16 * 1024, "kept {} bytes", decoder.capacity());
}

#[test]
fn decoder_read_into_directly_reuses_its_buffer_read_after_read() {
    // A stream of publishes, arriving in reads that split frames, each read going straight
    // into the decoder's buffer (as `AsyncReadExt::read_buf` does).
    let mut stream = Vec::new();
    while stream.len() < 256 * 1024 {
        stream.extend_from_slice(GOLDEN_PUBLISH);
    }
    let mut decoder = FrameDecoder::new();
    let mut frames = 0;
    for read in stream.chunks(7_001) {
        let buf = decoder.buffer_for(16 * 1024);
        assert!(buf.capacity() - buf.len() >= FrameDecoder::MIN_ROOM);
        buf.extend_from_slice(read);
        while let Some(frame) = decoder.next_frame().unwrap() {
            assert_eq!(frame, golden_publish());
            frames += 1;
        }
        // Room is counted with what the buffer holds: it keeps its size instead of growing
        // by a read's size on every read.
        assert!(decoder.capacity() < 32 * 1024, "grew to {} bytes", decoder.capacity());
    }
    assert_eq!(frames, stream.len() / GOLDEN_PUBLISH.len());
    assert_eq!(decoder.buffered(), 0);
}
