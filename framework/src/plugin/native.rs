//! The native host: `cdylib` plugins speaking the C ABI of [`canopy_plugin::abi`].
//!
//! Native plugins are the operator's trusted code: they run in the relay's address space at
//! full speed, with no memory limit and no way to interrupt them (a watchdog can only give up
//! on one that overruns its deadline; see [`CallWatch`](super::CallWatch)). Panics are caught on the
//! plugin's side of the boundary and count as failures, like a Wasm trap.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::Path;
use std::sync::Arc;

use canopy_plugin::abi::{
    ABI_VERSION, ENTRY_SYMBOL, Entry, EntrySink, HostApi, PluginVTable, RawChunk, RawFilter, Sink, Slice, status,
};
use libloading::Library;

use super::core::HostCore;
use super::{Fault, FaultKind, Instance, Limits, PluginError, Template};
use crate::{Chunk, Name};

/// A native plugin library whose ABI version matched. Libraries are never unloaded: code of
/// a plugin may still be referenced (thread-locals, destructors) after its last instance.
pub struct NativeTemplate {
    path: String,
    vtable: &'static PluginVTable,
    limits: Limits,
}

impl NativeTemplate {
    /// Loads the library at `path`, calls its entry point and checks the ABI version.
    pub fn load(path: &Path, limits: Limits) -> Result<Arc<Self>, PluginError> {
        let shown = path.display().to_string();
        let fail = |message: String| PluginError::Load { what: shown.clone(), message };
        // SAFETY: loading a library runs its initialisers; native plugins are code the relay
        // operator chose to trust, which is the premise of this kind of plugin.
        let library = unsafe { Library::new(path) }.map_err(|e| fail(e.to_string()))?;
        let library: &'static Library = Box::leak(Box::new(library));
        // SAFETY: the symbol is declared by canopy-plugin's `export!` with exactly this type.
        let entry = unsafe { library.get::<Entry>(ENTRY_SYMBOL.as_bytes()) }
            .map_err(|e| fail(format!("no {ENTRY_SYMBOL} entry point: {e}")))?;
        // SAFETY: the entry point takes no arguments and returns a pointer to a static table.
        let table = unsafe { entry() };
        if table.is_null() {
            return Err(fail(format!("{ENTRY_SYMBOL} returned no table")));
        }
        // SAFETY: `abi_version` is the first field of the table in every ABI version, so it
        // can be read before we know the rest of the layout.
        let found = unsafe { table.cast::<u32>().read() };
        if found != ABI_VERSION {
            return Err(PluginError::AbiMismatch { path: shown, found, expected: ABI_VERSION });
        }
        // SAFETY: the version matches, so the table has this layout; it is static in a
        // library that is never unloaded.
        let vtable: &'static PluginVTable = unsafe { &*table };
        Ok(Arc::new(NativeTemplate { path: shown, vtable, limits }))
    }
}

impl Template for NativeTemplate {
    fn describe(&self) -> String {
        format!("native {}", self.path)
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn interruptible(&self) -> bool {
        false
    }

    fn instantiate(&self, core: HostCore) -> Result<Box<dyn Instance>, PluginError> {
        let mut core = Box::new(core);
        let api = Box::new(host_api((&mut *core as *mut HostCore).cast()));
        Ok(Box::new(NativeInstance { vtable: self.vtable, instance: std::ptr::null_mut(), api, core: Some(core) }))
    }
}

struct NativeInstance {
    vtable: &'static PluginVTable,
    /// The plugin's instance; null before `init` succeeds and after `destroy`.
    instance: *mut c_void,
    /// The table handed to the plugin; `api.ctx` points into `core`. Both are boxed so their
    /// addresses stay put while the plugin holds them. `core` is taken only by `into_core`,
    /// after the plugin's instance is destroyed.
    api: Box<HostApi>,
    core: Option<Box<HostCore>>,
}

// SAFETY: the supervisor calls an instance from one thread at a time; the plugin's side
// holds no thread-affine state of ours (only the table and `core`, both owned here).
unsafe impl Send for NativeInstance {}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

fn panicked(message: Vec<u8>) -> Fault {
    Fault { kind: FaultKind::Trap, message: format!("native plugin panicked: {}", text(message)) }
}

fn not_initialised() -> Fault {
    Fault { kind: FaultKind::Trap, message: "native plugin called before init".into() }
}

impl NativeInstance {
    fn destroy(&mut self) {
        if !self.instance.is_null() {
            // SAFETY: `instance` came from this table's `init` and is destroyed once.
            unsafe { (self.vtable.destroy)(self.instance) };
            self.instance = std::ptr::null_mut();
        }
    }
}

impl Drop for NativeInstance {
    fn drop(&mut self) {
        self.destroy();
    }
}

// SAFETY (for the calls into the plugin below): `instance` came from `init` and is live; the
// slices and sinks point to locals that outlive the call; `api` outlives the instance.
impl Instance for NativeInstance {
    fn init(&mut self, config: &str) -> Result<Result<(), String>, Fault> {
        let mut err = Vec::new();
        let instance = unsafe { (self.vtable.init)(&*self.api, Slice::new(config.as_bytes()), Sink::vec(&mut err)) };
        if instance.is_null() {
            return Ok(Err(text(err)));
        }
        self.instance = instance;
        Ok(Ok(()))
    }

