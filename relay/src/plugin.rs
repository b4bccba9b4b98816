//! Plugins loaded from the relay's config, each on a thread of its own, attached to the node
//! as a local link.
//!
//! To the routing core a plugin is one more link: it says `Hello`, subscribes, publishes and
//! is delivered chunks like any client, under the same access rules and flow control. Its
//! thread turns the plugin's [`Effect`]s into frames for the node actor and the frames the
//! node queued for it into batched `on-chunks` calls, fires its timers, and runs commands
//! sent through [`RelayHandle::plugin_command`](crate::RelayHandle::plugin_command). A plugin
//! that falls behind gets `SlowConsumer` like any subscriber and resubscribes, catching up
//! from the cache. Callbacks run off the node's thread, so a slow or stuck plugin never
//! delays the relay; the supervisor re-creates or quarantines it. Native callbacks cannot be
//! interrupted: a [`watchdog`] quarantines a native plugin whose callback overruns its
//! deadline, closes its link and abandons its thread, which shutdown then does not wait for.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use canopy::node::LinkId;
use canopy::plugin::{
    CallWatch, Effect, FaultKind, PluginError, PluginStats, Runtime, RuntimeOptions, StateStore, Supervisor, WatchMark,
    system_clock,
};
use canopy::wire::{ErrorCode, Frame, PROTOCOL_VERSION, ReplayMode, Role};
use canopy::{Chunk, Filter};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::actor::{ToNode, now_ms};
use crate::config::PluginConfig;
use crate::link::Outlet;

/// Frames a plugin's inbox holds at most before the node stops draining into it.
const INBOX_CAPACITY: usize = 1024;
/// Chunks handed to one `on-chunks` call at most.
const BATCH: usize = 256;
/// Each plugin subscription's credit window: deliveries the node may queue ahead of what the
/// plugin has processed. Credit is returned after each batch is handed to the plugin.
const WINDOW: u32 = INBOX_CAPACITY as u32;

/// A command on its way to a plugin, with where to send the answer.
type Command = (Vec<String>, oneshot::Sender<anyhow::Result<Result<String, String>>>);

/// How often the watchdog looks at native plugins' callbacks.
const WATCHDOG_TICK: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Inbox {
    frames: VecDeque<Frame>,
    commands: VecDeque<Command>,
    closing: bool,
    stop: bool,
    /// Testing aid: hold chunks until this many have arrived, then hand them over in one call.
    hold: usize,
    /// The watchdog gave up on the plugin (a native callback overran its deadline).
    abandoned: bool,
}

/// The node's side of a plugin link: frames queued for the plugin, plus its commands.
pub(crate) struct PluginOut {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    /// Tells the node actor the plugin took frames, so it may drain more.
    room: Arc<Notify>,
    /// Wakes commands waiting for an answer when the plugin's thread is abandoned.
    gone: Notify,
}

impl PluginOut {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().expect("plugin inbox lock")
    }

    /// Asks the plugin's thread to stop.
    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }

    /// The watchdog gave up on the plugin: nothing more is queued for it, and queued and
    /// running commands fail.
    fn abandon(&self, name: &str) {
        let commands = {
            let mut inbox = self.lock();
            inbox.abandoned = true;
            inbox.closing = true;
            inbox.frames.clear();
            std::mem::take(&mut inbox.commands)
        };
        for (_, reply) in commands {
            let _ = reply.send(Err(PluginError::Quarantined(name.to_owned()).into()));
        }
        self.gone.notify_waiters();
    }
}

impl Outlet for PluginOut {
    fn room(&self) -> usize {
        let inbox = self.lock();
        if inbox.closing { 0 } else { INBOX_CAPACITY.saturating_sub(inbox.frames.len()) }
    }

    fn queue(&self, frames: Vec<Frame>) -> bool {
        let mut inbox = self.lock();
        if inbox.closing || frames.is_empty() {
            return false;
        }
        inbox.frames.extend(frames);
        true
    }

    fn wake(&self) {
        self.wake.notify_one();
    }

    fn close(&self, frames: Vec<Frame>, code: ErrorCode) {
        let mut inbox = self.lock();
        if inbox.closing {
            return;
        }
        inbox.frames.extend(frames);
        inbox.closing = true;
        drop(inbox);
        tracing::debug!(%code, "plugin link closed by the node");
        self.wake.notify_one();
    }
}

/// A running relay plugin, as the relay handle keeps it.
pub(crate) struct RunningPlugin {
    pub name: String,
    link: LinkId,
    out: Arc<PluginOut>,
    stats: Arc<Mutex<PluginStats>>,
    watch: Arc<CallWatch>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the plugin's thread ends.
    done: std::sync::mpsc::Receiver<()>,
}

impl RunningPlugin {
    pub(crate) fn stats(&self) -> PluginStats {
        *self.stats.lock().expect("plugin stats lock")
    }

