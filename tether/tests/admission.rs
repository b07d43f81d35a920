//! Admission and the server API over real TCP: typed refusals (busy,
//! denied, policy), per-source caps, the authorization hook and the
//! credential, session info, accepting from several tasks, unproven
//! sessions dropped early, and a graceful shutdown. Where the transport
//! matters (what the hook learns of the peer, busy refusals crossing the
//! link) the tests run on every transport of `common::transport`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::transport::Transport;
use common::{config, within};
use tether::link::{StreamConfig, StreamLink, TcpConnector, TcpLink, TcpListener};
use tether::proto::ext;
use tether::{
    Admission, ConduitState, Connector, Denied, Error, Grant, LinkError, Refusal, Server,
    SessionLost, StableConduit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Msg = u64;

/// Connects from a chosen loopback address, so that per-source caps can be
/// exercised with 127.0.0.x sources.
#[derive(Clone)]
struct FromAddr {
    from: std::net::IpAddr,
    to: SocketAddr,
}

impl Connector for FromAddr {
    type Link = TcpLink;

    async fn connect(&self) -> Result<TcpLink, LinkError> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.from, 0))?;
        let stream = socket.connect(self.to).await?;
        Ok(StreamLink::tcp(stream, StreamConfig::default()))
    }
}

fn from(last: u8, to: SocketAddr) -> FromAddr {
    FromAddr {
        from: std::net::Ipv4Addr::new(127, 0, 0, last).into(),
        to,
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A client config that gives up quickly (a busy server is retried until
/// then).
fn impatient(seed: u64, give_up: Duration) -> tether::Config {
    let mut c = config(seed);
    c = c.reconnect_with(|r| r.give_up_after(Some(give_up)));
    c
}

/// Sends one message and waits for the server's echo of it.
async fn echo_once(conduit: &mut StableConduit<Msg>, n: Msg) {
    conduit.send(&n).await.unwrap();
    assert_eq!(conduit.recv().await.unwrap(), Some(n));
}

/// A server on a fresh loopback port with `config`, echoing every
/// session it accepts.
async fn echo_server(config: tether::Config) -> (Arc<Server<Msg>>, SocketAddr) {
    let (l, addr) = listener().await;
    let server = Arc::new(Server::<Msg>::new(l, config));
    spawn_echo(server.clone());
    (server, addr)
}

/// Accepts sessions and echoes, until the server stops.
fn spawn_echo(server: Arc<Server<Msg>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(mut conduit) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(m)) = conduit.recv().await {
                    if conduit.send(&m).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

#[tokio::test]
async fn per_source_cap_refuses_one_address_and_serves_another() {
    within(async {
        let mut c = config(1);
        c = c.max_sessions_per_source(3);
        let (server, addr) = echo_server(c).await;
        let mut held = Vec::new();
        for i in 0..3 {
            let mut conduit = StableConduit::<Msg>::connect(from(2, addr), config(i))
                .await
                .unwrap();
            echo_once(&mut conduit, i).await;
            held.push(conduit);
        }
        // The fourth from the same address is refused as busy, typed, and
        // retried until the client's deadline.
        let started = Instant::now();
        let err =
            StableConduit::<Msg>::connect(from(2, addr), impatient(9, Duration::from_secs(2)))
                .await
                .unwrap_err();
        match err {
            Error::Refused(Refusal::Busy { retry_after, .. }) => {
                assert!(retry_after >= Duration::from_millis(100), "{retry_after:?}");
            }
            other => panic!("expected a busy refusal, got {other:?}"),
        }
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "it was retried"
        );
        assert!(server.stats().refused_busy >= 1);
        // Another address is served at once.
        let started = Instant::now();
        let mut other = StableConduit::<Msg>::connect(from(3, addr), config(10))
            .await
            .unwrap();
        echo_once(&mut other, 7).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        // Closing one of the three makes room again.
        held.pop().unwrap().close().await.unwrap();
        let mut again = StableConduit::<Msg>::connect(from(2, addr), config(11))
            .await
            .unwrap();
        echo_once(&mut again, 8).await;
    })
    .await;
}

async fn busy_server_is_retried_until_room_frees(transport: Transport) {
    within(async {
        let mut c = config(2);
        c = c.max_sessions(1);
        let mut fx = transport.fixture().await;
        let server = Arc::new(Server::<Msg>::new(fx.listener(), c));
        spawn_echo(server.clone());
        let connector = fx.connector();
        let mut first = StableConduit::<Msg>::connect(connector.clone(), config(1))
            .await
            .unwrap();
        echo_once(&mut first, 1).await;
        // The second waits (busy, retried with backoff), and gets in once
        // the first closes.
        let second = tokio::spawn(async move {
            let mut c = StableConduit::<Msg>::connect(connector, config(2))
                .await
                .unwrap();
            echo_once(&mut c, 2).await;
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished());
        first.close().await.unwrap();
        second.await.unwrap();
        assert!(server.stats().refused_busy >= 1);
    })
    .await;
}

transport_tests!(busy_server_is_retried_until_room_frees);

/// The hook sees the real source address of a TCP client (127.0.0.4 here,
/// not the listener's 127.0.0.1).
#[tokio::test]
async fn authorizer_sees_the_tcp_source_address() {
    within(async {
        let (l, addr) = listener().await;
        let authorize = |a: &Admission| Ok(Grant::new(a.peer.addr.unwrap().ip().to_string()));
        let server = Arc::new(Server::<Msg>::with_authorizer(l, config(3), authorize));
        let accept = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap() })
        };
        let client = StableConduit::<Msg>::connect(from(4, addr), config(1))
            .await
            .unwrap();
        client.send(&5).await.unwrap();
        let session = accept.await.unwrap();
        let info = session.session_info().unwrap().clone();
        assert_eq!(info.grant().get::<String>().unwrap(), "127.0.0.4");
        assert_eq!(info.peer().addr.unwrap().ip().to_string(), "127.0.0.4");
    })
    .await;
}

/// What the hook learns of the peer is what the transport knows (an
/// address over TCP, what TLS verified over TLS, nothing in memory or on a
/// Unix socket); the credential decides, and the grant reaches `accept`.
async fn authorizer_sees_peer_and_credential_and_its_grant_reaches_accept(transport: Transport) {
    within(async {
        let mut fx = transport.fixture().await;
        let addr = fx.connector();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let authorize = {
            let seen = seen.clone();
            move |a: &Admission| {
                seen.lock().unwrap().push(a.peer.clone());
                if a.credential.as_ref() == b"let me in" {
                    let who = a
                        .peer
                        .addr
                        .map_or("local".to_owned(), |a| a.ip().to_string());
                    Ok(Grant::new(format!("user@{who}")))
                } else {
                    Err(Denied::new("bad credential"))
                }
            }
        };
        let server = Arc::new(Server::<Msg>::with_authorizer(
            fx.listener(),
            config(3),
            authorize,
        ));
        let mut c = config(1);
        c = c.credential(&b"let me in"[..]);
        let accept = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap() })
        };
        let client = StableConduit::<Msg>::connect(addr.clone(), c)
            .await
            .unwrap();
        client.send(&5).await.unwrap();
        let mut session = accept.await.unwrap();
        let info = session.session_info().unwrap().clone();
        let who = if transport.over_tcp() {
            "127.0.0.1"
        } else {
            "local"
        };
        assert_eq!(
            info.grant().get::<String>().unwrap(),
            &format!("user@{who}")
        );
        let hooked = seen.lock().unwrap()[0].clone();
        fx.check_client_peer(&hooked, Some("127.0.0.1"));
        fx.check_client_peer(info.peer(), Some("127.0.0.1"));
        assert_eq!(info.peer().addr, hooked.addr);
        assert_eq!(session.recv().await.unwrap(), Some(5));
        let listed = server.sessions();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].info.id(), info.id());
        assert!(listed[0].accepted);
        assert!(client.session_info().is_none());

        // A wrong credential is denied, typed, at once (not retried).
        let mut bad = config(2);
        bad = bad.credential(&b"guess"[..]);
        let started = Instant::now();
        match StableConduit::<Msg>::connect(addr, bad).await {
            Err(Error::Refused(Refusal::Denied { reason })) => assert_eq!(reason, "bad credential"),
            other => panic!("expected a denial, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(server.stats().refused_denied, 1);
        assert_eq!(server.stats().sessions_created, 1);
        fx.check_client_peer(&seen.lock().unwrap()[1], Some("127.0.0.1"));
    })
    .await;
}

