//! `canopy-msg web`: the browser UI, served by this UI process on the device itself, so no
//! server anywhere sees plaintext. It talks to Secure exactly as the TUI does; keys stay in
//! Secure, and pipelines' models run here (`crate::pipeline`).
//!
//! **Who may talk to it** (`docs/messenger.md`, web UI):
//! - it listens on loopback unless told otherwise (and then warns);
//! - it prints one URL with a one-time token; the first request exchanges the token for an
//!   `HttpOnly`, `SameSite=Strict` session cookie and is redirected to a URL without it. A
//!   used or wrong token is refused;
//! - every other request must carry the session;
//! - `Host` must name this server (no DNS rebinding) and `Origin`, when sent, must be this
//!   server (no other page in the browser can post here); a state-changing request must send
//!   `Origin`;
//! - every response carries a strict Content-Security-Policy (no inline script, nothing from
//!   elsewhere), and the page builds every untrusted text with `textContent`.
//!
//! The browser asks through a narrow API: [`allowed`] Secure requests as JSON (the same
//! protocol the TUI speaks), a pipeline's pane and actions (signing approved in two passes,
//! as in the TUI), and a stream of server-sent events: every new or edited message, and the
//! status when it changes.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path, Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use canopy_msg_secure::proto::{Reply, Request};
use tokio::sync::broadcast;

use crate::home::Home;
use crate::ui::Secure;

/// The page: plain HTML, CSS and one JavaScript module, no build step, nothing fetched from
/// elsewhere.
const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/app.css");

/// The session cookie's name.
const COOKIE: &str = "canopy_session";

/// What every response carries: scripts and styles from this server only, no inline script,
/// no frames, no plugins, connections only back here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// How long one call to Secure may take before the browser gets an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's state.
struct Web {
    home: Home,
    /// The one-time token of the printed URL, until it is used.
    token: Mutex<Option<String>>,
    /// Sessions handed out (their cookie values).
    sessions: Mutex<HashSet<String>>,
    /// Where it listens: what `Host` and `Origin` must name.
    addr: SocketAddr,
    /// Live events for every open page.
    events: broadcast::Sender<String>,
}

/// The Secure requests a page may make: reading and writing conversations, mail, groups and
/// contacts. Not: backups (they write files), raw pipeline steps and signing (those go
/// through the model and the approval of `POST /api/pipeline/ID/act`), key packages, device
/// links, the sandbox check, or stopping the device.
pub fn allowed(request: &Request) -> bool {
    matches!(
        request,
        Request::Ping
            | Request::Status
            | Request::Whoami
            | Request::Teams
            | Request::Channels { .. }
            | Request::Members { .. }
            | Request::Chats
            | Request::Read { .. }
            | Request::Send { .. }
            | Request::Edit { .. }
            | Request::Mark { .. }
            | Request::Marked
            | Request::MailList
            | Request::MailThread { .. }
            | Request::MailSend { .. }
            | Request::Contacts
            | Request::ContactName { .. }
            | Request::Groups
            | Request::GroupInfo { .. }
            | Request::GroupCreate { .. }
            | Request::GroupOp { .. }
            | Request::GroupLeave { .. }
            | Request::Pipelines
    )
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(canopy_msg_core::engine::hex(&bytes))
}

/// Compares without stopping at the first difference, so the time taken says nothing about
/// how much of a token was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What is said when the server listens where other machines can reach it.
pub fn warning(addr: SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "WARNING: listening on {addr}, which is not loopback: other machines can reach this server. \
             Only the URL's one-time token and the session keep them out, and the traffic is not encrypted."
        )
    })
}

/// Whether a `Host` header (`name:port`) names the server listening on `addr`: its port,
/// and its address — or, on loopback, `localhost` and any loopback address; on an
/// unspecified address (`0.0.0.0`), any address literal. Never another name: a page of
/// another site that rebinds its name to this address sends that name, and is refused.
pub fn names_this(addr: SocketAddr, host: &str) -> bool {
    let local = addr.ip().is_loopback() || addr.ip().is_unspecified();
    if let Some(port) = host.strip_prefix("localhost:") {
        return local && port == addr.port().to_string();
    }
    match host.parse::<SocketAddr>() {
        Ok(h) => h.port() == addr.port() && (h.ip() == addr.ip() || addr.ip().is_unspecified() || (addr.ip().is_loopback() && h.ip().is_loopback())),
        Err(_) => false,
    }
}

