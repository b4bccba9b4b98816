//! The terminal UI's state and what each key does to it: no terminal, no socket. A key or an
//! incoming message turns into [`Request`]s for Secure; their answers come back through
//! [`App::answer`]. That split is what lets the widget tests drive the UI without a device.

use canopy_msg_secure::proto::{ChatLine, GroupLine, GroupOp, MailLine, MessageLine, Reply, Request, SecureStatus};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Which pane keys go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Focus {
    /// The chat list.
    #[default]
    Chats,
    /// The open conversation (or the mailbox).
    Conversation,
    /// The compose box.
    Compose,
}

/// A field of the mail compose form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailField {
    /// Recipients: user ids or contact names, separated by spaces or commas.
    To,
    /// The subject.
    Subject,
    /// The body.
    Body,
}

/// What the compose box is writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compose {
    /// A message to the open conversation, or a reply in a thread.
    Message {
        /// The text so far.
        text: String,
        /// The thread root it answers.
        reply_to: Option<String>,
    },
    /// A new text for one of this user's messages.
    Edit {
        /// The message id.
        id: String,
        /// The new text so far.
        text: String,
    },
    /// A mail.
    Mail {
        /// Recipients.
        to: String,
        /// Subject.
        subject: String,
        /// Body.
        body: String,
        /// The mail it answers.
        prev: Option<String>,
        /// The field being typed.
        field: MailField,
    },
}

/// A line in the status bar that is not the relay's state: the last error or confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What to say.
    pub text: String,
    /// Whether it is an error.
    pub error: bool,
}

/// The terminal UI's state.
#[derive(Debug, Default)]
pub struct App {
    /// This device's user id.
    pub me: String,
    /// The chat list, most recent activity first (as Secure orders it).
    pub chats: Vec<ChatLine>,
    /// The selected line of the chat list.
    pub selected: usize,
    /// The open conversation's address (`TEAM/CHANNEL`, `dm:USER`, `group:ID`, `mail`).
    pub open: Option<String>,
    /// The open conversation's messages, in Secure's order.
    pub messages: Vec<MessageLine>,
    /// The mailbox, newest first, when `open` is `mail`.
    pub mails: Vec<MailLine>,
    /// The mail thread being read, oldest first.
    pub thread: Option<Vec<MailLine>>,
    /// The selected message (by index into [`App::rows`]) or mail.
    pub cursor: usize,
    /// Where keys go.
    pub focus: Focus,
    /// The compose box, while writing.
    pub compose: Option<Compose>,
    /// The group-info pane, while shown.
    pub info: Option<GroupLine>,
    /// Whether the help overlay is shown.
    pub help: bool,
    /// Secure's latest status; `None` while Secure does not answer.
    pub status: Option<SecureStatus>,
    /// The last error or confirmation.
    pub notice: Option<Notice>,
    /// Set by `q` or Ctrl-C.
    pub quit: bool,
    /// Whether the open conversation has older messages than those shown (a long history
    /// comes in pages; `canopy-msg read` prints it all).
    pub older: bool,
    /// The open pipeline's pane: its model's view for this user.
    pub pipeline: Option<crate::pipeline::Pane>,
    /// What the loop does besides asking Secure: run a pipeline's model.
    pub wants: Vec<Want>,
    /// What was last submitted, until Secure has answered: given back if it failed.
    pub sent_draft: Option<Compose>,
    /// A signing a pipeline action asks for, shown over everything until the user approves
    /// (`y`) or refuses (`n`, Esc) it.
    pub approval: Option<Pending>,
}

/// A pipeline action waiting for the user's approval of what it signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The pipeline's group id.
    pub pipeline: String,
    /// The action.
    pub action: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// What Secure says signing means.
    pub review: crate::pipeline::Review,
}

/// Work for the loop that is not a request to Secure: running a pipeline's model (in this
/// process, as `pipeline show` and `act` do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Run the model of this pipeline (group id) and show its pane.
    Pane(String),
    /// Take an action in this pipeline.
    Act {
        /// The pipeline's group id.
        pipeline: String,
        /// The action.
        action: String,
        /// Its arguments.
        args: Vec<String>,
        /// The digest of the signing the user approved, when taken again after approval;
        /// `None` the first time, which stops at any signing to ask.
        approved: Option<String>,
    },
}

