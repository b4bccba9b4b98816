//! The UI side of each command: a request to Secure, and its answer printed for people
//! (one line per item) or scripts (`--json`, one object per line).

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use canopy_msg_secure::proto::{self, ContactLine, GroupLine, MessageLine, Reply, Request};

use crate::home::Home;

/// A connection to Secure.
pub struct Secure {
    stream: UnixStream,
}

impl Secure {
    /// Connects; a clear error if the processes are not running.
    pub fn connect(home: &Home) -> anyhow::Result<Secure> {
        home.config()?;
        let path = home.path("secure.sock");
        let stream = UnixStream::connect(&path).map_err(|_| anyhow::anyhow!("this device's processes are not running: run `canopy-msg up`"))?;
        // A Secure that accepts but never answers must not hang the UI.
        stream.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        Ok(Secure { stream })
    }

    /// Sends a request and reads its reply; a Secure error becomes an error.
    pub fn call(&mut self, request: &Request) -> anyhow::Result<Reply> {
        proto::write_frame(&mut self.stream, request).context("talking to Secure")?;
        match proto::read_frame::<Reply>(&mut self.stream).context("talking to Secure")? {
            Some(Reply::Error { message }) => bail!("{message}"),
            Some(reply) => Ok(reply),
            None => bail!("Secure closed the connection"),
        }
    }

    /// How long [`Secure::call`] waits for an answer.
    pub fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))
    }

    /// The next streamed reply, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Option<Duration>) -> anyhow::Result<Option<Reply>> {
        self.stream.set_read_timeout(timeout)?;
        match proto::read_frame::<Reply>(&mut self.stream) {
            Ok(r) => Ok(r),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

pub(crate) fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from Secure: {reply:?}")
}

/// `status`.
pub fn status(home: &Home, json: bool) -> anyhow::Result<()> {
    let config = home.config()?;
    let processes = crate::processes::running(home);
    let network = crate::processes::network_status(home);
    let secure = match Secure::connect(home).and_then(|mut s| s.call(&Request::Status)) {
        Ok(Reply::Status(s)) => Some(s),
        _ => None,
    };
    if json {
        let v = serde_json::json!({
            "home": home.dir, "relay": config.relay, "domain": config.domain, "org": config.org,
            "processes": processes, "network": network, "secure": secure,
        });
        println!("{v}");
        return Ok(());
    }
    println!("home {}  relay {}  org {} ({})", home.dir.display(), config.relay, config.org, config.domain);
    for (name, pid) in &processes {
        println!("{name}: {}", pid.map_or("not running".to_string(), |p| format!("running (pid {p})")));
    }
    if let Some(n) = &network {
        println!(
            "relay link: {}  outbox: {}  cached chunks: {}",
            if n.parent_connected { "up" } else { "down" },
            n.outbox,
            n.chunks
        );
    }
    match &secure {
        Some(s) => {
            println!("user: {}", s.user);
            println!("time source: {}", s.time_source);
            println!("sandbox: {}", if s.sandboxed { "on" } else { "OFF" });
            for t in &s.teams {
                let gap = match t.gap {
                    Some((a, b)) => format!("  GAP: commits {a}..={b} missing; if they expired, ask the admin to re-add this device"),
                    None => String::new(),
                };
                println!("team {} {} epoch={} device={}{gap}", t.id, t.name, t.epoch, t.device);
                if let Some(why) = &t.stalled {
                    println!("  STALLED: {why}; ask the admin to re-add this device");
                }
            }
            for c in &s.conversations {
                println!("{} {} {} epoch={} device={}", c.kind, c.id, clean(&c.name), c.epoch, c.device);
                if let Some(why) = &c.stalled {
                    println!("  STALLED: {why}; `canopy-msg group leave {}`, then ask an admin to add you again", c.id);
                }
            }
            if s.pending > 0 {
                println!("{} direct messages wait for their recipients' key packages", s.pending);
            }
            for hkp in &s.waiting {
                println!("waiting for a welcome for key package {hkp}");
            }
            println!(
                "messages {}  commits {}  refused {}  duplicates {}  held {}  blocked {}  unacknowledged {}",
                s.messages, s.commits, s.rejected, s.duplicates, s.held, s.blocked, s.unacknowledged
            );
        }
        None => println!("secure: not answering"),
    }
    Ok(())
}

