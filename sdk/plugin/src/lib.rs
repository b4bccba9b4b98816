//! Write Canopy plugins.
//!
//! A plugin is a type implementing [`Plugin`], exported with [`export!`]. The same source
//! builds two ways:
//! - for `wasm32-wasip2` it becomes a Wasm component of the `canopy:plugin` world
//!   (`framework/wit/plugin.wit`), which relays and `canopy plugin run` load under hard limits;
//! - for the host it becomes a native plugin (`crate-type = ["cdylib"]`) exporting the C entry
//!   point of [`abi`], for operators who trust the code and want the last nanosecond.
//!
//! A plugin talks to its host through the free functions of this crate: [`publish`],
//! [`subscribe`], [`unsubscribe`], the [`kv`] store, [`now_ms`], [`set_timer`] and [`log`].
//!
//! ```no_run
//! use canopy_plugin::{Chunk, Config, Filter, Plugin};
//!
//! /// Answers every request under `requests` by publishing the same bytes under `replies`.
//! struct Echo {
//!     replies: Filter,
//! }
//!
//! impl Plugin for Echo {
//!     fn init(config: Config) -> Result<Self, String> {
//!         canopy_plugin::subscribe(config.filter("requests")?)?;
//!         Ok(Echo { replies: config.filter("replies")? })
//!     }
//!
//!     fn on_chunks(&mut self, chunks: Vec<Chunk>) {
//!         for chunk in chunks {
//!             let name = self.replies.with_suffix(chunk.name);
//!             let _ = canopy_plugin::publish(&Chunk { name, ..chunk });
//!         }
//!     }
//! }
//!
//! canopy_plugin::export!(Echo);
//! ```

pub mod abi;
mod config;
mod erased;
pub mod kv;
mod types;

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod native;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

#[cfg(not(target_arch = "wasm32"))]
use native as sys;
#[cfg(target_arch = "wasm32")]
use wasm as sys;

pub use config::Config;
#[doc(hidden)]
pub use erased::{Erased, erase};
pub use types::{Chunk, Filter, Level, MAX_CHUNK_DATA, Name};

/// A Canopy plugin.
///
/// The host calls [`Plugin::init`] once, then the other callbacks one at a time, never
/// concurrently. Each callback runs under a deadline (100 ms by default) and the instance
/// under a memory limit; a plugin that panics or overruns is re-created from its persisted
/// [`kv`] state, and quarantined if it keeps failing.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from its configuration; typically subscribes and sets timers.
    fn init(config: Config) -> Result<Self, String>;

    /// Chunks matching the plugin's subscriptions, in batches, in arrival order.
    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        let _ = chunks;
    }

    /// A timer set with [`set_timer`] fired.
    fn on_timer(&mut self, id: u64) {
        let _ = id;
    }

    /// A command; its result is what `canopy plugin run` prints.
    fn on_command(&mut self, args: Vec<String>) -> Result<String, String> {
        Err(format!("this plugin takes no commands (got {args:?})"))
    }
}

/// Publishes a chunk. It is sent when the current callback returns.
pub fn publish(chunk: &Chunk) -> Result<(), String> {
    if chunk.data.len() > MAX_CHUNK_DATA {
        return Err(format!("chunk {} carries {} bytes; the limit is {MAX_CHUNK_DATA}", chunk.name, chunk.data.len()));
    }
    sys::publish(chunk)
}

/// Subscribes to a filter: every cached chunk in range arrives through
/// [`Plugin::on_chunks`], then every new one.
pub fn subscribe(filter: Filter) -> Result<(), String> {
    sys::subscribe(filter)
}

/// Drops a subscription.
pub fn unsubscribe(filter: Filter) {
    sys::unsubscribe(filter)
}

/// The host's clock, unix milliseconds.
pub fn now_ms() -> u64 {
    sys::now_ms()
}

/// Calls [`Plugin::on_timer`] with `id` once, `after_ms` from now; setting a pending id again
/// moves its timer.
pub fn set_timer(id: u64, after_ms: u64) {
    sys::set_timer(id, after_ms)
}

/// Writes a line to the host's log, tagged with the plugin's name.
pub fn log(level: Level, message: &str) {
    sys::log(level, message)
}

/// X25519 (RFC 7748): `scalar` (clamped) times `point`, or times the base point when
/// `point` is `None`. A Wasm plugin gets it from the host, natively compiled: several times
/// faster than the same code in Wasm. The host sees the scalar (it holds the plugin's state
/// anyway).
pub fn x25519(scalar: &[u8; 32], point: Option<&[u8; 32]>) -> [u8; 32] {
    sys::x25519(scalar, point)
}

/// Exports a [`Plugin`] type: as the `canopy:plugin` world on `wasm32`, as the native entry
/// point [`abi::ENTRY_SYMBOL`] elsewhere. Use it once, at the crate root.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct CanopyGuest;
            impl $crate::wasm::Guest for CanopyGuest {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::wasm::init($crate::erase::<$plugin>, config)
                }
                fn on_chunks(chunks: ::std::vec::Vec<$crate::wasm::RawChunk>) {
                    $crate::wasm::on_chunks(chunks)
                }
                fn on_timer(id: u64) {
                    $crate::wasm::on_timer(id)
                }
                fn on_command(
                    args: ::std::vec::Vec<::std::string::String>,
                ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                    $crate::wasm::on_command(args)
                }
            }
            $crate::wasm::export_plugin!(CanopyGuest with_types_in $crate::wasm);
        };

        /// The native plugin's entry point.
        #[cfg(not(target_arch = "wasm32"))]
        #[allow(unsafe_code)]
        // SAFETY: the host looks this symbol up by name and calls it with the C ABI and no
        // arguments; the name is unique to Canopy plugins.
        #[unsafe(no_mangle)]
        pub extern "C" fn canopy_plugin_entry() -> *const $crate::abi::PluginVTable {
            $crate::native::vtable($crate::erase::<$plugin>)
        }
    };
}