    /// Runs a command on the plugin's thread.
    pub(crate) async fn command(&self, args: Vec<String>) -> anyhow::Result<Result<String, String>> {
        let (tx, rx) = oneshot::channel();
        let gone = self.out.gone.notified();
        {
            let mut inbox = self.out.lock();
            if inbox.abandoned {
                return Err(PluginError::Quarantined(self.name.clone()).into());
            }
            anyhow::ensure!(!inbox.stop && !inbox.closing, "plugin {} has stopped", self.name);
            inbox.commands.push_back((args, tx));
        }
        self.out.wake.notify_one();
        tokio::select! {
            answer = rx => answer.with_context(|| format!("plugin {} stopped before answering", self.name))?,
            // The command may be the one stuck in the plugin: it never answers.
            () = gone => Err(PluginError::Quarantined(self.name.clone()).into()),
        }
    }

    /// Testing aid: the plugin's next `chunks` chunks (at most 256) are handed to it
    /// in one `on-chunks` call, however they arrive.
    pub(crate) fn hold_chunks(&self, chunks: usize) {
        self.out.lock().hold = chunks.min(BATCH);
    }

    /// The shared counters, for the metrics endpoint.
    pub(crate) fn stats_handle(&self) -> (String, Arc<Mutex<PluginStats>>) {
        (self.name.clone(), self.stats.clone())
    }

    /// Stops the thread and waits for it (at most one callback deadline plus a little): a
    /// Wasm callback is interrupted at its deadline, while the thread of a native plugin
    /// whose callback overruns it is abandoned, never joined.
    pub(crate) fn stop(&mut self) {
        self.out.stop();
        let Some(thread) = self.thread.take() else { return };
        let mut mark = WatchMark::default();
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(WATCHDOG_TICK) {
            if self.watch.is_abandoned() || self.watch.overran(&mut mark, Instant::now()) {
                self.watch.abandon();
                tracing::warn!(plugin = %self.name, "not waiting for the plugin's stuck thread");
                return;
            }
        }
        let _ = thread.join();
    }
}

/// A plugin whose handle is dropped (the relay stopping, or failing to start) is asked to
/// stop; [`RunningPlugin::stop`] also waits for it.
impl Drop for RunningPlugin {
    fn drop(&mut self) {
        self.out.stop();
    }
}

/// A plugin the watchdog looks after.
struct Watched {
    name: String,
    link: LinkId,
    out: Arc<PluginOut>,
    stats: Arc<Mutex<PluginStats>>,
    watch: Arc<CallWatch>,
    mark: WatchMark,
}

/// The watchdog of the native plugins among `plugins` (`None` if there are none): every
/// 5 ms it looks at their callbacks, and when one has been running past its plugin's
/// deadline, it reports it, quarantines the plugin, closes its link (dropping its
/// subscriptions), fails its commands and abandons its thread. Native code cannot be
/// interrupted, so that thread stays stuck for as long as the callback runs.
pub(crate) fn watchdog(
    plugins: &[RunningPlugin],
    to_node: mpsc::Sender<ToNode>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut watched: Vec<Watched> = plugins
        .iter()
        .filter(|p| p.watch.deadline().is_some())
        .map(|p| Watched {
            name: p.name.clone(),
            link: p.link,
            out: p.out.clone(),
            stats: p.stats.clone(),
            watch: p.watch.clone(),
            mark: WatchMark::default(),
        })
        .collect();
    if watched.is_empty() {
        return None;
    }
    Some(async move {
        let mut tick = tokio::time::interval(WATCHDOG_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !watched.is_empty() {
            tick.tick().await;
            let now = Instant::now();
            let mut i = 0;
            while i < watched.len() {
                let w = &mut watched[i];
                if !w.watch.overran(&mut w.mark, now) && !w.watch.is_abandoned() {
                    i += 1;
                    continue;
                }
                let w = watched.swap_remove(i);
                if !w.watch.abandon() {
                    continue; // Shutdown gave up on it already.
                }
                let deadline_ms = w.watch.deadline().unwrap_or_default().as_millis();
                tracing::error!(
                    plugin = %w.name,
                    deadline_ms,
                    "a native plugin callback overran its deadline; native code cannot be interrupted, so the plugin is quarantined and its thread abandoned"
                );
                {
                    let mut stats = w.stats.lock().expect("plugin stats lock");
                    stats.failures += 1;
                    stats.quarantined = true;
                    stats.last_fault = Some(FaultKind::Deadline);
                }
                w.out.abandon(&w.name);
                let _ = to_node.send(ToNode::Closed { link: w.link }).await;
            }
        }
    })
}

/// What loading plugins needs from the relay.
pub(crate) struct Host<'a> {
    pub to_node: mpsc::Sender<ToNode>,
    pub room: Arc<Notify>,
    pub link_id: &'a dyn Fn() -> LinkId,
}

