//! `echo`: answers each chunk published under `requests` with the same bytes under `replies`.
//!
//! Loaded by a relay (`[[plugin]]` with `requests` and `replies` filters) it serves. Run as a
//! tool, `canopy plugin run echo.wasm -- request TEXT` is its client: it publishes TEXT under
//! `requests`, waits up to `timeout_ms` for the answer under `replies` and prints it.

use canopy_plugin::{Chunk, Config, Filter, Level, Name, Plugin, kv};

const ANSWERED: &[u8] = b"answered";
const TIMEOUT: u64 = 1;

enum Role {
    Server,
    Client { reply: Name, answer: Option<Vec<u8>> },
}

struct Echo {
    replies: Filter,
    role: Role,
}

impl Plugin for Echo {
    fn init(config: Config) -> Result<Self, String> {
        let requests = config.filter("requests")?;
        let replies = config.filter("replies")?;
        let role = match config.args().as_slice() {
            [] => {
                canopy_plugin::subscribe(requests)?;
                Role::Server
            }
            [cmd, text] if cmd == "request" => {
                let now = canopy_plugin::now_ms();
                let name = requests.with_suffix(Name(u128::from(now) << 16 | u128::from(text.len() as u16)));
                let reply = replies.with_suffix(name);
                canopy_plugin::subscribe(Filter::new(reply, 128)?)?;
                let expiry_ms = now + 60_000;
                canopy_plugin::publish(&Chunk { name, expiry_ms, data: text.as_bytes().to_vec() })?;
                canopy_plugin::set_timer(TIMEOUT, config.u64_or("timeout_ms", 5_000)?);
                Role::Client { reply, answer: None }
            }
            [cmd] if cmd == "stats" => Role::Server,
            other => return Err(format!("usage: request TEXT | stats (got {other:?})")),
        };
        Ok(Echo { replies, role })
    }

    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        match &mut self.role {
            Role::Server => {
                for chunk in &chunks {
                    let reply = Chunk { name: self.replies.with_suffix(chunk.name), ..chunk.clone() };
                    if let Err(err) = canopy_plugin::publish(&reply) {
                        canopy_plugin::log(Level::Warn, &format!("cannot answer {}: {err}", chunk.name));
                    }
                }
                let answered = kv::get_u64(ANSWERED) + chunks.len() as u64;
                let _ = kv::put_u64(ANSWERED, answered);
            }
            Role::Client { reply, answer } => {
                if let Some(chunk) = chunks.into_iter().find(|c| c.name == *reply) {
                    *answer = Some(chunk.data);
                    // Done: fire the timeout now so the tool run settles.
                    canopy_plugin::set_timer(TIMEOUT, 0);
                }
            }
        }
    }

    fn on_command(&mut self, _args: Vec<String>) -> Result<String, String> {
        match &self.role {
            Role::Server => Ok(format!("answered {}", kv::get_u64(ANSWERED))),
            Role::Client { answer: Some(data), .. } => Ok(String::from_utf8_lossy(data).into_owned()),
            Role::Client { answer: None, .. } => Err("no answer before the timeout".into()),
        }
    }
}

canopy_plugin::export!(Echo);
