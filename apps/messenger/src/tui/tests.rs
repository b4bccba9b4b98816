//! Widget and screen tests: the TUI's state driven by keys and Secure's answers, drawn on
//! ratatui's `TestBackend`, and the screen read back.

use canopy_msg_secure::proto::{ChatLine, GroupLine, GroupMember, GroupOp, MailLine, MessageLine, NetworkStatus, Reply, Request, SecureStatus};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::app::{App, Compose, Focus};
use super::draw::draw;

const ME: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BOB: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const CAROL: &str = "cccccccccccccccccccccccccccccccc";
/// 2026-12-02 09:30 UTC.
const T: u64 = 1_796_203_800_000;

fn screen(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| draw(f, app)).unwrap();
    let buf = terminal.backend().buffer();
    (0..height).map(|y| (0..width).map(|x| buf.cell((x, y)).unwrap().symbol()).collect::<String>().trim_end().to_string()).collect::<Vec<_>>().join("\n")
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn typed(app: &mut App, text: &str) {
    for c in text.chars() {
        assert!(app.key(key(KeyCode::Char(c))).is_empty());
    }
}

fn chat(conversation: &str, kind: &str, name: &str, unread: usize, last_ms: u64) -> ChatLine {
    ChatLine { conversation: conversation.into(), kind: kind.into(), name: name.into(), unread, last_ms, messages: 1 }
}

fn msg(id: &str, user: &str, text: &str, reply_to: Option<&str>, minute: u64) -> MessageLine {
    MessageLine {
        id: id.into(),
        conversation: format!("dm:{BOB}"),
        team: 0,
        channel: 0,
        team_name: String::new(),
        channel_name: String::new(),
        device: 1,
        user: Some(user.into()),
        from: if user == ME { "me".into() } else { "bob".into() },
        sent_ms: T + minute * 60_000,
        text: text.into(),
        reply_to: reply_to.map(str::to_string),
        edited: false,
        pending: false,
        control: false,
        marked: false,
    }
}

fn status(relay_up: bool, outbox: u64) -> SecureStatus {
    SecureStatus {
        user: ME.into(),
        teams: Vec::new(),
        conversations: Vec::new(),
        pending: 0,
        waiting: Vec::new(),
        network: true,
        relay: Some(NetworkStatus { parent_connected: relay_up, outbox, chunks: 10, written_ms: T }),
        unacknowledged: 0,
        time_source: "os".into(),
        messages: 0,
        commits: 0,
        rejected: 0,
        duplicates: 0,
        held: 0,
        blocked: 0,
        requests: 0,
        key_packages: Default::default(),
        linking: Vec::new(),
        linked: Vec::new(),
        sandboxed: true,
    }
}

/// An app with a chat list (bob's DM, a channel, a group, mail) and bob's DM open.
fn app_with_dm(messages: Vec<MessageLine>) -> App {
    let (mut app, first) = App::new(ME.into());
    assert_eq!(first, vec![Request::Chats, Request::Status]);
    let chats = vec![
        chat(&format!("dm:{BOB}"), "dm", "bob", 2, T + 5 * 60_000),
        chat("ops/general", "channel", "ops/general", 0, T + 4 * 60_000),
        chat("group:00112233445566778899", "group", "hikers", 7, T + 3 * 60_000),
        chat("mail", "mail", "mail", 1, T),
    ];
    app.answer(&Request::Chats, Ok(Reply::Chats { chats }));
    app.answer(&Request::Status, Ok(Reply::Status(status(true, 0))));
    let open = app.key(key(KeyCode::Enter));
    assert_eq!(open, vec![Request::Read { conversation: format!("dm:{BOB}"), before: None }, Request::Chats]);
    app.answer(&open[0], Ok(Reply::Messages { messages, more: false }));
    app
}

#[test]
fn the_chat_list_shows_kinds_names_and_unread_counts_in_the_order_given() {
    let app = app_with_dm(Vec::new());
    let s = screen(&app, 100, 12);
    let lines: Vec<&str> = s.lines().collect();
    assert!(lines[1].starts_with("│> @ bob") && lines[1].contains(" 2│"), "{s}");
    assert!(lines[2].starts_with("│  # ops/general ") && !lines[2].contains(" 0│"), "no count when nothing is unread: {s}");
    assert!(lines[3].starts_with("│  & hikers") && lines[3].contains(" 7│"), "{s}");
    assert!(lines[4].starts_with("│  ✉ mail") && lines[4].contains(" 1│"), "{s}");
    assert!(s.contains("No messages yet"), "{s}");
    assert!(lines[11].contains("relay up · ? help"), "{s}");
}

