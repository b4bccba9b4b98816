//! The web UI end to end: the real `canopy-msg web` against real relays and another user's
//! device, its guard checked with raw HTTP requests, and its page driven in a real headless
//! Chromium over WebDriver (Debian's `chromium` and `chromium-driver`, which
//! `scripts/install-test-deps.sh` installs).
//!
//! `CANOPY_SCREENSHOTS=DIR` saves a screenshot of every screen into DIR; a normal run writes
//! nothing into the tree.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Home, WAIT, device, eventually, org, relay};
use fantoccini::actions::{InputSource as _, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};

/// `canopy-msg web` for one device; stopped on drop.
struct WebUi {
    child: Child,
    /// The URL it printed, with its one-time token.
    url: String,
    addr: SocketAddr,
    token: String,
}

impl WebUi {
    fn start(home: &Home) -> WebUi {
        let mut child = Command::new(common::exe())
            .arg("--home")
            .arg(&home.dir)
            .arg("web")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("canopy-msg web starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().to_string();
        let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("a URL, not {url:?}"));
        let (host, query) = rest.split_once("/?token=").expect("a token in the URL");
        WebUi { child, addr: host.parse().unwrap(), token: query.to_string(), url }
    }
}

impl Drop for WebUi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a raw HTTP request got back.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request, written by hand so the test controls every header (`Host` too).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Answer { status, headers, body: body.to_string() }
}

