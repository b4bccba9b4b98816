//! The native side: the [`PluginVTable`] the [`export!`](crate::export) macro returns, and
//! the host functions called through the [`HostApi`] table.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::OnceLock;

use crate::abi::{ABI_VERSION, EntrySink, HostApi, PluginVTable, RawChunk, RawFilter, Sink, Slice, status};
use crate::erased::{Erased, Factory};
use crate::{Chunk, Config, Filter, Level, Name};

static FACTORY: OnceLock<Factory> = OnceLock::new();

static VTABLE: PluginVTable = PluginVTable { abi_version: ABI_VERSION, init, on_chunks, on_timer, on_command, destroy };

/// The table for the plugin `factory` builds; one plugin type per library.
pub fn vtable(factory: Factory) -> *const PluginVTable {
    let _ = FACTORY.set(factory);
    &VTABLE
}

thread_local! {
    /// The host table of the instance whose callback is running on this thread.
    static HOST: Cell<*const HostApi> = const { Cell::new(ptr::null()) };
}

struct Instance {
    host: *const HostApi,
    plugin: Box<dyn Erased>,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the plugin panicked".to_owned())
}

/// Runs `f` with `host` as the current host table, catching panics.
fn with_host<R>(host: *const HostApi, f: impl FnOnce() -> R) -> Result<R, String> {
    let previous = HOST.with(|h| h.replace(host));
    let result = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()));
    HOST.with(|h| h.set(previous));
    result
}

fn host() -> &'static HostApi {
    let host = HOST.with(Cell::get);
    assert!(!host.is_null(), "a Canopy host function was called outside a plugin callback");
    // SAFETY: `with_host` set this pointer from the table the host passed to `init`, which
    // the host keeps alive until `destroy`; it is cleared again when the callback returns.
    unsafe { &*host }
}

unsafe extern "C" fn init(host: *const HostApi, config: Slice, err: Sink) -> *mut c_void {
    // SAFETY: the host passes a config slice valid for this call.
    let config = String::from_utf8_lossy(unsafe { config.as_bytes() }).into_owned();
    let Some(factory) = FACTORY.get() else {
        // SAFETY: `err` is the sink the host passed for this call.
        unsafe { err.put(b"the plugin library exported no plugin") };
        return ptr::null_mut();
    };
    match with_host(host, || Config::parse(&config).and_then(factory)) {
        Ok(Ok(plugin)) => Box::into_raw(Box::new(Instance { host, plugin })).cast(),
        Ok(Err(reason)) | Err(reason) => {
            // SAFETY: as above.
            unsafe { err.put(reason.as_bytes()) };
            ptr::null_mut()
        }
    }
}

/// # Safety
/// `instance` must come from `init` and not be destroyed.
unsafe fn instance<'a>(instance: *mut c_void) -> &'a mut Instance {
    // SAFETY: forwarded from the caller.
    unsafe { &mut *instance.cast::<Instance>() }
}

fn report(result: Result<(), String>, err: &Sink) -> i32 {
    match result {
        Ok(()) => status::OK,
        Err(message) => {
            // SAFETY: `err` is the sink the host passed for this call.
            unsafe { err.put(message.as_bytes()) };
            status::PANIC
        }
    }
}

unsafe extern "C" fn on_chunks(inst: *mut c_void, chunks: *const RawChunk, len: usize, err: Sink) -> i32 {
    // SAFETY: the host passes an instance from `init` and `len` chunks valid for this call.
    let (inst, raw) = unsafe { (instance(inst), std::slice::from_raw_parts(chunks, len)) };
    let chunks = raw
        .iter()
        .map(|c| Chunk {
            name: Name::from_parts(c.name_hi, c.name_lo),
            expiry_ms: c.expiry_ms,
            // SAFETY: each chunk's data is valid for this call.
            data: unsafe { c.data.as_bytes() }.to_vec(),
        })
        .collect();
    report(with_host(inst.host, || inst.plugin.on_chunks(chunks)), &err)
}

unsafe extern "C" fn on_timer(inst: *mut c_void, id: u64, err: Sink) -> i32 {
    // SAFETY: the host passes an instance from `init`.
    let inst = unsafe { instance(inst) };
    report(with_host(inst.host, || inst.plugin.on_timer(id)), &err)
}

