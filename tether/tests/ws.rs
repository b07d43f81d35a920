//! WebSocket links (`ws://`, `wss://`): payloads and clean close, a stable
//! conduit through the cutting proxy, hostile clients on a WebSocket port
//! (oversized, text and fragmented frames, requests that never upgrade, a
//! plain GET, a wrong path), the HTTP request reaching the authorization
//! hook, a real nginx reverse proxy, and a foreign client (Python
//! `websockets`) speaking the base stable-conduit format.
//!
//! Certificates are generated at run time (`common::pki`). nginx and
//! Python's `websockets` are optional unless `TETHER_REQUIRE_NGINX=1` or
//! `TETHER_REQUIRE_PYTHON_WS=1`: without them those tests say so and pass.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{Ca, Issued};
use common::{config, exchange, within, Msg, Traffic};
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::any::{AnyConnector, AnyListener};
use tether::link::{
    ClientTls, PendingLink, ServerTls, TcpListener, WsConfig, WsConnector, WsError, WsListener,
};
use tether::{
    Admission, Config, Connector, Denied, Error, Grant, Link, LinkError, LinkRx, LinkTx, Listener,
    Refusal, Server, StableConduit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- helpers ----

struct Pki {
    ca: Ca,
    server: Issued,
}

fn pki() -> Pki {
    let ca = Ca::new("tether ws test CA");
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

    fn client_tls(&self) -> ClientTls {
        ClientTls::from_ca_pem(self.ca.cert_pem.as_bytes()).unwrap()
    }
}

/// A `ws://` listener on a free loopback port, or `wss://` with `tls`.
async fn ws_listener(tls: Option<ServerTls>) -> (WsListener, u16) {
    let mut listener = WsListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    if let Some(tls) = tls {
        listener = listener.tls(tls);
    }
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Connects a stable client and accepts its session, skipping the orphan
/// sessions that a cut right after a new-session hello leaves behind.
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

/// One message each way between a fresh client and the server.
async fn one_round_trip(server: &Server<Msg>, connector: WsConnector, seed: u64) {
    let client = StableConduit::<Msg>::connect(connector, config(seed))
        .await
        .unwrap();
    client.send(&(0, seed, b"ping".to_vec())).await.unwrap();
    let mut session = server.accept().await.unwrap();
    assert_eq!(session.recv().await.unwrap().unwrap().1, seed);
    session.send(&(0, seed, b"pong".to_vec())).await.unwrap();
    let (_tx, mut rx) = client.split();
    assert_eq!(rx.recv().await.unwrap().unwrap().2, b"pong");
}

// ---- links ----

async fn payloads_both_ways(tls: bool) {
    let pki = pki();
    let (mut listener, port) = ws_listener(tls.then(|| pki.server_tls())).await;
    let server = tokio::spawn(async move {
        let link = listener.accept().await.unwrap().establish().await.unwrap();
        let peer = link.peer();
        let (mut tx, mut rx) = link.split();
        let mut echoed = 0;
        while let Some(p) = rx.recv().await.unwrap() {
            tx.send(p).await.unwrap();
            echoed += 1;
        }
        tx.close().await.unwrap();
        (peer, echoed)
    });
    let url = if tls {
        format!("wss://localhost:{port}/")
    } else {
        format!("ws://localhost:{port}")
    };
    let connector = WsConnector::parse(&url, Some(pki.client_tls())).unwrap();
    assert_eq!(connector.is_secure(), tls);
    let link = connector.connect().await.unwrap();
    assert_eq!(link.peer().addr.unwrap().port(), port);
    assert_eq!(link.peer().tls.is_some(), tls);
    assert!(link.peer().http.is_none(), "client side");

    let (mut tx, mut rx) = link.split();
    // Over 4 MiB goes out in continuation frames and is reassembled.
    let huge: Bytes = (0..5 << 20).map(|i| (i * 13 % 251) as u8).collect();
    let big: Bytes = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut sent = vec![Bytes::new(), Bytes::from_static(b"hello"), big, huge];
    sent.extend((0..500u32).map(|i| Bytes::from(i.to_le_bytes().repeat(i as usize % 9))));
    // Small frames are gathered into one write and large ones written
    // straight through: sizes around the 16 KiB boundary, interleaved with
    // small ones, must keep their order.
    for (i, size) in [16_370usize, 16_384, 16_390, 40_000, 3, 9_000, 9_000, 70_000]
        .into_iter()
        .enumerate()
    {
        sent.push(Bytes::from(vec![i as u8; size]));
        sent.push(Bytes::from(vec![0xa0 + i as u8; i + 1]));
    }
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for p in sent {
                tx.feed(p).await.unwrap();
            }
            tx.flush().await.unwrap();
            tx.close().await.unwrap();
            tx.close().await.unwrap();
            assert!(matches!(
                tx.feed(Bytes::new()).await,
                Err(LinkError::Closed)
            ));
        })
    };
    for want in &sent {
        assert_eq!(&rx.recv().await.unwrap().unwrap(), want);
    }
    assert_eq!(rx.recv().await.unwrap(), None, "clean close");
    assert_eq!(rx.recv().await.unwrap(), None);
    sender.await.unwrap();
    let (peer, echoed) = server.await.unwrap();
    assert_eq!(echoed, sent.len());
    let http = peer.http.expect("the server side has the request");
    assert_eq!(http.method(), "GET");
    assert_eq!(http.path(), "/");
    assert_eq!(http.header("upgrade"), Some("websocket"));
    assert_eq!(http.header("Host"), Some(&*format!("localhost:{port}")));
    assert_eq!(peer.tls.is_some(), tls);
    if tls {
        let t = peer.tls.unwrap();
        assert_eq!(t.server_name(), Some("localhost"));
        assert_eq!(t.alpn(), Some(&b"http/1.1"[..]));
    }
}

