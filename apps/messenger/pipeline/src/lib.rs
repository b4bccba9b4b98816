//! Runs pipeline models for the messenger: `canopy:model@0.1.0` Wasm components
//! (`framework/wit/model/model.wit`), in the UI process, on plaintext. Secure stays small and
//! the only holder of keys; a model reaches it only through [`Signer`], in `act`.
//!
//! **Deterministic.** Every member's device must reach the same state from the same messages,
//! so a model gets nothing that differs between machines:
//! - each call runs in a **fresh instance**, so nothing carries over from one call to the
//!   next except the state bytes passed in;
//! - WASI imports (a Rust guest's standard library brings some) see a clock stopped at zero,
//!   a random stream from a fixed seed, no environment, no files, no sockets, and no stdin;
//!   what a model prints is dropped;
//! - limits are **fuel** (instructions) and **memory**, never wall-clock time, so whether a
//!   call fails does not depend on the machine's speed or load;
//! - NaNs are canonicalised, so float results are bit-for-bit the same everywhere.
//!
//! A trap, an overrun or a rejection is an error ([`ModelError`]) and the caller keeps the
//! state it had: [`Model::apply`] takes the state by reference and returns a new one.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../../framework/wit/model",
        world: "model",
    });
}

use bindings::canopy::model::{host, types};
use bindings::{Model as RawModel, ModelPre};

/// Why a model could not be loaded or a call failed. The state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The bytes are no `canopy:model` component (or not this ABI version).
    #[error("not a model: {0}")]
    Load(String),
    /// The model's bytes are not the ones the pipeline names.
    #[error("the model's bytes hash to {found}, not to {expected} as the pipeline says")]
    Mismatch {
        /// The hash the pipeline carries.
        expected: String,
        /// The hash of the bytes at hand.
        found: String,
    },
    /// The model trapped (a panic, an unreachable, a bad memory access).
    #[error("the model trapped: {0}")]
    Trap(String),
    /// The call ran out of fuel.
    #[error("the model ran out of fuel ({0} instructions)")]
    Fuel(u64),
    /// The call wanted more memory than its limit.
    #[error("the model wanted more than its {0} bytes of memory")]
    Memory(usize),
    /// The model refused: a message `apply` does not accept, parameters `init` does not, an
    /// action `act` cannot take. Its words.
    #[error("{0}")]
    Refused(String),
}

/// What one call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Fuel per call (about one unit per Wasm instruction).
    pub fuel: u64,
    /// Linear memory per call, in bytes.
    pub memory: usize,
}

impl Default for Limits {
    /// 1 billion instructions and 64 MiB: far more than a model needs to apply a message, far
    /// less than would let one stall the UI for long.
    fn default() -> Limits {
        Limits { fuel: 1_000_000_000, memory: 64 << 20 }
    }
}

/// A model's id: the SHA-256 of its bytes, what a pipeline's creation message names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub [u8; 32]);