unsafe extern "C" fn on_command(inst: *mut c_void, args: *const Slice, len: usize, out: Sink) -> i32 {
    // SAFETY: the host passes an instance from `init` and `len` argument slices valid for
    // this call.
    let (inst, raw) = unsafe { (instance(inst), std::slice::from_raw_parts(args, len)) };
    // SAFETY: as above.
    let args = raw.iter().map(|a| String::from_utf8_lossy(unsafe { a.as_bytes() }).into_owned()).collect();
    let (code, text) = match with_host(inst.host, || inst.plugin.on_command(args)) {
        Ok(Ok(text)) => (status::OK, text),
        Ok(Err(text)) => (status::ERR, text),
        Err(panic) => (status::PANIC, panic),
    };
    // SAFETY: `out` is the sink the host passed for this call.
    unsafe { out.put(text.as_bytes()) };
    code
}

unsafe extern "C" fn destroy(inst: *mut c_void) {
    // SAFETY: the host passes an instance from `init` exactly once to `destroy`.
    let inst = unsafe { Box::from_raw(inst.cast::<Instance>()) };
    let host = inst.host;
    // Dropping the plugin runs its code, which may call the host.
    let _ = with_host(host, move || drop(inst));
}

fn raw_filter(filter: Filter) -> RawFilter {
    RawFilter { name_hi: filter.name().hi(), name_lo: filter.name().lo(), len: filter.len() }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

// SAFETY (for every call below): `host()` is the live table of the running instance; the
// slices and sinks passed point to locals that outlive the call.

pub(crate) fn publish(chunk: &Chunk) -> Result<(), String> {
    let h = host();
    let raw = RawChunk {
        name_hi: chunk.name.hi(),
        name_lo: chunk.name.lo(),
        expiry_ms: chunk.expiry_ms,
        data: Slice::new(&chunk.data),
    };
    let mut err = Vec::new();
    if unsafe { (h.publish)(h.ctx, &raw, Sink::vec(&mut err)) } { Ok(()) } else { Err(text(err)) }
}

pub(crate) fn subscribe(filter: Filter) -> Result<(), String> {
    let h = host();
    let mut err = Vec::new();
    if unsafe { (h.subscribe)(h.ctx, raw_filter(filter), Sink::vec(&mut err)) } { Ok(()) } else { Err(text(err)) }
}

pub(crate) fn unsubscribe(filter: Filter) {
    let h = host();
    unsafe { (h.unsubscribe)(h.ctx, raw_filter(filter)) }
}

pub(crate) fn kv_get(key: &[u8]) -> Option<Vec<u8>> {
    let h = host();
    let mut out = Vec::new();
    unsafe { (h.kv_get)(h.ctx, Slice::new(key), Sink::vec(&mut out)) }.then_some(out)
}

pub(crate) fn kv_put(key: &[u8], value: &[u8]) -> Result<(), String> {
    let h = host();
    let mut err = Vec::new();
    if unsafe { (h.kv_put)(h.ctx, Slice::new(key), Slice::new(value), Sink::vec(&mut err)) } {
        Ok(())
    } else {
        Err(text(err))
    }
}

pub(crate) fn kv_delete(key: &[u8]) {
    let h = host();
    unsafe { (h.kv_delete)(h.ctx, Slice::new(key)) }
}

pub(crate) fn kv_scan_prefix(prefix: &[u8], after: Option<&[u8]>, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let h = host();
    let mut out = Vec::new();
    let after = after.map(Slice::new);
    let after_ptr = after.as_ref().map_or(ptr::null(), |s| s as *const Slice);
    unsafe { (h.kv_scan_prefix)(h.ctx, Slice::new(prefix), after_ptr, limit, EntrySink::vec(&mut out)) };
    out
}

pub(crate) fn x25519(scalar: &[u8; 32], point: Option<&[u8; 32]>) -> [u8; 32] {
    // Native code already runs at native speed: no host call (and no ABI change) needed.
    let secret = x25519_dalek::StaticSecret::from(*scalar);
    match point {
        Some(p) => *secret.diffie_hellman(&x25519_dalek::PublicKey::from(*p)).as_bytes(),
        None => *x25519_dalek::PublicKey::from(&secret).as_bytes(),
    }
}

pub(crate) fn now_ms() -> u64 {
    let h = host();
    unsafe { (h.now_ms)(h.ctx) }
}

pub(crate) fn set_timer(id: u64, after_ms: u64) {
    let h = host();
    unsafe { (h.set_timer)(h.ctx, id, after_ms) }
}

pub(crate) fn log(level: Level, message: &str) {
    let h = host();
    unsafe { (h.log)(h.ctx, level as u8, Slice::new(message.as_bytes())) }
}
