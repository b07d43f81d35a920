//! The transports `tether demo` and `tether echo` speak, the server
//! addresses `tether demo --server` takes, and TLS material read from PEM
//! files with errors that name the file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tether::link::{ClientTls, ServerTls, TrustRoots};

/// A transport of the demo and the echo server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain TCP.
    #[default]
    Tcp,
    /// A Unix-domain socket.
    Unix,
    /// TLS over TCP.
    Tls,
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS over TCP.
    Wss,
}

impl Transport {
    /// Every transport.
    pub const ALL: [Transport; 5] = [
        Transport::Tcp,
        Transport::Unix,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
    ];

    /// The transport's name, which is also its URL scheme.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// Whether it runs over a TCP connection (everything but Unix sockets).
    pub fn over_tcp(self) -> bool {
        self != Transport::Unix
    }

    /// Whether it runs TLS.
    pub fn secure(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// Whether it is WebSocket.
    pub fn websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    /// What the fault injection cuts, for people.
    pub fn cut_what(self) -> &'static str {
        match self {
            Transport::Tcp => "the TCP connection",
            Transport::Unix => "the Unix socket connection",
            Transport::Tls => "the TCP connection under TLS",
            Transport::Ws => "the TCP connection under WebSocket",
            Transport::Wss => "the TCP connection under TLS and WebSocket",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a server is: a host (a name or an IP address) and port for the
/// transports over TCP, with a path for WebSocket, or a socket path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP, TLS, WebSocket or secure WebSocket to `host:port`.
    Net {
        /// Which of them.
        transport: Transport,
        /// A host name or an IP address (IPv6 without brackets).
        host: String,
        /// The port.
        port: u16,
        /// WebSocket: the request path (and query), starting with `/`.
        /// Empty for TCP and TLS.
        path: String,
    },
    /// A Unix-domain socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses a server address: a URL (`tcp://host:port`, `tls://host:port`,
    /// `ws://host[:port][/path]`, `wss://host[:port][/path]`, `unix:PATH`),
    /// or a bare `host:port` (or, with `default` Unix, a socket path), which
    /// means `default`. A URL whose scheme differs from `default` is taken
    /// as it is: callers that also had a transport named compare.
    pub fn parse(s: &str, default: Transport) -> anyhow::Result<Endpoint> {
        let s = s.trim();
        let bad = |why: &str| anyhow::anyhow!("bad server address {s:?}: {why}");
        let (transport, rest) = match s.split_once("://") {
            Some((scheme, rest)) => {
                let t = Transport::ALL
                    .into_iter()
                    .find(|t| t.name().eq_ignore_ascii_case(scheme))
                    .ok_or_else(|| {
                        bad(&format!(
                            "unknown scheme {scheme:?} (tcp, tls, ws, wss, unix)"
                        ))
                    })?;
                (t, rest)
            }
            None => match s.strip_prefix("unix:") {
                Some(rest) => (Transport::Unix, rest),
                None => (default, s),
            },
        };
        if transport == Transport::Unix {
            if rest.is_empty() {
                return Err(bad("no socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(rest)));
        }
        let (authority, path) = if transport.websocket() {
            let at = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(at);
            let path = match path {
                "" => "/".to_owned(),
                p if p.starts_with('?') => format!("/{p}"),
                p => p.to_owned(),
            };
            if path.contains(['#', ' ', '\r', '\n']) {
                return Err(bad("bad characters in the path"));
            }
            (authority, path)
        } else {
            let authority = rest.trim_end_matches('/');
            if authority.contains(['/', '?']) {
                return Err(bad(&format!("{transport} takes no path")));
            }
            (authority, String::new())
        };
        if authority.contains('@') {
            return Err(bad("user information is not supported"));
        }
        let default_port = match transport {
            Transport::Ws => Some(80),
            Transport::Wss => Some(443),
            _ => None,
        };
        let (host, port) = split_host_port(authority, default_port).map_err(|why| bad(&why))?;
        Ok(Endpoint::Net {
            transport,
            host,
            port,
            path,
        })
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        match self {
            Endpoint::Net { transport, .. } => *transport,
            Endpoint::Unix(_) => Transport::Unix,
        }
    }

    /// `host:port` of a network endpoint, the host in brackets if it is an
    /// IPv6 address.
    pub fn authority(&self) -> Option<String> {
        match self {
            Endpoint::Net { host, port, .. } => Some(join_host_port(host, *port)),
            Endpoint::Unix(_) => None,
        }
    }
}

impl fmt::Display for Endpoint {
    /// The URL form: `tcp://127.0.0.1:4000`, `wss://localhost:8443/tether`,
    /// `unix:/tmp/echo.sock`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Net {
                transport,
                host,
                port,
                path,
            } => write!(f, "{transport}://{}{path}", join_host_port(host, *port)),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `host:port`, the host in brackets if it is an IPv6 address.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `name:port`, `1.2.3.4:port` or `[::1]:port` (the brackets
/// removed); without a port, `default_port` if there is one.
fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bracketed = s.starts_with('[');
    let port_at = match s.rfind(':') {
        Some(at) if !s[at..].contains(']') && (bracketed || s.matches(':').count() == 1) => {
            Some(at)
        }
        _ => None,
    };
    let (host, port) = match (port_at, default_port) {
        (Some(at), _) => {
            let port = s[at + 1..]
                .parse::<u16>()
                .map_err(|_| format!("bad port {:?}", &s[at + 1..]))?;
            (&s[..at], port)
        }
        (None, Some(port)) => (s, port),
        (None, None) if s.contains(':') && !bracketed => {
            return Err("an IPv6 address needs brackets: [::1]:4000".into())
        }
        (None, None) => return Err("no port (host:port)".into()),
    };
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| "unclosed '['".to_string())?,
        None if host.contains(':') => return Err("an IPv6 address needs brackets".into()),
        None => host,
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok((host.to_owned(), port))
}

/// A listening address with an optional WebSocket path:
/// `127.0.0.1:8080` or `127.0.0.1:8080/tether` (`[::]:8080/tether` for
/// IPv6), optionally with the scheme in front (`ws://`, `wss://`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsBind {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// The path upgrades are accepted for (default `/`).
    pub path: String,
}

impl WsBind {
    /// Parses `ADDR[/PATH]`, `scheme` (`ws` or `wss`) allowed in front.
    pub fn parse(s: &str, scheme: &str) -> Result<WsBind, String> {
        let rest = match s.split_once("://") {
            Some((given, rest)) if given.eq_ignore_ascii_case(scheme) => rest,
            Some((given, _)) => {
                return Err(format!(
                    "{s:?}: the scheme {given:?} does not belong here (only {scheme}://)"
                ))
            }
            None => s,
        };
        let at = rest.find('/').unwrap_or(rest.len());
        let (addr, path) = rest.split_at(at);
        let addr = addr.parse::<SocketAddr>().map_err(|_| {
            format!("{s:?} is not IP:PORT[/PATH] (for example 127.0.0.1:8080/tether)")
        })?;
        if path.contains(['?', '#', ' ', '\r', '\n']) {
            return Err(format!("{s:?}: the path may not hold '?', '#' or spaces"));
        }
        let path = if path.is_empty() { "/" } else { path };
        Ok(WsBind {
            addr,
            path: path.to_owned(),
        })
    }
}

/// Reads `path`, naming it in the error.
fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Every certificate in the PEM file `path`, at least one.
fn certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in the {what} {}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "no certificate (-----BEGIN CERTIFICATE-----) in the {what} {}",
            path.display()
        );
    }
    Ok(certs)
}

