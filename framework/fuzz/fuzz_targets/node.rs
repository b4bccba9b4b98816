//! Feeds the routing core arbitrary sequences of link events and frames on several links;
//! the node must never panic or exceed its bounds. The harness is `harness/node_ops.rs`,
//! shared with the stable regression test `framework/tests/fuzz_regressions.rs`.
//!
//! Run with `cargo +nightly fuzz run node` from `framework/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/node_ops.rs"]
mod node_ops;

fuzz_target!(|data: &[u8]| node_ops::run(data));
