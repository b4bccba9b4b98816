//! The native plugin ABI: one C entry point returning a versioned table of callbacks.
//!
//! A native plugin is a `cdylib` exporting [`ENTRY_SYMBOL`] (the [`export!`](crate::export)
//! macro writes it). The host calls it once, reads [`PluginVTable::abi_version`] — the first
//! field in every version of this ABI, so a host can read it from a table of any version — and
//! refuses the library unless it equals its own [`ABI_VERSION`]. The callbacks mirror the
//! `canopy:plugin` WIT world; the host's imports arrive as a [`HostApi`] table.
//!
//! Memory never changes hands: the caller owns every buffer it passes, and results come back
//! through a [`Sink`] the caller provides, which the callee writes into before returning.
//! Callbacks never unwind across the boundary: the guest side catches panics and reports them
//! as a failed call, which the host treats like a trap.
#![allow(unsafe_code)]

use std::ffi::c_void;

/// The ABI version this crate speaks. Bumped on any change to the tables below.
pub const ABI_VERSION: u32 = 1;

/// The symbol a native plugin exports: `extern "C" fn() -> *const PluginVTable`.
pub const ENTRY_SYMBOL: &str = "canopy_plugin_entry";

/// The entry point's type.
pub type Entry = unsafe extern "C" fn() -> *const PluginVTable;

/// A borrowed byte slice.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slice {
    /// First byte (dangling but non-null when `len` is 0).
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl Slice {
    /// Borrows `bytes` for the duration of a call.
    pub fn new(bytes: &[u8]) -> Self {
        Slice { ptr: bytes.as_ptr(), len: bytes.len() }
    }

    /// The bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`.
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        // SAFETY: the caller guarantees the pointer and length; `Slice::new` never makes a
        // null pointer, even for an empty slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A chunk, borrowed for the duration of a call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawChunk {
    /// High 64 bits of the name.
    pub name_hi: u64,
    /// Low 64 bits of the name.
    pub name_lo: u64,
    /// Expiry, unix milliseconds.
    pub expiry_ms: u64,
    /// The payload (at most 1024 bytes).
    pub data: Slice,
}

/// A filter.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawFilter {
    /// High 64 bits of the base name.
    pub name_hi: u64,
    /// Low 64 bits of the base name.
    pub name_lo: u64,
    /// Prefix length, 0..=128.
    pub len: u8,
}

/// Where a callee writes a byte string result: it calls `write` any number of times, each
/// appending.
#[repr(C)]
pub struct Sink {
    /// The caller's buffer.
    pub ctx: *mut c_void,
    /// Appends `len` bytes at `ptr` to the buffer.
    pub write: unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize),
}

unsafe extern "C" fn write_vec(ctx: *mut c_void, ptr: *const u8, len: usize) {
    // SAFETY: `Sink::vec` made `ctx` from a `&mut Vec<u8>` that outlives the call, and the
    // callee passes `len` readable bytes at `ptr`.
    unsafe {
        let vec = &mut *ctx.cast::<Vec<u8>>();
        vec.extend_from_slice(std::slice::from_raw_parts(ptr, len));
    }
}

impl Sink {
    /// A sink appending to `buf`; valid while `buf` is borrowed.
    pub fn vec(buf: &mut Vec<u8>) -> Self {
        Sink { ctx: (buf as *mut Vec<u8>).cast(), write: write_vec }
    }

    /// Writes `bytes` into the sink.
    ///
    /// # Safety
    /// The sink must be one the caller passed for this call.
    pub unsafe fn put(&self, bytes: &[u8]) {
        // SAFETY: forwarded from the caller.
        unsafe { (self.write)(self.ctx, bytes.as_ptr(), bytes.len()) }
    }
}

/// Where a scan writes its entries: `entry` is called once per key/value pair, in order.
#[repr(C)]
pub struct EntrySink {
    /// The caller's buffer.
    pub ctx: *mut c_void,
    /// Appends one entry.
    pub entry: unsafe extern "C" fn(ctx: *mut c_void, key: Slice, value: Slice),
}

