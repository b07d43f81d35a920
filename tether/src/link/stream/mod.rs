//! Links over byte streams: TCP, Unix sockets, or any
//! `AsyncRead` + `AsyncWrite`.
//!
//! Each payload is framed as `[len: u32 little-endian][payload]` (see the
//! [module documentation](super#framing-on-byte-streams)).
//!
//! # Receiving
//!
//! [`StreamRx`] is an explicit two-state decoder (reading the 4-byte head,
//! reading `n` payload bytes) over one read buffer. An announced length is
//! checked against [`StreamConfig::max_payload`] (or the lower limit set
//! with [`set_max_payload`](super::LinkRx::set_max_payload)) *before*
//! anything is reserved, so a hostile prefix such as `ff ff ff ff` costs no
//! allocation. Nor does a length under the maximum reserve its payload up
//! front: the buffer grows with the bytes that arrive, each growth at most
//! doubling what the frame already holds (starting from a read chunk), so
//! a peer that announces 8 MiB and then stalls costs a read chunk, not
//! 8 MiB, while a 1 MiB payload still arrives with a handful of
//! reallocations. Each payload is handed out as a zero-copy
//! [`Bytes`](bytes::Bytes) view of the buffer.
//!
//! # Sending
//!
//! [`StreamTx`] batches: small payloads (up to 4 KiB) are copied, with their
//! prefix, into one coalescing buffer; larger payloads are not copied but
//! queued by reference after their prefix. A flush hands the whole queue to
//! the writer in as few calls as possible: one `poll_write_vectored` (up to
//! 64 slices) when the writer supports vectored writes, otherwise one
//! `poll_write` per chunk. Many small payloads fed back to back therefore go
//! out in one system call. `feed` applies backpressure: while more than
//! [`StreamConfig::write_buffer`] bytes are queued, it first writes some
//! out.
//!
//! # Cancel safety
//!
//! All decoding and writing progress lives in the halves themselves, and
//! every await point is a single cancel-safe read or write poll, so any
//! future of [`LinkTx`](super::LinkTx) or [`LinkRx`](super::LinkRx) may be
//! dropped at any point: a partly written queue resumes where it stopped,
//! a partly read frame stays buffered.
//!
//! # Dropping without closing
//!
//! Unlike the in-memory link, what the peer sees when a stream half is
//! dropped without [`close`](super::LinkTx::close) depends on the transport:
//! dropping the write half of a TCP or Unix stream (or the whole socket)
//! usually shuts it down, which the peer reads as a clean end of stream.
//! Anything queued but not flushed is lost. Conduits must not take
//! `Ok(None)` alone as proof that the peer finished its session.

mod net;
mod rx;
mod tx;

// `connect_any`: for every connector that dials a host name (TLS uses it
// through `Target`; the WebSocket connector will directly).
#[allow(unused_imports)]
pub(crate) use net::{connect_any, split_host_port, Target};
pub use net::{TcpConnector, TcpLink, TcpListener, TcpPending, DEFAULT_BACKLOG};
#[cfg(unix)]
pub use net::{UnixConnector, UnixLink, UnixListener, UnixPending};
pub use rx::StreamRx;
pub use tx::StreamTx;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

use super::{Link, PeerInfo, DEFAULT_MAX_PAYLOAD};

/// Settings of a stream link.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Largest payload sent or accepted, in bytes. Default
    /// [`DEFAULT_MAX_PAYLOAD`] (8 MiB). Values above `u32::MAX` act as
    /// `u32::MAX`, the largest length the prefix can carry.
    ///
    /// A received prefix over this is an error before any memory is
    /// reserved; a larger value lets a peer make this side buffer that much.
    pub max_payload: usize,
    /// Backpressure high-water mark, in queued bytes. Default 64 KiB.
    ///
    /// `feed` writes queued data out first while more than this is queued.
    /// Larger values batch more per system call at the cost of memory per
    /// link; smaller values bound latency and memory.
    pub write_buffer: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_payload: DEFAULT_MAX_PAYLOAD,
            write_buffer: 64 * 1024,
        }
    }
}

impl StreamConfig {
    /// The maximum actually enforced: `max_payload`, capped at `u32::MAX`.
    fn effective_max(&self) -> usize {
        self.max_payload.min(u32::MAX as usize)
    }
}

/// A link over a byte stream, from its read half `R` and write half `W`.
#[derive(Debug)]
pub struct StreamLink<R, W> {
    rx: StreamRx<R>,
    tx: StreamTx<W>,
}

impl<R, W> StreamLink<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// A link reading frames from `reader` and writing frames to `writer`.
    /// It knows nothing about its peer (see [`with_peer`](Self::with_peer)).
    pub fn from_halves(reader: R, writer: W, config: StreamConfig) -> Self {
        StreamLink {
            rx: StreamRx::new(reader, &config),
            tx: StreamTx::new(writer, &config),
        }
    }

    /// The same link, reporting `peer` from [`Link::peer`] and
    /// [`StreamTx::peer`]: for links over transports this crate does not
    /// wrap itself (a TLS stream over TCP, say), whose constructor knows
    /// the peer.
    pub fn with_peer(mut self, peer: PeerInfo) -> Self {
        self.tx.set_peer(peer);
        self
    }
}

impl<T> StreamLink<ReadHalf<T>, WriteHalf<T>>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    /// A link over any bidirectional stream, split with
    /// [`tokio::io::split`] (the halves share a lock; prefer
    /// [`StreamLink::tcp`] or [`StreamLink::unix`] for sockets).
    pub fn new(io: T, config: StreamConfig) -> Self {
        let (reader, writer) = tokio::io::split(io);
        StreamLink::from_halves(reader, writer, config)
    }
}

impl<R, W> Link for StreamLink<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Tx = StreamTx<W>;
    type Rx = StreamRx<R>;

    fn split(self) -> (StreamTx<W>, StreamRx<R>) {
        (self.tx, self.rx)
    }

    fn peer(&self) -> PeerInfo {
        self.tx.peer().clone()
    }
}
