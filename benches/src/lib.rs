//! Workloads and baselines for Canopy's benchmarks.
//!
//! The benches in this crate measure Canopy against other structures **in the same run**, on
//! the same generated data. This library holds what they share: the subscription workloads
//! ([`workload`]), the baseline matchers ([`baseline`]) and a resident-memory probe
//! ([`memory`]) used to report bytes per subscription for every structure alike.

pub mod baseline;
pub mod cli;
pub mod memory;
pub mod workload;
