//! Errors seen by applications.
//!
//! Errors are grouped by what the application can do about them:
//! [`Error::SessionLost`] is terminal (every later call returns it), while
//! [`Error::Encode`] and [`Error::Decode`] concern one message and leave the
//! conduit usable. Link failures never reach a stable conduit's user: the
//! conduit replaces the link and carries on.
//!
//! Each error's text says everything once, its causes included, and
//! `source()` returns `None`: so `{}`, `{:#}` in `anyhow` and error-chain
//! printers all show each cause exactly once. To act on a cause, match the
//! variant (for example [`AttemptError::kind`]).

use std::fmt;
use std::io;
use std::time::Duration;

use tether_proto::{FrameError, HelloError, Seq};

use crate::link::LinkError;

/// Why a stable session ended for good.
///
/// Once a session is lost, every later `send` and `recv` returns the same
/// reason, wrapped in [`Error::SessionLost`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionLost {
    /// The server answered a resume with the rejected flag: the key was
    /// unknown, expired or already replaced.
    #[error("the server rejected the resume key (unknown, expired or already replaced)")]
    Rejected,
    /// The client could not get a working link back before its give-up
    /// deadline.
    #[error(
        "gave up reconnecting after {attempts} attempt{} over {}; last error: {last_error}",
        if *attempts == 1 { "" } else { "s" },
        Human(*elapsed)
    )]
    GaveUp {
        /// Connection attempts made since the link was lost (or, on the
        /// first connect, since `connect` was called).
        attempts: u32,
        /// Time spent trying.
        elapsed: Duration,
        /// Why the last attempt failed.
        last_error: AttemptError,
    },
    /// The peer broke the protocol (a malformed frame, a gap in sequence
    /// numbers, an ack for data never sent, an impossible resume point).
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    /// The server refused to take the session back on a resume (its
    /// policy changed, or it denies the client now).
    #[error("the server refused the resume: {0}")]
    Refused(Refusal),
    /// The server shut down and dropped the session.
    #[error("the server shut down")]
    ServerShutdown,
    /// The client did not resume within the server's resume window.
    #[error("the client did not resume within the resume window")]
    Expired,
    /// A close did not complete within the close timeout, with messages
    /// still undelivered ([`Stats::undelivered`](crate::Stats::undelivered)
    /// says how many of this side's).
    #[error("the close did not complete within the close timeout")]
    CloseTimedOut,
}

/// Why a server refused to open a session for this client. Unlike
/// [`SessionLost`], no session existed: nothing was sent or lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The server is at capacity (sessions, handshakes or memory). The
    /// client retries with backoff, waiting at least `retry_after`, and
    /// returns this only when its give-up deadline passed.
    #[error("the server is busy ({reason}); retry after {}", Human(*retry_after))]
    Busy {
        /// The server's hint: the least time to wait before trying again.
        retry_after: Duration,
        /// What the server said.
        reason: String,
    },
    /// The server's application refused this client (its authorization
    /// hook). Not retried.
    #[error("the server refused this client: {reason}")]
    Denied {
        /// What the server's application said.
        reason: String,
    },
    /// The client lacks something the server requires (for example the
    /// keepalive extension). Not retried.
    #[error("the server's policy refused this client: {reason}")]
    Policy {
        /// What the server said.
        reason: String,
    },
}

/// Why one attempt to get a link and complete the handshake failed: its
/// [`kind`](Self::kind) for code, its text for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AttemptError {
    kind: io::ErrorKind,
    message: String,
}

impl AttemptError {
    pub(crate) fn new(kind: io::ErrorKind, message: impl Into<String>) -> AttemptError {
        AttemptError {
            kind,
            message: message.into(),
        }
    }

    /// What kind of failure: `ConnectionRefused` (nothing listening),
    /// `TimedOut` (no answer within the handshake timeout), the I/O error's
    /// own kind for other socket errors, `InvalidData` for a server that
    /// does not speak the protocol or failed its proof, `ConnectionReset`
    /// for a link that ended during the handshake, and `Other` for TLS and
    /// WebSocket failures and a busy server.
    pub fn kind(&self) -> io::ErrorKind {
        self.kind
    }
}

/// A duration for people: `850 µs`, `12 ms`, `1.5 s`, `2 min 5 s`.
pub(crate) struct Human(pub(crate) Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d < Duration::from_millis(1) {
            write!(f, "{} µs", d.as_micros())
        } else if d < Duration::from_secs(1) {
            write!(f, "{} ms", d.as_millis())
        } else if d < Duration::from_secs(60) {
            let tenths = (d.as_millis() + 50) / 100;
            if tenths % 10 == 0 {
                write!(f, "{} s", tenths / 10)
            } else {
                write!(f, "{}.{} s", tenths / 10, tenths % 10)
            }
        } else if d < Duration::from_secs(3600) {
            let s = d.as_secs();
            write!(f, "{} min {} s", s / 60, s % 60)
        } else {
            let m = d.as_secs() / 60;
            write!(f, "{} h {} min", m / 60, m % 60)
        }
    }
}