#[test]
fn a_thread_shows_under_its_root_with_edits_and_stars() {
    let mut edited = msg("c1/0/2/2", ME, "fine, see you", None, 2);
    edited.edited = true;
    let mut starred = msg("c1/0/1/3", BOB, "late reply to the first", Some("c1/0/1/1"), 3);
    starred.marked = true;
    let app = app_with_dm(vec![msg("c1/0/1/1", BOB, "lunch at noon?", None, 1), edited, starred]);
    // Thread order: the root, its reply, then the next root.
    let rows: Vec<usize> = app.rows().iter().map(|r| r.message).collect();
    assert_eq!(rows, vec![0, 2, 1]);
    let s = screen(&app, 100, 12);
    let body: Vec<&str> = s.lines().skip(1).take(3).map(|l| l.split('│').nth(3).unwrap_or_default().trim_end()).collect();
    assert_eq!(body, vec!["09:31 bob: lunch at noon?", "   ↳ 09:33 bob: late reply to the first ★", "09:32 me: fine, see you (edited)"], "{s}");
    assert!(s.contains("@ bob"), "the title names the conversation: {s}");
}

#[test]
fn r_replies_in_the_selected_messages_thread_and_enter_sends_it() {
    let mut app = app_with_dm(vec![msg("c1/0/1/1", BOB, "lunch at noon?", None, 1), msg("c1/0/1/2", BOB, "or one?", Some("c1/0/1/1"), 2)]);
    assert_eq!(app.focus(), Focus::Conversation);
    // The newest row is selected; it is a reply, so the answer goes to its root's thread.
    assert_eq!(app.selected_message().unwrap().text, "or one?");
    assert!(app.key(key(KeyCode::Char('r'))).is_empty());
    assert_eq!(app.focus(), Focus::Compose);
    assert!(screen(&app, 100, 14).contains("reply in thread to bob: lunch at noon?"));
    typed(&mut app, "noon works");
    let sent = app.key(key(KeyCode::Enter));
    assert_eq!(sent, vec![Request::Send { to: format!("dm:{BOB}"), text: "noon works".into(), reply_to: Some("c1/0/1/1".into()) }]);
    assert_eq!(app.focus(), Focus::Conversation);
    assert!(app.compose.is_none());
    // Once sent, the conversation and the chat list are fetched again.
    let next = app.answer(&sent[0], Ok(Reply::Sent { id: "c1/0/2/3".into(), queued: false }));
    assert_eq!(next, vec![Request::Read { conversation: format!("dm:{BOB}"), before: None }, Request::Chats]);
}

#[test]
fn e_edits_only_this_users_messages() {
    let mut app = app_with_dm(vec![msg("c1/0/2/1", ME, "helo", None, 1), msg("c1/0/1/2", BOB, "hi", None, 2)]);
    assert!(app.key(key(KeyCode::Char('e'))).is_empty());
    assert!(app.compose.is_none());
    assert!(app.notice.as_ref().is_some_and(|n| n.error && n.text.contains("only your own")));
    assert!(screen(&app, 100, 12).contains("only your own sent messages can be edited"));
    app.key(key(KeyCode::Up));
    app.key(key(KeyCode::Char('e')));
    assert_eq!(app.compose, Some(Compose::Edit { id: "c1/0/2/1".into(), text: "helo".into() }));
    app.key(key(KeyCode::Backspace));
    typed(&mut app, "lo");
    assert_eq!(app.key(key(KeyCode::Enter)), vec![Request::Edit { id: "c1/0/2/1".into(), text: "hello".into() }]);
}

#[test]
fn m_marks_and_unmarks_the_selected_message() {
    let mut marked = msg("c1/0/1/1", BOB, "keep this", None, 1);
    let mut app = app_with_dm(vec![marked.clone()]);
    let r = app.key(key(KeyCode::Char('m')));
    assert_eq!(r[0], Request::Mark { id: "c1/0/1/1".into(), marked: true });
    marked.marked = true;
    app.answer(&Request::Read { conversation: format!("dm:{BOB}"), before: None }, Ok(Reply::Messages { messages: vec![marked], more: false }));
    assert_eq!(app.key(key(KeyCode::Char('m')))[0], Request::Mark { id: "c1/0/1/1".into(), marked: false });
}