/// Whether an `Origin` header is a page of this server.
fn origin_is_this(addr: SocketAddr, origin: &str) -> bool {
    origin.strip_prefix("http://").is_some_and(|host| names_this(addr, host))
}

/// `canopy-msg web [--listen ADDR]`: serves the page until interrupted.
pub fn run(home: &Home, listen: SocketAddr) -> anyhow::Result<()> {
    // Secure must be up; say so now rather than in the browser.
    Secure::connect(home)?.call(&Request::Ping)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(home.clone(), listen))
}

async fn serve(home: Home, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    if let Some(warning) = warning(addr) {
        tracing::warn!(%addr, "the web UI listens on a non-loopback address");
        eprintln!("{warning}");
    }
    let token = random_hex(16)?;
    let (events, _) = broadcast::channel(1024);
    let web = Arc::new(Web { home: home.clone(), token: Mutex::new(Some(token.clone())), sessions: Mutex::default(), addr, events: events.clone() });
    std::thread::Builder::new().name("web-watch".into()).spawn({
        let (home, events) = (home.clone(), events.clone());
        move || watch(home, events)
    })?;
    std::thread::Builder::new().name("web-status".into()).spawn(move || status(home, events))?;

    let app = Router::new()
        .route("/", get(index))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/api/call", post(call))
        .route("/api/pipeline/{id}", get(pane))
        .route("/api/pipeline/{id}/act", post(act))
        .route("/api/events", get(stream))
        .layer(middleware::from_fn_with_state(Arc::clone(&web), guard))
        .with_state(web);
    println!("http://{addr}/?token={token}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    axum::serve(listener, app).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{why}\n")).into_response()
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_string())
    })
}

/// Every request passes here: the host, the origin, the token exchange and the session.
async fn guard(State(web): State<Arc<Web>>, request: HttpRequest, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !names_this(web.addr, &host.to_ascii_lowercase()) {
        return secured(refuse(StatusCode::MISDIRECTED_REQUEST, "refused: this server does not answer to that Host"));
    }
    match headers.get(header::ORIGIN).map(|o| o.to_str().unwrap_or("")) {
        Some(origin) if !origin_is_this(web.addr, &origin.to_ascii_lowercase()) => {
            return secured(refuse(StatusCode::FORBIDDEN, "refused: a request from another origin"));
        }
        None if request.method() != Method::GET && request.method() != Method::HEAD => {
            return secured(refuse(StatusCode::FORBIDDEN, "refused: a change without an Origin"));
        }
        _ => {}
    }
    // The URL's token, once: exchanged for a session, and the token leaves the address bar.
    if let Some(given) = request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token="))) {
        let fresh = {
            let mut token = web.token.lock().unwrap_or_else(|e| e.into_inner());
            match token.as_deref() {
                Some(t) if request.uri().path() == "/" && same(t, given) => {
                    *token = None;
                    true
                }
                _ => false,
            }
        };
        if !fresh {
            return secured(refuse(StatusCode::FORBIDDEN, "refused: this link was used already or is wrong; run `canopy-msg web` again for a new one"));
        }
        let session = match random_hex(32) {
            Ok(s) => s,
            Err(e) => return secured(refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}"))),
        };
        web.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(session.clone());
        let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
        let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
        return secured(response);
    }
    let known = session_of(headers).is_some_and(|s| web.sessions.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|k| same(k, &s)));
    if !known {
        return secured(refuse(StatusCode::UNAUTHORIZED, "refused: no session; open the URL `canopy-msg web` printed"));
    }
    secured(next.run(request).await)
}

