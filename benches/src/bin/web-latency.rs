//! The web UI's live updates: send on one device → the `message` event on another device's
//! `canopy-msg web` event stream, beside the same message on that device's Secure follow
//! stream (what the TUI and the CLI's `read --follow` get). Each message is timed on both at
//! once, so the two columns share every condition and their difference is what the web UI
//! process adds (its watch thread, the broadcast, server-sent events over HTTP).
//!
//! ```sh
//! cargo build --release -p canopy-messenger -p canopy-benches && bash scripts/build-plugins.sh --release
//! target/release/web-latency --messages 300
//! ```

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use canopy_benches::cli::{Down, exe_dir, msg};
use canopy_msg_secure::proto::{self, Reply, Request};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Web UI live updates: send → server-sent event, beside send → Secure's follow stream.")]
struct Cli {
    /// Paced messages.
    #[arg(long, default_value_t = 300)]
    messages: usize,
    /// Pause between messages, ms.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
}

fn call(s: &mut UnixStream, r: &Request) -> anyhow::Result<Reply> {
    proto::write_frame(s, r)?;
    proto::read_frame(s)?.context("Secure hung up")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `canopy-msg web`, killed on drop.
struct Web(Child);

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Exchanges the URL's token for a session and opens the event stream; returns the stream
/// past its headers.
fn events(url: &str) -> anyhow::Result<BufReader<TcpStream>> {
    let rest = url.strip_prefix("http://").context("a URL")?;
    let (host, token) = rest.split_once("/?token=").context("a token")?;
    let addr: SocketAddr = host.parse()?;
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET /?token={token} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut head = String::new();
    s.read_to_string(&mut head)?;
    let session = head.lines().find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: "))).context("a session cookie")?;
    let session = session.split(';').next().unwrap_or_default().to_string();
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET /api/events HTTP/1.1\r\nHost: {host}\r\nCookie: {session}\r\nAccept: text/event-stream\r\n\r\n")?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("the event stream closed");
        }
        if line == "\r\n" {
            return Ok(r);
        }
    }
}

/// The id of the next `message` event (chunked transfer framing lines are skipped).
fn next_message(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut kind = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("the event stream closed");
        }
        let line = line.trim_end();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(data) = line.strip_prefix("data: ")
            && kind == "message"
        {
            let m: serde_json::Value = serde_json::from_str(data)?;
            return Ok(m["id"].as_str().unwrap_or_default().to_string());
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    let rt = tokio::runtime::Runtime::new()?;
    let relay = rt.block_on(canopy_relay::Relay::spawn(canopy_relay::RelayConfig {
        listen: "127.0.0.1:0".parse()?,
        data: root.join("relay"),
        ..canopy_relay::RelayConfig::default()
    }))?;
    let ca = root.join("relay.pem");
    std::fs::write(&ca, relay.cert_pem())?;
    let addr = relay.local_addr().to_string();
    let init = |home: &Path| msg(home, &["init", "--relay", &addr, "--ca", ca.to_str().unwrap(), "--domain", "example.com", "--org", "7"]);
    let (admin, a, b) = (root.join("admin"), root.join("a"), root.join("b"));
    let _down = Down(vec![a.clone(), b.clone()]);
    init(&admin)?;
    msg(&admin, &["admin", "org", "init"])?;
    msg(&admin, &["admin", "team", "create", "bench"])?;
    msg(&admin, &["admin", "channel", "create", "bench", "general"])?;
    for home in [&a, &b] {
        init(home)?;
        msg(home, &["up"])?;
        let hkp = msg(home, &["device", "key-package"])?;
        msg(&admin, &["admin", "team", "add", "bench", &hkp])?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while msg(&a, &["teams"])?.split_whitespace().nth(2) != msg(&b, &["teams"])?.split_whitespace().nth(2) || msg(&b, &["teams"])?.is_empty() {
        if Instant::now() > deadline {
            bail!("the devices never reached the same epoch");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut web = Command::new(exe_dir().join("canopy-msg")).arg("--home").arg(&b).arg("web").stdout(Stdio::piped()).spawn()?;
    let mut url = String::new();
    BufReader::new(web.stdout.take().context("stdout")?).read_line(&mut url)?;
    let _web = Web(web);
    let mut sse = events(url.trim())?;
    let mut sender = UnixStream::connect(a.join("secure.sock"))?;
    let mut follower = UnixStream::connect(b.join("secure.sock"))?;
    match call(&mut follower, &Request::Follow { conversation: "bench/general".into() })? {
        Reply::Pong => {}
        other => bail!("follow: {other:?}"),
    }
    let shown = |f: &mut UnixStream| -> anyhow::Result<String> {
        match proto::read_frame::<Reply>(f)?.context("Secure hung up")? {
            Reply::Message(m) => Ok(m.id),
            other => bail!("follow: {other:?}"),
        }
    };
    let mut send = |text: String| -> anyhow::Result<String> {
        match call(&mut sender, &Request::Send { to: "bench/general".into(), text, reply_to: None })? {
            Reply::Sent { id, .. } => Ok(id),
            other => bail!("send: {other:?}"),
        }
    };
    // Both streams get every message; each is read on its own thread, so neither waits for
    // the other, and the time each saw the message is taken as it arrives.
    let (tx, rx) = std::sync::mpsc::channel::<(&'static str, String, Instant)>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        while let Ok(id) = next_message(&mut sse) {
            if tx.send(("web", id, Instant::now())).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok(id) = shown(&mut follower) {
            if tx2.send(("secure", id, Instant::now())).is_err() {
                return;
            }
        }
    });
    let wait_both = |id: &str, start: Instant| -> anyhow::Result<(Duration, Duration)> {
        let (mut web, mut secure) = (None, None);
        while web.is_none() || secure.is_none() {
            let (source, got, at) = rx.recv_timeout(Duration::from_secs(30)).context("a message never arrived")?;
            if got == id {
                match source {
                    "web" => web = Some(at - start),
                    _ => secure = Some(at - start),
                }
            }
        }
        Ok((web.unwrap_or_default(), secure.unwrap_or_default()))
    };
    for i in 0..20 {
        let t = Instant::now();
        let id = send(format!("warm-up {i}"))?;
        wait_both(&id, t)?;
    }
    let (mut web_lat, mut secure_lat) = (Vec::new(), Vec::new());
    for i in 0..cli.messages {
        let t = Instant::now();
        let id = send(format!("message {i}"))?;
        let (w, s) = wait_both(&id, t)?;
        web_lat.push(w);
        secure_lat.push(s);
        std::thread::sleep(Duration::from_millis(cli.interval_ms));
    }
    web_lat.sort();
    secure_lat.sort();
    let line = |name: &str, l: &[Duration]| {
        println!(
            "{name:<44} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(l, 0.5).as_secs_f64() * 1e3,
            pct(l, 0.9).as_secs_f64() * 1e3,
            pct(l, 0.99).as_secs_f64() * 1e3,
            l[l.len() - 1].as_secs_f64() * 1e3
        );
    };
    println!("{} paced messages, one relay, a team channel; each timed on both streams at once:", cli.messages);
    line("send → Secure's follow stream (baseline)", &secure_lat);
    line("send → the web UI's server-sent event", &web_lat);
    println!("web / baseline at p50: {:.2}", pct(&web_lat, 0.5).as_secs_f64() / pct(&secure_lat, 0.5).as_secs_f64());
    Ok(())
}
