//! `sink`: counts the chunks and bytes delivered to it and does nothing else, so that
//! benchmarks measure the cost of dispatch itself. Built both as Wasm and natively.
//! Config: `under` (a filter to subscribe to, optional). Command `count` answers
//! `CHUNKS BYTES`.

use canopy_plugin::{Chunk, Config, Plugin};

struct Sink {
    chunks: u64,
    bytes: u64,
}

impl Plugin for Sink {
    fn init(config: Config) -> Result<Self, String> {
        if config.get("under").is_some() {
            canopy_plugin::subscribe(config.filter("under")?)?;
        }
        Ok(Sink { chunks: 0, bytes: 0 })
    }

    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        self.chunks += chunks.len() as u64;
        self.bytes += chunks.iter().map(|c| c.data.len() as u64).sum::<u64>();
    }

    fn on_command(&mut self, _args: Vec<String>) -> Result<String, String> {
        Ok(format!("{} {}", self.chunks, self.bytes))
    }
}

canopy_plugin::export!(Sink);
