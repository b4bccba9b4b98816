//! Throwaway Redis Clusters for tests: real `redis-server` processes on 127.0.0.1, in a
//! temporary directory, killed when the [`RedisCluster`] is dropped.
//!
//! Needs `redis-server` and `redis-cli` on the `PATH` (Debian: `redis-server`, `redis-tools`;
//! `scripts/install-test-deps.sh` installs them). Every wait has a deadline and fails with a
//! [`HarnessError`] that says what it waited for. The functions block (processes, sleeps,
//! synchronous connections): from async code, call them from `spawn_blocking` or before the
//! work they set up starts.
//!
//! ```no_run
//! use canopy_redis::testing::RedisCluster;
//! let cluster = RedisCluster::start(3, 1).unwrap(); // 3 primaries, 1 replica each
//! let urls = cluster.urls();                         // seed nodes for RedisStoreConfig
//! # drop(urls);
//! ```

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a node may take to answer `PING` after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `redis-cli --cluster create` and the cluster settling may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failover or a rejoin may take.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Between polls.
const POLL: Duration = Duration::from_millis(50);

/// Ports handed out in this process, so clusters started at once never share one.
static RESERVED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A harness failure: what failed, with the details that explain it.
#[derive(Debug, thiserror::Error)]
#[error("redis test cluster: {0}")]
pub struct HarnessError(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, HarnessError> {
    Err(HarnessError(msg.into()))
}

/// The role of a node, as the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Owns slots (or could).
    Primary,
    /// Replicates a primary.
    Replica,
}

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    id: String,
}

impl Node {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A running Redis Cluster of `redis-server` processes.
pub struct RedisCluster {
    nodes: Vec<Node>,
    replicas_per_primary: usize,
    // Dropped after the processes (see `Drop`), which write into it.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster").field("ports", &self.ports()).finish()
    }
}

/// Two free ports on 127.0.0.1: `p` and the cluster bus `p + 10000`, reserved in this process.
fn free_port() -> Result<u16, HarnessError> {
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| HarnessError(format!("bind 127.0.0.1:0: {e}")))?;
        let port = listener.local_addr().map_err(|e| HarnessError(e.to_string()))?.port();
        let Some(bus) = port.checked_add(10_000) else { continue };
        if TcpListener::bind(("127.0.0.1", bus)).is_err() {
            continue;
        }
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = reserved.get_or_insert_with(HashSet::new);
        if reserved.contains(&port) || reserved.contains(&bus) {
            continue;
        }
        reserved.insert(port);
        reserved.insert(bus);
        return Ok(port);
    }
    fail("found no free port whose cluster bus port (+10000) was free too, in 200 tries")
}

fn spawn_server(port: u16, dir: &Path) -> Result<Child, HarnessError> {
    Command::new("redis-server")
        .current_dir(dir)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no"])
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", "1000", "--cluster-allow-replica-migration", "no"])
        .args(["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            HarnessError(format!("starting redis-server (is it installed? scripts/install-test-deps.sh): {e}"))
        })
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// A synchronous connection to one node, with short timeouts.
fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let con = client.get_connection_with_timeout(Duration::from_secs(1))?;
    con.set_read_timeout(Some(Duration::from_secs(2)))?;
    con.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(con)
}

fn query_string(port: u16, args: &[&str]) -> redis::RedisResult<String> {
    let mut con = connect(port)?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut con)
}

/// Waits until `node` answers `PING`; fails early if the process exits.
fn wait_ping(node: &mut Node) -> Result<(), HarnessError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if query_string(node.port, &["PING"]).is_ok() {
            return Ok(());
        }
        if let Some(child) = node.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return fail(format!(
                "redis-server on port {} exited ({status}) while starting:\n{}",
                node.port,
                log_tail(&node.dir)
            ));
        }
        if Instant::now() > deadline {
            return fail(format!("redis-server on port {} did not answer PING within {START_TIMEOUT:?}", node.port));
        }
        sleep(POLL);
    }
}

