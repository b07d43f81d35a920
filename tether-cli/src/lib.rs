//! Library side of the `tether` command: each subcommand's logic lives in a
//! module here, and `main.rs` only parses arguments.

pub mod bench;
pub mod demo;
pub mod echo;
pub mod metrics;
pub mod pki;
pub mod relay;
pub mod transport;
pub mod tunnel;

/// The message type of `tether echo` and `tether demo`: tether's
/// [`ByteBuf`](tether::ByteBuf), a byte string encoded by postcard as a
/// varint length and the bytes (the same bytes as a postcard `Vec<u8>`, and
/// as the `serde_bytes::ByteBuf` earlier versions used, so echo endpoints of
/// either version interoperate).
pub type Bytes = tether::ByteBuf;
