//! The server side: [`ServerTls`] (certificate, client authentication,
//! tickets), [`TlsListener`] and [`TlsPending`].

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::ServerConfig;
use tokio::net::ToSocketAddrs;

use super::{
    certs_from_pem, key_from_pem, nodelay, provider, read, tls_link, TlsConfigError, TlsLink,
    TlsPeer, TrustRoots, ALPN,
};
use crate::link::{LinkError, Listener, PendingLink, StreamConfig, TcpListener, TcpPending};

/// A TLS server configuration: the certificate the server presents, how
/// it authenticates clients, and its session tickets.
///
/// Cheap to clone (an `Arc<rustls::ServerConfig>`). Configurations built
/// here accept the ALPN protocol [`ALPN`] (a client offering none is
/// accepted too) and issue stateless TLS 1.3 session tickets so that
/// clients resume (see [resumption](super#resumption) for what that
/// costs).
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl ServerTls {
    /// Presenting the certificate chain `chain_pem` (end-entity first) with
    /// the private key `key_pem`; no client authentication.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsConfigError> {
        let chain = certs_from_pem(chain_pem, "server certificate chain")?;
        ServerTls::from_der(chain, key_from_pem(key_pem)?)
    }

    /// [`from_pem`](Self::from_pem) from PEM files.
    pub fn from_pem_files(
        chain_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TlsConfigError> {
        let chain = read(chain_path.as_ref())?;
        let key = read(key_path.as_ref())?;
        ServerTls::from_pem(&chain, &key)
    }

    /// Presenting `chain` (end-entity first) with `key`; no client
    /// authentication. Fails if the key does not match the certificate.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsConfigError> {
        let provider = provider();
        let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider)?);
        ServerTls::build(
            provider,
            WebPkiClientVerifier::no_client_auth(),
            Arc::new(SingleCertAndKey::from(certified)),
        )
    }

    fn build(
        provider: Arc<rustls::crypto::CryptoProvider>,
        verifier: Arc<dyn ClientCertVerifier>,
        certs: Arc<dyn rustls::server::ResolvesServerCert>,
    ) -> Result<Self, TlsConfigError> {
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(certs);
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// The same configuration, requiring every client to present a
    /// certificate chain that `ca` verifies (mutual TLS): a client without
    /// one fails its handshake. The verified chain and its names reach the
    /// application in [`TlsPeer`].
    ///
    /// Rebuilds the configuration with rustls's default protocol versions,
    /// keeping the certificate, ALPN, tickets and session storage; for a
    /// configuration of one's own, set a verifier on it directly.
    pub fn require_client_cert(self, ca: &TrustRoots) -> Result<Self, TlsConfigError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            ca.store(),
            self.config.crypto_provider().clone(),
        )
        .build()?;
        Ok(self.with_verifier(verifier))
    }

    /// Like [`require_client_cert`](Self::require_client_cert), but a
    /// client may also connect without a certificate
    /// ([`TlsPeer::client_identity`] is then `None`); one it presents is
    /// verified all the same.
    pub fn allow_client_cert(self, ca: &TrustRoots) -> Result<Self, TlsConfigError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            ca.store(),
            self.config.crypto_provider().clone(),
        )
        .allow_unauthenticated()
        .build()?;
        Ok(self.with_verifier(verifier))
    }

    fn with_verifier(self, verifier: Arc<dyn ClientCertVerifier>) -> Self {
        let old = &*self.config;
        let builder = ServerConfig::builder_with_provider(old.crypto_provider().clone())
            .with_safe_default_protocol_versions()
            .expect("the configuration's provider supported these versions before");
        let mut config = builder
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(old.cert_resolver.clone());
        config.alpn_protocols = old.alpn_protocols.clone();
        config.ticketer = old.ticketer.clone();
        config.session_storage = old.session_storage.clone();
        config.send_tls13_tickets = old.send_tls13_tickets;
        config.ignore_client_order = old.ignore_client_order;
        config.max_fragment_size = old.max_fragment_size;
        config.key_log = old.key_log.clone();
        ServerTls {
            config: Arc::new(config),
        }
    }

    /// The rustls configuration, for inspection or to build another from
    /// (the WebSocket listener's `wss://` takes it as it is).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

impl From<Arc<ServerConfig>> for ServerTls {
    /// Full control: the configuration is used as it is.
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls { config }
    }
}

/// Accepts [`TlsLink`]s: TCP connections from a [`TcpListener`], each
/// handed out at once as a [`TlsPending`] whose
/// [`establish`](PendingLink::establish) runs the TLS handshake.
pub struct TlsListener {
    inner: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    /// TLS with `tls` on the connections `inner` accepts (its
    /// [`StreamConfig`] applies to the links).
    pub fn new(inner: TcpListener, tls: ServerTls) -> Self {
        TlsListener {
            inner,
            acceptor: tokio_rustls::TlsAcceptor::from(tls.config),
        }
    }

    /// Binds a TCP listener to `addr` (see [`TcpListener::bind`]) and
    /// serves TLS with `tls` on it.
    pub async fn bind(addr: impl ToSocketAddrs, tls: ServerTls) -> io::Result<Self> {
        Ok(TlsListener::new(TcpListener::bind(addr).await?, tls))
    }

    /// The address the TCP listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TlsPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPending")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl Listener for TlsListener {
    type Link = TlsLink;
    type Pending = TlsPending;

    /// The next TCP connection, before any TLS: nothing is read here.
    /// Cancel-safe.
    async fn accept(&mut self) -> Result<TlsPending, LinkError> {
        Ok(TlsPending {
            tcp: self.inner.accept().await?,
            acceptor: self.acceptor.clone(),
        })
    }
}

/// A TCP connection accepted by a [`TlsListener`], before its TLS
/// handshake.
pub struct TlsPending {
    tcp: TcpPending,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl PendingLink for TlsPending {
    type Link = TlsLink;

    /// The TCP peer's address (known before the handshake).
    fn addr(&self) -> Option<SocketAddr> {
        self.tcp.addr()
    }

    /// Runs the TLS handshake, for as long as the peer takes (a server runs
    /// this under its handshake timeout). A peer that does not speak TLS,
    /// or presents no acceptable certificate, fails with
    /// [`LinkError::Tls`]. The link's [`Link::peer`](crate::Link::peer) has
    /// the TCP address and [`PeerInfo::tls`](crate::link::PeerInfo::tls).
    async fn establish(self) -> Result<TlsLink, LinkError> {
        let addr = self.tcp.addr();
        let config: StreamConfig = self.tcp.config().clone();
        let stream = self.tcp.into_stream();
        nodelay(&stream);
        let stream = self.acceptor.accept(stream).await?;
        let peer = TlsPeer::from_server_connection(stream.get_ref().1);
        Ok(tls_link(stream.into(), addr, peer, config))
    }
}
