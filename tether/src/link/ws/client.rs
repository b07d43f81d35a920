//! The client side: [`WsConnector`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio_websockets::ClientBuilder;

use super::link::{Transport, WsIo};
use super::{handshake, limits, ws_config, WsConfig, WsLink, HTTP_ALPN};
use crate::link::stream::{split_host_port, Target};
use crate::link::{ClientTls, Connector, LinkError, PeerInfo, TlsPeer};

/// Headers the connector writes itself, which [`WsConnector::header`]
/// refuses.
const OWN_HEADERS: &[&str] = &[
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "content-length",
    "transfer-encoding",
];

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

#[derive(Clone, Debug)]
struct Wss {
    config: Arc<ClientConfig>,
    /// `Err` holds a name that is neither a DNS name nor an IP address.
    server_name: Result<ServerName<'static>, String>,
}

fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned()).map_err(|_| name.to_owned())
}

/// Connects [`WsLink`]s to a `ws://` or `wss://` URL: TCP to each address
/// the host resolves to in turn (resolved again on every connect), for
/// `wss://` a TLS handshake that checks the server's certificate for the
/// host, then the HTTP/1.1 upgrade request for the URL's path and query,
/// with any extra headers set with [`header`](Self::header).
#[derive(Clone, Debug)]
pub struct WsConnector {
    target: Target,
    /// The `Host` header value.
    authority: String,
    /// The request target: path and query.
    resource: String,
    tls: Option<Wss>,
    /// Extra header lines, each ending in CRLF.
    extra: String,
    config: WsConfig,
}

impl WsConnector {
    /// A connector to `url`: `ws://host[:port][/path][?query]` (port 80 by
    /// default), or the same with `wss://` (port 443 by default, TLS
    /// trusting Mozilla's roots; see [`parse`](Self::parse) for other
    /// roots). IPv6 literals go in brackets: `ws://[::1]:4000/`.
    pub fn new(url: &str) -> io::Result<Self> {
        WsConnector::parse(url, None)
    }

    /// Like [`new`](Self::new), a `wss://` URL trusting what `tls` trusts
    /// (Mozilla's roots if `None`; ignored for `ws://`). The TLS session
    /// offers the ALPN protocol `http/1.1` (not tether's own, as the
    /// server is an HTTP endpoint, maybe a proxy), and shares `tls`'s
    /// session cache, so reconnects resume.
    pub fn parse(url: &str, tls: Option<ClientTls>) -> io::Result<Self> {
        let bad = |why: &str| invalid(format!("{url:?} is not a ws:// or wss:// URL: {why}"));
        let (secure, rest) = if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else {
            return Err(bad("the scheme must be ws or wss"));
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, resource) = rest.split_at(split);
        if authority.contains('@') {
            return Err(bad("user information is not supported"));
        }
        if resource.contains(['#', ' ', '\r', '\n']) {
            return Err(bad("bad characters in the path"));
        }
        let default_port = if secure { 443 } else { 80 };
        let has_port = match authority.rfind(':') {
            Some(at) => !authority[at..].contains(']'),
            None => false,
        };
        let (host, port) = if has_port {
            split_host_port(authority)?
        } else {
            let host = authority
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(authority);
            if host.is_empty() || (host.contains(':') && !authority.starts_with('[')) {
                return Err(bad("no host"));
            }
            (host.to_owned(), default_port)
        };
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let resource = match resource {
            "" => "/".to_owned(),
            r if r.starts_with('?') => format!("/{r}"),
            r => r.to_owned(),
        };
        let tls = secure.then(|| {
            let tls = tls.unwrap_or_else(ClientTls::webpki_roots);
            let mut config = (*tls.config()).clone();
            config.alpn_protocols = vec![HTTP_ALPN.to_vec()];
            Wss {
                config: Arc::new(config),
                server_name: server_name(&host),
            }
        });
        Ok(WsConnector {
            target: Target::Host { host, port },
            authority,
            resource,
            tls,
            extra: String::new(),
            config: WsConfig::default(),
        })
    }

