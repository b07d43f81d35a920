//! Sans-IO core of the tether stable-conduit protocol.
//!
//! This crate holds everything about the wire format and the bookkeeping of a
//! stable conduit that needs no I/O: sequence arithmetic ([`Seq`]), resume
//! keys ([`ResumeKey`]), the handshake hellos ([`ClientHello`],
//! [`ServerHello`]) and frames ([`FrameHeader`], [`encode_frame`],
//! [`decode_frame`]), the sender's replay buffer ([`ReplayBuffer`]) and the
//! receiver's duplicate and gap detection ([`RecvState`]).
#![forbid(unsafe_code)]

pub mod frame;
pub mod hello;
pub mod key;
pub mod proof;
pub mod recv;
pub mod replay;
pub mod seq;

pub use frame::{
    decode_frame, decode_item, decode_payload, encode_frame, encode_item, encode_item_gapped, ext,
    Control, FrameError, FrameHeader, Incoming, MAX_HEADER_LEN,
};
pub use hello::{
    flags, ClientHello, HelloError, Refusal, RefusalKind, ServerHello, CLIENT_MAGIC, HELLO_LEN,
    MAX_REASON_LEN, SERVER_MAGIC,
};
pub use key::{KeyError, ResumeKey};
pub use proof::{ProofError, ResumeSecret, SessionId};
pub use recv::{Delivery, Reassembly, RecvError, RecvState};
pub use replay::{ReplayBuffer, ReplayError};
pub use seq::Seq;
