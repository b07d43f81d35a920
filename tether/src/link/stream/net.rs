//! TCP and Unix-socket stream links, connectors and listeners.

use std::io;
use std::net::SocketAddr;

use tokio::net::{tcp, TcpStream, ToSocketAddrs};

use super::{StreamConfig, StreamLink};
use crate::link::{Connector, LinkError, Listener};

/// A stream link over TCP; both halves own the socket (no lock).
pub type TcpLink = StreamLink<tcp::OwnedReadHalf, tcp::OwnedWriteHalf>;

impl StreamLink<tcp::OwnedReadHalf, tcp::OwnedWriteHalf> {
    /// A link over a connected TCP socket. Sets `TCP_NODELAY`: the link
    /// batches on its own, so Nagle's algorithm would only add latency (a
    /// failure to set it is logged, not fatal). The socket is split with
    /// `into_split`, so the halves share no lock.
    pub fn tcp(stream: TcpStream, config: StreamConfig) -> Self {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!(error = %err, "could not set TCP_NODELAY on a link");
        }
        let (reader, writer) = stream.into_split();
        StreamLink::from_halves(reader, writer, config)
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
    /// [`local_addr`](TcpListener::local_addr)); links use the default
    /// [`StreamConfig`].
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let inner = tokio::net::TcpListener::bind(addr).await?;
        Ok(TcpListener::from_tokio(inner, StreamConfig::default()))
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

    /// Waits for the next connection. Cancel-safe.
    async fn accept(&mut self) -> Result<TcpLink, LinkError> {
        let (stream, _peer) = self.inner.accept().await?;
        Ok(StreamLink::tcp(stream, self.config.clone()))
    }
}

#[cfg(unix)]
pub use self::unix::{UnixConnector, UnixLink, UnixListener};

#[cfg(unix)]
mod unix {
    use std::io;
    use std::path::{Path, PathBuf};

    use tokio::net::{unix, UnixStream};

    use super::super::{StreamConfig, StreamLink};
    use crate::link::{Connector, LinkError, Listener};

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

        /// Waits for the next connection. Cancel-safe.
        async fn accept(&mut self) -> Result<UnixLink, LinkError> {
            let (stream, _peer) = self.inner.accept().await?;
            Ok(StreamLink::unix(stream, self.config.clone()))
        }
    }
}