/// One row of a conversation as shown: a message and how deep in its thread it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Index into [`App::messages`].
    pub message: usize,
    /// 0 for a thread root, 1 for a reply.
    pub depth: u8,
}

/// The key help, as the overlay shows it: (keys, what they do).
pub const HELP: &[(&str, &str)] = &[
    ("?", "show or hide this help"),
    ("Tab", "next pane: chats → conversation → compose"),
    ("↑ ↓  k j  g G", "move in the chat list or the conversation"),
    ("Enter", "open a chat · write a message · open a mail's thread"),
    ("r", "reply in the selected message's thread, or to the mail"),
    ("e", "edit the selected message (your own)"),
    ("m", "mark or unmark the selected message"),
    ("i", "group info pane (in a group)"),
    ("n", "new mail"),
    ("Esc", "cancel writing · close a pane · back to the chats"),
    ("q  Ctrl-C", "quit (Ctrl-C also while writing)"),
    ("/dm USER", "compose box: open a direct message"),
    ("/group NAME USER…", "compose box: create a group"),
    ("/rename NAME  /describe TEXT", "group admins: rename, describe"),
    ("/add USER…  /remove USER…", "group admins: add, remove members"),
    ("/revoke", "group admins: new keys (a new epoch)"),
    ("/act ACTION ARGS…", "pipelines: take an action the pane lists"),
];

impl App {
    /// A new UI for user `me`, with the requests that fill it.
    pub fn new(me: String) -> (App, Vec<Request>) {
        (App { me, ..App::default() }, vec![Request::Chats, Request::Status])
    }

    /// Where keys go.
    pub fn focus(&self) -> Focus {
        self.focus
    }

    fn set_focus(&mut self, focus: Focus) {
        self.focus = focus;
    }

    /// Whether the open conversation is the mailbox.
    pub fn in_mail(&self) -> bool {
        self.open.as_deref() == Some("mail")
    }

    /// The open group's id, if the open conversation is a group.
    pub fn open_group(&self) -> Option<&str> {
        self.open.as_deref()?.strip_prefix("group:")
    }

    /// The open pipeline's id, if the open conversation is a group bound to a model.
    pub fn open_pipeline(&self) -> Option<&str> {
        let open = self.open.as_deref()?;
        self.chats.iter().find(|c| c.conversation == open && c.kind == "pipeline")?;
        open.strip_prefix("group:")
    }

    /// A pipeline's pane, once the loop has run its model: kept only if it is still open.
    pub fn pane(&mut self, result: Result<crate::pipeline::Pane, String>) {
        match result {
            Ok(p) if self.open_pipeline() == Some(p.id.as_str()) => self.pipeline = Some(p),
            Ok(_) => {}
            Err(e) => self.say(e, true),
        }
    }

    /// An action's step was sent, or needs the user's approval of a signing, or failed.
    pub fn acted(&mut self, want: &Want, result: Result<crate::pipeline::Acted, String>) -> Vec<Request> {
        match result {
            Ok(crate::pipeline::Acted::Sent(_)) => {
                self.sent_draft = None;
                if matches!(want, Want::Act { approved: Some(_), .. }) {
                    self.say("signed and sent", false);
                }
                self.reload()
            }
            Ok(crate::pipeline::Acted::Review(review)) => {
                self.sent_draft = None;
                if let Want::Act { pipeline, action, args, .. } = want {
                    self.approval = Some(Pending { pipeline: pipeline.clone(), action: action.clone(), args: args.clone(), review });
                }
                Vec::new()
            }
            Err(e) => {
                if let Some(draft) = self.sent_draft.take() {
                    self.compose = Some(draft);
                    self.set_focus(Focus::Compose);
                }
                self.say(e, true);
                Vec::new()
            }
        }
    }

