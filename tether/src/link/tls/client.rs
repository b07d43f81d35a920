//! The client side: [`ClientTls`] (what to trust, which certificate to
//! present) and [`TlsConnector`].

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::ClientConfig;

use super::{
    certs_from_pem, key_from_pem, nodelay, provider, read, tls_link, TlsConfigError, TlsLink,
    TlsPeer, TrustRoots, ALPN,
};
use crate::link::stream::{split_host_port, Target};
use crate::link::{Connector, LinkError, StreamConfig};

/// A TLS client configuration: the CAs servers are checked against and,
/// for mutual TLS, the certificate this client presents.
///
/// Cheap to clone: clones share one `rustls::ClientConfig` and its session
/// cache, so every connection after the first through clones of one
/// `ClientTls` resumes its TLS session (see
/// [resumption](super#resumption)). Configurations built here offer the
/// ALPN protocol [`ALPN`].
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl ClientTls {
    /// Trusting Mozilla's root CAs (compiled in through `webpki-roots`).
    pub fn webpki_roots() -> Self {
        ClientTls::trusting(&TrustRoots::webpki())
    }

    /// Trusting the platform's CAs (see [`TrustRoots::native`]).
    pub fn native_roots() -> Result<Self, TlsConfigError> {
        Ok(ClientTls::trusting(&TrustRoots::native()?))
    }

    /// Trusting the CA certificates in a PEM file (one CA or a bundle).
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, TlsConfigError> {
        Ok(ClientTls::trusting(&TrustRoots::from_pem_file(path)?))
    }

    /// Trusting the CA certificates in PEM text.
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, TlsConfigError> {
        Ok(ClientTls::trusting(&TrustRoots::from_pem(pem)?))
    }

    /// Trusting `roots`, presenting no client certificate.
    pub fn trusting(roots: &TrustRoots) -> Self {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots.store())
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        ClientTls {
            config: Arc::new(config),
        }
    }

    /// The same configuration, presenting the certificate chain
    /// `chain_pem` (end-entity first) with the private key `key_pem` for
    /// mutual TLS. Fails if either does not parse or the key does not match
    /// the certificate. The result has a session cache of its own: sessions
    /// resumed through it carry its identity only.
    pub fn with_client_cert(
        self,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsConfigError> {
        let chain = certs_from_pem(chain_pem, "client certificate chain")?;
        let key = key_from_pem(key_pem)?;
        let mut config = (*self.config).clone();
        let certified = CertifiedKey::from_der(chain, key, config.crypto_provider())?;
        config.client_auth_cert_resolver = Arc::new(SingleCertAndKey::from(certified));
        config.resumption = Resumption::default();
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// [`with_client_cert`](Self::with_client_cert) from PEM files.
    pub fn with_client_cert_files(
        self,
        chain_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TlsConfigError> {
        let chain = read(chain_path.as_ref())?;
        let key = read(key_path.as_ref())?;
        self.with_client_cert(&chain, &key)
    }

    /// The rustls configuration, for inspection or to build another from.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}

impl From<Arc<ClientConfig>> for ClientTls {
    /// Full control: the configuration is used as it is (its roots,
    /// verifier, ALPN, session cache).
    fn from(config: Arc<ClientConfig>) -> Self {
        ClientTls { config }
    }
}

/// Connects [`TlsLink`]s to a host: TCP to each address the host resolves
/// to in turn (resolved again on every connect), then a TLS handshake that
/// checks the server's certificate for the server name.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    target: Target,
    /// `Err` holds a name that is neither a DNS name nor an IP address:
    /// every connect fails with it.
    server_name: Result<ServerName<'static>, String>,
    tls: ClientTls,
    config: StreamConfig,
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned()).map_err(|_| name.to_owned())
}

impl TlsConnector {
    /// A connector to `host` (a DNS name or an IP address) on `port`,
    /// trusting what `tls` trusts. The server's certificate must be valid
    /// for `host` (an IP address must be in its IP address names), unless
    /// [`server_name`](Self::server_name) says otherwise. The host is
    /// resolved again on every connect and each address tried in turn (see
    /// [`TcpConnector::host`](crate::link::TcpConnector::host)).
    pub fn new(host: impl Into<String>, port: u16, tls: ClientTls) -> Self {
        let host = host.into();
        TlsConnector {
            server_name: parse_server_name(&host),
            target: Target::Host { host, port },
            tls,
            config: StreamConfig::default(),
        }
    }

    /// [`new`](Self::new) from one `"name:port"` string (`"[::1]:port"` for
    /// an IPv6 literal). Fails on a string without a valid port.
    pub fn from_host_port(host_port: &str, tls: ClientTls) -> io::Result<Self> {
        let (host, port) = split_host_port(host_port)?;
        Ok(TlsConnector::new(host, port, tls))
    }

    /// The same connector, sending `name` as SNI and checking the server's
    /// certificate against it instead of the host connected to (a server
    /// reached through a proxy or by address, say).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = parse_server_name(&name.into());
        self
    }

    /// The same connector, its links using `config`.
    pub fn config(mut self, config: StreamConfig) -> Self {
        self.config = config;
        self
    }

    /// The TLS configuration connections are made with.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }
}

impl Connector for TlsConnector {
    type Link = TlsLink;

    /// Resolves, connects, and runs the TLS handshake. A failed handshake
    /// is [`LinkError::Tls`] with rustls's reason (for example
    /// "invalid peer certificate: certificate not valid for name ...").
    async fn connect(&self) -> Result<TlsLink, LinkError> {
        let name = self.server_name.clone().map_err(|name| {
            LinkError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tls: {name:?} is not a valid server name"),
            ))
        })?;
        let (tcp, addr) = self.target.connect().await?;
        nodelay(&tcp);
        let connector = tokio_rustls::TlsConnector::from(self.tls.config.clone());
        let stream = connector.connect(name.clone(), tcp).await?;
        let peer = TlsPeer::from_client_connection(stream.get_ref().1, &name);
        Ok(tls_link(
            stream.into(),
            Some(addr),
            peer,
            self.config.clone(),
        ))
    }
}