/// `device link HKP`: asks Secure to link, then waits until it has.
pub fn link(home: &Home, hkp: String, timeout: Duration) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::DeviceLink { hkp: hkp.clone() })? {
        Reply::Pong => {}
        other => return Err(unexpected(other)),
    }
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        let status = match Secure::connect(home)?.call(&Request::Status)? {
            Reply::Status(s) => s,
            other => return Err(unexpected(other)),
        };
        if status.linked.contains(&hkp) {
            println!("linked {hkp}");
            return Ok(());
        }
        if !status.linking.contains(&hkp) {
            bail!("linking {hkp} failed: see Secure's log");
        }
        if Instant::now() >= deadline {
            bail!("the key package {hkp} did not arrive within {}: is it published (`device key-package --link`)?", humantime::format_duration(timeout));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `device key-package [--link]`.
pub fn key_package(home: &Home, link: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::KeyPackage { link })? {
        Reply::KeyPackage { hkp } => {
            println!("{hkp}");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `teams`.
pub fn teams(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Teams)? {
        Reply::Teams { teams } => {
            for t in teams {
                if json {
                    println!("{}", serde_json::json!({"id": t.id, "name": t.name, "epoch": t.epoch, "device": t.device}));
                } else {
                    println!("{} {} epoch={} device={}", t.id, t.name, t.epoch, t.device);
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `channels TEAM`.
pub fn channels(home: &Home, team: &str, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Channels { team: team.into() })? {
        Reply::Channels { channels } => {
            for c in channels {
                if json {
                    println!("{}", serde_json::json!({"id": c.id, "name": c.name}));
                } else {
                    println!("{} {}", c.id, c.name);
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `whoami`.
pub fn whoami(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Whoami)? {
        Reply::Whoami { user, user_key, device_key } => {
            if json {
                println!("{}", serde_json::json!({"user": user, "user_key": user_key, "device_key": device_key}));
            } else {
                println!("{user}");
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `members TEAM`.
pub fn members(home: &Home, team: &str, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Members { team: team.into() })? {
        Reply::Members { members } => {
            for m in members {
                if json {
                    println!("{}", serde_json::to_string(&m).expect("serializable"));
                } else {
                    let user = m.user.as_deref().unwrap_or("-");
                    let name = m.name.map(|n| format!(" {}", clean(&n))).unwrap_or_default();
                    println!("{} {user}{name}{}", m.device, if m.me { " (me)" } else { "" });
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn print_contact(c: &ContactLine, json: bool) {
    if json {
        println!("{}", serde_json::to_string(c).expect("serializable"));
    } else {
        let name = c.name.as_deref().map_or_else(|| "-".to_string(), clean);
        println!("{} {name}{}", c.user, if c.blocked { " blocked" } else { "" });
    }
}

/// `contact add|rename|remove`, `block`, `unblock`: prints the contact as it is now.
pub fn contact(home: &Home, request: Request) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&request)? {
        Reply::Contact(c) => {
            print_contact(&c, false);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `contacts`.
pub fn contacts(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Contacts)? {
        Reply::Contacts { contacts } => {
            for c in &contacts {
                print_contact(c, json);
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `mail send`.
pub fn mail_send(home: &Home, request: Request) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&request)? {
        Reply::Mailed { reference, queued } => {
            println!("{reference}");
            if queued {
                eprintln!("queued");
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `mail list`, `mail thread`.
pub fn mails(home: &Home, request: Request, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&request)? {
        Reply::Mails { mails } => {
            for m in mails {
                if json {
                    println!("{}", serde_json::to_string(&m).expect("serializable"));
                } else {
                    let prev = m.prev.as_deref().map(|p| format!("  ↳ {p}")).unwrap_or_default();
                    println!("{} [{}] {}: {} — {}{prev}", m.reference, m.sent_ms, clean(&m.from), clean(&m.subject), clean(&m.body));
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `backup FILE`.
pub fn backup(home: &Home, file: &std::path::Path) -> anyhow::Result<()> {
    let settings = std::fs::read_to_string(home.path("config.toml")).unwrap_or_default();
    let mut secure = Secure::connect(home)?;
    let passphrase = crate::home::backup_passphrase(true)?;
    // Secure writes the file: the backup holds the user's identity key, which the UI never sees.
    let path = std::path::absolute(file)?;
    match secure.call(&Request::Backup { path: path.display().to_string(), passphrase, settings })? {
        Reply::BackedUp { groups, messages, bytes } => {
            println!("backed up {groups} conversations and {messages} messages to {} ({bytes} bytes)", file.display());
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `btc key new|import|show`: prints the public key and address.
pub fn btc_key(home: &Home, name: String, action: proto::BtcKeyAction, network: String, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::BtcKey { name, action, network: Some(network) })? {
        Reply::BtcKey(k) => {
            if json {
                println!("{}", serde_json::to_string(&k)?);
            } else {
                println!("{} {} {}", k.name, k.public_key, k.address);
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `chats`.
pub fn chats(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Chats)? {
        Reply::Chats { chats } => {
            for c in chats {
                if json {
                    println!("{}", serde_json::to_string(&c).expect("serializable"));
                } else {
                    println!("{:>4} {} {}", c.unread, c.conversation, clean(&c.name));
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `mark ID` / `unmark ID`.
pub fn mark(home: &Home, id: String, marked: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Mark { id, marked })? {
        Reply::Pong => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// `marked`.
pub fn marked(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Marked)? {
        Reply::Messages { messages, .. } => {
            for m in &messages {
                print(m, json);
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// What a group command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupShow {
    /// The group's id (`group create`).
    Id,
    /// `ID epoch=E` (operations).
    Epoch,
    /// Every field, for people.
    Info,
    /// One JSON object.
    Json,
}

fn print_group_info(g: &GroupLine) {
    println!("{} {}", g.id, clean(&g.name));
    if !g.description.is_empty() {
        println!("description: {}", clean(&g.description));
    }
    let role = if g.removed { "  REMOVED: this device reads nothing new" } else if g.committer { "  (committer)" } else { "" };
    println!("epoch {}  device {}{role}", g.epoch, g.device);
    if let Some(why) = &g.stalled {
        println!("STALLED: {why}. Recovery: `canopy-msg group leave {}`, then an admin removes and adds you again", g.id);
    }
    for m in &g.members {
        let name = m.name.as_deref().map(|n| format!(" {}", clean(n))).unwrap_or_default();
        println!("member {}{name}{} devices={}", m.user, if m.admin { " (admin)" } else { "" }, m.devices);
    }
}

/// `group …`.
pub fn group(home: &Home, request: Request, show: GroupShow) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&request)? {
        Reply::Group { group, requested } => {
            match show {
                GroupShow::Id => println!("{}", group.id),
                GroupShow::Epoch => println!("{} epoch={}", group.id, group.epoch),
                GroupShow::Info => print_group_info(&group),
                GroupShow::Json => println!("{}", serde_json::to_string(&group).expect("serializable")),
            }
            if requested {
                eprintln!("asked the group's committer, which carries it out once it is online");
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `groups`.
pub fn groups(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Groups)? {
        Reply::Groups { groups } => {
            for g in groups {
                if json {
                    println!("{}", serde_json::to_string(&g).expect("serializable"));
                } else {
                    println!("{} {} members={} epoch={}{}", g.id, clean(&g.name), g.members.len(), g.epoch, if g.removed { " removed" } else { "" });
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// Text from someone else, made safe for one terminal line: newlines and tabs become spaces;
/// control characters (escape sequences) and the invisible format characters that reorder
/// or hide text (bidi overrides and isolates, zero-width ones) go.
pub(crate) fn clean(text: &str) -> String {
    text.chars().map(|c| if matches!(c, '\n' | '\r' | '\t') { ' ' } else { c }).filter(|c| !c.is_control() && !is_format(*c)).collect()
}

/// Unicode format characters that can make text read other than it is.
fn is_format(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

fn sent(home: &Home, reply: Reply) -> anyhow::Result<()> {
    match reply {
        Reply::Sent { id, queued } => {
            println!("{id}");
            // Network's own report says whether the relay took it yet.
            let relay_down = crate::processes::network_status(home).is_none_or(|n| !n.parent_connected || n.outbox > 0);
            if queued || relay_down {
                eprintln!("queued");
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `send TO TEXT` (and `dm USER TEXT`, which is `send dm:USER TEXT`).
pub fn send(home: &Home, to: &str, text: String, reply_to: Option<String>) -> anyhow::Result<()> {
    sent(home, Secure::connect(home)?.call(&Request::Send { to: to.into(), text, reply_to })?)
}

/// `edit ID TEXT`.
pub fn edit(home: &Home, id: String, text: String) -> anyhow::Result<()> {
    sent(home, Secure::connect(home)?.call(&Request::Edit { id, text })?)
}

fn print(m: &MessageLine, json: bool) {
    if json {
        println!("{}", serde_json::to_string(m).expect("serializable"));
    } else {
        let thread = m.reply_to.as_deref().map(|r| format!("  ↳ {r}")).unwrap_or_default();
        let edited = if m.edited { " (edited)" } else { "" };
        let pending = if m.pending { " (pending)" } else if m.marked { " *" } else { "" };
        println!("{} [{}] {}: {}{edited}{pending}{thread}", m.id, m.sent_ms, clean(&m.from), clean(&m.text));
    }
}

/// `read CONVERSATION`.
pub fn read(home: &Home, conversation: &str, json: bool, follow: bool, count: Option<usize>, timeout: Option<Duration>) -> anyhow::Result<()> {
    // Follow first, then read: nothing that arrives in between is missed.
    let mut stream = if follow {
        let mut s = Secure::connect(home)?;
        s.call(&Request::Follow { conversation: conversation.into() })?;
        Some(s)
    } else {
        None
    };
    // A long history comes in pages, newest first; printed oldest first.
    let mut secure = Secure::connect(home)?;
    let mut messages: Vec<MessageLine> = Vec::new();
    let mut before = None;
    loop {
        match secure.call(&Request::Read { conversation: conversation.into(), before: before.take() })? {
            Reply::Messages { messages: page, more } => {
                let first = page.first().map(|m| m.id.clone());
                messages.splice(0..0, page);
                match first {
                    Some(id) if more => before = Some(id),
                    _ => break,
                }
            }
            other => return Err(unexpected(other)),
        }
    }
    for m in &messages {
        print(m, json);
    }
    let Some(stream) = stream.as_mut() else { return Ok(()) };
    let mut seen: std::collections::HashSet<(String, String)> = messages.into_iter().map(|m| (m.id, m.text)).collect();
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut printed = 0;
    while count.is_none_or(|n| printed < n) {
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => bail!("timed out after {} with {printed} new messages", humantime::format_duration(timeout.unwrap_or_default())),
            },
            None => None,
        };
        match stream.next(left)? {
            Some(Reply::Message(m)) => {
                if seen.insert((m.id.clone(), m.text.clone())) {
                    print(&m, json);
                    printed += 1;
                }
            }
            Some(other) => return Err(unexpected(other)),
            None if left.is_some() => continue,
            None => bail!("Secure stopped"),
        }
    }
    Ok(())
}
