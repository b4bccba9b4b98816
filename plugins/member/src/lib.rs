//! `member`: the org admin's committer, device 0 of every team, run as a tool.
//!
//! ```text
//! canopy plugin run member.wasm --relay … --ca … --state DIR \
//!     --config '{"domain":"example.com","org":7,"key":"<64 hex digits>"}' -- COMMAND
//! ```
//!
//! Commands (TEAM is an id if it is all digits, else a name):
//! - `org init`: creates team 1, which carries the org's device management;
//! - `team create NAME`: prints the new team's id;
//! - `team add TEAM HKP`: fetches the key package whose hKP is HKP from the relay, checks
//!   that it hashes to HKP, commits the add, publishes the commit and the welcome, and prints
//!   the new device's id;
//! - `team devices TEAM [--json]`: one line per device, `DEVICE leaf=LEAF`;
//! - `channel create TEAM NAME`: commits the channel into the team record (which channel 1
//!   carries), publishes the commit, and prints the channel id;
//! - `teams [--json]`: one line per team, `ID NAME epoch=E devices=N`.
//!
//! Configuration: `domain` and `org` name the org; `key` is the 32-byte state key in hex
//! (`canopy-msg admin` derives it from the admin's passphrase or key file); optional
//! `message_ttl_ms`, `commit_ttl_ms`, `welcome_ttl_ms` and `key_package_ttl_ms` set the
//! lifetimes of teams created from then on.
//!
//! **State.** Keys and MLS state live in the plugin's key/value store, sealed by the
//! messenger's vault (`canopy_msg_core::seal`) and split across values where a record is
//! larger than the store's value cap ([`store`]). A command's writes and publishes are
//! all-or-nothing: they take effect when the callback returns, and a failure part-way traps,
//! which makes the host drop all of them. Every run first publishes again the last commit
//! and welcome of each team (idempotent at the relay), in case the run that made them ended
//! before the relay took them.

pub mod store;

use std::collections::BTreeMap;

use canopy_msg_core::committer::Committer;
use canopy_msg_core::committer::config as keys;
use canopy_msg_core::engine::{hex, unhex};
use canopy_msg_core::fragment::{Assembly, Fragment};
use canopy_msg_core::names::Path;
use canopy_msg_core::payload::Lifetimes;
use canopy_msg_core::seal::{Key, SealError};
use canopy_msg_core::{MlsError, Org, Outgoing};
use canopy_plugin::{Chunk, Config, Filter, Level, Name, Plugin};

use crate::store::{PluginKv, SplitBackend};

/// The commands, for usage errors.
pub const USAGE: &str = "commands: org init | team create NAME | team add TEAM HKP | team devices TEAM [--json] | channel create TEAM NAME | teams [--json]";

/// The length of an hKP (a SHA-256 `KeyPackageRef`), in bytes.
const HKP_LEN: usize = 32;

struct Member {
    committer: Committer<SplitBackend<PluginKv>>,
    key: Key,
    org: Org,
    lifetimes: Lifetimes,
    /// For `team add`: the hKP asked for, and the fragments found under its name, one
    /// assembly per object (a squatter's object under the same 54 bits is kept apart).
    wanted: Option<(Vec<u8>, Filter)>,
    key_packages: BTreeMap<(u16, u32, [u8; 8]), Assembly>,
    /// Fragments under the hKP's name that were not valid key package fragments.
    unreadable: usize,
}

fn plugin_filter(filter: canopy::Filter) -> Filter {
    Filter::new(Name(filter.name().to_u128()), filter.prefix_len()).expect("a valid filter")
}

fn parse_hkp(text: &str) -> Result<Vec<u8>, String> {
    match unhex(text) {
        Some(hkp) if hkp.len() == HKP_LEN => Ok(hkp),
        _ => Err(format!(
            "{text:?} is not an hKP: it is {} hex digits, as `canopy-msg device key-package` prints",
            2 * HKP_LEN
        )),
    }
}

fn error(e: MlsError) -> String {
    match e {
        MlsError::Seal(SealError::WrongKey) => {
            "wrong passphrase or key: the member plugin's state cannot be decrypted with it".into()
        }
        other => other.to_string(),
    }
}

fn lifetimes(config: &Config) -> Result<Lifetimes, String> {
    let d = Lifetimes::default();
    Ok(Lifetimes {
        message_ms: config.u64_or(keys::MESSAGE_TTL_MS, d.message_ms)?,
        commit_ms: config.u64_or(keys::COMMIT_TTL_MS, d.commit_ms)?,
        welcome_ms: config.u64_or(keys::WELCOME_TTL_MS, d.welcome_ms)?,
        key_package_ms: config.u64_or(keys::KEY_PACKAGE_TTL_MS, d.key_package_ms)?,
    })
}

