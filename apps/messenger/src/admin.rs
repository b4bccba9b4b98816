//! `canopy-msg admin …`: the org admin's commands, run by the `member` plugin (device 0 of
//! every team) as a tool against the relay, with its sealed state under `HOME/admin`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use canopy_msg_core::engine::hex;
use canopy_sdk::{Client, ConnectOptions, Trust};
use clap::Subcommand;

use crate::home::Home;

/// The admin's commands.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Org commands.
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Team commands.
    Team {
        #[command(subcommand)]
        command: TeamCommand,
    },
    /// Channel commands.
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// Every team: `ID NAME epoch=E devices=N`.
    Teams {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// `admin org …`.
#[derive(Subcommand)]
pub enum OrgCommand {
    /// Create the org's committer state and team 1 (device management).
    Init,
}

/// `admin team …`.
#[derive(Subcommand)]
pub enum TeamCommand {
    /// Create a team; prints its id. Lifetimes are fixed for the team's life, in its record;
    /// the defaults are in docs/messenger.md.
    Create {
        /// Its name.
        name: String,
        /// How long the relays keep the team's messages (e.g. `30d`, `12h`).
        #[arg(long, value_parser = duration_ms)]
        message_ttl: Option<u64>,
        /// How long they keep its commits. Shorter than messages only if every device is sure
        /// to fetch each commit in time: a device that misses one cannot read on.
        #[arg(long, value_parser = duration_ms)]
        commit_ttl: Option<u64>,
        /// How long the welcome of a device added to it waits for that device.
        #[arg(long, value_parser = duration_ms)]
        welcome_ttl: Option<u64>,
    },
    /// Add a device by the hKP of its key package; prints its device id.
    Add {
        /// Team id or name.
        team: String,
        /// The hKP the device showed.
        hkp: String,
    },
    /// A team's devices.
    Devices {
        /// Team id or name.
        team: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// `admin channel …`.
#[derive(Subcommand)]
pub enum ChannelCommand {
    /// Create a channel; prints its id.
    Create {
        /// Team id or name.
        team: String,
        /// Its name.
        name: String,
    },
}

/// A duration (`humantime`: `90s`, `12h`, `30d`) in whole milliseconds, at least one second.
fn duration_ms(text: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    u64::try_from(d.as_millis()).map_err(|_| "too long".into())
}

/// The member plugin's config entries a command sets beyond the home's.
fn extra_config(command: &AdminCommand) -> Vec<(&'static str, u64)> {
    match command {
        AdminCommand::Team { command: TeamCommand::Create { message_ttl, commit_ttl, welcome_ttl, .. } } => {
            use canopy_msg_core::committer::config::{COMMIT_TTL_MS, MESSAGE_TTL_MS, WELCOME_TTL_MS};
            [(MESSAGE_TTL_MS, message_ttl), (COMMIT_TTL_MS, commit_ttl), (WELCOME_TTL_MS, welcome_ttl)]
                .into_iter()
                .filter_map(|(k, v)| Some((k, (*v)?)))
                .collect()
        }
        _ => Vec::new(),
    }
}

fn args(command: &AdminCommand) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let json = |mut v: Vec<String>, j: bool| {
        if j {
            v.push("--json".into());
        }
        v
    };
    match command {
        AdminCommand::Org { command: OrgCommand::Init } => s(&["org", "init"]),
        AdminCommand::Team { command: TeamCommand::Create { name, .. } } => s(&["team", "create", name]),
        AdminCommand::Team { command: TeamCommand::Add { team, hkp } } => s(&["team", "add", team, hkp]),
        AdminCommand::Team { command: TeamCommand::Devices { team, json: j } } => json(s(&["team", "devices", team]), *j),
        AdminCommand::Channel { command: ChannelCommand::Create { team, name } } => s(&["channel", "create", team, name]),
        AdminCommand::Teams { json: j } => json(s(&["teams"]), *j),
    }
}

/// Where the member plugin is: `--plugin`, `$CANOPY_MSG_MEMBER_PLUGIN`, or beside this
/// binary (as installed, or in a Cargo target directory).
fn plugin_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given.or_else(|| std::env::var_os("CANOPY_MSG_MEMBER_PLUGIN").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("locating canopy-msg")?;
    for candidate in [dir.join("member.wasm"), dir.join("../wasm32-wasip2/plugin/member.wasm"), dir.join("../../wasm32-wasip2/plugin/member.wasm")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("the member plugin (member.wasm) was not found beside {}: pass --plugin or set CANOPY_MSG_MEMBER_PLUGIN", exe.display())
}

/// Runs one admin command.
pub fn run(home: &Home, plugin: Option<PathBuf>, command: AdminCommand) -> anyhow::Result<()> {
    let config = home.config()?;
    let key = home.key(&config)?;
    let file = plugin_path(plugin)?;
    let args = args(&command);
    let trust = match (&config.ca, &config.fingerprint) {
        (Some(ca), _) => Trust::CaPem(std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?),
        (None, Some(fp)) => Trust::Fingerprint(fp.clone()),
        (None, None) => bail!("the config names neither a CA nor a fingerprint for the relay"),
    };
    let mut options = canopy_sdk::tool::ToolOptions::new(file, args);
    options.config = canopy_msg_core::committer::config::base(&config.domain, config.org, &hex(&key.to_bytes()));
    for (k, v) in extra_config(&command) {
        options.config.insert(k.into(), v.into());
    }
    options.state = Some(home.path("admin"));
    // Compiling the plugin is the slow part of a first run; several homes on one machine may
    // share one cache.
    options.cache_dir = Some(std::env::var_os("CANOPY_MSG_PLUGIN_CACHE").map_or_else(|| home.path("plugin-cache"), PathBuf::from));
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async {
        let mut opts = ConnectOptions::new(&config.relay, trust);
        opts.token = config.token.clone();
        let client = Client::connect(opts).await.with_context(|| format!("connecting to the relay {}", config.relay))?;
        let outcome = canopy_sdk::tool::run(&client, options, |_| {}).await;
        client.close();
        anyhow::Ok(outcome?)
    })?;
    match outcome.answer {
        Ok(text) => {
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
            if outcome.refused > 0 {
                bail!("the relay refused {} of the admin's chunks: check the access rules for the committer's token", outcome.refused);
            }
            Ok(())
        }
        Err(e) => bail!("{}", e.trim_end()),
    }
}
