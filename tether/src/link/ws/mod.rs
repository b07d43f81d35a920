//! WebSocket links (`ws://` and `wss://`, RFC 6455): connectors, listeners
//! and the HTTP request the peer opened the link with.
//!
//! A [`WsLink`] carries each payload as one *binary* WebSocket message over
//! one TCP connection, or over TLS for `wss://`. [`WsConnector`] dials the
//! URL's host (resolved again on every connect, each address tried in
//! turn; or a fixed address, [`WsConnector::connect_to`]), runs TLS for `wss://` with a [`ClientTls`](super::ClientTls), and
//! sends the HTTP/1.1 upgrade request with any extra headers (an
//! `Authorization`, say). [`WsListener`] accepts TCP connections at once
//! and does everything else in
//! [`PendingLink::establish`](super::PendingLink::establish): the TLS
//! handshake, reading and checking the upgrade request, the `101` answer.
//! A stable [`Server`](crate::Server) runs that in the connection's own
//! task, under its handshake timeout and counted by its caps on pending
//! handshakes, so a client that opens a connection and never finishes its
//! request holds one pending slot until the timeout, and nobody else waits
//! for it. WebSocket links go through HTTP proxies that pass upgrades on
//! (nginx with `proxy_http_version 1.1` and the `Upgrade`/`Connection`
//! headers set, say), where plain TCP or TLS links cannot.
//!
//! # Framing
//!
//! One payload is one binary message, sent as one frame up to 4 MiB and in
//! continuation frames above that; a message fragmented by the peer is
//! reassembled into one payload. Ping frames are answered by the link
//! (pongs are queued and written with the next read or flush) and, like
//! pongs, never surface as payloads: tether's own keepalive works above
//! the link. Frames from the client are masked, as the protocol requires;
//! no WebSocket extension (compression) is offered or accepted.
//!
//! # What is verified
//!
//! The server accepts only `GET` of the listener's path (default `/`; the
//! query does not count) over HTTP/1.1 with `Upgrade: websocket`,
//! `Connection: Upgrade`, `Sec-WebSocket-Version: 13` and a key of 16
//! bytes. It answers a wrong path with `404`, another method with `405`, a
//! request without the upgrade headers (a plain `GET`) with `426`, a
//! malformed one with `400`, a head over [`WsConfig::max_head`] (8 KiB by
//! default) or with more than 64 header lines with `431`, and closes the
//! connection; the pending link fails with [`WsError::Refused`]. What the
//! request said reaches the application in
//! [`PeerInfo::http`](super::PeerInfo::http) ([`HttpPeer`]: method, target,
//! headers), next to the TCP address and, for `wss://`, what TLS verified
//! (see [TLS](super::tls#what-is-verified)). The `Origin` header is not
//! checked: an [`Authorize`](crate::Authorize) hook can. The client checks
//! that the answer is `101` with the right `Sec-WebSocket-Accept` and no
//! extension; anything else is [`WsError::Refused`] (with the status) or
//! [`WsError::BadUpgrade`].
//!
//! Over `wss://` both sides use ALPN `http/1.1` instead of tether's own
//! [`ALPN`](super::tls::ALPN): the server is an HTTP endpoint, possibly a
//! TLS-terminating proxy.
//!
//! # End of stream
//!
//! [`LinkTx::close`](super::LinkTx::close) sends a Close frame (code 1000)
//! after everything fed, then shuts down the write side (for `wss://`,
//! `close_notify` first). The peer reads every payload, then `Ok(None)`;
//! its link answers the Close and can send nothing more, as the protocol
//! wants (RFC 6455, section 5.5.1): unlike the stream links there is no
//! half-close, and a [`feed`](super::LinkTx::feed) or
//! [`flush`](super::LinkTx::flush) after the peer's Close was read fails
//! with [`LinkError::Io`](super::LinkError::Io) of kind `BrokenPipe`. A
//! side that still has payloads to send must send them before the peer
//! closes (a stable conduit closes its link only once its own close
//! handshake has finished both ways). A connection that ends *without* a Close frame (the peer dropped
//! its link without closing, or something on the path cut it) is not a
//! clean end but [`LinkError::Io`](super::LinkError::Io) of kind
//! `UnexpectedEof`, as over TLS: a truncation is never taken for the end.
//! A text message fails the receiving half with [`WsError::TextMessage`]
//! (and tells the peer with a Close, code 1003), a protocol violation
//! (an unmasked client frame, a bad opcode) with [`WsError::Protocol`].
//!
//! # Limits
//!
//! - The HTTP head, request or answer, is read at most
//!   [`WsConfig::max_head`] bytes (8 KiB) and 64 header lines: no byte past
//!   the bound is buffered.
//! - A message over [`WsConfig::max_payload`] (8 MiB by default, lowered
//!   per link with [`LinkRx::set_max_payload`](super::LinkRx::set_max_payload))
//!   is [`LinkError::TooLarge`](super::LinkError::TooLarge): a frame whose
//!   header announces more is refused before anything is reserved for it,
//!   and a fragmented message fails as soon as its pieces add up to more.
//!   Unlike the stream links, a frame under the limit has its whole length
//!   reserved when its header arrives, so a peer can make a link hold up
//!   to the limit by announcing a frame and stalling: the server's
//!   small first-message limit (the hello) bounds that for unknown peers.
//! - The handshake has no timeout of its own: the server's handshake
//!   timeout bounds [`establish`](super::PendingLink::establish), and a
//!   client's connect runs under its conduit's deadlines.
//!
//! # Cost
//!
//! Per message, a 2 to 10-byte frame header (plus a 4-byte mask from the
//! client); the client copies each payload once to mask it. Frames under
//! 16 KiB (header and payload together) are gathered into one write
//! buffer that goes out at the flush, so a batch of small messages costs
//! one system call rather than one per 32 frames; the buffer is taken at
//! the first small write and given back at the flush, so an idle link
//! holds none. A larger frame goes out uncopied from the server (the frame
//! header and the [`Bytes`](bytes::Bytes) in one vectored write) after
//! what is buffered. Received payloads are
//! [`Bytes`](bytes::Bytes) views of the read buffer (reassembled messages
//! are copied once). The two halves share the WebSocket behind a lock held
//! only while one read or write poll runs. Setting up a link costs one
//! round trip for the upgrade after TCP (and TLS).

