//! # Canopy core
//!
//! The vocabulary every other part of Canopy speaks: 128-bit [`Name`]s, netmask [`Filter`]s
//! over them, [`Schema`]s that give names structure, immutable [`Chunk`]s of at most 1 KiB, the
//! [`wire`] protocol relays and clients exchange, and the [`SubscriptionTable`] that decides
//! who receives a chunk — the relay's hot path.
//!
//! ```
//! use canopy::{Filter, Name, SubscriptionTable};
//!
//! let mut table = SubscriptionTable::new();
//! let team: Filter = "0x0a0b0000000000000000000000000000/16".parse().unwrap();
//! table.insert(team, 1u32);
//! table.insert(Filter::ALL, 2u32);
//!
//! let mut hits = Vec::new();
//! table.for_each_match(Name::new(0x0a0b_0c << 104), |v| hits.push(v));
//! hits.sort();
//! assert_eq!(hits, [1, 2]);
//! ```

pub mod access;
pub mod chunk;
pub mod matcher;
pub mod name;
pub mod node;
#[cfg(feature = "plugin-host")]
pub mod plugin;
pub mod schema;
pub mod session;
pub mod store;
pub mod wire;

pub use chunk::{Chunk, ChunkError, MAX_CHUNK_DATA};
pub use matcher::SubscriptionTable;
pub use name::{Filter, Name, NameError};
pub use schema::{MESSENGER_LAYOUT, Schema, SchemaError};
#[cfg(not(target_arch = "wasm32"))]
pub use store::FjallStore;
pub use store::{InsertOutcome, MemoryStore, Store, StoreError, StoreStats, Syncer};
