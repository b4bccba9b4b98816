//! [`Supervisor`]: runs one plugin, re-creating it when it fails and quarantining it when it
//! keeps failing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::core::HostCore;
use super::state::StateStore;
use super::{Clock, Effect, Fault, FaultKind, Instance, Limits, PluginError, Template};
use crate::{Chunk, Filter};

/// Counters of one supervised plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Callbacks made (init, chunks, timers, commands).
    pub calls: u64,
    /// Chunks delivered to the plugin.
    pub chunks_in: u64,
    /// Chunks the plugin published.
    pub published: u64,
    /// Callbacks that failed (trap, deadline, memory, fuel, panic).
    pub failures: u64,
    /// Times the instance was re-created after a failure.
    pub restarts: u64,
    /// Chunks whose `on-chunks` call failed: they are not delivered again.
    pub chunks_dropped: u64,
    /// Whether the plugin is quarantined.
    pub quarantined: bool,
    /// What the most recent failure was.
    pub last_fault: Option<FaultKind>,
}

/// One plugin under supervision.
///
/// The embedder feeds it chunks ([`Supervisor::on_chunks`]), fires its timers
/// ([`Supervisor::fire_timers`] when [`Supervisor::next_timer`] is due) and runs commands,
/// then carries out [`Supervisor::take_effects`].
///
/// When a callback fails, the instance is torn down, its timers are cancelled and everything
/// the failed callback asked for is dropped; a fresh instance is initialised from the same
/// configuration and the same persisted key/value state. Its subscriptions stay open while
/// that happens, so it misses nothing that arrives meanwhile: those its `init` asks for again
/// simply continue, the others are closed. The chunks of a failed `on-chunks` call are not
/// delivered again (a chunk that crashes the plugin would otherwise crash it forever). After [`Limits::max_failures`] failures
/// within [`Limits::failure_window_ms`] the plugin is quarantined: it stays down, subscribed to
/// nothing, until the embedder replaces it.
pub struct Supervisor {
    name: Arc<str>,
    template: Arc<dyn Template>,
    config: String,
    limits: Limits,
    instance: Option<Box<dyn Instance>>,
    /// The state store and clock while no instance holds them (quarantine).
    parked: Option<(Box<dyn StateStore>, Clock)>,
    failures: VecDeque<u64>,
    /// The filters the embedder has subscribed for the plugin (every `Subscribe` effect not
    /// yet undone by an `Unsubscribe`).
    subscriptions: BTreeSet<Filter>,
    /// While re-creating a failed instance: the subscriptions it held, kept open so that no
    /// chunk arriving meanwhile is missed, and closed only if the new instance does not ask
    /// for them again.
    carried: BTreeSet<Filter>,
    /// Pending timers: due time → ids, and id → due time.
    timers: BTreeMap<u64, BTreeSet<u64>>,
    timer_due: BTreeMap<u64, u64>,
    effects: Vec<Effect>,
    stats: PluginStats,
    last_fault: Option<Fault>,
}

impl Supervisor {
    /// Instantiates the plugin and calls its `init`; fails if `init` refuses the
    /// configuration or the plugin cannot get through `init` at all.
    pub fn start(
        name: &str,
        template: Arc<dyn Template>,
        config: &str,
        state: Box<dyn StateStore>,
        clock: Clock,
    ) -> Result<Self, PluginError> {
        let limits = template.limits();
        let mut sup = Supervisor {
            name: name.into(),
            template,
            config: config.to_owned(),
            limits,
            instance: None,
            parked: Some((state, clock)),
            failures: VecDeque::new(),
            subscriptions: BTreeSet::new(),
            carried: BTreeSet::new(),
            timers: BTreeMap::new(),
            timer_due: BTreeMap::new(),
            effects: Vec::new(),
            stats: PluginStats::default(),
            last_fault: None,
        };
        match sup.boot(true) {
            Ok(()) => Ok(sup),
            Err(Boot::Refused(message)) => Err(PluginError::Init { plugin: name.to_owned(), message }),
            Err(Boot::Fault(fault)) => Err(PluginError::Fault { plugin: name.to_owned(), fault }),
            Err(Boot::Error(err)) => Err(err),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counters.
    pub fn stats(&self) -> PluginStats {
        self.stats
    }

    /// Whether the plugin is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.stats.quarantined
    }

    /// The most recent failure.
    pub fn last_fault(&self) -> Option<&Fault> {
        self.last_fault.as_ref()
    }

    /// The filters the plugin is subscribed to.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Filter> {
        self.subscriptions.iter()
    }

