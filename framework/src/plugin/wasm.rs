//! The Wasm host: wasmtime 48, component model, the `canopy:plugin` world.

use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::core::HostCore;
use super::{Fault, FaultKind, Instance, Limits, PluginError, Template};
use crate::{Chunk, Name};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "plugin",
    });
}

use bindings::canopy::plugin::{host, types};
use bindings::{Plugin, PluginPre};

/// How often the engine's epoch advances; callback deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How to build a [`Runtime`].
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Where compiled plugins are cached (`None`: compile on every load).
    pub cache_dir: Option<PathBuf>,
    /// Meter fuel, so plugins whose [`Limits::fuel`] is set can run. Off by default: it
    /// costs every plugin some speed.
    pub fuel: bool,
}

/// Compiles and caches Wasm plugins; one per process is enough.
///
/// A background thread advances the engine's epoch every 5 ms for the callbacks'
/// deadlines; it stops when the runtime and every plugin loaded from it are dropped.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    options: RuntimeOptions,
}

fn load_error(what: &str, err: impl std::fmt::Display) -> PluginError {
    PluginError::Load { what: what.to_owned(), message: format!("{err:#}") }
}

impl Runtime {
    /// Builds the engine (component model, no concurrency support, epoch interruption).
    pub fn new(options: RuntimeOptions) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.concurrency_support(false);
        config.epoch_interruption(true);
        config.consume_fuel(options.fuel);
        // `CANOPY_WASM_PROFILE=perfmap` writes /tmp/perf-PID.map, so `perf report` can name
        // the plugins' JIT-compiled functions (otherwise they show as bare addresses).
        if std::env::var_os("CANOPY_WASM_PROFILE").is_some_and(|v| v == "perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| load_error("engine", e))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("canopy-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| load_error("epoch thread", e))?;
        Ok(Runtime { engine, options })
    }

    /// Loads a plugin file: from the precompiled cache when it holds this file's code for
    /// this wasmtime and engine configuration, otherwise compiling it (and filling the cache).
    /// `dirs` are granted to the plugin through WASI, each visible under its own path.
    pub fn load_file(&self, path: &Path, limits: Limits, dirs: &[PathBuf]) -> Result<Arc<WasmTemplate>, PluginError> {
        let bytes = fs::read(path).map_err(|source| PluginError::Read { path: path.display().to_string(), source })?;
        self.load(&path.display().to_string(), &bytes, limits, dirs)
    }

    /// Loads a plugin from its bytes; `what` names it in errors and logs.
    pub fn load(
        &self,
        what: &str,
        bytes: &[u8],
        limits: Limits,
        dirs: &[PathBuf],
    ) -> Result<Arc<WasmTemplate>, PluginError> {
        if limits.fuel.is_some() && !self.options.fuel {
            return Err(PluginError::Unsupported(format!(
                "plugin {what} sets a fuel limit, but the runtime meters no fuel (RuntimeOptions::fuel)"
            )));
        }
        for dir in dirs {
            if !dir.is_dir() {
                return Err(load_error(what, format!("granted directory {} does not exist", dir.display())));
            }
        }
        let component = self.component(what, bytes)?;
        let mut linker = Linker::<HostState>::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| load_error(what, e))?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(|e| load_error(what, e))?;
        let pre = linker.instantiate_pre(&component).map_err(|e| load_error(what, e))?;
        let pre = PluginPre::new(pre).map_err(|e| load_error(what, e))?;
        Ok(Arc::new(WasmTemplate {
            what: what.to_owned(),
            pre,
            limits,
            dirs: dirs.to_vec(),
            deadline_ticks: limits.deadline().div_duration_f64(EPOCH_TICK).ceil() as u64 + 1,
        }))
    }

    /// The cache file for `bytes`: keyed by the wasmtime version, the engine's compilation
    /// settings and the SHA-256 of the module.
    fn cache_path(&self, bytes: &[u8]) -> Option<PathBuf> {
        let dir = self.options.cache_dir.as_ref()?;
        let mut settings = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut settings);
        let module: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        Some(dir.join(format!("wasmtime-{}-{:016x}-{module}.cwasm", wasmtime_environ::VERSION, settings.finish())))
    }

    fn component(&self, what: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        let cached = self.cache_path(bytes);
        if let Some(path) = &cached
            && path.is_file()
        {
            match load_precompiled(&self.engine, path) {
                Ok(component) => return Ok(component),
                Err(err) => {
                    tracing::warn!(file = %path.display(), %err, "ignoring an unusable plugin cache entry")
                }
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| load_error(what, e))?;
        if let Some(path) = &cached {
            match component.serialize() {
                Ok(compiled) => {
                    if let Err(err) = write_atomically(path, &compiled) {
                        tracing::warn!(file = %path.display(), %err, "cannot cache the compiled plugin");
                    }
                }
                Err(err) => tracing::warn!(%err, "cannot serialize the compiled plugin"),
            }
        }
        Ok(component)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// partial file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Maps a precompiled component from the cache.
#[allow(unsafe_code)]
fn load_precompiled(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: this loads machine code, like the native-plugin boundary. Only files this
    // runtime wrote are read: they live in the operator's cache directory, are written
    // whole (temporary file, then rename) and are named by the wasmtime version, the
    // engine's compilation settings and the module's hash; wasmtime additionally checks the
    // artifact's header and compatibility before using it.
    unsafe { Component::deserialize_file(engine, path) }
}

/// A Wasm plugin, compiled and pre-instantiated: instances are made from it in microseconds.
pub struct WasmTemplate {
    what: String,
    pre: PluginPre<HostState>,
    limits: Limits,
    dirs: Vec<PathBuf>,
    deadline_ticks: u64,
}

impl Template for WasmTemplate {
    fn describe(&self) -> String {
        format!("wasm {}", self.what)
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn instantiate(&self, core: HostCore) -> Result<Box<dyn Instance>, PluginError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        for dir in &self.dirs {
            let guest = dir.to_string_lossy();
            wasi.preopened_dir(dir, &guest, FsPerms::ReadWrite)
                .map_err(|e| load_error(&self.what, format!("granting {}: {e}", dir.display())))?;
        }
        let state = HostState {
            core,
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter { max: self.limits.memory_bytes as usize, total: 0, hit: false },
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks);
        if let Some(fuel) = self.limits.fuel {
            store.set_fuel(fuel).map_err(|e| load_error(&self.what, e))?;
        }
        let plugin = self.pre.instantiate(&mut store).map_err(|e| load_error(&self.what, e))?;
        Ok(Box::new(WasmInstance { store, plugin, deadline_ticks: self.deadline_ticks, fuel: self.limits.fuel }))
    }
}

/// Caps the total linear memory of an instance and remembers when a growth was refused.
struct Limiter {
    max: usize,
    total: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.total - current.min(self.total) + desired;
        if total > self.max {
            self.hit = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

struct HostState {
    core: HostCore,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn name(n: types::Name) -> Name {
    Name::new((u128::from(n.hi) << 64) | u128::from(n.lo))
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn publish(&mut self, chunk: types::Chunk) -> Result<(), String> {
        self.core.publish(name(chunk.name), chunk.expiry_ms, chunk.data)
    }

    fn subscribe(&mut self, filter: types::Filter) -> Result<(), String> {
        self.core.subscribe(name(filter.name), filter.len)
    }

    fn unsubscribe(&mut self, filter: types::Filter) {
        self.core.unsubscribe(name(filter.name), filter.len)
    }

    fn kv_get(&mut self, key: Vec<u8>) -> Option<Vec<u8>> {
        self.core.kv_get(&key)
    }

    fn kv_put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        self.core.kv_put(&key, &value)
    }

    fn kv_delete(&mut self, key: Vec<u8>) {
        self.core.kv_delete(&key)
    }

    fn kv_scan_prefix(&mut self, prefix: Vec<u8>, after: Option<Vec<u8>>, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.core.kv_scan(&prefix, after.as_deref(), limit)
    }

    fn now_ms(&mut self) -> u64 {
        self.core.now_ms()
    }

    fn set_timer(&mut self, id: u64, after_ms: u64) {
        self.core.set_timer(id, after_ms)
    }

    fn log(&mut self, level: host::Level, message: String) {
        self.core.log(level as u8, &message)
    }

    fn x25519(&mut self, scalar: Vec<u8>, point: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let scalar: [u8; 32] = scalar.try_into().ok()?;
        let point: Option<[u8; 32]> = match point {
            Some(p) => Some(p.try_into().ok()?),
            None => None,
        };
        Some(crate::plugin::x25519(&scalar, point.as_ref()).to_vec())
    }
}

struct WasmInstance {
    store: Store<HostState>,
    plugin: Plugin,
    deadline_ticks: u64,
    fuel: Option<u64>,
}

impl WasmInstance {
    /// Arms the deadline (and fuel) for one callback.
    fn arm(&mut self) {
        self.store.set_epoch_deadline(self.deadline_ticks);
        if let Some(fuel) = self.fuel {
            // Cannot fail: fuel is only set when the engine meters it (checked at load).
            let _ = self.store.set_fuel(fuel);
        }
        self.store.data_mut().limiter.hit = false;
    }

    fn fault(&self, err: wasmtime::Error) -> Fault {
        let kind = match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => FaultKind::Deadline,
            Some(Trap::OutOfFuel) => FaultKind::Fuel,
            _ if self.store.data().limiter.hit => FaultKind::Memory,
            _ => FaultKind::Trap,
        };
        Fault { kind, message: format!("{err:?}") }
    }
}

fn raw_chunk(chunk: &Chunk) -> types::Chunk {
    let n = chunk.name().to_u128();
    types::Chunk {
        name: types::Name { hi: (n >> 64) as u64, lo: n as u64 },
        expiry_ms: chunk.expiry(),
        data: chunk.data().to_vec(),
    }
}

impl Instance for WasmInstance {
    fn init(&mut self, config: &str) -> Result<Result<(), String>, Fault> {
        self.arm();
        self.plugin.call_init(&mut self.store, config).map_err(|e| self.fault(e))
    }

    fn on_chunks(&mut self, chunks: &[Chunk]) -> Result<(), Fault> {
        let raw: Vec<types::Chunk> = chunks.iter().map(raw_chunk).collect();
        self.arm();
        self.plugin.call_on_chunks(&mut self.store, &raw).map_err(|e| self.fault(e))
    }

    fn on_timer(&mut self, id: u64) -> Result<(), Fault> {
        self.arm();
        self.plugin.call_on_timer(&mut self.store, id).map_err(|e| self.fault(e))
    }

    fn on_command(&mut self, args: &[String]) -> Result<Result<String, String>, Fault> {
        self.arm();
        self.plugin.call_on_command(&mut self.store, args).map_err(|e| self.fault(e))
    }

    fn core(&mut self) -> &mut HostCore {
        &mut self.store.data_mut().core
    }

    fn into_core(self: Box<Self>) -> HostCore {
        self.store.into_data().core
    }
}