#[test]
fn live_messages_refresh_the_open_conversation_or_only_the_chat_list() {
    let mut app = app_with_dm(Vec::new());
    let here = msg("c1/0/1/1", BOB, "x", None, 1);
    assert_eq!(app.incoming(&here), vec![Request::Read { conversation: format!("dm:{BOB}"), before: None }, Request::Chats]);
    let mut elsewhere = here.clone();
    elsewhere.conversation = "ops/general".into();
    assert_eq!(app.incoming(&elsewhere), vec![Request::Chats]);
    // A new message while the cursor is on the newest keeps following; one further up stays.
    app.answer(&Request::Read { conversation: format!("dm:{BOB}"), before: None }, Ok(Reply::Messages { messages: vec![here.clone(), msg("c1/0/1/2", BOB, "y", None, 2)], more: false }));
    assert_eq!(app.selected_message().unwrap().text, "y");
    app.key(key(KeyCode::Up));
    app.answer(
        &Request::Read { conversation: format!("dm:{BOB}"), before: None },
        Ok(Reply::Messages { messages: vec![here, msg("c1/0/1/2", BOB, "y", None, 2), msg("c1/0/1/3", BOB, "z", None, 3)], more: false }),
    );
    assert_eq!(app.selected_message().unwrap().text, "x");
}

#[test]
fn the_status_bar_says_plainly_when_the_relay_is_unreachable_and_sends_are_queued() {
    let mut app = app_with_dm(Vec::new());
    app.answer(&Request::Status, Ok(Reply::Status(status(false, 3))));
    let s = screen(&app, 110, 10);
    assert!(s.lines().last().unwrap().contains("relay unreachable: sends are queued (3 waiting) and go out when it is back"), "{s}");
    // Secure itself gone: said too, and the next status brings the UI back.
    app.answer(&Request::Status, Err("this device's processes are not running".into()));
    assert!(screen(&app, 110, 10).contains("Secure is not answering"));
    app.answer(&Request::Status, Ok(Reply::Status(status(true, 0))));
    assert!(app.trouble().is_none());
    let mut no_network = status(true, 0);
    no_network.network = false;
    app.answer(&Request::Status, Ok(Reply::Status(no_network)));
    assert!(screen(&app, 110, 10).contains("Network is not running"));
}

#[test]
fn help_overlays_every_key_and_any_key_closes_it() {
    let mut app = app_with_dm(Vec::new());
    app.key(key(KeyCode::Char('?')));
    let s = screen(&app, 120, 30);
    for (keys, what) in super::app::HELP {
        assert!(s.lines().any(|l| l.contains(&format!("│{keys} ")) && l.contains(what)), "{keys} {what} missing:\n{s}");
    }
    app.key(key(KeyCode::Char('x')));
    assert!(!app.help && !app.quit);
    assert!(!screen(&app, 120, 30).contains("any key closes"));
}

fn group(admin: bool) -> GroupLine {
    GroupLine {
        id: "00112233445566778899".into(),
        name: "hikers".into(),
        description: "Sunday walks".into(),
        epoch: 4,
        device: 1,
        committer: admin,
        admin,
        removed: false,
        stalled: None,
        members: vec![
            GroupMember { user: ME.into(), name: None, admin, devices: 2 },
            GroupMember { user: BOB.into(), name: Some("bob".into()), admin: !admin, devices: 1 },
        ],
    }
}

fn open_group(app: &mut App) {
    app.key(key(KeyCode::Esc));
    assert_eq!(app.focus(), Focus::Chats);
    app.key(key(KeyCode::Down));
    app.key(key(KeyCode::Down));
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r[0], Request::Read { conversation: "group:00112233445566778899".into(), before: None });
    app.answer(&r[0], Ok(Reply::Messages { messages: Vec::new(), more: false }));
}

#[test]
fn i_shows_the_group_info_pane_with_members_and_admin_actions() {
    let mut app = app_with_dm(Vec::new());
    open_group(&mut app);
    let r = app.key(key(KeyCode::Char('i')));
    assert_eq!(r, vec![Request::GroupInfo { group: "00112233445566778899".into() }]);
    app.answer(&r[0], Ok(Reply::Group { group: group(true), requested: false }));
    let s = screen(&app, 130, 20);
    for want in ["group info", "hikers", "Sunday walks", "epoch 4 · this device commits", "members (2)", "★ aaaaaaaa (me) · 2 dev", "  bob · 1 dev", "/rename NAME", "/revoke"] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    // A member who is no admin is told so instead.
    app.answer(&r[0], Ok(Reply::Group { group: group(false), requested: false }));
    assert!(screen(&app, 130, 20).contains("only admins change the group"));
    // Esc closes the pane first.
    app.key(key(KeyCode::Esc));
    assert!(app.info.is_none());
    assert_eq!(app.focus(), Focus::Conversation);
}