unsafe extern "C" fn push_entry(ctx: *mut c_void, key: Slice, value: Slice) {
    // SAFETY: `EntrySink::vec` made `ctx` from a live `&mut Vec`; the callee passes valid slices.
    unsafe {
        let vec = &mut *ctx.cast::<Vec<(Vec<u8>, Vec<u8>)>>();
        vec.push((key.as_bytes().to_vec(), value.as_bytes().to_vec()));
    }
}

impl EntrySink {
    /// A sink collecting entries into `buf`.
    pub fn vec(buf: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        EntrySink { ctx: (buf as *mut Vec<(Vec<u8>, Vec<u8>)>).cast(), entry: push_entry }
    }
}

/// The host's imports, as the host hands them to a native plugin instance. Every function
/// takes `ctx` first; the table and `ctx` stay valid until the instance is destroyed.
#[repr(C)]
pub struct HostApi {
    /// The host's per-instance state.
    pub ctx: *mut c_void,
    /// `publish`: returns false and writes the reason to `err` on failure.
    pub publish: unsafe extern "C" fn(ctx: *mut c_void, chunk: *const RawChunk, err: Sink) -> bool,
    /// `subscribe`: returns false and writes the reason to `err` on failure.
    pub subscribe: unsafe extern "C" fn(ctx: *mut c_void, filter: RawFilter, err: Sink) -> bool,
    /// `unsubscribe`.
    pub unsubscribe: unsafe extern "C" fn(ctx: *mut c_void, filter: RawFilter),
    /// `kv-get`: returns whether the key exists, writing its value to `out`.
    pub kv_get: unsafe extern "C" fn(ctx: *mut c_void, key: Slice, out: Sink) -> bool,
    /// `kv-put`: returns false and writes the reason to `err` on failure.
    pub kv_put: unsafe extern "C" fn(ctx: *mut c_void, key: Slice, value: Slice, err: Sink) -> bool,
    /// `kv-delete`.
    pub kv_delete: unsafe extern "C" fn(ctx: *mut c_void, key: Slice),
    /// `kv-scan-prefix`; `after` is null for the first page.
    pub kv_scan_prefix:
        unsafe extern "C" fn(ctx: *mut c_void, prefix: Slice, after: *const Slice, limit: u32, out: EntrySink),
    /// `now-ms`.
    pub now_ms: unsafe extern "C" fn(ctx: *mut c_void) -> u64,
    /// `set-timer`.
    pub set_timer: unsafe extern "C" fn(ctx: *mut c_void, id: u64, after_ms: u64),
    /// `log`, with the [`Level`](crate::Level) as a number 0 (trace) to 4 (error).
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u8, message: Slice),
}

/// What a callback reports.
pub mod status {
    /// The call succeeded (for `on_command`: the output is the `Ok` string).
    pub const OK: i32 = 0;
    /// `on_command` returned `Err`; the output is the error string.
    pub const ERR: i32 = 1;
    /// The plugin panicked; the output, if any, is the panic message.
    pub const PANIC: i32 = 2;
}

/// A native plugin's callbacks. `abi_version` comes first in every version of this table.
#[repr(C)]
pub struct PluginVTable {
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: u32,
    /// Creates an instance: calls the plugin's `init` with the JSON config. Returns the
    /// instance, or null with the reason written to `err` (status in `status`).
    pub init: unsafe extern "C" fn(host: *const HostApi, config: Slice, err: Sink) -> *mut c_void,
    /// Delivers chunks; returns a [`status`].
    pub on_chunks: unsafe extern "C" fn(instance: *mut c_void, chunks: *const RawChunk, len: usize, err: Sink) -> i32,
    /// Fires a timer; returns a [`status`].
    pub on_timer: unsafe extern "C" fn(instance: *mut c_void, id: u64, err: Sink) -> i32,
    /// Runs a command; returns a [`status`] with the output in `out`.
    pub on_command: unsafe extern "C" fn(instance: *mut c_void, args: *const Slice, len: usize, out: Sink) -> i32,
    /// Destroys an instance.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}