transport_tests!(authorizer_sees_peer_and_credential_and_its_grant_reaches_accept);

#[tokio::test]
async fn required_keepalive_refuses_base_format_clients() {
    within(async {
        let mut c = config(4);
        c = c.require_extensions(ext::KEEPALIVE | ext::ACKS);
        let (server, addr) = echo_server(c).await;
        // Admission but no keepalive: a typed policy refusal.
        let mut weak = config(1);
        weak = weak.extensions(ext::ACKS | ext::ADMISSION);
        match StableConduit::<Msg>::connect(TcpConnector::new(addr), weak).await {
            Err(Error::Refused(Refusal::Policy { .. })) => {}
            other => panic!("expected a policy refusal, got {other:?}"),
        }
        // The base format: a plain rejection.
        let mut base = config(2);
        base = base.extensions(0);
        match StableConduit::<Msg>::connect(TcpConnector::new(addr), base).await {
            Err(Error::SessionLost(SessionLost::Rejected)) => {}
            other => panic!("expected a rejection, got {other:?}"),
        }
        let mut ok = StableConduit::<Msg>::connect(TcpConnector::new(addr), config(3))
            .await
            .unwrap();
        echo_once(&mut ok, 1).await;
        assert_eq!(server.stats().refused_policy, 2);
    })
    .await;
}

