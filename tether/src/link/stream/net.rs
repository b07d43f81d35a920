//! TCP and Unix-socket stream links, connectors and listeners.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{tcp, TcpSocket, TcpStream, ToSocketAddrs};

use super::{StreamConfig, StreamLink};
use crate::link::{Connector, LinkError, Listener, PeerInfo, PendingLink};

/// The listen backlog of [`TcpListener::bind`]: how many connections the
/// kernel completes and queues before the server accepts them (capped by
/// the system, e.g. `net.core.somaxconn` on Linux). Large enough that a
/// reconnect storm of many clients is queued rather than refused.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// A stream link over TCP; both halves own the socket (no lock).
pub type TcpLink = StreamLink<tcp::OwnedReadHalf, tcp::OwnedWriteHalf>;

impl StreamLink<tcp::OwnedReadHalf, tcp::OwnedWriteHalf> {
    /// A link over a connected TCP socket. Sets `TCP_NODELAY`: the link
    /// batches on its own, so Nagle's algorithm would only add latency (a
    /// failure to set it is logged, not fatal). The socket is split with
    /// `into_split`, so the halves share no lock. [`Link::peer`] reports
    /// the socket's peer address.
    ///
    /// [`Link::peer`]: crate::link::Link::peer
    pub fn tcp(stream: TcpStream, config: StreamConfig) -> Self {
        let peer = stream.peer_addr().ok();
        StreamLink::tcp_with_peer(stream, peer, config)
    }

    pub(crate) fn tcp_with_peer(
        stream: TcpStream,
        peer: Option<SocketAddr>,
        config: StreamConfig,
    ) -> Self {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!(error = %err, "could not set TCP_NODELAY on a link");
        }
        let (reader, writer) = stream.into_split();
        StreamLink::from_halves(reader, writer, config).with_peer(PeerInfo {
            addr: peer,
            ..PeerInfo::default()
        })
    }
}

/// How long [`connect_any`] waits for one address before it moves on to
/// the next: long enough for a slow but working path, short enough that a
/// black-holed first address (an IPv6 route that silently drops, say) does
/// not hide a working second one for the system's own connect timeout
/// (minutes). The last address gets no extra timeout: the caller's own
/// deadline, if any, applies.
pub(crate) const ADDRESS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a connector connects: a fixed address, or a host name and port
/// resolved again on every connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// One fixed address; no resolution.
    Addr(SocketAddr),
    /// A host name (or an IP address literal) and a port.
    Host { host: String, port: u16 },
}

impl Target {
    /// Connects to the target: a fixed address directly, a host through
    /// [`connect_any`].
    pub(crate) async fn connect(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match self {
            Target::Addr(addr) => Ok((TcpStream::connect(*addr).await?, *addr)),
            Target::Host { host, port } => connect_any(host, *port).await,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(addr) => write!(f, "{addr}"),
            Target::Host { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Splits `"name:port"`, `"1.2.3.4:port"` or `"[::1]:port"` into host and
/// port (the brackets of an IPv6 literal removed).
pub(crate) fn split_host_port(s: &str) -> io::Result<(String, u16)> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} is not host:port: {why}"),
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    let port = port.parse::<u16>().map_err(|_| invalid("bad port"))?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| invalid("unclosed '['"))?,
        None if host.contains(':') => return Err(invalid("an IPv6 address needs brackets")),
        None => host,
    };
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
thread_local! {
    /// Name resolutions [`connect_any`] made on this thread (tests only).
    pub(crate) static RESOLUTIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Resolves `host` (a name, or an IP address literal which needs no
/// resolution) and connects to the first of its addresses that accepts,
/// trying them in the order the resolver returned them.
///
/// Shared by every connector that dials a host name (TCP, TLS, WebSocket):
/// it resolves on *every* call, so a client that reconnects follows a name
/// that moved to another address, and it tries each address in turn, each
/// but the last for at most [`ADDRESS_ATTEMPT_TIMEOUT`], so a dead or
/// unreachable first address does not hide a working second one. Returns
/// the stream and the address it reached. The error, if every address
/// failed, has the kind of the last failure and names the host and how
/// many addresses were tried.
pub(crate) async fn connect_any(host: &str, port: u16) -> io::Result<(TcpStream, SocketAddr)> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let addrs: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            #[cfg(test)]
            RESOLUTIONS.with(|n| n.set(n.get() + 1));
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("resolving {host}: {e}")))?
                .collect()
        }
    };
    connect_each(&addrs, ADDRESS_ATTEMPT_TIMEOUT)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to {host}:{port}: {e}")))
}

