//! Running a plugin as a tool against a relay: what `canopy plugin run` does.
//!
//! The plugin runs on a thread of its own (its callbacks are synchronous and may block on
//! WASI file access) and talks to the relay through a [`Client`]. A run goes:
//! 1. `init(config)`, where `config` is the tool's configuration object plus `"args"`;
//! 2. **settle**: deliver the replay of every subscription the plugin made until the relay
//!    says it is complete, wait for every publish to be acknowledged, and fire the plugin's
//!    timers until none is pending (a plugin done early sets its timer again with delay 0);
//! 3. `on-command(args)`, whose answer is the tool's result; publishes it makes are awaited
//!    too.
//!
//! A failure is not retried in a tool (`max_failures` is 1): the first trap ends the run with
//! its reason. A failed `on-chunks` call of several chunks is first isolated as in a relay:
//! its chunks are delivered again one per call, so the run ends at the chunk that fails on
//! its own, naming it, after the chunks before it were taken.
//!
//! Granted directories (`--dir`) that do not exist yet are created first.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use canopy::plugin::{Effect, Limits, MemoryState, PluginError, Runtime, RuntimeOptions, StateStore, Supervisor};
use canopy::wire::{ErrorCode, ReplayMode};
use canopy::{Chunk, Filter, FjallStore};
use tokio::sync::mpsc;

use crate::{Client, ClientError, SubEvent, now_ms};

/// How to run a plugin as a tool.
#[derive(Debug, Clone)]
pub struct ToolOptions {
    /// The plugin file (`.wasm`, or a native library).
    pub file: PathBuf,
    /// The command line handed to the plugin (`init` sees it as `"args"`, then `on-command`).
    pub args: Vec<String>,
    /// The configuration object; `"args"` is added to it.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Directories granted to a Wasm plugin, each visible under its own path.
    pub dirs: Vec<PathBuf>,
    /// The plugin's limits. [`ToolOptions::new`] gives a tool 10 s per callback and 256 MiB.
    pub limits: Limits,
    /// Where the plugin's key/value state persists (a fjall database); in memory if `None`.
    pub state: Option<PathBuf>,
    /// Where compiled plugins are cached, if anywhere.
    pub cache_dir: Option<PathBuf>,
    /// The whole run gives up after this long.
    pub timeout: Duration,
}

impl ToolOptions {
    /// Options for running `file` with `args`, with tool-sized limits: a callback may take
    /// 10 s and the instance 256 MiB, and the first failure ends the run.
    pub fn new(file: impl Into<PathBuf>, args: Vec<String>) -> Self {
        ToolOptions {
            file: file.into(),
            args,
            config: serde_json::Map::new(),
            dirs: Vec::new(),
            limits: Limits { deadline_ms: 10_000, memory_bytes: 256 << 20, max_failures: 1, ..Limits::default() },
            state: None,
            cache_dir: None,
            timeout: Duration::from_secs(600),
        }
    }
}

/// What a tool run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    /// What `on-command` returned.
    pub answer: Result<String, String>,
    /// Chunks delivered to the plugin.
    pub chunks_in: u64,
    /// Chunks the plugin published that the relay acknowledged.
    pub published: u64,
    /// Chunks the plugin published that the relay refused.
    pub refused: u64,
}

/// Why a tool run failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The plugin could not be loaded or started, or it failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The relay connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The run did not finish in time.
    #[error("the plugin did not finish within {0:?}")]
    Timeout(Duration),
    /// A granted directory did not exist and could not be created.
    #[error("creating the granted directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The plugin's thread ended unexpectedly.
    #[error("the plugin thread stopped: {0}")]
    Stopped(String),
}

/// Progress of a run, reported as it happens (for a progress bar).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Chunks delivered to the plugin so far.
    pub chunks_in: u64,
    /// Publishes acknowledged so far.
    pub published: u64,
    /// Publishes refused so far.
    pub refused: u64,
}

/// What the network side tells the plugin thread.
enum Event {
    Chunk(Chunk),
    /// The subscription to this filter finished its replay (or ended).
    ReplayDone(Filter),
    Published(bool),
    Tick,
}

/// What the plugin thread asks of the network side.
enum Request {
    Effects(Vec<Effect>),
    Timer(Option<u64>),
    Done(Result<ToolOutcome, ToolError>),
}

