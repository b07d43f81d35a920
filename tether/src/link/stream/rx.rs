//! The receiving half of a stream link: the frame decoder.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::StreamConfig;
use crate::link::{LinkError, LinkRx};

/// Size of the length prefix.
const HEAD_LEN: usize = 4;

/// The most free space offered to one read beyond the current frame, so
/// that many small frames can arrive in one system call. A large frame's
/// buffer grows beyond it by doubling, with the bytes that arrive.
const READ_CHUNK: usize = 32 * 1024;

/// The free space offered to the first read. It doubles, up to
/// [`READ_CHUNK`], each time a read fills what was offered: a busy link
/// soon reads in full chunks, and a quiet one (most of an idle server's
/// sessions) holds a small buffer.
const FIRST_READ_CHUNK: usize = 512;

/// Where the decoder is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// Waiting for the 4-byte length prefix.
    Head,
    /// The prefix was consumed; waiting for this many payload bytes.
    Data(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// A clean end of stream was seen; `recv` keeps returning `Ok(None)`.
    Eof,
    Dead,
}

/// The receiving half of a [`StreamLink`](super::StreamLink).
#[derive(Debug)]
pub struct StreamRx<R> {
    reader: R,
    /// Bytes read but not yet handed out; its front is the current frame
    /// (after the prefix once in [`Decode::Data`]).
    buf: BytesMut,
    decode: Decode,
    state: State,
    /// The largest payload accepted now: `configured_max`, or less after
    /// [`LinkRx::set_max_payload`].
    max_payload: usize,
    /// [`StreamConfig::max_payload`], capped at `u32::MAX`.
    configured_max: usize,
    /// Free space offered to the next read (see [`FIRST_READ_CHUNK`]).
    read_chunk: usize,
}

