//! The plugin host: runs Wasm components of the `canopy:plugin` world (`framework/wit/`) and
//! native plugins under one supervisor.
//!
//! The pieces, in the order data flows through them:
//! - a [`Template`] is a loaded plugin ready to be instantiated: a [`WasmTemplate`] (compiled
//!   once, cached precompiled on disk, pre-instantiated) or a [`NativeTemplate`] (a `cdylib`
//!   whose ABI version was checked);
//! - a [`Supervisor`] owns the running instance: it delivers chunks, timers and commands,
//!   re-creates the instance from its persisted state when it traps, and quarantines it when
//!   it keeps failing;
//! - what the plugin asked for comes out as [`Effect`]s (publish, subscribe, unsubscribe) for
//!   the embedder — a relay or `canopy plugin run` — to carry out.
//!
//! The host is sans-IO: it never touches the network. A callback is a transaction: its
//! publishes, subscriptions, timers and key/value writes take effect when it returns normally
//! and are dropped when it traps.
//!
//! ```no_run
//! use canopy::plugin::{Limits, MemoryState, Runtime, RuntimeOptions, Supervisor, system_clock};
//! # fn main() -> Result<(), canopy::plugin::PluginError> {
//! let runtime = Runtime::new(RuntimeOptions::default())?;
//! let echo = runtime.load_file("echo.wasm".as_ref(), Limits::default(), &[])?;
//! let config = r#"{"requests": "0x01000000000000000000000000000000/8", "replies": "0x02000000000000000000000000000000/8"}"#;
//! let mut plugin = Supervisor::start("echo", echo, config, Box::new(MemoryState::new()), system_clock())?;
//! for effect in plugin.take_effects() {
//!     println!("{effect:?}"); // Subscribe(0x01…/8)
//! }
//! # Ok(()) }
//! ```

mod core;
mod native;
mod state;
mod supervisor;
mod wasm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::core::HostCore;
pub use self::native::NativeTemplate;
pub use self::state::{Entry, MAX_KEY, MAX_VALUE, MemoryState, StateStore, Write};
pub use self::supervisor::{CallWatch, MAX_DEAD_LETTER_LEN, PluginStats, Supervisor, WatchMark, dead_letter};
pub use self::wasm::{Runtime, RuntimeOptions, WasmTemplate};
use crate::{Chunk, Filter, StoreError};

/// Whether a plugin file is a Wasm component or a native library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// A Wasm component of the `canopy:plugin` world, run under its limits.
    Wasm,
    /// A native `cdylib` built with `canopy-plugin`: trusted, unlimited, fastest.
    Native,
}

impl PluginKind {
    /// The kind a file's extension suggests: native for `.so`, `.dylib` and `.dll`.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("so" | "dylib" | "dll") => PluginKind::Native,
            _ => PluginKind::Wasm,
        }
    }
}

impl Runtime {
    /// Loads a plugin of either kind (`None`: by the file's extension). Directories can only
    /// be granted to Wasm plugins; native code sees everything anyway.
    pub fn load_plugin(
        &self,
        path: &Path,
        kind: Option<PluginKind>,
        limits: Limits,
        dirs: &[PathBuf],
    ) -> Result<Arc<dyn Template>, PluginError> {
        match kind.unwrap_or_else(|| PluginKind::of(path)) {
            PluginKind::Wasm => Ok(self.load_file(path, limits, dirs)?),
            PluginKind::Native if !dirs.is_empty() => Err(PluginError::Unsupported(format!(
                "{}: directories are granted to Wasm plugins only; native code sees the whole file system",
                path.display()
            ))),
            PluginKind::Native => Ok(NativeTemplate::load(path, limits)?),
        }
    }
}

/// What a plugin asked its host to do, in the order it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish a chunk.
    Publish(Chunk),
    /// Subscribe to a filter.
    Subscribe(Filter),
    /// Drop a subscription.
    Unsubscribe(Filter),
}

