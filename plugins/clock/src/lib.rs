//! `clock`: publishes the node's time every `period_ms` (default 1000) under the filter
//! `under`, so endpoints can take it as their time source.
//!
//! Each tick is a chunk named `under` + the tick's time in unix milliseconds (low bits), carrying the
//! time in unix milliseconds as 8 big-endian bytes and expiring after `ttl_ms` (default
//! 10 s). A subscriber with `MostRecent(1)` on `under` gets the latest tick, then every new one.

use canopy_plugin::{Chunk, Config, Filter, Level, Name, Plugin};

const TICK: u64 = 0;

struct Clock {
    under: Filter,
    period_ms: u64,
    ttl_ms: u64,
}

impl Plugin for Clock {
    fn init(config: Config) -> Result<Self, String> {
        let clock = Clock {
            under: config.filter("under")?,
            period_ms: config.u64_or("period_ms", 1_000)?.max(1),
            ttl_ms: config.u64_or("ttl_ms", 10_000)?,
        };
        canopy_plugin::set_timer(TICK, 0);
        Ok(clock)
    }

    fn on_timer(&mut self, _id: u64) {
        let now = canopy_plugin::now_ms();
        let name = self.under.with_suffix(Name(u128::from(now)));
        let tick = Chunk { name, expiry_ms: now + self.ttl_ms, data: now.to_be_bytes().to_vec() };
        if let Err(err) = canopy_plugin::publish(&tick) {
            canopy_plugin::log(Level::Warn, &format!("cannot publish the time: {err}"));
        }
        canopy_plugin::set_timer(TICK, self.period_ms - now % self.period_ms);
    }

    fn on_command(&mut self, _args: Vec<String>) -> Result<String, String> {
        Ok(canopy_plugin::now_ms().to_string())
    }
}

canopy_plugin::export!(Clock);
