//! # Canopy chunks on a Redis Cluster
//!
//! The storage of a scaled-out origin: several stateless front-ends share one Redis Cluster,
//! which holds every chunk once. [`RedisStore`] is a cheap, clonable handle over the cluster
//! connection; its operations are async and batched, so the routing core can later issue them
//! as requests that complete later.
//!
//! # Data layout
//!
//! Names are grouped into **buckets** by their top `B` bits ([`RedisStoreConfig::bucket_bits`],
//! default 12: 4,096 buckets). The keys of one bucket share a hash tag, `{c:BKT}` with `BKT` the
//! bucket in hex (one digit per 4 bits, e.g. `{c:03f}`), so one bucket lives in one hash slot,
//! on one primary, and a Lua script can touch all of it atomically:
//!
//! | key | type | contents |
//! | --- | --- | --- |
//! | `{c:BKT}:n` | sorted set | the bucket's names, 16 bytes big-endian, every score 0: `ZRANGE … BYLEX` walks them in name order (byte order is name order) |
//! | `{c:BKT}:x` | sorted set | the same names scored by expiry (unix ms), for [`RedisStore::sweep_expired`] |
//! | `{c:BKT}:` + 16 name bytes | string | the chunk's **record**, set with `PXAT expiry` so that Redis drops it itself when it expires |
//! | `{c:BKT}:live` | (channel) | the bucket's sharded pub/sub channel ([`RedisStore::bucket_channel`]), for the live fan-out between front-ends |
//!
//! A record is a version byte (1), the expiry as a big-endian `u64`, then the payload. A record
//! read back is untrusted: anything malformed (short, another version, a payload over
//! [`canopy::MAX_CHUNK_DATA`], an index member that is not 16 bytes) is
//! [`RedisStoreError::Corrupt`], never a panic.
//!
//! # Operations
//!
//! - **Insert** is one script per chunk, on the keys of its bucket: if a record exists, equal
//!   bytes (same expiry and data) are [`InsertOutcome::Duplicate`] and different bytes
//!   [`InsertOutcome::Conflict`] (the original is kept); otherwise the record is `SET … PXAT`
//!   and the name added to both sets: [`InsertOutcome::Inserted`]. A batch sends one pipeline
//!   of `EVALSHA`s per bucket (falling back to `EVAL` when a node lacks the script), all at
//!   once: the client multiplexes one connection per node, so a batch costs about one round
//!   trip per node, not one per chunk. Outcomes come back in input order; a second chunk at
//!   the same name in one batch sees the first.
//! - **Already expired**: a chunk whose expiry is not after the primary's clock (`TIME`) when
//!   its script runs is treated as expired on arrival: nothing is written and the outcome is
//!   `Inserted`, as if it had been stored and evicted at once (a [`canopy::MemoryStore`]
//!   stores it but never serves it). Expiries past `i64::MAX` ms are stored without `PXAT`.
//! - **Expiry** on reads does not rely on Redis: [`RedisStore::get`] and [`RedisStore::scan`]
//!   take `now_ms` and skip a chunk expired at it (expiry ≤ `now_ms`) whatever Redis still
//!   holds. Redis drops records at expiry on its own clock; the index entries stay until
//!   [`RedisStore::sweep_expired`] removes them (and any record still there), bucket by bucket.
//! - **Scan**: a filter of at least `B` bits lies in one bucket and is one `ZRANGE … BYLEX
//!   LIMIT` there; a shorter one covers whole buckets, read in name order until the limit is
//!   reached, in growing windows of buckets read concurrently (1, 2, 4, … up to 16). The same
//!   script returns each page's records with its names, so a page is one round trip. A sparse
//!   short filter still reads every bucket it covers: `ALL` with 12-bit buckets is 4,096 reads
//!   (in 16-bucket windows) when little is stored.
//!
//! # Durability: what an `Ok` from [`RedisStore::insert_batch`] means
//!
//! With [`RedisStoreConfig::min_replicas`] = 0, `Ok` means the owning primaries applied the
//! inserts, in memory. Redis replication is asynchronous: a primary that fails before its
//! replicas received a write loses it when a replica is promoted.
//!
//! With `min_replicas` = `k` > 0, after the inserts the store sends `WAIT k timeout` once over
//! each primary connection that ran the batch's scripts (every bucket pipeline ends in `CLIENT
//! INFO`, which names the connection: server address and client id; the `WAIT` is followed by
//! `CLIENT INFO` too, and one that reached another connection, as after a failover or a
//! reconnect, counts as 0 replicas). If any reports fewer than `k`, the batch fails with
//! [`RedisStoreError::NotReplicated`] and the caller must not acknowledge it; retrying is safe
//! (the chunks come back `Duplicate`, and the retry's `WAIT` covers the connection's earlier
//! writes).
//!
//! This **narrows but does not close** the window in which a failover loses an acknowledged
//! write: `WAIT` is not a transaction (the write stays on the primary even when `WAIT` fails),
//! replicas acknowledge receipt, not persistence, and Redis can still promote a replica that
//! had not received a write (for example one cut off by a partition, or when the replica that
//! acknowledged fails too). `WAIT` also covers only writes made over that connection: a
//! `Duplicate` of a chunk that another front-end (or a connection this handle has since lost)
//! wrote is as replicated as that writer's own `WAIT` made it. A shard with fewer than `k`
//! live replicas fails every batch that writes to it, after `wait_timeout_ms`, until a
//! replica is back.
//!
//! # Retries
//!
//! The cluster client follows `MOVED`/`ASK` redirects, refreshes its slot map and retries a
//! bounded number of times ([`RedisStoreConfig::retries`]). An insert retried after its first
//! attempt was applied (a connection lost before the reply) reports `Duplicate` for a chunk
//! this call wrote; callers treat `Duplicate` as stored, so this is harmless.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), canopy_redis::RedisStoreError> {
//! use canopy::{Chunk, Filter, Name};
//! use canopy_redis::{RedisStore, RedisStoreConfig};
//!
//! let store = RedisStore::connect(RedisStoreConfig::new(["redis://127.0.0.1:7000"])).await?;
//! let chunk = Chunk::new(Name::new(7), 4_000_000_000_000, &b"hi"[..]).unwrap();
//! store.insert_batch(&[chunk.clone()]).await?;
//! assert_eq!(store.get(Name::new(7), 0).await?, Some(chunk.clone()));
//! assert_eq!(store.scan(Filter::ALL, None, 10, 0).await?, vec![chunk]);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use canopy::{Chunk, Filter, InsertOutcome, Name, StoreError};
use futures_util::future::try_join_all;
use futures_util::{StreamExt, TryStreamExt, stream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, ProtocolVersion, RedisError, ServerErrorKind, Value};

