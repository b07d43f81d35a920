//! TLS links over TCP: payloads and clean close, a stable conduit through
//! the cutting proxy, certificate and name verification, mutual TLS with
//! the client's identity reaching the authorization hook, session
//! resumption, host-name connectors, and hostile peers on a TLS port
//! (plaintext, garbage before a ClientHello, silence, a ClientHello cut
//! short) under the server's handshake timeout and caps.
//!
//! Every certificate is generated at run time (`common::pki`).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{Ca, Issued};
use common::{config, exchange, within, Msg, Traffic};
use rustls::{CertificateError, ProtocolVersion};
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::{
    ClientTls, PendingLink, ServerTls, StreamConfig, StreamLink, TcpConnector, TcpListener,
    TlsConnector, TlsLink, TlsListener, TlsPeer, TrustRoots,
};
use tether::{
    Admission, Config, Connector, Denied, Error, Grant, Link, LinkError, LinkRx, LinkTx, Listener,
    Refusal, Server, StableConduit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---- helpers ----

/// A CA, and a server certificate for `localhost` and 127.0.0.1 it signed.
struct Pki {
    ca: Ca,
    server: Issued,
}

fn pki() -> Pki {
    let ca = Ca::new("tether test CA");
    let server = ca.localhost();
    Pki { ca, server }
}

impl Pki {
    fn server_tls(&self) -> ServerTls {
        ServerTls::from_pem(
            self.server.cert_pem.as_bytes(),
            self.server.key_pem.as_bytes(),
        )
        .unwrap()
    }

    fn roots(&self) -> TrustRoots {
        TrustRoots::from_pem(self.ca.cert_pem.as_bytes()).unwrap()
    }

    fn client_tls(&self) -> ClientTls {
        ClientTls::from_ca_pem(self.ca.cert_pem.as_bytes()).unwrap()
    }

    /// A client presenting a certificate for `cn` signed by the CA.
    fn client_tls_as(&self, cn: &str) -> ClientTls {
        let id = self.ca.client(cn);
        self.client_tls()
            .with_client_cert(id.cert_pem.as_bytes(), id.key_pem.as_bytes())
            .unwrap()
    }
}

async fn tls_listener(tls: ServerTls) -> (TlsListener, u16) {
    let listener = TlsListener::bind((Ipv4Addr::LOCALHOST, 0), tls)
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Accepts one connection and runs its handshake.
async fn accept_one(listener: &mut TlsListener) -> Result<TlsLink, LinkError> {
    listener.accept().await.unwrap().establish().await
}

fn tls_of(link: &impl Link) -> Arc<TlsPeer> {
    link.peer()
        .tls
        .expect("a TLS link reports what TLS established")
}

/// Whether `err` is a TLS failure of the kind `want` says.
fn is_tls(err: &LinkError, want: impl Fn(&rustls::Error) -> bool) -> bool {
    matches!(err, LinkError::Tls(e) if want(e))
}

/// Connects a stable client and accepts its session, skipping the orphan
/// sessions a cut right after a new-session hello leaves behind (see
/// `stable_net.rs`).
async fn connect_session<C: Connector>(
    server: &Server<Msg>,
    connector: C,
    cfg: Config,
) -> (StableConduit<Msg>, StableConduit<Msg>) {
    let client = StableConduit::<Msg>::connect(connector, cfg)
        .await
        .expect("the client could not connect");
    let created = server.stats().sessions_created;
    let mut taken = 0;
    loop {
        let session = server.accept().await.expect("the server stopped");
        taken += 1;
        if taken == created {
            return (client, session);
        }
    }
}

// ---- links ----

/// Payloads of every size both ways over one TLS link (the server echoes),
/// then a clean close each way; both ends report what TLS negotiated.
#[tokio::test]
async fn payloads_both_ways_and_clean_close() {
    within(async {
        let pki = pki();
        let (mut listener, port) = tls_listener(pki.server_tls()).await;
        let server = tokio::spawn(async move {
            let link = accept_one(&mut listener).await.unwrap();
            let tls = tls_of(&link);
            assert!(link.peer().addr.is_some());
            let (mut tx, mut rx) = link.split();
            let mut echoed = 0;
            while let Some(p) = rx.recv().await.unwrap() {
                tx.send(p).await.unwrap();
                echoed += 1;
            }
            tx.close().await.unwrap();
            (tls, echoed)
        });
        let connector = TlsConnector::new("localhost", port, pki.client_tls());
        let link = connector.connect().await.unwrap();
        let tls = tls_of(&link);
        assert_eq!(link.peer().addr.unwrap().port(), port);
        assert_eq!(tls.server_name(), Some("localhost"));
        assert_eq!(tls.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert!(tls.cipher_suite().is_some());
        assert_eq!(tls.alpn(), Some(tether::link::tls::ALPN));
        assert!(!tls.resumed());
        assert_eq!(tls.peer_identity().unwrap().dns_names, ["localhost"]);
        assert!(tls.client_identity().is_none(), "client side");

        let (mut tx, mut rx) = link.split();
        let big: Bytes = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut sent = vec![Bytes::new(), Bytes::from_static(b"hello"), big];
        sent.extend((0..500u32).map(|i| Bytes::from(i.to_le_bytes().repeat(i as usize % 9))));
        let sender = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for p in sent {
                    tx.feed(p).await.unwrap();
                }
                tx.flush().await.unwrap();
                tx.close().await.unwrap();
            })
        };
        for want in &sent {
            assert_eq!(&rx.recv().await.unwrap().unwrap(), want);
        }
        assert_eq!(rx.recv().await.unwrap(), None, "clean close");
        assert_eq!(rx.recv().await.unwrap(), None);
        sender.await.unwrap();
        let (server_tls, echoed) = server.await.unwrap();
        assert_eq!(echoed, sent.len());
        assert_eq!(server_tls.server_name(), Some("localhost"), "SNI");
        assert_eq!(server_tls.alpn(), Some(tether::link::tls::ALPN));
        assert!(server_tls.client_identity().is_none());
        assert!(server_tls.peer_certificates().is_empty());
    })
    .await;
}

