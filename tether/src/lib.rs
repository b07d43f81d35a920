//! Stable conduits on tokio.
#![forbid(unsafe_code)]

pub mod link;

pub use link::{Connector, Link, LinkError, LinkRx, LinkTx, Listener};