mod layout;
mod scripts;
#[cfg(feature = "testing")]
pub mod testing;

use layout::{Layout, decode_name, decode_record, encode_record, printable_key};
pub use layout::{MAX_BUCKET_BITS, RECORD_VERSION, key_slot};

/// Bucket width used by [`RedisStoreConfig::new`]: 12 bits, 4,096 buckets.
pub const DEFAULT_BUCKET_BITS: u8 = 12;

/// Requests (per-bucket pipelines, sweeps, `WAIT`s) one call keeps in flight at most.
const MAX_IN_FLIGHT: usize = 256;

/// The most buckets a scan covering several reads at once (it consumes them in name order).
const SCAN_PREFETCH: u32 = 16;

/// The most names one scan page reads.
const SCAN_PAGE: usize = 512;

/// Buckets one [`RedisStore::sweep_expired`] sweeps at once.
pub const SWEEP_IN_FLIGHT: usize = 8;

/// The most names one sweep script removes; a bucket with more takes several.
const SWEEP_BATCH: u64 = 1_000;

/// How to reach the cluster and lay chunks out in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// Seed nodes, e.g. `redis://127.0.0.1:7000`; the client discovers the rest.
    pub nodes: Vec<String>,
    /// Names are bucketed by their top `bucket_bits` bits (0..=[`MAX_BUCKET_BITS`]). Every
    /// front-end of one cluster must use the same value: it decides the keys.
    pub bucket_bits: u8,
    /// Replicas that must acknowledge a batch's writes (`WAIT`) before
    /// [`RedisStore::insert_batch`] succeeds; 0 sends no `WAIT`. See the crate docs for what
    /// this does and does not guarantee.
    pub min_replicas: u8,
    /// How long `WAIT` waits for the replicas, in milliseconds.
    pub wait_timeout_ms: u64,
    /// How long the client waits for any reply, in milliseconds (raised to `wait_timeout_ms`
    /// + 1,000 when shorter, so `WAIT` is not cut off).
    pub response_timeout_ms: u64,
    /// How many times the cluster client retries a request (after redirects, connection loss,
    /// `CLUSTERDOWN`…), waiting between 50 and 1,000 ms, growing, between tries.
    pub retries: u32,
}

impl RedisStoreConfig {
    /// The defaults for `nodes`: 12-bit buckets, no `WAIT` (1 s timeout when enabled), 2 s
    /// response timeout, 6 retries.
    pub fn new<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        RedisStoreConfig {
            nodes: nodes.into_iter().map(Into::into).collect(),
            bucket_bits: DEFAULT_BUCKET_BITS,
            min_replicas: 0,
            wait_timeout_ms: 1_000,
            response_timeout_ms: 2_000,
            retries: 6,
        }
    }
}

/// Why a [`RedisStore`] operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The configuration cannot work.
    #[error("invalid Redis store configuration: {0}")]
    Config(String),
    /// Redis or the connection to it failed (after the client's retries). The message
    /// carries Redis's own, so it is not also the error's `source` (a chain would say it
    /// twice).
    #[error("redis {op}: {error}")]
    Redis {
        /// What the store was doing.
        op: &'static str,
        /// What went wrong.
        error: RedisError,
    },
    /// A record or index entry read from Redis is malformed.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The key, printable (a record's binary name shown as `0x…`).
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Redis answered with something the store's scripts never return.
    #[error("unexpected reply to {op}: {reply}")]
    UnexpectedReply {
        /// What the store was doing.
        op: &'static str,
        /// The reply, debug-printed.
        reply: String,
    },
    /// The inserts were applied but fewer replicas than required acknowledged them: the
    /// caller must not acknowledge the batch (a failover could lose it). Retrying the batch
    /// is safe; its chunks then come back `Duplicate`.
    #[error(
        "only {acked} replica(s) acknowledged the batch within {timeout_ms} ms, {wanted} required: not acknowledging it"
    )]
    NotReplicated {
        /// `min_replicas`.
        wanted: u8,
        /// The fewest replicas any written primary reported.
        acked: u64,
        /// The `WAIT` timeout used.
        timeout_ms: u64,
        /// The outcomes of the batch's inserts, in input order.
        outcomes: Vec<InsertOutcome>,
    },
}

