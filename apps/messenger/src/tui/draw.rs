//! Drawing the terminal UI from an [`App`]: a pure function of the state, so the widget tests
//! render it on ratatui's `TestBackend` and read the screen back.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, List, ListItem, ListState, Paragraph, Wrap};

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::app::{App, Compose, Focus, HELP, MailField};
use crate::ui::clean;

/// `HH:MM` (UTC) of a unix-ms time.
fn clock(ms: u64) -> String {
    let minutes = (ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// How many terminal columns `text` takes (wide characters take two).
fn columns(text: &str) -> usize {
    UnicodeWidthStr::width(text)
}

/// Splits `text` into lines of at most `width` columns, at spaces where it can.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(2);
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut len = 0;
    for word in text.split(' ') {
        let wlen = columns(word);
        if len > 0 && len + 1 + wlen > width {
            lines.push(std::mem::take(&mut line));
            len = 0;
        }
        if len > 0 {
            line.push(' ');
            len += 1;
        }
        // A word longer than a line is cut.
        for c in word.chars() {
            let w = UnicodeWidthChar::width(c).unwrap_or(0);
            if len + w > width {
                lines.push(std::mem::take(&mut line));
                len = 0;
            }
            line.push(c);
            len += w;
        }
    }
    lines.push(line);
    lines
}

/// The first characters of `text` that fit in `width` columns.
fn fit(text: &str, width: usize) -> String {
    let mut used = 0;
    text.chars()
        .take_while(|c| {
            used += UnicodeWidthChar::width(*c).unwrap_or(0);
            used <= width
        })
        .collect()
}

fn border(title: String, focused: bool) -> Block<'static> {
    let style = if focused { Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD) } else { Style::new() };
    Block::bordered().title(title).border_style(style)
}

/// The open conversation's name, for people.
fn title(app: &App) -> String {
    let Some(open) = &app.open else { return " no conversation open ".into() };
    let chat = app.chats.iter().find(|c| &c.conversation == open);
    let name = chat.map_or_else(|| open.clone(), |c| clean(&c.name));
    match chat.map(|c| c.kind.as_str()) {
        Some("channel") => format!(" # {name} "),
        Some("dm") => format!(" @ {name} "),
        Some("group") => format!(" group {name} "),
        _ if open == "mail" => match &app.thread {
            Some(t) => format!(" mail thread: {} ", t.first().map_or_else(String::new, |m| clean(&m.subject))),
            None => " mail ".into(),
        },
        _ => format!(" {name} "),
    }
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &App) {
    let compose_height = match &app.compose {
        Some(Compose::Mail { .. }) => 5,
        Some(_) => 3,
        None => 0,
    };
    let [main, compose, status] = Layout::vertical([Constraint::Min(3), Constraint::Length(compose_height), Constraint::Length(1)]).areas(frame.area());
    let info_width = if app.info.is_some() || app.pipeline.is_some() { 36 } else { 0 };
    let [chats, conversation, info] = Layout::horizontal([Constraint::Length(30), Constraint::Min(20), Constraint::Length(info_width)]).areas(main);
    draw_chats(frame, app, chats);
    if app.in_mail() {
        draw_mail(frame, app, conversation);
    } else {
        draw_conversation(frame, app, conversation);
    }
    if app.info.is_some() {
        draw_info(frame, app, info);
    } else if app.pipeline.is_some() {
        draw_pipeline(frame, app, info);
    }
    if app.compose.is_some() {
        draw_compose(frame, app, compose);
    }
    draw_status(frame, app, status);
    if app.help {
        draw_help(frame, frame.area());
    }
    if app.approval.is_some() {
        draw_approval(frame, app, frame.area());
    }
}

/// A signing waiting for approval: Secure's own summary of what is signed, over everything.
fn draw_approval(frame: &mut Frame, app: &App, area: Rect) {
    let Some(p) = &app.approval else { return };
    let mut lines = vec![
        Line::styled(format!("/act {} asks to sign with your key {:?}:", clean(&p.action), clean(&p.review.key)), Style::new().add_modifier(Modifier::BOLD)),
        Line::raw(""),
    ];
    lines.extend(p.review.summary.iter().map(|l| Line::raw(format!("  {}", clean(l)))));
    lines.push(Line::raw(""));
    lines.push(Line::from(vec![
        Span::styled("y", Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)),
        Span::raw(" sign exactly this · "),
        Span::styled("n", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
        Span::raw("/Esc refuse"),
    ]));
    let width = 100.min(area.width);
    let height = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height };
    frame.render_widget(Clear, popup);
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(" approve signing ").border_style(Style::new().fg(Color::Yellow))), popup);
}