impl<R> StreamRx<R>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    pub(super) fn new(reader: R, config: &StreamConfig) -> Self {
        StreamRx {
            reader,
            buf: BytesMut::new(),
            decode: Decode::Head,
            state: State::Open,
            max_payload: config.effective_max(),
            configured_max: config.effective_max(),
            read_chunk: FIRST_READ_CHUNK,
        }
    }

    /// Capacity of the read buffer, in bytes: how much memory this half
    /// holds for data not handed out yet. For diagnostics and tests.
    pub fn read_buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Records the first error and returns it; later calls see `Dead`.
    fn fail<T>(&mut self, err: LinkError) -> Result<T, LinkError> {
        tracing::debug!(error = %err, "stream link receive failed");
        self.state = State::Dead;
        Err(err)
    }

    /// Advances the decoder over what is buffered. `Ok(Some)` is a whole
    /// payload, `Ok(None)` means more bytes are needed.
    fn decode(&mut self) -> Result<Option<Bytes>, LinkError> {
        loop {
            match self.decode {
                Decode::Head => {
                    if self.buf.len() < HEAD_LEN {
                        return Ok(None);
                    }
                    let len = self.buf.get_u32_le() as usize;
                    // Checked before anything is reserved for the payload.
                    if len > self.max_payload {
                        return Err(LinkError::TooLarge {
                            len,
                            max: self.max_payload,
                        });
                    }
                    self.decode = Decode::Data(len);
                }
                Decode::Data(len) => {
                    // The limit may have been lowered after the prefix
                    // passed it.
                    if len > self.max_payload {
                        return Err(LinkError::TooLarge {
                            len,
                            max: self.max_payload,
                        });
                    }
                    if self.buf.len() < len {
                        return Ok(None);
                    }
                    self.decode = Decode::Head;
                    // Zero copy: the payload is a view of the read buffer.
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
            }
        }
    }

    /// How many more bytes the current frame part needs.
    fn missing(&self) -> usize {
        match self.decode {
            Decode::Head => HEAD_LEN - self.buf.len(),
            Decode::Data(len) => len - self.buf.len(),
        }
    }

    /// Makes room for the next read. While at least a read chunk is free,
    /// nothing changes: reads that big already amortise the system call,
    /// and small frames arrive many at a time. Below that, the buffer grows
    /// by what the current frame still needs, but by at least a read chunk
    /// and at most what the frame already holds: memory follows the bytes
    /// that arrived (an announced length costs nothing until its bytes
    /// come, and the buffer stays under about twice what arrived plus two
    /// read chunks), while a large payload needs only about
    /// log2(len / READ_CHUNK) reallocations.
    ///
    /// Between frames (and for a small rest of a frame) a much smaller free
    /// space is enough: the buffer's remaining capacity is used up before
    /// a new one is taken. Received payloads are views into the buffer, so
    /// a buffer replaced while it still had room would stay alive, mostly
    /// empty, as long as one small payload from it is queued: a peer
    /// sending one tiny message per segment would make every queued
    /// message hold a whole read chunk.
    fn make_room(&mut self) {
        let spare = self.buf.capacity() - self.buf.len();
        let enough = self.missing().max(FIRST_READ_CHUNK).min(self.read_chunk);
        if spare >= enough {
            return;
        }
        let grow = self.read_chunk.max(self.buf.len());
        self.buf
            .reserve(self.missing().clamp(self.read_chunk, grow));
    }

    /// The error for end-of-file in the middle of the current frame part,
    /// or `None` at a frame boundary.
    fn truncation(&self) -> Option<LinkError> {
        match self.decode {
            Decode::Head if self.buf.is_empty() => None,
            Decode::Head => Some(LinkError::Truncated {
                expected: HEAD_LEN,
                got: self.buf.len(),
            }),
            Decode::Data(len) => Some(LinkError::Truncated {
                expected: len,
                got: self.buf.len(),
            }),
        }
    }

    async fn recv_inner(&mut self) -> Result<Option<Bytes>, LinkError> {
        loop {
            match self.decode() {
                Ok(Some(payload)) => return Ok(Some(payload)),
                Ok(None) => {}
                Err(err) => return self.fail(err),
            }
            self.make_room();
            // The only await point. `read_buf` is cancel-safe: dropped
            // before completion, it read nothing.
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return match self.truncation() {
                        None => {
                            self.state = State::Eof;
                            self.buf = BytesMut::new();
                            Ok(None)
                        }
                        Some(err) => self.fail(err),
                    };
                }
                Ok(n) => {
                    if n >= self.read_chunk {
                        self.read_chunk = (self.read_chunk * 2).min(READ_CHUNK);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return self.fail(err.into()),
            }
        }
    }
}