/// The server's TLS configuration from a PEM certificate chain and key,
/// requiring client certificates signed by the CA in `client_ca` if given.
/// Every error names the file at fault.
pub fn server_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<ServerTls> {
    let chain = certs(cert, "certificate chain (--tls-cert)")?;
    let key_pem = read(key, "private key (--tls-key)")?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| {
        format!(
            "no usable private key (PKCS#8, PKCS#1 or SEC1 PEM) in the private key (--tls-key) {}",
            key.display()
        )
    })?;
    // The error's own text only: its source repeats it.
    let tls = ServerTls::from_der(chain, private).map_err(|e| {
        anyhow::anyhow!(
            "the private key {} does not go with the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    match client_ca {
        None => Ok(tls),
        Some(ca) => {
            let roots = trust_roots(ca, "client CA (--client-ca)")?;
            tls.require_client_cert(&roots)
                .with_context(|| format!("the client CA {}", ca.display()))
        }
    }
}

/// The CA certificates in the PEM file `path` as trust anchors.
fn trust_roots(path: &Path, what: &str) -> anyhow::Result<TrustRoots> {
    TrustRoots::from_certs(certs(path, what)?)
        .with_context(|| format!("unusable CA certificate in the {what} {}", path.display()))
}

/// A client TLS configuration trusting the CA certificates in the PEM file
/// `path`.
pub fn client_tls(path: &Path) -> anyhow::Result<ClientTls> {
    Ok(ClientTls::trusting(&trust_roots(path, "CA file (--ca)")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(transport: Transport, host: &str, port: u16, path: &str) -> Endpoint {
        Endpoint::Net {
            transport,
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn endpoints_parse() {
        let tcp = Transport::Tcp;
        assert_eq!(
            Endpoint::parse("127.0.0.1:4000", tcp).unwrap(),
            net(tcp, "127.0.0.1", 4000, "")
        );
        assert_eq!(
            Endpoint::parse("localhost:4000", Transport::Tls).unwrap(),
            net(Transport::Tls, "localhost", 4000, "")
        );
        assert_eq!(
            Endpoint::parse("tcp://[::1]:4000", tcp).unwrap(),
            net(tcp, "::1", 4000, "")
        );
        assert_eq!(
            Endpoint::parse("tls://example.com:4433/", tcp).unwrap(),
            net(Transport::Tls, "example.com", 4433, "")
        );
        assert_eq!(
            Endpoint::parse("ws://localhost:8080/tether", tcp).unwrap(),
            net(Transport::Ws, "localhost", 8080, "/tether")
        );
        assert_eq!(
            Endpoint::parse("wss://example.com", tcp).unwrap(),
            net(Transport::Wss, "example.com", 443, "/")
        );
        assert_eq!(
            Endpoint::parse("ws://[::1]?x=1", tcp).unwrap(),
            net(Transport::Ws, "::1", 80, "/?x=1")
        );
        assert_eq!(
            Endpoint::parse("unix:/tmp/e.sock", tcp).unwrap(),
            Endpoint::Unix("/tmp/e.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/tmp/e.sock", Transport::Unix).unwrap(),
            Endpoint::Unix("/tmp/e.sock".into())
        );
        for bad in [
            "localhost",
            "::1:4000",
            "http://localhost:80",
            "tcp://:4000",
            "tcp://host:99999",
            "tls://host:1/path",
            "unix:",
            "ws://user@host/",
        ] {
            assert!(Endpoint::parse(bad, tcp).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_print_as_urls() {
        for url in [
            "tcp://127.0.0.1:4000",
            "tls://localhost:4433",
            "ws://[::1]:8080/tether",
            "wss://127.0.0.1:8443/",
            "unix:/tmp/e.sock",
        ] {
            assert_eq!(
                Endpoint::parse(url, Transport::Tcp).unwrap().to_string(),
                url
            );
        }
    }

    #[test]
    fn ws_binds_parse() {
        let b = WsBind::parse("127.0.0.1:8080", "ws").unwrap();
        assert_eq!((b.addr.port(), b.path.as_str()), (8080, "/"));
        let b = WsBind::parse("wss://[::1]:8443/tether", "wss").unwrap();
        assert_eq!((b.addr.port(), b.path.as_str()), (8443, "/tether"));
        assert!(WsBind::parse("ws://127.0.0.1:1/", "wss").is_err());
        assert!(WsBind::parse("localhost:8080", "ws").is_err());
        assert!(WsBind::parse("127.0.0.1:1/a b", "ws").is_err());
    }
}