impl Refusal {
    pub(crate) fn from_wire(refusal: tether_proto::Refusal) -> Refusal {
        let reason = refusal.reason;
        match refusal.kind {
            tether_proto::RefusalKind::Busy => Refusal::Busy {
                retry_after: Duration::from_millis(u64::from(refusal.retry_after_ms)),
                reason,
            },
            tether_proto::RefusalKind::Denied => Refusal::Denied { reason },
            _ => Refusal::Policy { reason },
        }
    }
}

/// The error type of conduits, clients and servers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stable session is gone; see [`SessionLost`]. Terminal.
    #[error("session lost: {0}")]
    SessionLost(SessionLost),
    /// The underlying link failed (bare conduits, and the first connection
    /// of a client that is not allowed to retry).
    #[error("link failed: {0}")]
    Link(LinkError),
    /// A message could not be serialized. Nothing was sent; the conduit is
    /// still usable.
    #[error("could not encode message: {0}")]
    Encode(FrameError),
    /// A received message was not a valid encoding of the expected type. The
    /// message is consumed; the conduit is still usable.
    ///
    /// Usually the two ends disagree on the message type: the text names
    /// the type this side expected, as in `could not decode message 5 as
    /// alloc::string::String: frame item decoded but 5 trailing byte(s)
    /// were left over`.
    #[error(
        "could not decode message{} as {expected}: {error}",
        seq.map(|s| format!(" {s}")).unwrap_or_default()
    )]
    #[non_exhaustive]
    Decode {
        /// Sequence number of the offending frame (stable conduits only).
        seq: Option<Seq>,
        /// The type the message was decoded as, from
        /// [`std::any::type_name`]: meant for people, not for matching.
        expected: &'static str,
        /// What failed.
        error: FrameError,
    },
    /// The peer's handshake message was malformed.
    #[error("bad handshake from peer: {0}")]
    Handshake(HelloError),
    /// The message is larger than the conduit accepts
    /// ([`Config::max_message_size`](crate::Config::max_message_size)).
    /// Nothing was sent; the conduit is still usable.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Encoded size of the frame.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// This side closed the conduit (`close()`, every handle dropped, or
    /// the server's shutdown): it accepts no new messages. Those accepted
    /// before are still delivered. [`is_closed`](Error::is_closed) covers
    /// this and [`PeerClosed`](Error::PeerClosed).
    #[error("the conduit is closed (by this side)")]
    Closed,
    /// The peer closed the conduit, and this side, closing in turn,
    /// accepts no new messages. Those accepted before are still delivered;
    /// the receiver yields what the peer sent, then `Ok(None)`. When both
    /// sides close at once, the first to begin decides: a side that began
    /// before the peer's close frame arrived sees [`Closed`](Error::Closed).
    #[error("the peer closed the conduit")]
    PeerClosed,
    /// The server refused to open a session (busy, denied or policy); see
    /// [`Refusal`]. Only from [`StableConduit::connect`](crate::StableConduit::connect).
    #[error("session refused: {0}")]
    Refused(Refusal),
}

impl From<SessionLost> for Error {
    fn from(reason: SessionLost) -> Error {
        Error::SessionLost(reason)
    }
}

impl From<LinkError> for Error {
    fn from(err: LinkError) -> Error {
        Error::Link(err)
    }
}

impl From<HelloError> for Error {
    fn from(err: HelloError) -> Error {
        Error::Handshake(err)
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Error {
        Error::Refused(refusal)
    }
}

impl Error {
    /// A message that did not decode as a `T`.
    pub(crate) fn decode<T: ?Sized>(seq: Option<Seq>, error: FrameError) -> Error {
        Error::Decode {
            seq,
            expected: std::any::type_name::<T>(),
            error,
        }
    }

    /// Whether the conduit is closed, by either side
    /// ([`Closed`](Error::Closed) or [`PeerClosed`](Error::PeerClosed)):
    /// a graceful end, after which nothing more can be sent.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed | Error::PeerClosed)
    }

    /// The session-loss reason, if this error is terminal for a stable session.
    pub fn session_lost(&self) -> Option<&SessionLost> {
        match self {
            Error::SessionLost(reason) => Some(reason),
            _ => None,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(err: Error) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match &err {
            Error::SessionLost(_) => ErrorKind::ConnectionAborted,
            Error::Link(LinkError::Io(e)) => e.kind(),
            Error::Link(_) => ErrorKind::ConnectionReset,
            Error::Encode(_) | Error::Decode { .. } | Error::Handshake(_) => ErrorKind::InvalidData,
            Error::TooLarge { .. } => ErrorKind::InvalidInput,
            Error::Closed => ErrorKind::NotConnected,
            // What writing to a socket the peer closed gives.
            Error::PeerClosed => ErrorKind::BrokenPipe,
            Error::Refused(_) => ErrorKind::ConnectionRefused,
        };
        std::io::Error::new(kind, err)
    }
}