/// Loads and starts every configured plugin, in order, with the state `state` gives each
/// name. Compiled Wasm is cached in `cache`. A plugin that cannot load or refuses its
/// configuration fails the whole start (those already started are stopped as they drop).
pub(crate) fn start_all(
    plugins: &[PluginConfig],
    cache: &Path,
    host: &Host<'_>,
    state: impl Fn(&str) -> anyhow::Result<Box<dyn StateStore>>,
) -> anyhow::Result<Vec<RunningPlugin>> {
    if plugins.is_empty() {
        return Ok(Vec::new());
    }
    let fuel = plugins.iter().any(|p| p.limits.fuel.is_some());
    let runtime = Runtime::new(RuntimeOptions { cache_dir: Some(cache.to_owned()), fuel })?;
    plugins.iter().map(|config| start(config, state(&config.name())?, &runtime, host)).collect()
}

/// Loads a plugin, starts it on its own thread and waits for its `init`.
fn start(
    config: &PluginConfig,
    state: Box<dyn StateStore>,
    runtime: &Runtime,
    host: &Host<'_>,
) -> anyhow::Result<RunningPlugin> {
    let name = config.name();
    let template = runtime.load_plugin(&config.file, Some(config.kind()), config.limits, &config.dirs)?;
    let out = Arc::new(PluginOut {
        inbox: Mutex::default(),
        wake: Condvar::new(),
        room: host.room.clone(),
        gone: Notify::new(),
    });
    let stats = Arc::new(Mutex::new(PluginStats::default()));
    let link = (host.link_id)();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let dead_letter = config.dead_letter_filter()?;
    let driver = Driver {
        name: name.clone(),
        link,
        out: out.clone(),
        to_node: host.to_node.clone(),
        stats: stats.clone(),
        token: config.token.clone(),
        subs: HashMap::new(),
        next_id: 1,
        next_seq: 1,
    };
    let init = config.config_json();
    let thread = std::thread::Builder::new().name(format!("plugin-{name}")).spawn(move || {
        let _done = done_tx;
        let started = Supervisor::start(&driver.name, template, &init, state, system_clock())
            .and_then(|mut sup| sup.set_dead_letter(dead_letter).map(|()| sup));
        match started {
            Ok(sup) => {
                let _ = started_tx.send(Ok(sup.watch()));
                driver.run(sup);
            }
            Err(err) => {
                let _ = started_tx.send(Err(err));
            }
        }
    })?;
    match started_rx.recv() {
        Ok(Ok(watch)) => {
            tracing::info!(plugin = %name, file = %config.file.display(), "plugin started");
            Ok(RunningPlugin { name, link, out, stats, watch, thread: Some(thread), done })
        }
        Ok(Err(err)) => Err(err).with_context(|| format!("starting plugin {name}")),
        Err(_) => anyhow::bail!("plugin {name} stopped while starting"),
    }
}

/// The plugin's thread.
struct Driver {
    name: String,
    link: LinkId,
    out: Arc<PluginOut>,
    to_node: mpsc::Sender<ToNode>,
    stats: Arc<Mutex<PluginStats>>,
    token: Option<String>,
    /// Subscription id → filter, for the plugin's live subscriptions.
    subs: HashMap<u64, Filter>,
    next_id: u64,
    next_seq: u64,
}

impl Driver {
    fn send(&self, frames: Vec<Frame>) -> bool {
        frames.is_empty() || self.to_node.blocking_send(ToNode::Frames { link: self.link, frames }).is_ok()
    }

    fn subscribe(&mut self, filter: Filter) -> Frame {
        let id = self.next_id;
        self.next_id += 1;
        self.subs.insert(id, filter);
        Frame::Subscribe { id, filter, mode: ReplayMode::CachedAndLive, credit: WINDOW }
    }