/// Payloads of every size (empty, over the 4 MiB frame size) both ways
/// over one `ws://` link, then a clean close each way.
#[tokio::test]
async fn ws_payloads_both_ways_and_clean_close() {
    within(payloads_both_ways(false)).await;
}

/// The same over `wss://`, with what TLS negotiated on both ends.
#[tokio::test]
async fn wss_payloads_both_ways_and_clean_close() {
    within(payloads_both_ways(true)).await;
}

/// A link whose peer goes away without a Close frame ends in an
/// `UnexpectedEof` error, never in a clean `Ok(None)`; a message over the
/// receiver's limit is `TooLarge`, and so is one the sender is not allowed.
#[tokio::test]
async fn a_peer_gone_without_close_is_not_a_clean_end_and_limits_hold() {
    within(async {
        let (mut listener, port) = ws_listener(None).await;
        let server = tokio::spawn(async move {
            let link = listener.accept().await.unwrap().establish().await.unwrap();
            let (mut tx, rx) = link.split();
            tx.send(Bytes::from_static(b"last words")).await.unwrap();
            drop((tx, rx));
            let link = listener.accept().await.unwrap().establish().await.unwrap();
            let (_tx, mut rx) = link.split();
            rx.set_max_payload(100);
            let small = rx.recv().await.unwrap().unwrap();
            (small, rx.recv().await)
        });
        let connector = WsConnector::new(&format!("ws://127.0.0.1:{port}/")).unwrap();
        let (_tx, mut rx) = connector.connect().await.unwrap().split();
        assert_eq!(rx.recv().await.unwrap().unwrap(), "last words");
        match rx.recv().await {
            Err(LinkError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("expected an unexpected end of stream, got {other:?}"),
        }
        assert!(matches!(rx.recv().await, Err(LinkError::Dead)));

        let mut cfg = WsConfig::default();
        cfg.max_payload = 1000;
        let (mut tx, _rx) = connector.config(cfg).connect().await.unwrap().split();
        tx.send(Bytes::from(vec![1u8; 100])).await.unwrap();
        tx.send(Bytes::from(vec![2u8; 101])).await.unwrap();
        let err = tx.send(Bytes::from(vec![3u8; 1001])).await.unwrap_err();
        assert!(
            matches!(
                err,
                LinkError::TooLarge {
                    len: 1001,
                    max: 1000
                }
            ),
            "{err:?}"
        );
        let (small, big) = server.await.unwrap();
        assert_eq!(small.len(), 100);
        assert!(
            matches!(big, Err(LinkError::TooLarge { len: 101, max: 100 })),
            "{big:?}"
        );
    })
    .await;
}

/// WebSocket has no half-close: a link that has read the peer's Close
/// (`Ok(None)`) has answered it, and a send on it then fails with a typed
/// error (`BrokenPipe`) instead of reaching the peer, which sees only the
/// clean end.
#[tokio::test]
async fn a_send_after_the_peers_close_is_a_typed_error() {
    within(async {
        let pki = pki();
        for tls in [false, true] {
            let (mut listener, port) = ws_listener(tls.then(|| pki.server_tls())).await;
            let scheme = if tls { "wss" } else { "ws" };
            let connector = WsConnector::parse(
                &format!("{scheme}://localhost:{port}/"),
                Some(pki.client_tls()),
            )
            .unwrap();
            let (client, server) = tokio::join!(connector.connect(), async {
                listener.accept().await.unwrap().establish().await
            });
            let (mut client_tx, mut client_rx) = client.unwrap().split();
            let (mut server_tx, mut server_rx) = server.unwrap().split();
            client_tx.send(Bytes::from_static(b"last")).await.unwrap();
            client_tx.close().await.unwrap();
            assert_eq!(&server_rx.recv().await.unwrap().unwrap()[..], b"last");
            assert_eq!(server_rx.recv().await.unwrap(), None, "{scheme}");
            match server_tx.send(Bytes::from_static(b"late")).await {
                Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => panic!("{scheme}: a send after the peer's Close gave {other:?}"),
            }
            assert_eq!(client_rx.recv().await.unwrap(), None, "{scheme}");
            assert_eq!(client_rx.recv().await.unwrap(), None, "{scheme}");
        }
    })
    .await;
}

/// `AnyConnector::parse` takes `ws://` and `wss://` URLs, and an
/// `AnyListener` serves a `WsListener` next to a TCP listener.
#[tokio::test]
async fn any_transport_speaks_ws() {
    within(async {
        let pki = pki();
        let (ws, ws_port) = ws_listener(None).await;
        let (wss, wss_port) = ws_listener(Some(pki.server_tls())).await;
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let listener = AnyListener::new().with(ws).with(wss).with(tcp);
        let server = Server::<Msg>::new(listener, config(50));
        for (i, url) in [
            format!("ws://127.0.0.1:{ws_port}"),
            format!("wss://localhost:{wss_port}/"),
        ]
        .iter()
        .enumerate()
        {
            let connector = AnyConnector::parse(url, Some(pki.client_tls())).unwrap();
            assert!(matches!(connector, AnyConnector::Ws(_)), "{url}");
            let client = StableConduit::<Msg>::connect(connector, config(51 + i as u64))
                .await
                .unwrap();
            client.send(&(0, i as u64, vec![9])).await.unwrap();
            let mut session = server.accept().await.unwrap();
            assert_eq!(session.recv().await.unwrap().unwrap().1, i as u64);
            let http = session.session_info().unwrap().peer().http.clone();
            assert_eq!(http.unwrap().path(), "/");
        }
        assert!(AnyConnector::parse("ws://", None).is_err());
        assert!(AnyConnector::parse("wss://host:99999/", None).is_err());
        assert!(AnyConnector::parse("ftp://host:21", None).is_err());
    })
    .await;
}

/// `WsConnector::connect_to` dials another address (here a forwarding
/// proxy) while the request still names the URL's host and port and, over
/// `wss://`, the certificate is still checked for the URL's host: what the
/// server sees is what a direct connection would have shown it.
#[tokio::test]
async fn connect_to_dials_elsewhere_with_the_urls_host_and_name() {
    within(async {
        let pki = pki();
        for tls in [false, true] {
            let (listener, port) = ws_listener(tls.then(|| pki.server_tls())).await;
            let mut listener = listener.path("/x");
            let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let forward = FaultConfig {
                seed: 0,
                mean_bytes_between_cuts: 0,
                handshake_cut_probability: 0.0,
                max_connection_age: None,
            };
            let proxy = FaultProxy::start(upstream, forward).await.unwrap();
            let scheme = if tls { "wss" } else { "ws" };
            let connector = WsConnector::parse(
                &format!("{scheme}://localhost:{port}/x?y=1"),
                Some(pki.client_tls()),
            )
            .unwrap()
            .connect_to(proxy.local_addr());
            let (client, server) = tokio::join!(connector.connect(), async {
                listener.accept().await.unwrap().establish().await
            });
            let (client, server) = (client.unwrap(), server.unwrap());
            assert_eq!(proxy.stats().connections, 1, "{scheme}: not via the proxy");
            assert_eq!(client.peer().addr, Some(proxy.local_addr()), "{scheme}");
            let http = server.peer().http.clone().expect("the request");
            assert_eq!(http.header("host"), Some(&*format!("localhost:{port}")));
            assert_eq!(http.target(), "/x?y=1");
            match server.peer().tls.as_deref() {
                Some(peer) => {
                    assert!(tls);
                    assert_eq!(peer.server_name(), Some("localhost"));
                }
                None => assert!(!tls),
            }
            let (mut client_tx, _client_rx) = client.split();
            let (_server_tx, mut server_rx) = server.split();
            client_tx.send(Bytes::from_static(b"via")).await.unwrap();
            assert_eq!(&server_rx.recv().await.unwrap().unwrap()[..], b"via");
        }
    })
    .await;
}

// ---- a stable conduit with cuts ----

async fn stable_through_cutting_proxy(tls: bool, seed: u64) {
    eprintln!("seed {seed}");
    let pki = pki();
    let (listener, port) = ws_listener(tls.then(|| pki.server_tls())).await;
    let server = Server::<Msg>::new(listener, config(seed));
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let fault = FaultConfig {
        seed,
        mean_bytes_between_cuts: 40_000,
        handshake_cut_probability: 0.2,
        max_connection_age: None,
    };
    let proxy = FaultProxy::start(upstream, fault).await.unwrap();
    let proxy_port = proxy.local_addr().port();
    let scheme = if tls { "wss" } else { "ws" };
    let connector = WsConnector::parse(
        &format!("{scheme}://127.0.0.1:{proxy_port}/"),
        Some(pki.client_tls()),
    )
    .unwrap()
    .server_name("localhost");
    let (client, session) = connect_session(&server, connector, config(seed + 1)).await;
    let t = Traffic {
        seed,
        streams: 3,
        per_stream: 300,
        max_len: 20_000,
    };
    let back = Traffic {
        seed: seed + 89,
        ..t
    };
    let (client_tx, session_tx) = exchange(client, session, t, back).await.unwrap();
    let (p, c, s) = (proxy.stats(), client_tx.stats(), server.stats());
    eprintln!("{scheme} through proxy: {p:?}; client {c:?}; server {s:?}");
    assert!(p.cuts >= 5, "the proxy cut only {} times", p.cuts);
    assert!(c.reconnects >= 5);
    assert!(s.resumes >= 5);
    assert_eq!(c.frames_received, back.total());
    assert_eq!(session_tx.stats().frames_received, t.total());
}

/// A stable conduit over `ws://` through the cutting proxy (cuts mid-frame
/// and inside the HTTP upgrade): every message exactly once, in order,
/// both ways, across many reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_conduit_over_ws_through_cutting_proxy() {
    within(stable_through_cutting_proxy(false, 60)).await;
}

