//! One link type for every transport, chosen at run time.
//!
//! The conduits are generic over their link, which costs nothing on the hot
//! path but fixes the transport at compile time. A program that picks its
//! transport from a command line or a URL (`tcp://`, `tls://`, `ws://`,
//! `wss://`, `unix:`), or a server that listens on several transports at
//! once, uses these instead:
//!
//! - [`AnyConnector`]: a connector for any transport, parsed from a URL
//!   with [`AnyConnector::parse`] or built from a concrete connector with
//!   `From`.
//! - [`AnyListener`]: accepts from any number of listeners of any
//!   transports at once, so that one [`Server`](crate::Server) (one session
//!   table, one set of limits) serves them all.
//! - [`AnyLink`], [`AnyTx`], [`AnyRx`], [`AnyPending`]: the links they
//!   produce, an enum over each transport's own type. Dispatch is one
//!   `match` per call: no boxing, no allocation per payload.
//!
//! A session's resume can arrive over any of an [`AnyListener`]'s
//! transports: a client that moves from WebSocket to TCP keeps its session.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::mem::{MemConnector, MemLink};
use super::stream::{split_host_port, StreamConfig};
use super::tls::{ClientTls, TlsConnector, TlsLink, TlsPending};
use super::ws::{WsConnector, WsLink, WsPending};
use super::{
    Connector, Link, LinkError, LinkRx, LinkTx, Listener, PeerInfo, PendingLink, Ready,
    TcpConnector, TcpLink, TcpPending,
};
#[cfg(unix)]
use super::{UnixConnector, UnixLink, UnixPending};

/// Calls `$body` with `$inner` bound to the value inside any variant of
/// `$value`, an enum whose variants are named after the transports.
macro_rules! each {
    ($ty:ident, $value:expr, $inner:ident => $body:expr) => {
        match $value {
            $ty::Mem($inner) => $body,
            $ty::Tcp($inner) => $body,
            #[cfg(unix)]
            $ty::Unix($inner) => $body,
            $ty::Tls($inner) => $body,
            $ty::Ws($inner) => $body,
        }
    };
}

/// A link of any transport.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyLink {
    /// In memory.
    Mem(MemLink),
    /// TCP.
    Tcp(TcpLink),
    /// A Unix-domain socket.
    #[cfg(unix)]
    Unix(UnixLink),
    /// TLS over TCP.
    Tls(TlsLink),
    /// WebSocket (`ws://` or `wss://`).
    Ws(WsLink),
}

/// The sending half of an [`AnyLink`].
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyTx {
    /// In memory.
    Mem(<MemLink as Link>::Tx),
    /// TCP.
    Tcp(<TcpLink as Link>::Tx),
    /// A Unix-domain socket.
    #[cfg(unix)]
    Unix(<UnixLink as Link>::Tx),
    /// TLS over TCP.
    Tls(<TlsLink as Link>::Tx),
    /// WebSocket (`ws://` or `wss://`).
    Ws(<WsLink as Link>::Tx),
}

/// The receiving half of an [`AnyLink`].
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyRx {
    /// In memory.
    Mem(<MemLink as Link>::Rx),
    /// TCP.
    Tcp(<TcpLink as Link>::Rx),
    /// A Unix-domain socket.
    #[cfg(unix)]
    Unix(<UnixLink as Link>::Rx),
    /// TLS over TCP.
    Tls(<TlsLink as Link>::Rx),
    /// WebSocket (`ws://` or `wss://`).
    Ws(<WsLink as Link>::Rx),
}

impl Link for AnyLink {
    type Tx = AnyTx;
    type Rx = AnyRx;

    fn split(self) -> (AnyTx, AnyRx) {
        match self {
            AnyLink::Mem(l) => {
                let (tx, rx) = l.split();
                (AnyTx::Mem(tx), AnyRx::Mem(rx))
            }
            AnyLink::Tcp(l) => {
                let (tx, rx) = l.split();
                (AnyTx::Tcp(tx), AnyRx::Tcp(rx))
            }
            #[cfg(unix)]
            AnyLink::Unix(l) => {
                let (tx, rx) = l.split();
                (AnyTx::Unix(tx), AnyRx::Unix(rx))
            }
            AnyLink::Tls(l) => {
                let (tx, rx) = l.split();
                (AnyTx::Tls(tx), AnyRx::Tls(rx))
            }
            AnyLink::Ws(l) => {
                let (tx, rx) = l.split();
                (AnyTx::Ws(tx), AnyRx::Ws(rx))
            }
        }
    }

    fn peer(&self) -> PeerInfo {
        each!(AnyLink, self, l => l.peer())
    }
}