impl ModelId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> ModelId {
        ModelId(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A pipeline's state: bytes only its model reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State(pub Vec<u8>);

impl State {
    /// The SHA-256 of the state, what members compare to detect divergence.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(&self.0).into()
    }

    /// [`State::hash`] in hex.
    pub fn hash_hex(&self) -> String {
        self.hash().iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub use canopy_model::{Action, Descriptor, Message, MessageType, Rendering, Role};

/// The one host capability: Secure signs, in `act` only.
pub trait Signer {
    /// Signs `payload` (of a `kind` Secure understands) with the user's key named `key`.
    fn sign(&mut self, key: &str, kind: &str, payload: &[u8]) -> Result<Vec<u8>, String>;
}

/// A [`Signer`] that signs nothing: for calls that may not sign.
pub struct NoSigner;

impl Signer for NoSigner {
    fn sign(&mut self, _: &str, _: &str, _: &[u8]) -> Result<Vec<u8>, String> {
        Err("signing is available in act only".into())
    }
}

/// The most compiled models a [`Runtime`] keeps; more, and it starts afresh.
const MAX_COMPILED: usize = 16;

/// Compiles models; one per process is enough.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    /// Models compiled so far, by id: a long-running UI (the TUI, the web UI) compiles a
    /// model once, not on every view (a 2 MB model takes about a second). In memory only: a
    /// compiled artifact on disk would be native code that anyone able to write the home
    /// could plant.
    compiled: Arc<std::sync::Mutex<std::collections::HashMap<ModelId, ModelPre<HostState>>>>,
    compilations: Arc<std::sync::atomic::AtomicU64>,
}

impl Runtime {
    /// An engine that meters fuel and canonicalises NaNs.
    pub fn new() -> Result<Runtime, ModelError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.concurrency_support(false);
        config.consume_fuel(true);
        config.cranelift_nan_canonicalization(true);
        let engine = Engine::new(&config).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        Ok(Runtime { engine, compiled: Arc::default(), compilations: Arc::default() })
    }

    /// How many models this runtime has compiled (a model loaded again is not compiled again).
    pub fn compilations(&self) -> u64 {
        self.compilations.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn compile(&self, id: ModelId, bytes: &[u8]) -> Result<ModelPre<HostState>, ModelError> {
        let cached = self.compiled.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        if let Some(pre) = cached {
            return Ok(pre);
        }
        self.compilations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let component = Component::new(&self.engine, bytes).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        RawModel::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let pre = linker.instantiate_pre(&component).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let pre = ModelPre::new(pre).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if compiled.len() >= MAX_COMPILED {
            compiled.clear();
        }
        compiled.insert(id, pre.clone());
        Ok(pre)
    }

    /// Compiles `bytes` (once per runtime) and checks it is a model: it instantiates against
    /// this ABI and its `describe` answers within `limits`.
    pub fn load(&self, bytes: &[u8], limits: Limits) -> Result<Model, ModelError> {
        let id = ModelId::of(bytes);
        let pre = self.compile(id, bytes)?;
        let mut model = Model { inner: Arc::new(Inner { engine: self.engine.clone(), pre, limits, id }), descriptor: None };
        let d = model.call(None, |m, store| m.call_describe(store))?;
        model.descriptor = Some(Descriptor {
            name: d.name,
            version: d.version,
            message_types: d.message_types.into_iter().map(|m| MessageType { name: m.name, description: m.description }).collect(),
            roles: d.roles.into_iter().map(|r| Role { name: r.name, description: r.description }).collect(),
        });
        Ok(model)
    }

    /// [`Runtime::load`], after checking the bytes are the model `expected` names.
    pub fn load_checked(&self, bytes: &[u8], expected: &ModelId, limits: Limits) -> Result<Model, ModelError> {
        let found = ModelId::of(bytes);
        if &found != expected {
            return Err(ModelError::Mismatch { expected: expected.to_string(), found: found.to_string() });
        }
        self.load(bytes, limits)
    }
}

struct Inner {
    engine: Engine,
    pre: ModelPre<HostState>,
    limits: Limits,
    id: ModelId,
}

/// A loaded model.
#[derive(Clone)]
pub struct Model {
    inner: Arc<Inner>,
    descriptor: Option<Descriptor>,
}

struct Limiter {
    max: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

/// The only randomness a model sees: the same stream on every machine.
struct FixedRandom(u64);

impl rand_core::TryRng for FixedRandom {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.try_next_u64().map(|v| v as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Ok(z ^ (z >> 31))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

/// A clock stopped at zero.
struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    signer: Option<Box<dyn Signer + Send>>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl host::Host for HostState {
    fn sign(&mut self, key: String, kind: String, payload: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.signer.as_mut() {
            Some(s) => s.sign(&key, &kind, &payload),
            None => Err("signing is available in act only".into()),
        }
    }
}

impl types::Host for HostState {}

fn message_in(m: types::Message) -> Message {
    Message { kind: m.kind, body: m.body }
}

fn message_out(m: &Message) -> types::Message {
    types::Message { kind: m.kind.clone(), body: m.body.clone() }
}

impl Model {
    /// Its id (the SHA-256 of its bytes).
    pub fn id(&self) -> ModelId {
        self.inner.id
    }

    /// What it says it is.
    pub fn descriptor(&self) -> &Descriptor {
        self.descriptor.as_ref().expect("described at load")
    }

    /// Runs `f` in a fresh instance, within the limits; `signer` only for `act`.
    fn call<R>(&self, signer: Option<Box<dyn Signer + Send>>, f: impl FnOnce(&RawModel, &mut Store<HostState>) -> wasmtime::Result<R>) -> Result<R, ModelError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.wall_clock(StoppedClock).monotonic_clock(StoppedClock).secure_random(FixedRandom(0)).insecure_random(FixedRandom(1)).insecure_random_seed(0).allow_ip_name_lookup(false);
        let state = HostState { wasi: wasi.build(), table: ResourceTable::new(), limiter: Limiter { max: self.inner.limits.memory, hit: false }, signer };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_fuel(self.inner.limits.fuel).map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let result = self.inner.pre.instantiate(&mut store).and_then(|m| f(&m, &mut store));
        result.map_err(|err| match err.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => ModelError::Fuel(self.inner.limits.fuel),
            _ if store.data().limiter.hit => ModelError::Memory(self.inner.limits.memory),
            _ => ModelError::Trap(format!("{err:#}")),
        })
    }

    /// The first state, from the creator's parameters.
    pub fn init(&self, params: &str, creator: &str, members: &[String]) -> Result<State, ModelError> {
        self.call(None, |m, s| m.call_init(s, params, creator, members))?.map(State).map_err(ModelError::Refused)
    }

    /// The state after `sender`'s `message`; `state` is untouched whatever happens.
    pub fn apply(&self, state: &State, sender: &str, time_ms: u64, message: &Message) -> Result<State, ModelError> {
        self.call(None, |m, s| m.call_apply(s, &state.0, sender, time_ms, &message_out(message)))?.map(State).map_err(ModelError::Refused)
    }

    /// What `viewer` sees, and may do.
    pub fn view(&self, state: &State, viewer: &str) -> Result<Rendering, ModelError> {
        let r = self.call(None, |m, s| m.call_view(s, &state.0, viewer))?;
        Ok(Rendering {
            title: r.title,
            status: r.status,
            lines: r.lines,
            actions: r.actions.into_iter().map(|a| Action { name: a.name, label: a.label, args: a.args }).collect(),
            closed: r.closed,
        })
    }

    /// The message `viewer`'s `action` sends; the model may ask `signer` to sign.
    pub fn act(&self, state: &State, viewer: &str, action: &str, args: &[String], signer: Box<dyn Signer + Send>) -> Result<Message, ModelError> {
        self.call(Some(signer), |m, s| m.call_act(s, &state.0, viewer, action, args))?.map(message_in).map_err(ModelError::Refused)
    }
}