/// One `ClientTls` reused across connections resumes its TLS session; a
/// fresh one does a full handshake. With mutual TLS the server still sees
/// the client's identity on a resumed link.
#[tokio::test]
async fn reconnects_through_one_client_tls_resume() {
    within(async {
        let pki = pki();
        let tls = pki.server_tls().require_client_cert(&pki.roots()).unwrap();
        let (mut listener, port) = tls_listener(tls).await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let link = accept_one(&mut listener).await.unwrap();
                seen.push(tls_of(&link));
                let (mut tx, mut rx) = link.split();
                // One payload each way, so the client has read the
                // session tickets that follow the handshake.
                let p = rx.recv().await.unwrap().unwrap();
                tx.send(p).await.unwrap();
                tx.close().await.unwrap();
            }
            seen
        });
        let client = pki.client_tls_as("alice");
        let mut resumed = Vec::new();
        for tls in [client.clone(), client.clone(), pki.client_tls_as("alice")] {
            let link = TlsConnector::new("localhost", port, tls)
                .connect()
                .await
                .unwrap();
            resumed.push(tls_of(&link).resumed());
            let (mut tx, mut rx) = link.split();
            tx.send(Bytes::from_static(b"ping")).await.unwrap();
            assert_eq!(rx.recv().await.unwrap().unwrap(), "ping");
            tx.close().await.unwrap();
        }
        assert_eq!(resumed, [false, true, false]);
        let seen = server.await.unwrap();
        assert_eq!(
            seen.iter().map(|t| t.resumed()).collect::<Vec<_>>(),
            [false, true, false]
        );
        for t in &seen {
            let id = t.client_identity().expect("the client's identity");
            assert_eq!(id.common_name.as_deref(), Some("alice"));
            assert!(!t.peer_certificates().is_empty());
        }
    })
    .await;
}

// ---- verification ----