/// A team (`ops/general`) with alice and bob, who are also each other's contacts.
async fn team(tmp: &Path) -> (canopy_relay::RelayHandle, Home, Home, Home) {
    let origin = relay(&tmp.join("origin"), "127.0.0.1:0", None).await;
    let admin = org(tmp, &origin);
    let alice = device(tmp, "alice", &origin, &admin);
    let bob = device(tmp, "bob", &origin, &admin);
    common::await_epoch(&admin, &[&alice, &bob]);
    let (ida, idb) = (alice.user(), bob.user());
    alice.ok(&["contact", "add", &idb, "bob"]);
    bob.ok(&["contact", "add", &ida, "alice"]);
    for h in [&alice, &bob] {
        eventually("the other's device is known", || h.ok(&["contacts", "--json"]).contains("\"devices\":1").then_some(()));
    }
    (origin, admin, alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_printed_link_opens_a_session_and_only_this_servers_pages_use_it() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, _) = common::users(tmp.path(), &origin, &["alice"]);
    let web = WebUi::start(&homes[0]);
    assert!(web.addr.ip().is_loopback(), "loopback unless told otherwise: {}", web.url);
    assert_eq!(web.token.len(), 32);
    let this = format!("http://{}", web.addr);
    let chats = r#"{"op":"chats"}"#;

    // No session: refused, the page and the API alike.
    let a = http(web.addr, "GET", "/", &[], "");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.header("content-security-policy").is_some(), "refusals carry the policy too");
    assert_eq!(http(web.addr, "POST", "/api/call", &[("Origin", &this)], chats).status, 401);
    assert_eq!(http(web.addr, "GET", "/api/events", &[], "").status, 401);

    // A wrong token: refused, and the right one still works once.
    assert_eq!(http(web.addr, "GET", &format!("/?token={}", "0".repeat(32)), &[], "").status, 403);
    let a = http(web.addr, "GET", &format!("/?token={}", web.token), &[], "");
    assert_eq!((a.status, a.header("location")), (303, Some("/")), "redirected to a URL without the token: {a:?}");
    let cookie = a.header("set-cookie").expect("a session cookie").to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();
    // Reused: refused, even by the session's holder.
    let again = http(web.addr, "GET", &format!("/?token={}", web.token), &[("Cookie", &session)], "");
    assert_eq!(again.status, 403, "{again:?}");
    assert!(again.body.contains("used already"));

    // With the session: the page, under a strict policy.
    let page = http(web.addr, "GET", "/", &[("Cookie", &session)], "");
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'") && !csp.contains("unsafe"), "{csp}");
    assert!(page.body.contains(r#"<script type="module" src="/app.js">"#) && !page.body.contains("<script>"), "no inline script");
    assert_eq!(http(web.addr, "GET", "/", &[("Cookie", "canopy_session=forged")], "").status, 401);
    let ok = http(web.addr, "POST", "/api/call", &[("Cookie", &session), ("Origin", &this), ("Content-Type", "application/json")], chats);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(ok.body.contains(r#""reply":"chats""#), "{}", ok.body);

    // A foreign Origin, or a change without one: refused.
    let foreign = http(web.addr, "POST", "/api/call", &[("Cookie", &session), ("Origin", "http://evil.example")], chats);
    assert_eq!(foreign.status, 403, "{foreign:?}");
    assert!(foreign.body.contains("another origin"));
    assert_eq!(http(web.addr, "POST", "/api/call", &[("Cookie", &session), ("Origin", "null")], chats).status, 403);
    assert_eq!(http(web.addr, "POST", "/api/call", &[("Cookie", &session)], chats).status, 403, "a change without an Origin");
    assert_eq!(http(web.addr, "GET", "/", &[("Cookie", &session), ("Origin", "http://evil.example")], "").status, 403);

    // A foreign Host (DNS rebinding: another site's name pointed at this address): refused.
    for host in [format!("evil.example:{}", web.addr.port()), "evil.example".to_string(), format!("127.0.0.1:{}", web.addr.port() ^ 1)] {
        let a = http(web.addr, "GET", "/", &[("Cookie", &session), ("Host", &host)], "");
        assert_eq!(a.status, 421, "{host}: {a:?}");
    }
    assert_eq!(http(web.addr, "GET", "/", &[("Cookie", &session), ("Host", &format!("localhost:{}", web.addr.port()))], "").status, 200);

    // Requests the page may not make: refused whatever the session.
    let backup = format!(r#"{{"op":"backup","path":"{}","passphrase":"p","settings":""}}"#, tmp.path().join("stolen").display());
    assert_eq!(http(web.addr, "POST", "/api/call", &[("Cookie", &session), ("Origin", &this)], &backup).status, 403);
    assert!(!tmp.path().join("stolen").exists());
    assert_eq!(http(web.addr, "POST", "/api/call", &[("Cookie", &session), ("Origin", &this)], "not json").status, 400);
    origin.shutdown().await;
}

/// Chromium over WebDriver, headless; chromedriver and its Chromium stopped on drop.
struct Browser {
    driver: Child,
    client: Client,
    shots: Option<PathBuf>,
    /// Chromium's profile directory, which names this test's Chromium processes.
    profile: PathBuf,
}

impl Browser {
    async fn start(dir: &Path, width: u32, height: u32) -> Browser {
        let mut driver = Command::new("chromedriver").arg("--port=0").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("chromedriver: scripts/install-test-deps.sh installs it");
        let mut out = BufReader::new(driver.stdout.take().unwrap());
        let port = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "chromedriver exited");
            if let Some(p) = line.trim().strip_prefix("ChromeDriver was started successfully on port ") {
                break p.trim_end_matches('.').parse::<u16>().unwrap();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let profile = dir.join(format!("chromium-{width}"));
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()), format!("--window-size={width},{height}"),
                ],
            }
        });
        // A window is never narrower than 500 px: a narrower page is the device emulation's.
        let mut caps = caps.as_object().unwrap().clone();
        if width < 500 {
            caps["goog:chromeOptions"]["mobileEmulation"] = serde_json::json!({ "deviceMetrics": { "width": width, "height": height, "pixelRatio": 1.0 } });
        }
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector).capabilities(caps).connect(&format!("http://127.0.0.1:{port}")).await.expect("a WebDriver session");
        let shots = std::env::var_os("CANOPY_SCREENSHOTS").map(PathBuf::from);
        if let Some(dir) = &shots {
            std::fs::create_dir_all(dir).unwrap();
        }
        Browser { driver, client, shots, profile }
    }

    /// Saves a screenshot as `NAME.png` when `CANOPY_SCREENSHOTS` names a directory.
    async fn shot(&self, name: &str) {
        if let Some(dir) = &self.shots {
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }

    async fn js(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, Vec::new()).await.unwrap()
    }

    /// Waits until `script` returns something truthy other than `false`; returns it.
    async fn until(&self, what: &str, script: &str) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)) {
                return v;
            }
            assert!(Instant::now() < deadline, "the page never showed {what}; it shows:\n{}", self.js("return document.body.innerText").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the conversation shows a message with exactly `text`.
    async fn await_message(&self, text: &str) {
        let script = format!("return [...document.querySelectorAll('#messages .text')].some(e => e.textContent === {})", serde_json::json!(text));
        self.until(&format!("the message {text:?}"), &script).await;
    }

    async fn css(&self, selector: &str) -> fantoccini::elements::Element {
        self.client.wait().at_most(WAIT).for_element(Locator::Css(selector)).await.unwrap_or_else(|e| panic!("{selector}: {e}"))
    }

    /// Clicks the element `selector` finds; found again if a live update redrew it first.
    async fn click(&self, selector: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.css(selector).await.click().await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && format!("{e:?}").contains("StaleElementReference") => continue,
                Err(e) => panic!("click {selector}: {e}"),
            }
        }
    }

    /// The message row whose text is exactly `text`.
    async fn message(&self, text: &str) -> fantoccini::elements::Element {
        let xpath = format!("//li[contains(@class,'message')][.//div[@class='text'][.='{text}']]");
        self.client.wait().at_most(WAIT).for_element(Locator::XPath(&xpath)).await.unwrap_or_else(|e| panic!("the message {text:?}: {e}"))
    }

    /// Clicks button `class` of the message with `text` (selecting the message shows them).
    /// A live update may redraw the list between finding and clicking: then it is found again
    /// (bounded), as a person would move the pointer again.
    async fn message_button(&self, text: &str, class: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let attempt = async {
                self.message(text).await.click().await?;
                self.message(text).await.find(Locator::Css(&format!("button.{class}"))).await?.click().await
            };
            match attempt.await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && format!("{e:?}").contains("StaleElementReference") => continue,
                Err(e) => panic!("clicking {class} of {text:?}: {e}"),
            }
        }
    }

    /// Types into the focused element and presses Enter.
    async fn type_enter(&self, selector: &str, text: &str) {
        let e = self.css(selector).await;
        e.send_keys(&format!("{text}{}", char::from(Key::Enter))).await.unwrap();
    }

    /// Presses keys, one after another, wherever the focus is: the keyboard alone.
    async fn keys(&self, keys: &[char]) {
        let mut actions = KeyActions::new("keyboard".into());
        for k in keys {
            actions = actions.then(KeyAction::Down { value: *k }).then(KeyAction::Up { value: *k });
        }
        self.client.perform_actions(actions).await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium is chromedriver's child and outlives it (no WebDriver session end can be
        // awaited here, and a failed test never reaches one): end this test's Chromium by its
        // profile directory, so no browser keeps running after the test.
        let _ = Command::new("pkill").arg("-KILL").arg("-f").arg(format!("user-data-dir={}", self.profile.display())).status();
    }
}

