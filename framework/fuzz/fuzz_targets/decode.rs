//! Feeds arbitrary bytes to the wire decoders. Nothing may panic, and every frame that
//! decodes must re-encode to exactly the bytes it was decoded from (decoding is canonical);
//! after a non-fatal error (an oversized chunk) the stream stays in sync.
//!
//! Run with `cargo +nightly fuzz run decode` from `framework/`.

#![no_main]

use canopy::wire::{self, FrameDecoder, LEN_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One frame at the start of a stream.
    if let Ok(Some((frame, used))) = wire::decode(data) {
        let again = wire::encode_to_vec(&frame).expect("a decoded frame re-encodes");
        assert_eq!(again, &data[..used]);
    }

    // The whole input as one payload.
    if let Ok(frame) = wire::decode_payload(data) {
        let again = wire::encode_to_vec(&frame).expect("a decoded frame re-encodes");
        assert_eq!(&again[LEN_PREFIX..], data);
    }

    // The input as a stream arriving in pieces (piece size taken from the first byte): frames
    // come out in order and each re-encodes to its own bytes.
    let step = data.first().map_or(1, |b| usize::from(*b) + 1);
    let mut decoder = FrameDecoder::new();
    let mut consumed = 0;
    let mut fed = 0;
    for piece in data.chunks(step) {
        decoder.extend(piece);
        fed += piece.len();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let again = wire::encode_to_vec(&frame).expect("a decoded frame re-encodes");
                    assert_eq!(again, &data[consumed..consumed + again.len()]);
                    consumed += again.len();
                }
                Ok(None) => break,
                // An oversized chunk in an intact Publish: skipped, the stream goes on.
                Err(err) if !err.is_fatal() => consumed = fed - decoder.buffered(),
                Err(_) => return,
            }
        }
    }
    assert_eq!(consumed + decoder.buffered(), data.len());
});