/// The headers every response carries.
fn secured(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    response
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Runs `f` with a connection to Secure off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(refuse(StatusCode::UNPROCESSABLE_ENTITY, &format!("{e:#}"))),
        Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}"))),
    }
}

/// `POST /api/call`: one [`allowed`] Secure request, as JSON; its reply, as JSON. A refusal
/// from Secure is a 422 with its one line.
async fn call(State(web): State<Arc<Web>>, body: axum::body::Bytes) -> Response {
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("not a request: {e}")),
    };
    if !allowed(&request) {
        return refuse(StatusCode::FORBIDDEN, "the web UI does not make that request");
    }
    let home = web.home.clone();
    match blocking(move || {
        let mut secure = Secure::connect(&home)?;
        secure.set_timeout(CALL_TIMEOUT)?;
        secure.call(&request)
    })
    .await
    {
        Ok(reply) => Json(reply).into_response(),
        Err(r) => r,
    }
}

/// The pane of a pipeline, as the TUI shows it.
#[derive(serde::Serialize)]
struct PaneJson {
    id: String,
    model: String,
    title: String,
    status: String,
    lines: Vec<String>,
    actions: Vec<ActionJson>,
    closed: bool,
    state_hash: String,
    steps: usize,
    refused: Vec<String>,
    diverged: Vec<String>,
}

#[derive(serde::Serialize)]
struct ActionJson {
    name: String,
    label: String,
    args: Vec<String>,
}

/// `GET /api/pipeline/ID`: the model run over every step, and its view for this user.
async fn pane(State(web): State<Arc<Web>>, Path(id): Path<String>) -> Response {
    let home = web.home.clone();
    match blocking(move || crate::pipeline::pane(&home, &id)).await {
        Ok(p) => Json(PaneJson {
            id: p.id,
            model: p.model,
            title: p.view.title,
            status: p.view.status,
            lines: p.view.lines,
            actions: p.view.actions.into_iter().map(|a| ActionJson { name: a.name, label: a.label, args: a.args }).collect(),
            closed: p.view.closed,
            state_hash: p.hash,
            steps: p.steps,
            refused: p.refused,
            diverged: p.diverged,
        })
        .into_response(),
        Err(r) => r,
    }
}

/// An action the page asks for.
#[derive(serde::Deserialize)]
struct ActBody {
    action: String,
    #[serde(default)]
    args: Vec<String>,
    /// The digest of the signing the user approved, when the action is taken again.
    #[serde(default)]
    approved: Option<String>,
}

/// What an action came to.
#[derive(serde::Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
enum ActJson {
    /// Sent: the step's id.
    Sent { id: String },
    /// Waiting for the user's approval of a signing: Secure's summary and digest.
    Review { key: String, summary: Vec<String>, digest: String },
}

/// `POST /api/pipeline/ID/act`: the action through the model. The first time a signing
/// stops it and comes back as a review; approved, it is taken again and Secure signs only
/// what was approved.
async fn act(State(web): State<Arc<Web>>, Path(id): Path<String>, Json(body): Json<ActBody>) -> Response {
    let home = web.home.clone();
    let approval = body.approved.map_or(crate::pipeline::Approval::Review, crate::pipeline::Approval::Approved);
    let options = crate::pipeline::ActOptions { approval, broadcast_cmd: None };
    match blocking(move || crate::pipeline::act_step(&home, &id, &body.action, &body.args, &options)).await {
        Ok(crate::pipeline::Acted::Sent(id)) => Json(ActJson::Sent { id }).into_response(),
        Ok(crate::pipeline::Acted::Review(r)) => Json(ActJson::Review { key: r.key, summary: r.summary, digest: r.digest }).into_response(),
        Err(r) => r,
    }
}