/// A certificate for other names, or from a CA the client does not trust,
/// fails the handshake with a typed, readable error, and the server
/// creates no session.
#[tokio::test]
async fn wrong_name_and_untrusted_ca_are_typed_errors_and_no_session() {
    within(async {
        let pki = pki();
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let server = Server::<Msg>::new(listener, config(1));

        let wrong_name = TlsConnector::new("127.0.0.1", port, pki.client_tls())
            .server_name("example.com")
            .connect()
            .await
            .unwrap_err();
        assert!(
            is_tls(&wrong_name, |e| matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            )),
            "{wrong_name:?}"
        );
        let text = wrong_name.to_string();
        assert!(
            text.starts_with("tls: ") && text.contains("not valid for name"),
            "{text}"
        );

        let other_ca = Ca::new("somebody else");
        let untrusted = ClientTls::from_ca_pem(other_ca.cert_pem.as_bytes()).unwrap();
        let err = TlsConnector::new("localhost", port, untrusted)
            .connect()
            .await
            .unwrap_err();
        assert!(
            is_tls(&err, |e| matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            )),
            "{err:?}"
        );

        // The IP address is checked as an IP address: 127.0.0.1 is in the
        // certificate, so this one works.
        TlsConnector::new("127.0.0.1", port, pki.client_tls())
            .connect()
            .await
            .unwrap();

        while server.stats().bad_handshakes < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(server.stats().sessions_created, 0);
    })
    .await;
}

/// A server that requires client certificates refuses a client without
/// one; with one, the authorization hook sees the client's names and
/// admits or denies by them.
#[tokio::test]
async fn mutual_tls_identity_reaches_the_authorizer() {
    within(async {
        let pki = pki();
        let tls = pki.server_tls().require_client_cert(&pki.roots()).unwrap();
        let (listener, port) = tls_listener(tls).await;
        let authorize = |adm: &Admission| {
            let id = adm.peer.tls.as_ref().and_then(|t| t.client_identity());
            match id.and_then(|id| id.common_name.clone()) {
                Some(cn) if cn == "mallory" => Err(Denied::new("mallory is not welcome")),
                Some(cn) => Ok(Grant::new(cn)),
                None => Err(Denied::new("no client certificate")),
            }
        };
        let server = Arc::new(Server::<Msg>::with_authorizer(
            listener,
            config(2),
            authorize,
        ));

        // No certificate: TLS 1.3 lets the client finish its side, then
        // the server's alert fails the link at the first read.
        let anonymous = TlsConnector::new("localhost", port, pki.client_tls());
        let err = match anonymous.connect().await {
            Err(e) => e,
            Ok(link) => link.split().1.recv().await.unwrap_err(),
        };
        assert!(is_tls(&err, |_| true), "{err:?}");

        let accept = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap() })
        };
        let alice = TlsConnector::new("localhost", port, pki.client_tls_as("alice"));
        let client = StableConduit::<Msg>::connect(alice, config(3))
            .await
            .unwrap();
        client.send(&(0, 0, b"hi".to_vec())).await.unwrap();
        let mut session = accept.await.unwrap();
        let info = session.session_info().unwrap().clone();
        assert_eq!(info.grant().get::<String>().unwrap(), "alice");
        let tls = info.peer().tls.clone().unwrap();
        let id = tls.client_identity().unwrap();
        assert_eq!(id.common_name.as_deref(), Some("alice"));
        assert_eq!(id.dns_names, ["alice.clients.test"]);
        assert_eq!(id.uris, ["spiffe://test/alice"]);
        assert_eq!(id.emails, ["alice@example.test"]);
        assert!(info.peer().addr.is_some());
        assert_eq!(session.recv().await.unwrap().unwrap().2, b"hi");

        let mallory = TlsConnector::new("localhost", port, pki.client_tls_as("mallory"));
        match StableConduit::<Msg>::connect(mallory, config(4)).await {
            Err(Error::Refused(Refusal::Denied { reason })) => {
                assert_eq!(reason, "mallory is not welcome")
            }
            other => panic!("expected a denial, got {:?}", other.map(|_| ())),
        }
        let stats = server.stats();
        assert_eq!(stats.sessions_created, 1);
        assert_eq!(stats.refused_denied, 1);
        assert!(stats.bad_handshakes >= 1, "the anonymous client");
    })
    .await;
}

// ---- a stable conduit over TLS with cuts ----