#[test]
fn admin_commands_in_the_compose_box_become_group_operations() {
    let mut app = app_with_dm(Vec::new());
    // Outside a group, a group command is refused and the text kept.
    app.key(key(KeyCode::Enter));
    typed(&mut app, "/rename walkers");
    assert!(app.key(key(KeyCode::Enter)).is_empty());
    assert!(app.notice.as_ref().is_some_and(|n| n.error && n.text.contains("works in a group")));
    assert!(matches!(&app.compose, Some(Compose::Message { text, .. }) if text == "/rename walkers"));
    app.key(key(KeyCode::Esc));
    open_group(&mut app);
    let cases = [
        ("/rename Sunday walkers", GroupOp::Rename { name: "Sunday walkers".into() }),
        ("/describe every week", GroupOp::Describe { description: "every week".into() }),
        ("/add carol bob", GroupOp::Add { users: vec!["carol".into(), "bob".into()], note: String::new() }),
        ("/remove carol", GroupOp::Remove { users: vec!["carol".into()], note: String::new() }),
        ("/revoke", GroupOp::Revoke),
    ];
    for (line, operation) in cases {
        app.key(key(KeyCode::Enter));
        typed(&mut app, line);
        assert_eq!(app.key(key(KeyCode::Enter)), vec![Request::GroupOp { group: "00112233445566778899".into(), operation, force: false }], "{line}");
    }
    app.key(key(KeyCode::Enter));
    typed(&mut app, "/group walkers bob carol");
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r, vec![Request::GroupCreate { name: "walkers".into(), users: vec!["bob".into(), "carol".into()] }]);
    // The new group opens.
    let next = app.answer(&r[0], Ok(Reply::Group { group: group(true), requested: false }));
    assert_eq!(next[0], Request::Read { conversation: "group:00112233445566778899".into(), before: None });
    app.key(key(KeyCode::Enter));
    typed(&mut app, "/frobnicate");
    assert!(app.key(key(KeyCode::Enter)).is_empty());
    assert!(app.notice.as_ref().is_some_and(|n| n.text.contains("unknown command")));
}

/// A mail: `sender` is (user id, name shown), `text` is (subject, body).
fn mail(reference: &str, sender: (&str, &str), to: &[&str], text: (&str, &str), prev: Option<&str>, minute: u64) -> MailLine {
    let ((user, from), (subject, body)) = (sender, text);
    MailLine {
        reference: reference.into(),
        prev: prev.map(str::to_string),
        subject: subject.into(),
        body: body.into(),
        from: from.into(),
        user: Some(user.into()),
        to: to.iter().map(|s| s.to_string()).collect(),
        sent_ms: T + minute * 60_000,
        id: format!("c9/0/1/{minute}"),
    }
}

#[test]
fn mail_lists_the_mailbox_opens_threads_and_replies_to_everyone_on_them() {
    let mut app = app_with_dm(Vec::new());
    app.key(key(KeyCode::Esc));
    for _ in 0..3 {
        app.key(key(KeyCode::Down));
    }
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r, vec![Request::Read { conversation: "mail".into(), before: None }, Request::MailList, Request::Chats]);
    let first = mail("1111111111111111", (BOB, "bob"), &[ME, CAROL], ("Plan", "Shall we meet?"), None, 1);
    let second = mail("2222222222222222", (CAROL, "cccccccc"), &[ME, BOB], ("Re: Plan", "Tuesday?\nOr Wednesday."), Some("1111111111111111"), 2);
    app.answer(&Request::MailList, Ok(Reply::Mails { mails: vec![second.clone(), first.clone()] }));
    let s = screen(&app, 100, 12);
    assert!(s.contains("09:32 cccccccc     Re: Plan ↩") && s.contains("09:31 bob          Plan"), "{s}");
    // Enter on the newest opens its thread, oldest first, at its newest mail.
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r, vec![Request::MailThread { reference: "2222222222222222".into() }]);
    app.answer(&r[0], Ok(Reply::Mails { mails: vec![first, second] }));
    let s = screen(&app, 100, 16);
    for want in ["mail thread: Plan", "09:31 bob → aaaaaaaa, cccccccc", "subject: Plan", "Shall we meet?", "Tuesday?", "Or Wednesday."] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    // r answers the selected mail, to its sender and everyone else on it but me.
    app.key(key(KeyCode::Char('r')));
    match &app.compose {
        Some(Compose::Mail { to, subject, prev, .. }) => {
            assert_eq!(to, &format!("{CAROL} {BOB}"));
            assert_eq!(subject, "Re: Plan", "no Re: Re:");
            assert_eq!(prev.as_deref(), Some("2222222222222222"));
        }
        other => panic!("{other:?}"),
    }
    typed(&mut app, "Tuesday it is");
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r, vec![Request::MailSend { to: vec![CAROL.into(), BOB.into()], subject: "Re: Plan".into(), body: "Tuesday it is".into(), prev: Some("2222222222222222".into()) }]);
}