    /// Turns the plugin's effects into frames for the node.
    fn frames(&mut self, effects: Vec<Effect>) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(effects.len());
        for effect in effects {
            match effect {
                Effect::Publish(chunk) => {
                    frames.push(Frame::Publish { seq: self.next_seq, chunk });
                    self.next_seq += 1;
                }
                Effect::Subscribe(filter) => {
                    if !self.subs.values().any(|f| *f == filter) {
                        frames.push(self.subscribe(filter));
                    }
                }
                Effect::Unsubscribe(filter) => {
                    let ids: Vec<u64> = self.subs.iter().filter(|(_, f)| **f == filter).map(|(id, _)| *id).collect();
                    for id in ids {
                        self.subs.remove(&id);
                        frames.push(Frame::Unsubscribe { id });
                    }
                }
            }
        }
        frames
    }

    fn run(mut self, mut sup: Supervisor) {
        let out: Arc<dyn Outlet> = self.out.clone();
        let hello = Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: Vec::new(), token: self.token.clone() };
        if self.to_node.blocking_send(ToNode::Accepted { link: self.link, out }).is_err() || !self.send(vec![hello]) {
            return;
        }
        let mut was_quarantined = false;
        let watch = sup.watch();
        // Chunks held back while the testing aid `hold` asks for one call of many.
        let mut held: Vec<Chunk> = Vec::new();
        let mut hold = 0;
        loop {
            if watch.is_abandoned() {
                // The watchdog quarantined the plugin and closed its link meanwhile.
                return;
            }
            // Counters first: whoever sees the effects may look at them.
            let stats = sup.stats();
            *self.stats.lock().expect("plugin stats lock") = stats;
            if stats.quarantined && !was_quarantined {
                was_quarantined = true;
                tracing::error!(plugin = %self.name, "plugin quarantined; its subscriptions are dropped");
            }
            let effects = sup.take_effects();
            let frames = self.frames(effects);
            if !self.send(frames) {
                return;
            }

            let (frames, commands, closing, hold_next) = match self.wait(sup.next_timer()) {
                Some(taken) => taken,
                None => return,
            };
            if hold_next > 0 {
                hold = hold_next;
            }
            let mut chunks: Vec<Chunk> = Vec::new();
            let mut resubscribe = Vec::new();
            let mut spent: HashMap<u64, u32> = HashMap::new();
            for frame in frames {
                match frame {
                    Frame::Deliver { id, chunk } if self.subs.contains_key(&id) => {
                        *spent.entry(id).or_default() += 1;
                        chunks.push(chunk);
                    }
                    Frame::Error { code: ErrorCode::SlowConsumer, about: Some(id), .. } => {
                        if let Some(filter) = self.subs.remove(&id) {
                            tracing::warn!(plugin = %self.name, %filter, "plugin fell behind; catching up from the cache");
                            resubscribe.push(self.subscribe(filter));
                        }
                    }
                    Frame::Error { code, about, message } => {
                        tracing::warn!(plugin = %self.name, %code, ?about, %message, "the relay refused a plugin request");
                    }
                    _ => {}
                }
            }
            if !self.send(resubscribe) {
                return;
            }
            if hold > 0 || !held.is_empty() {
                held.extend(chunks);
                if held.len() < hold {
                    chunks = Vec::new();
                } else {
                    chunks = std::mem::take(&mut held);
                    hold = 0;
                }
            }
            for batch in chunks.chunks(BATCH) {
                sup.on_chunks(batch);
            }
            // Processed: the room they took is free again.
            let credit = spent.into_iter().filter(|(id, _)| self.subs.contains_key(id));
            if !self.send(credit.map(|(id, credit)| Frame::Credit { id, credit }).collect()) {
                return;
            }
            sup.fire_timers(now_ms());
            for (args, reply) in commands {
                // Counters before answers too: whoever gets an answer may look at them.
                *self.stats.lock().expect("plugin stats lock") = sup.stats();
                let answer = sup.command(&args).map_err(anyhow::Error::from);
                *self.stats.lock().expect("plugin stats lock") = sup.stats();
                let _ = reply.send(answer);
            }
            if closing {
                tracing::info!(plugin = %self.name, "plugin link closed; plugin stopped");
                return;
            }
        }
    }

    /// Waits until there are frames or commands, a timer is due, or the plugin must stop
    /// (`None`). Returns what was taken, whether the link is closing and how many chunks to
    /// hold for one call (0: none asked for since the last time).
    fn wait(&self, next_timer: Option<u64>) -> Option<(Vec<Frame>, Vec<Command>, bool, usize)> {
        let mut inbox = self.out.lock();
        loop {
            if inbox.stop {
                return None;
            }
            if !inbox.frames.is_empty() || !inbox.commands.is_empty() || inbox.closing {
                break;
            }
            let now = now_ms();
            let timeout = match next_timer {
                Some(due) if due <= now => break,
                Some(due) => Duration::from_millis(due - now),
                None => Duration::from_secs(3600),
            };
            inbox = self.out.wake.wait_timeout(inbox, timeout).expect("plugin inbox lock").0;
        }
        let take = inbox.frames.len().min(INBOX_CAPACITY);
        let frames: Vec<Frame> = inbox.frames.drain(..take).collect();
        let commands = inbox.commands.drain(..).collect();
        let closing = inbox.closing && inbox.frames.is_empty();
        let hold = std::mem::take(&mut inbox.hold);
        drop(inbox);
        self.out.room.notify_one();
        Some((frames, commands, closing, hold))
    }
}

/// Plugin counters by name, for the metrics endpoint.
pub(crate) type Board = Vec<(String, Arc<Mutex<PluginStats>>)>;