/// `GET /api/events`: server-sent events. `message`: a new or edited message (a
/// `MessageLine`); `status`: Secure's status when it changes; `resync`: something may have
/// been missed (the watch stream was re-opened, or this page fell behind), so the page
/// fetches what it shows again. Nothing is dropped without a `resync`.
async fn stream(State(web): State<Arc<Web>>) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let rx = web.events.subscribe();
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(line) => {
                let (kind, data) = line.split_once('\n').unwrap_or(("resync", ""));
                Event::default().event(kind).data(data)
            }
            Err(broadcast::error::RecvError::Lagged(_)) => Event::default().event("resync").data("lagged"),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Secure's watch stream, forwarded to every page; re-opened while the server runs.
fn watch(home: Home, events: broadcast::Sender<String>) {
    loop {
        if let Ok(mut secure) = Secure::connect(&home)
            && secure.call(&Request::Watch).is_ok()
        {
            let _ = events.send("resync\nwatching".into());
            while let Ok(Some(reply)) = secure.next(None) {
                if let Reply::Message(m) = reply
                    && let Ok(json) = serde_json::to_string(&m)
                {
                    let _ = events.send(format!("message\n{json}"));
                }
            }
        }
        // Secure is down or restarting; the status events say so.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Secure's status (with Network's report on the relay), sent when it changes.
fn status(home: Home, events: broadcast::Sender<String>) {
    let mut last = String::new();
    loop {
        let now = match Secure::connect(&home).and_then(|mut s| s.call(&Request::Status)) {
            Ok(reply) => serde_json::to_string(&reply).unwrap_or_default(),
            Err(e) => serde_json::json!({ "reply": "error", "message": format!("{e:#}") }).to_string(),
        };
        if now != last {
            let _ = events.send(format!("status\n{now}"));
            last = now;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_this_server_are_hosts_and_origins() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for ok in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.2:8080"] {
            assert!(names_this(lo, ok), "{ok}");
        }
        for bad in ["127.0.0.1:8081", "evil.example:8080", "evil.example", "localhost", "10.0.0.1:8080", "", "127.0.0.1", "localhost:80800"] {
            assert!(!names_this(lo, bad), "{bad}");
        }
        assert!(origin_is_this(lo, "http://localhost:8080") && origin_is_this(lo, "http://127.0.0.1:8080"));
        for bad in ["https://127.0.0.1:8080", "http://evil.example:8080", "null", "http://127.0.0.1:8080.evil.example", "http://127.0.0.1:9"] {
            assert!(!origin_is_this(lo, bad), "{bad}");
        }
        let lan: SocketAddr = "192.168.1.5:8080".parse().unwrap();
        assert!(names_this(lan, "192.168.1.5:8080") && !names_this(lan, "localhost:8080") && !names_this(lan, "127.0.0.1:8080"));
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(names_this(any, "192.168.1.5:8080") && names_this(any, "localhost:8080") && !names_this(any, "evil.example:8080"));
    }

    #[test]
    fn listening_off_loopback_is_warned_about() {
        assert_eq!(warning("127.0.0.1:0".parse().unwrap()), None);
        assert_eq!(warning("[::1]:0".parse().unwrap()), None);
        for addr in ["0.0.0.0:0", "192.168.1.5:8080", "[::]:0"] {
            assert!(warning(addr.parse().unwrap()).is_some_and(|w| w.starts_with("WARNING") && w.contains("not loopback")), "{addr}");
        }
    }

    #[test]
    fn the_page_may_not_ask_for_backups_signing_or_raw_steps() {
        assert!(allowed(&Request::Chats) && allowed(&Request::Read { conversation: "mail".into(), before: None }));
        assert!(!allowed(&Request::Backup { path: "/tmp/x".into(), passphrase: "p".into(), settings: String::new() }));
        assert!(!allowed(&Request::Sign { key: "btc".into(), kind: "psbt".into(), payload: Vec::new(), approved: Some("00".into()), network: None }));
        assert!(!allowed(&Request::PipelineStep { pipeline: "p".into(), kind: "k".into(), body: "{}".into(), prior: None }));
        assert!(!allowed(&Request::Stop) && !allowed(&Request::SandboxCheck) && !allowed(&Request::Watch));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abcd", "abcd"));
        assert!(!same("abcd", "abce") && !same("abcd", "abc") && !same("", "a"));
    }
}