    fn on_chunks(&mut self, chunks: &[Chunk]) -> Result<(), Fault> {
        if self.instance.is_null() {
            return Err(not_initialised());
        }
        let raw: Vec<RawChunk> = chunks
            .iter()
            .map(|c| {
                let n = c.name().to_u128();
                RawChunk {
                    name_hi: (n >> 64) as u64,
                    name_lo: n as u64,
                    expiry_ms: c.expiry(),
                    data: Slice::new(c.data()),
                }
            })
            .collect();
        let mut err = Vec::new();
        match unsafe { (self.vtable.on_chunks)(self.instance, raw.as_ptr(), raw.len(), Sink::vec(&mut err)) } {
            status::OK => Ok(()),
            _ => Err(panicked(err)),
        }
    }

    fn on_timer(&mut self, id: u64) -> Result<(), Fault> {
        if self.instance.is_null() {
            return Err(not_initialised());
        }
        let mut err = Vec::new();
        match unsafe { (self.vtable.on_timer)(self.instance, id, Sink::vec(&mut err)) } {
            status::OK => Ok(()),
            _ => Err(panicked(err)),
        }
    }

    fn on_command(&mut self, args: &[String]) -> Result<Result<String, String>, Fault> {
        if self.instance.is_null() {
            return Err(not_initialised());
        }
        let raw: Vec<Slice> = args.iter().map(|a| Slice::new(a.as_bytes())).collect();
        let mut out = Vec::new();
        match unsafe { (self.vtable.on_command)(self.instance, raw.as_ptr(), raw.len(), Sink::vec(&mut out)) } {
            status::OK => Ok(Ok(text(out))),
            status::ERR => Ok(Err(text(out))),
            _ => Err(panicked(out)),
        }
    }

    fn core(&mut self) -> &mut HostCore {
        self.core.as_mut().expect("the core is only taken by into_core")
    }

