//! [`TlsPeer`]: what a finished TLS handshake established.

use std::net::IpAddr;

use rustls::client::ClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ServerConnection;
use rustls::{CipherSuite, CommonState, HandshakeKind, ProtocolVersion};

/// What a TLS handshake established about the peer, as
/// [`PeerInfo::tls`](crate::link::PeerInfo::tls) carries it.
///
/// Only facts the handshake verified or negotiated. On the server side,
/// [`client_identity`](Self::client_identity) names the client when it
/// presented a certificate (mutual TLS), which the server's verifier has
/// checked by then; an [`Authorize`](crate::Authorize) hook can admit or
/// refuse by it:
///
/// ```
/// # use tether::{Admission, Denied, Grant};
/// fn authorize(adm: &Admission) -> Result<Grant, Denied> {
///     let who = adm.peer.tls.as_ref().and_then(|t| t.client_identity());
///     match who.and_then(|id| id.common_name.clone()) {
///         Some(name) if name != "mallory" => Ok(Grant::new(name)),
///         _ => Err(Denied::new("no acceptable client certificate")),
///     }
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPeer {
    server_name: Option<String>,
    version: Option<ProtocolVersion>,
    cipher_suite: Option<CipherSuite>,
    alpn: Option<Vec<u8>>,
    resumed: bool,
    server_side: bool,
    certificates: Vec<CertificateDer<'static>>,
    identity: Option<CertIdentity>,
}

/// The names in a verified certificate: its subject's common name and its
/// subject alternative names, for authorization decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CertIdentity {
    /// The subject's common name (the first, if there are several).
    pub common_name: Option<String>,
    /// DNS names among the subject alternative names.
    pub dns_names: Vec<String>,
    /// URIs among the subject alternative names (SPIFFE IDs, say).
    pub uris: Vec<String>,
    /// E-mail addresses (RFC 822 names) among the subject alternative
    /// names.
    pub emails: Vec<String>,
    /// IP addresses among the subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
}

impl CertIdentity {
    /// The names of a DER certificate; `None` if it does not parse as
    /// X.509 (a certificate rustls verified always does).
    pub fn from_der(der: &[u8]) -> Option<CertIdentity> {
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::{FromDer, X509Certificate};

        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut id = CertIdentity {
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            ..CertIdentity::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(s) => id.dns_names.push((*s).to_owned()),
                    GeneralName::URI(s) => id.uris.push((*s).to_owned()),
                    GeneralName::RFC822Name(s) => id.emails.push((*s).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            id.ip_addresses.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            id.ip_addresses.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(id)
    }
}

impl TlsPeer {
    /// What the server side of a finished handshake established: the SNI
    /// name the client asked for, the negotiated parameters, and the
    /// client's verified certificate chain, if it presented one. For
    /// links that run TLS themselves (`wss://`).
    pub fn from_server_connection(conn: &ServerConnection) -> TlsPeer {
        let mut peer = TlsPeer::from_common(conn);
        peer.server_name = conn.server_name().map(str::to_owned);
        peer.server_side = true;
        peer
    }

    /// What the client side of a finished handshake established with the
    /// server it verified for `server_name`.
    pub fn from_client_connection(
        conn: &ClientConnection,
        server_name: &ServerName<'_>,
    ) -> TlsPeer {
        let mut peer = TlsPeer::from_common(conn);
        peer.server_name = Some(server_name.to_str().into_owned());
        peer
    }

    fn from_common(conn: &CommonState) -> TlsPeer {
        let certificates: Vec<_> = conn
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let identity = certificates
            .first()
            .and_then(|cert| CertIdentity::from_der(cert));
        TlsPeer {
            server_name: None,
            version: conn.protocol_version(),
            cipher_suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
            server_side: false,
            certificates,
            identity,
        }
    }

    /// The server name of the handshake: on the server, the SNI the client
    /// sent (`None` if it sent none, as when connecting to an IP address);
    /// on the client, the name the server's certificate was checked for.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The negotiated protocol version (TLS 1.3 or 1.2).
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        self.cipher_suite
    }

    /// The negotiated ALPN protocol, if both sides offered one in common.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// Whether the handshake resumed an earlier session (no certificates
    /// were exchanged; on the server the client's chain is the one it
    /// presented when the session began).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The peer's verified certificate chain, end-entity first: the
    /// client's on the server side (empty without mutual TLS), the
    /// server's on the client side.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The names in the peer's end-entity certificate (the server's, on
    /// the client side); `None` without one.
    pub fn peer_identity(&self) -> Option<&CertIdentity> {
        self.identity.as_ref()
    }

    /// On the server side, the names in the client's verified certificate
    /// (mutual TLS); `None` if it presented none, and always `None` on the
    /// client side.
    pub fn client_identity(&self) -> Option<&CertIdentity> {
        self.identity.as_ref().filter(|_| self.server_side)
    }
}