/// Connects to the first of `addrs` that accepts, each but the last within
/// `per_address`. The error is the last address's (kind kept), saying how
/// many were tried.
pub(crate) async fn connect_each(
    addrs: &[SocketAddr],
    per_address: Duration,
) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last_err = None;
    for (i, &addr) in addrs.iter().enumerate() {
        let attempt = TcpStream::connect(addr);
        let result = if i + 1 < addrs.len() {
            match tokio::time::timeout(per_address, attempt).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {per_address:?}"),
                )),
            }
        } else {
            attempt.await
        };
        match result {
            Ok(stream) => return Ok((stream, addr)),
            Err(err) => {
                tracing::debug!(%addr, error = %err, "address failed, trying the next");
                last_err = Some((addr, err));
            }
        }
    }
    Err(match last_err {
        Some((addr, err)) => io::Error::new(
            err.kind(),
            format!(
                "{} address(es) tried, the last ({addr}): {err}",
                addrs.len()
            ),
        ),
        None => io::Error::new(io::ErrorKind::NotFound, "no address to connect to"),
    })
}

/// Connects [`TcpLink`]s to one address, or to a host name resolved again
/// on every connect.
#[derive(Clone, Debug)]
pub struct TcpConnector {
    target: Target,
    config: StreamConfig,
}

impl TcpConnector {
    /// A connector to `addr` with the default [`StreamConfig`].
    pub fn new(addr: SocketAddr) -> Self {
        TcpConnector::with_config(addr, StreamConfig::default())
    }

    /// A connector to `addr` whose links use `config`.
    pub fn with_config(addr: SocketAddr, config: StreamConfig) -> Self {
        TcpConnector {
            target: Target::Addr(addr),
            config,
        }
    }

    /// A connector to `host` (a DNS name, or an IP address literal) on
    /// `port`, with the default [`StreamConfig`]. The name is resolved again
    /// on every connect, and each address it resolves to is tried in turn
    /// until one accepts (one that does not answer is given up after a few
    /// seconds if more remain), so a reconnecting client follows a server
    /// that moved and is not stuck on a dead first address.
    pub fn host(host: impl Into<String>, port: u16) -> Self {
        TcpConnector {
            target: Target::Host {
                host: host.into(),
                port,
            },
            config: StreamConfig::default(),
        }
    }

    /// [`host`](Self::host) from one `"name:port"` string (`"[::1]:port"`
    /// for an IPv6 literal). Fails on a string without a valid port.
    pub fn from_host_port(host_port: &str) -> io::Result<Self> {
        let (host, port) = split_host_port(host_port)?;
        Ok(TcpConnector::host(host, port))
    }

    /// The same connector, its links using `config`.
    pub fn config(mut self, config: StreamConfig) -> Self {
        self.config = config;
        self
    }

    /// The fixed address connected to; `None` for a connector to a host
    /// name (see [`host_port`](Self::host_port)).
    pub fn addr(&self) -> Option<SocketAddr> {
        match self.target {
            Target::Addr(addr) => Some(addr),
            Target::Host { .. } => None,
        }
    }

    /// The host name and port connected to; `None` for a connector to a
    /// fixed address.
    pub fn host_port(&self) -> Option<(&str, u16)> {
        match &self.target {
            Target::Addr(_) => None,
            Target::Host { host, port } => Some((host, *port)),
        }
    }
}

impl Connector for TcpConnector {
    type Link = TcpLink;

    async fn connect(&self) -> Result<TcpLink, LinkError> {
        let (stream, addr) = self.target.connect().await?;
        Ok(StreamLink::tcp_with_peer(
            stream,
            Some(addr),
            self.config.clone(),
        ))
    }
}

/// Accepts [`TcpLink`]s.
#[derive(Debug)]
pub struct TcpListener {
    inner: tokio::net::TcpListener,
    config: StreamConfig,
}