fn draw_chats(frame: &mut Frame, app: &App, area: Rect) {
    let width = area.width.saturating_sub(2) as usize;
    let items: Vec<ListItem> = app
        .chats
        .iter()
        .map(|c| {
            let icon = match c.kind.as_str() {
                "channel" => "#",
                "dm" => "@",
                "group" => "&",
                "pipeline" => "⚙",
                _ => "✉",
            };
            let unread = if c.unread > 0 { format!(" {}", c.unread) } else { String::new() };
            let room = width.saturating_sub(2 + unread.len() + 2);
            let name = fit(&clean(&c.name), room);
            let pad = width.saturating_sub(2 + columns(&name) + unread.len() + 2);
            let mut spans = vec![Span::raw(format!("{icon} ")), Span::raw(name), Span::raw(" ".repeat(pad))];
            if c.unread > 0 {
                spans[1] = spans[1].clone().style(Style::new().add_modifier(Modifier::BOLD));
                spans.push(Span::styled(unread, Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)));
            }
            ListItem::new(Line::from(spans))
        })
        .collect();
    let empty = items.is_empty();
    let list = List::new(items)
        .block(border(" chats ".into(), app.focus() == Focus::Chats))
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = ListState::default().with_selected((!empty).then_some(app.selected));
    frame.render_stateful_widget(list, area, &mut state);
    if empty {
        let inner = area.inner(ratatui::layout::Margin::new(1, 1));
        frame.render_widget(Paragraph::new("No conversations yet.\nTab, then /dm USER to start one.").wrap(Wrap { trim: false }), inner);
    }
}

/// The first line to show, given which line each row starts on, so the cursor's row is on
/// screen (at the bottom once it is below the first screenful).
fn scroll_to(lines: usize, starts: &[usize], cursor: usize, height: usize) -> usize {
    let Some(&start) = starts.get(cursor) else { return lines.saturating_sub(height) };
    let end = starts.get(cursor + 1).copied().unwrap_or(lines);
    end.saturating_sub(height).min(start)
}

/// Draws the lines of a view from `first` on: only what fits is handed to ratatui, so a long
/// history costs nothing extra to draw and has no line-count limit.
fn show(frame: &mut Frame, area: Rect, mut lines: Vec<Line<'static>>, first: usize) {
    let end = (first + area.height as usize).min(lines.len());
    let visible: Vec<Line> = lines.drain(first.min(end)..end).collect();
    frame.render_widget(Paragraph::new(visible), area);
}

fn draw_conversation(frame: &mut Frame, app: &App, area: Rect) {
    let focused = app.focus() == Focus::Conversation;
    let block = border(title(app), focused);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if app.open.is_none() {
        frame.render_widget(Paragraph::new("Pick a conversation in the chat list and press Enter.  ? shows every key."), inner);
        return;
    }
    let stalled = app.status.as_ref().and_then(|s| {
        let group = app.open_group()?;
        s.conversations.iter().find(|c| c.id == group)?.stalled.clone()
    });
    // A stalled group says so above the messages, where scrolling does not take it away.
    let inner = match stalled {
        Some(why) => {
            let [banner, rest] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
            let text = format!("STALLED: {}. Recovery: `canopy-msg group leave`, then an admin adds you again", clean(&why));
            frame.render_widget(Paragraph::new(Line::styled(text, Style::new().fg(Color::Red))), banner);
            rest
        }
        None => inner,
    };
    let mut lines: Vec<Line<'static>> = Vec::new();
    if app.older {
        let open = app.open.as_deref().unwrap_or_default();
        lines.push(Line::styled(format!("older messages are not shown here: canopy-msg read {}", clean(open)), Style::new().fg(Color::DarkGray)));
    }
    let mut starts = Vec::new();
    let width = inner.width as usize;
    for (i, row) in app.rows().iter().enumerate() {
        let m = &app.messages[row.message];
        starts.push(lines.len());
        let indent = if row.depth > 0 { "   ↳ " } else { "" };
        let mut tail = String::new();
        if m.edited {
            tail.push_str(" (edited)");
        }
        if m.pending {
            tail.push_str(" (pending)");
        }
        if m.marked {
            tail.push_str(" ★");
        }
        let head = if m.control { format!("{} · ", clock(m.sent_ms)) } else { format!("{} {}: ", clock(m.sent_ms), clean(&m.from)) };
        let body = format!("{head}{}{tail}", clean(&m.text));
        let mut style = if m.control { Style::new().fg(Color::DarkGray).add_modifier(Modifier::ITALIC) } else { Style::new() };
        if m.pending {
            style = style.fg(Color::DarkGray);
        }
        if i == app.cursor && focused {
            style = style.add_modifier(Modifier::REVERSED);
        }
        // Continuation lines start under the text, past the indent and the time.
        let cont = " ".repeat(columns(indent) + 6);
        for (k, text) in wrap(&body, width.saturating_sub(cont.len()).max(10)).into_iter().enumerate() {
            let text = if k == 0 { format!("{indent}{text}") } else { format!("{cont}{text}") };
            lines.push(Line::styled(text, style));
        }
    }
    if starts.is_empty() {
        lines.push(Line::styled("No messages yet. Enter to write the first.", Style::new().fg(Color::DarkGray)));
    }
    let first = scroll_to(lines.len(), &starts, app.cursor, inner.height as usize);
    show(frame, inner, lines, first);
}