/// The same over `wss://` (cuts inside TLS records and handshakes too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_conduit_over_wss_through_cutting_proxy() {
    within(stable_through_cutting_proxy(true, 70)).await;
}

// ---- hostile clients ----

/// A raw client-to-server frame: FIN set as asked, masked as clients must.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend(mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A new-session ClientHello of the base format.
fn client_hello() -> Vec<u8> {
    let mut hello = b"ROCH".to_vec();
    hello.resize(25, 0);
    hello
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends `request` on a fresh connection and reads the answer's head.
async fn raw_request(port: u16, request: &[u8]) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap();
    tcp.write_all(request).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (tcp, String::from_utf8_lossy(&head).into_owned())
}

/// An upgraded raw connection.
async fn raw_upgraded(port: u16) -> TcpStream {
    let (tcp, head) = raw_request(port, upgrade_request("/").as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    tcp
}

/// Reads server frames (unmasked) until a Close; returns its code, or
/// `None` if the connection ended first. Data frames are collected.
async fn read_until_close(tcp: &mut TcpStream, data: &mut Vec<(u8, Vec<u8>)>) -> Option<u16> {
    loop {
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).await.ok()?;
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7f {
            126 => u64::from(tcp.read_u16().await.ok()?),
            127 => tcp.read_u64().await.ok()?,
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        tcp.read_exact(&mut payload).await.ok()?;
        if head[0] & 0x0f == 0x8 {
            return Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
        data.push((head[0], payload));
    }
}

/// Hostile clients against a `Server` on a `WsListener`, each ending its
/// own connection with a clear outcome while a normal client is served:
/// a frame announcing more than the limit (Close 1009), a fragmented
/// message over the limit (1009), a text frame (1003), an unmasked frame
/// (1002), a plain GET (426), a wrong path (404), a head over 8 KiB (431);
/// a valid fragmented hello is reassembled and answered.
#[tokio::test]
async fn hostile_frames_and_requests_end_their_connection_only() {
    within(async {
        let (listener, port) = ws_listener(None).await;
        let listener = listener.path("/");
        let server = Server::<Msg>::new(listener, config(80));
        let url = format!("ws://127.0.0.1:{port}/");
        // A normal client, before and after everything.
        let client = StableConduit::<Msg>::connect(WsConnector::new(&url).unwrap(), config(81))
            .await
            .unwrap();
        client.send(&(1, 0, b"before".to_vec())).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, b"before");

        let mut data = Vec::new();
        // A frame header announcing 1 GiB: refused from the header.
        let mut tcp = raw_upgraded(port).await;
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend((1u64 << 30).to_be_bytes());
        huge.extend([1, 2, 3, 4]);
        tcp.write_all(&huge).await.unwrap();
        assert_eq!(read_until_close(&mut tcp, &mut data).await, Some(1009));

        // Fragments under the limit each, over it together (the server's
        // limit before the hello is small).
        let mut tcp = raw_upgraded(port).await;
        let piece = vec![0u8; 60_000];
        let mut bytes = frame(false, 0x2, &piece);
        for _ in 0..200 {
            bytes.extend(frame(false, 0x0, &piece));
        }
        let _ = tcp.write_all(&bytes).await;
        assert_eq!(read_until_close(&mut tcp, &mut data).await, Some(1009));

        // A text frame.
        let mut tcp = raw_upgraded(port).await;
        tcp.write_all(&frame(true, 0x1, b"hello")).await.unwrap();
        assert_eq!(read_until_close(&mut tcp, &mut data).await, Some(1003));

        // An unmasked frame from a client.
        let mut tcp = raw_upgraded(port).await;
        tcp.write_all(&[0x82, 0x01, 0x00]).await.unwrap();
        assert_eq!(read_until_close(&mut tcp, &mut data).await, Some(1002));
        assert!(data.is_empty(), "{data:?}");

        // A valid hello in three fragments, a ping between them: answered
        // with a pong and a ServerHello.
        let mut tcp = raw_upgraded(port).await;
        let hello = client_hello();
        let mut bytes = frame(false, 0x2, &hello[..10]);
        bytes.extend(frame(true, 0x9, b"are you there"));
        bytes.extend(frame(false, 0x0, &hello[10..20]));
        bytes.extend(frame(true, 0x0, &hello[20..]));
        tcp.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let mut head = [0u8; 2];
            tcp.read_exact(&mut head).await.unwrap();
            let mut payload = vec![0u8; usize::from(head[1])];
            tcp.read_exact(&mut payload).await.unwrap();
            got.push((head[0], payload));
        }
        assert_eq!(got[0], (0x8a, b"are you there".to_vec()), "the pong");
        assert_eq!(got[1].0, 0x82, "one binary frame");
        assert_eq!(&got[1].1[..4], b"ROSH", "a ServerHello");
        assert_eq!(got[1].1.len(), 25);
        drop(tcp);

        // HTTP requests that are not upgrades.
        let (_, head) = raw_request(port, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
        let (_, head) = raw_request(port, upgrade_request("/elsewhere").as_bytes()).await;
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
        let (_, head) = raw_request(port, b"POST / HTTP/1.1\r\nHost: test\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
        let (_, head) = raw_request(port, b"\x16\x03\x01 not http\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let mut long = b"GET / HTTP/1.1\r\nHost: test\r\n".to_vec();
        for i in 0..400 {
            long.extend(format!("X-Filler-{i}: 0123456789\r\n").as_bytes());
        }
        let (_, head) = raw_request(port, &long).await;
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");

        // The connector reports the refusal with its status.
        let err = WsConnector::new(&format!("ws://127.0.0.1:{port}/nope"))
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                LinkError::WebSocket(WsError::Refused { status: 404, .. })
            ),
            "{err:?}"
        );

        // Every hostile connection was counted and ended; the normal
        // client is still served.
        while server.stats().bad_handshakes < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client.send(&(1, 1, b"after".to_vec())).await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().2, b"after");
        let stats = server.stats();
        assert_eq!(stats.sessions_created, 2, "{stats:?}");
        assert_eq!(stats.pending_handshakes, 0);
        assert_eq!(client.stats().reconnects, 0);
    })
    .await;
}

