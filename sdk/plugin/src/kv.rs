//! The plugin's persistent key/value store.
//!
//! Keys (at most 1024 bytes) and values (at most 64 KiB) are bytes; writes are durable once
//! the callback that made them returns, and survive the plugin being re-created after a
//! failure. Each plugin has its own namespace.

use crate::sys;

/// The value of `key`, if any.
pub fn get(key: &[u8]) -> Option<Vec<u8>> {
    sys::kv_get(key)
}

/// Writes `key`.
pub fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
    sys::kv_put(key, value)
}

/// Deletes `key`.
pub fn delete(key: &[u8]) {
    sys::kv_delete(key)
}

/// Up to `limit` entries whose key starts with `prefix`, in key order, after `after`.
pub fn scan_prefix(prefix: &[u8], after: Option<&[u8]>, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    sys::kv_scan_prefix(prefix, after, limit)
}

/// Every entry under `prefix`, fetched a page at a time.
pub fn scan_all(prefix: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    let mut page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)> = Vec::new().into_iter();
    let mut last: Option<Vec<u8>> = None;
    let mut done = false;
    std::iter::from_fn(move || {
        loop {
            if let Some(entry) = page.next() {
                last = Some(entry.0.clone());
                return Some(entry);
            }
            if done {
                return None;
            }
            let next = scan_prefix(prefix, last.as_deref(), 256);
            done = next.len() < 256;
            if next.is_empty() {
                return None;
            }
            page = next.into_iter();
        }
    })
}

/// A `u64` stored big-endian under `key` (0 when absent).
pub fn get_u64(key: &[u8]) -> u64 {
    get(key).and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_be_bytes)
}

/// Stores a `u64` big-endian under `key`.
pub fn put_u64(key: &[u8], value: u64) -> Result<(), String> {
    put(key, &value.to_be_bytes())
}