    /// The same connector, sending the header `name: value` with every
    /// upgrade request (an `Authorization` header, say). Fails on a name or
    /// value that is not valid in HTTP, or on a header the connector writes
    /// itself (`Host`, `Upgrade`, `Connection`, `Sec-WebSocket-*`).
    pub fn header(mut self, name: &str, value: &str) -> io::Result<Self> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("{name:?} is not an HTTP header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid(format!("bad value for the header {name}")))?;
        if OWN_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("sec-websocket-") {
            return Err(invalid(format!("the header {name} is the connector's own")));
        }
        let value = value
            .to_str()
            .map_err(|_| invalid("non-ASCII value".into()))?;
        self.extra.push_str(&format!("{name}: {value}\r\n"));
        Ok(self)
    }

    /// For `wss://`: sends `name` as SNI and checks the server's
    /// certificate against it instead of the URL's host (a server reached
    /// by address, or through a tunnel). No effect on `ws://`.
    pub fn server_name(mut self, name: &str) -> Self {
        if let Some(tls) = &mut self.tls {
            tls.server_name = server_name(name);
        }
        self
    }

    /// The same connector, dialling `addr` instead of resolving the URL's
    /// host; the request's `Host` header, the SNI and the certificate check
    /// still follow the URL (or [`server_name`](Self::server_name)). For a
    /// server reached through a TCP forwarder (an SSH tunnel, a test's
    /// fault proxy) that should see the request as if dialled directly;
    /// like curl's `--connect-to`.
    pub fn connect_to(mut self, addr: SocketAddr) -> Self {
        self.target = Target::Addr(addr);
        self
    }

    /// The same connector, its links using `config`.
    pub fn config(mut self, config: WsConfig) -> Self {
        self.config = config;
        self
    }

    /// Whether this connector speaks `wss://`.
    pub fn is_secure(&self) -> bool {
        self.tls.is_some()
    }

    fn request(&self, key: &str) -> String {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{}\r\n",
            self.resource, self.authority, self.extra
        )
    }
}

impl Connector for WsConnector {
    type Link = WsLink;

    /// Resolves, connects, runs the TLS handshake for `wss://`, then the
    /// HTTP upgrade. A server that answers anything but `101` fails with
    /// [`WsError::Refused`](super::WsError::Refused) and its status.
    async fn connect(&self) -> Result<WsLink, LinkError> {
        let (tcp, addr) = self.target.connect().await?;
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "could not set TCP_NODELAY on a WebSocket link");
        }
        let (transport, tls_peer) = match &self.tls {
            None => (Transport::Tcp(tcp), None),
            Some(wss) => {
                let name = wss.server_name.clone().map_err(|name| {
                    LinkError::Io(invalid(format!("tls: {name:?} is not a valid server name")))
                })?;
                let connector = tokio_rustls::TlsConnector::from(wss.config.clone());
                let stream = connector.connect(name.clone(), tcp).await?;
                let peer = TlsPeer::from_client_connection(stream.get_ref().1, &name);
                (
                    Transport::Tls(Box::new(stream.into())),
                    Some(Arc::new(peer)),
                )
            }
        };
        let mut io = WsIo::new(transport, bytes::Bytes::new());
        let key = handshake::new_key();
        let rest = handshake::client(
            &mut io,
            self.request(&key).as_bytes(),
            &key,
            self.config.max_head,
        )
        .await?;
        let io = io.with_prefix(rest);
        let ws = ClientBuilder::new()
            .limits(limits(&self.config))
            .config(ws_config(&self.config))
            .take_over(io);
        let peer = PeerInfo {
            addr: Some(addr),
            tls: tls_peer,
            ..PeerInfo::default()
        };
        Ok(WsLink::new(ws, peer, &self.config))
    }
}
