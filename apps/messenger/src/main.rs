//! `canopy-msg`: the Canopy messenger's command line.
//!
//! Every command runs as the device's **UI** process: it sees plaintext but holds no keys,
//! and talks to the device's **Secure** process over `HOME/secure.sock`. `up` starts Secure
//! and **Network** in the background; `admin …` runs the org admin's `member` plugin.
//! See `docs/messenger.md`.

mod admin;
mod home;
mod pipeline;
mod processes;
mod tui;
mod ui;
mod web;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use canopy_msg_secure::proto::Request;

use crate::home::{Config, Home};

/// The Canopy messenger.
#[derive(Parser)]
#[command(name = "canopy-msg", version, about = "End-to-end encrypted team messaging over Canopy.")]
struct Cli {
    /// The device's home directory [default: $CANOPY_MSG_HOME, else the platform data dir].
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write this home's configuration. Comes first for every home, admin or device.
    Init {
        /// The relay to connect to, HOST:PORT.
        #[arg(long)]
        relay: String,
        /// PEM file with the relay's certificate or its CA.
        #[arg(long, conflicts_with = "fingerprint", required_unless_present = "fingerprint")]
        ca: Option<PathBuf>,
        /// Or the relay certificate's SHA-256 fingerprint (hex), pinned.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Token presented to the relay.
        #[arg(long)]
        token: Option<String>,
        /// The org's domain (its hash is the origin of every name).
        #[arg(long)]
        domain: String,
        /// The org number.
        #[arg(long)]
        org: u32,
        /// Take the time from this clock filter (published by the `clock` plugin).
        #[arg(long)]
        clock: Option<String>,
    },
    /// Start this device's Network and Secure processes (idempotent).
    Up,
    /// Stop them.
    Down,
    /// Processes, relay link, time source, teams, outbox depth and gaps.
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Device commands.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// The teams this device is in: `ID NAME epoch=E device=D`.
    Teams {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// A team's channels: `ID NAME`.
    Channels {
        /// Team id or name.
        team: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send a message; prints its id.
    Send {
        /// Where: TEAM/CHANNEL, dm:USER (a user id or contact name) or group:GROUP (an id or name).
        target: String,
        /// The text (at most 16 KiB).
        text: String,
        /// The id of the message this answers.
        #[arg(long)]
        reply_to: Option<String>,
    },
    /// Send a direct message: `send dm:USER TEXT`. Prints its id, or `pending/N` while no
    /// device of USER is known yet (it goes as soon as one is).
    Dm {
        /// A user id or contact name.
        user: String,
        /// The text (at most 16 KiB).
        text: String,
        /// The id of the message this answers.
        #[arg(long)]
        reply_to: Option<String>,
    },
    /// Replace the text of one of this device's messages.
    Edit {
        /// The message id, TEAM/CHANNEL/DEVICE/MSG.
        id: String,
        /// The new text.
        text: String,
    },
    /// Show a conversation.
    Read {
        /// TEAM/CHANNEL, dm:USER or group:GROUP.
        target: String,
        /// One JSON object per message.
        #[arg(long)]
        json: bool,
        /// Keep printing new and edited messages.
        #[arg(long)]
        follow: bool,
        /// With --follow: stop after this many new or edited messages.
        #[arg(long, requires = "follow")]
        count: Option<usize>,
        /// With --follow: give up after this long (e.g. 10s), exiting non-zero.
        #[arg(long, requires = "follow", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// This device's user id (32 hex digits); with --json, its keys too.
    Whoami {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A team's members: `DEVICE USER [NAME] [(me)]`.
    Members {
        /// Team id or name.
        team: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Name, rename or forget a contact.
    Contact {
        #[command(subcommand)]
        command: ContactCommand,
    },
    /// Contacts and blocked users: `USER NAME [blocked]`.
    Contacts {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Block a user: nothing of theirs is shown or answered from now on.
    Block {
        /// A user id or contact name.
        user: String,
    },
    /// Lift a block: what the user sends from now on is shown.
    Unblock {
        /// A user id or contact name.
        user: String,
    },
    /// Groups: ad hoc, with admins, not tied to an org.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Bitcoin keys for pipelines (`btc key new|import|show`).
    Btc {
        #[command(subcommand)]
        command: BtcCommand,
    },
    /// Pipelines: groups that run a model (docs/pipelines.md).
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Mail: subject and body, several recipients, threads.
    Mail {
        #[command(subcommand)]
        command: MailCommand,
    },
    /// Write an encrypted backup: history, contacts, conversation state, settings and your
    /// user's identity (no MLS keys). Passphrase: $CANOPY_MSG_BACKUP_PASSPHRASE or a prompt.
    Backup {
        /// The file to write (0600).
        file: PathBuf,
    },
    /// Restore a backup into a fresh home (after `init`, before `up`). The device comes back
    /// as a new device of your user: your other devices add it to your conversations again;
    /// in teams, the admin adds it with `admin team add`.
    Restore {
        /// The backup file.
        file: PathBuf,
    },
    /// The terminal UI: chat list, conversations with threads, mail, group info. `?` inside
    /// shows every key.
    Tui,
    /// The web UI, served by this process on the device: prints one URL (with a one-time
    /// token) to open in a browser, and serves until interrupted.
    Web {
        /// Where to listen. Loopback, on an ephemeral port, unless told otherwise; any other
        /// address is warned about.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Every conversation, most recent activity first: `UNREAD CONVERSATION NAME`.
    Chats {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Star a message.
    Mark {
        /// The message id, as `read` prints it.
        id: String,
    },
    /// Take a message's star away.
    Unmark {
        /// The message id, as `read` prints it.
        id: String,
    },
    /// Marked messages, in the order they were written.
    Marked {
        /// One JSON object per message.
        #[arg(long)]
        json: bool,
    },
    /// The groups this device is in: `ID NAME members=N epoch=E`.
    Groups {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The org admin's commands (the member plugin; no background processes needed).
    Admin {
        /// The member plugin [default: $CANOPY_MSG_MEMBER_PLUGIN, else beside this binary].
        #[arg(long, global = true)]
        plugin: Option<PathBuf>,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Runs this device's Network process (started by `up`).
    #[command(hide = true)]
    Network,
    /// Runs this device's Secure process (started by `up`).
    #[command(hide = true)]
    Secure,
}

#[derive(Subcommand)]
enum MailCommand {
    /// Send one mail to every recipient; prints its reference.
    Send {
        /// Recipients: user ids or contact names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        /// The subject.
        #[arg(long)]
        subject: String,
        /// The body.
        body: String,
        /// The reference of the mail this answers.
        #[arg(long)]
        prev: Option<String>,
    },
    /// Every mail, newest first: `REF [ms] FROM: SUBJECT`.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// A mail's thread, oldest first.
    Thread {
        /// A reference in the thread.
        reference: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Create a pipeline: a group of you and the members, bound to a model (a `canopy:model`
    /// Wasm component). Prints its id.
    Create {
        /// The model file.
        model: PathBuf,
        /// The members besides you: user ids or contact names.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
        /// The parameters the model's `init` takes (JSON).
        #[arg(long, default_value = "{}")]
        params: String,
        /// Its name [default: the model file's name].
        #[arg(long)]
        name: Option<String>,
    },
    /// Every pipeline: `ID NAME model=… steps=N`.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// A pipeline's state as its model renders it for you, with the actions open to you, its
    /// state hash, and any refused step or divergence.
    Show {
        /// `pipeline:ID`, or the group's id or name.
        pipeline: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Take an action: the model builds the step, and it is sent. Prints its id.
    Act {
        /// `pipeline:ID`, or the group's id or name.
        pipeline: String,
        /// The action, as `show` lists them.
        action: String,
        /// Its arguments.
        args: Vec<String>,
        /// Approve what the model asks Secure to sign without a prompt (it is still printed).
        #[arg(long)]
        yes: bool,
        /// For a step that sends a transaction: the command it is handed to (the hex is its
        /// last argument), e.g. "bitcoin-cli -regtest sendrawtransaction".
        #[arg(long)]
        broadcast_cmd: Option<String>,
    },
}

#[derive(Subcommand)]
enum BtcCommand {
    /// Bitcoin keys for pipelines, kept in Secure.
    Key {
        #[command(subcommand)]
        command: BtcKeyCommand,
    },
}

#[derive(Subcommand)]
enum BtcKeyCommand {
    /// Make a fresh key; prints its name, public key and address.
    New {
        /// Its name (the multisig model signs with `btc`).
        #[arg(long, default_value = "btc")]
        name: String,
        /// The network its address is shown for.
        #[arg(long, default_value = "regtest")]
        network: String,
    },
    /// Import a key (WIF).
    Import {
        /// The key, WIF.
        wif: String,
        /// Its name.
        #[arg(long, default_value = "btc")]
        name: String,
        /// The network its address is shown for.
        #[arg(long, default_value = "regtest")]
        network: String,
    },
    /// Print a key's public key and address.
    Show {
        /// Its name.
        #[arg(long, default_value = "btc")]
        name: String,
        /// The network its address is shown for.
        #[arg(long, default_value = "regtest")]
        network: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group with you as its admin; prints its id.
    Create {
        /// Its name.
        name: String,
        /// Its other members: user ids or contact names.
        users: Vec<String>,
    },
    /// Rename a group (admins only).
    Rename {
        /// The group's id or name.
        group: String,
        /// The new name.
        name: String,
        /// Send it even if you are not an admin (every member refuses it; for testing).
        #[arg(long, hide = true)]
        force: bool,
    },
    /// Set a group's description (admins only).
    Describe {
        /// The group's id or name.
        group: String,
        /// The new description.
        description: String,
        /// Send it even if you are not an admin (every member refuses it; for testing).
        #[arg(long, hide = true)]
        force: bool,
    },
    /// Add users to a group: every device of each (admins only).
    Add {
        /// The group's id or name.
        group: String,
        /// User ids or contact names.
        #[arg(required = true)]
        users: Vec<String>,
        /// A note for the members.
        #[arg(long, default_value = "")]
        note: String,
        /// Send it even if you are not an admin (every member refuses it; for testing).
        #[arg(long, hide = true)]
        force: bool,
    },
    /// Remove users from a group: their devices read nothing sent afterwards (admins only).
    Remove {
        /// The group's id or name.
        group: String,
        /// User ids or contact names.
        #[arg(required = true)]
        users: Vec<String>,
        /// A note for the members.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Start a new epoch with fresh keys (admins only).
    Revoke {
        /// The group's id or name.
        group: String,
    },
    /// Leave a group on this device; its history stays. How a stalled group recovers: then
    /// an admin removes and adds you again.
    Leave {
        /// The group's id or name.
        group: String,
    },
    /// A group's name, description, admins and members.
    Info {
        /// The group's id or name.
        group: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ContactCommand {
    /// Give a user a local name, usable wherever a user id is.
    Add {
        /// The user id (32 hex digits).
        user: String,
        /// The name (1-64 bytes; not all digits, no '/' or ':', not 32 hex digits).
        name: String,
    },
    /// Rename a contact.
    Rename {
        /// The user id or current name.
        user: String,
        /// The new name.
        name: String,
    },
    /// Forget a contact's name (a block stays).
    Remove {
        /// The user id or name.
        user: String,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Publish a fresh single-use key package and print its hKP.
    KeyPackage {
        /// Ask to become a new device of another user: give the hKP to one of their devices,
        /// which runs `device link HKP`.
        #[arg(long)]
        link: bool,
    },
    /// Make the device that published key package HKP (with `--link`) a device of your user:
    /// it gets your identity, and every conversation of yours adds it from then on.
    Link {
        /// The new device's hKP (64 hex digits).
        hkp: String,
        /// Give up after this long (e.g. 30s), exiting non-zero.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() {
    let cli = Cli::parse();
    let background = matches!(cli.command, Command::Network | Command::Secure);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if background { "info" } else { "error" })))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        // One clear line.
        eprintln!("canopy-msg: {}", one_line(&e));
        std::process::exit(1);
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out += ": ";
            out += &c;
        }
    }
    out.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let home = Home::locate(cli.home)?;
    match cli.command {
        Command::Init { relay, ca, fingerprint, token, domain, org, clock } => {
            canopy_msg_core::Org::new(&domain, org).context("--org")?;
            if let Some(fp) = &fingerprint {
                canopy_sdk::parse_fingerprint(fp).context("--fingerprint")?;
            }
            if let Some(clock) = &clock {
                clock.parse::<canopy::Filter>().map_err(|e| anyhow::anyhow!("--clock {clock}: {e}"))?;
            }
            std::fs::create_dir_all(&home.dir)?;
            let ca = match ca {
                Some(path) => {
                    let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    let copy = home.path("relay-ca.pem");
                    std::fs::write(&copy, pem)?;
                    Some(copy)
                }
                None => None,
            };
            let key = home.setup_key()?;
            home.write_config(&Config { relay, ca, fingerprint, token, domain, org, clock, key: key.into() })?;
            println!("initialised {} (state sealed with a {key})", home.dir.display());
            Ok(())
        }
        Command::Up => processes::up(&home),
        Command::Down => processes::down(&home),
        Command::Status { json } => ui::status(&home, json),
        Command::Device { command: DeviceCommand::KeyPackage { link } } => ui::key_package(&home, link),
        Command::Device { command: DeviceCommand::Link { hkp, timeout } } => ui::link(&home, hkp, timeout),
        Command::Teams { json } => ui::teams(&home, json),
        Command::Channels { team, json } => ui::channels(&home, &team, json),
        Command::Send { target, text, reply_to } => ui::send(&home, &target, text, reply_to),
        Command::Dm { user, text, reply_to } => ui::send(&home, &format!("dm:{user}"), text, reply_to),
        Command::Edit { id, text } => ui::edit(&home, id, text),
        Command::Read { target, json, follow, count, timeout } => ui::read(&home, &target, json, follow, count, timeout),
        Command::Whoami { json } => ui::whoami(&home, json),
        Command::Members { team, json } => ui::members(&home, &team, json),
        Command::Contact { command } => match command {
            ContactCommand::Add { user, name } => {
                if canopy_msg_core::UserId::parse(&user).is_none() {
                    anyhow::bail!("{user:?} is not a user id (32 hex digits, as `whoami` prints)");
                }
                ui::contact(&home, Request::ContactName { user, name })
            }
            ContactCommand::Rename { user, name } => ui::contact(&home, Request::ContactName { user, name }),
            ContactCommand::Remove { user } => ui::contact(&home, Request::ContactRemove { user }),
        },
        Command::Contacts { json } => ui::contacts(&home, json),
        Command::Block { user } => ui::contact(&home, Request::Block { user, blocked: true }),
        Command::Unblock { user } => ui::contact(&home, Request::Block { user, blocked: false }),
        Command::Group { command } => {
            use canopy_msg_secure::proto::GroupOp;
            let op = |group: String, operation: GroupOp, force: bool| Request::GroupOp { group, operation, force };
            match command {
                GroupCommand::Create { name, users } => ui::group(&home, Request::GroupCreate { name, users }, ui::GroupShow::Id),
                GroupCommand::Rename { group, name, force } => ui::group(&home, op(group, GroupOp::Rename { name }, force), ui::GroupShow::Epoch),
                GroupCommand::Describe { group, description, force } => ui::group(&home, op(group, GroupOp::Describe { description }, force), ui::GroupShow::Epoch),
                GroupCommand::Add { group, users, note, force } => ui::group(&home, op(group, GroupOp::Add { users, note }, force), ui::GroupShow::Epoch),
                GroupCommand::Remove { group, users, note } => ui::group(&home, op(group, GroupOp::Remove { users, note }, false), ui::GroupShow::Epoch),
                GroupCommand::Revoke { group } => ui::group(&home, op(group, GroupOp::Revoke, false), ui::GroupShow::Epoch),
                GroupCommand::Leave { group } => ui::group(&home, Request::GroupLeave { group }, ui::GroupShow::Epoch),
                GroupCommand::Info { group, json } => ui::group(&home, Request::GroupInfo { group }, if json { ui::GroupShow::Json } else { ui::GroupShow::Info }),
            }
        }
        Command::Groups { json } => ui::groups(&home, json),
        Command::Pipeline { command } => match command {
            PipelineCommand::Create { model, members, params, name } => {
                let name = name.unwrap_or_else(|| model.file_stem().map_or_else(|| "pipeline".into(), |s| s.to_string_lossy().into_owned()));
                pipeline::create(&home, &model, &name, &members, &params)
            }
            PipelineCommand::List { json } => pipeline::list(&home, json),
            PipelineCommand::Show { pipeline: p, json } => pipeline::show(&home, &p, json),
            PipelineCommand::Act { pipeline: p, action, args, yes, broadcast_cmd } => {
                pipeline::act(&home, &p, &action, &args, &pipeline::ActOptions { approval: if yes { pipeline::Approval::Yes } else { pipeline::Approval::Prompt }, broadcast_cmd })
            }
        },
        Command::Btc { command: BtcCommand::Key { command } } => match command {
            BtcKeyCommand::New { name, network } => ui::btc_key(&home, name, canopy_msg_secure::proto::BtcKeyAction::New, network, false),
            BtcKeyCommand::Import { wif, name, network } => ui::btc_key(&home, name, canopy_msg_secure::proto::BtcKeyAction::Import { wif }, network, false),
            BtcKeyCommand::Show { name, network, json } => ui::btc_key(&home, name, canopy_msg_secure::proto::BtcKeyAction::Show, network, json),
        },
        Command::Mail { command } => match command {
            MailCommand::Send { to, subject, body, prev } => ui::mail_send(&home, Request::MailSend { to, subject, body, prev }),
            MailCommand::List { json } => ui::mails(&home, Request::MailList, json),
            MailCommand::Thread { reference, json } => ui::mails(&home, Request::MailThread { reference }, json),
        },
        Command::Backup { file } => ui::backup(&home, &file),
        Command::Restore { file } => processes::restore(&home, &file),
        Command::Chats { json } => ui::chats(&home, json),
        Command::Tui => tui::run(&home),
        Command::Web { listen } => web::run(&home, listen),
        Command::Mark { id } => ui::mark(&home, id, true),
        Command::Unmark { id } => ui::mark(&home, id, false),
        Command::Marked { json } => ui::marked(&home, json),
        Command::Admin { plugin, command } => admin::run(&home, plugin, command),
        Command::Network => processes::network(&home),
        Command::Secure => processes::secure(&home),
    }
}
