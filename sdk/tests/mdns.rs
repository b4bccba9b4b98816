//! Discovery by mDNS inside a network namespace the test creates (so multicast never reaches
//! the host's interfaces): a relay started with `advertise` (this test binary run again as a
//! child, [`relay_child`]) and the `canopy` CLI, both as child processes in the namespace
//! (`ip netns exec`), which has only `lo`, up, with multicast on and a route for 224.0.0.0/4.
//!
//! `canopy discover --json` finds the relay with its port, id, role, protocol version and the
//! fingerprint of the certificate in its data directory; a client connects to the address
//! found with that fingerprint pinned, and through `--relay mdns:` only when something says to
//! trust it; once the relay has stopped, a new browse no longer finds it.
//!
//! Needs root (or CAP_NET_ADMIN) and `ip`. Without them the test says why and skips, unless
//! `CI=true`, where it fails.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use canopy_sdk::discovery::mdns::SERVICE_TYPE;
use sha2::Digest;

/// Set in the environment of the child that runs the relay: its data directory.
const RELAY_CHILD: &str = "CANOPY_MDNS_TEST_RELAY";

/// Upper bound for any one awaited step.
const WAIT: Duration = Duration::from_secs(30);

/// A network namespace of the test's own, deleted when dropped (also when the test fails).
struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `canopy-mdns-<pid>-<n>` with `lo` up, multicast on, and a multicast route.
    fn create() -> Result<NetNs, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("canopy-mdns-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        ns.exec_ok(&["ip", "link", "set", "lo", "multicast", "on"])?;
        ns.exec_ok(&["ip", "route", "add", "224.0.0.0/4", "dev", "lo"])?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn exec_ok(&self, args: &[&str]) -> Result<(), String> {
        let out = self.command(args[0]).args(&args[1..]).output().map_err(|e| format!("ip netns exec: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{args:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("deleting the network namespace {}: {e}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The namespace, or `None` (after saying why) where one cannot be made; with `CI=true`
/// that fails the test instead.
fn namespace_or_skip() -> Option<NetNs> {
    match NetNs::create() {
        Ok(ns) => Some(ns),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true, but no network namespace can be created for the mDNS test: {e}")
        }
        Err(e) => {
            eprintln!(
                "SKIPPED: the mDNS test needs a network namespace of its own (root and `ip`), and none can be created here: {e}"
            );
            None
        }
    }
}

/// A child process, killed and reaped when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The relay child: started with its stdin piped (closing it stops the relay gracefully),
/// its stdout's lines arriving on `lines`.
struct RelayChild {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl RelayChild {
    fn start(ns: &NetNs, data: &Path) -> RelayChild {
        let mut cmd = ns.command(std::env::current_exe().unwrap());
        cmd.args(["--exact", "relay_child", "--nocapture", "--test-threads=1"])
            .env(RELAY_CHILD, data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("the relay child starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        RelayChild { child: ChildGuard(child), stdin, lines }
    }

    /// The words after `prefix` on the next line that holds it.
    fn expect(&self, prefix: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    // (The test harness may have begun the line: `test relay_child ... `.)
                    if let Some(at) = line.find(prefix) {
                        return line[at + prefix.len()..].split_whitespace().map(str::to_string).collect();
                    }
                }
                Err(e) => panic!("the relay child printed no {prefix:?} line: {e}"),
            }
        }
    }

    /// Stops the relay gracefully (its stdin closes) and waits until it has exited.
    fn stop(mut self) {
        drop(self.stdin.take());
        self.expect("STOPPED");
        let deadline = Instant::now() + WAIT;
        // Its stdout closing says it exited.
        while self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok() {}
        let status = self.child.0.wait().unwrap();
        assert!(status.success(), "the relay child failed: {status}");
    }
}

/// Runs `cmd`, killing it if it takes longer than [`WAIT`].
fn output_within(mut cmd: Command) -> Output {
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the command starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("the command runs"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{cmd:?} took longer than {WAIT:?}");
        }
    }
}

/// `canopy ARGS` inside the namespace, with a known-relays file of the test's own.
fn canopy(ns: &NetNs, known: &Path, args: &[&str]) -> Output {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_canopy"));
    cmd.args(args).env("CANOPY_KNOWN_RELAYS", known).env_remove("CANOPY_RELAY");
    output_within(cmd)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The SHA-256 of the certificate in `<data>/cert.pem`, computed here.
fn cert_fingerprint(data: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(data.join("cert.pem")).expect("the relay's certificate");
    sha2::Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The relays `canopy discover --json` lists in the namespace, parsed; empty when it finds
/// none (and says so).
fn discover(ns: &NetNs, known: &Path, timeout: &str) -> Vec<serde_json::Value> {
    let out = canopy(ns, known, &["discover", "--json", "--timeout", timeout]);
    if !out.status.success() {
        assert!(text(&out.stderr).contains("no relays found"), "canopy discover failed: {}", text(&out.stderr));
        return Vec::new();
    }
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
}

#[test]
fn a_relay_advertised_by_mdns_is_found_connected_to_and_gone_once_stopped() {
    if std::env::var_os(RELAY_CHILD).is_some() {
        return;
    }
    let Some(ns) = namespace_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let known = dir.path().join("known_relays");
    let relay = RelayChild::start(&ns, &data);
    let words = relay.expect("RELAY ");
    let [port, id, fingerprint, instance] = words.as_slice() else { panic!("RELAY line: {words:?}") };
    let port: u16 = port.parse().unwrap();
    // The fingerprint of the certificate the relay serves, computed here.
    let cert_fp = cert_fingerprint(&data);
    assert_eq!(fingerprint, &cert_fp);

    // Found: browse until the announcement is out (mDNS probes for a second or so first).
    let deadline = Instant::now() + WAIT;
    let found = loop {
        let found = discover(&ns, &known, "3s");
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
    };
    assert_eq!(found.len(), 1, "{found:?}");
    let r = &found[0];
    assert_eq!(r["instance"].as_str(), Some(instance.as_str()));
    assert!(instance.ends_with(SERVICE_TYPE), "{instance}");
    assert_eq!(r["port"].as_u64(), Some(u64::from(port)));
    // Listening on 0.0.0.0, the relay announces the namespace's only interface address.
    assert_eq!(r["addrs"], serde_json::json!([format!("127.0.0.1:{port}")]));
    assert_eq!(r["relay_id"].as_str(), Some(id.as_str()));
    assert_eq!(r["role"].as_str(), Some("local"));
    assert_eq!(r["protocol"].as_u64(), Some(u64::from(canopy::wire::PROTOCOL_VERSION)));
    assert_eq!(r["fingerprint"].as_str(), Some(cert_fp.as_str()));
    assert_eq!(r["problems"], serde_json::json!([]));

    // The human form: addresses, id, role, version, fingerprint.
    let out = canopy(&ns, &known, &["discover", "--timeout", "3s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    for part in [format!("127.0.0.1:{port}"), format!("id={id}"), "role=local".into(), format!("fingerprint={cert_fp}")]
    {
        assert!(line.contains(&part), "{part} not in {line}");
    }

    // A real QUIC connection to the address found, its fingerprint pinned.
    let addr = r["addrs"][0].as_str().unwrap();
    let out = canopy(
        &ns,
        &known,
        &["pub", "--relay", addr, "--fingerprint", &cert_fp, "team=1/channel=1/msg=1", "found by mdns"],
    );
    assert!(out.status.success(), "pub: {}", text(&out.stderr));

    // `--relay mdns:` finds it, but trusts it only when told to.
    let filter = "origin=0/app=0/path=0/org=0/team=1/channel=1";
    let sub = |trust: &[&str]| {
        let mut args = vec![
            "sub",
            "--relay",
            "mdns:",
            "--mdns-timeout",
            "3s",
            filter,
            "--mode",
            "cached",
            "--count",
            "1",
            "--timeout",
            "15s",
        ];
        args.extend_from_slice(trust);
        canopy(&ns, &known, &args)
    };
    let out = sub(&[]);
    assert!(!out.status.success(), "an untrusted relay was used: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("is not trusted") && err.contains("--trust-mdns"), "{err}");
    for trust in [vec!["--fingerprint", cert_fp.as_str()], vec!["--trust-mdns"]] {
        let out = sub(&trust);
        assert!(out.status.success(), "sub {trust:?}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("found by mdns"), "sub {trust:?}: {}", text(&out.stdout));
    }
    let wrong = "ab".repeat(32);
    let out = sub(&["--fingerprint", &wrong]);
    assert!(!out.status.success(), "a relay with another certificate was used");

    // Stopped (gracefully: it withdraws its announcement), it is no longer found.
    relay.stop();
    let found = discover(&ns, &known, "2s");
    assert!(found.is_empty(), "still found after stopping: {found:?}");
}

/// Not a test of its own: the relay process of the test above, when run again with
/// `CANOPY_MDNS_TEST_RELAY=<data dir>`. Prints `RELAY <port> <id> <fingerprint> <instance>`,
/// runs until its stdin closes, then stops gracefully and prints `STOPPED`.
#[test]
fn relay_child() {
    let Some(data) = std::env::var_os(RELAY_CHILD) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let config = canopy_relay::RelayConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
            data: data.into(),
            store: canopy_relay::StoreKind::Memory,
            advertise: true,
            role: Some(canopy_relay::RelayRole::Local),
            ..canopy_relay::RelayConfig::default()
        };
        let relay = canopy_relay::Relay::spawn(config).await.expect("the relay starts");
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "RELAY {} {} {} {}",
            relay.local_addr().port(),
            relay.id(),
            relay.fingerprint(),
            relay.advertised_instance().unwrap()
        )
        .unwrap();
        out.flush().unwrap();
        drop(out);
        // Until the parent closes stdin (or dies).
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink()))
            .await
            .unwrap()
            .ok();
        relay.shutdown().await;
        println!("STOPPED");
    });
}