/// Clients that send half a request and stall hold a pending handshake
/// each until the server's handshake timeout, and no longer; meanwhile
/// another client upgrades and gets a session.
#[tokio::test]
async fn a_request_that_never_upgrades_is_held_until_the_handshake_timeout_only() {
    within(async {
        let (listener, port) = ws_listener(None).await;
        let timeout = Duration::from_millis(3000);
        let mut cfg = config(90);
        cfg = cfg.handshake_timeout(timeout);
        let server = Server::<Msg>::new(listener, cfg);
        let started = Instant::now();
        let mut stalled = Vec::new();
        for _ in 0..3 {
            let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nUpgr")
                .await
                .unwrap();
            stalled.push(tcp);
        }
        while server.stats().pending_handshakes < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let connector = WsConnector::new(&format!("ws://localhost:{port}/")).unwrap();
        one_round_trip(&server, connector, 91).await;
        assert!(
            started.elapsed() < timeout,
            "it waited for the stalled ones"
        );
        assert_eq!(server.stats().pending_handshakes, 3);
        for mut tcp in stalled {
            let mut buf = [0u8; 64];
            assert_eq!(
                tcp.read(&mut buf).await.unwrap_or(0),
                0,
                "closed, no answer"
            );
        }
        let waited = started.elapsed();
        assert!(waited >= timeout - Duration::from_millis(50), "{waited:?}");
        assert!(waited < timeout * 3, "{waited:?}");
        while server.stats().bad_handshakes < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(server.stats().pending_handshakes, 0);
    })
    .await;
}

