//! The sending half of a stream link: framing, batching, backpressure.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite;

use super::StreamConfig;
use crate::link::{LinkError, LinkTx, PeerInfo};

/// Size of the length prefix.
const HEAD_LEN: usize = 4;

/// Payloads up to this size are copied into the coalescing buffer; larger
/// ones are queued by reference. A copy this small costs less than an extra
/// slice in a vectored write.
const COPY_THRESHOLD: usize = 4 * 1024;

/// The most the coalescing buffer grows by when it runs out of room.
const COALESCE_CHUNK: usize = 8 * 1024;

/// The first growth of the coalescing buffer; each later one doubles, up to
/// [`COALESCE_CHUNK`], so that a link that sends little holds little.
const FIRST_COALESCE_CHUNK: usize = 512;

/// Most slices handed to one vectored write (Linux accepts 1024; a few dozen
/// already amortise the system call).
const MAX_SLICES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// `close()` completed: the write side is shut down.
    Closed,
    Dead,
}

/// The sending half of a [`StreamLink`](super::StreamLink).
///
/// Queued bytes are, in order: the frozen `chunks`, then `coalesce`.
#[derive(Debug)]
pub struct StreamTx<W> {
    writer: W,
    /// Prefixes and small payloads not yet handed to `chunks`. Its
    /// allocation is reused once the chunks frozen from it are written and
    /// dropped (`BytesMut::reserve` reclaims a uniquely owned buffer).
    coalesce: BytesMut,
    /// Frozen pieces waiting to be written: coalesced runs, each ending
    /// with a large payload's prefix or at a flush, and large payloads
    /// themselves. The front may be partly written already (advanced).
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks` and `coalesce` together.
    queued: usize,
    max_payload: usize,
    write_buffer: usize,
    state: State,
    /// The next growth of `coalesce` (see [`FIRST_COALESCE_CHUNK`]).
    next_chunk: usize,
    /// The link's peer, kept here so that it survives the split; boxed
    /// (and absent when unknown) to keep the half small.
    peer: Option<Box<PeerInfo>>,
}

/// What [`StreamTx::peer`] returns for a link that knows nothing of its peer.
static UNKNOWN_PEER: PeerInfo = PeerInfo {
    addr: None,
    tls: None,
    http: None,
};

impl<W> StreamTx<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    pub(super) fn new(writer: W, config: &StreamConfig) -> Self {
        StreamTx {
            writer,
            coalesce: BytesMut::new(),
            chunks: VecDeque::new(),
            queued: 0,
            max_payload: config.effective_max(),
            write_buffer: config.write_buffer,
            state: State::Open,
            next_chunk: FIRST_COALESCE_CHUNK,
            peer: None,
        }
    }

    pub(super) fn set_peer(&mut self, peer: PeerInfo) {
        self.peer = (peer != UNKNOWN_PEER).then(|| Box::new(peer));
    }

    /// What the link's transport knew about the peer (as
    /// [`Link::peer`](crate::link::Link::peer) before the split).
    pub fn peer(&self) -> &PeerInfo {
        self.peer.as_deref().unwrap_or(&UNKNOWN_PEER)
    }

    /// Bytes queued (prefixes included) and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Records the first error and returns it; later calls see `Dead`.
    fn fail<T>(&mut self, err: LinkError) -> Result<T, LinkError> {
        tracing::debug!(error = %err, "stream link send failed");
        self.state = State::Dead;
        self.chunks.clear();
        self.coalesce = BytesMut::new();
        self.queued = 0;
        Err(err)
    }

    fn check_open(&mut self) -> Result<(), LinkError> {
        match self.state {
            State::Open => Ok(()),
            State::Closed => self.fail(LinkError::Closed),
            State::Dead => Err(LinkError::Dead),
        }
    }

    /// Makes room for `need` more bytes in the coalescing buffer.
    fn reserve_coalesce(&mut self, need: usize) {
        if self.coalesce.capacity() - self.coalesce.len() < need {
            self.coalesce.reserve(need.max(self.next_chunk));
            self.next_chunk = (self.next_chunk * 2).min(COALESCE_CHUNK);
        }
    }

    /// Appends a copy of one small frame (at most [`COPY_THRESHOLD`]
    /// bytes) to the coalescing buffer. Never waits.
    fn enqueue_copy(&mut self, payload: &[u8]) {
        debug_assert!(payload.len() <= COPY_THRESHOLD);
        self.reserve_coalesce(HEAD_LEN + payload.len());
        self.coalesce.put_u32_le(payload.len() as u32);
        self.coalesce.extend_from_slice(payload);
        self.queued += HEAD_LEN + payload.len();
    }

    /// Appends one frame to the queue. Never waits.
    fn enqueue(&mut self, payload: Bytes) {
        let len = payload.len();
        if len <= COPY_THRESHOLD {
            self.enqueue_copy(&payload);
            return;
        }
        self.reserve_coalesce(HEAD_LEN);
        // `len <= max_payload <= u32::MAX`, checked by `feed`.
        self.coalesce.put_u32_le(len as u32);
        // The run so far ends with this payload's prefix; the payload
        // itself follows by reference.
        self.chunks.push_back(self.coalesce.split().freeze());
        self.chunks.push_back(payload);
        self.queued += HEAD_LEN + len;
    }

    /// Writes queued bytes until at most `target` remain. All progress is
    /// recorded before returning, so dropping the caller loses nothing.
    fn poll_write_until(&mut self, cx: &mut Context<'_>, target: usize) -> Poll<io::Result<()>> {
        while self.queued > target {
            if !self.coalesce.is_empty() {
                self.chunks.push_back(self.coalesce.split().freeze());
            }
            if self.chunks.is_empty() {
                // Unreachable while `queued` is kept right; never spin.
                self.queued = 0;
                break;
            }
            let writer = Pin::new(&mut self.writer);
            let written = if self.chunks.len() > 1 && writer.is_write_vectored() {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(&self.chunks) {
                    *slot = IoSlice::new(chunk);
                    count += 1;
                }
                writer.poll_write_vectored(cx, &slices[..count])
            } else {
                writer.poll_write(cx, &self.chunks[0])
            };
            match ready!(written) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the stream accepted no more bytes",
                    )))
                }
                Ok(n) => self.consume(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drops `n` written bytes from the front of the queue.
    fn consume(&mut self, n: usize) {
        let mut n = n.min(self.queued);
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Writes everything queued, then flushes the writer.
    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_until(cx, 0))?;
        Pin::new(&mut self.writer).poll_flush(cx)
    }
}

impl<W> StreamTx<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Checks that a payload of `len` bytes may be fed, and waits while
    /// more than the write buffer is queued (backpressure). Dropped while
    /// waiting, nothing was queued, and what was written so far is
    /// accounted for.
    async fn ready_for(&mut self, len: usize) -> Result<(), LinkError> {
        self.check_open()?;
        if len > self.max_payload {
            let max = self.max_payload;
            return self.fail(LinkError::TooLarge { len, max });
        }
        if self.queued > self.write_buffer {
            let target = self.write_buffer;
            if let Err(err) = poll_fn(|cx| self.poll_write_until(cx, target)).await {
                return self.fail(err.into());
            }
        }
        Ok(())
    }
}

impl<W> LinkTx for StreamTx<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        self.ready_for(payload.len()).await?;
        self.enqueue(payload);
        Ok(())
    }

    fn copy_threshold(&self) -> usize {
        COPY_THRESHOLD
    }

    async fn feed_copy(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        self.ready_for(payload.len()).await?;
        if payload.len() <= COPY_THRESHOLD {
            self.enqueue_copy(payload);
        } else {
            self.enqueue(Bytes::copy_from_slice(payload));
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        self.check_open()?;
        match poll_fn(|cx| self.poll_flush_all(cx)).await {
            Ok(()) => Ok(()),
            Err(err) => self.fail(err.into()),
        }
    }

    async fn close(&mut self) -> Result<(), LinkError> {
        match self.state {
            State::Dead => return Err(LinkError::Dead),
            State::Closed => return Ok(()),
            State::Open => {}
        }
        let done = poll_fn(|cx| {
            ready!(self.poll_flush_all(cx))?;
            Pin::new(&mut self.writer).poll_shutdown(cx)
        })
        .await;
        match done {
            Ok(()) => {
                self.state = State::Closed;
                Ok(())
            }
            Err(err) => self.fail(err.into()),
        }
    }
}
