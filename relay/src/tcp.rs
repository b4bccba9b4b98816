//! The TLS-over-TCP listener (`tcp_listen`): links from clients that cannot use UDP (networks
//! that block it) or that want TCP's per-message cost, which on one machine or a LAN is a
//! fraction of QUIC's (the kernel coalesces a stream's writes into large segments; QUIC seals,
//! sends and acknowledges each ~1 KiB chunk as a packet of its own; see docs/performance.md).
//!
//! Each accepted connection is a link exactly like a QUIC client connection's control stream:
//! TLS 1.3 with the relay's own certificate and ALPN `canopy/3`, then the same reader and
//! writer ([`crate::link`]), the same `Hello` (version, role, token and access rules), the
//! same frame size limit and flow control.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
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

/// Accepts connections until the task is aborted; each is served as a downstream link
/// ([`crate::link::accept_links`]).
pub(crate) async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>, open: Arc<AtomicUsize>) {
    let acceptor = TlsAcceptor::from(tls);
    crate::link::accept_links(listener, open, move |(stream, remote)| {
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        async move { serve(stream, remote, acceptor, &shared).await }
    })
    .await;
}

async fn serve(stream: TcpStream, remote: SocketAddr, acceptor: TlsAcceptor, shared: &Shared) -> anyhow::Result<()> {
    canopy_sdk::tune_tcp(&stream).context("setting socket options")?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .context("no TLS handshake in time")?
        .context("TLS handshake")?;
    let (recv, send) = tokio::io::split(tls);
    let link = shared.link_id();
    tracing::debug!(link, %remote, "TCP link opened");
    crate::run_link(link, recv, send, shared, false, shared.stop.clone()).await
}

/// The sending half of a TLS-over-TCP link.
impl LinkSend for WriteHalf<TlsStream<TcpStream>> {
    async fn gone(&self) {
        // As on a Unix socket, the reader sees the peer go (end of stream, an error, or the
        // keep-alives failing) and closes the link, which wakes the writer.
        std::future::pending::<()>().await;
    }

    /// Sends TLS's `close_notify` and shuts the socket down for writing: the peer reads what
    /// was sent, then the end of the stream. The error code went out as an `Error` frame.
    async fn finish(mut self, _code: ErrorCode) {
        let _ = tokio::time::timeout(crate::link::LINGER, self.shutdown()).await;
    }
}