/// Runs the plugin in `options` against the relay behind `client`, reporting progress to
/// `progress` as it goes.
pub async fn run(
    client: &Client,
    options: ToolOptions,
    progress: impl Fn(Progress) + Send + 'static,
) -> Result<ToolOutcome, ToolError> {
    // Unbounded: the forwarding tasks must keep up with the client, or it ends the plugin's
    // subscriptions as slow and the replay starts over. What the plugin has not consumed yet
    // is held here, at most the subtrees it subscribed to.
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Event>();
    let (requests_tx, mut requests_rx) = mpsc::unbounded_channel::<Request>();
    let started = Instant::now();
    let timeout = options.timeout;
    let thread = std::thread::Builder::new()
        .name("canopy-tool".into())
        .spawn(move || {
            let result = drive(options, events_rx, &requests_tx, progress);
            let _ = requests_tx.send(Request::Done(result));
        })
        .map_err(|e| ToolError::Stopped(e.to_string()))?;

    let mut subscriptions: HashMap<Filter, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let outcome = loop {
        let tick = async {
            match timer.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let request = tokio::select! {
            request = requests_rx.recv() => request,
            () = tick => {
                timer = None;
                let _ = events_tx.send(Event::Tick);
                continue;
            }
            () = &mut deadline => break Err(ToolError::Timeout(started.elapsed())),
        };
        match request {
            None => break Err(ToolError::Stopped("no result".into())),
            Some(Request::Done(result)) => break result,
            Some(Request::Timer(due)) => {
                timer = due.map(|due| {
                    let wait = Duration::from_millis(due.saturating_sub(now_ms()));
                    Box::pin(tokio::time::sleep(wait))
                });
            }
            Some(Request::Effects(effects)) => {
                for effect in effects {
                    match effect {
                        Effect::Publish(chunk) => {
                            let (client, events) = (client.clone(), events_tx.clone());
                            tokio::spawn(async move {
                                let accepted = match client.publish(chunk).await {
                                    Ok(()) => true,
                                    Err(err) => {
                                        tracing::warn!(%err, "the relay refused a chunk the plugin published");
                                        false
                                    }
                                };
                                let _ = events.send(Event::Published(accepted));
                            });
                        }
                        Effect::Subscribe(filter) => match client.subscribe(filter, ReplayMode::CachedAndLive).await {
                            Ok(sub) => {
                                let task = tokio::spawn(forward(client.clone(), filter, sub, events_tx.clone()));
                                subscriptions.insert(filter, task);
                            }
                            Err(err) => {
                                tracing::warn!(%err, %filter, "the plugin's subscription failed");
                                let _ = events_tx.send(Event::ReplayDone(filter));
                            }
                        },
                        Effect::Unsubscribe(filter) => {
                            if let Some(task) = subscriptions.remove(&filter) {
                                task.abort();
                            }
                        }
                    }
                }
            }
        }
    };
    for (_, task) in subscriptions {
        task.abort();
    }
    drop(events_tx);
    // A plugin thread still busy when the run timed out may be stuck in native code, which
    // cannot be interrupted: it is abandoned rather than waited for.
    if !matches!(outcome, Err(ToolError::Timeout(_))) {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    outcome
}

/// Feeds one subscription's chunks to the plugin thread; if the relay drops it for falling
/// behind, subscribes again and catches up from the cache.
async fn forward(client: Client, filter: Filter, mut sub: crate::Subscription, events: mpsc::UnboundedSender<Event>) {
    let mut replaying = true;
    loop {
        match sub.next().await {
            Some(SubEvent::Chunk(chunk)) => {
                if events.send(Event::Chunk(chunk)).is_err() {
                    return;
                }
            }
            Some(SubEvent::ReplayDone) => {
                if replaying {
                    replaying = false;
                    let _ = events.send(Event::ReplayDone(filter));
                }
            }
            // The subscription is `CachedAndLive`: a reconnect replays what was missed.
            Some(SubEvent::Gap) => {}
            Some(SubEvent::Error { code: ErrorCode::SlowConsumer, .. }) => {
                tracing::warn!(%filter, "the plugin fell behind; catching up from the cache");
                match client.subscribe(filter, ReplayMode::CachedAndLive).await {
                    Ok(again) => sub = again,
                    Err(_) => break,
                }
            }
            Some(SubEvent::Error { code, message }) => {
                tracing::warn!(%filter, %code, %message, "the plugin's subscription ended");
                break;
            }
            None => break,
        }
    }
    if replaying {
        let _ = events.send(Event::ReplayDone(filter));
    }
}

/// The plugin thread: init, settle, command, settle.
fn drive(
    options: ToolOptions,
    mut events: mpsc::UnboundedReceiver<Event>,
    requests: &mpsc::UnboundedSender<Request>,
    progress: impl Fn(Progress),
) -> Result<ToolOutcome, ToolError> {
    for dir in &options.dirs {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| ToolError::Dir { path: dir.clone(), source })?;
            tracing::info!(dir = %dir.display(), "created the granted directory");
        }
    }
    // Each phase's time goes to the debug log: what a tool run costs besides the command
    // itself (engine, module from the cache, state store, the plugin's init) is the first
    // thing to know when a run is slow.
    let mut phase = Instant::now();
    let mut lap = |what: &str| {
        tracing::debug!(phase = what, ms = phase.elapsed().as_secs_f64() * 1e3, "tool run");
        phase = Instant::now();
    };
    let runtime =
        Runtime::new(RuntimeOptions { cache_dir: options.cache_dir.clone(), fuel: options.limits.fuel.is_some() })?;
    lap("engine");
    let template = runtime.load_plugin(&options.file, None, options.limits, &options.dirs)?;
    lap("load");
    let state: Box<dyn StateStore> = match &options.state {
        Some(dir) => {
            let store = FjallStore::open(dir, canopy::store::UNLIMITED).map_err(PluginError::from)?;
            Box::new(store.plugin_state("tool").map_err(PluginError::from)?)
        }
        None => Box::new(MemoryState::new()),
    };
    lap("state");
    let mut config = options.config.clone();
    config.insert("args".into(), options.args.iter().cloned().map(serde_json::Value::from).collect());
    let config = serde_json::Value::Object(config).to_string();
    let name = options.file.file_stem().map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    let mut sup = Supervisor::start(&name, template, &config, state, canopy::plugin::system_clock())?;
    lap("init");

    let mut run =
        Run { requests, subscribed: HashSet::new(), replaying: HashSet::new(), acks: 0, progress: Progress::default() };
    run.settle(&mut sup, &mut events, true, &progress)?;
    lap("settle");
    let answer = sup.command(&options.args)?;
    lap("command");
    run.settle(&mut sup, &mut events, false, &progress)?;
    lap("publish");
    Ok(ToolOutcome {
        answer,
        chunks_in: run.progress.chunks_in,
        published: run.progress.published,
        refused: run.progress.refused,
    })
}