    fn into_core(mut self: Box<Self>) -> HostCore {
        self.destroy();
        *self.core.take().expect("the core is only taken by into_core")
    }
}

// The host functions the plugin calls. `ctx` is the `HostCore` of the calling instance,
// passed back exactly as `host_api` stored it; the plugin calls them only from inside a
// callback of that instance, while no other reference to the core is in use.

fn host_api(ctx: *mut c_void) -> HostApi {
    HostApi {
        ctx,
        publish: host_publish,
        subscribe: host_subscribe,
        unsubscribe: host_unsubscribe,
        kv_get: host_kv_get,
        kv_put: host_kv_put,
        kv_delete: host_kv_delete,
        kv_scan_prefix: host_kv_scan_prefix,
        now_ms: host_now_ms,
        set_timer: host_set_timer,
        log: host_log,
    }
}

/// # Safety
/// `ctx` must be the pointer `host_api` was built with, during a callback.
unsafe fn core<'a>(ctx: *mut c_void) -> &'a mut HostCore {
    // SAFETY: forwarded from the caller.
    unsafe { &mut *ctx.cast::<HostCore>() }
}

fn raw_name(hi: u64, lo: u64) -> Name {
    Name::new((u128::from(hi) << 64) | u128::from(lo))
}

unsafe extern "C" fn host_publish(ctx: *mut c_void, chunk: *const RawChunk, err: Sink) -> bool {
    // SAFETY: see `core`; the plugin passes a chunk valid for this call.
    let (core, chunk) = unsafe { (core(ctx), &*chunk) };
    // SAFETY: the chunk's data is valid for this call.
    let data = unsafe { chunk.data.as_bytes() }.to_vec();
    match core.publish(raw_name(chunk.name_hi, chunk.name_lo), chunk.expiry_ms, data) {
        Ok(()) => true,
        Err(message) => {
            // SAFETY: `err` is the plugin's sink for this call.
            unsafe { err.put(message.as_bytes()) };
            false
        }
    }
}

unsafe extern "C" fn host_subscribe(ctx: *mut c_void, filter: RawFilter, err: Sink) -> bool {
    // SAFETY: see `core`.
    let core = unsafe { core(ctx) };
    match core.subscribe(raw_name(filter.name_hi, filter.name_lo), filter.len) {
        Ok(()) => true,
        Err(message) => {
            // SAFETY: `err` is the plugin's sink for this call.
            unsafe { err.put(message.as_bytes()) };
            false
        }
    }
}

unsafe extern "C" fn host_unsubscribe(ctx: *mut c_void, filter: RawFilter) {
    // SAFETY: see `core`.
    unsafe { core(ctx) }.unsubscribe(raw_name(filter.name_hi, filter.name_lo), filter.len)
}

unsafe extern "C" fn host_kv_get(ctx: *mut c_void, key: Slice, out: Sink) -> bool {
    // SAFETY: see `core`; the key is valid for this call.
    let value = unsafe { core(ctx).kv_get(key.as_bytes()) };
    match value {
        Some(value) => {
            // SAFETY: `out` is the plugin's sink for this call.
            unsafe { out.put(&value) };
            true
        }
        None => false,
    }
}

unsafe extern "C" fn host_kv_put(ctx: *mut c_void, key: Slice, value: Slice, err: Sink) -> bool {
    // SAFETY: see `core`; key and value are valid for this call.
    match unsafe { core(ctx).kv_put(key.as_bytes(), value.as_bytes()) } {
        Ok(()) => true,
        Err(message) => {
            // SAFETY: `err` is the plugin's sink for this call.
            unsafe { err.put(message.as_bytes()) };
            false
        }
    }
}

unsafe extern "C" fn host_kv_delete(ctx: *mut c_void, key: Slice) {
    // SAFETY: see `core`; the key is valid for this call.
    unsafe { core(ctx).kv_delete(key.as_bytes()) }
}

unsafe extern "C" fn host_kv_scan_prefix(
    ctx: *mut c_void,
    prefix: Slice,
    after: *const Slice,
    limit: u32,
    out: EntrySink,
) {
    // SAFETY: see `core`; prefix and `after` (when not null) are valid for this call.
    let entries = unsafe {
        let after = if after.is_null() { None } else { Some((*after).as_bytes()) };
        core(ctx).kv_scan(prefix.as_bytes(), after, limit)
    };
    for (key, value) in &entries {
        // SAFETY: `out` is the plugin's sink for this call; the slices outlive the call.
        unsafe { (out.entry)(out.ctx, Slice::new(key), Slice::new(value)) };
    }
}

unsafe extern "C" fn host_now_ms(ctx: *mut c_void) -> u64 {
    // SAFETY: see `core`.
    unsafe { core(ctx) }.now_ms()
}

unsafe extern "C" fn host_set_timer(ctx: *mut c_void, id: u64, after_ms: u64) {
    // SAFETY: see `core`.
    unsafe { core(ctx) }.set_timer(id, after_ms)
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u8, message: Slice) {
    // SAFETY: see `core`; the message is valid for this call.
    let (core, message) = unsafe { (core(ctx), message.as_bytes()) };
    core.log(level, &String::from_utf8_lossy(message))
}
