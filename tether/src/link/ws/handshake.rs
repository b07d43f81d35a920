//! The HTTP/1.1 upgrade (RFC 6455 section 4), both sides: bounded reading
//! of the HTTP head, the request and its checks, the `101` answer and its
//! checks.

use std::io;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{HttpPeer, WsError};
use crate::link::LinkError;

/// The GUID of RFC 6455 that `Sec-WebSocket-Accept` hashes with the key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most header lines an HTTP head may have.
pub(crate) const MAX_HEADERS: usize = 64;

/// `Sec-WebSocket-Accept` for `key`: base64 of SHA-1 of key + GUID.
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    BASE64.encode(ctx.finish())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
pub(crate) fn new_key() -> String {
    use rand::{Rng, SeedableRng};
    let bytes: [u8; 16] = rand::rngs::SmallRng::from_os_rng().random();
    BASE64.encode(bytes)
}

/// Whether the comma-separated header value `value` has `token`
/// (case-insensitive), as `Connection: keep-alive, Upgrade` has `upgrade`.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Reads until the end of an HTTP head (`\r\n\r\n`), at most `max` bytes
/// of it. Returns the buffer, the head's length and what was read past it.
/// `None` if the head is longer than `max`.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    max: usize,
) -> Result<Option<(BytesMut, usize)>, LinkError> {
    let mut buf = BytesMut::with_capacity(1024.min(max.max(64)));
    let mut searched = 0;
    loop {
        if let Some(at) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some((buf, searched + at + 4)));
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() >= max {
            return Ok(None);
        }
        // Never read more than the bound allows: a head that fills it is
        // refused without buffering anything behind it.
        let room = (max - buf.len()).min(4096);
        buf.reserve(room);
        let n = (&mut *io).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(LinkError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "websocket: the connection ended inside the HTTP head",
            )));
        }
    }
}

/// What the server was configured to accept.
pub(crate) struct ServerRules<'a> {
    pub(crate) path: &'a str,
    pub(crate) max_head: usize,
}

/// Writes a short HTTP error answer and shuts the connection down, best
/// effort, and returns the error the server reports for it.
async fn refuse<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    reason: &'static str,
    extra: &str,
) -> LinkError {
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = io.write_all(answer.as_bytes()).await;
    let _ = io.shutdown().await;
    LinkError::WebSocket(WsError::Refused {
        status,
        reason: reason.to_owned(),
    })
}

/// The server side: reads and checks the upgrade request, answers `101`,
/// and returns what the request said plus the bytes read past its head.
/// A request that is not a valid upgrade to `rules.path` is answered with
/// an HTTP error status and fails with [`WsError::Refused`].
pub(crate) async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    rules: ServerRules<'_>,
) -> Result<(HttpPeer, Bytes), LinkError> {
    let Some((mut buf, head_len)) = read_head(io, rules.max_head).await? else {
        return Err(refuse(io, 431, "Request Header Fields Too Large", "").await);
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(io, 431, "Request Header Fields Too Large", "").await)
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(refuse(io, 400, "Bad Request", "").await)
        }
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(refuse(io, 400, "Bad Request", "").await);
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != rules.path {
        return Err(refuse(io, 404, "Not Found", "").await);
    }
    if method != "GET" {
        return Err(refuse(io, 405, "Method Not Allowed", "Allow: GET\r\n").await);
    }
    let h = req.headers;
    let upgrade = header(h, "upgrade").is_some_and(|v| has_token(v, "websocket"))
        && header(h, "connection").is_some_and(|v| has_token(v, "upgrade"));
    let version_13 = header(h, "sec-websocket-version").is_some_and(|v| v.trim_ascii() == b"13");
    if !upgrade || !version_13 {
        let extra = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
        return Err(refuse(io, 426, "Upgrade Required", extra).await);
    }
    let key = header(h, "sec-websocket-key").map(<[u8]>::trim_ascii);
    let key_ok = key.is_some_and(|k| BASE64.decode(k).is_ok_and(|d| d.len() == 16));
    let (Some(key), true) = (key, key_ok) else {
        return Err(refuse(io, 400, "Bad Request", "").await);
    };
    let peer = HttpPeer::new(method, target, h.iter().map(|h| (h.name, h.value)));
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    io.write_all(answer.as_bytes()).await?;
    io.flush().await?;
    let rest = buf.split_off(head_len).freeze();
    Ok((peer, rest))
}

/// The client side: sends the upgrade request (`request` is its whole
/// head, `key` the key in it), reads the answer and checks that it is a
/// `101` for this key. Returns the bytes read past the answer's head.
pub(crate) async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    request: &[u8],
    key: &str,
    max_head: usize,
) -> Result<Bytes, LinkError> {
    io.write_all(request).await?;
    io.flush().await?;
    let bad = |why: String| LinkError::WebSocket(WsError::BadUpgrade(why));
    let Some((mut buf, head_len)) = read_head(io, max_head).await? else {
        return Err(bad(format!(
            "the server's answer head is over {max_head} bytes"
        )));
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete HTTP answer".into())),
        Err(e) => return Err(bad(format!("unparsable HTTP answer: {e}"))),
    }
    let status = res.code.unwrap_or(0);
    if status != 101 {
        return Err(LinkError::WebSocket(WsError::Refused {
            status,
            reason: res.reason.unwrap_or("").to_owned(),
        }));
    }
    let h = res.headers;
    if !header(h, "upgrade").is_some_and(|v| has_token(v, "websocket"))
        || !header(h, "connection").is_some_and(|v| has_token(v, "upgrade"))
    {
        return Err(bad("a 101 answer without Upgrade: websocket".into()));
    }
    let expected = accept_key(key.as_bytes());
    if header(h, "sec-websocket-accept").map(<[u8]>::trim_ascii) != Some(expected.as_bytes()) {
        return Err(bad("wrong or missing Sec-WebSocket-Accept".into()));
    }
    if header(h, "sec-websocket-extensions").is_some() {
        return Err(bad(
            "the server chose an extension that was not offered".into()
        ));
    }
    Ok(buf.split_off(head_len).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_of_rfc_6455() {
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn tokens() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(has_token(b"WebSocket", "websocket"));
        assert!(!has_token(b"upgrades", "upgrade"));
    }

    #[tokio::test]
    async fn a_head_over_the_bound_is_refused_without_reading_past_it() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[b'a'; 10_000]).await.unwrap();
        assert!(read_head(&mut b, 8192).await.unwrap().is_none());
        a.write_all(b"\r\n\r\nrest").await.unwrap();
        let (mut c, mut d) = tokio::io::duplex(1 << 16);
        c.write_all(b"GET / HTTP/1.1\r\n\r\nrest").await.unwrap();
        let (buf, len) = read_head(&mut d, 8192).await.unwrap().unwrap();
        assert_eq!(&buf[len..], b"rest");
    }
}