struct Run<'a> {
    requests: &'a mpsc::UnboundedSender<Request>,
    /// Filters subscribed at the relay.
    subscribed: HashSet<Filter>,
    /// Subscriptions whose replay has not finished.
    replaying: HashSet<Filter>,
    /// Publishes not yet answered.
    acks: usize,
    progress: Progress,
}

impl Run<'_> {
    fn send(&mut self, sup: &mut Supervisor) -> Result<(), ToolError> {
        if let Some(fault) = sup.is_quarantined().then(|| sup.last_fault().cloned()).flatten() {
            return Err(PluginError::Fault { plugin: sup.name().to_owned(), fault }.into());
        }
        let effects = sup.take_effects();
        if effects.is_empty() {
            return Ok(());
        }
        let mut wanted = Vec::with_capacity(effects.len());
        for effect in effects {
            match &effect {
                Effect::Publish(_) => self.acks += 1,
                Effect::Subscribe(filter) => {
                    if !self.subscribed.insert(*filter) {
                        continue;
                    }
                    self.replaying.insert(*filter);
                }
                Effect::Unsubscribe(filter) => {
                    if !self.subscribed.remove(filter) {
                        continue;
                    }
                    self.replaying.remove(filter);
                }
            }
            wanted.push(effect);
        }
        self.requests.send(Request::Effects(wanted)).map_err(|_| ToolError::Stopped("network side gone".into()))
    }

    /// Runs events until nothing is outstanding: replays, acknowledgements and (with
    /// `timers`) the plugin's timers.
    fn settle(
        &mut self,
        sup: &mut Supervisor,
        events: &mut mpsc::UnboundedReceiver<Event>,
        timers: bool,
        progress: &impl Fn(Progress),
    ) -> Result<(), ToolError> {
        loop {
            self.send(sup)?;
            progress(self.progress);
            let waiting_for_timer = timers && sup.has_timers();
            if self.replaying.is_empty() && self.acks == 0 && !waiting_for_timer && events.is_empty() {
                return Ok(());
            }
            if waiting_for_timer {
                let _ = self.requests.send(Request::Timer(sup.next_timer()));
            }
            let Some(first) = events.blocking_recv() else {
                return Err(ToolError::Stopped("network side gone".into()));
            };
            let mut chunks = Vec::new();
            let mut next = Some(first);
            while let Some(event) = next.take() {
                match event {
                    Event::Chunk(chunk) => chunks.push(chunk),
                    Event::ReplayDone(filter) => {
                        self.replaying.remove(&filter);
                    }
                    Event::Published(accepted) => {
                        self.acks = self.acks.saturating_sub(1);
                        if accepted { self.progress.published += 1 } else { self.progress.refused += 1 }
                    }
                    Event::Tick => {}
                }
                if chunks.len() < 256 {
                    next = events.try_recv().ok();
                }
            }
            self.progress.chunks_in += chunks.len() as u64;
            sup.on_chunks(&chunks);
            if timers {
                sup.fire_timers(now_ms());
            }
        }
    }
}
