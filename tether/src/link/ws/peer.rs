//! [`HttpPeer`]: the HTTP request a WebSocket link was opened with.

/// The HTTP request a WebSocket link was opened with (server side), in
/// [`PeerInfo::http`](crate::link::PeerInfo::http): its method, target and
/// headers, as the client (or a proxy in front of the server) sent them.
///
/// It is bounded by the listener's head limit
/// ([`WsConfig::max_head`](super::WsConfig::max_head), 8 KiB by default,
/// at most 64 header lines). What it says is what the peer *claims*: an
/// `Authorization` header is a credential for an
/// [`Authorize`](crate::Authorize) hook to check, a `X-Forwarded-For` is
/// only as trustworthy as the proxy that sets it.
///
/// ```
/// use tether::link::{HttpPeer, PeerInfo};
///
/// fn token(peer: &PeerInfo) -> Option<&str> {
///     let http: &HttpPeer = peer.http.as_deref()?;
///     http.header("authorization")?.strip_prefix("Bearer ")
/// }
/// # assert_eq!(token(&PeerInfo::default()), None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpPeer {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl HttpPeer {
    pub(crate) fn new<'a>(
        method: &str,
        target: &str,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> HttpPeer {
        HttpPeer {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: headers
                .map(|(name, value)| (name.to_ascii_lowercase(), value.to_vec()))
                .collect(),
        }
    }

    /// The request method (`GET` for every accepted upgrade).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request target as sent: the path and, if any, `?` and the query
    /// (`/tether?room=4`).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The path of the target, without the query (`/tether`).
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(p, _)| p)
    }

    /// The query of the target, after the `?` (`room=4`); `None` without
    /// one.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The value of the first header called `name` (case-insensitive), if
    /// it is valid UTF-8 (see [`header_bytes`](Self::header_bytes)).
    pub fn header(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.header_bytes(name)?).ok()
    }

    /// The raw value of the first header called `name` (case-insensitive).
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every header in order, names in lower case, repeated names kept.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }
}