#[test]
fn n_writes_a_new_mail_field_by_field() {
    let mut app = app_with_dm(Vec::new());
    app.key(key(KeyCode::Char('n')));
    typed(&mut app, "bob, carol");
    app.key(key(KeyCode::Tab));
    typed(&mut app, "Lunch");
    // Enter in a field before the body moves on, like Tab.
    app.key(key(KeyCode::Enter));
    typed(&mut app, "Noon?");
    let s = screen(&app, 100, 16);
    assert!(s.contains("new mail") && s.contains("to:      bob, carol") && s.contains("subject: Lunch") && s.contains("body:    Noon?"), "{s}");
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r, vec![Request::MailSend { to: vec!["bob".into(), "carol".into()], subject: "Lunch".into(), body: "Noon?".into(), prev: None }]);
    // No recipient: refused, and the mail kept.
    app.key(key(KeyCode::Char('n')));
    app.key(key(KeyCode::Tab));
    typed(&mut app, "x");
    assert!(app.key(key(KeyCode::Enter)).is_empty());
    app.key(key(KeyCode::Enter));
    assert!(app.notice.as_ref().is_some_and(|n| n.text.contains("at least one recipient")));
    assert!(app.compose.is_some());
}

#[test]
fn hostile_text_cannot_reach_the_terminal_and_long_text_wraps() {
    let evil = "\u{1b}]52;c;cGF3bmVk\u{7}\u{1b}[2Jgot you\r\nsecond line";
    let long = "word ".repeat(40);
    let app = app_with_dm(vec![msg("c1/0/1/1", BOB, evil, None, 1), msg("c1/0/1/2", BOB, long.trim_end(), None, 2)]);
    // What reaches the terminal is cleaned first (ratatui would drop ESC and BEL itself, but
    // not the format characters that reorder text).
    assert_eq!(crate::ui::clean("a\u{1b}[2J\u{7}b\tc\r\nd\u{202e}evil\u{2066}x\u{200b}y\u{feff}"), "a[2Jb c  devilxy");
    let s = screen(&app, 80, 16);
    assert!(!s.contains('\u{1b}') && !s.contains('\u{7}') && !s.contains('\r'), "{s:?}");
    assert!(s.contains("09:31 bob: ]52;c;cGF3bmVk[2Jgot you"), "escape sequences lose their ESC and BEL: {s}");
    assert!(s.contains("      second line"), "a newline in a text does not break the layout: {s}");
    // The long one takes several lines, each continuation under the text.
    let conv: Vec<&str> = s.lines().map(|l| l.split('│').nth(3).unwrap_or_default()).filter(|l| l.contains("word")).collect();
    assert!(conv.len() >= 4, "{s}");
    assert!(conv[1].starts_with("      word"), "{s}");
}

#[test]
fn q_quits_but_is_text_in_the_compose_box() {
    let mut app = app_with_dm(Vec::new());
    app.key(key(KeyCode::Enter));
    typed(&mut app, "q?");
    assert!(!app.quit && !app.help);
    assert!(matches!(&app.compose, Some(Compose::Message { text, .. }) if text == "q?"));
    app.key(key(KeyCode::Esc));
    app.key(key(KeyCode::Char('q')));
    assert!(app.quit);
    let (mut app, _) = App::new(ME.into());
    app.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
    assert!(app.quit);
}