    /// The conversation's messages in thread order: each root in the order Secure gave, then
    /// its replies in theirs. A message whose parent is not a shown root (missing, itself a
    /// reply, or the message itself) stands as a root: every message is shown exactly once.
    pub fn rows(&self) -> Vec<Row> {
        let ids: std::collections::HashMap<&str, usize> = self.messages.iter().enumerate().map(|(i, m)| (m.id.as_str(), i)).collect();
        let parent = |i: usize| -> Option<usize> {
            let p = *ids.get(self.messages[i].reply_to.as_deref()?)?;
            // A reply's parent must itself be a root.
            (p != i && self.messages[p].reply_to.as_deref().is_none_or(|r| !ids.contains_key(r))).then_some(p)
        };
        let mut replies: std::collections::HashMap<usize, Vec<usize>> = std::collections::HashMap::new();
        let mut roots = Vec::new();
        for i in 0..self.messages.len() {
            match parent(i) {
                Some(p) => replies.entry(p).or_default().push(i),
                None => roots.push(i),
            }
        }
        let mut rows = Vec::with_capacity(self.messages.len());
        for r in roots {
            rows.push(Row { message: r, depth: 0 });
            rows.extend(replies.remove(&r).unwrap_or_default().into_iter().map(|m| Row { message: m, depth: 1 }));
        }
        rows
    }

    /// The selected message, in the conversation view.
    pub fn selected_message(&self) -> Option<&MessageLine> {
        let row = *self.rows().get(self.cursor)?;
        self.messages.get(row.message)
    }

    /// The selected mail: in a thread, or in the mailbox.
    pub fn selected_mail(&self) -> Option<&MailLine> {
        match &self.thread {
            Some(thread) => thread.get(self.cursor),
            None => self.mails.get(self.cursor),
        }
    }

    /// How many rows the conversation view has.
    fn row_count(&self) -> usize {
        if self.in_mail() {
            self.thread.as_ref().map_or(self.mails.len(), Vec::len)
        } else {
            self.rows().len()
        }
    }

    /// The requests that fetch what the open conversation shows.
    fn reload(&mut self) -> Vec<Request> {
        if let Some(id) = self.open_pipeline() {
            let want = Want::Pane(id.to_string());
            if !self.wants.contains(&want) {
                self.wants.push(want);
            }
        }
        match self.open.as_deref() {
            None => vec![Request::Chats],
            Some("mail") => {
                let mut r = vec![Request::Read { conversation: "mail".into(), before: None }, Request::MailList];
                if let Some(reference) = self.thread.as_ref().and_then(|t| t.first()).map(|m| m.reference.clone()) {
                    r.push(Request::MailThread { reference });
                }
                r.push(Request::Chats);
                r
            }
            Some(c) => {
                let mut r = vec![Request::Read { conversation: c.into(), before: None }, Request::Chats];
                if self.info.is_some()
                    && let Some(g) = self.open_group()
                {
                    r.push(Request::GroupInfo { group: g.into() });
                }
                r
            }
        }
    }

    fn open(&mut self, conversation: String) -> Vec<Request> {
        if self.open.as_deref() != Some(conversation.as_str()) {
            self.messages.clear();
            self.mails.clear();
            self.thread = None;
            self.info = None;
            self.pipeline = None;
            self.cursor = usize::MAX; // the newest, once loaded
        }
        self.open = Some(conversation);
        self.set_focus(Focus::Conversation);
        self.reload()
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.notice = Some(Notice { text: text.into(), error });
    }

    /// A new or edited message arrived (from Secure's watch stream).
    pub fn incoming(&mut self, message: &MessageLine) -> Vec<Request> {
        if self.open.as_deref() == Some(message.conversation.as_str()) {
            self.reload()
        } else {
            vec![Request::Chats]
        }
    }

    /// Everything again: after the watch stream was (re)opened, what arrived meanwhile.
    pub fn incoming_all(&mut self) -> Vec<Request> {
        let mut r = self.reload();
        r.push(Request::Chats);
        r.push(Request::Status);
        r
    }

