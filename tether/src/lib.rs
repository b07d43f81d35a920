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
//!
//! # Example
//!
//! A server that answers in upper case and a client that dials it by host
//! name, over TCP on loopback ([`link::mem`] works the same, in memory):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tether::link::{TcpConnector, TcpListener};
//! use tether::{Config, Server, StableConduit};
//!
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let port = listener.local_addr()?.port();
//! let server = Server::<String>::new(listener, Config::default());
//! tokio::spawn(async move {
//!     while let Some(mut session) = server.accept().await {
//!         tokio::spawn(async move {
//!             while let Ok(Some(line)) = session.recv().await {
//!                 let _ = session.send(&line.to_uppercase()).await;
//!             }
//!         });
//!     }
//! });
//!
//! let connector = TcpConnector::from_host_port(&format!("localhost:{port}"))?;
//! let mut client = StableConduit::<String>::connect(connector, Config::default()).await?;
//! client.send("hello").await?; // survives the link failing: resent if needed
//! assert_eq!(client.recv().await?.as_deref(), Some("HELLO")); // once, in order
//! client.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Complete programs are in `tether/examples/`: `client_server` (this, as
//! two processes), `chat` (split conduits, several senders) and `progress`
//! (a stream that survives a connection cut every few KiB). Run one with
//! `cargo run -p tether --example NAME`.
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
pub mod tunnel;

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