// ---- the request reaches the authorization hook ----

/// The upgrade request's path, query and headers (an `Authorization`) and
/// the peer's address reach the authorization hook, which admits by them
/// or refuses; the connector's extra headers are validated.
#[tokio::test]
async fn http_request_reaches_the_authorizer() {
    within(async {
        let (listener, port) = ws_listener(None).await;
        let listener = listener.path("/tether");
        let authorize = |adm: &Admission| {
            let http = adm
                .peer
                .http
                .as_ref()
                .expect("a WebSocket link has its request");
            assert_eq!(http.path(), "/tether");
            assert!(adm.peer.addr.unwrap().ip().is_loopback());
            match http.header("authorization") {
                Some("Bearer good") => Ok(Grant::new((
                    http.query().unwrap_or("").to_owned(),
                    adm.peer.addr.unwrap(),
                ))),
                Some(other) => Err(Denied::new(format!("bad token {other:?}"))),
                None => Err(Denied::new("no token")),
            }
        };
        let server = Arc::new(Server::<Msg>::with_authorizer(
            listener,
            config(100),
            authorize,
        ));
        let url = format!("ws://127.0.0.1:{port}/tether?room=4");
        let accept = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap() })
        };
        let good = WsConnector::new(&url)
            .unwrap()
            .header("Authorization", "Bearer good")
            .unwrap();
        let client = StableConduit::<Msg>::connect(good, config(101))
            .await
            .unwrap();
        client.send(&(0, 0, b"hi".to_vec())).await.unwrap();
        let mut session = accept.await.unwrap();
        let info = session.session_info().unwrap().clone();
        let (query, addr) = info.grant().get::<(String, SocketAddr)>().unwrap().clone();
        assert_eq!(query, "room=4");
        assert_eq!(Some(addr), info.peer().addr);
        let http = info.peer().http.clone().unwrap();
        assert_eq!(http.target(), "/tether?room=4");
        assert_eq!(http.header("AUTHORIZATION"), Some("Bearer good"));
        assert_eq!(session.recv().await.unwrap().unwrap().2, b"hi");

        for (token, reason) in [
            (Some("Bearer bad"), "bad token \"Bearer bad\""),
            (None, "no token"),
        ] {
            let mut c = WsConnector::new(&url).unwrap();
            if let Some(t) = token {
                c = c.header("authorization", t).unwrap();
            }
            match StableConduit::<Msg>::connect(c, config(102)).await {
                Err(Error::Refused(Refusal::Denied { reason: r })) => assert_eq!(r, reason),
                other => panic!("expected a denial, got {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(server.stats().refused_denied, 2);
        assert_eq!(server.stats().sessions_created, 1);

        let c = WsConnector::new(&url).unwrap();
        assert!(c.clone().header("Sec-WebSocket-Key", "x").is_err());
        assert!(c.clone().header("Host", "x").is_err());
        assert!(c.clone().header("bad name", "x").is_err());
        assert!(c.clone().header("X-Ok", "a\r\nb").is_err());
        assert!(WsConnector::new("http://127.0.0.1:1/").is_err());
        assert!(WsConnector::new("ws://user@host/").is_err());
    })
    .await;
}

