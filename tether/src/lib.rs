//! Stable conduits on tokio: typed message channels that stay reliable,
//! ordered and exactly-once while the links underneath fail and are
//! replaced.
//!
//! Layers, bottom up:
//! - [`link`]: message-oriented byte transports (in-memory, TCP, TLS over
//!   TCP, Unix).
//! - [`bare`]: typed messages over one link (postcard), no recovery.
//! - [`bytebuf`]: [`ByteBuf`], the message type for raw bytes.
//! - [`fault`]: a fault-injecting TCP proxy for tests and demos.
//! - [`stable`]: sequencing, acks, replay and session resumption over a
//!   series of links, with a reconnecting client and a session-keeping
//!   server.
//!
//! The protocol logic that needs no runtime lives in [`tether_proto`].
#![forbid(unsafe_code)]

pub mod bare;
pub mod borrowed;
pub mod bytebuf;
pub mod error;
pub mod fault;
pub mod link;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod stable;
pub mod throttle;

pub use bare::{BareConduit, BareReceiver, BareSender};
pub use borrowed::{Borrowed, BorrowedMessage};
pub use bytebuf::ByteBuf;
pub use error::{AttemptError, Error, Refusal, SessionLost};
pub use link::{Connector, Link, LinkError, LinkRx, LinkTx, Listener};
pub use stable::{
    Admission, Authorize, ConduitEvent, ConduitState, Config, Denied, Events, Grant, LinkLoss,
    LiveSessions, ReconnectPolicy, Server, ServerSnapshot, ServerStats, SessionInfo,
    SessionSummary, SessionTotals, ShutdownReport, StableConduit, StableReceiver, StableSender,
    Stats,
};
pub use tether_proto as proto;

/// The README's Rust examples, compiled by `cargo test --doc` so that they
/// stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
