//! Sans-IO core of the tether stable-conduit protocol.
//!
//! This crate holds everything about the wire format and the bookkeeping of a
//! stable conduit that needs no I/O: sequence arithmetic ([`Seq`]), resume
//! keys ([`ResumeKey`]).
#![forbid(unsafe_code)]

pub mod key;
pub mod seq;

pub use key::{KeyError, ResumeKey};
pub use seq::Seq;
