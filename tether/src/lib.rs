//! Stable conduits on tokio.
#![forbid(unsafe_code)]
