//! Write a Canopy pipeline model: implement [`Model`] on a type, keep its state in a serde
//! type, and `canopy_model::export_model!(MyModel);`. Build with
//! `cargo build --target wasm32-wasip2` and the result is a `canopy:model@0.1.0` component
//! (the ABI is `framework/wit/model/model.wit`).
//!
//! The state is JSON between calls, so every member's device holds the same bytes after the
//! same messages, and the state hash the messenger compares is well defined. `init`, `apply`
//! and `view` must be deterministic: use `time_ms` (the sender's clock, carried in the
//! message), never a clock of your own; iterate `BTreeMap`s, not `HashMap`s.
//!
//! ```ignore
//! struct Counter;
//! impl canopy_model::Model for Counter {
//!     type State = u64;
//!     fn describe() -> Descriptor { Descriptor::new("counter", "1").message("add", "adds one") }
//!     fn init(_: &str, _: &str, _: &[String]) -> Result<u64, String> { Ok(0) }
//!     fn apply(n: u64, _: &str, _: u64, m: &Message) -> Result<u64, String> { Ok(n + 1) }
//!     fn view(n: &u64, _: &str) -> Rendering { Rendering::new("counter", format!("{n}")) }
//!     fn act(_: &u64, _: &str, _: &str, _: &[String]) -> Result<Message, String> { Ok(Message::new("add", "")) }
//! }
//! canopy_model::export_model!(Counter);
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A message type a model accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageType {
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: String,
}

/// A role a member can have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Its name.
    pub name: String,
    /// What it may do.
    pub description: String,
}

/// What a model is: `describe`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The message types it accepts.
    pub message_types: Vec<MessageType>,
    /// Its roles.
    pub roles: Vec<Role>,
}

impl Descriptor {
    /// A descriptor with no message types or roles yet.
    pub fn new(name: &str, version: &str) -> Descriptor {
        Descriptor { name: name.into(), version: version.into(), message_types: Vec::new(), roles: Vec::new() }
    }

    /// Adds a message type.
    pub fn message(mut self, name: &str, description: &str) -> Descriptor {
        self.message_types.push(MessageType { name: name.into(), description: description.into() });
        self
    }

    /// Adds a role.
    pub fn role(mut self, name: &str, description: &str) -> Descriptor {
        self.roles.push(Role { name: name.into(), description: description.into() });
        self
    }
}

/// A pipeline message: a type and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// One of the descriptor's message types.
    pub kind: String,
    /// The body.
    pub body: String,
}

impl Message {
    /// A message of `kind` with `body`.
    pub fn new(kind: &str, body: impl Into<String>) -> Message {
        Message { kind: kind.into(), body: body.into() }
    }

    /// The body, read as JSON into `T`; a clear error if it is not one.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("a {} message whose body is not valid: {e}", self.kind))
    }
}

/// An action open to a viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// What `act` takes.
    pub name: String,
    /// What people read.
    pub label: String,
    /// Its arguments, for people.
    pub args: Vec<String>,
}

/// What the UI shows of a state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rendering {
    /// A heading.
    pub title: String,
    /// Where the pipeline stands.
    pub status: String,
    /// The state, line by line.
    pub lines: Vec<String>,
    /// What the viewer may do.
    pub actions: Vec<Action>,
    /// Whether the pipeline is over.
    pub closed: bool,
}

impl Rendering {
    /// A rendering with a title and a status line.
    pub fn new(title: impl Into<String>, status: impl Into<String>) -> Rendering {
        Rendering { title: title.into(), status: status.into(), ..Rendering::default() }
    }

    /// Adds a line.
    pub fn line(mut self, line: impl Into<String>) -> Rendering {
        self.lines.push(line.into());
        self
    }

    /// Adds an action.
    pub fn action(mut self, name: &str, label: impl Into<String>, args: &[&str]) -> Rendering {
        self.actions.push(Action { name: name.into(), label: label.into(), args: args.iter().map(|a| a.to_string()).collect() });
        self
    }
}

/// A pipeline model. The state is `State`, kept as JSON between calls.
pub trait Model {
    /// The state.
    type State: Serialize + DeserializeOwned;
    /// Name, version, message types and roles.
    fn describe() -> Descriptor;
    /// The first state, from the creator's parameters (JSON text), the creator and the members.
    fn init(params: &str, creator: &str, members: &[String]) -> Result<Self::State, String>;
    /// The state after `sender`'s `message`, or why it is refused.
    fn apply(state: Self::State, sender: &str, time_ms: u64, message: &Message) -> Result<Self::State, String>;
    /// What `viewer` sees and may do.
    fn view(state: &Self::State, viewer: &str) -> Rendering;
    /// The message `viewer`'s `action` sends.
    fn act(state: &Self::State, viewer: &str, action: &str, args: &[String]) -> Result<Message, String>;
}

