//! Replays every input kept under `framework/fuzz/regressions/<target>/` through the same
//! harness code as the cargo-fuzz target of that name, so that CI checks every crash the
//! fuzzers ever found without a nightly toolchain.
//!
//! Files named `seed-*` are ordinary inputs kept so that each directory exists and the
//! harness is exercised; every other file is a minimised crash, fixed.
//!
//! A new crash: minimise it (`cargo +nightly fuzz tmin <target> <crash file>` in
//! `framework/fuzz`), fix it, and copy the minimised input into the target's directory.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

#[path = "../fuzz/harness/node_ops.rs"]
mod node_ops;

/// Runs `harness` on every file in `framework/fuzz/regressions/<target>/` and fails naming
/// every input that panics. Returns how many inputs ran.
fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = fs::read(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
            panic::catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: these regression inputs fail again: {failed:#?}");
    files.len()
}

#[test]
fn node_regressions_pass() {
    assert!(replay("node", node_ops::run) > 0, "no inputs found");
}

#[test]
fn store_records_regressions_pass() {
    assert!(replay("store_records", canopy::store::check_record_decoding) > 0, "no inputs found");
}

/// The harnesses themselves run on stable: a few fixed inputs, empty ones included, pass.
#[test]
fn harnesses_accept_plain_inputs() {
    for data in [&[][..], &[0; 64], &[0xff; 300], &(0..=255).collect::<Vec<u8>>()] {
        node_ops::run(data);
        canopy::store::check_record_decoding(data);
    }
}
