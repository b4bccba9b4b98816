//! A plugin's configuration.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Filter;

/// The JSON configuration handed to [`Plugin::init`](crate::Plugin::init): the plugin's table
/// from the relay's config, or, under `canopy plugin run`, the `--config` object with the
/// command line under `"args"`.
#[derive(Clone, Debug, Default)]
pub struct Config {
    value: Value,
}

impl Config {
    /// Parses configuration text (empty text is an empty object).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Config { value: Value::Object(Default::default()) });
        }
        let value = serde_json::from_str(text).map_err(|e| format!("config is not JSON: {e}"))?;
        Ok(Config { value })
    }

    /// The whole value.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Deserializes the whole configuration into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(&self.value).map_err(|e| format!("bad config: {e}"))
    }

    /// A key's value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key)
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("config needs {key:?}"))?
            .as_str()
            .ok_or_else(|| format!("config {key:?} must be a string"))
    }

    /// A required filter, written `0x…/len`.
    pub fn filter(&self, key: &str) -> Result<Filter, String> {
        self.str(key)?.parse().map_err(|e| format!("config {key:?}: {e}"))
    }

    /// An optional unsigned number, with a default.
    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| format!("config {key:?} must be a whole number")),
        }
    }

    /// The command line when run as a tool (`"args"`), empty when loaded by a relay.
    pub fn args(&self) -> Vec<String> {
        match self.get("args") {
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        }
    }
}
