//! Links: the message-oriented byte transports underneath conduits.
//!
//! A *link* carries whole payloads between two peers: one [`LinkTx::feed`]
//! (or [`LinkTx::send`]) on one side is exactly one [`LinkRx::recv`] on the
//! other, in order, with its boundaries kept. Empty payloads are payloads
//! like any other. A link is reliable and ordered while it lives, but it can
//! die at any moment; the stable conduit above survives that by replaying
//! over a fresh link from a [`Connector`] or [`Listener`].
//!
//! Every link splits into a sending half ([`LinkTx`]) and a receiving half
//! ([`LinkRx`]) so that the two directions can be driven from different
//! tasks without a lock. Before it is split, [`Link::peer`] tells who is on
//! the other end as far as the transport knows ([`PeerInfo`]: the remote
//! address of a TCP link, and what the handshake verified for a TLS link;
//! nothing for in-memory or Unix links).
//!
//! # Accepting in two phases
//!
//! A [`Listener`] hands out connections in two steps:
//!
//! 1. [`Listener::accept`] returns the next connection as a [`PendingLink`]
//!    as soon as the transport has one (TCP: the `accept` system call). It
//!    does no per-connection work and never waits on one peer, so an accept
//!    loop can keep taking connections however slow any of them is.
//! 2. [`PendingLink::establish`] does whatever the connection needs before
//!    it carries payloads: wrapping the socket, and in listeners built on
//!    top of these, a TLS handshake, a proxy preamble, a WebSocket
//!    upgrade. That work waits on the peer, so it must run concurrently,
//!    one task per connection, under a deadline: a server that ran it
//!    inside its accept loop would let one peer that connects and then
//!    stays silent hold up every connection behind it.
//!
//! [`PendingLink::addr`] is known between the two steps, so a server can
//! count and refuse connections per source before spending anything on
//! their setup. Listeners whose links need no setup hand out [`Ready`].
//!
//! # Transports
//!
//! - [`mem`]: an in-memory pair over two bounded channels, with a
//!   [`MemKiller`](mem::MemKiller) that simulates an abrupt failure and a
//!   [`MemConnector`](mem::MemConnector)/[`MemListener`](mem::MemListener)
//!   pair for reconnect tests.
//! - [`stream`]: any byte stream (`AsyncRead` + `AsyncWrite`), with TCP and
//!   Unix-socket connectors and listeners. TCP connectors take a fixed
//!   address or a host name, resolved again on every connect.
//! - [`tls`]: TLS over TCP (rustls): [`TlsConnector`] and
//!   [`TlsListener`], the same framing inside TLS, and
//!   what the handshake verified about the peer in [`PeerInfo::tls`].
//! - [`ws`]: WebSocket (`ws://`, `wss://`): [`WsConnector`] and
//!   [`WsListener`], one binary message per payload, the upgrade request
//!   in [`PeerInfo::http`].
//!
//! # Framing on byte streams
//!
//! A stream link frames each payload as
//!
//! ```text
//! +----------------------+------------------+
//! | len: u32 little-end. | len payload bytes |
//! +----------------------+------------------+
//! ```
//!
//! with no padding and nothing between frames. A peer announcing a length
//! over the configured maximum ([`stream::StreamConfig::max_payload`],
//! 8 MiB by default, lowered per link with [`LinkRx::set_max_payload`]) is
//! rejected with [`LinkError::TooLarge`] *before* any buffer is reserved for
//! it, and the read buffer of a payload under the maximum grows with the
//! bytes that actually arrive, never to the announced length up front: a
//! peer that announces 8 MiB and sends nothing more costs a read chunk. End-of-file exactly at a frame boundary is a
//! clean end of stream (`Ok(None)`); end-of-file inside the prefix or the
//! payload is [`LinkError::Truncated`].
//!
//! Received payloads are [`Bytes`] views into the link's read buffer: a
//! conduit can decode from them without another copy.
//!
//! # Cancel safety
//!
//! Every future returned by these traits may be dropped at any `.await`
//! point (for example by `tokio::select!` or a timeout) without corrupting
//! the link:
//!
//! - [`LinkTx::feed`]: if dropped before it completes, the payload was not
//!   queued and no capacity leaks. Once it returns `Ok`, the payload is
//!   queued and goes out with the next flush.
//! - [`LinkTx::flush`]: progress is kept in the link. Bytes already written
//!   stay written, the rest stays queued for the next flush or close; the
//!   peer never sees a payload cut short or out of order.
//! - [`LinkTx::send`] is `feed` then `flush`: dropped during the `feed`
//!   part, nothing was queued; dropped during the `flush` part, the payload
//!   is queued and goes out with the next flush.
//! - [`LinkTx::close`]: like `flush`; a dropped close can be retried.
//! - [`LinkRx::recv`]: if dropped, no payload is lost; partial frames stay
//!   buffered in the link and the next call continues where it stopped.
//!
//! # Errors
//!
//! Every [`LinkError`] is fatal to the half that reported it: after the first
//! error, every later call on that half returns [`LinkError::Dead`] and never
//! data. A half that received a clean end of stream keeps returning
//! `Ok(None)`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