impl LinkTx for AnyTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        each!(AnyTx, self, tx => tx.feed(payload).await)
    }

    fn copy_threshold(&self) -> usize {
        each!(AnyTx, self, tx => tx.copy_threshold())
    }

    async fn feed_copy(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        each!(AnyTx, self, tx => tx.feed_copy(payload).await)
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        each!(AnyTx, self, tx => tx.flush().await)
    }

    async fn send(&mut self, payload: Bytes) -> Result<(), LinkError> {
        each!(AnyTx, self, tx => tx.send(payload).await)
    }

    async fn close(&mut self) -> Result<(), LinkError> {
        each!(AnyTx, self, tx => tx.close().await)
    }
}

impl LinkRx for AnyRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        each!(AnyRx, self, rx => rx.recv().await)
    }

    fn set_max_payload(&mut self, max: usize) {
        each!(AnyRx, self, rx => rx.set_max_payload(max))
    }
}

/// A connection accepted by an [`AnyListener`], not yet set up.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyPending {
    /// In memory (no setup).
    Mem(Ready<MemLink>),
    /// TCP (no setup).
    Tcp(TcpPending),
    /// A Unix-domain socket (no setup).
    #[cfg(unix)]
    Unix(UnixPending),
    /// TLS over TCP: the TLS handshake.
    Tls(TlsPending),
    /// WebSocket: the TLS handshake for `wss://`, then the HTTP upgrade.
    Ws(WsPending),
}

impl PendingLink for AnyPending {
    type Link = AnyLink;

    fn addr(&self) -> Option<SocketAddr> {
        each!(AnyPending, self, p => p.addr())
    }

    async fn establish(self) -> Result<AnyLink, LinkError> {
        Ok(match self {
            AnyPending::Mem(p) => AnyLink::Mem(p.establish().await?),
            AnyPending::Tcp(p) => AnyLink::Tcp(p.establish().await?),
            #[cfg(unix)]
            AnyPending::Unix(p) => AnyLink::Unix(p.establish().await?),
            AnyPending::Tls(p) => AnyLink::Tls(p.establish().await?),
            AnyPending::Ws(p) => AnyLink::Ws(p.establish().await?),
        })
    }
}

/// Pending connections of every transport this module knows become an
/// [`AnyPending`].
macro_rules! into_any {
    ($($(#[$cfg:meta])? $variant:ident($pending:ty, $link:ty)),* $(,)?) => {$(
        $(#[$cfg])?
        impl From<$pending> for AnyPending {
            fn from(p: $pending) -> AnyPending {
                AnyPending::$variant(p)
            }
        }
        $(#[$cfg])?
        impl From<$link> for AnyLink {
            fn from(l: $link) -> AnyLink {
                AnyLink::$variant(l)
            }
        }
    )*};
}

into_any! {
    Mem(Ready<MemLink>, MemLink),
    Tcp(TcpPending, TcpLink),
    #[cfg(unix)]
    Unix(UnixPending, UnixLink),
    Tls(TlsPending, TlsLink),
    Ws(WsPending, WsLink),
}

/// A connector of any transport.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AnyConnector {
    /// In memory.
    Mem(MemConnector),
    /// TCP to a host name or address.
    Tcp(TcpConnector),
    /// A Unix-domain socket.
    #[cfg(unix)]
    Unix(UnixConnector),
    /// TLS over TCP.
    Tls(TlsConnector),
    /// WebSocket (`ws://` or `wss://`).
    Ws(WsConnector),
}

/// Why [`AnyConnector::parse`] refused a URL.
#[derive(Debug, thiserror::Error)]
#[error("bad server address {url:?}: {why}")]
pub struct AddressError {
    url: String,
    why: String,
}

impl AnyConnector {
    /// A connector for `url`, one of:
    ///
    /// - `host:port` or `tcp://host:port`: TCP;
    /// - `tls://host:port`: TLS over TCP, the certificate checked against
    ///   `host` with `tls` (the Mozilla roots if `None`);
    /// - `ws://host[:port][/path]`: WebSocket (port 80 by default);
    /// - `wss://host[:port][/path]`: WebSocket over TLS (port 443 by
    ///   default), the certificate checked against `host` with `tls` (the
    ///   Mozilla roots if `None`);
    /// - `unix:PATH` or `unix://PATH`: a Unix-domain socket.
    ///
    /// Host names are resolved again on every connect, trying each
    /// address. IPv6 addresses go in brackets: `[::1]:4000`.
    pub fn parse(url: &str, tls: Option<ClientTls>) -> Result<AnyConnector, AddressError> {
        let bad = |why: &dyn std::fmt::Display| AddressError {
            url: url.to_owned(),
            why: why.to_string(),
        };
        let host_port =
            |rest: &str| split_host_port(rest.trim_end_matches('/')).map_err(|e| bad(&e));
        if let Some(rest) = url.strip_prefix("tcp://") {
            let (host, port) = host_port(rest)?;
            return Ok(AnyConnector::Tcp(TcpConnector::host(host, port)));
        }
        if let Some(rest) = url.strip_prefix("tls://") {
            let (host, port) = host_port(rest)?;
            let tls = tls.unwrap_or_else(ClientTls::webpki_roots);
            return Ok(AnyConnector::Tls(TlsConnector::new(host, port, tls)));
        }
        if url.starts_with("ws://") || url.starts_with("wss://") {
            return WsConnector::parse(url, tls)
                .map(AnyConnector::Ws)
                .map_err(|e| bad(&e));
        }
        if let Some(rest) = url.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad(&"no socket path"));
            }
            #[cfg(unix)]
            return Ok(AnyConnector::Unix(UnixConnector::new(PathBuf::from(path))));
            #[cfg(not(unix))]
            return Err(bad(&"Unix sockets are not available here"));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format_args!(
                "unknown scheme {scheme:?} (tcp, tls, ws, wss, unix)"
            )));
        }
        let (host, port) = host_port(url)?;
        Ok(AnyConnector::Tcp(TcpConnector::host(host, port)))
    }

    /// The same connector, its stream links using `config` (no effect on
    /// in-memory and WebSocket links).
    pub fn stream_config(self, config: StreamConfig) -> AnyConnector {
        match self {
            AnyConnector::Tcp(c) => AnyConnector::Tcp(c.config(config)),
            AnyConnector::Tls(c) => AnyConnector::Tls(c.config(config)),
            #[cfg(unix)]
            AnyConnector::Unix(c) => {
                AnyConnector::Unix(UnixConnector::with_config(c.path(), config))
            }
            other => other,
        }
    }
}

