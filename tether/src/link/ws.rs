//! WebSocket links (`ws://` and `wss://`): one binary message per payload.

/// The HTTP request a WebSocket link was opened with (server side).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpPeer {}
