// The Canopy messenger's web page. It asks the UI process (`canopy-msg web`) through
// /api/call (Secure's requests, as JSON), /api/pipeline/ID[/act] and the event stream
// /api/events. Every text that comes from anyone is put on the page with textContent or as
// a text node, never as HTML: message texts, names, subjects and pipeline views are untrusted.

const $ = (id) => document.getElementById(id);

/** An element with attributes and children; strings become text nodes. */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return e;
}

/** One Secure request; its reply, or an Error with Secure's one line. */
async function api(request) {
  const r = await fetch('/api/call', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(request) });
  if (!r.ok) throw new Error((await r.text()).trim());
  return r.json();
}

async function getJson(url, body) {
  const init = body === undefined ? {} : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
  const r = await fetch(url, init);
  if (!r.ok) throw new Error((await r.text()).trim());
  return r.json();
}

const state = {
  me: '',
  chats: [],
  contacts: [],
  open: null, // the open conversation: "TEAM/CHANNEL", "dm:USER", "group:ID", "mail", or "marked"
  messages: [],
  rows: [],
  cursor: -1,
  chatCursor: 0,
  replyTo: null, // a message id, or a mail
  editing: null, // a message id
  mails: [],
  thread: null, // the open mail thread
  zone: 'list', // where keys go: "list" or "view"
};

function say(text, error = false) {
  const n = $('notice');
  n.textContent = text;
  n.className = error ? 'error' : 'ok';
}

/** A user's contact name, else the start of the id; "me" for this user. */
function nameOf(user) {
  if (user === state.me) return 'me';
  const c = state.contacts.find((c) => c.user === user);
  return c && c.name ? c.name : user;
}

const ICONS = { channel: '#', dm: '@', group: '&', pipeline: '⚙', mail: '✉' };

function timeOf(ms) {
  const d = new Date(ms);
  return d.toLocaleString([], { hour: '2-digit', minute: '2-digit', month: 'short', day: 'numeric' });
}

// ---- the chat list ----

async function loadChats() {
  const reply = await api({ op: 'chats' });
  state.chats = reply.chats;
  // The list reorders by activity: the cursor stays on the open chat, or in range.
  const at = state.chats.findIndex((c) => c.conversation === state.open);
  if (state.zone === 'view' && at >= 0) state.chatCursor = at;
  state.chatCursor = Math.max(0, Math.min(state.chatCursor, state.chats.length - 1));
  renderChats();
}

function renderChats() {
  const list = $('chat-list');
  list.replaceChildren(
    ...state.chats.map((c, i) =>
      el(
        'li',
        {},
        el(
          'button',
          {
            type: 'button',
            class: 'chat' + (c.conversation === state.open ? ' open' : '') + (i === state.chatCursor ? ' cursor' : ''),
            'data-conversation': c.conversation,
            'data-kind': c.kind,
            onclick: () => openChat(c.conversation),
          },
          el('span', { class: 'icon', 'aria-hidden': 'true' }, ICONS[c.kind] || '·'),
          el('span', { class: 'name' }, c.name),
          c.unread > 0 ? el('span', { class: 'unread', 'aria-label': `${c.unread} unread` }, String(c.unread)) : null,
        ),
      ),
    ),
  );
}

function chatOf(conversation) {
  return state.chats.find((c) => c.conversation === conversation);
}

async function openChat(conversation) {
  state.open = conversation;
  const at = state.chats.findIndex((c) => c.conversation === conversation);
  if (at >= 0) state.chatCursor = at;
  state.cursor = -1;
  state.replyTo = null;
  state.editing = null;
  state.thread = null;
  state.zone = 'view';
  $('layout').dataset.show = 'view';
  $('side').hidden = true;
  $('side').replaceChildren();
  state.side = null;
  $('mail-compose').hidden = true;
  await reload();
  // After the read: its unread count is gone.
  await loadChats();
  // Focus the conversation, unless the user has moved on meanwhile (a key pressed while the
  // chat loaded, such as Enter to write, wins).
  const focused = document.activeElement;
  if (!focused || focused === document.body || focused.classList.contains('chat')) $('messages').focus();
}