fn draw_mail(frame: &mut Frame, app: &App, area: Rect) {
    let focused = app.focus() == Focus::Conversation;
    let block = border(title(app), focused);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let width = inner.width as usize;
    let mut lines: Vec<Line<'static>> = Vec::new();
    let mut starts = Vec::new();
    let highlight = |i: usize| if i == app.cursor && focused { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() };
    match &app.thread {
        None => {
            for (i, m) in app.mails.iter().enumerate() {
                starts.push(lines.len());
                let re = if m.prev.is_some() { " ↩" } else { "" };
                lines.push(Line::styled(format!("{} {:<12} {}{re}", clock(m.sent_ms), clean(&m.from), clean(&m.subject)), highlight(i)));
            }
            if app.mails.is_empty() {
                lines.push(Line::styled("No mail. n writes one.", Style::new().fg(Color::DarkGray)));
            }
        }
        Some(thread) => {
            for (i, m) in thread.iter().enumerate() {
                starts.push(lines.len());
                let to: Vec<String> = m.to.iter().map(|u| u.chars().take(8).collect()).collect();
                lines.push(Line::styled(format!("{} {} → {}", clock(m.sent_ms), clean(&m.from), to.join(", ")), highlight(i).add_modifier(Modifier::BOLD)));
                lines.push(Line::styled(format!("subject: {}", clean(&m.subject)), highlight(i)));
                for l in m.body.lines() {
                    for w in wrap(&clean(l), width) {
                        lines.push(Line::raw(w));
                    }
                }
                lines.push(Line::raw(""));
            }
        }
    }
    let first = scroll_to(lines.len(), &starts, app.cursor, inner.height as usize);
    show(frame, inner, lines, first);
}

fn draw_info(frame: &mut Frame, app: &App, area: Rect) {
    let Some(g) = &app.info else { return };
    let mut lines = vec![
        Line::styled(clean(&g.name), Style::new().add_modifier(Modifier::BOLD)),
        Line::raw(if g.description.is_empty() { "(no description)".to_string() } else { clean(&g.description) }),
        Line::raw(format!("id {}", g.id)),
        Line::raw(format!("epoch {}{}", g.epoch, if g.committer { " · this device commits" } else { "" })),
    ];
    if g.removed {
        lines.push(Line::styled("removed: this device reads nothing new", Style::new().fg(Color::Red)));
    }
    lines.push(Line::raw(""));
    lines.push(Line::styled(format!("members ({})", g.members.len()), Style::new().add_modifier(Modifier::BOLD)));
    for m in &g.members {
        let name = m.name.as_deref().map_or_else(|| m.user.chars().take(8).collect(), clean);
        let me = if m.user == app.me { " (me)" } else { "" };
        lines.push(Line::raw(format!("{}{name}{me} · {} dev", if m.admin { "★ " } else { "  " }, m.devices)));
    }
    lines.push(Line::raw(""));
    if g.admin {
        lines.push(Line::styled("admin actions (compose box):", Style::new().add_modifier(Modifier::BOLD)));
        for a in ["/rename NAME", "/describe TEXT", "/add USER…", "/remove USER…", "/revoke"] {
            lines.push(Line::raw(format!("  {a}")));
        }
    } else {
        lines.push(Line::styled("only admins change the group", Style::new().fg(Color::DarkGray)));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(border(" group info ".into(), false)), area);
}