/// One line of `CLUSTER NODES`.
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    master: String,
    slots: Vec<(u16, u16)>,
}

fn cluster_nodes(port: u16) -> redis::RedisResult<Vec<NodeLine>> {
    let text = query_string(port, &["CLUSTER", "NODES"])?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 8 {
                return None;
            }
            let addr = fields[1].split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeLine {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master: fields[3].to_owned(),
                slots,
            })
        })
        .collect())
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_owned())
}

impl RedisCluster {
    /// Starts `primaries` primaries with `replicas_per_primary` replicas each (at least 3
    /// primaries: `redis-cli --cluster create` needs them), creates the cluster and waits
    /// until every node reports `cluster_state:ok` and every replica's link is up.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> Result<Self, HarnessError> {
        if primaries < 3 {
            return fail(format!("a cluster needs at least 3 primaries, {primaries} asked"));
        }
        let dir = tempfile::Builder::new()
            .prefix("canopy-redis-")
            .tempdir()
            .map_err(|e| HarnessError(format!("temporary directory: {e}")))?;
        let count = primaries * (1 + replicas_per_primary);
        let mut cluster = RedisCluster { nodes: Vec::with_capacity(count), replicas_per_primary, _dir: dir };
        for i in 0..count {
            let node_dir = cluster._dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir).map_err(|e| HarnessError(format!("{}: {e}", node_dir.display())))?;
            // A port found free may be taken before the server binds it: try a few.
            let mut attempt = 0;
            let node = loop {
                let port = free_port()?;
                let child = spawn_server(port, &node_dir)?;
                let mut node = Node { port, dir: node_dir.clone(), child: Some(child), id: String::new() };
                match wait_ping(&mut node) {
                    Ok(()) => break node,
                    Err(err) if attempt >= 2 => return Err(err),
                    Err(_) => {
                        kill_child(&mut node);
                        attempt += 1;
                    }
                }
            };
            cluster.nodes.push(node);
        }
        for node in &mut cluster.nodes {
            node.id = query_string(node.port, &["CLUSTER", "MYID"])
                .map_err(|e| HarnessError(format!("CLUSTER MYID on port {}: {e}", node.port)))?;
        }
        cluster.create()?;
        cluster.wait_ready(CREATE_TIMEOUT)?;
        Ok(cluster)
    }

    fn create(&self) -> Result<(), HarnessError> {
        let out_path = self._dir.path().join("create.log");
        let out = std::fs::File::create(&out_path).map_err(|e| HarnessError(e.to_string()))?;
        let err = out.try_clone().map_err(|e| HarnessError(e.to_string()))?;
        let mut child = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &self.replicas_per_primary.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| HarnessError(format!("starting redis-cli (is redis-tools installed?): {e}")))?;
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return fail(format!(
                        "redis-cli --cluster create did not finish within {CREATE_TIMEOUT:?}:\n{}",
                        std::fs::read_to_string(&out_path).unwrap_or_default()
                    ));
                }
                Ok(None) => sleep(POLL),
                Err(e) => return fail(format!("waiting for redis-cli: {e}")),
            }
        };
        if !status.success() {
            return fail(format!(
                "redis-cli --cluster create failed ({status}):\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Waits until every running node reports `cluster_state:ok`, sees no node as failing
    /// while it runs, every running replica's link to its primary is up, and every primary
    /// has its running replicas connected.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        poll_until(timeout, "cluster not ready", || self.why_not_ready())
    }

    /// Why the cluster is not ready yet (`None`: it is), a failed query included.
    fn why_not_ready(&self) -> Option<String> {
        self.not_ready().unwrap_or_else(|e| Some(e.to_string()))
    }

    /// Why the cluster is not ready yet, or `None` when it is.
    fn not_ready(&self) -> redis::RedisResult<Option<String>> {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let running_ports: HashSet<u16> = running.iter().map(|n| n.port).collect();
        for node in &running {
            let info = query_string(node.port, &["CLUSTER", "INFO"])?;
            if info_field(&info, "cluster_state").as_deref() != Some("ok") {
                return Ok(Some(format!("port {}: cluster_state is not ok", node.port)));
            }
            let view = cluster_nodes(node.port)?;
            if view.len() != self.nodes.len() {
                return Ok(Some(format!("port {} knows {} of {} nodes", node.port, view.len(), self.nodes.len())));
            }
            for line in &view {
                let failing = line.flags.iter().any(|f| f == "fail" || f == "fail?");
                if failing && running_ports.contains(&line.port) {
                    return Ok(Some(format!("port {} sees running port {} as failing", node.port, line.port)));
                }
            }
            let replication = query_string(node.port, &["INFO", "replication"])?;
            match info_field(&replication, "role").as_deref() {
                Some("slave") => {
                    if info_field(&replication, "master_link_status").as_deref() != Some("up") {
                        return Ok(Some(format!("replica on port {}: link to its primary is not up", node.port)));
                    }
                }
                _ => {
                    let me = view.iter().find(|l| l.flags.iter().any(|f| f == "myself"));
                    let expected = me.map_or(0, |me| {
                        view.iter().filter(|l| l.master == me.id && running_ports.contains(&l.port)).count()
                    });
                    let connected: usize =
                        info_field(&replication, "connected_slaves").and_then(|v| v.parse().ok()).unwrap_or(0);
                    if connected < expected {
                        return Ok(Some(format!(
                            "primary on port {}: {connected} of {expected} replicas connected",
                            node.port
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Every node's port on 127.0.0.1, by node index.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:port` of every running node (seed nodes for a client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(Node::url).collect()
    }

    /// `redis://127.0.0.1:port` of node `node`.
    pub fn url(&self, node: usize) -> String {
        self.nodes[node].url()
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A synchronous connection to node `node`, for raw commands in tests.
    pub fn connection(&self, node: usize) -> Result<redis::Connection, HarnessError> {
        connect(self.nodes[node].port).map_err(|e| HarnessError(format!("connect to node {node}: {e}")))
    }

    fn any_running(&self) -> Result<u16, HarnessError> {
        self.nodes.iter().find(|n| n.child.is_some()).map(|n| n.port).ok_or(HarnessError("no node is running".into()))
    }

    /// The node's role in the cluster's view (asked of a running node).
    pub fn role(&self, node: usize) -> Result<Role, HarnessError> {
        let port = self.any_running()?;
        let view = cluster_nodes(port).map_err(|e| HarnessError(format!("CLUSTER NODES: {e}")))?;
        let line = view
            .iter()
            .find(|l| l.id == self.nodes[node].id)
            .ok_or_else(|| HarnessError(format!("node {node} is not in the cluster's view")))?;
        Ok(if line.flags.iter().any(|f| f == "master") { Role::Primary } else { Role::Replica })
    }

    /// How many chunk records the primaries hold (keys of a tag, `:` and 16 name bytes, with
    /// the default 12-bit buckets), read with `KEYS *`: for tests that check each chunk is
    /// stored once.
    pub fn record_count(&self) -> Result<usize, HarnessError> {
        let mut count = 0;
        for node in self.primaries()? {
            let mut con = self.connection(node)?;
            let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut con).map_err(|e| HarnessError(format!("KEYS on node {node}: {e}")))?;
            // `{c:xyz}:` is 8 bytes with 12-bit buckets; the index keys are `{c:xyz}:n`, `:x`.
            count += keys.iter().filter(|k| k.len() == 8 + 16).count();
        }
        Ok(count)
    }

    /// The indices of the nodes the cluster sees as primaries owning slots.
    pub fn primaries(&self) -> Result<Vec<usize>, HarnessError> {
        let port = self.any_running()?;
        let view = cluster_nodes(port).map_err(|e| HarnessError(format!("CLUSTER NODES: {e}")))?;
        Ok((0..self.nodes.len())
            .filter(|&i| {
                view.iter()
                    .any(|l| l.id == self.nodes[i].id && l.flags.iter().any(|f| f == "master") && !l.slots.is_empty())
            })
            .collect())
    }

    /// The index of the node that serves `slot` as primary, in the view of a running node.
    pub fn primary_for_slot(&self, slot: u16) -> Result<usize, HarnessError> {
        let port = self.any_running()?;
        let view = cluster_nodes(port).map_err(|e| HarnessError(format!("CLUSTER NODES: {e}")))?;
        let owner = view
            .iter()
            .find(|l| l.flags.iter().any(|f| f == "master") && l.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .ok_or_else(|| HarnessError(format!("no primary serves slot {slot}")))?;
        self.nodes
            .iter()
            .position(|n| n.id == owner.id)
            .ok_or_else(|| HarnessError(format!("slot {slot} is served by unknown node {}", owner.id)))
    }

    /// The index of the node that serves `key` as primary.
    pub fn primary_for_key(&self, key: &[u8]) -> Result<usize, HarnessError> {
        self.primary_for_slot(crate::key_slot(key))
    }

    /// Kills node `node` with SIGKILL (no chance to hand anything over) and reaps it.
    pub fn kill(&mut self, node: usize) {
        kill_child(&mut self.nodes[node]);
    }

    /// Starts node `node` again after [`RedisCluster::kill`], on its port and with its
    /// cluster configuration (it rejoins; a failed-over primary comes back as a replica), and
    /// waits until it answers `PING`. Follow with [`RedisCluster::wait_ready`] to wait for it
    /// to sync.
    pub fn restart(&mut self, node: usize) -> Result<(), HarnessError> {
        let n = &mut self.nodes[node];
        if n.child.is_some() {
            return fail(format!("node {node} is running"));
        }
        n.child = Some(spawn_server(n.port, &n.dir)?);
        wait_ping(n)
    }

    /// Waits until the killed node `killed` is flagged `fail` by every running node, owns no
    /// slots any more (a replica took them over), and the cluster is ready again (see
    /// [`RedisCluster::wait_ready`]).
    pub fn wait_failover(&self, killed: usize, timeout: Duration) -> Result<(), HarnessError> {
        let id = &self.nodes[killed].id;
        poll_until(timeout, &format!("no failover of node {killed}"), || {
            let mut why = None;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                match cluster_nodes(node.port) {
                    Err(e) => why = Some(format!("CLUSTER NODES on port {}: {e}", node.port)),
                    Ok(view) => match view.iter().find(|l| &l.id == id) {
                        None => why = Some(format!("port {} does not know node {killed}", node.port)),
                        Some(line) if !line.flags.iter().any(|f| f == "fail") => {
                            why = Some(format!("port {} does not flag node {killed} as failed yet", node.port));
                        }
                        Some(line) if !line.slots.is_empty() => {
                            why = Some(format!("port {} still sees node {killed} owning slots", node.port));
                        }
                        Some(_) => {}
                    },
                }
                if why.is_some() {
                    break;
                }
            }
            why.or_else(|| self.why_not_ready())
        })
    }

    /// [`RedisCluster::wait_failover`] with a 30 s deadline.
    pub fn wait_failover_default(&self, killed: usize) -> Result<(), HarnessError> {
        self.wait_failover(killed, FAILOVER_TIMEOUT)
    }
}

/// Polls `check` (`None`: done, `Some(why)`: not yet) every [`POLL`] until it is done, or
/// fails with `what` and the last reason once `timeout` has passed.
fn poll_until(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<String>) -> Result<(), HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(why) = check() else { return Ok(()) };
        if Instant::now() > deadline {
            return fail(format!("{what} within {timeout:?}: {why}"));
        }
        sleep(POLL);
    }
}

fn kill_child(node: &mut Node) {
    if let Some(mut child) = node.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            kill_child(node);
        }
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reserved) = reserved.as_mut() {
            for node in &self.nodes {
                reserved.remove(&node.port);
                reserved.remove(&(node.port + 10_000));
            }
        }
    }
}