pub mod any;
pub mod mem;
pub mod stream;
pub mod tls;
pub mod ws;

pub use tls::{
    CertIdentity, ClientTls, ServerTls, TlsConfigError, TlsConnector, TlsLink, TlsListener,
    TlsPeer, TlsPending, TrustRoots,
};
pub use ws::{HttpPeer, WsConfig, WsConnector, WsError, WsLink, WsListener, WsPending};

pub use stream::{
    StreamConfig, StreamLink, TcpConnector, TcpLink, TcpListener, TcpPending, DEFAULT_BACKLOG,
};
#[cfg(unix)]
pub use stream::{UnixConnector, UnixLink, UnixListener, UnixPending};

/// Default maximum payload size of every link: 8 MiB.
///
/// Both the in-memory and the stream links enforce a maximum so that code
/// tested over [`mem`] behaves the same over a socket.
pub const DEFAULT_MAX_PAYLOAD: usize = 8 * 1024 * 1024;

/// The sending half of a link.
pub trait LinkTx: Send + 'static {
    /// Queue one payload without flushing. Waits (backpressure) while the
    /// transport cannot take more.
    ///
    /// Cancel-safe: if the future is dropped before it completes, the payload
    /// was not queued and no capacity leaks.
    fn feed(&mut self, payload: Bytes) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Push everything queued to the transport.
    ///
    /// Cancel-safe: progress is kept in the link; a dropped flush never
    /// publishes a partial payload (the rest goes out on the next flush).
    fn flush(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Payloads of up to this many bytes are copied into the link's own
    /// buffer when fed, so that [`feed_copy`](LinkTx::feed_copy) costs
    /// them no more than [`feed`](LinkTx::feed). The default, 0, means the
    /// link keeps every payload it is fed by reference.
    ///
    /// A sender that holds small payloads under a lock it must release
    /// before it feeds them (the stable conduit's writer) copies them out
    /// rather than take a reference: a copy of a few dozen bytes costs less
    /// than a reference count shared with other threads.
    fn copy_threshold(&self) -> usize {
        0
    }

    /// Queues a copy of `payload`, like [`feed`](LinkTx::feed) and with
    /// the same backpressure and cancel safety. The default copies it into
    /// new `Bytes`; links with a [`copy_threshold`](LinkTx::copy_threshold)
    /// copy it straight into their buffer.
    fn feed_copy(&mut self, payload: &[u8]) -> impl Future<Output = Result<(), LinkError>> + Send {
        self.feed(Bytes::copy_from_slice(payload))
    }

    /// [`feed`](LinkTx::feed) then [`flush`](LinkTx::flush).
    ///
    /// Cancel-safe in the sense of both: dropped while feeding, nothing was
    /// queued; dropped while flushing, the payload is queued and goes out
    /// with the next flush.
    fn send(&mut self, payload: Bytes) -> impl Future<Output = Result<(), LinkError>> + Send {
        async move {
            self.feed(payload).await?;
            self.flush().await
        }
    }

    /// Graceful close: flushes everything queued, then signals end-of-stream
    /// to the peer (TCP/Unix: shuts down the write side).
    ///
    /// The peer receives every earlier payload, then `Ok(None)`. Closing an
    /// already closed half succeeds again; [`feed`](LinkTx::feed) and
    /// [`flush`](LinkTx::flush) after a close fail with
    /// [`LinkError::Closed`]. The peer's sending half stays open, except on
    /// WebSocket links, where the Close ends both directions (see
    /// [`ws`](crate::link::ws#end-of-stream)).
    fn close(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send;
}

/// The receiving half of a link.
pub trait LinkRx: Send + 'static {
    /// Next payload; `Ok(None)` is a clean end-of-stream (the peer closed at
    /// a payload boundary). Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, LinkError>> + Send;

    /// Lowers the largest payload later [`recv`](LinkRx::recv)s accept to
    /// `max`, or raises it back, never above the maximum the link was
    /// configured with: the limit in force is the smaller of the two.
    ///
    /// A payload over the limit fails the half with
    /// [`LinkError::TooLarge`]; a stream link sees it in the length prefix
    /// and fails before reserving anything for it. This lets a server
    /// accept only a small first message (a hello) from a peer it knows
    /// nothing about yet, then allow full-sized payloads once the peer has
    /// identified itself. Pass `usize::MAX` to go back to the configured
    /// maximum.
    fn set_max_payload(&mut self, max: usize);
}