async function reload() {
  const open = state.open;
  if (!open) return;
  const chat = chatOf(open);
  if (open === 'mail') {
    $('title').textContent = 'Mail';
    // Reading the mailbox marks it read, as in the TUI.
    await api({ op: 'read', conversation: 'mail', before: null });
    const reply = await api({ op: 'mail-list' });
    state.mails = reply.mails;
    if (state.thread) {
      const t = await api({ op: 'mail-thread', reference: state.thread[0].reference });
      state.thread = t.mails;
    }
    renderMail();
  } else if (open === 'marked') {
    $('title').textContent = 'Marked messages';
    const reply = await api({ op: 'marked' });
    setMessages(reply.messages);
  } else {
    $('title').textContent = (ICONS[chat?.kind] || '') + ' ' + (chat?.name || open);
    const reply = await api({ op: 'read', conversation: open, before: null });
    setMessages(reply.messages);
    if (chat?.kind === 'group') await loadGroup(open.slice('group:'.length));
    if (chat?.kind === 'pipeline') await loadPipeline(open.slice('group:'.length));
  }
  renderCompose();
}

// ---- conversations ----

/** Thread order, as the TUI shows it: each root, then its replies. */
function threadRows(messages) {
  const index = new Map(messages.map((m, i) => [m.id, i]));
  const isRoot = (i) => {
    const r = messages[i].reply_to;
    return !r || !index.has(r) || index.get(r) === i;
  };
  const parent = (i) => {
    const r = messages[i].reply_to;
    if (!r || !index.has(r)) return null;
    const p = index.get(r);
    return p !== i && isRoot(p) ? p : null;
  };
  const replies = new Map();
  const roots = [];
  messages.forEach((_, i) => {
    const p = parent(i);
    if (p === null) roots.push(i);
    else replies.set(p, [...(replies.get(p) || []), i]);
  });
  const rows = [];
  for (const r of roots) {
    rows.push({ message: r, depth: 0 });
    for (const m of replies.get(r) || []) rows.push({ message: m, depth: 1 });
  }
  return rows;
}

function setMessages(messages) {
  // The same messages again (a refresh for another chat's news): the list is left as it is,
  // so nothing under the user's pointer is replaced.
  if (JSON.stringify(messages) === JSON.stringify(state.messages) && state.rows.length === messages.length) return;
  const selected = state.rows[state.cursor] && state.messages[state.rows[state.cursor].message]?.id;
  state.messages = messages;
  state.rows = threadRows(messages);
  const again = state.rows.findIndex((r) => messages[r.message].id === selected);
  state.cursor = again >= 0 ? again : state.rows.length - 1;
  renderMessages();
}

function isMine(m) {
  return m.user === state.me && !m.control && !m.pending;
}

function renderMessages() {
  const list = $('messages');
  list.replaceChildren(
    ...state.rows.map((row, i) => {
      const m = state.messages[row.message];
      const mine = isMine(m);
      return el(
        'li',
        { class: 'message' + (row.depth ? ' reply' : '') + (i === state.cursor ? ' cursor' : '') + (m.control ? ' control' : ''), 'data-id': m.id, onclick: () => select(i) },
        el(
          'div',
          { class: 'meta' },
          row.depth ? el('span', { class: 'thread', 'aria-label': 'reply' }, '↳ ') : null,
          el('span', { class: 'from' }, mine ? 'me' : m.from),
          state.open === 'marked' ? el('span', { class: 'where' }, ` in ${m.channel_name || m.conversation}`) : null,
          el('time', {}, ' ' + timeOf(m.sent_ms)),
          m.edited ? el('span', { class: 'edited' }, ' (edited)') : null,
          m.pending ? el('span', { class: 'pending' }, ' (pending)') : null,
          m.marked ? el('span', { class: 'star', 'aria-label': 'marked' }, ' ★') : null,
        ),
        el('div', { class: 'text' }, m.text),
        m.control || state.open === 'marked'
          ? null
          : el(
              'div',
              { class: 'actions' },
              el('button', { type: 'button', class: 'reply-button', onclick: (e) => (e.stopPropagation(), startReply(m)) }, 'Reply'),
              mine ? el('button', { type: 'button', class: 'edit-button', onclick: (e) => (e.stopPropagation(), startEdit(m)) }, 'Edit') : null,
              el('button', { type: 'button', class: 'mark-button', onclick: (e) => (e.stopPropagation(), toggleMark(m)) }, m.marked ? 'Unmark' : 'Mark'),
            ),
      );
    }),
  );
  list.querySelector('.cursor')?.scrollIntoView({ block: 'nearest' });
}