fn state_key(config: &Config) -> Result<Key, String> {
    let text = config.str(keys::KEY)?;
    let bytes: [u8; 32] = unhex(text)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "config \"key\" must be 64 hex digits (the 32-byte state key)".to_string())?;
    Ok(Key::from_bytes(bytes))
}

/// Publishes `out`. A publish the host refuses traps, so the command's state changes are
/// dropped with it rather than kept without what they must publish.
fn publish_all(out: &[Outgoing]) {
    for o in out {
        let chunk = Chunk { name: Name(o.name.to_u128()), expiry_ms: o.expiry_ms, data: o.data.clone() };
        if let Err(err) = canopy_plugin::publish(&chunk) {
            panic!("cannot publish {}: {err}", chunk.name);
        }
    }
}

fn json_flag(rest: &[&str], usage: &str) -> Result<bool, String> {
    match rest {
        [] => Ok(false),
        ["--json"] => Ok(true),
        other => Err(format!("unexpected {other:?}; usage: {usage}")),
    }
}

impl Plugin for Member {
    fn init(config: Config) -> Result<Self, String> {
        let domain = config.str(keys::DOMAIN)?;
        let org_number = config.get(keys::ORG).and_then(|v| v.as_u64()).ok_or("config needs \"org\", a whole number")?;
        let org = u32::try_from(org_number).ok().and_then(|o| Org::new(domain, o).ok()).ok_or_else(|| {
            format!("org {org_number} does not fit (the largest is {})", canopy_msg_core::names::MAX_ORG)
        })?;
        let lifetimes = lifetimes(&config)?;
        let key = state_key(&config)?;
        // HPKE's X25519 from the host, natively compiled: sealing a commit's path secrets to
        // every member of a large team is most of an add's time in Wasm (docs/performance.md).
        canopy_msg_core::crypto::use_x25519(canopy_plugin::x25519);
        let committer = Committer::open(key.clone(), SplitBackend::new(PluginKv), org).map_err(error)?;
        let now = canopy_plugin::now_ms();
        let again: Vec<Outgoing> = committer.republish().into_iter().filter(|o| o.expiry_ms > now).collect();
        publish_all(&again);

        let args = config.args();
        let mut wanted = None;
        if let [team, add, _, hkp] = args.as_slice()
            && team == "team"
            && add == "add"
            && let Ok(hkp) = parse_hkp(hkp)
        {
            // The settle phase delivers the key package's fragments before `on_command`.
            let filter = plugin_filter(org.key_package_filter(&hkp));
            canopy_plugin::subscribe(filter)?;
            wanted = Some((hkp, filter));
        }
        Ok(Member { committer, key, org, lifetimes, wanted, key_packages: BTreeMap::new(), unreadable: 0 })
    }

    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        let Some((_, filter)) = &self.wanted else { return };
        for chunk in chunks {
            if !filter.matches(chunk.name) {
                continue;
            }
            match Fragment::decode(Path::KeyPackage, &chunk.data) {
                Ok(f) => {
                    let shape = (f.count, f.total, f.digest);
                    // A fragment's index is in the name too; one disagreeing with it is refused.
                    if u128::from(f.index) != chunk.name.0 & 0xffff {
                        self.unreadable += 1;
                        continue;
                    }
                    let _ = self.key_packages.entry(shape).or_default().add(f);
                }
                Err(err) => {
                    self.unreadable += 1;
                    canopy_plugin::log(Level::Warn, &format!("ignoring {}: {err}", chunk.name));
                }
            }
        }
    }

    fn on_command(&mut self, args: Vec<String>) -> Result<String, String> {
        let answer = self.command(&args);
        if answer.is_err() {
            // A command that failed part-way may have changed the MLS state in memory (a
            // merged commit) without persisting it: start again from what is persisted.
            match Committer::open(self.key.clone(), SplitBackend::new(PluginKv), self.org) {
                Ok(committer) => self.committer = committer,
                Err(e) => panic!("cannot reopen the committer's state: {}", error(e)),
            }
        }
        answer
    }
}

