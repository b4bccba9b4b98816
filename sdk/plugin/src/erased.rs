//! The plugin behind a trait object, so the exports need no generics.

use crate::{Chunk, Config, Plugin};

/// A [`Plugin`] instance without its type.
pub trait Erased {
    /// [`Plugin::on_chunks`].
    fn on_chunks(&mut self, chunks: Vec<Chunk>);
    /// [`Plugin::on_timer`].
    fn on_timer(&mut self, id: u64);
    /// [`Plugin::on_command`].
    fn on_command(&mut self, args: Vec<String>) -> Result<String, String>;
}

impl<P: Plugin> Erased for P {
    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        Plugin::on_chunks(self, chunks)
    }
    fn on_timer(&mut self, id: u64) {
        Plugin::on_timer(self, id)
    }
    fn on_command(&mut self, args: Vec<String>) -> Result<String, String> {
        Plugin::on_command(self, args)
    }
}

/// Initialises `P` and erases its type.
pub fn erase<P: Plugin>(config: Config) -> Result<Box<dyn Erased>, String> {
    P::init(config).map(|p| Box::new(p) as Box<dyn Erased>)
}

/// What [`erase`] is, for one plugin type.
pub type Factory = fn(Config) -> Result<Box<dyn Erased>, String>;