mod client;
mod handshake;
mod link;
mod peer;
mod server;

pub use client::WsConnector;
pub use link::{WsLink, WsRx, WsTx};
pub use peer::HttpPeer;
pub use server::{WsListener, WsPending};

use super::DEFAULT_MAX_PAYLOAD;

/// The ALPN protocol `wss://` offers and accepts.
const HTTP_ALPN: &[u8] = b"http/1.1";

/// Settings of WebSocket links and their handshakes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WsConfig {
    /// Largest message sent or accepted, in bytes. Default
    /// [`DEFAULT_MAX_PAYLOAD`] (8 MiB). A received frame header announcing
    /// more is an error before anything is reserved; a message under it may
    /// have its whole length reserved once its header has arrived.
    pub max_payload: usize,
    /// Largest HTTP head (the upgrade request, or its answer), in bytes.
    /// Default 8 KiB; a server answers a longer request `431`.
    pub max_head: usize,
    /// Backpressure high-water mark, in queued bytes. Default 64 KiB:
    /// `feed` writes queued frames out first while more than this is
    /// queued.
    pub write_buffer: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_head: 8 * 1024,
            write_buffer: 64 * 1024,
        }
    }
}

fn limits(config: &WsConfig) -> tokio_websockets::Limits {
    tokio_websockets::Limits::default().max_payload_len(Some(config.max_payload))
}

fn ws_config(config: &WsConfig) -> tokio_websockets::Config {
    tokio_websockets::Config::default().flush_threshold(config.write_buffer.max(1))
}

/// How a WebSocket link or its handshake failed (in
/// [`LinkError::WebSocket`](super::LinkError::WebSocket)).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// The peer sent a text message: tether links carry binary messages
    /// only.
    #[error("the peer sent a text message (tether links are binary only)")]
    TextMessage,
    /// The peer broke the WebSocket protocol (a frame masked the wrong way,
    /// an unknown opcode, a bad close code); what the WebSocket layer said.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The upgrade was refused with an HTTP status: on the client, what the
    /// server answered instead of `101`; on the server, what it answered a
    /// request it would not upgrade (`404` for a wrong path, `426` without
    /// the upgrade headers, `431` for a head over the bound, ...).
    #[error("upgrade refused: {status} {reason}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// The server's answer was a `101` that does not complete the upgrade
    /// (a wrong `Sec-WebSocket-Accept`, an extension not offered), or not
    /// HTTP at all.
    #[error("bad upgrade answer: {0}")]
    BadUpgrade(String),
}