    /// What a key does.
    pub fn key(&mut self, key: KeyEvent) -> Vec<Request> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return Vec::new();
        }
        if let Some(pending) = &self.approval {
            // Nothing else happens until the signing is approved or refused.
            match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    let Pending { pipeline, action, args, review } = pending.clone();
                    self.approval = None;
                    self.wants.push(Want::Act { pipeline, action, args, approved: Some(review.digest) });
                }
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {
                    self.approval = None;
                    self.say("not approved: nothing was signed", true);
                }
                _ => {}
            }
            return Vec::new();
        }
        if self.help {
            // Any key closes the help; `q` still quits.
            self.help = false;
            if key.code == KeyCode::Char('q') {
                self.quit = true;
            }
            return Vec::new();
        }
        if self.focus() == Focus::Compose {
            return self.compose_key(key);
        }
        self.notice = None;
        match key.code {
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Tab => {
                let next = match self.focus() {
                    Focus::Chats if self.open.is_some() => Focus::Conversation,
                    Focus::Chats => return self.start_compose(None),
                    Focus::Conversation => return self.start_compose(None),
                    Focus::Compose => Focus::Chats,
                };
                self.set_focus(next);
            }
            KeyCode::Char('n') => return self.start_mail(Vec::new(), String::new(), None),
            _ => {
                return match self.focus() {
                    Focus::Chats => self.chats_key(key),
                    _ => self.conversation_key(key),
                };
            }
        }
        Vec::new()
    }

    fn chats_key(&mut self, key: KeyEvent) -> Vec<Request> {
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => self.selected = (self.selected + 1).min(self.chats.len().saturating_sub(1)),
            KeyCode::Home | KeyCode::Char('g') => self.selected = 0,
            KeyCode::End | KeyCode::Char('G') => self.selected = self.chats.len().saturating_sub(1),
            KeyCode::Enter | KeyCode::Right | KeyCode::Char('l') => match self.chats.get(self.selected) {
                Some(chat) => return self.open(chat.conversation.clone()),
                // Nothing to open yet: write (`/dm USER`, `/group …`).
                None => return self.start_compose(None),
            },
            _ => {}
        }
        Vec::new()
    }

    fn conversation_key(&mut self, key: KeyEvent) -> Vec<Request> {
        let rows = self.row_count();
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => self.cursor = self.cursor.min(rows.saturating_sub(1)).saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => self.cursor = (self.cursor.saturating_add(1)).min(rows.saturating_sub(1)),
            KeyCode::Home | KeyCode::Char('g') => self.cursor = 0,
            KeyCode::End | KeyCode::Char('G') => self.cursor = rows.saturating_sub(1),
            KeyCode::Esc | KeyCode::Left | KeyCode::Char('h') => {
                if self.info.take().is_none() && self.thread.take().is_none() {
                    self.set_focus(Focus::Chats);
                } else {
                    self.cursor = usize::MAX;
                    self.clamp();
                }
            }
            KeyCode::Enter if self.in_mail() && self.thread.is_none() => {
                if let Some(m) = self.selected_mail() {
                    return vec![Request::MailThread { reference: m.reference.clone() }];
                }
            }
            KeyCode::Enter | KeyCode::Char('c') if !self.in_mail() => return self.start_compose(None),
            KeyCode::Char('r') => {
                if self.in_mail() {
                    if let Some(m) = self.selected_mail().cloned() {
                        let mut to: Vec<String> = m.user.iter().cloned().chain(m.to.iter().cloned()).filter(|u| *u != self.me).collect();
                        to.dedup();
                        let subject = if m.subject.starts_with("Re: ") { m.subject.clone() } else { format!("Re: {}", m.subject) };
                        return self.start_mail(to, subject, Some(m.reference));
                    }
                } else if let Some(m) = self.selected_message() {
                    if m.id.starts_with("pending/") {
                        self.say("this message is not sent yet: it has no thread", true);
                    } else {
                        let root = m.reply_to.clone().unwrap_or_else(|| m.id.clone());
                        return self.start_compose(Some(root));
                    }
                }
            }
            KeyCode::Char('e') if !self.in_mail() => {
                if let Some(m) = self.selected_message().cloned() {
                    if m.user.as_deref() != Some(self.me.as_str()) || m.control || m.pending {
                        self.say("only your own sent messages can be edited", true);
                    } else {
                        self.compose = Some(Compose::Edit { id: m.id, text: m.text });
                        self.set_focus(Focus::Compose);
                    }
                }
            }
            KeyCode::Char('m') if !self.in_mail() => {
                if let Some(m) = self.selected_message() {
                    if m.pending {
                        self.say("this message is not sent yet", true);
                    } else {
                        let mut r = vec![Request::Mark { id: m.id.clone(), marked: !m.marked }];
                        r.extend(self.reload());
                        return r;
                    }
                }
            }
            KeyCode::Char('i') => match self.open_group() {
                Some(_) if self.info.is_some() => self.info = None,
                Some(g) => return vec![Request::GroupInfo { group: g.to_string() }],
                None => self.say("the info pane is for groups", true),
            },
            _ => {}
        }
        Vec::new()
    }

    fn start_compose(&mut self, reply_to: Option<String>) -> Vec<Request> {
        if self.in_mail() {
            return self.start_mail(Vec::new(), String::new(), None);
        }
        self.compose = Some(Compose::Message { text: String::new(), reply_to });
        self.set_focus(Focus::Compose);
        Vec::new()
    }

    fn start_mail(&mut self, to: Vec<String>, subject: String, prev: Option<String>) -> Vec<Request> {
        let field = if to.is_empty() { MailField::To } else { MailField::Body };
        self.compose = Some(Compose::Mail { to: to.join(" "), subject, body: String::new(), prev, field });
        self.set_focus(Focus::Compose);
        Vec::new()
    }

    fn compose_key(&mut self, key: KeyEvent) -> Vec<Request> {
        let Some(compose) = self.compose.as_mut() else {
            self.set_focus(Focus::Conversation);
            return Vec::new();
        };
        let field: &mut String = match compose {
            Compose::Message { text, .. } | Compose::Edit { text, .. } => text,
            Compose::Mail { to, subject, body, field, .. } => match field {
                MailField::To => to,
                MailField::Subject => subject,
                MailField::Body => body,
            },
        };
        match key.code {
            KeyCode::Esc => {
                self.compose = None;
                self.set_focus(if self.open.is_some() { Focus::Conversation } else { Focus::Chats });
            }
            KeyCode::Backspace => {
                field.pop();
            }
            KeyCode::Char('u') if key.modifiers.contains(KeyModifiers::CONTROL) => field.clear(),
            KeyCode::Char('w') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                let keep = field.trim_end().rfind(' ').map_or(0, |i| i + 1);
                field.truncate(keep);
            }
            KeyCode::Char(c) if !key.modifiers.intersects(KeyModifiers::CONTROL | KeyModifiers::ALT) => field.push(c),
            KeyCode::Tab | KeyCode::BackTab | KeyCode::Enter => {
                if let Compose::Mail { field, .. } = compose
                    && (key.code != KeyCode::Enter || *field != MailField::Body)
                {
                    let forward = key.code != KeyCode::BackTab;
                    *field = match (*field, forward) {
                        (MailField::To, true) | (MailField::Body, false) => MailField::Subject,
                        (MailField::Subject, true) | (MailField::To, false) => MailField::Body,
                        (MailField::Body, true) | (MailField::Subject, false) => MailField::To,
                    };
                } else if key.code == KeyCode::Enter {
                    return self.submit();
                }
            }
            _ => {}
        }
        Vec::new()
    }

    /// Pasted text (bracketed paste): typed into the compose box as one piece, newlines as
    /// spaces, so a paste never runs keys; ignored outside the compose box.
    pub fn paste(&mut self, text: &str) {
        let text: String = text.chars().map(|c| if c == '\n' || c == '\r' || c == '\t' { ' ' } else { c }).filter(|c| !c.is_control()).collect();
        let field = match self.compose.as_mut() {
            Some(Compose::Message { text, .. } | Compose::Edit { text, .. }) => text,
            Some(Compose::Mail { to, subject, body, field, .. }) => match field {
                MailField::To => to,
                MailField::Subject => subject,
                MailField::Body => body,
            },
            None => return,
        };
        field.push_str(&text);
    }

    /// Enter in the compose box: the requests that carry out what was written.
    fn submit(&mut self) -> Vec<Request> {
        let Some(compose) = self.compose.take() else { return Vec::new() };
        let requests = match &compose {
            Compose::Message { text, .. } if text.trim().is_empty() => return self.keep(compose, "nothing to send"),
            Compose::Message { text, reply_to: None } if text.starts_with('/') => match self.command(text) {
                Ok(r) => r,
                Err(e) => return self.keep(compose, &e),
            },
            Compose::Message { text, reply_to } => match self.open.clone() {
                Some(to) => vec![Request::Send { to, text: text.clone(), reply_to: reply_to.clone() }],
                None => return self.keep(compose, "open a conversation first"),
            },
            Compose::Edit { id, text } => vec![Request::Edit { id: id.clone(), text: text.clone() }],
            Compose::Mail { to, subject, body, prev, .. } => {
                let to: Vec<String> = to.split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_string).collect();
                if to.is_empty() {
                    return self.keep(compose, "a mail needs at least one recipient");
                }
                vec![Request::MailSend { to, subject: subject.clone(), body: body.clone(), prev: prev.clone() }]
            }
        };
        self.set_focus(if self.open.is_some() { Focus::Conversation } else { Focus::Chats });
        // Follow the conversation to its newest line, where what was sent appears.
        self.cursor = usize::MAX;
        self.sent_draft = Some(compose);
        requests
    }

    fn keep(&mut self, compose: Compose, why: &str) -> Vec<Request> {
        self.compose = Some(compose);
        self.say(why, true);
        Vec::new()
    }

    /// A `/command` typed in the compose box.
    fn command(&mut self, line: &str) -> Result<Vec<Request>, String> {
        let mut words = line[1..].split_whitespace();
        let verb = words.next().unwrap_or_default();
        let rest: Vec<String> = words.map(str::to_string).collect();
        let arg = || line[1..].trim_start()[verb.len()..].trim().to_string();
        let group = || self.open_group().map(str::to_string).ok_or_else(|| format!("/{verb} works in a group"));
        let op = |operation: GroupOp| -> Result<Vec<Request>, String> { Ok(vec![Request::GroupOp { group: group()?, operation, force: false }]) };
        match verb {
            "dm" if rest.len() == 1 => {
                // A contact name is resolved to the user id, which is how Secure labels the
                // conversation's messages (and so what live updates match).
                let mut r = self.open(format!("dm:{}", rest[0]));
                r.insert(0, Request::Contacts);
                Ok(r)
            }
            "group" if rest.len() >= 2 => Ok(vec![Request::GroupCreate { name: rest[0].clone(), users: rest[1..].to_vec() }]),
            "rename" if !rest.is_empty() => op(GroupOp::Rename { name: arg() }),
            "describe" => op(GroupOp::Describe { description: arg() }),
            "add" if !rest.is_empty() => op(GroupOp::Add { users: rest, note: String::new() }),
            "remove" if !rest.is_empty() => op(GroupOp::Remove { users: rest, note: String::new() }),
            "revoke" => op(GroupOp::Revoke),
            "act" if !rest.is_empty() => {
                let pipeline = self.open_pipeline().map(str::to_string).ok_or_else(|| "/act works in a pipeline".to_string())?;
                self.wants.push(Want::Act { pipeline, action: rest[0].clone(), args: rest[1..].to_vec(), approved: None });
                Ok(Vec::new())
            }
            _ => Err(format!("unknown command {line:?}: see ? for the commands")),
        }
    }

    /// Secure's answer to `request`.
    pub fn answer(&mut self, request: &Request, reply: Result<Reply, String>) -> Vec<Request> {
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                match request {
                    Request::Status => self.status = None,
                    Request::Send { .. } | Request::Edit { .. } | Request::MailSend { .. } | Request::GroupOp { .. } | Request::GroupCreate { .. } => {
                        // Nothing typed is lost: the draft comes back to be fixed or sent again.
                        if let Some(draft) = self.sent_draft.take() {
                            self.compose = Some(draft);
                            self.set_focus(Focus::Compose);
                        }
                        self.say(e, true);
                    }
                    _ => self.say(e, true),
                }
                return Vec::new();
            }
        };
        if matches!(request, Request::Send { .. } | Request::Edit { .. } | Request::MailSend { .. } | Request::GroupOp { .. } | Request::GroupCreate { .. }) {
            self.sent_draft = None;
        }
        match (request, reply) {
            (_, Reply::Status(s)) => self.status = Some(s),
            (_, Reply::Chats { chats }) => {
                // Keep the same chat selected when the order changes.
                let was = self.chats.get(self.selected).map(|c| c.conversation.clone());
                // A conversation opened by command (`/dm`, `/group`) is selected once listed.
                let was = match (&self.open, self.focus) {
                    (Some(open), Focus::Conversation | Focus::Compose) if chats.iter().any(|c| &c.conversation == open) => Some(open.clone()),
                    _ => was,
                };
                self.chats = chats;
                if let Some(i) = was.and_then(|w| self.chats.iter().position(|c| c.conversation == w)) {
                    self.selected = i;
                }
                self.selected = self.selected.min(self.chats.len().saturating_sub(1));
            }
            (Request::Read { conversation, .. }, Reply::Messages { messages, more }) if Some(conversation) == self.open.as_ref() => {
                self.older = more;
                // Keep the same message selected; at the newest, stay at the newest.
                let at_end = self.cursor >= self.rows().len().saturating_sub(1);
                let was = self.selected_message().map(|m| m.id.clone());
                self.messages = messages;
                if !self.in_mail() {
                    let rows = self.rows();
                    self.cursor = match was {
                        Some(id) if !at_end => rows.iter().position(|r| self.messages[r.message].id == id).unwrap_or(rows.len().saturating_sub(1)),
                        _ => rows.len().saturating_sub(1),
                    };
                }
            }
            (Request::MailList, Reply::Mails { mails }) => {
                self.mails = mails;
                self.clamp();
            }
            (Request::Contacts, Reply::Contacts { contacts }) => {
                if let Some(name) = self.open.as_deref().and_then(|o| o.strip_prefix("dm:")).map(str::to_string)
                    && let Some(c) = contacts.iter().find(|c| c.name.as_deref() == Some(name.as_str()))
                {
                    self.open = Some(format!("dm:{}", c.user));
                    if let Some(i) = self.chats.iter().position(|ch| Some(&ch.conversation) == self.open.as_ref()) {
                        self.selected = i;
                    }
                    return self.reload();
                }
            }
            (Request::MailThread { .. }, Reply::Mails { .. }) if !self.in_mail() => {}
            (Request::MailThread { .. }, Reply::Mails { mails }) => {
                // A thread opened from the mailbox starts at its newest mail.
                if self.thread.is_none() {
                    self.cursor = mails.len().saturating_sub(1);
                }
                self.thread = Some(mails);
                self.clamp();
            }
            (Request::Send { .. } | Request::Edit { .. }, Reply::Sent { queued, .. }) => {
                if queued {
                    self.say("queued: it goes out when the relay is reachable", false);
                }
                return self.reload();
            }
            (Request::MailSend { .. }, Reply::Mailed { reference, queued }) => {
                self.say(format!("mail {reference} sent{}", if queued { " (queued until the relay is reachable)" } else { "" }), false);
                return self.reload();
            }
            (Request::GroupCreate { .. }, Reply::Group { group, .. }) => {
                self.say(format!("created group {}", group.name), false);
                return self.open(format!("group:{}", group.id));
            }
            (Request::GroupOp { .. }, Reply::Group { group, requested }) => {
                self.say(if requested { "asked the group's committer, which carries it out once it is online" } else { "done" }, false);
                if self.open_group() == Some(group.id.as_str()) && self.info.is_some() {
                    self.info = Some(group);
                }
                return self.reload();
            }
            // Only for the group still open: an answer that comes after a switch is dropped.
            (Request::GroupInfo { .. }, Reply::Group { group, .. }) if self.open_group() == Some(group.id.as_str()) => self.info = Some(group),
            _ => {}
        }
        Vec::new()
    }

    /// Keeps the cursor on a row; `usize::MAX` means the newest.
    fn clamp(&mut self) {
        let rows = self.row_count();
        if self.in_mail() && self.thread.is_none() && self.cursor == usize::MAX {
            // The mailbox is newest first.
            self.cursor = 0;
        }
        self.cursor = self.cursor.min(rows.saturating_sub(1));
    }

    /// What the status bar says about the relay: `None` when all is well.
    pub fn trouble(&self) -> Option<String> {
        let Some(s) = &self.status else {
            return Some("Secure is not answering: is this device up (`canopy-msg up`)?".into());
        };
        let queued = s.unacknowledged as u64 + s.relay.as_ref().map_or(0, |r| r.outbox);
        if !s.network {
            return Some(format!("Network is not running: sends are queued ({queued} waiting)"));
        }
        match &s.relay {
            Some(r) if r.parent_connected => None,
            Some(_) => Some(format!("relay unreachable: sends are queued ({queued} waiting) and go out when it is back")),
            None => Some(format!("relay state unknown (Network is not reporting): sends may be queued ({queued} waiting)")),
        }
    }
}
