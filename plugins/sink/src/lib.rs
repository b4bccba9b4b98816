//! `sink`: counts the chunks and bytes delivered to it and does nothing else, so that
//! benchmarks measure the cost of dispatch itself. Built both as Wasm and natively.
//! Config: `under` (a filter to subscribe to, optional). Command `count` (or any other)
//! answers `CHUNKS BYTES`; command `hang` never returns (it sleeps forever), for the native
//! host's watchdog tests.

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

    fn on_command(&mut self, args: Vec<String>) -> Result<String, String> {
        if args.first().is_some_and(|a| a == "hang") {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok(format!("{} {}", self.chunks, self.bytes))
    }
}

canopy_plugin::export!(Sink);