impl TcpListener {
    /// Binds to `addr` (port 0 picks a free port; see
    /// [`local_addr`](TcpListener::local_addr)) with a listen backlog of
    /// [`DEFAULT_BACKLOG`]; links use the default [`StreamConfig`]. If
    /// `addr` resolves to several addresses, the first that binds is used.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let mut last_err = None;
        for addr in tokio::net::lookup_host(addr).await? {
            match TcpListener::bind_with(addr, DEFAULT_BACKLOG, StreamConfig::default()) {
                Ok(listener) => return Ok(listener),
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "could not resolve to any address",
            )
        }))
    }

    /// Binds to `addr` with a listen backlog of `backlog` connections (the
    /// system may cap it; see [`DEFAULT_BACKLOG`]); accepted links use
    /// `config`. On Unix the socket is bound with `SO_REUSEADDR`, as
    /// [`tokio::net::TcpListener::bind`] does, so a restarted server can
    /// bind its port again while old connections linger. Must be called
    /// within a tokio runtime.
    pub fn bind_with(addr: SocketAddr, backlog: u32, config: StreamConfig) -> io::Result<Self> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // On Windows SO_REUSEADDR would let another socket steal the port.
        #[cfg(not(windows))]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let inner = socket.listen(backlog)?;
        Ok(TcpListener::from_tokio(inner, config))
    }

    /// Wraps a bound tokio listener; accepted links use `config`.
    pub fn from_tokio(inner: tokio::net::TcpListener, config: StreamConfig) -> Self {
        TcpListener { inner, config }
    }

    /// The address this listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl Listener for TcpListener {
    type Link = TcpLink;
    type Pending = TcpPending;

    /// Waits for the next connection: the accepted socket and its peer's
    /// address, nothing more. Cancel-safe.
    async fn accept(&mut self) -> Result<TcpPending, LinkError> {
        let (stream, addr) = self.inner.accept().await?;
        Ok(TcpPending {
            stream,
            addr,
            config: self.config.clone(),
        })
    }
}

/// A TCP connection accepted by a [`TcpListener`], not yet a link.
///
/// [`establish`](PendingLink::establish) only wraps the socket
/// ([`StreamLink::tcp`]) and never waits. A listener that needs
/// per-connection setup over TCP (TLS, a preamble) can wrap a
/// [`TcpListener`], take the socket with
/// [`into_stream`](TcpPending::into_stream) in its own `establish`, and
/// build the link from whatever the setup produced.
#[derive(Debug)]
pub struct TcpPending {
    stream: TcpStream,
    addr: SocketAddr,
    config: StreamConfig,
}

impl TcpPending {
    /// The accepted socket, for a setup of one's own.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// The settings the listener gives its links.
    pub fn config(&self) -> &StreamConfig {
        &self.config
    }
}

impl PendingLink for TcpPending {
    type Link = TcpLink;

    /// The peer's address, as returned by `accept`.
    fn addr(&self) -> Option<SocketAddr> {
        Some(self.addr)
    }

    async fn establish(self) -> Result<TcpLink, LinkError> {
        Ok(StreamLink::tcp_with_peer(
            self.stream,
            Some(self.addr),
            self.config,
        ))
    }
}

#[cfg(unix)]
pub use self::unix::{UnixConnector, UnixLink, UnixListener, UnixPending};

#[cfg(unix)]
mod unix {
    use std::io;
    use std::path::{Path, PathBuf};

    use tokio::net::{unix, UnixStream};

    use super::super::{StreamConfig, StreamLink};
    use crate::link::{Connector, LinkError, Listener, PendingLink};

    /// A stream link over a Unix-domain socket; both halves own the socket
    /// (no lock).
    pub type UnixLink = StreamLink<unix::OwnedReadHalf, unix::OwnedWriteHalf>;

    impl StreamLink<unix::OwnedReadHalf, unix::OwnedWriteHalf> {
        /// A link over a connected Unix-domain socket, split with
        /// `into_split` (no lock).
        pub fn unix(stream: UnixStream, config: StreamConfig) -> Self {
            let (reader, writer) = stream.into_split();
            StreamLink::from_halves(reader, writer, config)
        }
    }

    /// Connects [`UnixLink`]s to one socket path.
    #[derive(Clone, Debug)]
    pub struct UnixConnector {
        path: PathBuf,
        config: StreamConfig,
    }

    impl UnixConnector {
        /// A connector to the socket at `path` with the default
        /// [`StreamConfig`].
        pub fn new(path: impl AsRef<Path>) -> Self {
            UnixConnector::with_config(path, StreamConfig::default())
        }

        /// A connector to the socket at `path` whose links use `config`.
        pub fn with_config(path: impl AsRef<Path>, config: StreamConfig) -> Self {
            UnixConnector {
                path: path.as_ref().to_path_buf(),
                config,
            }
        }

        /// The socket path connected to.
        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Connector for UnixConnector {
        type Link = UnixLink;

        async fn connect(&self) -> Result<UnixLink, LinkError> {
            let stream = UnixStream::connect(&self.path).await?;
            Ok(StreamLink::unix(stream, self.config.clone()))
        }
    }

    /// Accepts [`UnixLink`]s.
    #[derive(Debug)]
    pub struct UnixListener {
        inner: tokio::net::UnixListener,
        config: StreamConfig,
    }