/// A stable conduit over TLS through the cutting proxy, which cuts the TCP
/// connection under TLS mid-record and inside the TLS handshake: every
/// message arrives exactly once and in order, both ways, across many
/// reconnects (each a new TLS handshake, resumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_conduit_over_tls_through_cutting_proxy() {
    within(async {
        let pki = pki();
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let server = Server::<Msg>::new(listener, config(10));
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let fault = FaultConfig {
            seed: 10,
            mean_bytes_between_cuts: 40_000,
            handshake_cut_probability: 0.2,
            max_connection_age: None,
        };
        let proxy = FaultProxy::start(upstream, fault).await.unwrap();
        let connector = TlsConnector::new("127.0.0.1", proxy.local_addr().port(), pki.client_tls())
            .server_name("localhost");
        let (client, session) = connect_session(&server, connector, config(11)).await;
        let t = Traffic {
            seed: 10,
            streams: 3,
            per_stream: 300,
            max_len: 20_000,
        };
        let back = Traffic { seed: 99, ..t };
        let (client_tx, session_tx) = exchange(client, session, t, back).await.unwrap();
        let (p, c, s) = (proxy.stats(), client_tx.stats(), server.stats());
        eprintln!("tls through proxy: {p:?}; client {c:?}; server {s:?}");
        assert!(p.cuts >= 5, "the proxy cut only {} times", p.cuts);
        assert!(c.reconnects >= 5);
        assert!(s.resumes >= 5);
        assert_eq!(c.frames_received, back.total());
        assert_eq!(session_tx.stats().frames_received, t.total());
    })
    .await;
}

// ---- host names ----

/// TCP and TLS connectors dial `localhost` by name; a `"name:port"`
/// string works too.
#[tokio::test]
async fn connectors_dial_host_names() {
    within(async {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let server = Server::<Msg>::new(tcp, config(20));
        for connector in [
            TcpConnector::host("localhost", port),
            TcpConnector::from_host_port(&format!("localhost:{port}")).unwrap(),
        ] {
            let client = StableConduit::<Msg>::connect(connector, config(21))
                .await
                .unwrap();
            client.send(&(0, 0, vec![1])).await.unwrap();
            let mut session = server.accept().await.unwrap();
            assert_eq!(session.recv().await.unwrap().unwrap().2, [1]);
        }
        assert!(TcpConnector::from_host_port("localhost").is_err());

        let pki = pki();
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let server = Server::<Msg>::new(listener, config(22));
        let connector =
            TlsConnector::from_host_port(&format!("localhost:{port}"), pki.client_tls()).unwrap();
        let client = StableConduit::<Msg>::connect(connector, config(23))
            .await
            .unwrap();
        client.send(&(0, 0, vec![2])).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, [2]);
        let tls = session.session_info().unwrap().peer().tls.clone().unwrap();
        assert_eq!(tls.server_name(), Some("localhost"));
    })
    .await;
}

// ---- hostile peers ----

/// A plaintext tether hello sent to the TLS port fails that connection's
/// handshake with a typed TLS error; the server drops it and serves the
/// next client.
#[tokio::test]
async fn plaintext_on_the_tls_port_is_dropped_and_others_are_served() {
    within(async {
        let pki = pki();

        // The listener alone: establish reports what went wrong.
        let (mut listener, port) = tls_listener(pki.server_tls()).await;
        let mut plain = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        plain
            .write_all(b"\x10\x00\x00\x00TETHER hello....")
            .await
            .unwrap();
        let err = accept_one(&mut listener).await.unwrap_err();
        assert!(is_tls(&err, |_| true), "{err:?}");
        assert!(err.to_string().starts_with("tls: "), "{err}");
        drop(listener);

        // Under a server: the plaintext client's link ends, nothing else.
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let server = Server::<Msg>::new(listener, config(30));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let plain = StreamLink::tcp(
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            StreamConfig::default(),
        );
        let (mut tx, mut rx) = plain.split();
        tx.send(Bytes::from_static(&[0u8; 40])).await.unwrap();
        // The server answers with an alert at most, never a tether frame.
        assert!(!matches!(rx.recv().await, Ok(Some(p)) if p.len() < 64));
        while server.stats().bad_handshakes < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let connector = TlsConnector::new("localhost", port, pki.client_tls());
        let client = StableConduit::<Msg>::connect(connector, config(31))
            .await
            .unwrap();
        client.send(&(0, 0, vec![3])).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, [3]);
        assert_eq!(server.stats().sessions_created, 1);
    })
    .await;
}

