//! A plugin's persistent key/value state, and the per-callback overlay that makes a
//! callback's writes all-or-nothing.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::StoreError;

/// The longest key a plugin may write, in bytes.
pub const MAX_KEY: usize = 1024;
/// The longest value a plugin may write, in bytes.
pub const MAX_VALUE: usize = 64 * 1024;

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A write: a key and its new value, `None` to delete it.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// One plugin's namespace of persistent key/value pairs.
///
/// [`MemoryState`] keeps it in memory; [`FjallStore::plugin_state`](crate::FjallStore::plugin_state)
/// keeps it in the relay's fjall database, beside the chunks.
pub trait StateStore: Send + 'static {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries with keys starting with `prefix`, in key order, strictly after
    /// `after` when given.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// Applies writes (`None` deletes) atomically and durably.
    fn apply(&mut self, writes: Vec<Write>) -> Result<(), StoreError>;
}

/// A [`StateStore`] in memory: for tools and tests, gone when dropped.
#[derive(Debug, Default)]
pub struct MemoryState {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemoryState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The keys after `after` (or from `prefix`) in a `BTreeMap`.
fn range_from<'a>(prefix: &'a [u8], after: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    match after {
        Some(after) if after >= prefix => (Bound::Excluded(after), Bound::Unbounded),
        _ => (Bound::Included(prefix), Bound::Unbounded),
    }
}

impl StateStore for MemoryState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .map
            .range::<[u8], _>(range_from(prefix, after))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&mut self, writes: Vec<Write>) -> Result<(), StoreError> {
        for (key, value) in writes {
            match value {
                Some(value) => self.map.insert(key, value),
                None => self.map.remove(&key),
            };
        }
        Ok(())
    }
}

/// A state store with the uncommitted writes of the running callback on top.
///
/// Reads see the callback's own writes; [`Overlay::commit`] applies them when the callback
/// returns normally and [`Overlay::discard`] drops them when it traps, so a failed callback
/// leaves no half-written state behind.
pub(crate) struct Overlay {
    base: Box<dyn StateStore>,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Overlay {
    pub(crate) fn new(base: Box<dyn StateStore>) -> Self {
        Overlay { base, pending: BTreeMap::new() }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.pending.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.base.get(key),
        }
    }

    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        if key.len() > MAX_KEY {
            return Err(format!("key of {} bytes; the limit is {MAX_KEY}", key.len()));
        }
        if value.len() > MAX_VALUE {
            return Err(format!("value of {} bytes; the limit is {MAX_VALUE}", value.len()));
        }
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
    }

    pub(crate) fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mine: Vec<_> = self
            .pending
            .range::<[u8], _>(range_from(prefix, after))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        // Pending deletes and overwrites may hide base entries: read enough to fill the page.
        let base = self.base.scan(prefix, after, limit.saturating_add(mine.len()))?;
        let mut out = Vec::with_capacity(limit.min(base.len() + mine.len()));
        let (mut b, mut m) = (base.into_iter().peekable(), mine.into_iter().peekable());
        while out.len() < limit {
            let take_mine = match (b.peek(), m.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((bk, _)), Some((mk, _))) => mk.as_slice() <= bk.as_slice(),
            };
            if take_mine {
                let (key, value) = m.next().expect("peeked");
                if b.peek().is_some_and(|(bk, _)| bk == key) {
                    b.next();
                }
                if let Some(value) = value {
                    out.push((key.clone(), value.clone()));
                }
            } else {
                out.push(b.next().expect("peeked"));
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    pub(crate) fn is_dirty(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn commit(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.pending).into_iter().collect();
        self.base.apply(writes)
    }

    pub(crate) fn discard(&mut self) {
        self.pending.clear();
    }

    pub(crate) fn into_base(self) -> Box<dyn StateStore> {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[test]
    fn overlay_reads_its_writes_and_commits_or_discards_them() {
        let mut base = MemoryState::new();
        base.apply(vec![(b"a/1".to_vec(), Some(b"x".to_vec())), (b"a/2".to_vec(), Some(b"y".to_vec()))]).unwrap();
        let mut o = Overlay::new(Box::new(base));
        o.put(b"a/3", b"z").unwrap();
        o.delete(b"a/1");
        o.put(b"a/2", b"Y").unwrap();
        assert_eq!(o.scan(b"a/", None, 10).unwrap(), vec![kv("a/2", "Y"), kv("a/3", "z")]);
        assert_eq!(o.scan(b"a/", Some(b"a/2"), 10).unwrap(), vec![kv("a/3", "z")]);
        assert_eq!(o.scan(b"a/", None, 1).unwrap(), vec![kv("a/2", "Y")]);
        o.discard();
        assert_eq!(o.scan(b"a/", None, 10).unwrap(), vec![kv("a/1", "x"), kv("a/2", "y")]);
        o.delete(b"a/1");
        o.commit().unwrap();
        assert!(!o.is_dirty());
        assert_eq!(o.get(b"a/1").unwrap(), None);
        assert_eq!(o.into_base().scan(b"", None, 10).unwrap(), vec![kv("a/2", "y")]);
    }

    #[test]
    fn oversized_keys_and_values_are_refused() {
        let mut o = Overlay::new(Box::new(MemoryState::new()));
        assert!(o.put(&[0; MAX_KEY + 1], b"").is_err());
        assert!(o.put(b"k", &vec![0; MAX_VALUE + 1]).is_err());
        assert!(!o.is_dirty());
    }
}
