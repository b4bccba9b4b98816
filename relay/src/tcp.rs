//! The TLS-over-TCP listener (`tcp_listen`): links from clients that cannot use UDP (networks
//! that block it) or that want TCP's per-message cost, which on one machine or a LAN is a
//! fraction of QUIC's (the kernel coalesces a stream's writes into large segments; QUIC seals,
//! sends and acknowledges each ~1 KiB chunk as a packet of its own; see docs/performance.md).
//!
//! Each accepted connection is a link exactly like a QUIC client connection's control stream:
//! TLS 1.3 with the relay's own certificate and ALPN `canopy/2`, then the same reader and
//! writer ([`crate::link`]), the same `Hello` (version, role, token and access rules), the
//! same frame size limit and flow control.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use canopy::wire::ErrorCode;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Shared;
use crate::link::LinkSend;

/// How long a peer may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the TCP listener.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the TCP listener {addr}"))
}

/// Accepts connections until the task is aborted; each is served as a downstream link.
///
/// The links' tasks belong to this one: aborting it (the relay stopping, after its grace
/// period) aborts them, so no link outlives the relay.
pub(crate) async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>, open: Arc<AtomicUsize>) {
    let acceptor = TlsAcceptor::from(tls);
    let mut links = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = links.join_next(), if !links.is_empty() => continue,
        };
        match accepted {
            Ok((stream, remote)) => {
                let (shared, open, acceptor) = (shared.clone(), open.clone(), acceptor.clone());
                open.fetch_add(1, Ordering::Relaxed);
                links.spawn(async move {
                    if let Err(err) = serve(stream, acceptor, &shared).await {
                        tracing::debug!(%remote, "TCP link ended: {err:#}");
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(err) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(%err, "accepting on the TCP listener failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, acceptor: TlsAcceptor, shared: &Shared) -> anyhow::Result<()> {
    canopy_sdk::tune_tcp(&stream).context("setting socket options")?;
    let remote = stream.peer_addr().ok();
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .context("no TLS handshake in time")?
        .context("TLS handshake")?;
    let (recv, send) = tokio::io::split(tls);
    let link = shared.link_id();
    tracing::debug!(link, ?remote, "TCP link opened");
    crate::run_link(link, recv, TcpSend(send), shared, false, shared.stop.clone()).await
}

/// The sending half of a TLS-over-TCP link.
pub(crate) struct TcpSend(WriteHalf<TlsStream<TcpStream>>);

impl tokio::io::AsyncWrite for TcpSend {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl LinkSend for TcpSend {
    async fn gone(&self) {
        // As on a Unix socket, the reader sees the peer go (end of stream, an error, or the
        // keep-alives failing) and closes the link, which wakes the writer.
        std::future::pending::<()>().await;
    }

    /// Sends TLS's `close_notify` and shuts the socket down for writing: the peer reads what
    /// was sent, then the end of the stream. The error code went out as an `Error` frame.
    async fn finish(mut self, _code: ErrorCode) {
        let _ = tokio::time::timeout(crate::link::LINGER, self.0.shutdown()).await;
    }
}