impl<R> LinkRx for StreamRx<R>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        match self.state {
            State::Dead => Err(LinkError::Dead),
            State::Eof => Ok(None),
            State::Open => self.recv_inner().await,
        }
    }

    fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max.min(self.configured_max);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::link::stream::StreamLink;
    use crate::link::{Link, LinkTx};

    /// Polls `recv` for a moment and gives up: a stalled frame stays
    /// buffered (recv is cancel-safe).
    async fn recv_briefly<R>(rx: &mut StreamRx<R>) -> Option<Result<Option<Bytes>, LinkError>>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        tokio::time::timeout(Duration::from_millis(50), rx.recv())
            .await
            .ok()
    }

    #[tokio::test]
    async fn an_announced_length_reserves_nothing_until_its_bytes_arrive() {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(ours);
        let (_tx, mut rx) = StreamLink::from_halves(r, w, StreamConfig::default()).split();
        let len: u32 = 8 * 1024 * 1024;
        peer.write_all(&len.to_le_bytes()).await.unwrap();
        peer.write_all(&[7; 10]).await.unwrap();
        assert!(recv_briefly(&mut rx).await.is_none());
        let small = rx.read_buffer_capacity();
        assert!(
            small < 256 * 1024,
            "8 MiB announced, 10 bytes sent: {small}"
        );

        // The buffer grows with what arrives, at most about twice that.
        let chunk = vec![7; 64 * 1024];
        for _ in 0..16 {
            peer.write_all(&chunk).await.unwrap();
            assert!(recv_briefly(&mut rx).await.is_none());
        }
        let arrived = 10 + 16 * chunk.len();
        let grown = rx.read_buffer_capacity();
        assert!(
            grown <= 2 * arrived + 2 * READ_CHUNK,
            "{arrived} bytes arrived, {grown} reserved"
        );

        // And the payload still arrives whole, in one view.
        let rest = len as usize - arrived;
        let writer = tokio::spawn(async move {
            peer.write_all(&vec![7; rest]).await.unwrap();
            peer
        });
        let payload = rx.recv().await.unwrap().unwrap();
        assert_eq!(payload.len(), len as usize);
        assert!(payload.iter().all(|&b| b == 7));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_large_payload_needs_few_reallocations() {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let (r, w) = tokio::io::split(ours);
        let (_tx, mut rx) = StreamLink::from_halves(r, w, StreamConfig::default()).split();
        let (r, w) = tokio::io::split(theirs);
        let (mut peer_tx, _peer_rx) =
            StreamLink::from_halves(r, w, StreamConfig::default()).split();
        let payload = Bytes::from(vec![3; 1024 * 1024]);
        let sender = tokio::spawn(async move {
            for _ in 0..4 {
                peer_tx.send(payload.clone()).await.unwrap();
            }
            peer_tx
        });
        let mut growths = 0;
        let mut got = 0;
        while got < 4 {
            let before = rx.buf.as_ptr();
            rx.make_room();
            if rx.buf.as_ptr() != before {
                growths += 1;
            }
            let n = rx.reader.read_buf(&mut rx.buf).await.unwrap();
            assert!(n > 0);
            while let Some(p) = rx.decode().unwrap() {
                assert_eq!(p.len(), 1024 * 1024);
                got += 1;
            }
        }
        drop(sender.await.unwrap());
        // At most log2(1 MiB / 32 KiB) + 1 per payload (fewer once the
        // buffer is reused).
        assert!(growths <= 4 * 6, "{growths} reallocations for 4 MiB");
    }

    #[tokio::test]
    async fn a_lowered_limit_refuses_a_longer_prefix_at_once() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (_tx, mut rx) = StreamLink::from_halves(r, w, StreamConfig::default()).split();
        rx.set_max_payload(100);
        peer.write_all(&101u32.to_le_bytes()).await.unwrap();
        match rx.recv().await {
            Err(LinkError::TooLarge { len: 101, max: 100 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(rx.read_buffer_capacity() <= FIRST_READ_CHUNK);
        assert!(matches!(rx.recv().await, Err(LinkError::Dead)));
    }

    #[tokio::test]
    async fn the_limit_never_rises_above_the_configured_maximum() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let config = StreamConfig {
            max_payload: 50,
            ..StreamConfig::default()
        };
        let (_tx, mut rx) = StreamLink::from_halves(r, w, config).split();
        rx.set_max_payload(10);
        rx.set_max_payload(usize::MAX);
        peer.write_all(&50u32.to_le_bytes()).await.unwrap();
        peer.write_all(&[1; 50]).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap().len(), 50);
        peer.write_all(&51u32.to_le_bytes()).await.unwrap();
        assert!(matches!(
            rx.recv().await,
            Err(LinkError::TooLarge { len: 51, max: 50 })
        ));
    }

    #[tokio::test]
    async fn a_limit_lowered_mid_frame_still_applies() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (_tx, mut rx) = StreamLink::from_halves(r, w, StreamConfig::default()).split();
        peer.write_all(&200u32.to_le_bytes()).await.unwrap();
        peer.write_all(&[1; 20]).await.unwrap();
        assert!(recv_briefly(&mut rx).await.is_none());
        rx.set_max_payload(100);
        assert!(matches!(
            rx.recv().await,
            Err(LinkError::TooLarge { len: 200, max: 100 })
        ));
    }
}
