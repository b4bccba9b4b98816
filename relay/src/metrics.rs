//! The Prometheus endpoint: a minimal HTTP/1.1 responder for `GET /metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use canopy::plugin::PluginStats;

use crate::RelayMetrics;
use crate::plugin::Board;
use crate::actor::Stop;

/// Renders `m` and the plugins' counters in the Prometheus text exposition format.
pub fn render(m: &RelayMetrics, plugins: &[(String, PluginStats)]) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let n = &m.node;
    metric("canopy_chunks_in_total", "counter", "Chunks received on any link.", &[("", n.chunks_in)]);
    metric("canopy_chunks_out_total", "counter", "Chunk deliveries queued to subscribers.", &[("", n.chunks_out)]);
    metric("canopy_chunks_stored_total", "counter", "Chunks newly stored.", &[("", n.stored)]);
    metric("canopy_duplicates_total", "counter", "Identical chunks received again.", &[("", n.duplicates)]);
    metric("canopy_conflicts_total", "counter", "Chunks refused for different data at a stored name.", &[(
        "",
        n.conflicts,
    )]);
    metric("canopy_evicted_total", "counter", "Chunks evicted from the store, by reason.", &[
        ("{reason=\"expired\"}", m.store.evicted_expired),
        ("{reason=\"capacity\"}", m.store.evicted_capacity),
    ]);
    metric("canopy_denied_total", "counter", "Publishes or subscriptions refused by access rules.", &[(
        "", n.denied,
    )]);
    metric("canopy_upstream_rejected_total", "counter", "Outbox chunks the parent refused.", &[(
        "",
        n.upstream_rejected,
    )]);
    metric("canopy_slow_consumers_total", "counter", "Subscriptions ended because their backlog overflowed (no credit, or a link that did not drain).", &[(
        "",
        n.slow_consumers,
    )]);
    metric("canopy_upstream_resubscribed_total", "counter", "Upstream subscriptions the parent ended as slow and this relay renewed.", &[(
        "",
        n.upstream_resubscribed,
    )]);
    metric(
        "canopy_parent_refusals_total",
        "counter",
        "Parent sessions refused before they began (token, cycle, version).",
        &[("", n.parent_refusals)],
    );
    metric(
        "canopy_parent_last_refusal_code",
        "gauge",
        "Error code of the latest parent refusal (12 Unauthenticated, 10 Cycle, 2 UnsupportedVersion, ...); 0 for none.",
        &[("", n.last_parent_refusal.map_or(0, |code| u64::from(code.code())))],
    );
    metric("canopy_subscriptions", "gauge", "Live downstream subscriptions.", &[("", m.subscriptions as u64)]);
    metric("canopy_links", "gauge", "Open links (clients, children and the parent).", &[("", m.links as u64)]);
    metric("canopy_outbox_depth", "gauge", "Chunks waiting for the parent's acknowledgement.", &[(
        "",
        m.store.outbox,
    )]);
    metric("canopy_store_bytes", "gauge", "Bytes stored, as counted against capacity.", &[("", m.store.bytes)]);
    metric("canopy_store_chunks", "gauge", "Chunks stored.", &[("", m.store.chunks)]);
    if let Some(f) = &m.frontend {
        metric("canopy_frontend_shared_in_total", "counter", "Chunks other front-ends stored in the shared store, heard on its live feed.", &[("", n.shared_in)]);
        metric("canopy_frontend_live_gaps_total", "counter", "Live subscriptions ended because the shared store's live feed had a gap (they recover from the cache).", &[("", n.live_gaps)]);
        metric("canopy_frontend_batches_total", "counter", "Batches of store requests run on the shared store.", &[("", f.batches)]);
        metric("canopy_frontend_requests_total", "counter", "Store requests (inserts and reads) run on the shared store.", &[("", f.requests)]);
        metric("canopy_frontend_failed_batches_total", "counter", "Batches in which an insert or a read failed.", &[("", f.failed_batches)]);
        metric("canopy_frontend_feed_gaps_total", "counter", "Gaps in the shared store's live feed (lost connections, failed subscriptions, lost fences).", &[("", f.feed_gaps)]);
        metric("canopy_frontend_feed_malformed_total", "counter", "Live feed messages that did not decode (skipped).", &[("", f.malformed)]);
        metric("canopy_frontend_buckets_subscribed", "gauge", "Buckets of the shared store this front-end's live feed is subscribed to.", &[("", f.buckets_subscribed)]);
        metric("canopy_frontend_cluster_view_failures_total", "counter", "Times asking the Redis Cluster for its view (INFO on every primary) failed.", &[("", f.cluster_view_failures)]);
        // The cluster's view: the same on every front-end of one cluster (sum or max it, do not
        // add the front-ends up).
        if let Some(c) = &f.cluster {
            metric("canopy_cluster_state_ok", "gauge", "1 when the Redis Cluster reports cluster_state:ok (every slot served).", &[("", u64::from(c.state_ok))]);
            metric("canopy_cluster_primaries", "gauge", "Redis primaries owning slots that answered.", &[("", c.primaries)]);
            metric("canopy_cluster_replicas", "gauge", "Replicas connected to those primaries.", &[("", c.replicas)]);
            metric("canopy_cluster_chunks", "gauge", "Chunks stored in the cluster (records with an expiry, over all primaries).", &[("", c.chunks)]);
            metric("canopy_cluster_max_primary_chunks", "gauge", "Chunks on the fullest primary (against chunks / primaries: how evenly the buckets in use spread).", &[("", c.max_primary_chunks)]);
            metric("canopy_cluster_keys", "gauge", "Keys in the cluster: chunk records, two index sets per bucket in use, the origin id.", &[("", c.keys)]);
            metric("canopy_cluster_used_memory_bytes", "gauge", "Memory the primaries use (used_memory), in bytes.", &[("", c.used_memory_bytes)]);
        }
    }
    let per_plugin = |f: fn(&PluginStats) -> u64| -> Vec<(String, u64)> {
        plugins.iter().map(|(name, s)| (format!("{{plugin=\"{}\"}}", name.escape_default()), f(s))).collect()
    };
    let series = [
        ("canopy_plugin_chunks_in_total", "counter", "Chunks delivered to the plugin.", per_plugin(|s| s.chunks_in)),
        ("canopy_plugin_chunks_dropped_total", "counter", "Chunks not delivered because the plugin was quarantined first.", per_plugin(|s| s.chunks_dropped)),
        ("canopy_plugin_chunks_poisoned_total", "counter", "Chunks the plugin failed on alone: dropped, logged, dead-lettered if configured.", per_plugin(|s| s.chunks_poisoned)),
        ("canopy_plugin_batches_isolated_total", "counter", "Failed on-chunks calls whose chunks were delivered again one per call.", per_plugin(|s| s.batches_isolated)),
        ("canopy_plugin_published_total", "counter", "Chunks the plugin published.", per_plugin(|s| s.published)),
        ("canopy_plugin_failures_total", "counter", "Plugin failures counted toward quarantine (trap, deadline, memory, fuel).", per_plugin(|s| s.failures)),
        ("canopy_plugin_restarts_total", "counter", "Times the plugin was re-created after a failure.", per_plugin(|s| s.restarts)),
        ("canopy_plugin_quarantined", "gauge", "1 when the plugin is quarantined after repeated failures.", per_plugin(|s| u64::from(s.quarantined))),
    ];
    for (name, kind, help, samples) in &series {
        let samples: Vec<(&str, u64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(name, kind, help, &samples);
    }
    out
}

/// Serves `GET /metrics` on `listener` until the relay stops.
pub(crate) async fn serve(
    listener: TcpListener,
    snapshot: Arc<Mutex<RelayMetrics>>,
    board: Board,
    mut stop: watch::Receiver<Stop>,
) {
    let board = Arc::new(board);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let (snapshot, board) = (snapshot.clone(), board.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, peer, snapshot, &board)).await;
                });
            }
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    snapshot: Arc<Mutex<RelayMetrics>>,
    board: &Board,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        let m = *snapshot.lock().expect("metrics lock");
        let plugins: Vec<(String, PluginStats)> =
            board.iter().map(|(name, stats)| (name.clone(), *stats.lock().expect("plugin stats lock"))).collect();
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(&m, &plugins))
    } else {
        tracing::debug!(%peer, %line, "metrics: not found");
        ("404 Not Found", "text/plain; charset=utf-8", "try GET /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
