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
    /// Create a team; prints its id.
    Create {
        /// Its name.
        name: String,
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
        AdminCommand::Team { command: TeamCommand::Create { name } } => s(&["team", "create", name]),
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
    options.config.insert("domain".into(), config.domain.clone().into());
    options.config.insert("org".into(), config.org.into());
    options.config.insert("key".into(), hex(&key.to_bytes()).into());
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
