//! `hostile`: a plugin that misbehaves on demand, for the plugin host's tests.
//!
//! Commands (from `on-command`, or as the data of a chunk under the `control` filter):
//! `spin` loops forever, `bomb` allocates until memory runs out, `trap` panics, `incr` adds
//! one to a persisted counter, `incr-trap` adds one and then panics (the write must not
//! stick), `get` returns the counter, `boots` how many times `init` ran, `hello` answers.
//!
//! Every `init` bumps the persisted boot count and, when `status` is configured, publishes
//! `boots=B counter=C` there, so a subscriber watches restarts and sees the state survive.
//! With `"fail_init": true` every `init` after the first panics.

use canopy_plugin::{Chunk, Config, Name, Plugin, kv};

const COUNTER: &[u8] = b"counter";
const BOOTS: &[u8] = b"boots";

struct Hostile;

fn run(command: &str) -> Result<String, String> {
    match command {
        "spin" => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "bomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0xAB; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "trap" => panic!("hostile plugin traps on request"),
        "incr" => {
            let n = kv::get_u64(COUNTER) + 1;
            kv::put_u64(COUNTER, n)?;
            Ok(n.to_string())
        }
        "incr-trap" => {
            kv::put_u64(COUNTER, kv::get_u64(COUNTER) + 1)?;
            panic!("hostile plugin traps after writing");
        }
        "get" => Ok(kv::get_u64(COUNTER).to_string()),
        "boots" => Ok(kv::get_u64(BOOTS).to_string()),
        "hello" => Ok("hello".into()),
        other => Err(format!("unknown command {other:?}")),
    }
}

impl Plugin for Hostile {
    fn init(config: Config) -> Result<Self, String> {
        let boots = kv::get_u64(BOOTS) + 1;
        if boots > 1 && config.get("fail_init").and_then(|v| v.as_bool()) == Some(true) {
            panic!("hostile plugin fails to start again");
        }
        kv::put_u64(BOOTS, boots)?;
        if let Some(Ok(control)) = config.get("control").map(|_| config.filter("control")) {
            canopy_plugin::subscribe(control)?;
        }
        let status = match config.get("status") {
            Some(_) => Some(config.filter("status")?),
            None => None,
        };
        if let Some(status) = status {
            let data = format!("boots={boots} counter={}", kv::get_u64(COUNTER)).into_bytes();
            let name = status.with_suffix(Name(u128::from(boots)));
            canopy_plugin::publish(&Chunk { name, expiry_ms: canopy_plugin::now_ms() + 600_000, data })?;
        }
        Ok(Hostile)
    }

    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        for chunk in chunks {
            let _ = run(&String::from_utf8_lossy(&chunk.data));
        }
    }

    fn on_command(&mut self, args: Vec<String>) -> Result<String, String> {
        run(args.first().map_or("", String::as_str))
    }
}

canopy_plugin::export!(Hostile);