/// Connects and sends a ClientHello (a resume with `key`, or a new
/// session), length-prefixed as on a stream link.
async fn send_hello(
    addr: SocketAddr,
    key: Option<tether::proto::ResumeKey>,
    extensions: u8,
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let hello = tether::proto::ClientHello {
        resume_key: key,
        last_received: None,
        extensions,
    }
    .encode();
    s.write_all(&(hello.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&hello).await.unwrap();
    s
}

/// A raw client that sends a hello, reads the ServerHello, and never sends
/// a frame: the session it got is never proven. Returns the socket and the
/// key the server issued.
async fn unproven_session(
    addr: SocketAddr,
    extensions: u8,
) -> (tokio::net::TcpStream, tether::proto::ResumeKey) {
    let mut s = send_hello(addr, None, extensions).await;
    let mut answer = [0u8; 4 + 25];
    s.read_exact(&mut answer).await.unwrap();
    let hello = tether::proto::ServerHello::decode(&answer[4..]).unwrap();
    (s, hello.resume_key)
}

/// Sends a resume hello with `key` and returns the server's answer.
async fn resume_answer(addr: SocketAddr, key: tether::proto::ResumeKey, extensions: u8) -> Vec<u8> {
    let mut s = send_hello(addr, Some(key), extensions).await;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut answer = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn unproven_sessions_are_dropped_after_the_handshake_timeout() {
    within(async {
        let (l, addr) = listener().await;
        let mut c = config(5);
        c = c
            .handshake_timeout(Duration::from_millis(300))
            .resume_window(Duration::from_secs(120));
        let server = Server::<Msg>::new(l, c);
        let admission = ext::ACKS | ext::ADMISSION;
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(unproven_session(addr, admission).await);
        }
        // A base-format client cannot be told to start over: its unproven
        // session keeps the resume window.
        let base = unproven_session(addr, 0).await;
        assert_eq!(server.stats().sessions_open, 21);
        // Half of them also drop their link: both kinds go.
        let key = idle[0].1;
        idle.truncate(10);
        tokio::time::sleep(Duration::from_millis(900)).await;
        let stats = server.stats();
        assert_eq!(stats.sessions_open, 1, "{stats:?}");
        assert_eq!(stats.unproven_dropped, 20);
        // A late resume of one is told to start over (kind 04), not that
        // its session is lost.
        let answer = resume_answer(addr, key, admission).await;
        let refusal = tether::proto::Refusal::decode(&answer).unwrap();
        assert_eq!(refusal.kind, tether::proto::RefusalKind::Restart);
        drop(base);
    })
    .await;
}

#[tokio::test]
async fn accept_from_several_tasks_each_session_once() {
    within(async {
        let (l, addr) = listener().await;
        let server = Arc::new(Server::<Msg>::new(l, config(6)));
        let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
        for task in 0..3 {
            let (server, tx) = (server.clone(), tx.clone());
            tokio::spawn(async move {
                while let Some(mut c) = server.accept().await {
                    let first = c.recv().await.unwrap().unwrap();
                    let _ = tx.send((task, first, c.session_info().unwrap().id()));
                    drop(c);
                }
            });
        }
        let mut clients = Vec::new();
        for i in 0..12u64 {
            let c = StableConduit::<Msg>::connect(TcpConnector::new(addr), config(i))
                .await
                .unwrap();
            c.send(&i).await.unwrap();
            clients.push(c);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut ids = std::collections::BTreeSet::new();
        for _ in 0..12 {
            let (_, first, id) = got.recv().await.unwrap();
            assert!(seen.insert(first), "session {first} accepted twice");
            assert!(ids.insert(id), "id {id} given twice");
        }
        assert_eq!(seen.len(), 12);
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_every_session_gracefully_within_its_deadline() {
    within(async {
        let (server, addr) = echo_server(config(7)).await;
        let mut clients = Vec::new();
        for i in 0..5u64 {
            let mut c = StableConduit::<Msg>::connect(TcpConnector::new(addr), config(i))
                .await
                .unwrap();
            echo_once(&mut c, i).await;
            clients.push(c);
        }
        let started = Instant::now();
        let report = server.shutdown(Duration::from_secs(5)).await;
        assert_eq!(report.closed, 5, "{report:?}");
        assert_eq!(report.lost, 0);
        assert!(started.elapsed() < Duration::from_secs(5));
        for mut c in clients {
            // The client sees the close: its receiver ends cleanly.
            assert_eq!(c.recv().await.unwrap(), None);
            let mut state = c.state_changes();
            let _ = state.wait_for(|s| *s == ConduitState::Closed).await;
        }
        assert!(server.accept().await.is_none());
        // New clients are not served any more.
        let refused = StableConduit::<Msg>::connect(
            TcpConnector::new(addr),
            impatient(9, Duration::from_millis(500)),
        )
        .await;
        assert!(refused.is_err());
    })
    .await;
}