impl From<RedisStoreError> for StoreError {
    /// `Corrupt` stays `Corrupt`; everything else is a `Backend` failure with its message.
    fn from(err: RedisStoreError) -> Self {
        match err {
            RedisStoreError::Corrupt { key, reason } => StoreError::Corrupt { key, reason },
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// The cluster's totals as its primaries report them ([`RedisStore::cluster_view`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// `CLUSTER INFO` says `cluster_state:ok` (every slot served).
    pub state_ok: bool,
    /// Primaries that answered (the primaries owning slots, as the client knows them).
    pub primaries: u64,
    /// Replicas connected to those primaries.
    pub replicas: u64,
    /// Chunk records: keys with an expiry, which every record has and no index has. (A
    /// record whose expiry is past `i64::MAX` ms, stored without one, is not counted.)
    pub chunks: u64,
    /// The most chunk records on one primary: against `chunks / primaries`, how unevenly the
    /// buckets in use spread.
    pub max_primary_chunks: u64,
    /// Every key: records, two index sets per bucket in use, the origin id.
    pub keys: u64,
    /// Memory the primaries use (`used_memory`), in bytes.
    pub used_memory_bytes: u64,
}

/// The text of an `INFO`-like reply (a bulk string in RESP2, a verbatim string in RESP3).
fn text_of(reply: &Value) -> Option<String> {
    match reply {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// What [`RedisStore::cluster_view`] reads from one primary's `INFO`.
#[derive(Debug, Default, PartialEq, Eq)]
struct InfoFields {
    used_memory: u64,
    connected_replicas: u64,
    keyspace_keys: u64,
    keyspace_expires: u64,
}

/// Parses the fields of an `INFO` reply it needs; absent or unparsable ones count as 0 (an
/// empty database has no `db0` line at all).
fn info_fields(text: &str) -> InfoFields {
    let mut fields = InfoFields::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else { continue };
        match key {
            "used_memory" => fields.used_memory = value.parse().unwrap_or(0),
            "connected_slaves" => fields.connected_replicas = value.parse().unwrap_or(0),
            _ if key.starts_with("db") && key[2..].bytes().all(|b| b.is_ascii_digit()) => {
                for pair in value.split(',') {
                    match pair.split_once('=') {
                        Some(("keys", n)) => fields.keyspace_keys += n.parse().unwrap_or(0),
                        Some(("expires", n)) => fields.keyspace_expires += n.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    fields
}

fn redis_err(op: &'static str) -> impl FnOnce(RedisError) -> RedisStoreError {
    move |error| RedisStoreError::Redis { op, error }
}

fn unexpected(op: &'static str, reply: &Value) -> RedisStoreError {
    RedisStoreError::UnexpectedReply { op, reply: format!("{reply:?}") }
}

/// The connection a `CLIENT INFO` reply describes: the server address it reached (`laddr`)
/// and its client id there, e.g. `127.0.0.1:7000#12`.
fn connection_of(op: &'static str, info: &Value) -> Result<String, RedisStoreError> {
    let text = match info {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes),
        Value::VerbatimString { text, .. } => text.as_str().into(),
        Value::SimpleString(text) => text.as_str().into(),
        Value::ServerError(err) => return Err(redis_err(op)(err.clone().into())),
        other => return Err(unexpected(op, other)),
    };
    let field = |name: &str| text.split_ascii_whitespace().find_map(|f| f.strip_prefix(name));
    match (field("laddr="), field("id=")) {
        (Some(addr), Some(id)) => Ok(format!("{addr}#{id}")),
        _ => Err(RedisStoreError::UnexpectedReply { op, reply: format!("CLIENT INFO without laddr and id: {text}") }),
    }
}

/// A Lua script with its SHA1, for `EVALSHA`.
#[derive(Debug)]
struct Lua {
    source: &'static str,
    sha: String,
}

impl Lua {
    fn new(source: &'static str) -> Self {
        Lua { source, sha: redis::Script::new(source).get_hash().to_owned() }
    }

    /// `EVALSHA` (or, with `by_sha` false, `EVAL`) of this script.
    fn cmd(&self, by_sha: bool, keys: &[&[u8]], args: &[&[u8]]) -> Cmd {
        let mut cmd = if by_sha {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.sha);
            c
        } else {
            let mut c = redis::cmd("EVAL");
            c.arg(self.source);
            c
        };
        cmd.arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        for arg in args {
            cmd.arg(*arg);
        }
        cmd
    }
}

#[derive(Debug)]
struct Scripts {
    insert: Lua,
    scan: Lua,
    sweep: Lua,
}

fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Chunk storage on a Redis Cluster (see the crate docs for the layout and guarantees).
///
/// Cloning is cheap: clones share the cluster connection (one multiplexed connection per node).
#[derive(Clone)]
pub struct RedisStore {
    conn: ClusterConnection,
    /// This handle's id (random per connect), prefixed to the live messages of its inserts so
    /// that its own [`LiveFeed`] can leave them out.
    writer: [u8; 16],
    layout: Layout,
    min_replicas: u8,
    wait_timeout_ms: u64,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("bucket_bits", &self.layout.bits())
            .field("min_replicas", &self.min_replicas)
            .field("wait_timeout_ms", &self.wait_timeout_ms)
            .finish_non_exhaustive()
    }
}

/// Where a scan page starts.
type Start = Bound<Name>;

/// One page of a bucket: its unexpired chunks, and the last name read when the page was full
/// (more may follow).
type Page = (Vec<Chunk>, Option<Name>);

impl RedisStore {
    /// Connects to the cluster (RESP3), discovering its nodes from `config.nodes`. Needs a
    /// tokio runtime.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self, RedisStoreError> {
        Self::open(config, None).await
    }

    /// Connects like [`connect`](Self::connect), and also to the live fan-out: the returned
    /// [`LiveFeed`] yields the chunks other front-ends store in the buckets this handle
    /// subscribes to ([`subscribe_buckets`](Self::subscribe_buckets)), and the fences it sends
    /// itself ([`fence`](Self::fence)).
    pub async fn connect_live(config: RedisStoreConfig) -> Result<(Self, LiveFeed), RedisStoreError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let store = Self::open(config, Some(tx)).await?;
        let mut conn = store.conn.clone();
        conn.ssubscribe(store.fence_channel()).await.map_err(redis_err("subscribe to the fence channel"))?;
        let feed = LiveFeed { rx, writer: store.writer, layout: store.layout, fence: store.fence_channel() };
        Ok((store, feed))
    }

    async fn open(
        config: RedisStoreConfig,
        push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<Self, RedisStoreError> {
        let layout = Layout::new(config.bucket_bits).ok_or_else(|| {
            RedisStoreError::Config(format!(
                "bucket_bits is {}, at most {MAX_BUCKET_BITS} is supported",
                config.bucket_bits
            ))
        })?;
        if config.nodes.is_empty() {
            return Err(RedisStoreError::Config("no cluster nodes given".into()));
        }
        let response_timeout = config.response_timeout_ms.max(config.wait_timeout_ms.saturating_add(1_000));
        let client = ClusterClientBuilder::new(config.nodes.iter().map(String::as_str))
            .use_protocol(ProtocolVersion::RESP3)
            .retries(config.retries)
            .min_retry_wait(50)
            .max_retry_wait(1_000)
            .retry_wait_formula(50, 2)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_millis(response_timeout));
        let client = match push {
            Some(push) => client.push_sender(push),
            None => client,
        };
        let client = client
            .build()
            .map_err(redis_err("configure the cluster client"))?;
        let conn = client.get_async_connection().await.map_err(redis_err("connect to the cluster"))?;
        Ok(RedisStore {
            conn,
            writer: rand::random::<u128>().to_be_bytes(),
            layout,
            min_replicas: config.min_replicas,
            wait_timeout_ms: config.wait_timeout_ms,
            scripts: Arc::new(Scripts {
                insert: Lua::new(scripts::INSERT),
                scan: Lua::new(scripts::SCAN),
                sweep: Lua::new(scripts::SWEEP),
            }),
        })
    }

    /// The bucket width in bits.
    pub fn bucket_bits(&self) -> u8 {
        self.layout.bits()
    }

    /// The bucket of `name` (its top `bucket_bits` bits).
    pub fn bucket_of(&self, name: Name) -> u32 {
        self.layout.bucket_of(name)
    }

    /// The buckets `filter` covers, in name order: one for a filter of at least
    /// `bucket_bits` bits, `2^(bucket_bits - len)` for a shorter one.
    pub fn buckets_of(&self, filter: Filter) -> impl Iterator<Item = u32> + use<> {
        self.layout.buckets_of(filter)
    }

    /// The hash slot holding `bucket`'s keys.
    pub fn bucket_slot(&self, bucket: u32) -> u16 {
        self.layout.slot(bucket)
    }

    /// The sharded pub/sub channel of `bucket` (`{c:BKT}:live`): same hash tag as its keys,
    /// so `SPUBLISH` goes to the shard that stores the bucket.
    pub fn bucket_channel(&self, bucket: u32) -> String {
        self.layout.channel(bucket)
    }

    /// The identity of the origin this cluster stores for: a random 128-bit id the first
    /// front-end to ask creates (`SET … NX` on the key `{canopy}:origin`) and every other one
    /// reads, so all front-ends of one cluster present the same origin in their hellos.
    pub async fn origin_id(&self) -> Result<u128, RedisStoreError> {
        const OP: &str = "origin id";
        const KEY: &str = "{canopy}:origin";
        let mut conn = self.conn.clone();
        let fresh = format!("{:032x}", rand::random::<u128>());
        let _: Value = redis::cmd("SET").arg(KEY).arg(&fresh).arg("NX").query_async(&mut conn).await.map_err(redis_err(OP))?;
        let stored: Option<String> = redis::cmd("GET").arg(KEY).query_async(&mut conn).await.map_err(redis_err(OP))?;
        let stored = stored.ok_or_else(|| RedisStoreError::UnexpectedReply { op: OP, reply: "the origin id vanished".into() })?;
        u128::from_str_radix(&stored, 16).map_err(|_| RedisStoreError::Corrupt {
            key: KEY.into(),
            reason: format!("origin id {stored:?} is not 32 hex digits"),
        })
    }

    /// This handle's 16-byte id, which the live messages of its inserts carry.
    pub fn writer(&self) -> [u8; 16] {
        self.writer
    }

    /// The channel this handle's fences go over: its own, so that only it hears them.
    fn fence_channel(&self) -> String {
        format!("{{f:{}}}:fence", hex(&self.writer))
    }

    /// Subscribes the live feed to `buckets` (`SSUBSCRIBE` to each one's channel, on the
    /// primary that owns it). Returns once every primary has confirmed: a chunk stored in one of
    /// them from then on reaches the feed, and reaches it before the reply to any later read of
    /// that bucket over this handle. After a lost connection the client subscribes again by
    /// itself; the feed says so first ([`LiveEvent::Disconnected`]).
    pub async fn subscribe_buckets(&self, buckets: &[u32]) -> Result<(), RedisStoreError> {
        self.channels(buckets, true).await
    }

    /// Ends the live feed's subscriptions to `buckets` (`SUNSUBSCRIBE`).
    pub async fn unsubscribe_buckets(&self, buckets: &[u32]) -> Result<(), RedisStoreError> {
        self.channels(buckets, false).await
    }

    /// `SSUBSCRIBE`s (`subscribe`) or `SUNSUBSCRIBE`s the channels of `buckets`, all at once.
    async fn channels(&self, buckets: &[u32], subscribe: bool) -> Result<(), RedisStoreError> {
        let op = if subscribe { "subscribe to a bucket" } else { "unsubscribe from a bucket" };
        let commands: Vec<_> = buckets
            .iter()
            .map(|&bucket| {
                let mut conn = self.conn.clone();
                let channel = self.layout.channel(bucket);
                async move {
                    let result = if subscribe { conn.ssubscribe(channel).await } else { conn.sunsubscribe(channel).await };
                    result.map_err(redis_err(op))
                }
            })
            .collect();
        stream::iter(commands).buffer_unordered(MAX_IN_FLIGHT).try_collect::<Vec<()>>().await?;
        Ok(())
    }

    /// Sends `token` through this handle's own fence channel: it comes out of the live feed
    /// as [`LiveEvent::Fence`] after every live message that reached this handle before the
    /// fence was sent. A driver that fences after a read therefore knows, once the fence is
    /// out, that the feed has given it every chunk stored before the read ran (the feed's
    /// messages pass through one queue in the order the connections received them).
    pub async fn fence(&self, token: u64) -> Result<(), RedisStoreError> {
        let mut conn = self.conn.clone();
        let _: Value = redis::cmd("SPUBLISH")
            .arg(self.fence_channel())
            .arg(&token.to_be_bytes())
            .query_async(&mut conn)
            .await
            .map_err(redis_err("fence"))?;
        Ok(())
    }

    /// The cluster as its primaries report it: `INFO memory keyspace replication` on every
    /// primary (one request each, concurrently) and `CLUSTER INFO` on one node. For a front-end's
    /// metrics; a primary that does not answer makes the whole call fail (and the caller keeps
    /// its last view).
    pub async fn cluster_view(&self) -> Result<ClusterView, RedisStoreError> {
        const OP: &str = "cluster view";
        let mut conn = self.conn.clone();
        let mut info = redis::cmd("INFO");
        info.arg("memory").arg("keyspace").arg("replication");
        let replies = conn
            .route_command(info, RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)))
            .await
            .map_err(redis_err(OP))?;
        let Value::Map(replies) = replies else { return Err(unexpected(OP, &replies)) };
        let mut view = ClusterView::default();
        for (_, reply) in &replies {
            let text = text_of(reply).ok_or_else(|| unexpected(OP, reply))?;
            let fields = info_fields(&text);
            let chunks = fields.keyspace_expires;
            view.primaries += 1;
            view.replicas += fields.connected_replicas;
            view.keys += fields.keyspace_keys;
            view.chunks += chunks;
            view.max_primary_chunks = view.max_primary_chunks.max(chunks);
            view.used_memory_bytes += fields.used_memory;
        }
        let state = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<Value>(&mut conn)
            .await
            .map_err(redis_err(OP))?;
        let text = text_of(&state).ok_or_else(|| unexpected(OP, &state))?;
        view.state_ok = text.lines().any(|line| line.trim() == "cluster_state:ok");
        Ok(view)
    }

    /// The key of `name`'s record (for tools and tests that inspect the cluster directly).
    pub fn record_key(&self, name: Name) -> Vec<u8> {
        self.layout.record_key(name)
    }

    /// Runs one script, by SHA and then, if the node lacks it, by source.
    async fn eval(
        &self,
        op: &'static str,
        lua: &Lua,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Value, RedisStoreError> {
        let mut conn = self.conn.clone();
        match lua.cmd(true, keys, args).query_async::<Value>(&mut conn).await {
            Err(err) if is_noscript(&err) => {
                lua.cmd(false, keys, args).query_async::<Value>(&mut conn).await.map_err(redis_err(op))
            }
            other => other.map_err(redis_err(op)),
        }
    }

    /// Inserts `chunks` (insert-if-absent each, see the crate docs), with one pipeline per
    /// bucket, all in flight together: about one round trip per node for the whole batch.
    /// Outcomes are in input order.
    ///
    /// With `min_replicas` > 0, then sends one `WAIT` per primary connection that took the
    /// batch's scripts and fails with [`RedisStoreError::NotReplicated`] (carrying the
    /// outcomes) when any reports fewer replicas in time.
    pub async fn insert_batch(&self, chunks: &[Chunk]) -> Result<Vec<InsertOutcome>, RedisStoreError> {
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, chunk) in chunks.iter().enumerate() {
            groups.entry(self.layout.bucket_of(chunk.name())).or_default().push(i);
        }
        let records: Vec<Vec<u8>> = chunks.iter().map(encode_record).collect();
        let records = &records;
        let mut outcomes = vec![InsertOutcome::Inserted; chunks.len()];
        // The connections (server address and client id) that ran scripts, each with a slot
        // it serves, for `WAIT`.
        let mut written: BTreeMap<String, u16> = BTreeMap::new();
        // The futures are made up front, not by a closure over the stream, so that the
        // whole batch is `Send` and can run on a spawned task (a closure over references
        // would need to be general over their lifetimes, which the compiler cannot show).
        let buckets: Vec<_> = groups
            .iter()
            .map(|(&bucket, indices)| async move {
                let (outcomes, connections) = self.insert_bucket(bucket, indices, chunks, records).await?;
                Ok::<_, RedisStoreError>((bucket, indices, outcomes, connections))
            })
            .collect();
        let mut results = stream::iter(buckets).buffer_unordered(MAX_IN_FLIGHT);
        while let Some((bucket, indices, bucket_outcomes, connections)) = results.try_next().await? {
            for connection in connections {
                written.entry(connection).or_insert_with(|| self.layout.slot(bucket));
            }
            for (&i, outcome) in indices.iter().zip(bucket_outcomes) {
                outcomes[i] = outcome;
            }
        }
        drop(results);
        if self.min_replicas > 0 && !written.is_empty() {
            let acked = self.wait_replicas(written).await?;
            if acked < u64::from(self.min_replicas) {
                return Err(RedisStoreError::NotReplicated {
                    wanted: self.min_replicas,
                    acked,
                    timeout_ms: self.wait_timeout_ms,
                    outcomes,
                });
            }
        }
        Ok(outcomes)
    }

    /// One bucket's inserts: a pipeline of `EVALSHA`s, re-sent as `EVAL`s for any the node
    /// did not have the script for. Each pipeline ends in `CLIENT INFO`, which names the
    /// connection that ran it; returns the outcomes and those connections.
    async fn insert_bucket(
        &self,
        bucket: u32,
        indices: &[usize],
        chunks: &[Chunk],
        records: &[Vec<u8>],
    ) -> Result<(Vec<InsertOutcome>, Vec<String>), RedisStoreError> {
        const OP: &str = "insert";
        let names_key = self.layout.names_key(bucket);
        let expiry_key = self.layout.expiry_key(bucket);
        let channel = self.layout.channel(bucket);
        let mut outcomes: Vec<Option<InsertOutcome>> = vec![None; indices.len()];
        let mut connections = Vec::with_capacity(1);
        // Positions in `indices` still to send.
        let mut pending: Vec<usize> = (0..indices.len()).collect();
        let mut by_sha = true;
        let mut conn = self.conn.clone();
        while !pending.is_empty() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &p in &pending {
                let chunk = &chunks[indices[p]];
                let name = chunk.name().to_bytes();
                let expiry = chunk.expiry().to_string();
                let pxat: &[u8] = if i64::try_from(chunk.expiry()).is_ok() { b"1" } else { b"0" };
                let record_key = self.layout.record_key(chunk.name());
                pipe.add_command(self.scripts.insert.cmd(
                    by_sha,
                    &[&record_key, names_key.as_bytes(), expiry_key.as_bytes()],
                    &[&records[indices[p]], &name, expiry.as_bytes(), pxat, channel.as_bytes(), &self.writer],
                ));
            }
            // Keyless, so it does not change where the client routes the pipeline.
            pipe.cmd("CLIENT").arg("INFO");
            let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(redis_err(OP))?;
            if replies.len() != pending.len() + 1 {
                return Err(RedisStoreError::UnexpectedReply {
                    op: OP,
                    reply: format!("{} replies to a pipeline of {}", replies.len(), pending.len() + 1),
                });
            }
            let info = replies.pop().expect("checked length");
            connections.push(connection_of(OP, &info)?);
            let mut again = Vec::new();
            for (&p, reply) in pending.iter().zip(replies) {
                outcomes[p] = Some(match reply {
                    Value::Int(0 | 3) => InsertOutcome::Inserted,
                    Value::Int(1) => InsertOutcome::Duplicate,
                    Value::Int(2) => InsertOutcome::Conflict,
                    Value::ServerError(err) => {
                        let err = RedisError::from(err);
                        if by_sha && is_noscript(&err) {
                            again.push(p);
                            continue;
                        }
                        return Err(redis_err(OP)(err));
                    }
                    other => return Err(unexpected(OP, &other)),
                });
            }
            pending = again;
            by_sha = false;
        }
        let outcomes = outcomes.into_iter().map(|o| o.expect("every position got an outcome")).collect();
        Ok((outcomes, connections))
    }

