//! The server side: [`WsListener`] and [`WsPending`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::ToSocketAddrs;
use tokio_websockets::ServerBuilder;

use super::handshake::{self, ServerRules};
use super::link::{Transport, WsIo};
use super::{limits, ws_config, WsConfig, WsLink, HTTP_ALPN};
use crate::link::{
    LinkError, Listener, PeerInfo, PendingLink, ServerTls, TcpListener, TcpPending, TlsPeer,
};

/// What every connection of one listener is checked against.
#[derive(Clone)]
struct Settings {
    path: String,
    config: WsConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts [`WsLink`]s: TCP connections from a [`TcpListener`], each handed
/// out at once as a [`WsPending`] whose
/// [`establish`](PendingLink::establish) runs the TLS handshake (for
/// `wss://`) and the HTTP upgrade.
pub struct WsListener {
    inner: TcpListener,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for WsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsListener")
            .field("inner", &self.inner)
            .field("path", &self.settings.path)
            .field("tls", &self.settings.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl WsListener {
    /// `ws://` on the connections `inner` accepts, at the path `/`, with
    /// the default [`WsConfig`].
    pub fn new(inner: TcpListener) -> Self {
        WsListener {
            inner,
            settings: Arc::new(Settings {
                path: "/".into(),
                config: WsConfig::default(),
                tls: None,
            }),
        }
    }

    /// Binds a TCP listener to `addr` (see [`TcpListener::bind`]) and
    /// serves `ws://` on it.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Ok(WsListener::new(TcpListener::bind(addr).await?))
    }

    fn settings(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    /// The same listener serving `wss://`: TLS with `tls` first. Its ALPN
    /// list is replaced by `http/1.1` (clients that offer none are
    /// accepted too); everything else is used as it is.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        let mut config = (*tls.config()).clone();
        config.alpn_protocols = vec![HTTP_ALPN.to_vec()];
        self.settings().tls = Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        self
    }

    /// The same listener accepting upgrades to `path` only (default `/`;
    /// the query does not count): a request for another path is answered
    /// `404 Not Found`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.settings().path = path.into();
        self
    }

    /// The same listener, its links and handshakes using `config`.
    pub fn config(mut self, config: WsConfig) -> Self {
        self.settings().config = config;
        self
    }

    /// The address the TCP listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl Listener for WsListener {
    type Link = WsLink;
    type Pending = WsPending;

    /// The next TCP connection, before TLS or HTTP: nothing is read here.
    /// Cancel-safe.
    async fn accept(&mut self) -> Result<WsPending, LinkError> {
        Ok(WsPending {
            tcp: self.inner.accept().await?,
            settings: self.settings.clone(),
        })
    }
}

/// A TCP connection accepted by a [`WsListener`], before its TLS handshake
/// and HTTP upgrade.
pub struct WsPending {
    tcp: TcpPending,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for WsPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsPending")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl PendingLink for WsPending {
    type Link = WsLink;

    /// The TCP peer's address (known before any handshake).
    fn addr(&self) -> Option<SocketAddr> {
        self.tcp.addr()
    }

    /// Runs the TLS handshake (`wss://`), reads the upgrade request (at
    /// most [`WsConfig::max_head`] bytes), checks it and answers `101`, for
    /// as long as the peer takes: a server runs this under its handshake
    /// timeout. A request that is not an upgrade to the listener's path is
    /// answered with an HTTP error status and fails with
    /// [`WsError::Refused`](super::WsError::Refused). The link's
    /// [`Link::peer`](crate::Link::peer) has the TCP address, the request
    /// in [`PeerInfo::http`] and, for `wss://`, [`PeerInfo::tls`].
    async fn establish(self) -> Result<WsLink, LinkError> {
        let addr = self.tcp.addr();
        let settings = self.settings;
        let tcp = self.tcp.into_stream();
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "could not set TCP_NODELAY on a WebSocket link");
        }
        let (transport, tls) = match &settings.tls {
            None => (Transport::Tcp(tcp), None),
            Some(acceptor) => {
                let stream = acceptor.accept(tcp).await?;
                let peer = TlsPeer::from_server_connection(stream.get_ref().1);
                (
                    Transport::Tls(Box::new(stream.into())),
                    Some(Arc::new(peer)),
                )
            }
        };
        let mut io = WsIo::new(transport, bytes::Bytes::new());
        let rules = ServerRules {
            path: &settings.path,
            max_head: settings.config.max_head,
        };
        let (http, rest) = handshake::server(&mut io, rules).await?;
        let ws = ServerBuilder::new()
            .limits(limits(&settings.config))
            .config(ws_config(&settings.config))
            .serve(io.with_prefix(rest));
        let peer = PeerInfo {
            addr,
            tls,
            http: Some(Arc::new(http)),
        };
        Ok(WsLink::new(ws, peer, &settings.config))
    }
}
