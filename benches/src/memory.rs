//! Resident memory of the current process, read from `/proc/self/statm`.
//!
//! Growth of the resident set while building a structure in a fresh process counts every byte
//! the structure really costs, allocator overhead and fragmentation included, without
//! instrumenting the allocator.

/// Resident set size in bytes, or `None` where `/proc` is unavailable.
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