/// TCP clients that connect to the TLS port and say nothing hold a pending
/// handshake each, counted by the server's caps, until the handshake
/// timeout ends them; meanwhile another client's TLS handshake and session
/// go through (handshakes run concurrently, not in the accept loop).
#[tokio::test]
async fn silent_clients_time_out_in_the_tls_handshake_while_others_connect() {
    within(async {
        let pki = pki();
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let timeout = Duration::from_millis(1000);
        let mut cfg = config(40);
        cfg = cfg.handshake_timeout(timeout).max_pending_per_source(1);
        let server = Server::<Msg>::new(listener, cfg);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

        let silent_from = |last: u8| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0)))
                .unwrap();
            socket.connect(addr).await.unwrap()
        };
        let started = Instant::now();
        let mut silent = silent_from(2).await;
        while server.stats().pending_handshakes < 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A second silent client from the same source is over the
        // per-source cap: closed at once, before any TLS.
        let mut second = silent_from(2).await;
        let mut buf = [0u8; 16];
        assert_eq!(second.read(&mut buf).await.unwrap_or(0), 0);
        assert_eq!(server.stats().handshakes_refused, 1);

        // Another source connects, handshakes and works meanwhile.
        let connector = TlsConnector::new("localhost", port, pki.client_tls());
        let client = StableConduit::<Msg>::connect(connector, config(41))
            .await
            .unwrap();
        client.send(&(0, 0, vec![4])).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, [4]);
        assert!(started.elapsed() < timeout, "it waited for the silent one");
        assert_eq!(server.stats().pending_handshakes, 1, "the silent one");

        // The silent client is dropped at the handshake timeout.
        assert_eq!(silent.read(&mut buf).await.unwrap_or(0), 0);
        let waited = started.elapsed();
        assert!(waited >= timeout - Duration::from_millis(50), "{waited:?}");
        while server.stats().bad_handshakes < 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stats = server.stats();
        assert_eq!(stats.pending_handshakes, 0);
        assert_eq!(stats.bad_handshakes, 1);
        assert_eq!(stats.sessions_created, 1);
    })
    .await;
}

/// The bytes a rustls client sends first: one TLS record holding a
/// ClientHello for `localhost`.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(pki.client_tls().config(), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(hello[0], 0x16, "a handshake record");
    assert_eq!(hello[5], 0x01, "a ClientHello");
    hello
}

/// Reads until the server ends the connection (at most 5 s) and returns
/// what it sent.
async fn read_to_end(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    got
}

/// Garbage before a valid ClientHello on the same connection (bytes that
/// are no TLS record, a handshake record with a nonsense body, a lone
/// zero byte): the handshake fails with a typed TLS error, the server never
/// answers with a ServerHello, drops that connection and serves the next
/// client.
#[tokio::test]
async fn garbage_before_the_client_hello_fails_that_handshake_only() {
    within(async {
        let pki = pki();
        let hello = client_hello(&pki);
        let garbage: [&[u8]; 3] = [
            b"\x00\xffGARBAGE\r\n",
            &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00],
            &[0x00],
        ];

        // The listener alone: establish reports what went wrong.
        for junk in garbage {
            let (mut listener, port) = tls_listener(pki.server_tls()).await;
            let mut peer = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .unwrap();
            peer.write_all(&[junk, &hello[..]].concat()).await.unwrap();
            let err = accept_one(&mut listener).await.unwrap_err();
            assert!(is_tls(&err, |_| true), "{junk:?}: {err:?}");
        }

        // Under a server: each such connection ends, with an alert at most.
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let server = Server::<Msg>::new(listener, config(32));
        for (i, junk) in garbage.into_iter().enumerate() {
            let mut peer = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .unwrap();
            peer.write_all(&[junk, &hello[..]].concat()).await.unwrap();
            let answer = read_to_end(&mut peer).await;
            assert!(
                answer.first().is_none_or(|&b| b == 0x15),
                "{junk:?}: the server answered {answer:?}, not an alert"
            );
            while server.stats().bad_handshakes < i as u64 + 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let connector = TlsConnector::new("localhost", port, pki.client_tls());
        let client = StableConduit::<Msg>::connect(connector, config(33))
            .await
            .unwrap();
        client.send(&(0, 0, vec![5])).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, [5]);
        let stats = server.stats();
        assert_eq!(stats.bad_handshakes, 3, "{stats:?}");
        assert_eq!(stats.sessions_created, 1, "{stats:?}");
    })
    .await;
}

