//! Connection events: what happened to a conduit's links, with the cause,
//! the attempt number and the next retry delay.
//!
//! [`ConduitState`](super::ConduitState) says where a conduit stands; the
//! events say why it got there. Each one is also logged through `tracing`
//! (see [`ConduitEvent`] for the levels), whether or not anyone listens.

use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::{AttemptError, Human, SessionLost};
use crate::link::LinkError;

/// Events a listener can fall behind by before it misses the oldest.
const EVENT_BACKLOG: usize = 32;

/// Something that happened to a stable conduit's links.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConduitEvent {
    /// The link failed or ended (logged at info). A client reconnects at
    /// once; a server waits for the client's resume.
    LinkLost {
        /// Why.
        cause: LinkLoss,
    },
    /// A client's attempt to get a link back failed (logged at info; at
    /// warn for the last one, when the client gives up).
    AttemptFailed {
        /// Attempts since the link was lost, this one included.
        attempt: u32,
        /// Why it failed.
        error: AttemptError,
        /// How long until the next attempt; `None` when the client gives
        /// up (a [`Lost`](Self::Lost) event follows).
        next_retry: Option<Duration>,
    },
    /// Frames flow again on a new link (logged at info). `outage` is the
    /// time since the last link was lost.
    Resumed {
        /// Attempts it took (1 on a server, which only waits).
        attempts: u32,
        /// How long the conduit was without a link.
        outage: Duration,
    },
    /// An attached link stopped answering (a ping unanswered, or data
    /// unacknowledged without keepalive) for about
    /// [`Config::stall_timeout`](crate::Config::stall_timeout): the path
    /// may be dead (logged at warn). The keepalive timeout replaces the
    /// link later; a client can call
    /// [`reconnect_now`](crate::StableConduit::reconnect_now) sooner, for
    /// example on a network change.
    Stalled {
        /// How long nothing has arrived.
        quiet: Duration,
    },
    /// Something arrived on a link that was [`Stalled`](Self::Stalled)
    /// (logged at info).
    Unstalled,
    /// The session is lost for good (logged at warn).
    Lost(SessionLost),
    /// The session ended gracefully (logged at debug).
    Closed,
}

/// Why a link was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkLoss {
    /// The link failed with an I/O, TLS or WebSocket error.
    Error {
        /// The I/O error's kind (`Other` for TLS and WebSocket errors).
        kind: io::ErrorKind,
        /// The error, for people.
        message: String,
    },
    /// The peer ended the link (end of stream).
    PeerEnded,
    /// No pong answered a ping within the keepalive timeout.
    KeepaliveTimeout,
    /// Nothing arrived within the idle timeout (links without keepalive),
    /// or a base-format peer left a waiting `send` unacknowledged.
    IdleTimeout,
    /// The application asked for a new link
    /// ([`reconnect_now`](crate::StableConduit::reconnect_now)).
    Requested,
    /// Server: the client resumed on a newer link.
    Replaced,
}

impl LinkLoss {
    /// The link failed with `error`.
    pub(crate) fn of_link_error(error: &LinkError) -> LinkLoss {
        LinkLoss::Error {
            kind: match error {
                LinkError::Io(io) => io.kind(),
                _ => io::ErrorKind::Other,
            },
            message: error.to_string(),
        }
    }

    /// The watchdog ended a link with these `extensions`: keepalive's
    /// timeout if it was on, the idle timeout otherwise.
    pub(crate) fn of_timeout(extensions: u8) -> LinkLoss {
        if extensions & tether_proto::ext::KEEPALIVE != 0 {
            LinkLoss::KeepaliveTimeout
        } else {
            LinkLoss::IdleTimeout
        }
    }
}

impl std::fmt::Display for LinkLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkLoss::Error { message, .. } => write!(f, "{message}"),
            LinkLoss::PeerEnded => write!(f, "the peer ended the link"),
            LinkLoss::KeepaliveTimeout => write!(f, "no pong within the keepalive timeout"),
            LinkLoss::IdleTimeout => write!(f, "nothing arrived within the idle timeout"),
            LinkLoss::Requested => write!(f, "the application asked for a new link"),
            LinkLoss::Replaced => write!(f, "the client resumed on a newer link"),
        }
    }
}

/// A stream of a conduit's [`ConduitEvent`]s, from
/// [`StableConduit::events`](crate::StableConduit::events).
///
/// Events that happen before it is created are not in it. It ends after
/// the session's last event ([`Lost`](ConduitEvent::Lost) or
/// [`Closed`](ConduitEvent::Closed)). A listener that falls more than 32
/// events behind misses the oldest ones; [`state`](crate::StableConduit::state_changes)
/// always has the latest state.
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<ConduitEvent>,
}

impl Events {
    /// The next event, or `None` once the session ended and every event
    /// was read. Cancel-safe.
    pub async fn next(&mut self) -> Option<ConduitEvent> {
        loop {
            match self.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// A session's event channel: made when the first listener subscribes (a
/// server's sessions mostly have none), dropped after the last event.
#[derive(Default)]
pub(crate) struct EventHub {
    tx: Mutex<Option<broadcast::Sender<ConduitEvent>>>,
    /// The terminal event, for listeners that come after it.
    last: Mutex<Option<ConduitEvent>>,
}

impl EventHub {
    pub(crate) fn subscribe(&self) -> Events {
        let mut tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            // The session ended: a stream of just its last event.
            let (tx, rx) = broadcast::channel(1);
            let _ = tx.send(last);
            return Events { rx };
        }
        let rx = tx
            .get_or_insert_with(|| broadcast::channel(EVENT_BACKLOG).0)
            .subscribe();
        Events { rx }
    }

    /// Logs `event` and hands it to every listener. A server's link
    /// events are logged at debug: its resumes and ends are what an
    /// operator reads.
    pub(crate) fn emit(&self, event: ConduitEvent, server: bool) {
        log(&event, server);
        let terminal = matches!(event, ConduitEvent::Lost(_) | ConduitEvent::Closed);
        let mut tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        if terminal {
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(event.clone());
        }
        if let Some(sender) = tx.as_ref() {
            let _ = sender.send(event);
        }
        if terminal {
            // Listeners read what is queued, then end.
            *tx = None;
        }
    }
}

fn log(event: &ConduitEvent, server: bool) {
    match event {
        ConduitEvent::LinkLost { cause } if server => tracing::debug!(%cause, "link lost"),
        ConduitEvent::LinkLost { cause } => tracing::info!(%cause, "link lost"),
        ConduitEvent::Resumed { .. } if server => {}
        ConduitEvent::AttemptFailed {
            attempt,
            error,
            next_retry,
        } => match next_retry {
            Some(d) => {
                tracing::info!(attempt, %error, next_retry = %Human(*d), "connection attempt failed")
            }
            None => tracing::warn!(attempt, %error, "connection attempt failed: giving up"),
        },
        ConduitEvent::Resumed { attempts, outage } => {
            tracing::info!(attempts, outage = %Human(*outage), "link back: resumed");
        }
        ConduitEvent::Stalled { quiet } => {
            tracing::warn!(quiet = %Human(*quiet), "nothing received while waiting for an answer: stalled");
        }
        ConduitEvent::Unstalled => tracing::info!("the link answers again"),
        // The session's loss is logged (throttled) where it happens.
        ConduitEvent::Lost(_) => {}
        ConduitEvent::Closed => tracing::debug!("session closed"),
    }
}