function select(i) {
  state.cursor = Math.max(0, Math.min(i, state.rows.length - 1));
  renderMessages();
}

function selectedMessage() {
  const row = state.rows[state.cursor];
  return row ? state.messages[row.message] : null;
}

function rootOf(m) {
  // A reply to a reply joins the root's thread.
  if (!m.reply_to) return m.id;
  const parent = state.messages.find((x) => x.id === m.reply_to);
  return parent ? parent.reply_to || parent.id : m.reply_to;
}

function startReply(m) {
  state.editing = null;
  state.replyTo = rootOf(m);
  renderCompose();
  $('text').focus();
}

function startEdit(m) {
  if (!isMine(m)) return say('only your own sent messages can be edited', true);
  state.replyTo = null;
  state.editing = m.id;
  $('text').value = m.text;
  renderCompose();
  $('text').focus();
}

async function toggleMark(m) {
  try {
    await api({ op: 'mark', id: m.id, marked: !m.marked });
    await reload();
  } catch (e) {
    say(e.message, true);
  }
}

function renderCompose() {
  const inMail = state.open === 'mail' || state.open === 'marked' || !state.open;
  $('compose').hidden = inMail;
  const note = $('reply-note');
  if (state.editing) {
    note.hidden = false;
    note.querySelector('span').textContent = 'editing your message';
  } else if (state.replyTo) {
    const root = state.messages.find((m) => m.id === state.replyTo);
    note.hidden = false;
    note.querySelector('span').textContent = `reply in thread to ${root ? root.from + ': ' + root.text.slice(0, 60) : 'the message'}`;
  } else {
    note.hidden = true;
  }
}

async function submit() {
  const text = $('text').value;
  if (!text.trim()) return say('nothing to send', true);
  const request = state.editing
    ? { op: 'edit', id: state.editing, text }
    : { op: 'send', to: state.open, text, reply_to: state.replyTo };
  try {
    const reply = await api(request);
    $('text').value = '';
    state.replyTo = null;
    state.editing = null;
    const down = reply.queued || $('relay').classList.contains('trouble');
    say(down ? 'queued: the relay is unreachable, it goes out when it is back' : request.op === 'edit' ? 'edited' : 'sent');
    await reload();
    await loadChats();
  } catch (e) {
    // The draft stays in the box.
    say(e.message, true);
  }
}

// ---- mail ----

function renderMail() {
  $('compose').hidden = true;
  const list = $('messages');
  const items = state.thread || state.mails;
  if (state.cursor < 0 || state.cursor >= items.length) state.cursor = items.length ? 0 : -1;
  list.replaceChildren(
    state.thread ? el('li', { class: 'mail-head' }, el('button', { type: 'button', onclick: () => ((state.thread = null), (state.cursor = 0), renderMail()) }, '← inbox'), ' ', el('strong', {}, state.thread[0]?.subject || '')) : null,
    ...items.map((m, i) =>
      el(
        'li',
        { class: 'mail' + (i === state.cursor ? ' cursor' : ''), 'data-reference': m.reference, onclick: () => ((state.cursor = i), state.thread ? renderMail() : openThread(m)) },
        el('div', { class: 'meta' }, el('span', { class: 'from' }, m.from), ' → ', el('span', { class: 'to' }, m.to.map(nameOf).join(', ')), el('time', {}, ' ' + timeOf(m.sent_ms))),
        el('div', { class: 'subject' }, m.subject),
        state.thread ? el('div', { class: 'text' }, m.body) : null,
        state.thread ? el('div', { class: 'actions' }, el('button', { type: 'button', class: 'reply-button', onclick: (e) => (e.stopPropagation(), startMail(m)) }, 'Reply')) : null,
      ),
    ),
  );
}