/// Clients that send part of a ClientHello and stop (half of it; the
/// record header and a few bytes) hold a pending handshake each until the
/// handshake timeout ends them; meanwhile another client's handshake and
/// session go through.
#[tokio::test]
async fn stalled_client_hellos_time_out_while_others_connect() {
    within(async {
        let pki = pki();
        let hello = client_hello(&pki);
        let (listener, port) = tls_listener(pki.server_tls()).await;
        let timeout = Duration::from_millis(1000);
        let mut cfg = config(42);
        cfg = cfg.handshake_timeout(timeout);
        let server = Server::<Msg>::new(listener, cfg);

        let started = Instant::now();
        let mut stalled = Vec::new();
        for part in [&hello[..hello.len() / 2], &hello[..9]] {
            let mut peer = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .unwrap();
            peer.write_all(part).await.unwrap();
            stalled.push(peer);
        }
        while server.stats().pending_handshakes < 2 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        // Another client connects, handshakes and works meanwhile.
        let connector = TlsConnector::new("localhost", port, pki.client_tls());
        let client = StableConduit::<Msg>::connect(connector, config(43))
            .await
            .unwrap();
        client.send(&(0, 0, vec![6])).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, [6]);
        assert!(
            started.elapsed() < timeout,
            "it waited for the stalled ones"
        );
        assert_eq!(server.stats().pending_handshakes, 2, "the stalled ones");

        // The stalled clients are dropped at the handshake timeout, with
        // no ServerHello (the server never got a whole ClientHello).
        for mut peer in stalled {
            let answer = read_to_end(&mut peer).await;
            assert!(
                answer.first().is_none_or(|&b| b == 0x15),
                "the server answered {answer:?}"
            );
        }
        let waited = started.elapsed();
        assert!(waited >= timeout - Duration::from_millis(50), "{waited:?}");
        while server.stats().bad_handshakes < 2 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stats = server.stats();
        assert_eq!(stats.pending_handshakes, 0, "{stats:?}");
        assert_eq!(stats.bad_handshakes, 2, "{stats:?}");
        assert_eq!(stats.sessions_created, 1, "{stats:?}");
    })
    .await;
}

