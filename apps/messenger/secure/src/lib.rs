//! # The messenger's Secure process
//!
//! Secure is the only process of a device that holds keys and sees plaintext. It keeps the
//! device's MLS state and history sealed at rest ([`store`], over
//! [`canopy_msg_core::seal`]), answers the UI over `HOME/secure.sock` ([`proto`]), and talks
//! to Network, which only ever sees ciphertext, over `HOME/network.sock`. It installs a
//! seccomp filter ([`sandbox`]) so it can open no socket but Unix ones.
//!
//! The logic is in [`service`], free of sockets, so it is tested directly.

pub mod btc;
pub mod proto;
pub mod sandbox;
pub mod service;
pub mod store;
mod run;

pub use run::{Options, RunError, run};
