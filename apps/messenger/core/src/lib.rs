//! # The messenger's shared core
//!
//! Everything the messenger's **Secure** process and the **`member`** plugin (the org
//! admin's committer) have in common, written once:
//! - [`names`]: where every object lives in the 128-bit name space;
//! - [`fragment`]: objects larger than a chunk, split and reassembled with checks;
//! - [`payload`]: message payloads and the team record, byte for byte;
//! - [`seal`]: encryption at rest, over a narrow key/value [`seal::Backend`];
//! - [`identity`]: users, and the binding of each device's MLS credential to its user;
//! - [`contacts`]: a device's local names for users, and whom it blocks;
//! - [`conv`]: conversations between users (direct messages, groups), in the users' name space;
//! - [`chats`]: the chat list, unread counts and marked messages;
//! - [`backup`]: encrypted backups, and restoring one as a new device;
//! - [`link`]: a new device of a user, given the user's identity;
//! - [`engine`], [`committer`] and [`device`]: MLS (openmls, ciphersuite
//!   `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`) for the committer and for a member
//!   device.
//!
//! It has no network code, and builds for `wasm32-wasip2` as well as the host.

pub mod backup;
pub mod chats;
pub mod committer;
pub mod contacts;
pub mod crypto;
pub mod conv;
pub mod device;
pub mod engine;
pub mod fragment;
#[doc(hidden)]
pub mod fuzz;
pub mod identity;
pub mod link;
pub mod names;
pub mod payload;
pub mod pipeline;
pub mod seal;
pub mod supply;

pub use committer::{Committer, Outgoing};
pub use device::{Device, Event, Shown};
pub use engine::MlsError;
pub use identity::UserId;
pub use names::Org;
pub use payload::{Message, MsgRef, TeamRecord};
pub use seal::{Key, MemoryBackend};