#[test]
fn with_no_chats_tab_opens_the_compose_box_and_dm_resolves_a_contact_name() {
    let (mut app, _) = App::new(ME.into());
    app.answer(&Request::Chats, Ok(Reply::Chats { chats: Vec::new() }));
    assert!(screen(&app, 100, 12).contains("No conversations yet."));
    app.key(key(KeyCode::Tab));
    assert_eq!(app.focus(), Focus::Compose);
    assert!(matches!(app.compose, Some(Compose::Message { .. })), "{:?}", app.compose);
    typed(&mut app, "/dm bob");
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r, vec![Request::Contacts, Request::Read { conversation: "dm:bob".into(), before: None }, Request::Chats]);
    let contacts = vec![canopy_msg_secure::proto::ContactLine { user: BOB.into(), name: Some("bob".into()), blocked: false, devices: 1 }];
    let next = app.answer(&r[0], Ok(Reply::Contacts { contacts }));
    assert_eq!(app.open.as_deref(), Some(format!("dm:{BOB}").as_str()), "labelled as Secure labels its messages");
    assert_eq!(next[0], Request::Read { conversation: format!("dm:{BOB}"), before: None });
    // So a live message for it reloads it.
    assert_eq!(app.incoming(&msg("c1/0/1/1", BOB, "hi", None, 1))[0], Request::Read { conversation: format!("dm:{BOB}"), before: None });
}

#[test]
fn a_failed_send_gives_the_draft_back() {
    let mut app = app_with_dm(Vec::new());
    app.key(key(KeyCode::Enter));
    typed(&mut app, "important words");
    let r = app.key(key(KeyCode::Enter));
    assert!(app.compose.is_none());
    app.answer(&r[0], Err("the message is over 16384 bytes".into()));
    assert_eq!(app.focus(), Focus::Compose);
    assert!(matches!(&app.compose, Some(Compose::Message { text, .. }) if text == "important words"));
    assert!(screen(&app, 100, 14).contains("over 16384 bytes"));
    // Sent fine the second time: nothing comes back.
    let r = app.key(key(KeyCode::Enter));
    app.answer(&r[0], Ok(Reply::Sent { id: "c1/0/2/1".into(), queued: false }));
    assert!(app.compose.is_none() && app.sent_draft.is_none());
}

#[test]
fn control_keys_edit_the_draft_instead_of_typing_letters_and_pastes_are_text() {
    let mut app = app_with_dm(Vec::new());
    app.key(key(KeyCode::Enter));
    typed(&mut app, "one two three");
    app.key(KeyEvent::new(KeyCode::Char('w'), KeyModifiers::CONTROL));
    app.key(KeyEvent::new(KeyCode::Char('b'), KeyModifiers::ALT));
    assert!(matches!(&app.compose, Some(Compose::Message { text, .. }) if text == "one two "), "{:?}", app.compose);
    app.key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
    app.paste("q\nm\x1b[31m");
    assert!(matches!(&app.compose, Some(Compose::Message { text, .. }) if text == "q m[31m"), "{:?}", app.compose);
    assert!(!app.quit);
    // Outside the compose box a paste does nothing (it is not keys).
    app.key(key(KeyCode::Esc));
    app.paste("q");
    assert!(!app.quit && app.compose.is_none());
}