    /// What the plugin asked for since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// When the next timer is due (unix ms).
    pub fn next_timer(&self) -> Option<u64> {
        self.timers.keys().next().copied()
    }

    /// Whether the plugin has timers pending.
    pub fn has_timers(&self) -> bool {
        !self.timer_due.is_empty()
    }

    /// Delivers chunks (the embedder has matched them against [`Supervisor::subscriptions`]).
    pub fn on_chunks(&mut self, chunks: &[Chunk]) {
        if chunks.is_empty() {
            return;
        }
        self.stats.chunks_in += chunks.len() as u64;
        if self.call(|i| i.on_chunks(chunks)).is_err() {
            self.stats.chunks_dropped += chunks.len() as u64;
            tracing::warn!(plugin = %self.name, chunks = chunks.len(), "chunks of the failed call are not delivered again");
        }
    }

    /// Fires every timer due at `now` (unix ms), earliest first.
    pub fn fire_timers(&mut self, now: u64) {
        while let Some(mut entry) = self.timers.first_entry() {
            if *entry.key() > now {
                break;
            }
            let ids = entry.get_mut();
            let id = ids.pop_first().expect("timer sets are never empty");
            if ids.is_empty() {
                entry.remove();
            }
            self.timer_due.remove(&id);
            let _ = self.call(|i| i.on_timer(id));
        }
    }

    /// Runs a command. `Ok` holds the plugin's own answer; a failure or quarantine is an error.
    pub fn command(&mut self, args: &[String]) -> Result<Result<String, String>, PluginError> {
        match self.call(|i| i.on_command(args)) {
            Ok(answer) => Ok(answer),
            Err(None) => Err(PluginError::Quarantined(self.name.to_string())),
            Err(Some(fault)) => Err(PluginError::Fault { plugin: self.name.to_string(), fault }),
        }
    }

    /// Runs one callback; on failure re-creates (or quarantines) the plugin. `Err(None)`
    /// means there was no instance to call.
    fn call<R>(&mut self, f: impl FnOnce(&mut dyn Instance) -> Result<R, Fault>) -> Result<R, Option<Fault>> {
        let instance = self.instance.as_mut().ok_or(None)?;
        self.stats.calls += 1;
        match f(instance.as_mut()) {
            Ok(value) => {
                self.commit();
                Ok(value)
            }
            Err(fault) => {
                self.failed(fault.clone());
                Err(Some(fault))
            }
        }
    }

    fn commit(&mut self) {
        let Some(instance) = self.instance.as_mut() else {
            return;
        };
        let committed = match instance.core().commit() {
            Ok(c) => c,
            Err(err) => {
                // The host's store failed, not the plugin: keep running, say so loudly.
                tracing::error!(plugin = %self.name, %err, "writing plugin state failed; the callback's writes are lost");
                instance.core().discard();
                return;
            }
        };
        for effect in &committed.effects {
            match effect {
                Effect::Publish(_) => self.stats.published += 1,
                Effect::Subscribe(f) => {
                    self.subscriptions.insert(*f);
                }
                Effect::Unsubscribe(f) => {
                    self.subscriptions.remove(f);
                }
            }
        }
        self.effects.extend(committed.effects);
        for (id, due) in committed.timers {
            self.set_timer(id, due);
        }
    }