impl Member {
    fn command(&mut self, args: &[String]) -> Result<String, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["org", "init"] => {
                self.committer.org_init().map_err(error)?;
                Ok(format!("org {} initialised", self.org.org()))
            }
            ["team", "create", name] => {
                let team = self.committer.create_team(name, self.lifetimes).map_err(error)?;
                Ok(team.to_string())
            }
            ["team", "add", team, hkp] => self.add(team, hkp),
            ["team", "devices", team, rest @ ..] => {
                let json = json_flag(rest, "team devices TEAM [--json]")?;
                let team = self.team(team)?;
                let lines: Vec<String> = self
                    .committer
                    .devices(team)
                    .map_err(error)?
                    .into_iter()
                    .map(|(device, leaf)| {
                        if json {
                            serde_json::json!({ "device": device, "leaf": leaf }).to_string()
                        } else {
                            format!("{device} leaf={leaf}")
                        }
                    })
                    .collect();
                Ok(lines.join("\n"))
            }
            ["channel", "create", team, name] => {
                let team = self.team(team)?;
                let (channel, _, out) =
                    self.committer.create_channel(team, name, canopy_plugin::now_ms()).map_err(error)?;
                publish_all(&out);
                Ok(channel.to_string())
            }
            ["teams", rest @ ..] => {
                let json = json_flag(rest, "teams [--json]")?;
                let teams = self.committer.teams().map_err(error)?;
                if teams.is_empty() {
                    return Err(self.not_initialised());
                }
                let lines: Vec<String> = teams
                    .into_iter()
                    .map(|t| {
                        if json {
                            // In the documented field order.
                            format!(
                                r#"{{"id":{},"name":{},"epoch":{},"devices":{}}}"#,
                                t.id,
                                serde_json::Value::from(t.name),
                                t.epoch,
                                t.devices
                            )
                        } else {
                            format!("{} {} epoch={} devices={}", t.id, t.name, t.epoch, t.devices)
                        }
                    })
                    .collect();
                Ok(lines.join("\n"))
            }
            _ => Err(format!("unknown command {:?}; {USAGE}", args.join(" "))),
        }
    }

    fn not_initialised(&self) -> String {
        format!("org {} is not initialised: run `admin org init` first", self.org.org())
    }

    fn team(&self, which: &str) -> Result<u32, String> {
        match self.committer.resolve(which) {
            Ok(team) => Ok(team),
            Err(_) if !self.committer.initialised() => Err(self.not_initialised()),
            Err(e) => Err(error(e)),
        }
    }

    fn add(&mut self, team: &str, hkp_text: &str) -> Result<String, String> {
        let hkp = parse_hkp(hkp_text)?;
        let team = self.team(team)?;
        let hkp_hex = hex(&hkp);
        if self.key_packages.is_empty() {
            let also = if self.unreadable > 0 {
                format!(" ({} unreadable fragments under its name)", self.unreadable)
            } else {
                String::new()
            };
            return Err(format!(
                "no key package for hKP {hkp_hex} on the relay{also}: has the device published it, and has it not expired?"
            ));
        }
        // Try every complete object under the name; only the one that hashes to hKP is used.
        let mut refused = Vec::new();
        let mut incomplete = Vec::new();
        for asm in self.key_packages.values() {
            match asm.finish() {
                None => {
                    incomplete.push(format!("fragments {:?} of {} missing", asm.missing(), asm.count().unwrap_or(0)))
                }
                Some(Err(e)) => refused.push(e.to_string()),
                Some(Ok(kp)) => {
                    let started = canopy_plugin::now_ms();
                    match self.committer.add_device(team, &kp, &hkp, started) {
                        Ok(added) => {
                            publish_all(&added.outgoing);
                            canopy_plugin::log(
                                Level::Info,
                                &format!(
                                    "added device {} to team {team} (epoch {}) in {} ms; {} chunks published",
                                    added.device,
                                    added.epoch,
                                    canopy_plugin::now_ms().saturating_sub(started),
                                    added.outgoing.len()
                                ),
                            );
                            return Ok(added.device.to_string());
                        }
                        Err(e @ (MlsError::HkpMismatch { .. } | MlsError::Malformed { .. })) => refused.push(error(e)),
                        Err(e) => return Err(error(e)),
                    }
                }
            }
        }
        if refused.is_empty() {
            return Err(format!(
                "the key package for hKP {hkp_hex} is incomplete on the relay: {}",
                incomplete.join("; ")
            ));
        }
        Err(format!(
            "no key package for hKP {hkp_hex} on the relay: what is published under its name is not it ({})",
            refused.join("; ")
        ))
    }
}

canopy_plugin::export!(Member);
