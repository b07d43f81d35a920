//! TLS over TCP (rustls): connectors, listeners and what the handshake
//! verified about the peer.
//!
//! A [`TlsLink`] is the ordinary length-prefixed [`StreamLink`] framing
//! (see the [link documentation](super#framing-on-byte-streams)) inside a
//! TLS session over one TCP connection. [`TlsConnector`] dials a host name
//! (resolved again on every connect, each address tried in turn) and checks
//! the server's certificate against that name; [`TlsListener`] accepts TCP
//! connections at once and runs the TLS handshake in
//! [`PendingLink::establish`](super::PendingLink::establish), so a stable
//! [`Server`](crate::Server) runs it in the connection's own task, under
//! its handshake timeout and counted by its caps on pending handshakes: a
//! peer that connects and never finishes its handshake holds one pending
//! slot until the timeout, and nobody else waits for it.
//!
//! # What is verified
//!
//! - The client verifies the server's certificate chain against its
//!   [`ClientTls`] roots (Mozilla's through [`webpki-roots`], the platform's
//!   store, or a CA of one's own) and that the certificate is valid for the
//!   server name: the host given to [`TlsConnector::new`] (an IP address is
//!   checked as an IP address) or the name set with
//!   [`TlsConnector::server_name`]. Revocation is not checked.
//! - With [`ServerTls::require_client_cert`], the server verifies the
//!   client's chain against the given CA and refuses clients without one
//!   (mutual TLS); with [`ServerTls::allow_client_cert`] a certificate is
//!   optional but verified if presented. What was verified reaches the
//!   application in [`PeerInfo::tls`](super::PeerInfo::tls): the chain and
//!   the end-entity certificate's names ([`TlsPeer::client_identity`]),
//!   for an [`Authorize`](crate::Authorize) hook to decide on.
//! - TLS 1.3 and 1.2 with rustls's safe defaults, through the *ring*
//!   provider chosen explicitly: nothing depends on a process-wide default
//!   provider. Early data (0-RTT) is never enabled.
//!
//! # End of stream
//!
//! [`LinkTx::close`](super::LinkTx::close) sends TLS `close_notify`, then
//! shuts down the TCP write side; the peer reads every payload, then
//! `Ok(None)`. Unlike plain TCP, a TCP end of stream *without*
//! `close_notify` (the peer dropped its link without closing, or something
//! on the path cut the connection) is not a clean end but an error,
//! [`LinkError::Io`](super::LinkError::Io) of kind `UnexpectedEof`: a
//! truncation is never taken for the end.
//!
//! # ALPN
//!
//! Configurations built by this module offer and accept the ALPN protocol
//! [`ALPN`] (`tether/1`), so that a TLS front end that routes by ALPN can
//! tell tether links from HTTPS on a shared port, and an HTTPS client that
//! reaches a tether port by mistake fails in the handshake rather than
//! later. A peer that offers no ALPN at all is still accepted. Configs
//! passed in whole (`From<Arc<rustls::ClientConfig>>`) are used unchanged.
//!
//! # What TLS costs
//!
//! A full handshake is one extra round trip (TLS 1.3) before the tether
//! hello, an ECDHE key exchange and a signature on the server, a signature
//! check per certificate on the client (and on the server for client
//! certificates). Afterwards each record costs an AEAD pass over the data
//! and about 22 bytes of framing per record of up to 16 KiB. The link's two
//! halves share the TLS session behind a lock ([`tokio::io::split`]), held
//! only while one read or write poll runs. Each link holds rustls's buffers
//! (tens of KiB while busy) on top of the stream link's own.
//!
//! # Resumption
//!
//! A [`ClientTls`] keeps rustls's in-memory session cache, shared by all of
//! its clones: reuse one `ClientTls` across reconnects (a stable conduit
//! does, through its connector) and every handshake after the first
//! resumes with a TLS 1.3 ticket, skipping the certificate exchange and
//! its signature checks (the key exchange is still fresh: rustls resumes
//! only with `psk_dhe_ke`, so resumed sessions keep forward secrecy).
//! [`TlsPeer::resumed`] tells whether a link's handshake was resumed.
//! [`ServerTls`] issues stateless tickets: encrypted under a key that
//! rotates every six hours, so the server keeps no memory per client; the
//! cost is encrypting two small tickets after each full handshake, and that
//! a stolen ticket key would let its holder resume as the clients it was
//! issued to until it rotates out. Client identity survives resumption: a
//! resumed session carries the verified client certificate chain of the
//! original handshake.
//!
//! [`webpki-roots`]: https://docs.rs/webpki-roots

mod client;
mod peer;
mod server;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::{PeerInfo, StreamConfig, StreamLink};

pub use client::{ClientTls, TlsConnector};
pub use peer::{CertIdentity, TlsPeer};
pub use server::{ServerTls, TlsListener, TlsPending};

/// The ALPN protocol name the configurations of this module offer and
/// accept (see [ALPN](self#alpn)).
pub const ALPN: &[u8] = b"tether/1";

