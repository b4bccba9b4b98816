//! The Wasm side: bindings of the `canopy:plugin` world and the glue the [`export!`] macro
//! expands to.
//!
//! [`export!`]: crate::export

use std::cell::RefCell;

use crate::erased::{Erased, Factory};
use crate::{Config, Filter, Level, Name};

wit_bindgen::generate!({
    path: "../../framework/wit",
    world: "plugin",
    pub_export_macro: true,
    export_macro_name: "export_plugin",
    default_bindings_module: "canopy_plugin::wasm",
});

use canopy::plugin::host;
pub use canopy::plugin::types::Chunk as RawChunk;
use canopy::plugin::types::{Filter as RawFilter, Name as RawName};

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Erased>>> = const { RefCell::new(None) };
}

fn raw_name(name: Name) -> RawName {
    RawName { hi: name.hi(), lo: name.lo() }
}

fn raw_filter(filter: Filter) -> RawFilter {
    RawFilter { name: raw_name(filter.name()), len: filter.len() }
}

fn with_instance<R>(f: impl FnOnce(&mut dyn Erased) -> R) -> Option<R> {
    INSTANCE.with(|slot| slot.borrow_mut().as_mut().map(|p| f(p.as_mut())))
}

/// `init` export.
pub fn init(factory: Factory, config: String) -> Result<(), String> {
    let plugin = factory(Config::parse(&config)?)?;
    INSTANCE.with(|slot| *slot.borrow_mut() = Some(plugin));
    Ok(())
}

/// `on-chunks` export.
pub fn on_chunks(chunks: Vec<RawChunk>) {
    let chunks = chunks
        .into_iter()
        .map(|c| crate::Chunk { name: Name::from_parts(c.name.hi, c.name.lo), expiry_ms: c.expiry_ms, data: c.data })
        .collect();
    with_instance(|p| p.on_chunks(chunks));
}

/// `on-timer` export.
pub fn on_timer(id: u64) {
    with_instance(|p| p.on_timer(id));
}

/// `on-command` export.
pub fn on_command(args: Vec<String>) -> Result<String, String> {
    with_instance(|p| p.on_command(args)).unwrap_or_else(|| Err("the plugin was not initialised".into()))
}

pub(crate) fn publish(chunk: &crate::Chunk) -> Result<(), String> {
    host::publish(&RawChunk { name: raw_name(chunk.name), expiry_ms: chunk.expiry_ms, data: chunk.data.clone() })
}

pub(crate) fn subscribe(filter: Filter) -> Result<(), String> {
    host::subscribe(raw_filter(filter))
}

pub(crate) fn unsubscribe(filter: Filter) {
    host::unsubscribe(raw_filter(filter))
}

pub(crate) fn kv_get(key: &[u8]) -> Option<Vec<u8>> {
    host::kv_get(key)
}

pub(crate) fn kv_put(key: &[u8], value: &[u8]) -> Result<(), String> {
    host::kv_put(key, value)
}

pub(crate) fn kv_delete(key: &[u8]) {
    host::kv_delete(key)
}

pub(crate) fn kv_scan_prefix(prefix: &[u8], after: Option<&[u8]>, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    host::kv_scan_prefix(prefix, after, limit)
}

pub(crate) fn now_ms() -> u64 {
    host::now_ms()
}

pub(crate) fn x25519(scalar: &[u8; 32], point: Option<&[u8; 32]>) -> [u8; 32] {
    let out = host::x25519(scalar, point.map(|p| &p[..]));
    // The host answers every 32-byte input; anything else is a host that breaks the ABI.
    out.and_then(|v| v.try_into().ok()).expect("the host's x25519 answers 32 bytes for 32-byte inputs")
}

pub(crate) fn set_timer(id: u64, after_ms: u64) {
    host::set_timer(id, after_ms)
}

pub(crate) fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => host::Level::Trace,
        Level::Debug => host::Level::Debug,
        Level::Info => host::Level::Info,
        Level::Warn => host::Level::Warn,
        Level::Error => host::Level::Error,
    };
    host::log(level, message)
}
