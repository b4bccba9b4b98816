//! A model for the host's tests: a counter that misbehaves when a message asks it to.
//! `count` adds one; `trap` panics; `spin` never returns; `hog` allocates without end;
//! `sign` asks the host to sign (allowed in `act` only). `init` with params `clock` records
//! what the clock and the random source say, which a deterministic host keeps the same.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use canopy_model::{Descriptor, Message, Model, Rendering};

/// The model.
pub struct Faulty;

impl Model for Faulty {
    type State = (u64, String);

    fn describe() -> Descriptor {
        Descriptor::new("faulty", "1").message("count", "adds one").message("trap", "panics").message("spin", "loops").message("hog", "allocates").message("sign", "signs")
    }

    fn init(params: &str, _creator: &str, _members: &[String]) -> Result<Self::State, String> {
        if params == "clock" {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let seed = RandomState::new().hash_one(42u8);
            let map: HashMap<u32, u32> = (0..8).map(|i| (i, i)).collect();
            let order: Vec<u32> = map.keys().copied().collect();
            return Ok((0, format!("{now} {seed} {order:?}")));
        }
        Ok((0, String::new()))
    }

    fn apply(state: Self::State, _sender: &str, _time_ms: u64, message: &Message) -> Result<Self::State, String> {
        match message.kind.as_str() {
            "count" => Ok((state.0 + 1, state.1)),
            "trap" => panic!("asked to trap"),
            "spin" => {
                let mut x = state.0;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(3).wrapping_add(1));
                }
            }
            "hog" => {
                let mut v: Vec<Vec<u8>> = Vec::new();
                loop {
                    v.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&v);
                }
            }
            "sign" => canopy_model::sign("k", "text", b"x").map(|s| (state.0, format!("{s:?}"))),
            other => Err(format!("no {other}")),
        }
    }

    fn view(state: &Self::State, _viewer: &str) -> Rendering {
        Rendering::new("faulty", format!("{} {}", state.0, state.1))
    }

    fn act(_state: &Self::State, _viewer: &str, action: &str, _args: &[String]) -> Result<Message, String> {
        match action {
            "sign" => canopy_model::sign("main", "text", b"approve this").map(|s| Message::new("signed", String::from_utf8_lossy(&s))),
            other => Ok(Message::new(other, "")),
        }
    }
}

canopy_model::export_model!(Faulty);