    /// Sends `WAIT min_replicas timeout` once over each connection in `written`, routed by
    /// the slot given with it and followed by `CLIENT INFO` to check that it reached that
    /// connection; returns the fewest replicas any acknowledged (0 for a `WAIT` that reached
    /// another connection, as after a failover or reconnect: it proves nothing about the
    /// writes).
    async fn wait_replicas(&self, written: BTreeMap<String, u16>) -> Result<u64, RedisStoreError> {
        const OP: &str = "wait for replicas";
        let (wanted, timeout) = (self.min_replicas, self.wait_timeout_ms);
        stream::iter(written)
            .map(|(connection, slot)| {
                let mut conn = self.conn.clone();
                async move {
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    pipe.cmd("WAIT").arg(wanted).arg(timeout);
                    pipe.cmd("CLIENT").arg("INFO");
                    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                    let replies = conn.route_pipeline(pipe, 0, 2, route).await.map_err(redis_err(OP))?;
                    let [acked, info] = <[Value; 2]>::try_from(replies).map_err(|replies| {
                        RedisStoreError::UnexpectedReply { op: OP, reply: format!("{replies:?}") }
                    })?;
                    if connection_of(OP, &info)? != connection {
                        return Ok(0);
                    }
                    match acked {
                        Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
                        Value::ServerError(err) => Err(redis_err(OP)(err.into())),
                        other => Err(unexpected(OP, &other)),
                    }
                }
            })
            .buffer_unordered(MAX_IN_FLIGHT)
            .try_fold(u64::MAX, |fewest, acked| async move { Ok(fewest.min(acked)) })
            .await
    }