#[test]
fn every_message_shows_once_whatever_its_reply_to_says() {
    let app = app_with_dm(vec![
        msg("c1/0/1/1", BOB, "root", None, 1),
        msg("c1/0/1/2", BOB, "reply", Some("c1/0/1/1"), 2),
        msg("c1/0/1/3", BOB, "reply to a reply", Some("c1/0/1/2"), 3),
        msg("c1/0/1/4", BOB, "itself", Some("c1/0/1/4"), 4),
        msg("c1/0/1/5", BOB, "cycle a", Some("c1/0/1/6"), 5),
        msg("c1/0/1/6", BOB, "cycle b", Some("c1/0/1/5"), 6),
    ]);
    let mut shown: Vec<usize> = app.rows().iter().map(|r| r.message).collect();
    shown.sort();
    assert_eq!(shown, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(app.rows()[1], super::app::Row { message: 1, depth: 1 });
    let mut app = app;
    app.key(key(KeyCode::Char('G')));
    assert!(app.selected_message().is_some(), "the cursor is on a shown row");
}

#[test]
fn a_late_answer_for_a_group_no_longer_open_is_dropped() {
    let mut app = app_with_dm(Vec::new());
    open_group(&mut app);
    let r = app.key(key(KeyCode::Char('i')));
    // The user goes back to the DM before Secure answers.
    app.key(key(KeyCode::Esc));
    app.key(key(KeyCode::Home));
    app.key(key(KeyCode::Enter));
    app.answer(&r[0], Ok(Reply::Group { group: group(true), requested: false }));
    assert!(app.info.is_none());
    assert!(!screen(&app, 130, 20).contains("group info"));
}

#[test]
fn wide_characters_wrap_by_columns() {
    let text = "漢字".repeat(30);
    let app = app_with_dm(vec![msg("c1/0/1/1", BOB, &text, None, 1)]);
    let s = screen(&app, 80, 12);
    let shown: String = s.lines().map(|l| l.split('│').nth(3).unwrap_or_default()).collect::<String>().chars().filter(|c| *c == '漢' || *c == '字').collect();
    assert_eq!(shown, text, "nothing cut off:\n{s}");
}

#[test]
fn a_long_history_shows_its_newest_message() {
    let long = "word ".repeat(60);
    let messages: Vec<MessageLine> = (0..20_000).map(|i| msg(&format!("c1/0/1/{i}"), BOB, &format!("{i} {long}"), None, 1)).collect();
    let app = app_with_dm(messages);
    let s = screen(&app, 80, 12);
    assert!(s.contains("19999 word"), "over 65,535 lines of history, the newest is on screen:\n{s}");
}

#[test]
fn no_terminal_size_makes_it_panic() {
    let mut app = app_with_dm(vec![msg("c1/0/1/1", BOB, "hello", None, 1)]);
    app.status = Some(status(false, 2));
    for setup in 0..4 {
        match setup {
            1 => app.help = true,
            2 => {
                app.help = false;
                app.info = Some(group(true));
            }
            3 => {
                app.key(key(KeyCode::Char('n')));
            }
            _ => {}
        }
        for w in 0..40 {
            for h in 0..14 {
                screen(&app, w, h);
            }
        }
    }
}

#[test]
fn a_history_longer_than_one_page_says_where_the_rest_is() {
    let mut app = app_with_dm(Vec::new());
    app.answer(&Request::Read { conversation: format!("dm:{BOB}"), before: None }, Ok(Reply::Messages { messages: vec![msg("c1/0/1/9", BOB, "newest", None, 9)], more: true }));
    let s = screen(&app, 120, 12);
    assert!(s.contains(&format!("older messages are not shown here: canopy-msg read dm:{BOB}")), "{s}");
    assert!(s.contains("bob: newest"));
}

#[test]
fn a_pipeline_shows_its_models_view_and_act_takes_an_action() {
    use super::app::Want;
    use canopy_msg_pipeline::{Action, Rendering};
    let mut app = app_with_dm(Vec::new());
    let mut chats = app.chats.clone();
    chats.insert(1, chat("group:aa0000000000000001", "pipeline", "lunch", 0, T));
    app.answer(&Request::Chats, Ok(Reply::Chats { chats }));
    // Outside a pipeline, /act is refused.
    app.key(key(KeyCode::Enter));
    typed(&mut app, "/act vote 1");
    assert!(app.key(key(KeyCode::Enter)).is_empty());
    assert!(app.notice.as_ref().is_some_and(|n| n.text.contains("works in a pipeline")));
    app.key(key(KeyCode::Esc));
    app.key(key(KeyCode::Esc));
    app.key(key(KeyCode::Down));
    let r = app.key(key(KeyCode::Enter));
    assert_eq!(r[0], Request::Read { conversation: "group:aa0000000000000001".into(), before: None });
    assert_eq!(app.wants, vec![Want::Pane("aa0000000000000001".into())], "opening a pipeline runs its model");
    app.wants.clear();
    let view = Rendering {
        title: "Lunch?".into(),
        status: "1 of 3 voted".into(),
        lines: vec!["0. pizza: 0".into(), "1. soup: 1".into()],
        actions: vec![Action { name: "vote".into(), label: "vote for an option".into(), args: vec!["OPTION".into()] }],
        closed: false,
    };
    let pane = crate::pipeline::Pane { id: "aa0000000000000001".into(), model: "poll 1".into(), view, hash: "ab".repeat(32), steps: 1, refused: vec!["step x (close by bbbbbbbb): only the creator closes the poll".into()], diverged: Vec::new() };
    app.pane(Ok(pane.clone()));
    let s = screen(&app, 140, 24);
    for want in ["⚙ lunch", "pipeline · poll 1", "Lunch?", "1 of 3 voted", "1. soup: 1", "/act vote OPTION", "vote for an option", "state abababababab · 1 steps", "refused: step x"] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    // /act sends the action through the model; a failure gives the draft back.
    app.key(key(KeyCode::Enter));
    typed(&mut app, "/act vote soup");
    assert!(app.key(key(KeyCode::Enter)).is_empty());
    let want = Want::Act { pipeline: "aa0000000000000001".into(), action: "vote".into(), args: vec!["soup".into()], approved: None };
    assert_eq!(app.wants, vec![want.clone()]);
    app.wants.clear();
    assert!(app.acted(&want, Err("the model refuses this step: no option \"soup\"".into())).is_empty());
    assert!(matches!(&app.compose, Some(Compose::Message { text, .. }) if text == "/act vote soup"));
    // Sent again, and through this time.
    app.key(key(KeyCode::Enter));
    assert_eq!(app.wants.len(), 1);
    app.wants.clear();
    let next = app.acted(&want, Ok(crate::pipeline::Acted::Sent("c1/0/1/5".into())));
    assert_eq!(next[0], Request::Read { conversation: "group:aa0000000000000001".into(), before: None });
    assert_eq!(app.wants, vec![Want::Pane("aa0000000000000001".into())], "the pane is run again");
    // A pane for a pipeline no longer open is dropped.
    app.key(key(KeyCode::Esc));
    app.key(key(KeyCode::Home));
    app.key(key(KeyCode::Enter));
    app.pane(Ok(pane));
    assert!(app.pipeline.is_none());
}

#[test]
fn an_action_that_signs_shows_what_secure_would_sign_and_signs_only_once_approved() {
    use super::app::Want;
    use crate::pipeline::{Acted, Review};
    let mut app = app_with_dm(Vec::new());
    let mut chats = app.chats.clone();
    chats.insert(1, chat("group:aa0000000000000001", "pipeline", "spend", 0, T));
    app.answer(&Request::Chats, Ok(Reply::Chats { chats }));
    app.key(key(KeyCode::Esc));
    app.key(key(KeyCode::Down));
    app.key(key(KeyCode::Enter));
    assert_eq!(app.wants, vec![Want::Pane("aa0000000000000001".into())]);
    app.wants.clear();
    app.key(key(KeyCode::Enter));
    typed(&mut app, "/act sign");
    app.key(key(KeyCode::Enter));
    let first = Want::Act { pipeline: "aa0000000000000001".into(), action: "sign".into(), args: Vec::new(), approved: None };
    assert_eq!(app.wants, vec![first.clone()], "the first time, nothing is approved");
    app.wants.clear();
    let review = Review { key: "btc".into(), summary: vec!["spend 100000 sat from ab…:0".into(), "pay 99000 sat to bcrt1qexample".into(), "fee 1000 sat".into()], digest: "d1".repeat(32) };
    assert!(app.acted(&first, Ok(Acted::Review(review.clone()))).is_empty());
    let s = screen(&app, 140, 24);
    for want in ["approve signing", "/act sign asks to sign with your key \"btc\"", "pay 99000 sat to bcrt1qexample", "fee 1000 sat", "y sign exactly this", "n/Esc refuse"] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    // While it is shown, other keys do nothing.
    for k in [KeyCode::Char('q'), KeyCode::Char('j'), KeyCode::Enter, KeyCode::Tab] {
        assert!(app.key(key(k)).is_empty());
    }
    assert!(!app.quit && app.wants.is_empty() && app.approval.is_some());
    // Refused: nothing is taken again.
    app.key(key(KeyCode::Char('n')));
    assert!(app.approval.is_none() && app.wants.is_empty());
    assert!(app.notice.as_ref().is_some_and(|n| n.error && n.text.contains("nothing was signed")));
    // Asked again and approved: the action is taken again, approving exactly that digest.
    assert!(app.acted(&first, Ok(Acted::Review(review.clone()))).is_empty());
    app.key(key(KeyCode::Char('y')));
    let second = Want::Act { pipeline: "aa0000000000000001".into(), action: "sign".into(), args: Vec::new(), approved: Some(review.digest.clone()) };
    assert_eq!(app.wants, vec![second.clone()]);
    app.wants.clear();
    assert!(!app.acted(&second, Ok(Acted::Sent("c1/0/1/6".into()))).is_empty());
    assert!(app.notice.as_ref().is_some_and(|n| !n.error && n.text.contains("signed and sent")));
    assert!(!screen(&app, 140, 24).contains("approve signing"));
}