// ---- a real nginx in front ----

/// A child process killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-ws-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nginx_binary() -> Option<PathBuf> {
    let found = [PathBuf::from("/usr/sbin/nginx")]
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("nginx"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("TETHER_REQUIRE_NGINX").as_deref() != Ok("1"),
            "nginx is required (TETHER_REQUIRE_NGINX=1) but not installed"
        );
        eprintln!("SKIPPED: nginx is not installed (apt-get install nginx-light)");
    }
    found
}

/// Starts nginx as a reverse proxy from a free loopback port to
/// `upstream`, everything it writes inside `dir`, and waits until it
/// accepts connections.
async fn start_nginx(binary: &Path, dir: &Path, upstream: u16) -> (KillOnDrop, u16) {
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
         proxy_pass http://127.0.0.1:{upstream};\n      proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade;\n\
         proxy_set_header Connection \"upgrade\";\n\
         proxy_set_header X-Forwarded-For $remote_addr;\n\
         proxy_read_timeout 60s;\n    }}\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(binary)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("could not start nginx");
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return (child, port);
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            panic!("nginx exited with {status}: {log}");
        }
        assert!(Instant::now() < deadline, "nginx did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stable conduit through a real nginx reverse proxy, with the cutting
/// proxy between nginx and the server (so nginx's upstream connections
/// die mid-frame) and nginx itself restarted mid-run: every message
/// exactly once, in order, both ways; the server sees nginx's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_conduit_through_nginx() {
    let Some(nginx) = nginx_binary() else { return };
    within(async {
        let seed = 110;
        eprintln!("seed {seed}");
        let (listener, port) = ws_listener(None).await;
        let server = Server::<Msg>::new(listener, config(seed));
        let fault = FaultConfig {
            seed,
            mean_bytes_between_cuts: 60_000,
            handshake_cut_probability: 0.1,
            max_connection_age: None,
        };
        let proxy = FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), fault)
            .await
            .unwrap();
        let dir = temp_dir("nginx");
        let (first, nginx_port) = start_nginx(&nginx, &dir, proxy.local_addr().port()).await;
        let connector = WsConnector::new(&format!("ws://localhost:{nginx_port}/")).unwrap();
        let (client, session) = connect_session(&server, connector, config(seed + 1)).await;
        let http = session.session_info().unwrap().peer().http.clone().unwrap();
        assert!(http.header("x-forwarded-for").is_some(), "{http:?}");
        let t = Traffic {
            seed,
            streams: 2,
            per_stream: 300,
            max_len: 20_000,
        };
        let back = Traffic {
            seed: seed + 7,
            ..t
        };
        // Restart nginx (same port) while the traffic runs.
        let restart = {
            let (nginx, dir) = (nginx.clone(), dir.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(first);
                let conf = std::fs::read_to_string(dir.join("nginx.conf")).unwrap();
                let child = Command::new(&nginx)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("could not restart nginx");
                assert!(conf.contains(&format!("listen 127.0.0.1:{nginx_port}")));
                KillOnDrop(child)
            })
        };
        let (client_tx, session_tx) = exchange(client, session, t, back).await.unwrap();
        let second = restart.await.unwrap();
        let (p, c, s) = (proxy.stats(), client_tx.stats(), server.stats());
        eprintln!("through nginx: {p:?}; client {c:?}; server {s:?}");
        assert!(p.cuts >= 3, "the proxy cut only {} times", p.cuts);
        assert!(c.reconnects >= 3);
        assert_eq!(c.frames_received, back.total());
        assert_eq!(session_tx.stats().frames_received, t.total());
        // The restarted nginx serves new clients.
        let connector = WsConnector::new(&format!("ws://127.0.0.1:{nginx_port}/")).unwrap();
        one_round_trip(&server, connector, seed + 2).await;
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