    impl UnixListener {
        /// Binds a socket at `path` (which must not exist yet; it is not
        /// removed on drop). Links use the default [`StreamConfig`]. Must be
        /// called within a tokio runtime.
        pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
            let inner = tokio::net::UnixListener::bind(path)?;
            Ok(UnixListener::from_tokio(inner, StreamConfig::default()))
        }

        /// Wraps a bound tokio listener; accepted links use `config`.
        pub fn from_tokio(inner: tokio::net::UnixListener, config: StreamConfig) -> Self {
            UnixListener { inner, config }
        }

        /// The address this listener is bound to.
        pub fn local_addr(&self) -> io::Result<tokio::net::unix::SocketAddr> {
            self.inner.local_addr()
        }
    }

    impl Listener for UnixListener {
        type Link = UnixLink;
        type Pending = UnixPending;

        /// Waits for the next connection, returned before any setup.
        /// Cancel-safe.
        async fn accept(&mut self) -> Result<UnixPending, LinkError> {
            let (stream, _peer) = self.inner.accept().await?;
            Ok(UnixPending {
                stream,
                config: self.config.clone(),
            })
        }
    }

    /// A Unix-socket connection accepted by a [`UnixListener`], not yet a
    /// link. It has no address ([`PendingLink::addr`] is `None`);
    /// [`establish`](PendingLink::establish) only wraps the socket.
    #[derive(Debug)]
    pub struct UnixPending {
        stream: UnixStream,
        config: StreamConfig,
    }

    impl UnixPending {
        /// The accepted socket, for a setup of one's own.
        pub fn into_stream(self) -> UnixStream {
            self.stream
        }

        /// The settings the listener gives its links.
        pub fn config(&self) -> &StreamConfig {
            &self.config
        }
    }

    impl PendingLink for UnixPending {
        type Link = UnixLink;

        fn addr(&self) -> Option<std::net::SocketAddr> {
            None
        }

        async fn establish(self) -> Result<UnixLink, LinkError> {
            Ok(StreamLink::unix(self.stream, self.config))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// An address on which nothing listens: bound, then released.
    async fn dead_addr() -> SocketAddr {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_dead_first_address_does_not_hide_a_live_second_one() {
        let live = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let live_addr = live.local_addr().unwrap();
        let dead = dead_addr().await;
        let (_stream, reached) = connect_each(&[dead, live_addr], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(reached, live_addr);
        let err = connect_each(&[dead, dead], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("2 address(es) tried"), "{err}");
        let err = connect_each(&[], Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_black_holed_address_is_given_up_after_the_per_address_timeout() {
        // 192.0.2.0/24 is TEST-NET-1: never routed. Depending on the
        // machine a connect there hangs or fails at once; either way the
        // live address behind it must be reached within the timeout.
        let live = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let live_addr = live.local_addr().unwrap();
        let black_hole: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let started = std::time::Instant::now();
        let (_stream, reached) = connect_each(&[black_hole, live_addr], Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(reached, live_addr);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_host_connector_resolves_again_on_every_connect() {
        let live = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let port = live.local_addr().unwrap().port();
        let connector = TcpConnector::host("localhost", port);
        assert_eq!(connector.addr(), None);
        assert_eq!(connector.host_port(), Some(("localhost", port)));
        let before = RESOLUTIONS.with(|n| n.get());
        for _ in 0..3 {
            let link = connector.connect().await.unwrap();
            assert_eq!(
                crate::link::Link::peer(&link).addr,
                Some(live.local_addr().unwrap())
            );
        }
        assert_eq!(RESOLUTIONS.with(|n| n.get()) - before, 3);
        // An IP literal needs no resolution.
        let literal = TcpConnector::host("127.0.0.1", port);
        literal.connect().await.unwrap();
        assert_eq!(RESOLUTIONS.with(|n| n.get()) - before, 3);
    }

    #[test]
    fn host_port_strings() {
        assert_eq!(
            split_host_port("example.com:443").unwrap(),
            ("example.com".into(), 443)
        );
        assert_eq!(split_host_port("[::1]:80").unwrap(), ("::1".into(), 80));
        assert_eq!(
            split_host_port("10.0.0.1:1").unwrap(),
            ("10.0.0.1".into(), 1)
        );
        for bad in [
            "example.com",
            "example.com:x",
            ":80",
            "::1:80",
            "[::1:80",
            "a:70000",
        ] {
            let err = split_host_port(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        let c = TcpConnector::from_host_port("localhost:7").unwrap();
        assert_eq!(c.host_port(), Some(("localhost", 7)));
        assert_eq!(
            Target::Host {
                host: "::1".into(),
                port: 5
            }
            .to_string(),
            "[::1]:5"
        );
    }
}