async function openThread(m) {
  try {
    const t = await api({ op: 'mail-thread', reference: m.reference });
    state.thread = t.mails;
    state.cursor = t.mails.length - 1;
    renderMail();
  } catch (e) {
    say(e.message, true);
  }
}

function startMail(prev) {
  const form = $('mail-compose');
  form.hidden = false;
  form.dataset.prev = prev ? prev.reference : '';
  // Everyone on the mail but this user: its sender and its other recipients (ids, shown
  // as contact names where there is one; either is a valid recipient).
  const others = prev ? [prev.user, ...prev.to].filter((u) => u && u !== state.me) : [];
  $('mail-to').value = [...new Set(others)].map(nameOf).join(', ');
  $('mail-subject').value = prev ? (prev.subject.startsWith('Re: ') ? prev.subject : 'Re: ' + prev.subject) : '';
  $('mail-body').value = '';
  (prev ? $('mail-body') : $('mail-to')).focus();
}

async function sendMail() {
  const form = $('mail-compose');
  const to = $('mail-to').value.split(/[\s,]+/).filter(Boolean);
  const request = { op: 'mail-send', to, subject: $('mail-subject').value, body: $('mail-body').value, prev: form.dataset.prev || null };
  try {
    const reply = await api(request);
    form.hidden = true;
    say(reply.queued ? 'mail queued: the relay is unreachable' : 'mail sent');
    if (state.open === 'mail') await reload();
    await loadChats();
  } catch (e) {
    say(e.message, true);
  }
}

// ---- groups ----

/** Whether the side panel must be drawn for `key` (what it shows); remembers it. */
function sideChanged(key) {
  if (state.side === key && $('side').childElementCount > 0) return false;
  state.side = key;
  return true;
}

async function loadGroup(id) {
  const reply = await api({ op: 'group-info', group: id });
  const g = reply.group;
  const side = $('side');
  side.hidden = false;
  // Unchanged: left as it is, so a half-typed admin field survives a live update.
  if (!sideChanged('group:' + JSON.stringify(g))) return;
  const op = async (operation) => {
    try {
      await api({ op: 'group-op', group: id, operation, force: false });
      say('done');
      await reload();
      await loadChats();
    } catch (e) {
      say(e.message, true);
    }
  };
  const field = (label, name, run) =>
    el(
      'form',
      { class: 'admin', onsubmit: (e) => (e.preventDefault(), run(e.target.elements[name].value)) },
      el('label', {}, label + ' ', el('input', { name, required: true })),
      el('button', { type: 'submit' }, label),
    );
  side.replaceChildren(
    el('h2', {}, 'Group info'),
    el('p', { class: 'group-name' }, g.name),
    g.description ? el('p', { class: 'description' }, g.description) : null,
    el('p', { class: 'muted' }, `epoch ${g.epoch}` + (g.stalled ? ` · stalled: ${g.stalled}` : '')),
    el('h3', {}, `Members (${g.members.length})`),
    el('ul', { class: 'members' }, ...g.members.map((m) => el('li', {}, m.user === state.me ? 'me' : m.name || m.user.slice(0, 8), m.admin ? el('span', { class: 'admin-tag' }, ' admin') : null))),
    g.admin
      ? el(
          'div',
          { class: 'admin-actions' },
          field('Rename', 'name', (name) => op({ kind: 'rename', name })),
          field('Describe', 'description', (description) => op({ kind: 'describe', description })),
          field('Add', 'users', (users) => op({ kind: 'add', users: users.split(/[\s,]+/).filter(Boolean), note: '' })),
          field('Remove', 'users', (users) => op({ kind: 'remove', users: users.split(/[\s,]+/).filter(Boolean), note: '' })),
          el('button', { type: 'button', onclick: () => op({ kind: 'revoke' }) }, 'Revoke keys (new epoch)'),
        )
      : el('p', { class: 'muted' }, 'only admins change the group'),
  );
}

// ---- pipelines ----

