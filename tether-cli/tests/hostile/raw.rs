//! Raw TCP connections from a chosen 127.0.0.x source address, for the
//! attacker's side: bytes in, payloads out, and "when did the server close".

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::wire::{framed, ServerHelloRaw};

/// The attacker's source address.
pub(crate) const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The honest client's source address.
pub(crate) const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// A second attacker address (bursts from two sources).
pub(crate) const ATTACKER_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));

/// A TCP connection to `dst` from `src` (port chosen by the kernel).
/// `SO_REUSEADDR` lets the kernel pick ports still in TIME_WAIT from
/// earlier tests.
pub(crate) async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(src, 0))?;
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What waiting for the next payload gave.
#[derive(Debug)]
pub(crate) enum Recv {
    Payload(Vec<u8>),
    /// End of stream or an error (reset): the server closed the link.
    Closed(String),
    TimedOut,
}

/// One raw connection, with a read buffer for payload framing.
pub(crate) struct Raw {
    pub(crate) stream: TcpStream,
    buf: Vec<u8>,
    /// When the connection was established.
    pub(crate) opened: Instant,
}

impl Raw {
    /// Connects from `src`.
    pub(crate) async fn connect(src: IpAddr, dst: SocketAddr) -> io::Result<Raw> {
        let stream = connect_from(src, dst).await?;
        Ok(Raw {
            stream,
            buf: Vec::new(),
            opened: Instant::now(),
        })
    }

    /// Closing sends a reset, not a FIN: the floods close thousands of
    /// connections first, and a reset leaves no TIME_WAIT that would use
    /// up the source address's ports.
    pub(crate) fn reset_on_drop(&self) {
        let _ = self.stream.set_zero_linger();
    }

    /// Writes raw bytes.
    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes one payload behind its length prefix.
    pub(crate) async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&framed(payload)).await
    }

    /// The next payload within `within`.
    pub(crate) async fn recv(&mut self, within: Duration) -> Recv {
        let deadline = Instant::now() + within;
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > 64 * 1024 * 1024 {
                    return Recv::Closed(format!("server announced a {len}-byte payload"));
                }
                if self.buf.len() >= 4 + len {
                    let payload = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return Recv::Payload(payload);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Recv::TimedOut,
                Ok(Ok(0)) => return Recv::Closed("end of stream".into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Recv::Closed(e.to_string()),
            }
        }
    }

    /// Reads the ServerHello.
    pub(crate) async fn server_hello(&mut self, within: Duration) -> Result<ServerHelloRaw, Recv> {
        match self.recv(within).await {
            Recv::Payload(p) => ServerHelloRaw::parse(&p).map_err(Recv::Closed),
            other => Err(other),
        }
    }

    /// Reads and discards until the server closes the link: how long that
    /// took from now, or `None` if it was still open after `within`.
    pub(crate) async fn wait_closed(&mut self, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let deadline = start + within;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A new session's handshake on a fresh connection: connect, hello offering
/// `extensions`, ServerHello.
pub(crate) async fn handshake(
    src: IpAddr,
    dst: SocketAddr,
    extensions: u8,
) -> Result<(Raw, ServerHelloRaw), String> {
    let mut raw = Raw::connect(src, dst)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    raw.send(&super::wire::new_session_hello(extensions))
        .await
        .map_err(|e| format!("sending the hello: {e}"))?;
    let hello = raw
        .server_hello(Duration::from_secs(3))
        .await
        .map_err(|r| format!("no server hello: {r:?}"))?;
    if hello.rejected() {
        return Err(format!("new session refused: {hello:?}"));
    }
    Ok((raw, hello))
}

/// An IPv4 address as /proc/net/tcp writes it (`None` for IPv6).
pub(crate) fn proc_hex(a: SocketAddr) -> Option<String> {
    match a {
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(_) => None,
    }
}

/// The state (the `st` column of /proc/net/tcp) of our socket from `local`
/// to `remote`: 0x01 established, 0x08 close-wait (the server sent its
/// FIN), 0x07 closed (reset). Read from the kernel, so that a test can see
/// the server drop a link without reading it.
pub(crate) fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    let (l, r) = (proc_hex(local)?, proc_hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace().skip(1);
        let (la, ra, st) = (cols.next()?, cols.next()?, cols.next()?);
        (la == l && ra == r)
            .then(|| u8::from_str_radix(st, 16).ok())
            .flatten()
    })
}
