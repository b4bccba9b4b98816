//! The listener's UDP socket, wrapped so the relay can tell when it is closed.
//!
//! quinn shares the socket between the endpoint, its driver task and every connection, and
//! closes it when the last of them lets go, which can be after `Endpoint::wait_idle`
//! returns. [`ReleasingSocket`] fires a signal once the socket itself has been dropped, so
//! `RelayHandle::shutdown` can return only after the port is free again.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::oneshot;

/// A socket that closes its `released` sender once the inner socket is closed.
pub(crate) struct ReleasingSocket {
    // Fields drop in declaration order: the socket is closed before `released` fires.
    inner: Arc<dyn AsyncUdpSocket>,
    _released: oneshot::Sender<()>,
}

impl ReleasingSocket {
    /// Wraps `inner`, which nothing else may hold; the receiver completes (with an error, as
    /// nothing is ever sent) once the socket is closed.
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (released, rx) = oneshot::channel();
        (Arc::new(ReleasingSocket { inner, _released: released }), rx)
    }
}

impl fmt::Debug for ReleasingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleasingSocket").field("inner", &self.inner).finish()
    }
}

impl AsyncUdpSocket for ReleasingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // The inner poller holds the inner socket; holding `self` too keeps the socket (and
        // the signal) alive until every poller is gone.
        let inner = self.inner.clone().create_io_poller();
        Box::pin(Poller { inner, _socket: self })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

struct Poller {
    inner: Pin<Box<dyn UdpPoller>>,
    _socket: Arc<ReleasingSocket>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_writable(cx)
    }
}
