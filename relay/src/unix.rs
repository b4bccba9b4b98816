//! The Unix-domain socket listener (`unix_listen`): links from processes on the same machine
//! that speak the wire protocol without QUIC, e.g. a messenger's Secure process, whose
//! sandbox allows only `AF_UNIX` sockets.
//!
//! Each accepted connection is a link exactly like a QUIC client connection: the same reader
//! and writer ([`crate::link`]), the same `Hello` (version, role, token and access rules),
//! the same frame size limit and flow control.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixSocket, UnixStream};

use crate::Shared;

/// Connections waiting to be accepted at most.
const BACKLOG: u32 = 128;

/// The socket file, removed when this is dropped, if it is still the one this relay bound.
pub(crate) struct SocketFile {
    path: PathBuf,
    /// `(device, inode)` of the file bound, so that a file someone else put there since is
    /// left alone.
    id: (u64, u64),
}

impl SocketFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
            && let Err(err) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), %err, "cannot remove the Unix socket");
        }
    }
}

/// Binds a listening Unix stream socket at `path` with mode 0600.
///
/// A socket file already at `path` is removed first if nothing accepts connections on it (a
/// relay that is gone left it); one that a live process serves, or a file that is not a
/// socket, is an error. The mode is set between `bind` and `listen`, so no one else can ever
/// connect.
pub(crate) fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!("another process is listening on the Unix socket {}", path.display()),
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale Unix socket");
                std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
            }
            Err(err) => return Err(err).with_context(|| format!("checking the existing socket {}", path.display())),
        },
        Ok(_) => bail!("{} exists and is not a socket; not replacing it", path.display()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("checking {}", path.display())),
    }
    let socket = UnixSocket::new_stream().context("creating a Unix socket")?;
    socket.bind(path).with_context(|| format!("binding the Unix socket {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile { path: path.to_owned(), id: (meta.dev(), meta.ino()) };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    let listener = socket.listen(BACKLOG).with_context(|| format!("listening on {}", path.display()))?;
    Ok((listener, file))
}

/// Accepts connections until the task is aborted; each is served as a downstream link
/// ([`crate::link::accept_links`]).
pub(crate) async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, open: Arc<AtomicUsize>) {
    crate::link::accept_links(listener, open, move |stream| {
        let shared = shared.clone();
        async move { serve(stream, &shared).await }
    })
    .await;
}

async fn serve(stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let (recv, send) = stream.into_split();
    let link = shared.link_id();
    tracing::debug!(link, "Unix link opened");
    crate::run_link(link, recv, send, shared, false, shared.stop.clone()).await
}