/// A bidirectional link, split into its two halves to be used.
pub trait Link: Send + 'static {
    /// The sending half.
    type Tx: LinkTx;
    /// The receiving half.
    type Rx: LinkRx;

    /// Separates the two directions so that they can be driven
    /// independently (from different tasks, without a lock).
    fn split(self) -> (Self::Tx, Self::Rx);

    /// What the transport knows about the other end. The default knows
    /// nothing; TCP links return the peer's address.
    fn peer(&self) -> PeerInfo {
        PeerInfo::default()
    }
}

/// What a link's transport knows about the peer on the other end.
///
/// Only what the transport itself established, never what the peer claims
/// in its messages: the address a TCP socket was accepted from, the
/// identity a TLS handshake verified, the HTTP request a WebSocket was
/// upgraded from. Build one with [`PeerInfo::from_addr`] or [`Default`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's network address (TCP links, and TLS and WebSocket over
    /// TCP); `None` for transports without one (in-memory, Unix sockets).
    pub addr: Option<SocketAddr>,
    /// What the TLS handshake established (links over TLS only).
    pub tls: Option<Arc<TlsPeer>>,
    /// The HTTP request the WebSocket was opened with (WebSocket links
    /// only, server side).
    pub http: Option<Arc<HttpPeer>>,
}

impl PeerInfo {
    /// Peer information holding only an address.
    pub fn from_addr(addr: SocketAddr) -> Self {
        PeerInfo {
            addr: Some(addr),
            ..PeerInfo::default()
        }
    }
}

/// Produces fresh links on demand (the client side of a stable conduit
/// reconnects through this).
pub trait Connector: Send + Sync + 'static {
    /// The kind of link produced.
    type Link: Link;

    /// Establishes one new link.
    fn connect(&self) -> impl Future<Output = Result<Self::Link, LinkError>> + Send;
}

/// Accepts links (the server side), in two phases (see the
/// [module documentation](self#accepting-in-two-phases)).
pub trait Listener: Send + 'static {
    /// The kind of link accepted.
    type Link: Link;
    /// A connection accepted but not yet set up.
    type Pending: PendingLink<Link = Self::Link>;

    /// Waits for the next incoming connection and returns it before any
    /// per-connection setup.
    ///
    /// Cheap: it must not wait on any one peer (no reads, no handshakes);
    /// that belongs in [`PendingLink::establish`]. Cancel-safe for the
    /// listeners of this crate. An error is usually transient (out of file
    /// descriptors, a connection reset before it was accepted): callers
    /// back off briefly and accept again.
    fn accept(&mut self) -> impl Future<Output = Result<Self::Pending, LinkError>> + Send;
}