    /// The chunk stored at `name`, unless it is expired at `now_ms` (or absent).
    pub async fn get(&self, name: Name, now_ms: u64) -> Result<Option<Chunk>, RedisStoreError> {
        let key = self.layout.record_key(name);
        let mut conn = self.conn.clone();
        let record: Option<Vec<u8>> =
            redis::cmd("GET").arg(&key).query_async(&mut conn).await.map_err(redis_err("get"))?;
        match record {
            None => Ok(None),
            Some(record) => {
                let chunk = decode_record(&key, name, record)?;
                Ok((!chunk.is_expired(now_ms)).then_some(chunk))
            }
        }
    }

    /// The chunks covered by `filter`, in name order, starting after `after` (when given), at
    /// most `limit`, skipping chunks expired at `now_ms`. To page, pass the last name of one
    /// page as the next page's `after`.
    pub async fn scan(
        &self,
        filter: Filter,
        after: Option<Name>,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<Chunk>, RedisStoreError> {
        let (first, last) = filter.range();
        let first = match after {
            Some(after) if after >= last => return Ok(Vec::new()),
            Some(after) if after >= first => Name::new(after.to_u128() + 1),
            _ => first,
        };
        self.scan_range(first, last, limit, now_ms).await
    }

    /// The chunks named `first..=last`, in name order, at most `limit`, skipping chunks
    /// expired at `now_ms`: [`scan`](Self::scan) over a range that need not be a filter's (a
    /// replay resuming from a cursor, as the routing core's [`StoreOp::Scan`] asks).
    ///
    /// [`StoreOp::Scan`]: canopy::node::StoreOp::Scan
    pub async fn scan_range(
        &self,
        first: Name,
        last: Name,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<Chunk>, RedisStoreError> {
        if limit == 0 || first > last {
            return Ok(Vec::new());
        }
        let (start, start_name) = (Bound::Included(first), first);
        let layout = self.layout;
        let (mut next, last_bucket) = (layout.bucket_of(start_name), layout.bucket_of(last));
        let mut out = Vec::new();
        // Buckets are read in windows read concurrently and consumed in order: 1 bucket first
        // (a filter of at least `bucket_bits` bits has no other), then twice as many each time
        // the limit is not reached yet, up to SCAN_PREFETCH.
        let mut window = 1;
        loop {
            let end = last_bucket.min(next.saturating_add(window - 1));
            let need = (limit - out.len()).min(SCAN_PAGE);
            let reads = (next..=end).map(|bucket| {
                let (bucket_first, bucket_last) = layout.bucket_range(bucket);
                let lo = if bucket_first > start_name { Bound::Included(bucket_first) } else { start };
                let hi = bucket_last.min(last);
                async move {
                    let page = self.scan_page(bucket, lo, hi, false, need, now_ms).await?;
                    Ok::<_, RedisStoreError>((bucket, hi, page))
                }
            });
            for (bucket, hi, (mut chunks, mut more)) in try_join_all(reads).await? {
                loop {
                    for chunk in chunks {
                        out.push(chunk);
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                    let Some(resume) = more else { break };
                    let need = (limit - out.len()).min(SCAN_PAGE);
                    (chunks, more) = self.scan_page(bucket, Bound::Excluded(resume), hi, false, need, now_ms).await?;
                }
            }
            if end == last_bucket {
                return Ok(out);
            }
            next = end + 1;
            window = (window * 2).min(SCAN_PREFETCH);
        }
    }

    /// The `n` greatest-named chunks covered by `filter` that are unexpired at `now_ms`, in
    /// ascending name order (most-recent-N replay: names end in sequence numbers). Reads the
    /// filter's buckets from the last one down, a page at a time, until it has `n`.
    pub async fn scan_last(&self, filter: Filter, n: usize, now_ms: u64) -> Result<Vec<Chunk>, RedisStoreError> {
        let (first, last) = filter.range();
        let mut out: Vec<Chunk> = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        for bucket in self.layout.buckets_of(filter).rev() {
            let (bucket_first, bucket_last) = self.layout.bucket_range(bucket);
            let (lo, mut hi) = (bucket_first.max(first), Bound::Included(bucket_last.min(last)));
            loop {
                let need = (n - out.len()).min(SCAN_PAGE);
                let (chunks, more) = self.scan_page(bucket, hi, lo, true, need, now_ms).await?;
                out.extend(chunks);
                if out.len() >= n {
                    out.truncate(n);
                    out.reverse();
                    return Ok(out);
                }
                let Some(resume) = more else { break };
                hi = Bound::Excluded(resume);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Reads up to `count` names of `bucket` with their records, from `from` on to `to`
    /// (inclusive): upwards, or downwards when `down`. Returns the page's chunks in the order
    /// read, and its last name when it was full (more may follow).
    async fn scan_page(
        &self,
        bucket: u32,
        from: Start,
        to: Name,
        down: bool,
        count: usize,
        now_ms: u64,
    ) -> Result<Page, RedisStoreError> {
        const OP: &str = "scan";
        let names_key = self.layout.names_key(bucket);
        let prefix = self.layout.record_prefix(bucket);
        let start: Vec<u8> = match from {
            Bound::Included(n) => [&b"["[..], &n.to_bytes()].concat(),
            Bound::Excluded(n) => [&b"("[..], &n.to_bytes()].concat(),
            Bound::Unbounded if down => b"+".to_vec(),
            Bound::Unbounded => b"-".to_vec(),
        };
        let end = [&b"["[..], &to.to_bytes()].concat();
        let count_arg = count.to_string();
        let direction: &[u8] = if down { b"1" } else { b"0" };
        let reply = self
            .eval(
                OP,
                &self.scripts.scan,
                &[names_key.as_bytes()],
                &[&start, &end, count_arg.as_bytes(), &prefix, direction],
            )
            .await?;
        self.decode_page(OP, &names_key, reply, count, now_ms)
    }

    /// Decodes a page as the scan scripts return it (`[name, record-or-nil, …]`), keeping the
    /// chunks unexpired at `now_ms`; with the page's last name when it was full.
    fn decode_page(
        &self,
        op: &'static str,
        names_key: &str,
        reply: Value,
        count: usize,
        now_ms: u64,
    ) -> Result<Page, RedisStoreError> {
        let Value::Array(items) = reply else { return Err(unexpected(op, &reply)) };
        if items.len() % 2 != 0 || items.len() / 2 > count {
            return Err(RedisStoreError::UnexpectedReply {
                op,
                reply: format!("{} items for a page of {count}", items.len()),
            });
        }
        let full = items.len() / 2 == count;
        let mut chunks = Vec::with_capacity(items.len() / 2);
        let mut last_name = None;
        let mut items = items.into_iter();
        while let (Some(name), Some(record)) = (items.next(), items.next()) {
            let Value::BulkString(name) = name else { return Err(unexpected(op, &name)) };
            let name = decode_name(names_key.as_bytes(), &name)?;
            last_name = Some(name);
            match record {
                // Redis already dropped the expired record; its index entries await a sweep.
                Value::Nil => {}
                Value::BulkString(record) => {
                    let chunk = decode_record(&self.layout.record_key(name), name, record)?;
                    if !chunk.is_expired(now_ms) {
                        chunks.push(chunk);
                    }
                }
                other => {
                    return Err(RedisStoreError::Corrupt {
                        key: printable_key(&self.layout.record_key(name)),
                        reason: format!("record is not a string: {other:?}"),
                    });
                }
            }
        }
        Ok((chunks, if full { last_name } else { None }))
    }

    /// Removes every name expired at `now_ms` (expiry ≤ `now_ms`) from both index sets of
    /// every bucket, deleting any record Redis still holds for it; returns how many names it
    /// removed (a chunk Redis already dropped counts once its index entries go).
    ///
    /// It visits every bucket (4,096 scripts with the default width), a few at a time
    /// ([`SWEEP_IN_FLIGHT`]) so that a sweep never crowds out the inserts and reads sharing
    /// the connection; run it every few tens of seconds, not every second.
    pub async fn sweep_expired(&self, now_ms: u64) -> Result<u64, RedisStoreError> {
        stream::iter(0..self.layout.bucket_count())
            .map(|bucket| self.sweep_bucket(bucket, now_ms))
            .buffer_unordered(SWEEP_IN_FLIGHT)
            .try_fold(0, |total, n| async move { Ok(total + n) })
            .await
    }

    async fn sweep_bucket(&self, bucket: u32, now_ms: u64) -> Result<u64, RedisStoreError> {
        const OP: &str = "sweep";
        let names_key = self.layout.names_key(bucket);
        let expiry_key = self.layout.expiry_key(bucket);
        let prefix = self.layout.record_prefix(bucket);
        let (now, batch) = (now_ms.to_string(), SWEEP_BATCH.to_string());
        let mut total = 0;
        loop {
            let reply = self
                .eval(
                    OP,
                    &self.scripts.sweep,
                    &[names_key.as_bytes(), expiry_key.as_bytes()],
                    &[now.as_bytes(), batch.as_bytes(), &prefix],
                )
                .await?;
            let Value::Int(n) = reply else { return Err(unexpected(OP, &reply)) };
            let n = u64::try_from(n).map_err(|_| unexpected(OP, &reply))?;
            total += n;
            if n < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the live feed of a [`RedisStore`] yields: see [`RedisStore::connect_live`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// Another handle (another front-end) stored this chunk in a subscribed bucket. The feed
    /// leaves out its own handle's inserts.
    Chunk(Chunk),
    /// A fence this handle sent ([`RedisStore::fence`]).
    Fence(u64),
    /// A connection to a node was lost. The client reconnects and subscribes again by itself,
    /// but chunks stored meanwhile were not heard: live subscribers may have missed some, and
    /// should recover them from the store.
    Disconnected,
    /// A live message that does not decode (what was wrong with it); it is skipped.
    Malformed(String),
}

/// The live fan-out of a [`RedisStore`] opened with [`RedisStore::connect_live`].
#[derive(Debug)]
pub struct LiveFeed {
    rx: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    writer: [u8; 16],
    layout: Layout,
    fence: String,
}

impl LiveFeed {
    /// The next event; `None` once the store's connection is gone for good.
    pub async fn recv(&mut self) -> Option<LiveEvent> {
        loop {
            let push = self.rx.recv().await?;
            if let Some(event) = self.decode(push) {
                return Some(event);
            }
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<LiveEvent> {
        loop {
            let push = self.rx.try_recv().ok()?;
            if let Some(event) = self.decode(push) {
                return Some(event);
            }
        }
    }

    /// What a push message means to the feed; `None` for those it skips (subscription
    /// confirmations, its own inserts).
    fn decode(&self, push: redis::PushInfo) -> Option<LiveEvent> {
        match push.kind {
            redis::PushKind::Disconnection => Some(LiveEvent::Disconnected),
            redis::PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(message))) = (data.next(), data.next())
                else {
                    return Some(LiveEvent::Malformed("a sharded message without channel and payload".into()));
                };
                if channel == self.fence.as_bytes() {
                    return Some(match <[u8; 8]>::try_from(message.as_slice()) {
                        Ok(token) => LiveEvent::Fence(u64::from_be_bytes(token)),
                        Err(_) => LiveEvent::Malformed(format!("a fence of {} bytes", message.len())),
                    });
                }
                if message.len() < 32 {
                    return Some(LiveEvent::Malformed(format!("a live message of {} bytes", message.len())));
                }
                if message[..16] == self.writer {
                    return None;
                }
                let name = match decode_name(&channel, &message[16..32]) {
                    Ok(name) => name,
                    Err(err) => return Some(LiveEvent::Malformed(err.to_string())),
                };
                let key = self.layout.record_key(name);
                Some(match decode_record(&key, name, message[32..].to_vec()) {
                    Ok(chunk) => LiveEvent::Chunk(chunk),
                    Err(err) => LiveEvent::Malformed(err.to_string()),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{InfoFields, info_fields};

    #[test]
    fn info_fields_reads_memory_replication_and_every_database() {
        let text = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n\r\n# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=127.0.0.1,port=7003,state=online,offset=42,lag=0\r\n\r\n# Keyspace\r\ndb0:keys=25,expires=20,avg_ttl=3599000\r\ndb1:keys=2,expires=1,avg_ttl=0\r\n";
        assert_eq!(info_fields(text), InfoFields { used_memory: 1_048_576, connected_replicas: 1, keyspace_keys: 27, keyspace_expires: 21 });
    }

    #[test]
    fn info_fields_counts_an_empty_or_garbled_reply_as_zero() {
        assert_eq!(info_fields(""), InfoFields::default());
        assert_eq!(info_fields("# Keyspace\r\n"), InfoFields::default());
        assert_eq!(info_fields("used_memory:lots\ndbx:keys=3\ndb0:keys=,expires=-1\n:\n"), InfoFields::default());
    }
}