/// A TLS link whose peer goes away without `close_notify` ends in an
/// error, never in a clean `Ok(None)`: truncation is not an end.
#[tokio::test]
async fn a_peer_gone_without_close_notify_is_not_a_clean_end() {
    within(async {
        let pki = pki();
        let (mut listener, port) = tls_listener(pki.server_tls()).await;
        let server = tokio::spawn(async move {
            let link = accept_one(&mut listener).await.unwrap();
            let (mut tx, rx) = link.split();
            tx.send(Bytes::from_static(b"last words")).await.unwrap();
            drop((tx, rx));
        });
        let link = TlsConnector::new("localhost", port, pki.client_tls())
            .connect()
            .await
            .unwrap();
        let (_tx, mut rx) = link.split();
        assert_eq!(rx.recv().await.unwrap().unwrap(), "last words");
        match rx.recv().await {
            Err(LinkError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("expected an unexpected end of stream, got {other:?}"),
        }
        assert!(matches!(rx.recv().await, Err(LinkError::Dead)));
        server.await.unwrap();
    })
    .await;
}

/// With `allow_client_cert`, a client may come without a certificate (no
/// identity) or with one the CA signed (its identity); one signed by
/// another CA is refused.
#[tokio::test]
async fn optional_client_certificates() {
    within(async {
        let pki = pki();
        let tls = pki.server_tls().allow_client_cert(&pki.roots()).unwrap();
        let (mut listener, port) = tls_listener(tls).await;
        let stranger = {
            let other = Ca::new("other CA");
            let id = other.client("stranger");
            pki.client_tls()
                .with_client_cert(id.cert_pem.as_bytes(), id.key_pem.as_bytes())
                .unwrap()
        };
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                match accept_one(&mut listener).await {
                    Ok(link) => {
                        seen.push(Ok(tls_of(&link)));
                        let (mut tx, _rx) = link.split();
                        tx.send(Bytes::from_static(b"ok")).await.unwrap();
                        tx.close().await.unwrap();
                    }
                    Err(e) => seen.push(Err(e)),
                }
            }
            seen
        });
        for tls in [pki.client_tls(), pki.client_tls_as("bob"), stranger] {
            let _ = async {
                let link = TlsConnector::new("localhost", port, tls).connect().await?;
                link.split().1.recv().await
            }
            .await;
        }
        let seen = server.await.unwrap();
        let anonymous = seen[0].as_ref().unwrap();
        assert!(anonymous.client_identity().is_none());
        let bob = seen[1].as_ref().unwrap().client_identity().unwrap();
        assert_eq!(bob.common_name.as_deref(), Some("bob"));
        match &seen[2] {
            Err(LinkError::Tls(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))) => {}
            other => panic!("expected the stranger refused, got {other:?}"),
        }
    })
    .await;
}

/// Configurations from PEM files, and typed errors for what cannot be
/// used: a missing file, PEM without a certificate, a key that does not
/// match its certificate.
#[tokio::test]
async fn pem_files_and_configuration_errors() {
    use tether::link::TlsConfigError;

    within(async {
        let pki = pki();
        let dir = std::env::temp_dir().join(format!("tether-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca = file("ca.pem", &pki.ca.cert_pem);
        let cert = file("server.pem", &pki.server.cert_pem);
        let key = file("server.key", &pki.server.key_pem);
        let alice = pki.ca.client("alice");
        let alice_cert = file("alice.pem", &alice.cert_pem);
        let alice_key = file("alice.key", &alice.key_pem);

        let server_tls = ServerTls::from_pem_files(&cert, &key)
            .unwrap()
            .require_client_cert(&TrustRoots::from_pem_file(&ca).unwrap())
            .unwrap();
        let client_tls = ClientTls::from_ca_file(&ca)
            .unwrap()
            .with_client_cert_files(&alice_cert, &alice_key)
            .unwrap();
        let (mut listener, port) = tls_listener(server_tls).await;
        let accepted = tokio::spawn(async move { accept_one(&mut listener).await });
        let link = TlsConnector::new("localhost", port, client_tls)
            .connect()
            .await
            .unwrap();
        let server_side = accepted.await.unwrap().unwrap();
        let id = tls_of(&server_side).client_identity().cloned().unwrap();
        assert_eq!(id.common_name.as_deref(), Some("alice"));
        drop(link);

        let missing = ClientTls::from_ca_file(dir.join("nope.pem")).unwrap_err();
        assert!(
            matches!(missing, TlsConfigError::Read { .. }),
            "{missing:?}"
        );
        let no_cert = ClientTls::from_ca_pem(pki.server.key_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(no_cert, TlsConfigError::NoCertificates(_)),
            "{no_cert:?}"
        );
        let mismatched =
            ServerTls::from_pem(pki.server.cert_pem.as_bytes(), alice.key_pem.as_bytes())
                .unwrap_err();
        assert!(
            matches!(
                mismatched,
                TlsConfigError::Rustls(rustls::Error::InconsistentKeys(_))
            ),
            "{mismatched:?}"
        );
        // Mozilla's roots are compiled in; the platform store may be empty
        // on a bare machine, which is a typed error, not a panic.
        let _ = ClientTls::webpki_roots();
        if let Err(e) = ClientTls::native_roots() {
            assert!(matches!(e, TlsConfigError::NativeRoots(_)), "{e:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}