// ---- a foreign client ----

/// Python's `websockets` runs `tests/ws/base_client.py`, which speaks the
/// base stable-conduit format by hand (a new-session ClientHello, then
/// sequenced frames carrying postcard-encoded messages) and checks the
/// echoes; the server checks what it received.
#[tokio::test]
async fn python_websockets_client_speaks_the_base_format() {
    let has_ws = Command::new("python3")
        .args(["-c", "import websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_ws {
        assert!(
            std::env::var("TETHER_REQUIRE_PYTHON_WS").as_deref() != Ok("1"),
            "Python websockets is required (TETHER_REQUIRE_PYTHON_WS=1) but missing"
        );
        eprintln!("SKIPPED: Python websockets is not installed (pip install websockets)");
        return;
    }
    within(async {
        let (listener, port) = ws_listener(None).await;
        let server = Server::<Msg>::new(listener, config(120));
        let n = 50u64;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ws/base_client.py");
        let child = tokio::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(n.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("could not start python3");
        let mut session = server.accept().await.unwrap();
        let mut received = Vec::new();
        for _ in 0..n {
            let (stream, idx, data) = session.recv().await.unwrap().unwrap();
            let mut echo = b"echo:".to_vec();
            echo.extend(&data);
            session.send(&(stream, idx, echo)).await.unwrap();
            received.push((stream, idx, data));
        }
        let out = child.wait_with_output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "python failed: {stdout}\n{stderr}");
        assert_eq!(stdout.trim(), format!("ok {n} echoes"), "{stderr}");
        for (i, (stream, idx, data)) in received.iter().enumerate() {
            assert_eq!((*stream, *idx), (7, i as u64));
            assert_eq!(
                data,
                format!("python {i} {}", "x".repeat(i * 37)).as_bytes()
            );
        }
        let http = session.session_info().unwrap().peer().http.clone().unwrap();
        assert!(http
            .header("user-agent")
            .unwrap_or("")
            .contains("websockets"));
    })
    .await;
}