impl Connector for AnyConnector {
    type Link = AnyLink;

    async fn connect(&self) -> Result<AnyLink, LinkError> {
        Ok(each!(AnyConnector, self, c => AnyLink::from(c.connect().await?)))
    }
}

macro_rules! connector_into_any {
    ($($(#[$cfg:meta])? $variant:ident($connector:ty)),* $(,)?) => {$(
        $(#[$cfg])?
        impl From<$connector> for AnyConnector {
            fn from(c: $connector) -> AnyConnector {
                AnyConnector::$variant(c)
            }
        }
    )*};
}

connector_into_any! {
    Mem(MemConnector),
    Tcp(TcpConnector),
    #[cfg(unix)]
    Unix(UnixConnector),
    Tls(TlsConnector),
    Ws(WsConnector),
}

/// Accepts from several listeners, of any transports, at once.
///
/// Each listener added runs its accept loop in a task of its own, which
/// only takes connections (the two-phase accept keeps setup out of it) and
/// hands them to [`accept`](Listener::accept) in arrival order. Dropping
/// the `AnyListener` stops those tasks and closes their listeners.
#[derive(Debug)]
pub struct AnyListener {
    tx: mpsc::Sender<Result<AnyPending, LinkError>>,
    rx: mpsc::Receiver<Result<AnyPending, LinkError>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Default for AnyListener {
    fn default() -> Self {
        AnyListener::new()
    }
}

impl AnyListener {
    /// A listener with nothing to listen on yet: add listeners with
    /// [`with`](AnyListener::with). Until one is added, `accept` waits.
    pub fn new() -> AnyListener {
        // One slot: a connection waits in the channel only until the
        // server's accept loop takes it, and the kernel's backlog queues
        // the rest.
        let (tx, rx) = mpsc::channel(1);
        AnyListener {
            tx,
            rx,
            tasks: Vec::new(),
        }
    }

    /// Also accepts from `listener`. Must be called within a tokio runtime.
    pub fn with<L>(mut self, mut listener: L) -> AnyListener
    where
        L: Listener,
        L::Pending: Into<AnyPending>,
    {
        let tx = self.tx.clone();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let next = listener.accept().await.map(Into::into);
                if tx.send(next).await.is_err() {
                    return;
                }
            }
        }));
        self
    }

    /// How many listeners were added.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no listener was added.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for AnyListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Listener for AnyListener {
    type Link = AnyLink;
    type Pending = AnyPending;

    /// The next connection from any of the listeners. Cancel-safe. An
    /// error is one listener's own (transient, as for that listener).
    async fn accept(&mut self) -> Result<AnyPending, LinkError> {
        match self.rx.recv().await {
            Some(next) => next,
            // Unreachable while `self.tx` lives; kept total.
            None => Err(LinkError::Io(io::Error::other("every listener stopped"))),
        }
    }
}