    fn set_timer(&mut self, id: u64, due: u64) {
        if let Some(old) = self.timer_due.remove(&id)
            && let Some(ids) = self.timers.get_mut(&old)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.timers.remove(&old);
            }
        }
        if self.timer_due.len() >= self.limits.max_timers {
            tracing::warn!(plugin = %self.name, id, "timer refused: {} already pending", self.limits.max_timers);
            return;
        }
        self.timer_due.insert(id, due);
        self.timers.entry(due).or_default().insert(id);
    }

    /// Records a failure, tears the instance down and boots a new one unless the plugin has
    /// failed too often.
    fn failed(&mut self, fault: Fault) {
        if self.instance.is_none() {
            return;
        }
        let clock = self.park();
        self.stats.failures += 1;
        self.stats.last_fault = Some(fault.kind);
        tracing::warn!(plugin = %self.name, kind = ?fault.kind, "plugin failed: {}", fault.message);
        self.last_fault = Some(fault);

        let now = clock();
        self.failures.push_back(now);
        while self.failures.front().is_some_and(|t| now.saturating_sub(*t) > self.limits.failure_window_ms) {
            self.failures.pop_front();
        }
        self.carried.append(&mut self.subscriptions);
        self.timers.clear();
        self.timer_due.clear();
        if self.failures.len() >= self.limits.max_failures as usize {
            self.quarantine();
            return;
        }
        self.stats.restarts += 1;
        match self.boot(false) {
            Ok(()) => {
                tracing::info!(plugin = %self.name, restarts = self.stats.restarts, "plugin re-created from its state")
            }
            Err(Boot::Fault(fault)) => self.failed(fault),
            Err(Boot::Refused(message)) => {
                tracing::error!(plugin = %self.name, %message, "plugin refused its configuration on restart");
                self.quarantine();
            }
            Err(Boot::Error(err)) => {
                tracing::error!(plugin = %self.name, %err, "plugin could not be re-created");
                self.quarantine();
            }
        }
    }

    fn quarantine(&mut self) {
        self.stats.quarantined = true;
        for filter in std::mem::take(&mut self.carried) {
            self.effects.push(Effect::Unsubscribe(filter));
        }
        tracing::error!(
            plugin = %self.name,
            failures = self.failures.len(),
            window_ms = self.limits.failure_window_ms,
            "plugin quarantined after repeated failures; it stays stopped until reloaded"
        );
    }

    /// Makes an instance from the parked state and runs `init`.
    fn boot(&mut self, first: bool) -> Result<(), Boot> {
        let (state, clock) = self.parked.take().expect("state is parked while there is no instance");
        let core = HostCore::new(self.name.clone(), state, self.limits, clock);
        let mut instance = match self.template.instantiate(core) {
            Ok(i) => i,
            Err(err) => return Err(Boot::Error(err)),
        };
        self.stats.calls += 1;
        let result = instance.init(&self.config);
        self.instance = Some(instance);
        match result {
            Ok(Ok(())) => {
                let start = self.effects.len();
                self.commit();
                // Subscriptions carried over from the failed instance are open already.
                let carried = std::mem::take(&mut self.carried);
                let asked = self.effects.split_off(start);
                self.effects.extend(
                    asked.into_iter().filter(|e| !matches!(e, Effect::Subscribe(f) if carried.contains(f))),
                );
                for filter in carried.difference(&self.subscriptions) {
                    self.effects.push(Effect::Unsubscribe(*filter));
                }
                Ok(())
            }
            Ok(Err(message)) => {
                self.park();
                Err(Boot::Refused(message))
            }
            Err(fault) => {
                if first {
                    // Reported to whoever is starting the plugin rather than retried.
                    self.park();
                    self.stats.failures += 1;
                    return Err(Boot::Fault(fault));
                }
                // `failed` takes the instance down again.
                Err(Boot::Fault(fault))
            }
        }
    }

    /// Tears the instance down (dropping what its last callback asked for) and keeps its
    /// state store and clock for the next one; returns the clock.
    fn park(&mut self) -> Clock {
        let mut core = self.instance.take().expect("an instance to park").into_core();
        core.discard();
        let (state, clock) = core.into_parts();
        self.parked = Some((state, clock.clone()));
        clock
    }
}

enum Boot {
    Refused(String),
    Fault(Fault),
    Error(PluginError),
}
