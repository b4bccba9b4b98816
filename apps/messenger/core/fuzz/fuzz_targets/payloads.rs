//! Feeds arbitrary bytes to every messenger decoder of untrusted bytes (message payloads,
//! team and conversation records, fragments, device bindings, key package requests, users'
//! space names): nothing may panic, and what decodes re-encodes to itself.
//!
//! Run with `cargo +nightly fuzz run payloads` from `apps/messenger/core/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    canopy_msg_core::fuzz::untrusted(data);
});
