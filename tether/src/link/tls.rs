//! TLS over TCP (rustls): connectors, listeners and what the handshake
//! verified about the peer.

/// What a TLS handshake established about the peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsPeer {}