async function loadPipeline(id) {
  const side = $('side');
  side.hidden = false;
  let p;
  try {
    p = await getJson(`/api/pipeline/${encodeURIComponent(id)}`);
  } catch (e) {
    side.replaceChildren(el('h2', {}, 'Pipeline'), el('p', { class: 'error' }, e.message));
    state.side = null;
    return;
  }
  if (!sideChanged('pipeline:' + JSON.stringify(p))) return;
  side.replaceChildren(
    el('h2', {}, 'Pipeline · ', p.model),
    el('p', { class: 'pipeline-title' }, p.title),
    el('p', { class: 'pipeline-status' }, p.status),
    el('ul', { class: 'pipeline-lines' }, ...p.lines.map((l) => el('li', {}, l))),
    p.actions.length
      ? el(
          'div',
          { class: 'pipeline-actions' },
          ...p.actions.map((a) =>
            el(
              'form',
              { class: 'act', 'data-action': a.name, onsubmit: (e) => (e.preventDefault(), act(id, a.name, [...e.target.querySelectorAll('input')].map((i) => i.value).filter(Boolean))) },
              ...a.args.map((arg) => el('label', {}, arg + ' ', el('input', { name: arg, 'aria-label': arg }))),
              el('button', { type: 'submit', title: a.label }, a.name),
              el('span', { class: 'muted' }, ' ' + a.label),
            ),
          ),
        )
      : el('p', { class: 'muted' }, p.closed ? 'closed' : 'nothing for you to do now'),
    el('p', { class: 'muted' }, `state ${p.state_hash.slice(0, 12)} · ${p.steps} steps`),
    ...p.refused.map((r) => el('p', { class: 'refused' }, 'refused: ' + r)),
    ...p.diverged.map((d) => el('p', { class: 'diverged' }, 'DIVERGED: ' + d)),
  );
}

async function act(id, action, args, approved = null) {
  try {
    const r = await getJson(`/api/pipeline/${encodeURIComponent(id)}/act`, { action, args, approved });
    if (r.result === 'review') {
      approve(id, action, args, r);
      return;
    }
    say(approved ? 'signed and sent' : 'sent');
    await reload();
  } catch (e) {
    say(e.message, true);
  }
}

/** Secure's own summary of what a signing means; nothing is signed unless the user says so. */
function approve(id, action, args, review) {
  const dialog = $('approve');
  $('approve-what').textContent = `${action} asks to sign with your key "${review.key}":`;
  $('approve-summary').replaceChildren(...review.summary.map((l) => el('li', {}, l)));
  const yes = $('approve-yes');
  const no = $('approve-no');
  const done = (ok) => {
    yes.onclick = null;
    no.onclick = null;
    dialog.close();
    if (ok) act(id, action, args, review.digest);
    else say('not approved: nothing was signed', true);
  };
  yes.onclick = () => done(true);
  no.onclick = () => done(false);
  dialog.oncancel = (e) => (e.preventDefault(), done(false));
  dialog.showModal();
  no.focus();
}

// ---- status and live updates ----

function renderStatus(reply) {
  const relay = $('relay');
  if (reply.reply !== 'status') {
    relay.textContent = 'Secure is unreachable: ' + (reply.message || '');
    relay.className = 'trouble';
    return;
  }
  const s = reply;
  state.me = s.user;
  $('me').textContent = 'user ' + s.user.slice(0, 8);
  const up = s.network && s.relay && s.relay.parent_connected;
  const waiting = (s.relay ? s.relay.outbox : 0) + (s.pending || 0);
  if (up) {
    relay.textContent = 'relay up' + (waiting ? ` (${waiting} waiting)` : '');
    relay.className = 'ok';
  } else {
    relay.textContent = 'relay unreachable: sends are queued' + (waiting ? ` (${waiting} waiting)` : '');
    relay.className = 'trouble';
  }
}

let pending = null;
/** Several events in a burst are one reload. */
function soon() {
  if (pending) return;
  pending = setTimeout(async () => {
    pending = null;
    try {
      await reload();
      await loadChats();
    } catch (e) {
      say(e.message, true);
    }
  }, 20);
}

function listen() {
  const events = new EventSource('/api/events');
  events.addEventListener('message', () => soon());
  events.addEventListener('resync', () => soon());
  events.addEventListener('status', (e) => renderStatus(JSON.parse(e.data)));
  events.onerror = () => {
    $('relay').textContent = 'the web UI process is unreachable; retrying';
    $('relay').className = 'trouble';
  };
}

