//! One link's byte stream: a reader task that decodes frames and hands them to the node actor,
//! and a writer task that encodes what the node queued for the link.
//!
//! Both are generic over tokio's `AsyncRead`/`AsyncWrite`, so the same code serves a QUIC
//! connection's control stream ([`QuicSend`] and `quinn::RecvStream`) and a Unix-domain
//! socket (the halves of a `tokio::net::UnixStream`): same frames, same framing, same size
//! limit, same flow control.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use canopy::node::LinkId;
use canopy::wire::{self, ErrorCode, Frame, FrameDecoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use crate::actor::{INLINE_FRAMES, Stop, ToNode, Turn, Turns};

/// Frames a writer holds at most before the node stops draining into it; the node's own
/// per-link queue (`max_queue`) is the real bound.
pub(crate) const WRITER_CAPACITY: usize = 256;

/// How long a closing link waits for the peer to acknowledge the last frames.
pub(crate) const LINGER: Duration = Duration::from_secs(3);

#[derive(Default)]
struct OutState {
    frames: VecDeque<Frame>,
    /// Set once the link is closing: the writer sends what is queued, then closes with this
    /// code. Later frames are dropped.
    closing: Option<ErrorCode>,
    /// The node holds more frames for this link than the buffer had room for: the writer
    /// wakes the node when it takes frames. Otherwise it does not, so a link that keeps up
    /// costs the node no wake-up per write.
    node_waiting: bool,
    /// The writer found no frames and waits for some: woken, it runs at once.
    writer_idle: bool,
    /// Outlets the writer is to wake once it has taken its frames ([`Outlet::wake_then`]).
    then_wake: Vec<Arc<dyn Outlet>>,
    /// The writer has ended: it wakes nothing any more.
    writer_ended: bool,
}

/// Where the node actor puts the frames of one link: a QUIC writer's buffer ([`LinkOut`]) or
/// a plugin's inbox.
pub(crate) trait Outlet: Send + Sync {
    /// How many more frames it takes now (0 once closing).
    fn room(&self) -> usize;
    /// Queues frames (dropped if the link is closing) without waking whoever takes them;
    /// returns whether they are to be woken ([`Outlet::wake`]). The node wakes the writers
    /// a turn handed frames to together, in the order it chooses (see `actor::Wakes`).
    fn queue(&self, frames: Vec<Frame>) -> bool;
    /// Wakes whoever takes the frames, after [`Outlet::queue`].
    fn wake(&self);
    /// If whoever takes the frames waits for them now, wakes it and has it wake `next`
    /// once it has taken them (before it writes them); otherwise does nothing and hands
    /// `next` back. This lets a turn wake one writer on its worker thread and leave the rest
    /// to that writer, instead of waking an idle worker (see `actor::Wakes`).
    fn wake_then(&self, next: Vec<Arc<dyn Outlet>>) -> Result<(), Vec<Arc<dyn Outlet>>> {
        Err(next)
    }
    /// Queues the last frames and closes the link after them. Only the first call counts.
    fn close(&self, frames: Vec<Frame>, code: ErrorCode);
    /// The node holds more frames for this link than it could push: `room` is to be
    /// notified once there is room again (at once if there is already). An outlet that
    /// notifies `room` whenever it takes frames needs nothing more.
    fn wait_for_room(&self, _room: &Notify) {}
    /// The node took one of this link's messages from its inbox (see
    /// [`LinkOut::sent_to_inbox`]).
    fn taken_from_inbox(&self) {}
}

impl Outlet for LinkOut {
    fn room(&self) -> usize {
        LinkOut::room(self)
    }
    fn queue(&self, frames: Vec<Frame>) -> bool {
        LinkOut::queue(self, frames)
    }
    fn wake(&self) {
        self.wake.notify_one();
    }
    fn wake_then(&self, next: Vec<Arc<dyn Outlet>>) -> Result<(), Vec<Arc<dyn Outlet>>> {
        let mut state = self.state.lock().expect("link buffer lock");
        if !state.writer_idle || state.writer_ended || state.closing.is_some() {
            return Err(next);
        }
        // Under the lock the writer takes its frames with, so whoever takes these frames
        // takes `next` too.
        state.then_wake.extend(next);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }
    fn close(&self, frames: Vec<Frame>, code: ErrorCode) {
        LinkOut::close(self, frames, code)
    }
    fn taken_from_inbox(&self) {
        self.in_inbox.fetch_sub(1, Ordering::Relaxed);
    }
    fn wait_for_room(&self, room: &Notify) {
        let mut state = self.state.lock().expect("link buffer lock");
        if state.closing.is_some() {
            return;
        }
        if state.frames.len() < WRITER_CAPACITY {
            // The writer took frames since the node looked: there is room now.
            drop(state);
            room.notify_one();
        } else {
            state.node_waiting = true;
        }
    }
}

/// What the writer takes from [`LinkOut`] at once.
struct Taken {
    frames: VecDeque<Frame>,
    closing: Option<ErrorCode>,
    node_waiting: bool,
    then_wake: Vec<Arc<dyn Outlet>>,
}

/// The buffer between the node actor and one link's writer task.
#[derive(Default)]
pub(crate) struct LinkOut {
    state: Mutex<OutState>,
    wake: Notify,
    /// Wakes the reader when the writer took frames, freeing room.
    drained: Notify,
    /// This link's messages in the node's inbox, not yet applied: while there are any, its
    /// reader does not route frames itself ([`crate::actor::Turns`]), which would pass them.
    /// Changed only with the node locked.
    in_inbox: AtomicUsize,
}

impl LinkOut {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(LinkOut::default())
    }

    /// Counts a message of this link about to go into the node's inbox.
    pub(crate) fn sent_to_inbox(&self) {
        self.in_inbox.fetch_add(1, Ordering::Relaxed);
    }

    /// This link's messages in the node's inbox, not yet applied.
    pub(crate) fn in_inbox(&self) -> usize {
        self.in_inbox.load(Ordering::Relaxed)
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

    /// Takes every queued frame for the writer, with the closing code if the link is closing,
    /// whether the node was waiting for room (it is to be woken, and stops waiting) and the
    /// outlets to wake now ([`Outlet::wake_then`]). With no frames, the writer is idle.
    fn take(&self) -> Taken {
        let mut state = self.state.lock().expect("link buffer lock");
        let frames = std::mem::take(&mut state.frames);
        // A closing writer that found nothing left goes on to end the link (which may take
        // `LINGER`): it is not waiting for frames.
        state.writer_idle = frames.is_empty() && state.closing.is_none();
        Taken {
            frames,
            closing: state.closing,
            node_waiting: std::mem::take(&mut state.node_waiting),
            then_wake: std::mem::take(&mut state.then_wake),
        }
    }

    /// The writer has ended: wakes what it was to wake, and takes no more.
    fn writer_ended(&self) {
        let mut state = self.state.lock().expect("link buffer lock");
        state.writer_ended = true;
        state.writer_idle = false;
        let then_wake = std::mem::take(&mut state.then_wake);
        drop(state);
        then_wake.iter().for_each(|out| out.wake());
    }

    /// Queues frames for the writer (dropped if the link is closing) and wakes it.
    pub(crate) fn push(&self, frames: Vec<Frame>) {
        if self.queue(frames) {
            self.wake.notify_one();
        }
    }

    /// Queues frames for the writer (dropped if the link is closing) without waking it;
    /// returns whether it is to be woken.
    fn queue(&self, frames: Vec<Frame>) -> bool {
        if frames.is_empty() {
            return false;
        }
        let mut state = self.state.lock().expect("link buffer lock");
        if state.closing.is_some() {
            return false;
        }
        state.frames.extend(frames);
        true
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

/// The sending half of a link's byte stream, as the [`writer`] needs it: the bytes go through
/// `AsyncWrite`; these say when the connection is gone and how the link ends.
pub(crate) trait LinkSend: AsyncWrite + Unpin + Send + 'static {
    /// Completes once the connection is gone, so a writer waiting for frames stops. Never
    /// completes for a transport whose reader notices the loss instead.
    fn gone(&self) -> impl Future<Output = ()> + Send + '_;
    /// Ends the link after its last frame, with `code` ([`NORMAL`] for a normal end).
    fn finish(self, code: ErrorCode) -> impl Future<Output = ()> + Send;
}

/// A QUIC control stream's send half, with its connection.
pub(crate) struct QuicSend {
    pub(crate) send: quinn::SendStream,
    pub(crate) conn: quinn::Connection,
}

impl AsyncWrite for QuicSend {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

impl LinkSend for QuicSend {
    async fn gone(&self) {
        self.conn.closed().await;
    }

    /// Finishes the stream, waits (bounded) for the peer to acknowledge it, and closes the
    /// connection with `code`.
    async fn finish(mut self, code: ErrorCode) {
        let _ = self.send.finish();
        let _ = tokio::time::timeout(LINGER, self.send.stopped()).await;
        let reason = if code == NORMAL { "closed".to_owned() } else { code.to_string() };
        self.conn.close(close_code(code), reason.as_bytes());
    }
}

impl LinkSend for tokio::net::unix::OwnedWriteHalf {
    async fn gone(&self) {
        // A Unix socket has no connection state apart from its stream: the reader sees the
        // peer go (end of stream or an error) and closes the link, which wakes the writer.
        std::future::pending::<()>().await;
    }

    /// Shuts the socket down for writing: the peer reads what was sent, then the end of the
    /// stream. (What the kernel holds for the peer outlives our end of the socket, so there
    /// is nothing to wait for.)
    async fn finish(mut self, _code: ErrorCode) {
        let _ = self.shutdown().await;
    }
}

/// A listener whose connections become stream links (TLS over TCP, Unix sockets).
pub(crate) trait Listener: Send + 'static {
    /// One accepted connection.
    type Stream: Send + 'static;
    /// What the log calls it ("TCP", "Unix").
    const KIND: &'static str;
    /// The next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = (tokio::net::TcpStream, std::net::SocketAddr);
    const KIND: &'static str = "TCP";
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    const KIND: &'static str = "Unix";
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Accepts connections on `listener` until the task is aborted, serving each with `serve`
/// as a downstream link; `open` counts the links being served.
///
/// The links' tasks belong to this one: aborting it (the relay stopping, after its grace
/// period) aborts them, so no link outlives the relay.
pub(crate) async fn accept_links<L, F, Fut>(listener: L, open: Arc<std::sync::atomic::AtomicUsize>, serve: F)
where
    L: Listener,
    F: Fn(L::Stream) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use std::sync::atomic::Ordering;
    let mut links = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = links.join_next(), if !links.is_empty() => continue,
        };
        match accepted {
            Ok(stream) => {
                let (open, link) = (open.clone(), serve(stream));
                open.fetch_add(1, Ordering::Relaxed);
                links.spawn(async move {
                    if let Err(err) = link.await {
                        tracing::debug!("{} link ended: {err:#}", L::KIND);
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(err) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(%err, "accepting on the {} listener failed", L::KIND);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a link reader needs to route its batches itself ([`Turns`]).
pub(crate) struct Inline {
    pub(crate) turns: Arc<dyn Turns>,
    /// Notified when a writer takes frames the node waits to hand it.
    pub(crate) room: Arc<Notify>,
}

/// Whether a link's large batches are routed on its reader's thread: yes while each frame
/// routed there comes to at most [`Fanout::NARROW`] frames handed to writers (a publish
/// answered by an ack and delivered once, say). Wider fan-out goes to the node's thread:
/// there its routing overlaps the reading, and the publisher's acks queue behind the
/// deliveries, so a publisher does not run far ahead of its subscribers (measured: 1→10
/// routed on the reader moved 10% fewer chunks, with a delivery p50 of 50–200 ms against
/// 5 ms; docs/performance.md). Every [`Fanout::PROBE`]th large batch of a wide link is
/// routed here again, to notice a fan-out that narrowed.
#[derive(Debug, Default)]
struct Fanout {
    wide: bool,
    /// Large batches sent to the node's thread since the last probe.
    skipped: u32,
}

impl Fanout {
    const NARROW: usize = 2;
    const PROBE: u32 = 64;

    /// Whether the next large batch is routed on the reader's thread.
    fn routes_here(&mut self) -> bool {
        if !self.wide {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= Self::PROBE {
            self.skipped = 0;
            return true;
        }
        false
    }

    /// A large batch of `frames` was routed here and handed `handed` frames to writers.
    fn routed(&mut self, frames: usize, handed: usize) {
        self.wide = handed > frames * Self::NARROW;
    }
}

/// The largest buffer a link keeps between batches; larger ones are freed after a small batch.
const BUF_KEEP: usize = 16 * 1024;

/// How much room a link reader makes for its next read, in the decoder's own buffer (which
/// it reads into directly, so no byte is copied from a read buffer into the decoder): it
/// starts small, doubles (up to 64 KiB) while reads fill it, and halves after a run of reads
/// that use a quarter of it or less. Most links are idle most of the time, and 64 KiB each,
/// zeroed and so resident at once, was a third of a busy relay's memory (1,000 links: 64 MB).
struct ReadSize {
    size: usize,
    small_reads: u8,
}

impl ReadSize {
    const MIN: usize = 4 * 1024;
    const MAX: usize = 64 * 1024;
    /// Small reads in a row before the size halves.
    const SHRINK_AFTER: u8 = 16;

    fn new() -> Self {
        ReadSize { size: Self::MIN, small_reads: 0 }
    }

    fn get(&self) -> usize {
        self.size
    }

    /// Adapts the size to a read of `n` bytes (more than the size when the buffer had more
    /// room).
    fn filled(&mut self, n: usize) {
        let len = self.size;
        if n >= len && len < Self::MAX {
            self.size = len * 2;
            self.small_reads = 0;
        } else if n <= len / 4 && len > Self::MIN {
            self.small_reads += 1;
            if self.small_reads >= Self::SHRINK_AFTER {
                self.size = len / 2;
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }
}

/// Encodes and writes frames from `out` until the link closes; then ends the link with
/// [`LinkSend::finish`].
pub(crate) async fn writer<W: LinkSend>(send: W, out: Arc<LinkOut>, room: Arc<Notify>) {
    /// However the writer ends (or is dropped), what it was to wake is woken.
    struct Ended<'a>(&'a LinkOut);
    impl Drop for Ended<'_> {
        fn drop(&mut self) {
            self.0.writer_ended();
        }
    }
    let _ended = Ended(&out);
    write_frames(send, &out, &room).await;
}

async fn write_frames<W: LinkSend>(mut send: W, out: &LinkOut, room: &Notify) {
    // Grown by the batches it encodes and given back after a small one: a thousand idle
    // links should not each hold the buffer of their busiest moment.
    let mut buf = Vec::new();
    let code = loop {
        let Taken { frames: batch, closing, node_waiting, then_wake } = out.take();
        // Writers a turn left to this one run next on this thread, after this write (or at
        // once, if there is nothing to write: they must never be dropped).
        then_wake.iter().for_each(|next| next.wake());
        if batch.is_empty() {
            if let Some(code) = closing {
                break code;
            }
            tokio::select! {
                () = out.wake.notified() => continue,
                () = send.gone() => return,
            }
        }
        buf.clear();
        for frame in &batch {
            if let Err(err) = wire::encode(frame, &mut buf) {
                tracing::error!(%err, ?frame, "a frame could not be encoded; dropped");
            }
        }
        // The node may drain more into the buffer now (if it has more for this link), and
        // the reader read more.
        if node_waiting {
            room.notify_one();
        }
        out.drained.notify_one();
        // The flush matters for TLS over TCP: a write the socket had no room for leaves TLS
        // records behind in the TLS stream, and nothing but a flush (or the next write) sends
        // them.
        if send.write_all(&buf).await.is_err() || send.flush().await.is_err() {
            return;
        }
        if buf.capacity() > BUF_KEEP && buf.len() < buf.capacity() / 4 {
            buf = Vec::new();
        }
    };
    send.finish(code).await;
}

/// Reads the byte stream of `link` (a QUIC control stream or a Unix socket), handing whole frames to the node, until the stream
/// ends, fails or carries bytes that do not decode (answered with an `Error` and a close).
/// With `pause_when_full` (downstream links), it stops reading while the link's writer buffer
/// is full, so a peer that does not read is not read either. A publish whose chunk is over the
/// size limit in an otherwise intact frame is answered here with
/// `Error{ChunkTooLarge, about: seq}`, and reading goes on.
pub(crate) async fn reader<R: AsyncRead + Unpin>(
    mut recv: R,
    link: LinkId,
    to_node: mpsc::Sender<ToNode>,
    inline: Option<Inline>,
    out: Arc<LinkOut>,
    mut stop: watch::Receiver<Stop>,
    pause_when_full: bool,
) {
    let mut decoder = FrameDecoder::new();
    let mut size = ReadSize::new();
    let mut fanout = Fanout::default();
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
            read = AsyncReadExt::read_buf(&mut recv, decoder.buffer_for(size.get())) => read,
        };
        match read {
            Ok(n) if n > 0 => {
                size.filled(n);
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
                // The batch is routed right here when the node is free (see `Turns`),
                // unless it is large and this link's chunks fan out wide; the rest goes to
                // the node's thread.
                let small = frames.len() <= INLINE_FRAMES;
                let here = small || fanout.routes_here();
                let frames = match &inline {
                    Some(Inline { turns, room }) if !frames.is_empty() && here => {
                        let count = frames.len();
                        match turns.try_turn(link, &out, frames) {
                            Ok(Turn { congested, handed }) => {
                                if !small {
                                    fanout.routed(count, handed);
                                }
                                if congested {
                                    // As the node's thread does after such a turn: read no
                                    // more while the writers drain, then pass the last
                                    // wake-up on to the node, which may be waiting for it too.
                                    crate::actor::wait_out_congestion(room, |give_up| turns.relieve(give_up)).await;
                                    room.notify_one();
                                }
                                Vec::new()
                            }
                            Err(frames) => frames,
                        }
                    }
                    _ => frames,
                };
                if !frames.is_empty() {
                    out.sent_to_inbox();
                    if to_node.send(ToNode::Frames { link, frames }).await.is_err() {
                        // The node is gone (the relay is being killed) and will never close
                        // the writer: close it here, so it ends.
                        out.close(Vec::new(), NORMAL);
                        return;
                    }
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
            Ok(_) => {
                out.close(Vec::new(), NORMAL);
                return;
            }
            Err(err) => {
                tracing::debug!(link, %err, "link stream ended");
                out.close(Vec::new(), NORMAL);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use canopy::wire::Frame;
    use tokio::sync::Notify;

    use super::{Fanout, LinkOut, Outlet, ReadSize, WRITER_CAPACITY};
    use std::sync::Arc;

    /// Whether `room` holds a wake-up (a `notify_one` with nobody waiting).
    fn woken(room: &Notify) -> bool {
        let waiter = pin!(room.notified());
        let waker = std::task::Waker::noop();
        waiter.poll(&mut std::task::Context::from_waker(waker)).is_ready()
    }

    #[test]
    fn the_writer_wakes_the_node_only_when_the_node_waits_for_room() {
        let out = LinkOut::new();
        let room = Notify::new();
        let ack = |seq| Frame::Ack { seq };
        // Frames the buffer had room for: taking them wakes no one.
        out.push(vec![ack(1), ack(2)]);
        let taken = out.take();
        assert_eq!((taken.frames.len(), taken.closing, taken.node_waiting), (2, None, false));
        assert!(!woken(&room));

        // The node has more than the buffer takes: it waits, and the writer's next take
        // wakes it, once.
        out.push((0..WRITER_CAPACITY as u64).map(ack).collect());
        assert_eq!(out.room(), 0);
        out.wait_for_room(&room);
        assert!(!woken(&room), "no room yet");
        let taken = out.take();
        assert_eq!((taken.frames.len(), taken.node_waiting), (WRITER_CAPACITY, true));
        out.push(vec![ack(9)]);
        assert!(!out.take().node_waiting, "woken once per wait");

        // The writer took frames between the node's look at the room and its wait: the wait
        // wakes at once rather than never.
        out.push(vec![ack(10)]);
        out.wait_for_room(&room);
        assert!(woken(&room));
        assert!(!out.take().node_waiting);
    }

    #[tokio::test]
    async fn a_writer_with_nothing_to_write_still_wakes_the_writers_left_to_it() {
        let (socket, _peer) = tokio::net::UnixStream::pair().unwrap();
        let (_read, write) = socket.into_split();
        let (out, next) = (LinkOut::new(), LinkOut::new());
        let task = tokio::spawn(super::writer(write, out.clone(), Arc::new(Notify::new())));
        // Once the writer waits for frames, a turn leaves `next` to it, and then the frames
        // meant for it are gone before it looks (taken by a run it was already making).
        let mut tries = 0;
        while out.wake_then(vec![next.clone() as Arc<dyn Outlet>]).is_err() {
            tries += 1;
            assert!(tries < 100_000, "the writer never waited for frames");
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), next.wake.notified())
            .await
            .expect("the writer found nothing to write and woke `next` all the same");
        out.close(Vec::new(), super::NORMAL);
        task.await.unwrap();
    }

    #[test]
    fn large_batches_of_a_link_whose_chunks_fan_out_wide_go_to_the_node_thread_but_for_a_probe() {
        let mut fanout = Fanout::default();
        assert!(fanout.routes_here(), "narrow until shown otherwise");
        fanout.routed(100, 200);
        assert!(fanout.routes_here(), "an ack and one delivery per publish is narrow");
        fanout.routed(100, 1100);
        let here = (0..Fanout::PROBE * 2).filter(|_| fanout.routes_here()).count();
        assert_eq!(here, 2, "ten deliveries per publish: one probe per {} batches", Fanout::PROBE);
        fanout.routed(100, 150);
        assert!((0..10).all(|_| fanout.routes_here()), "a probe that finds it narrow again");
    }

    #[test]
    fn a_writer_that_waits_for_frames_takes_the_writers_to_wake_after_it_with_them() {
        let first = LinkOut::new();
        let (a, b) = (LinkOut::new(), LinkOut::new());
        let next = || vec![a.clone() as Arc<dyn Outlet>, b.clone() as Arc<dyn Outlet>];
        let handed_back = |r: Result<(), Vec<Arc<dyn Outlet>>>| r.err().map(|n| n.len());
        // A writer that has not looked for frames yet may not run soon: nothing is left to it.
        assert_eq!(handed_back(first.wake_then(next())), Some(2));
        assert!(!woken(&first.wake));

        // It found none and waits: it is woken, and takes the others with its frames.
        assert!(first.take().frames.is_empty());
        assert!(Outlet::queue(&*first, vec![Frame::Ack { seq: 1 }]));
        assert_eq!(handed_back(first.wake_then(next())), None);
        assert!(woken(&first.wake));
        let taken = first.take();
        assert_eq!((taken.frames.len(), taken.then_wake.len()), (1, 2));
        assert!(!woken(&a.wake) && !woken(&b.wake), "the writer wakes them, once it has its frames");

        // Busy with what it took: nothing is left to it.
        assert_eq!(handed_back(first.wake_then(next())), Some(2));

        // Idle again, then it ends before it takes them: ending wakes them, and it takes no more.
        assert!(first.take().frames.is_empty());
        assert_eq!(handed_back(first.wake_then(next())), None);
        first.writer_ended();
        assert!(woken(&a.wake) && woken(&b.wake));
        assert_eq!(handed_back(first.wake_then(next())), Some(2), "an ended writer takes no more");

        // A closing writer that found its last frames sent goes on to end the link (which may
        // take seconds): nothing is left to it.
        let closing = LinkOut::new();
        closing.close(Vec::new(), super::NORMAL);
        assert!(closing.take().frames.is_empty());
        assert_eq!(handed_back(closing.wake_then(next())), Some(2));
    }

    #[test]
    fn read_size_grows_while_reads_fill_it_and_shrinks_when_they_stop() {
        let mut buf = ReadSize::new();
        assert_eq!(buf.get(), ReadSize::MIN);
        // A burst: every read fills the buffer, which doubles up to its maximum and no further.
        for _ in 0..10 {
            let n = buf.get();
            buf.filled(n);
        }
        assert_eq!(buf.get(), ReadSize::MAX);
        // Reads of a third of it are not small: the size holds.
        for _ in 0..100 {
            buf.filled(ReadSize::MAX / 3);
        }
        assert_eq!(buf.get(), ReadSize::MAX);
        // Small reads, but fewer than the run that shrinks it, then a larger one: it holds.
        for _ in 0..ReadSize::SHRINK_AFTER - 1 {
            buf.filled(100);
        }
        buf.filled(ReadSize::MAX / 2);
        assert_eq!(buf.get(), ReadSize::MAX);
        // A long idle stretch of small reads brings it back to its minimum, and no lower.
        for _ in 0..1000 {
            buf.filled(100);
        }
        assert_eq!(buf.get(), ReadSize::MIN);
    }
}
