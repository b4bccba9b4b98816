//! Runnable examples of the Canopy core; this crate holds no library code.
//!
//! Run the tour with `cargo run -p canopy-examples --example tour`; `publisher` and
//! `subscriber` use the client SDK against a running relay (address and CA PEM as arguments).