/// Asks the user's Secure process to sign `payload` (a `kind` it understands) with the key
/// named `key`: in `act` only.
pub fn sign(key: &str, kind: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    #[cfg(target_arch = "wasm32")]
    {
        wasm::canopy::model::host::sign(key, kind, payload)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (key, kind, payload);
        Err("signing is for models running in a pipeline host".into())
    }
}

/// Encodes a state as the bytes the host keeps.
pub fn encode_state<S: Serialize>(state: &S) -> Result<Vec<u8>, String> {
    serde_json::to_vec(state).map_err(|e| format!("the state does not encode: {e}"))
}

/// Decodes the bytes the host keeps.
pub fn decode_state<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("the state does not decode: {e}"))
}

/// The bindings of the `canopy:model` world, and the conversions the [`export_model!`] macro
/// uses.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated: the ABI's flattened signatures
pub mod wasm {
    wit_bindgen::generate!({
        path: "../../framework/wit/model",
        world: "model",
        pub_export_macro: true,
        export_macro_name: "export_raw_model",
        default_bindings_module: "canopy_model::wasm",
    });

    use canopy::model::types as raw;

    /// The descriptor, as the ABI carries it.
    pub fn descriptor(d: crate::Descriptor) -> raw::Descriptor {
        raw::Descriptor {
            name: d.name,
            version: d.version,
            message_types: d.message_types.into_iter().map(|m| raw::MessageType { name: m.name, description: m.description }).collect(),
            roles: d.roles.into_iter().map(|r| raw::Role { name: r.name, description: r.description }).collect(),
        }
    }

    /// A message from the ABI.
    pub fn message_in(m: raw::Message) -> crate::Message {
        crate::Message { kind: m.kind, body: m.body }
    }

    /// A message for the ABI.
    pub fn message_out(m: crate::Message) -> raw::Message {
        raw::Message { kind: m.kind, body: m.body }
    }

    /// A rendering for the ABI.
    pub fn rendering(r: crate::Rendering) -> raw::Rendering {
        raw::Rendering {
            title: r.title,
            status: r.status,
            lines: r.lines,
            actions: r.actions.into_iter().map(|a| raw::Action { name: a.name, label: a.label, args: a.args }).collect(),
            closed: r.closed,
        }
    }
}

/// Exports a [`Model`] type as the component's `canopy:model` world.
#[macro_export]
macro_rules! export_model {
    ($model:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::Model as _;
            struct CanopyModel;
            impl $crate::wasm::Guest for CanopyModel {
                fn describe() -> $crate::wasm::canopy::model::types::Descriptor {
                    $crate::wasm::descriptor(<$model>::describe())
                }
                fn init(params: ::std::string::String, creator: ::std::string::String, members: ::std::vec::Vec<::std::string::String>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    $crate::encode_state(&<$model>::init(&params, &creator, &members)?)
                }
                fn apply(
                    state: ::std::vec::Vec<u8>,
                    sender: ::std::string::String,
                    time_ms: u64,
                    message: $crate::wasm::canopy::model::types::Message,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    let state = $crate::decode_state(&state)?;
                    $crate::encode_state(&<$model>::apply(state, &sender, time_ms, &$crate::wasm::message_in(message))?)
                }
                fn view(state: ::std::vec::Vec<u8>, viewer: ::std::string::String) -> $crate::wasm::canopy::model::types::Rendering {
                    match $crate::decode_state(&state) {
                        Ok(state) => $crate::wasm::rendering(<$model>::view(&state, &viewer)),
                        Err(e) => $crate::wasm::rendering($crate::Rendering::new("state unreadable", e)),
                    }
                }
                fn act(
                    state: ::std::vec::Vec<u8>,
                    viewer: ::std::string::String,
                    action: ::std::string::String,
                    args: ::std::vec::Vec<::std::string::String>,
                ) -> ::std::result::Result<$crate::wasm::canopy::model::types::Message, ::std::string::String> {
                    let state = $crate::decode_state(&state)?;
                    <$model>::act(&state, &viewer, &action, &args).map($crate::wasm::message_out)
                }
            }
            $crate::wasm::export_raw_model!(CanopyModel with_types_in $crate::wasm);
        };
    };
}