fn draw_pipeline(frame: &mut Frame, app: &App, area: Rect) {
    let Some(p) = &app.pipeline else { return };
    let v = &p.view;
    let mut lines = vec![Line::styled(clean(&v.title), Style::new().add_modifier(Modifier::BOLD)), Line::raw(clean(&v.status))];
    lines.extend(v.lines.iter().map(|l| Line::raw(format!(" {}", clean(l)))));
    lines.push(Line::raw(""));
    if v.actions.is_empty() {
        lines.push(Line::styled(if v.closed { "closed" } else { "nothing for you to do now" }, Style::new().fg(Color::DarkGray)));
    } else {
        lines.push(Line::styled("actions (compose box):", Style::new().add_modifier(Modifier::BOLD)));
        for a in &v.actions {
            lines.push(Line::raw(format!(" /act {} {}", clean(&a.name), clean(&a.args.join(" ")))));
            lines.push(Line::styled(format!("   {}", clean(&a.label)), Style::new().fg(Color::DarkGray)));
        }
    }
    lines.push(Line::raw(""));
    lines.push(Line::styled(format!("state {} · {} steps", &p.hash[..p.hash.len().min(12)], p.steps), Style::new().fg(Color::DarkGray)));
    for r in &p.refused {
        lines.push(Line::styled(format!("refused: {}", clean(r)), Style::new().fg(Color::Yellow)));
    }
    for d in &p.diverged {
        lines.push(Line::styled(format!("DIVERGED: {}", clean(d)), Style::new().fg(Color::Red)));
    }
    let title = format!(" pipeline · {} ", clean(&p.model));
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(border(title, false)), area);
}

fn draw_compose(frame: &mut Frame, app: &App, area: Rect) {
    let Some(compose) = &app.compose else { return };
    let cursor = Span::styled(" ", Style::new().add_modifier(Modifier::REVERSED));
    let (title, lines) = match compose {
        Compose::Message { text, reply_to } => {
            let title = match reply_to {
                Some(root) => {
                    let to = app.messages.iter().find(|m| &m.id == root).map_or_else(String::new, |m| format!(" {}: {}", clean(&m.from), clean(&m.text)));
                    format!(" reply in thread to{} ", to.chars().take(40).collect::<String>())
                }
                None => " message (Enter send · Esc cancel · /commands) ".into(),
            };
            (title, vec![Line::from(vec![Span::raw(text.clone()), cursor])])
        }
        Compose::Edit { text, .. } => (" edit (Enter save · Esc cancel) ".into(), vec![Line::from(vec![Span::raw(text.clone()), cursor])]),
        Compose::Mail { to, subject, body, prev, field } => {
            let line = |label: &str, value: &str, here: bool| {
                let mut spans = vec![Span::styled(format!("{label:<9}"), Style::new().add_modifier(Modifier::BOLD)), Span::raw(value.to_string())];
                if here {
                    spans.push(cursor.clone());
                }
                Line::from(spans)
            };
            let title = if prev.is_some() { " reply by mail (Tab next field · Enter send) " } else { " new mail (Tab next field · Enter send) " };
            (
                title.into(),
                vec![line("to:", to, *field == MailField::To), line("subject:", subject, *field == MailField::Subject), line("body:", body, *field == MailField::Body)],
            )
        }
    };
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(border(title, app.focus() == Focus::Compose)), area);
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect) {
    let line = if let Some(trouble) = app.trouble() {
        Line::styled(format!(" {trouble} "), Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD))
    } else if let Some(n) = &app.notice {
        Line::styled(format!(" {}", clean(&n.text)), Style::new().fg(if n.error { Color::Red } else { Color::Green }))
    } else {
        let me: String = app.me.chars().take(8).collect();
        Line::raw(format!(" user {me} · relay up · ? help · q quit"))
    };
    frame.render_widget(Paragraph::new(line), area);
    // An error the user caused still shows while the relay is down, on the right.
    if app.trouble().is_some()
        && let Some(n) = &app.notice
    {
        let text = format!(" {} ", clean(&n.text));
        let w = (text.chars().count() as u16).min(area.width / 2);
        let right = Rect { x: area.x + area.width - w, width: w, ..area };
        frame.render_widget(Paragraph::new(Line::styled(text, Style::new().fg(Color::Yellow))), right);
    }
}

fn draw_help(frame: &mut Frame, area: Rect) {
    let width = 96.min(area.width);
    let height = (HELP.len() as u16 + 4).min(area.height);
    let popup = Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height };
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(keys, what)| Line::from(vec![Span::styled(format!("{keys:<32}"), Style::new().fg(Color::Cyan)), Span::raw(*what)]))
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::styled("any key closes this help", Style::new().fg(Color::DarkGray)));
    frame.render_widget(Clear, popup);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" keys ")), popup);
}
