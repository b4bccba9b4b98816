//! One QUIC connection's control stream: a reader task that decodes frames and hands them to
//! the node actor, and a writer task that encodes what the node queued for the link.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy::node::LinkId;
use canopy::wire::{self, ErrorCode, Frame, FrameDecoder};
use tokio::sync::{Notify, mpsc, watch};

use crate::actor::{Stop, ToNode};

/// Frames a writer holds at most before the node stops draining into it; the node's own
/// per-link queue (`max_queue`) is the real bound.
pub(crate) const WRITER_CAPACITY: usize = 256;

/// How long a closing link waits for the peer to acknowledge the last frames.
const LINGER: Duration = Duration::from_secs(3);

#[derive(Default)]
struct OutState {
    frames: VecDeque<Frame>,
    /// Set once the link is closing: the writer sends what is queued, then closes with this
    /// code. Later frames are dropped.
    closing: Option<ErrorCode>,
}

/// Where the node actor puts the frames of one link: a QUIC writer's buffer ([`LinkOut`]) or
/// a plugin's inbox.
pub(crate) trait Outlet: Send + Sync {
    /// How many more frames it takes now (0 once closing).
    fn room(&self) -> usize;
    /// Queues frames (dropped if the link is closing).
    fn push(&self, frames: Vec<Frame>);
    /// Queues the last frames and closes the link after them. Only the first call counts.
    fn close(&self, frames: Vec<Frame>, code: ErrorCode);
}

impl Outlet for LinkOut {
    fn room(&self) -> usize {
        LinkOut::room(self)
    }
    fn push(&self, frames: Vec<Frame>) {
        LinkOut::push(self, frames)
    }
    fn close(&self, frames: Vec<Frame>, code: ErrorCode) {
        LinkOut::close(self, frames, code)
    }
}

/// The buffer between the node actor and one link's writer task.
#[derive(Default)]
pub(crate) struct LinkOut {
    state: Mutex<OutState>,
    wake: Notify,
    /// Wakes the reader when the writer took frames, freeing room.
    drained: Notify,
}

impl LinkOut {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(LinkOut::default())
    }

    /// How many more frames the writer takes now (0 once closing).
    pub(crate) fn room(&self) -> usize {
        let state = self.state.lock().expect("link buffer lock");
        if state.closing.is_some() { 0 } else { WRITER_CAPACITY.saturating_sub(state.frames.len()) }
    }

    /// Whether the writer's buffer is full while the link is open: the peer is not reading
    /// what it is sent.
    fn is_full(&self) -> bool {
        let state = self.state.lock().expect("link buffer lock");
        state.closing.is_none() && state.frames.len() >= WRITER_CAPACITY
    }

    /// Queues frames for the writer (dropped if the link is closing).
    pub(crate) fn push(&self, frames: Vec<Frame>) {
        if frames.is_empty() {
            return;
        }
        let mut state = self.state.lock().expect("link buffer lock");
        if state.closing.is_some() {
            return;
        }
        state.frames.extend(frames);
        drop(state);
        self.wake.notify_one();
    }

    /// Queues the last frames (whatever the room) and asks the writer to close the link after
    /// sending them. Only the first call counts.
    pub(crate) fn close(&self, frames: Vec<Frame>, code: ErrorCode) {
        let mut state = self.state.lock().expect("link buffer lock");
        if state.closing.is_some() {
            return;
        }
        state.frames.extend(frames);
        state.closing = Some(code);
        drop(state);
        self.wake.notify_one();
    }
}

/// The QUIC application close code for a link closed with `code` (0 for a normal end).
fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(code.code()))
}

/// A normal close, with no error.
pub(crate) const NORMAL: ErrorCode = ErrorCode::Other(0);

/// Encodes and writes frames from `out` until the link closes; then finishes the stream,
/// waits (bounded) for the peer to acknowledge it, and closes the connection.
pub(crate) async fn writer(mut send: quinn::SendStream, conn: quinn::Connection, out: Arc<LinkOut>, room: Arc<Notify>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let code = loop {
        let (batch, closing) = {
            let mut state = out.state.lock().expect("link buffer lock");
            (std::mem::take(&mut state.frames), state.closing)
        };
        if batch.is_empty() {
            if let Some(code) = closing {
                break code;
            }
            tokio::select! {
                () = out.wake.notified() => continue,
                _ = conn.closed() => return,
            }
        }
        buf.clear();
        for frame in &batch {
            if let Err(err) = wire::encode(frame, &mut buf) {
                tracing::error!(%err, ?frame, "a frame could not be encoded; dropped");
            }
        }
        // The node may drain more into the buffer now, and the reader read more.
        room.notify_one();
        out.drained.notify_one();
        if send.write_all(&buf).await.is_err() {
            return;
        }
    };
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    let reason = if code == NORMAL { "closed".to_owned() } else { code.to_string() };
    conn.close(close_code(code), reason.as_bytes());
}

/// Reads the control stream of `link`, handing whole frames to the node, until the stream
/// ends, fails or carries bytes that do not decode (answered with an `Error` and a close).
/// With `pause_when_full` (downstream links), it stops reading while the link's writer buffer
/// is full, so a peer that does not read is not read either. A publish whose chunk is over the
/// size limit in an otherwise intact frame is answered here with
/// `Error{ChunkTooLarge, about: seq}`, and reading goes on.
pub(crate) async fn reader(
    mut recv: quinn::RecvStream,
    link: LinkId,
    to_node: mpsc::Sender<ToNode>,
    out: Arc<LinkOut>,
    mut stop: watch::Receiver<Stop>,
    pause_when_full: bool,
) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A peer that does not read what it is sent is not read either: its acks and errors
        // would pile up in the node, so QUIC flow control pushes back on it instead.
        while pause_when_full && out.is_full() {
            tokio::select! {
                _ = stop.changed() => {
                    out.close(Vec::new(), NORMAL);
                    return;
                }
                () = out.drained.notified() => {}
            }
        }
        let read = tokio::select! {
            _ = stop.changed() => {
                out.close(Vec::new(), NORMAL);
                return;
            }
            read = recv.read(&mut buf) => read,
        };
        match read {
            Ok(Some(n)) => {
                decoder.extend(&buf[..n]);
                let mut frames = Vec::new();
                let mut answers = Vec::new();
                let failure = loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break None,
                        Err(err) if !err.is_fatal() => {
                            tracing::debug!(link, %err, "refused a frame; the stream is still in sync");
                            answers.push(Frame::Error {
                                code: err.error_code(),
                                about: err.about(),
                                message: err.to_string(),
                            });
                        }
                        Err(err) => break Some(err),
                    }
                };
                if !frames.is_empty() && to_node.send(ToNode::Frames { link, frames }).await.is_err() {
                    return;
                }
                // The node never sees these frames, so the answers go straight to the writer;
                // a peer that floods such frames without reading the answers fills it, and
                // then is not read either (`pause_when_full`).
                out.push(answers);
                if let Some(err) = failure {
                    tracing::info!(link, %err, "closing a link that sent undecodable bytes");
                    let code = err.error_code();
                    out.close(vec![Frame::Error { code, about: None, message: err.to_string() }], code);
                    return;
                }
            }
            Ok(None) => {
                out.close(Vec::new(), NORMAL);
                return;
            }
            Err(err) => {
                tracing::debug!(link, %err, "control stream ended");
                out.close(Vec::new(), NORMAL);
                return;
            }
        }
    }
}
