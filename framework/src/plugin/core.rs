//! [`HostCore`]: the host side of one plugin instance, shared by the Wasm and native hosts.

use std::sync::Arc;

use super::state::{Overlay, StateStore};
use super::{Clock, Effect, Limits};
use crate::{Chunk, Filter, Name, StoreError};

/// The most entries one `kv-scan-prefix` call returns.
const MAX_SCAN: usize = 1024;

/// The host side of a plugin instance: what its imports do.
///
/// Everything a callback asks for is held here until the callback returns; the
/// [`Supervisor`](super::Supervisor) then commits it (effects out, timers set, key/value
/// writes applied) or, if the callback failed, drops it.
pub struct HostCore {
    name: Arc<str>,
    state: Overlay,
    effects: Vec<Effect>,
    timers: Vec<(u64, u64)>,
    published: usize,
    limits: Limits,
    clock: Clock,
}

/// What a callback that returned normally asked for.
pub(crate) struct Committed {
    pub effects: Vec<Effect>,
    /// `(timer id, due time in unix ms)`, in the order they were set.
    pub timers: Vec<(u64, u64)>,
}

impl HostCore {
    pub(crate) fn new(name: Arc<str>, state: Box<dyn StateStore>, limits: Limits, clock: Clock) -> Self {
        HostCore {
            name,
            state: Overlay::new(state),
            effects: Vec::new(),
            timers: Vec::new(),
            published: 0,
            limits,
            clock,
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn publish(&mut self, name: Name, expiry_ms: u64, data: Vec<u8>) -> Result<(), String> {
        if self.published >= self.limits.max_publish {
            return Err(format!("more than {} chunks published in one callback", self.limits.max_publish));
        }
        let chunk = Chunk::new(name, expiry_ms, data).map_err(|e| e.to_string())?;
        self.published += 1;
        self.effects.push(Effect::Publish(chunk));
        Ok(())
    }

    pub(crate) fn subscribe(&mut self, name: Name, len: u8) -> Result<(), String> {
        let filter = Filter::new(name, len).map_err(|e| e.to_string())?;
        self.effects.push(Effect::Subscribe(filter));
        Ok(())
    }

    pub(crate) fn unsubscribe(&mut self, name: Name, len: u8) {
        if let Ok(filter) = Filter::new(name, len) {
            self.effects.push(Effect::Unsubscribe(filter));
        }
    }

    fn state_failed(&self, what: &str, err: &StoreError) {
        tracing::error!(plugin = %self.name, %err, "plugin state {what} failed");
    }

    pub(crate) fn kv_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.state.get(key).unwrap_or_else(|err| {
            self.state_failed("read", &err);
            None
        })
    }

    pub(crate) fn kv_put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        self.state.put(key, value)
    }

    pub(crate) fn kv_delete(&mut self, key: &[u8]) {
        self.state.delete(key)
    }

    pub(crate) fn kv_scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        let limit = (limit as usize).min(MAX_SCAN);
        self.state.scan(prefix, after, limit).unwrap_or_else(|err| {
            self.state_failed("scan", &err);
            Vec::new()
        })
    }

    pub(crate) fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    pub(crate) fn set_timer(&mut self, id: u64, after_ms: u64) {
        let due = self.now_ms().saturating_add(after_ms);
        self.timers.push((id, due));
    }

    pub(crate) fn log(&self, level: u8, message: &str) {
        let plugin = &*self.name;
        match level {
            0 => tracing::trace!(target: "canopy::plugin", plugin, "{message}"),
            1 => tracing::debug!(target: "canopy::plugin", plugin, "{message}"),
            2 => tracing::info!(target: "canopy::plugin", plugin, "{message}"),
            3 => tracing::warn!(target: "canopy::plugin", plugin, "{message}"),
            _ => tracing::error!(target: "canopy::plugin", plugin, "{message}"),
        }
    }

    /// Applies the callback's key/value writes (durably) and hands out what it asked for.
    pub(crate) fn commit(&mut self) -> Result<Committed, StoreError> {
        self.published = 0;
        let committed =
            Committed { effects: std::mem::take(&mut self.effects), timers: std::mem::take(&mut self.timers) };
        self.state.commit()?;
        Ok(committed)
    }

    /// Drops everything the failed callback asked for.
    pub(crate) fn discard(&mut self) {
        self.published = 0;
        self.effects.clear();
        self.timers.clear();
        self.state.discard();
    }

    pub(crate) fn into_parts(self) -> (Box<dyn StateStore>, Clock) {
        (self.state.into_base(), self.clock)
    }
}