/// A clock in unix milliseconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// X25519 (RFC 7748) as the host offers it to Wasm plugins (`x25519` in the WIT):
/// `scalar`, clamped, times `point`, or times the base point (by its precomputed table) when
/// `point` is `None`.
pub fn x25519(scalar: &[u8; 32], point: Option<&[u8; 32]>) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(*scalar);
    match point {
        Some(p) => *secret.diffie_hellman(&x25519_dalek::PublicKey::from(*p)).as_bytes(),
        None => *x25519_dalek::PublicKey::from(&secret).as_bytes(),
    }
}

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// Resource limits of one plugin instance. Relays take them from `[plugin.limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock budget of one callback, in milliseconds; a callback still running then is
    /// interrupted (Wasm) and the instance re-created, or, since native code cannot be
    /// interrupted, reported by a watchdog and the plugin quarantined ([`CallWatch`]).
    pub deadline_ms: u64,
    /// Linear memory an instance may grow to, in bytes (Wasm).
    pub memory_bytes: u64,
    /// Fuel per callback (Wasm): `None`, the default, leaves fuel metering off. Needs a
    /// [`Runtime`] built with [`RuntimeOptions::fuel`].
    pub fuel: Option<u64>,
    /// Chunks one callback may publish.
    pub max_publish: usize,
    /// Timers an instance may have pending.
    pub max_timers: usize,
    /// Failures within [`Limits::failure_window_ms`] that quarantine the plugin.
    pub max_failures: u32,
    /// The window over which failures count, in milliseconds.
    pub failure_window_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline_ms: 100,
            memory_bytes: 64 << 20,
            fuel: None,
            max_publish: 4096,
            max_timers: 1024,
            max_failures: 5,
            failure_window_ms: 60_000,
        }
    }
}

impl Limits {
    /// The callback deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}

/// Why a callback failed; the instance is re-created after any of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// It ran past its deadline and was interrupted.
    Deadline,
    /// It tried to grow its memory past the limit.
    Memory,
    /// It ran out of fuel.
    Fuel,
    /// It trapped (a Rust panic in a Wasm guest is a trap), or a native plugin panicked.
    Trap,
}

/// A failed callback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Fault {
    /// What went wrong.
    pub kind: FaultKind,
    /// The host's description (trap message and backtrace, panic message).
    pub message: String,
}

/// Errors of the plugin host.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin file could not be read.
    #[error("reading plugin {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The Wasm component failed to compile or does not match the `canopy:plugin` world.
    #[error("loading plugin {what}: {message}")]
    Load {
        /// The plugin.
        what: String,
        /// Why.
        message: String,
    },
    /// A native plugin was built against another ABI version.
    #[error(
        "native plugin {path} speaks plugin ABI version {found}, but this host speaks version {expected}; rebuild it against canopy-plugin with ABI version {expected}"
    )]
    AbiMismatch {
        /// The library.
        path: String,
        /// The version the library reports.
        found: u32,
        /// The version this host speaks.
        expected: u32,
    },
    /// The plugin's `init` returned an error.
    #[error("plugin {plugin} refused its configuration: {message}")]
    Init {
        /// The plugin.
        plugin: String,
        /// What `init` returned.
        message: String,
    },
    /// A callback failed (and the instance was re-created or quarantined).
    #[error("plugin {plugin} failed: {fault}")]
    Fault {
        /// The plugin.
        plugin: String,
        /// What happened.
        fault: Fault,
    },
    /// The plugin failed too often and no longer runs.
    #[error("plugin {0} is quarantined after repeated failures")]
    Quarantined(String),
    /// The plugin's state store failed.
    #[error("plugin state: {0}")]
    State(#[from] StoreError),
    /// The limits ask for something this runtime cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// A loaded plugin from which instances are made.
pub trait Template: Send + Sync {
    /// Describes the plugin for logs (its file and kind).
    fn describe(&self) -> String;
    /// The plugin's limits.
    fn limits(&self) -> Limits;
    /// Whether a callback still running at its deadline is interrupted (Wasm). Native code
    /// cannot be: a watchdog quarantines the plugin instead ([`CallWatch`]).
    fn interruptible(&self) -> bool {
        true
    }
    /// Makes a fresh, uninitialised instance around `core`.
    fn instantiate(&self, core: HostCore) -> Result<Box<dyn Instance>, PluginError>;
}

/// One running plugin instance. Any [`Fault`] leaves it unusable.
pub trait Instance: Send {
    /// Calls `init(config)`; the inner error is the plugin's own refusal.
    fn init(&mut self, config: &str) -> Result<Result<(), String>, Fault>;
    /// Calls `on-chunks`.
    fn on_chunks(&mut self, chunks: &[Chunk]) -> Result<(), Fault>;
    /// Calls `on-timer`.
    fn on_timer(&mut self, id: u64) -> Result<(), Fault>;
    /// Calls `on-command`.
    fn on_command(&mut self, args: &[String]) -> Result<Result<String, String>, Fault>;
    /// The host side of the instance.
    fn core(&mut self) -> &mut HostCore;
    /// Tears the instance down, keeping its host side (and so its state store).
    fn into_core(self: Box<Self>) -> HostCore;
}