/// A connection accepted by a [`Listener`], not yet ready to carry
/// payloads.
pub trait PendingLink: Send + 'static {
    /// The link it becomes.
    type Link: Link;

    /// The peer's address as known before any setup, for admission
    /// decisions (limits per source); `None` if the transport has none.
    fn addr(&self) -> Option<SocketAddr>;

    /// Runs the per-connection setup and returns the link.
    ///
    /// It may wait on the peer (a TLS handshake, a preamble), for as long
    /// as the peer takes: run it in the connection's own task, under a
    /// deadline, never in an accept loop. Dropping the future abandons the
    /// connection.
    fn establish(self) -> impl Future<Output = Result<Self::Link, LinkError>> + Send;
}

/// A link that needs no setup, as a [`PendingLink`]: `establish` returns
/// it at once and `addr` is its [`Link::peer`] address.
#[derive(Debug)]
pub struct Ready<L>(pub L);

impl<L: Link> PendingLink for Ready<L> {
    type Link = L;

    fn addr(&self) -> Option<SocketAddr> {
        self.0.peer().addr
    }

    async fn establish(self) -> Result<L, LinkError> {
        Ok(self.0)
    }
}

/// Why a link operation failed.
///
/// Every variant is fatal to the half that returned it (see
/// [`LinkError::is_dead`]): later calls on that half return
/// [`LinkError::Dead`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The underlying transport failed.
    #[error("link i/o error: {0}")]
    Io(std::io::Error),
    /// TLS failed: the handshake (a certificate not valid for the name, an
    /// unknown issuer, a peer that does not speak TLS, a refused client
    /// certificate) or, later, a record that does not decrypt or an alert
    /// from the peer. An [`std::io::Error`] that carries a [`rustls::Error`]
    /// converts to this variant, not to [`LinkError::Io`].
    #[error("tls: {0}")]
    Tls(rustls::Error),
    /// A payload (sent, or announced by a received length prefix) is over
    /// the maximum payload size.
    #[error("payload of {len} bytes is over the maximum of {max} bytes")]
    TooLarge {
        /// The payload's size in bytes.
        len: usize,
        /// The maximum the link accepts.
        max: usize,
    },
    /// End-of-file inside a frame: in its length prefix or its payload.
    #[error("end of stream inside a frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes that the unfinished part (the 4-byte prefix, or the payload)
        /// needed.
        expected: usize,
        /// Bytes of that part that arrived before end-of-file.
        got: usize,
    },
    /// A WebSocket link or its HTTP upgrade failed: a text message, a
    /// protocol violation, an upgrade refused with an HTTP status (see
    /// [`ws::WsError`]).
    #[error("websocket: {0}")]
    WebSocket(ws::WsError),
    /// The peer vanished without a graceful close (an in-memory link was
    /// dropped or killed).
    #[error("link reset: the peer vanished without closing")]
    Reset,
    /// This half already failed earlier; it yields nothing more.
    #[error("link is dead after an earlier error")]
    Dead,
    /// `feed` or `flush` after `close()`.
    #[error("link was closed for sending")]
    Closed,
}

impl From<std::io::Error> for LinkError {
    /// [`LinkError::Tls`] if the error carries a [`rustls::Error`] (as
    /// `tokio-rustls` reports TLS failures), [`LinkError::Io`] otherwise.
    fn from(err: std::io::Error) -> Self {
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => LinkError::Tls(tls.clone()),
            None => LinkError::Io(err),
        }
    }
}

impl LinkError {
    /// Whether the half that returned this error is dead. Always `true`:
    /// every link error is fatal to the link, and the conduit must move on
    /// to a fresh one.
    pub fn is_dead(&self) -> bool {
        true
    }
}