fn texts(home: &Home, conversation: &str) -> Vec<serde_json::Value> {
    home.read(conversation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_main_flow_in_a_browser_channel_dm_mail_and_a_pipeline_signing() {
    let tmp = tempfile::tempdir().unwrap();
    let (origin, _admin, alice, bob) = team(tmp.path()).await;
    let (ida, idb) = (alice.user(), bob.user());
    // Something in each kind of chat before the page opens.
    bob.ok(&["send", "ops/general", "welcome to ops"]);
    bob.ok(&["dm", "alice", "hi alice"]);
    let g = bob.ok(&["group", "create", "weekend", "alice"]);
    bob.ok(&["group", "describe", &g, "plans for Saturday"]);
    bob.ok(&["send", &format!("group:{g}"), "who brings the bread?"]);
    bob.ok(&["mail", "send", "--to", "alice", "--subject", "agenda", "first, the budget"]);
    let books = alice.ok(&["group", "create", "books", "bob"]);
    let (_, params) = common::multisig_spend(&[&bob, &alice]);
    let model = common::plugin_artifacts::wasm("multisig");
    let spend = bob.ok(&["pipeline", "create", model.to_str().unwrap(), "--members", "alice", "--name", "spend", "--params", &params]);
    bob.ok(&["pipeline", "act", &spend, "transaction", "--yes"]);
    eventually("alice has everything", || {
        let chats = alice.ok(&["chats", "--json"]);
        (chats.lines().count() == 6 && alice.ok(&["pipeline", "list", "--json"]).contains("\"model_complete\":true")).then_some(())
    });

    let web = WebUi::start(&alice);
    let b = Browser::start(tmp.path(), 1280, 860).await;
    b.client.goto(&web.url).await.unwrap();
    b.until("the token gone from the address", &format!("return location.href === 'http://{}/'", web.addr)).await;
    b.until("the chat list", "return document.querySelectorAll('#chat-list .chat').length === 6").await;
    b.until("the relay's state", "return document.getElementById('relay').textContent.startsWith('relay up')").await;
    // Most recent first, each with its unread count (a pipeline's model parts are no messages).
    let list = b.js("return [...document.querySelectorAll('#chat-list .chat')].map(e => e.dataset.kind + ' ' + (e.querySelector('.unread')?.textContent || '0'))").await;
    // (A group with no message yet has no activity to sort by: it comes last.)
    assert_eq!(list, serde_json::json!(["pipeline 2", "mail 1", "group 1", "dm 1", "channel 1", "group 0"]));
    b.shot("chats").await;

    // A team channel: read a message arriving live, reply in its thread, edit the reply.
    b.click("#chat-list .chat[data-kind='channel']").await;
    b.await_message("welcome to ops").await;
    b.until("the channel read", "return !document.querySelector(\"#chat-list .chat[data-kind='channel'] .unread\")").await;
    let question = bob.ok(&["send", "ops/general", "standup at ten?"]);
    b.await_message("standup at ten?").await;
    b.message_button("standup at ten?", "reply-button").await;
    b.until("the reply note", "return document.getElementById('reply-note').textContent.includes('reply in thread to')").await;
    b.type_enter("#text", "yes, at ten").await;
    b.await_message("yes, at ten").await;
    b.message_button("yes, at ten", "edit-button").await;
    let text = b.css("#text").await;
    text.clear().await.unwrap();
    b.type_enter("#text", "yes, at ten in room 2").await;
    b.await_message("yes, at ten in room 2").await;
    let reply = eventually("bob has the edited reply", || texts(&bob, "ops/general").into_iter().find(|m| m["text"] == "yes, at ten in room 2"));
    assert_eq!((reply["reply_to"].as_str(), reply["edited"].as_bool()), (Some(question.as_str()), Some(true)), "{reply}");
    b.until("the reply under its root", "return document.querySelector('#messages .message.reply .text')?.textContent === 'yes, at ten in room 2'").await;
    b.shot("channel").await;

    // A direct message: the same.
    b.click("#chat-list .chat[data-kind='dm']").await;
    b.await_message("hi alice").await;
    let dm_q = bob.ok(&["dm", "alice", "lunch today?"]);
    b.await_message("lunch today?").await;
    b.message_button("lunch today?", "reply-button").await;
    b.type_enter("#text", "sure, noon").await;
    b.await_message("sure, noon").await;
    b.message_button("sure, noon", "edit-button").await;
    b.css("#text").await.clear().await.unwrap();
    b.type_enter("#text", "sure, at noon").await;
    let reply = eventually("bob has alice's edited reply", || texts(&bob, "dm:alice").into_iter().find(|m| m["text"] == "sure, at noon"));
    assert_eq!((reply["reply_to"].as_str(), reply["edited"].as_bool()), (Some(dm_q.as_str()), Some(true)), "{reply}");
    // Hostile texts are text: nothing runs, no element is made of them.
    let hostile = ["<script>document.title='pwned'</script>", r#"<img src=x onerror="document.title='pwned'">"#];
    for h in hostile {
        bob.ok(&["dm", "alice", h]);
    }
    for h in hostile {
        b.await_message(h).await;
    }
    assert_eq!(b.client.title().await.unwrap(), "Canopy messenger");
    assert_eq!(b.js("return document.querySelectorAll('#messages img, #messages script').length").await, 0);
    // Mark one, for the marked screen.
    b.message_button("lunch today?", "mark-button").await;
    b.until("the star", "return [...document.querySelectorAll('#messages .message')].some(e => e.textContent.includes('lunch today?') && e.querySelector('.star'))").await;
    b.shot("dm").await;

    // A group, with its info panel.
    b.click(&format!("#chat-list .chat[data-conversation='group:{g}']")).await;
    b.await_message("who brings the bread?").await;
    b.until("the group's info", "return document.getElementById('side').textContent.includes('plans for Saturday')").await;
    let side = b.css("#side").await.text().await.unwrap();
    assert!(side.contains("Members (2)") && side.contains("bob") && side.contains("only admins change the group"), "{side}");
    b.shot("group").await;
    // A group alice runs: its panel has the admin's actions; a rename reaches bob.
    b.click(&format!("#chat-list .chat[data-conversation='group:{books}']")).await;
    b.until("the admin's actions", "return !!document.querySelector('#side .admin-actions')").await;
    b.css("#side form.admin input[name='name']").await.send_keys("book club").await.unwrap();
    b.click("#side form.admin button[type='submit']").await;
    eventually("bob sees the new name", || bob.ok(&["group", "info", &books]).contains("book club").then_some(()));
    b.until("the new name in the panel", "return document.querySelector('#side .group-name')?.textContent === 'book club'").await;

    // Mail: the inbox, the thread, a reply with subject and recipients filled in.
    b.click("#chat-list .chat[data-kind='mail']").await;
    b.click("#messages .mail[data-reference]").await;
    b.until("the thread", "return document.querySelector('#messages .mail .text')?.textContent === 'first, the budget'").await;
    b.shot("mail-thread").await;
    b.click("#messages .mail.cursor button.reply-button").await;
    assert_eq!(b.css("#mail-subject").await.prop("value").await.unwrap().as_deref(), Some("Re: agenda"));
    assert_eq!(b.css("#mail-to").await.prop("value").await.unwrap().as_deref(), Some("bob"));
    b.css("#mail-body").await.send_keys("then the roadmap").await.unwrap();
    b.shot("mail-compose").await;
    b.click("#mail-send").await;
    eventually("bob has alice's mail in the thread", || bob.ok(&["mail", "list", "--json"]).contains("then the roadmap").then_some(()));
    b.until("the reply in the thread", "return [...document.querySelectorAll('#messages .mail .text')].some(e => e.textContent === 'then the roadmap')").await;

    // Marked messages.
    b.click("#show-marked").await;
    b.await_message("lunch today?").await;
    b.shot("marked").await;

    // A pipeline: its state and actions; signing shows Secure's summary, and signs once approved.
    b.click("#chat-list .chat[data-kind='pipeline']").await;
    b.until("the pipeline's pane", "return document.querySelector('#side .pipeline-status')?.textContent === '1 of 2 signatures'").await;
    b.shot("pipeline").await;
    b.click("#side form.act[data-action='sign'] button").await;
    b.until("the approval dialog", "return document.getElementById('approve').open").await;
    let summary = b.css("#approve-summary").await.text().await.unwrap();
    assert!(summary.contains("pay 99000 sat to") && summary.contains("fee 1000 sat"), "{summary}");
    b.shot("pipeline-approve").await;
    b.click("#approve-yes").await;
    b.until("the pipeline after signing", "return document.querySelector('#side .pipeline-status')?.textContent === '2 of 2 signatures'").await;
    eventually("bob has both signatures", || {
        let s: serde_json::Value = serde_json::from_str(&bob.ok(&["pipeline", "show", &spend, "--json"])).unwrap();
        (s["status"] == "2 of 2 signatures").then_some(())
    });
    let _ = (ida, idb);
    origin.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_by_keyboard_alone_in_a_narrow_window() {
    let tmp = tempfile::tempdir().unwrap();
    let (origin, _admin, alice, bob) = team(tmp.path()).await;
    bob.ok(&["send", "ops/general", "first"]);
    let question = bob.ok(&["send", "ops/general", "who reviews the patch?"]);
    eventually("alice has both", || (texts(&alice, "ops/general").len() == 2).then_some(()));
    let web = WebUi::start(&alice);
    let b = Browser::start(tmp.path(), 400, 800).await;
    b.client.goto(&web.url).await.unwrap();
    b.until("the chat list", "return document.querySelectorAll('#chat-list .chat').length === 1").await;
    assert_eq!(b.js("return window.innerWidth").await, 400);
    b.until("only the chat list, in a narrow window", "return getComputedStyle(document.getElementById('view')).display === 'none'").await;
    b.shot("narrow-chats").await;
    // Enter opens the selected chat; the newest message is selected; r replies to it;
    // typing and Enter send; Esc goes back to the list.
    b.until("the focus on the chat", "return document.activeElement?.classList.contains('chat')").await;
    b.keys(&[char::from(Key::Enter)]).await;
    b.await_message("who reviews the patch?").await;
    b.until("the conversation focused", "return document.activeElement?.id === 'messages'").await;
    b.until("only the conversation", "return getComputedStyle(document.getElementById('chats')).display === 'none'").await;
    b.keys(&['k', 'j', 'r']).await;
    b.until("the reply box focused", "return document.activeElement?.id === 'text' && document.getElementById('reply-note').textContent.includes('who reviews the patch?')").await;
    let mut typed: Vec<char> = "I will".chars().collect();
    typed.push(char::from(Key::Enter));
    b.keys(&typed).await;
    b.await_message("I will").await;
    b.shot("narrow-conversation").await;
    let reply = eventually("bob has the reply", || texts(&bob, "ops/general").into_iter().find(|m| m["text"] == "I will"));
    assert_eq!(reply["reply_to"].as_str(), Some(question.as_str()));
    // Esc leaves the reply box, Esc again goes back to the list.
    b.keys(&[char::from(Key::Escape), char::from(Key::Escape)]).await;
    b.until("the chat list again", "return getComputedStyle(document.getElementById('chats')).display !== 'none'").await;

    // The relay goes away: the bar says so plainly, and a send is queued, not lost.
    origin.shutdown().await;
    b.until("the relay's loss", "return document.getElementById('relay').textContent.startsWith('relay unreachable: sends are queued')").await;
    b.keys(&[char::from(Key::Enter)]).await;
    b.await_message("I will").await;
    b.until("the conversation focused", "return document.activeElement?.id === 'messages'").await;
    b.keys(&[char::from(Key::Enter)]).await;
    b.until("the message box focused", "return document.activeElement?.id === 'text'").await;
    let mut typed: Vec<char> = "sent while the relay is down".chars().collect();
    typed.push(char::from(Key::Enter));
    b.keys(&typed).await;
    b.await_message("sent while the relay is down").await;
    b.until("the queued count", "return /\\(\\d+ waiting\\)/.test(document.getElementById('relay').textContent)").await;
    b.shot("narrow-relay-down").await;
}
