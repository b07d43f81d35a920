//! TCP and Unix-socket stream links, connectors and listeners.

use std::io;
use std::net::SocketAddr;

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

    fn tcp_with_peer(stream: TcpStream, peer: Option<SocketAddr>, config: StreamConfig) -> Self {
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

/// Connects [`TcpLink`]s to one address.
#[derive(Clone, Debug)]
pub struct TcpConnector {
    addr: SocketAddr,
    config: StreamConfig,
}

impl TcpConnector {
    /// A connector to `addr` with the default [`StreamConfig`].
    pub fn new(addr: SocketAddr) -> Self {
        TcpConnector::with_config(addr, StreamConfig::default())
    }

    /// A connector to `addr` whose links use `config`.
    pub fn with_config(addr: SocketAddr, config: StreamConfig) -> Self {
        TcpConnector { addr, config }
    }

    /// The address connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Connector for TcpConnector {
    type Link = TcpLink;

    async fn connect(&self) -> Result<TcpLink, LinkError> {
        let stream = TcpStream::connect(self.addr).await?;
        Ok(StreamLink::tcp(stream, self.config.clone()))
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
