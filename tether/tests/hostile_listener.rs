//! Issue 10, row 8: a custom [`Listener`] whose per-connection setup waits
//! on the peer (here a one-byte preamble) must not let one silent socket
//! hold up every other client.
//!
//! With the two-phase listener, `Listener::accept` only takes the
//! connection; `PendingLink::establish` reads the preamble, and the server
//! runs it in the connection's own task under the handshake timeout. The
//! test connects idle sockets that never send the preamble, then an honest
//! client that does, and measures how long the honest client takes to be
//! served (connect + first echo), and how long the server keeps the idle
//! sockets.
//!
//! Run with `-- --nocapture` to see the figures.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tether::link::{PendingLink, StreamConfig, StreamLink, TcpLink};
use tether::{Config, Connector, LinkError, Listener, Server, StableConduit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// The byte every connection must send before its link starts.
const PREAMBLE: u8 = 0x7e;

/// The server's handshake timeout, which also bounds `establish`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts TCP connections whose first byte must be [`PREAMBLE`].
struct PreambleListener {
    inner: tokio::net::TcpListener,
}

/// A connection whose preamble has not been read yet.
struct PreamblePending {
    stream: TcpStream,
    addr: SocketAddr,
}

impl Listener for PreambleListener {
    type Link = TcpLink;
    type Pending = PreamblePending;

    /// Only the accept system call: never waits on the peer.
    async fn accept(&mut self) -> Result<PreamblePending, LinkError> {
        let (stream, addr) = self.inner.accept().await?;
        Ok(PreamblePending { stream, addr })
    }
}

impl PendingLink for PreamblePending {
    type Link = TcpLink;

    fn addr(&self) -> Option<SocketAddr> {
        Some(self.addr)
    }

    /// Waits for the preamble: as long as the peer takes, which is why it
    /// must not run in the accept loop.
    async fn establish(mut self) -> Result<TcpLink, LinkError> {
        let mut byte = [0u8; 1];
        self.stream.read_exact(&mut byte).await?;
        if byte[0] != PREAMBLE {
            return Err(LinkError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad preamble {:#04x}", byte[0]),
            )));
        }
        Ok(StreamLink::tcp(self.stream, StreamConfig::default()))
    }
}

/// The honest client's connector: sends the preamble, then speaks tether.
struct PreambleConnector {
    addr: SocketAddr,
}

impl Connector for PreambleConnector {
    type Link = TcpLink;

    async fn connect(&self) -> Result<TcpLink, LinkError> {
        let mut stream = TcpStream::connect(self.addr).await?;
        stream.write_all(&[PREAMBLE]).await?;
        Ok(StreamLink::tcp(stream, StreamConfig::default()))
    }
}

/// An echo server behind a [`PreambleListener`] on 127.0.0.1, port 0.
async fn echo_server() -> SocketAddr {
    let inner = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = inner.local_addr().expect("local addr");
    let mut config = Config::default();
    config = config.handshake_timeout(HANDSHAKE_TIMEOUT);
    let server = Arc::new(Server::<String>::new(PreambleListener { inner }, config));
    tokio::spawn(async move {
        while let Some(mut conduit) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(msg)) = conduit.recv().await {
                    if conduit.send(&msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Connect + first echo, timed.
async fn honest(addr: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let mut config = Config::default();
    config = config.handshake_timeout(Duration::from_secs(2));
    config = config.reconnect_with(|r| r.give_up_after(Some(Duration::from_secs(4))));
    let served = timeout(Duration::from_secs(6), async {
        let mut conduit = StableConduit::<String>::connect(PreambleConnector { addr }, config)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        conduit
            .send(&"hello".to_string())
            .await
            .map_err(|e| format!("send: {e}"))?;
        match conduit.recv().await {
            Ok(Some(m)) if m == "hello" => Ok(()),
            other => Err(format!("echo: {other:?}")),
        }
    })
    .await
    .map_err(|_| "not served within 6 s".to_string())?;
    served.map(|()| start.elapsed())
}

/// How long until the server closes `stream` (reading and discarding),
/// `None` if still open after `within`.
async fn closed_after(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match timeout(
            within.saturating_sub(start.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row8_a_silent_socket_does_not_block_the_listener() {
    let addr = echo_server().await;
    let mut failed = Vec::new();
    let mut check = |criterion: &str, ok: bool, measured: String| {
        eprintln!(
            "[row8] {} {criterion} (measured: {measured})",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(format!("{criterion} (measured: {measured})"));
        }
    };

    // One idle socket that never sends the preamble, connected first.
    let mut idle = TcpStream::connect(addr).await.expect("idle connect");
    let idle_since = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let served = honest(addr).await;
    check(
        "with one idle socket, an honest client is served (connect + first echo) < 1 s",
        matches!(served, Ok(d) if d < Duration::from_secs(1)),
        format!("{served:?}"),
    );

    // Sixteen more, and a socket with a wrong preamble.
    let mut more = Vec::new();
    for _ in 0..16 {
        more.push(TcpStream::connect(addr).await.expect("idle connect"));
    }
    let mut wrong = TcpStream::connect(addr).await.expect("connect");
    wrong.write_all(&[0x00]).await.expect("wrong preamble");
    let served = honest(addr).await;
    check(
        "with 17 idle sockets, an honest client is served < 1 s",
        matches!(served, Ok(d) if d < Duration::from_secs(1)),
        format!("{served:?}"),
    );
    let wrong_closed = closed_after(&mut wrong, Duration::from_secs(3)).await;
    check(
        "a wrong preamble gets the socket closed < 1 s",
        matches!(wrong_closed, Some(d) if d < Duration::from_secs(1)),
        format!("{wrong_closed:?}"),
    );

    // The setup runs under the handshake timeout: the idle socket goes.
    let bound = HANDSHAKE_TIMEOUT + Duration::from_secs(1);
    let left = (bound + Duration::from_secs(2)).saturating_sub(idle_since.elapsed());
    let idle_closed = closed_after(&mut idle, left)
        .await
        .map(|_| idle_since.elapsed());
    check(
        &format!(
            "the idle socket is closed within the handshake timeout ({HANDSHAKE_TIMEOUT:?}) + 1 s"
        ),
        matches!(idle_closed, Some(d) if d < bound),
        format!("{idle_closed:?} after connecting"),
    );
    drop(more);
    assert!(
        failed.is_empty(),
        "row 8: {} criteria failed:\n  - {}\nparameters: preamble {PREAMBLE:#04x}, handshake timeout {HANDSHAKE_TIMEOUT:?}",
        failed.len(),
        failed.join("\n  - ")
    );
}
