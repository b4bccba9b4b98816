//! `canopy-msg tui`: the terminal UI, a UI process that talks only to Secure.
//!
//! Three threads feed one loop: the terminal's keys, Secure's watch stream (every new or
//! edited message, of every conversation), and a one-second tick that asks Secure for its
//! status (which carries Network's report on the relay). The loop turns each into requests
//! ([`app::App`] decides which), asks Secure, and draws ([`draw::draw`]).

pub mod app;
pub mod draw;
#[cfg(test)]
mod tests;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use canopy_msg_secure::proto::{MessageLine, Reply, Request};
use crossterm::event::{Event, KeyEvent, KeyEventKind};

use crate::home::Home;
use crate::ui::Secure;
use app::App;

enum Input {
    Key(KeyEvent),
    Paste(String),
    Message(Box<MessageLine>),
    /// The watch stream is (back) up: what changed meanwhile is fetched again.
    Watching,
    Redraw,
    /// The terminal's input ended: nothing could ever quit, so the UI does.
    Closed,
}

/// How long the UI waits for one answer from Secure.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests that only read: asked twice in one round, they are asked once.
fn reads_only(request: &Request) -> bool {
    matches!(request, Request::Read { .. } | Request::Chats | Request::Status | Request::MailList | Request::MailThread { .. } | Request::GroupInfo { .. } | Request::Contacts)
}

/// Secure, connected on demand: a lost connection (Secure restarted) is opened again on the
/// next request.
struct Calls<'a> {
    home: &'a Home,
    secure: Option<Secure>,
}

impl Calls<'_> {
    fn call(&mut self, request: &Request) -> Result<Reply, String> {
        let secure = match self.secure.as_mut() {
            Some(s) => s,
            None => {
                let mut s = Secure::connect(self.home).map_err(|e| e.to_string())?;
                // A Secure busy for long (a big batch in) shows as an error, not a frozen screen.
                s.set_timeout(CALL_TIMEOUT).map_err(|e| e.to_string())?;
                self.secure.insert(s)
            }
        };
        secure.call(request).map_err(|e| {
            // A transport error closes the connection; a refusal from Secure does not.
            if e.downcast_ref::<std::io::Error>().is_some() || e.to_string().contains("closed the connection") {
                self.secure = None;
            }
            format!("{e:#}")
        })
    }
}

/// Secure's watch stream, forwarded to the loop; reconnects while the UI runs.
fn watch(home: Home, tx: mpsc::Sender<Input>) {
    loop {
        if let Ok(mut secure) = Secure::connect(&home)
            && secure.call(&Request::Watch).is_ok()
        {
            if tx.send(Input::Watching).is_err() {
                return;
            }
            while let Ok(Some(reply)) = secure.next(None) {
                if let Reply::Message(m) = reply
                    && tx.send(Input::Message(Box::new(m))).is_err()
                {
                    return;
                }
            }
        }
        // Secure is down or restarting; the status tick says so on screen.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn keys(tx: mpsc::Sender<Input>) {
    loop {
        let input = match crossterm::event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => Input::Key(k),
            Ok(Event::Paste(text)) => Input::Paste(text),
            Ok(Event::Resize(..)) => Input::Redraw,
            Ok(_) => continue,
            Err(_) => {
                let _ = tx.send(Input::Closed);
                return;
            }
        };
        if tx.send(input).is_err() {
            return;
        }
    }
}

/// Runs the terminal UI until `q`.
pub fn run(home: &Home) -> anyhow::Result<()> {
    // Fail before taking the terminal if the device is not up.
    let me = match Secure::connect(home)?.call(&Request::Whoami)? {
        Reply::Whoami { user, .. } => user,
        other => anyhow::bail!("unexpected reply from Secure: {other:?}"),
    };
    let (tx, rx) = mpsc::channel();
    {
        let (home, tx) = (home.clone(), tx.clone());
        std::thread::Builder::new().name("watch".into()).spawn(move || watch(home, tx))?;
    }
    std::thread::Builder::new().name("keys".into()).spawn(move || keys(tx))?;
    let mut terminal = ratatui::try_init().context("opening the terminal")?;
    // Pastes arrive as one event, so pasted text is never taken for keys.
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableBracketedPaste);
    let result = run_loop(&mut terminal, home, me, &rx);
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
    let restored = ratatui::try_restore().context("restoring the terminal");
    // The loop's own error matters more than the restore's.
    result.and(restored)
}

fn run_loop(terminal: &mut ratatui::DefaultTerminal, home: &Home, me: String, rx: &mpsc::Receiver<Input>) -> anyhow::Result<()> {
    let mut calls = Calls { home, secure: None };
    let (mut app, mut requests) = App::new(me);
    let tick = Duration::from_secs(1);
    let mut last_status = Instant::now();
    loop {
        // Carry out what was asked, including what the answers ask for next; a request
        // already done in this round (a refresh asked for twice) is done once.
        let mut done: Vec<Request> = Vec::new();
        while !requests.is_empty() {
            for request in std::mem::take(&mut requests) {
                if reads_only(&request) {
                    if done.contains(&request) {
                        continue;
                    }
                    done.push(request.clone());
                } else {
                    // A change: what was read before it is stale, and is read again if asked.
                    done.clear();
                }
                let reply = calls.call(&request);
                requests.extend(app.answer(&request, reply));
            }
        }
        // Pipelines' models run here, in this process, like `pipeline show` and `act`.
        for want in std::mem::take(&mut app.wants) {
            match &want {
                app::Want::Pane(id) => app.pane(crate::pipeline::pane(home, id).map_err(|e| format!("{e:#}"))),
                app::Want::Act { pipeline, action, args, approved } => {
                    // The first time, a signing stops the action and comes back for the user
                    // to approve on screen; approved, the action is taken again and Secure
                    // signs only what was approved.
                    let approval = approved.clone().map_or(crate::pipeline::Approval::Review, crate::pipeline::Approval::Approved);
                    let options = crate::pipeline::ActOptions { approval, broadcast_cmd: None };
                    let result = crate::pipeline::act_step(home, pipeline, action, args, &options).map_err(|e| format!("{e:#}"));
                    requests.extend(app.acted(&want, result));
                }
            }
        }
        if !requests.is_empty() {
            continue;
        }
        if app.quit {
            return Ok(());
        }
        terminal.draw(|frame| draw::draw(frame, &app))?;
        let wait = tick.saturating_sub(last_status.elapsed());
        let mut inputs = match rx.recv_timeout(wait) {
            Ok(input) => vec![input],
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        // Everything already waiting is one round: a burst of messages is one redraw.
        inputs.extend(rx.try_iter());
        for input in inputs {
            match input {
                Input::Key(k) => requests.extend(app.key(k)),
                Input::Paste(text) => app.paste(&text),
                Input::Closed => app.quit = true,
                Input::Message(m) => requests.extend(app.incoming(&m)),
                Input::Watching => requests.extend(app.incoming_all()),
                Input::Redraw => {}
            }
        }
        if last_status.elapsed() >= tick {
            requests.push(Request::Status);
            last_status = Instant::now();
        }
    }
}
