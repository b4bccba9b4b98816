//! [`Supervisor`]: runs one plugin, re-creating it when it fails and quarantining it when it
//! keeps failing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::core::HostCore;
use super::state::StateStore;
use super::{Clock, Effect, Fault, FaultKind, Instance, Limits, PluginError, Template};
use crate::{Chunk, Filter, MAX_CHUNK_DATA, Name};

/// The longest dead-letter filter: the rest of a dead letter's name, at least 64 bits, comes
/// from a hash of the poisoned chunk.
pub const MAX_DEAD_LETTER_LEN: u8 = 64;

/// Counters of one supervised plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Callbacks made (init, chunks, timers, commands).
    pub calls: u64,
    /// Chunks delivered to the plugin.
    pub chunks_in: u64,
    /// Chunks the plugin published.
    pub published: u64,
    /// Failures counted toward quarantine (trap, deadline, memory, fuel, panic). A failed
    /// batch of chunks counts as one failure per chunk that fails on its own when delivered
    /// again (at least one), so a poison chunk costs exactly one failure however it was
    /// batched.
    pub failures: u64,
    /// Times the instance was re-created after a failed callback (a failed batch, and then
    /// each chunk of it that fails on its own, is one each).
    pub restarts: u64,
    /// Chunks not delivered because the plugin was quarantined before it could take them
    /// (including the rest of a failed batch when the plugin is quarantined while its chunks
    /// are delivered again one by one).
    pub chunks_dropped: u64,
    /// Chunks on which the plugin failed on their own (a call with that chunk alone): they are
    /// dropped, logged with their names and, if configured, published as dead letters.
    pub chunks_poisoned: u64,
    /// `on-chunks` calls of more than one chunk that failed, whose chunks were then delivered
    /// again to the re-created plugin one chunk per call, to find the one that fails.
    pub batches_isolated: u64,
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
/// simply continue, the others are closed.
///
/// **Poison chunks.** When an `on-chunks` call of several chunks fails, the re-created
/// instance is handed every chunk of that batch again, one chunk per call. A chunk that fails
/// on its own is *poisoned*: it is dropped, logged with its name, counted
/// ([`PluginStats::chunks_poisoned`]) and, with a dead-letter filter
/// ([`Supervisor::set_dead_letter`]), published as a dead letter ([`dead_letter`]). A call of
/// one chunk that fails poisons that chunk at once. Toward quarantine, a failed batch costs
/// one failure per poisoned chunk, or one if none of its chunks fails alone; so does the
/// same chunk arriving alone. After [`Limits::max_failures`] failures within
/// [`Limits::failure_window_ms`] the plugin is quarantined: it stays down, subscribed to
/// nothing, until the embedder replaces it.
///
/// **Native deadlines.** A native callback cannot be interrupted. [`Supervisor::watch`] lets
/// a watchdog on another thread see one that runs past its deadline and give up on it
/// ([`CallWatch::abandon`]); when (if ever) it returns, the plugin is quarantined.
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
    clock: Clock,
    watch: Arc<CallWatch>,
    dead_letter: Option<Filter>,
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
        let watched = (!template.interruptible()).then(|| limits.deadline());
        let mut sup = Supervisor {
            name: name.into(),
            template,
            config: config.to_owned(),
            limits,
            instance: None,
            parked: Some((state, clock.clone())),
            failures: VecDeque::new(),
            subscriptions: BTreeSet::new(),
            carried: BTreeSet::new(),
            timers: BTreeMap::new(),
            timer_due: BTreeMap::new(),
            effects: Vec::new(),
            stats: PluginStats::default(),
            last_fault: None,
            clock,
            watch: Arc::new(CallWatch::new(watched)),
            dead_letter: None,
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

    /// The watch on this plugin's callbacks, for a watchdog on another thread.
    pub fn watch(&self) -> Arc<CallWatch> {
        self.watch.clone()
    }

    /// Publishes every poisoned chunk as a dead letter under `filter` ([`dead_letter`]), or
    /// nothing (`None`, the default). The filter may be at most /64
    /// ([`MAX_DEAD_LETTER_LEN`]).
    pub fn set_dead_letter(&mut self, filter: Option<Filter>) -> Result<(), PluginError> {
        if let Some(f) = filter
            && f.prefix_len() > MAX_DEAD_LETTER_LEN
        {
            return Err(PluginError::Unsupported(format!(
                "dead-letter filter {f} is longer than /{MAX_DEAD_LETTER_LEN}; dead letters need at least 64 bits of their own"
            )));
        }
        self.dead_letter = filter;
        Ok(())
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
    ///
    /// If a call of several chunks fails, they are delivered again one per call to the
    /// re-created instance; a chunk that fails alone is poisoned (see [`Supervisor`]).
    pub fn on_chunks(&mut self, chunks: &[Chunk]) {
        if chunks.is_empty() {
            return;
        }
        self.stats.chunks_in += chunks.len() as u64;
        if let [chunk] = chunks {
            self.deliver_alone(chunk);
            return;
        }
        match self.call(Count::Deferred, |i| i.on_chunks(chunks)) {
            Ok(()) => return,
            Err(None) => {
                self.dropped(chunks.len());
                return;
            }
            Err(Some(_)) => {}
        }
        self.stats.batches_isolated += 1;
        tracing::info!(plugin = %self.name, chunks = chunks.len(), "an on-chunks call failed; delivering its chunks again one per call");
        let poisoned = self.stats.chunks_poisoned;
        for (delivered, chunk) in chunks.iter().enumerate() {
            if self.instance.is_none() {
                self.dropped(chunks.len() - delivered);
                return;
            }
            self.deliver_alone(chunk);
        }
        if self.stats.chunks_poisoned == poisoned && self.instance.is_some() {
            // Every chunk went through alone: the batch's failure counts once.
            self.count_failure_live();
        }
    }

    /// One call with one chunk; a failure poisons the chunk.
    fn deliver_alone(&mut self, chunk: &Chunk) {
        let name = chunk.name();
        let result = self.call(Count::Now, |i| {
            i.on_chunks(std::slice::from_ref(chunk))
                .map_err(|fault| Fault { kind: fault.kind, message: format!("on chunk {name}: {}", fault.message) })
        });
        match result {
            Ok(()) => {}
            Err(None) => self.dropped(1),
            Err(Some(fault)) => {
                self.stats.chunks_poisoned += 1;
                tracing::warn!(plugin = %self.name, chunk = %name, kind = ?fault.kind, "poison chunk dropped: the plugin fails on it alone");
                if let Some(filter) = self.dead_letter {
                    self.effects.push(Effect::Publish(dead_letter(filter, chunk)));
                }
            }
        }
    }

    fn dropped(&mut self, chunks: usize) {
        self.stats.chunks_dropped += chunks as u64;
        tracing::warn!(plugin = %self.name, chunks, "chunks dropped: the plugin is quarantined");
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
            let _ = self.call(Count::Now, |i| i.on_timer(id));
        }
    }

    /// Runs a command. `Ok` holds the plugin's own answer; a failure or quarantine is an error.
    pub fn command(&mut self, args: &[String]) -> Result<Result<String, String>, PluginError> {
        match self.call(Count::Now, |i| i.on_command(args)) {
            Ok(answer) => Ok(answer),
            Err(None) => Err(PluginError::Quarantined(self.name.to_string())),
            Err(Some(fault)) => Err(PluginError::Fault { plugin: self.name.to_string(), fault }),
        }
    }

    /// Runs one callback; on failure re-creates (or quarantines) the plugin, counting the
    /// failure as `count` says. `Err(None)` means there was no instance to call.
    fn call<R>(
        &mut self,
        count: Count,
        f: impl FnOnce(&mut dyn Instance) -> Result<R, Fault>,
    ) -> Result<R, Option<Fault>> {
        let instance = self.instance.as_mut().ok_or(None)?;
        self.stats.calls += 1;
        self.watch.enter();
        let result = f(instance.as_mut());
        self.watch.leave();
        if self.watch.is_abandoned() {
            let fault = Fault {
                kind: FaultKind::Deadline,
                message: format!(
                    "a native callback ran past its deadline of {} ms; native code cannot be interrupted, so the plugin was abandoned",
                    self.limits.deadline_ms
                ),
            };
            self.abandoned(fault.clone());
            return Err(Some(fault));
        }
        match result {
            Ok(value) => {
                self.commit();
                Ok(value)
            }
            Err(fault) => {
                self.failed(fault.clone(), count);
                Err(Some(fault))
            }
        }
    }

    /// A watchdog gave up on a callback that has now returned: quarantine, no restart.
    fn abandoned(&mut self, fault: Fault) {
        if self.instance.is_none() {
            return;
        }
        self.park();
        self.stats.failures += 1;
        self.stats.last_fault = Some(fault.kind);
        tracing::error!(plugin = %self.name, "{}", fault.message);
        self.last_fault = Some(fault);
        self.carried.append(&mut self.subscriptions);
        self.timers.clear();
        self.timer_due.clear();
        self.quarantine();
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
    fn failed(&mut self, fault: Fault, count: Count) {
        if self.instance.is_none() {
            return;
        }
        self.park();
        self.stats.last_fault = Some(fault.kind);
        tracing::warn!(plugin = %self.name, kind = ?fault.kind, "plugin failed: {}", fault.message);
        self.last_fault = Some(fault);
        self.carried.append(&mut self.subscriptions);
        self.timers.clear();
        self.timer_due.clear();
        if count == Count::Now && self.count_failure() {
            self.quarantine();
            return;
        }
        self.stats.restarts += 1;
        match self.boot(false) {
            Ok(()) => {
                tracing::info!(plugin = %self.name, restarts = self.stats.restarts, "plugin re-created from its state")
            }
            Err(Boot::Fault(fault)) => self.failed(fault, Count::Now),
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

    /// Counts one failure toward quarantine; true when the plugin has now failed too often.
    fn count_failure(&mut self) -> bool {
        self.stats.failures += 1;
        let now = (self.clock)();
        self.failures.push_back(now);
        while self.failures.front().is_some_and(|t| now.saturating_sub(*t) > self.limits.failure_window_ms) {
            self.failures.pop_front();
        }
        self.failures.len() >= self.limits.max_failures as usize
    }

    /// Counts a failure whose callback is over while an instance runs (a failed batch whose
    /// chunks all went through alone); quarantines the plugin if it has failed too often.
    fn count_failure_live(&mut self) {
        if self.count_failure() {
            self.park();
            self.carried.append(&mut self.subscriptions);
            self.timers.clear();
            self.timer_due.clear();
            self.quarantine();
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
        self.watch.enter();
        let result = instance.init(&self.config);
        self.watch.leave();
        self.instance = Some(instance);
        if self.watch.is_abandoned() {
            self.park();
            return Err(Boot::Error(PluginError::Quarantined(self.name.to_string())));
        }
        match result {
            Ok(Ok(())) => {
                let start = self.effects.len();
                self.commit();
                // Subscriptions carried over from the failed instance are open already.
                let carried = std::mem::take(&mut self.carried);
                let asked = self.effects.split_off(start);
                self.effects
                    .extend(asked.into_iter().filter(|e| !matches!(e, Effect::Subscribe(f) if carried.contains(f))));
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
    /// state store and clock for the next one.
    fn park(&mut self) {
        let mut core = self.instance.take().expect("an instance to park").into_core();
        core.discard();
        self.parked = Some(core.into_parts());
    }
}

/// How a failed callback counts toward quarantine.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    /// One failure, now.
    Now,
    /// Not yet: a failed batch counts once its chunks have been delivered again one by one.
    Deferred,
}

/// The dead letter for a chunk the plugin failed on: published under `filter`, with
/// - as name, the filter's prefix and, below it, bits of the SHA-256 of the poisoned chunk
///   (of its name, expiry in big-endian, and data): the last `128 - len` bits of the digest's
///   first 16 bytes, so the same poisoned chunk always makes the same dead letter and
///   republishing it is harmless;
/// - as expiry, the poisoned chunk's;
/// - as data, the poisoned chunk's name (16 bytes, big-endian) followed by its data, cut to
///   the 1024 bytes a chunk holds (the last 16 bytes of a chunk over 1008 bytes are lost).
pub fn dead_letter(filter: Filter, chunk: &Chunk) -> Chunk {
    let mut hash = Sha256::new();
    hash.update(chunk.name().to_bytes());
    hash.update(chunk.expiry().to_be_bytes());
    hash.update(chunk.data());
    let digest = hash.finalize();
    let low = u128::from_be_bytes(digest[..16].try_into().expect("a SHA-256 digest has 32 bytes"));
    let name = Name::new(filter.name().to_u128() | (low & !filter.mask()));
    let mut data = Vec::with_capacity(MAX_CHUNK_DATA);
    data.extend_from_slice(&chunk.name().to_bytes());
    let room = MAX_CHUNK_DATA - data.len();
    data.extend_from_slice(&chunk.data()[..chunk.data().len().min(room)]);
    Chunk::new(name, chunk.expiry(), data).expect("a dead letter's data fits a chunk")
}

/// Shows a watchdog on another thread whether a plugin's callback is running past its
/// deadline. Native callbacks cannot be interrupted; Wasm ones are, so for them
/// [`CallWatch::deadline`] is `None` and the watch never reports an overrun.
///
/// The supervisor bumps a counter as each callback starts and ends (two atomic adds, no
/// clock reading); a watchdog looks at it now and then with [`CallWatch::overran`], which
/// reports a callback it has seen running for longer than the deadline.
#[derive(Debug)]
pub struct CallWatch {
    /// Odd while a callback runs: bumped as each callback starts and as it ends.
    calls: AtomicU64,
    abandoned: AtomicBool,
    deadline: Option<Duration>,
}

/// What a watchdog remembers of one [`CallWatch`] between its looks.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchMark {
    calls: u64,
    since: Option<Instant>,
}

impl CallWatch {
    fn new(deadline: Option<Duration>) -> Self {
        CallWatch { calls: AtomicU64::new(0), abandoned: AtomicBool::new(false), deadline }
    }

    fn enter(&self) {
        self.calls.fetch_add(1, Ordering::Release);
    }

    fn leave(&self) {
        self.calls.fetch_add(1, Ordering::Release);
    }

    /// The deadline a watchdog enforces, or `None` when callbacks interrupt themselves.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// Looks at the watch at `now`: true when the callback running now was already running
    /// at an earlier look (remembered in `mark`) more than the deadline ago. Looking every
    /// tick reports an overrun between the deadline and the deadline plus one tick.
    pub fn overran(&self, mark: &mut WatchMark, now: Instant) -> bool {
        let Some(deadline) = self.deadline else { return false };
        let calls = self.calls.load(Ordering::Acquire);
        if calls.is_multiple_of(2) {
            mark.since = None;
            return false;
        }
        match mark.since {
            Some(since) if mark.calls == calls => now.saturating_duration_since(since) > deadline,
            _ => {
                *mark = WatchMark { calls, since: Some(now) };
                false
            }
        }
    }

    /// Gives up on the plugin: when its callback returns (if ever), the plugin is quarantined
    /// rather than called again. True the first time only.
    pub fn abandon(&self) -> bool {
        !self.abandoned.swap(true, Ordering::AcqRel)
    }

    /// Whether [`CallWatch::abandon`] was called.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }
}

enum Boot {
    Refused(String),
    Fault(Fault),
    Error(PluginError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_reports_only_a_callback_it_saw_running_past_the_deadline() {
        let ms = Duration::from_millis;
        let watch = CallWatch::new(Some(ms(100)));
        let t0 = Instant::now();
        let mut mark = WatchMark::default();
        assert!(!watch.overran(&mut mark, t0), "idle");
        watch.enter();
        assert!(!watch.overran(&mut mark, t0), "first seen running");
        assert!(!watch.overran(&mut mark, t0 + ms(100)));
        assert!(watch.overran(&mut mark, t0 + ms(101)));
        watch.leave();
        watch.enter();
        assert!(!watch.overran(&mut mark, t0 + ms(500)), "another callback, first seen now");
        watch.leave();
        assert!(!watch.overran(&mut mark, t0 + ms(1000)), "idle again");
        assert!(watch.abandon());
        assert!(!watch.abandon(), "only the first abandon reports");
        assert!(watch.is_abandoned());

        let interruptible = CallWatch::new(None);
        interruptible.enter();
        assert!(!interruptible.overran(&mut WatchMark::default(), t0));
        assert!(!interruptible.overran(&mut WatchMark::default(), t0 + ms(1_000_000)));
    }

    #[test]
    fn a_dead_letter_keeps_the_filter_prefix_and_cuts_long_data() {
        let filter: Filter = "0xdead0000000000000000000000000000/16".parse().unwrap();
        let full = Chunk::new(Name::new(7), 99, vec![0xab; MAX_CHUNK_DATA]).unwrap();
        let letter = dead_letter(filter, &full);
        assert!(filter.matches(letter.name()));
        assert_eq!(letter.expiry(), 99);
        assert_eq!(letter.data().len(), MAX_CHUNK_DATA);
        assert_eq!(&letter.data()[..16], &Name::new(7).to_bytes());
        let other = Chunk::new(Name::new(8), 99, vec![0xab; MAX_CHUNK_DATA]).unwrap();
        assert_ne!(dead_letter(filter, &other).name(), letter.name());
    }
}
