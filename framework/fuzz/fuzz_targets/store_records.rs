//! Feeds the fjall store's record decoders (chunk, expiry and outbox records) corrupt bytes:
//! nothing may panic, a record that decodes is canonical, and one that does not is reported
//! as `Corrupt`. The checks are `canopy::store::check_record_decoding`, shared with the
//! stable regression test `framework/tests/fuzz_regressions.rs`.
//!
//! Run with `cargo +nightly fuzz run store_records` from `framework/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| canopy::store::check_record_decoding(data));
