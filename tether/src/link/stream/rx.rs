//! The receiving half of a stream link: the frame decoder.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::StreamConfig;
use crate::link::{LinkError, LinkRx};

/// Size of the length prefix.
const HEAD_LEN: usize = 4;

/// The most free space offered to one read beyond the current frame, so
/// that many small frames can arrive in one system call. Large frames
/// reserve exactly what they need.
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
    max_payload: usize,
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
            // `missing` is small for a prefix and exact for a payload whose
            // length already passed the maximum check.
            self.buf.reserve(self.missing().max(self.read_chunk));
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
}