// ---- keys ----

function typing(target) {
  return target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement;
}

function moveChat(by) {
  state.chatCursor = Math.max(0, Math.min(state.chatCursor + by, state.chats.length - 1));
  renderChats();
  document.querySelector('#chat-list .cursor')?.focus();
}

function back() {
  state.zone = 'list';
  $('layout').dataset.show = 'list';
  const i = state.chats.findIndex((c) => c.conversation === state.open);
  if (i >= 0) state.chatCursor = i;
  renderChats();
  document.querySelector('#chat-list .cursor')?.focus();
}

document.addEventListener('keydown', (e) => {
  if (document.querySelector('dialog[open]')) return;
  if (typing(e.target)) {
    if (e.key === 'Escape') {
      e.target.blur();
      if (e.target.id === 'text') {
        state.replyTo = null;
        state.editing = null;
        e.target.value = '';
        renderCompose();
        $('messages').focus();
      }
      if (e.target.closest('#mail-compose')) $('mail-compose').hidden = true;
    } else if (e.key === 'Enter' && !e.shiftKey && e.target.id === 'text') {
      e.preventDefault();
      submit();
    }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const inList = state.zone === 'list' || !state.open;
  const mailItems = state.open === 'mail' ? state.thread || state.mails : null;
  switch (e.key) {
    case '?':
      $('help').showModal();
      break;
    case 'n':
      startMail(null);
      break;
    case 'j':
    case 'ArrowDown':
      if (inList) moveChat(1);
      else if (mailItems) ((state.cursor = Math.min(state.cursor + 1, mailItems.length - 1)), renderMail());
      else select(state.cursor + 1);
      break;
    case 'k':
    case 'ArrowUp':
      if (inList) moveChat(-1);
      else if (mailItems) ((state.cursor = Math.max(state.cursor - 1, 0)), renderMail());
      else select(state.cursor - 1);
      break;
    case 'Enter':
      if (e.target instanceof HTMLButtonElement && !e.target.classList.contains('chat')) return;
      if (inList) {
        const c = state.chats[state.chatCursor];
        if (c) openChat(c.conversation);
      } else if (mailItems) {
        const m = mailItems[state.cursor];
        if (m && !state.thread) openThread(m);
      } else if (state.open !== 'marked') {
        $('text').focus();
      }
      break;
    case 'r':
      if (inList) return;
      if (mailItems) {
        const m = mailItems[state.cursor];
        if (m) startMail(m);
      } else if (selectedMessage() && state.open !== 'marked') startReply(selectedMessage());
      break;
    case 'e':
      if (!inList && !mailItems && selectedMessage()) startEdit(selectedMessage());
      break;
    case 'm':
      if (!inList && !mailItems && selectedMessage()) toggleMark(selectedMessage());
      break;
    case 'Escape':
      if (state.thread) ((state.thread = null), (state.cursor = 0), renderMail());
      else back();
      break;
    default:
      return;
  }
  e.preventDefault();
});

// ---- start ----

async function start() {
  $('compose').addEventListener('submit', (e) => (e.preventDefault(), submit()));
  $('mail-compose').addEventListener('submit', (e) => (e.preventDefault(), sendMail()));
  $('mail-cancel').addEventListener('click', () => ($('mail-compose').hidden = true));
  $('new-mail').addEventListener('click', () => startMail(null));
  $('show-marked').addEventListener('click', () => openChat('marked'));
  $('cancel-reply').addEventListener('click', () => ((state.replyTo = null), (state.editing = null), renderCompose()));
  $('back').addEventListener('click', back);
  $('help-button').addEventListener('click', () => $('help').showModal());
  $('help-close').addEventListener('click', () => $('help').close());
  try {
    renderStatus(await api({ op: 'status' }));
    state.contacts = (await api({ op: 'contacts' })).contacts;
    await loadChats();
  } catch (e) {
    say(e.message, true);
  }
  renderCompose();
  listen();
  document.querySelector('#chat-list .chat')?.focus();
}

start();
