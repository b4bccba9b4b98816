//! Runnable examples of the Canopy core; this crate holds no library code.
//!
//! Run the tour with `cargo run -p canopy-examples --example tour`.