/// A stream link inside a TLS session over TCP, client or server side.
pub type TlsLink = StreamLink<
    ReadHalf<tokio_rustls::TlsStream<TcpStream>>,
    WriteHalf<tokio_rustls::TlsStream<TcpStream>>,
>;

/// Builds the link once the handshake is done: the socket already has
/// `TCP_NODELAY`, `peer` is the TCP address plus what TLS established.
fn tls_link(
    stream: tokio_rustls::TlsStream<TcpStream>,
    addr: Option<SocketAddr>,
    tls: TlsPeer,
    config: StreamConfig,
) -> TlsLink {
    StreamLink::new(stream, config).with_peer(PeerInfo {
        addr,
        tls: Some(Arc::new(tls)),
        ..PeerInfo::default()
    })
}

/// Sets `TCP_NODELAY` (the link batches on its own); a failure is logged,
/// not fatal.
fn nodelay(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::warn!(error = %err, "could not set TCP_NODELAY on a TLS link");
    }
}

/// The crypto provider every configuration here is built with: *ring*,
/// chosen explicitly rather than a process-wide default.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// PEM text that does not parse.
    #[error("bad PEM in {what}: {error}")]
    Pem {
        /// What was being read ("certificate chain", "private key", a path).
        what: String,
        /// Why.
        error: rustls::pki_types::pem::Error,
    },
    /// No certificate where at least one is needed.
    #[error("no certificate found in {0}")]
    NoCertificates(String),
    /// A CA certificate that is not a usable trust anchor.
    #[error("unusable CA certificate: {0}")]
    BadCa(rustls::Error),
    /// The platform's certificate store could not be loaded, or held no
    /// usable certificate.
    #[error("platform certificate store: {0}")]
    NativeRoots(String),
    /// rustls refused the configuration (a key that does not match its
    /// certificate, an unsupported key type).
    #[error("tls configuration: {0}")]
    Rustls(rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
}

impl From<rustls::Error> for TlsConfigError {
    fn from(err: rustls::Error) -> TlsConfigError {
        TlsConfigError::Rustls(err)
    }
}

impl From<rustls::server::VerifierBuilderError> for TlsConfigError {
    fn from(err: rustls::server::VerifierBuilderError) -> TlsConfigError {
        TlsConfigError::Verifier(err)
    }
}

/// A set of trusted CA certificates: what a client checks servers against,
/// or a server checks client certificates against.
#[derive(Clone, Debug)]
pub struct TrustRoots(Arc<RootCertStore>);

impl TrustRoots {
    /// Mozilla's root CAs, as compiled into this build by `webpki-roots`
    /// (no file or platform access).
    pub fn webpki() -> Self {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        TrustRoots(Arc::new(roots))
    }

    /// The platform's trusted CAs (`rustls-native-certs`: the system
    /// store, or the files `SSL_CERT_FILE`/`SSL_CERT_DIR` name). Certificates
    /// that fail to load are skipped with a warning; an error if none is
    /// usable.
    pub fn native() -> Result<Self, TlsConfigError> {
        let found = rustls_native_certs::load_native_certs();
        for err in &found.errors {
            tracing::warn!(error = %err, "skipping part of the platform certificate store");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = match found.errors.first() {
                Some(err) => err.to_string(),
                None => format!("no usable certificate ({ignored} unparsable)"),
            };
            return Err(TlsConfigError::NativeRoots(why));
        }
        Ok(TrustRoots(Arc::new(roots)))
    }

    /// Every certificate in PEM text (one CA, or a bundle). Fails on bad
    /// PEM, on no certificate, or on one that is not a usable anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsConfigError> {
        TrustRoots::from_certs(certs_from_pem(pem, "CA certificates")?)
    }

    /// [`from_pem`](Self::from_pem) from a file.
    pub fn from_pem_file(path: impl AsRef<Path>) -> Result<Self, TlsConfigError> {
        TrustRoots::from_pem(&read(path.as_ref())?)
    }

    /// The given DER certificates as trust anchors.
    pub fn from_certs(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsConfigError> {
        if certs.is_empty() {
            return Err(TlsConfigError::NoCertificates("CA certificates".into()));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(TlsConfigError::BadCa)?;
        }
        Ok(TrustRoots(Arc::new(roots)))
    }

    /// The underlying rustls store.
    pub fn store(&self) -> Arc<RootCertStore> {
        self.0.clone()
    }
}

impl From<RootCertStore> for TrustRoots {
    fn from(roots: RootCertStore) -> Self {
        TrustRoots(Arc::new(roots))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|error| TlsConfigError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Every certificate in `pem`, at least one.
fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsConfigError::Pem {
            what: what.into(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificates(what.into()));
    }
    Ok(certs)
}

/// The first private key in `pem` (PKCS#8, PKCS#1 or SEC1).
fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsConfigError::Pem {
        what: "private key".into(),
        error,
    })
}
