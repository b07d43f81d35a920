//! The systems under test, set up the same way for every workload, and
//! the workloads that compare them: one-way throughput, ping-pong and
//! allocations per message.
//!
//! Every system carries the same message type ([`Msg`], a postcard-encoded
//! byte string) between a client and a server in this process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tether::link::mem::{self, MemConnector, MemListener};
use tether::link::stream::{StreamRx, StreamTx};
use tether::link::tls::{ClientTls, ServerTls, TlsConnector, TlsListener};
use tether::link::ws::{WsConnector, WsListener};
use tether::link::{Connector, Listener, PendingLink, TcpConnector, TcpListener};
use tether::{BareConduit, BareReceiver, BareSender, Config, Server, StableConduit};
use tether::{StableReceiver, StableSender};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_websockets::{Message, WebSocketStream};

use super::alloc::{AllocCounter, AllocCounts, SLOT_RECEIVER, SLOT_SENDER};

/// The message type of every system.
pub(crate) type Msg = crate::Bytes;

/// The Framed baseline and the bare conduit flush after this many fed
/// messages (and at the end). The stable conduit batches by itself.
pub(crate) const FLUSH_EVERY: u64 = 64;

/// Payloads in flight per direction on the in-memory link (the stable
/// conduit's writer hands the link up to 256 frames per batch).
pub(crate) const MEM_CAPACITY: usize = 256;

/// Longest any single step may take before the workload is declared stuck.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The result of a spawned side of a measurement, failing as `who` stuck
/// if it takes longer than [`STEP_TIMEOUT`].
pub(crate) async fn finished<T>(
    side: tokio::task::JoinHandle<anyhow::Result<T>>,
    who: &str,
) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, side)
        .await
        .with_context(|| format!("{who} stuck"))??
}

/// One of the systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum System {
    /// `Framed<TcpStream, LengthDelimitedCodec>` and postcard.
    Framed,
    /// tether's bare conduit over a TCP stream link.
    Bare,
    /// tether's stable conduit over TCP.
    Stable,
    /// tether's stable conduit over the in-memory link.
    StableMem,
    /// `Framed` and postcard inside a TLS session (rustls, the same
    /// configurations as tether's TLS links).
    FramedTls,
    /// tether's stable conduit over TLS.
    StableTls,
    /// A plain WebSocket over TCP (tokio-websockets, the crate under
    /// tether's WebSocket links): each postcard-encoded message one binary
    /// message, fed and flushed like `Framed`.
    WsPlain,
    /// tether's stable conduit over a WebSocket link (`ws://`).
    StableWs,
}

impl System {
    pub(crate) const ALL: [System; 8] = [
        System::Framed,
        System::Bare,
        System::Stable,
        System::StableMem,
        System::FramedTls,
        System::StableTls,
        System::WsPlain,
        System::StableWs,
    ];

    /// The key of this system in the JSON report.
    pub(crate) fn key(self) -> &'static str {
        match self {
            System::Framed => "framed",
            System::Bare => "bare",
            System::Stable => "stable",
            System::StableMem => "stable_mem",
            System::FramedTls => "framed_tls",
            System::StableTls => "stable_tls",
            System::WsPlain => "ws_plain",
            System::StableWs => "stable_ws",
        }
    }

    /// The column title in the table.
    pub(crate) fn label(self) -> &'static str {
        match self {
            System::Framed => "Framed (TCP)",
            System::Bare => "bare (TCP)",
            System::Stable => "stable (TCP)",
            System::StableMem => "stable (mem)",
            System::FramedTls => "Framed (TLS)",
            System::StableTls => "stable (TLS)",
            System::WsPlain => "WS (plain)",
            System::StableWs => "stable (WS)",
        }
    }
}

/// Throwaway TLS credentials of the TLS systems: a CA and a `localhost`
/// certificate it signed, generated once per process.
pub(crate) struct BenchTls {
    pub(crate) server: ServerTls,
    pub(crate) client: ClientTls,
}

pub(crate) fn bench_tls() -> anyhow::Result<&'static BenchTls> {
    static TLS: std::sync::OnceLock<BenchTls> = std::sync::OnceLock::new();
    if let Some(t) = TLS.get() {
        return Ok(t);
    }
    let pki = crate::pki::Pki::localhost()?;
    let made = BenchTls {
        server: ServerTls::from_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())?,
        client: ClientTls::from_ca_pem(pki.ca_pem.as_bytes())?,
    };
    Ok(TLS.get_or_init(|| made))
}

/// A payload of `size` bytes.
pub(crate) fn payload(size: usize) -> Msg {
    Msg::from((0..size).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>())
}

type TcpTx = StreamTx<OwnedWriteHalf>;
type TcpRx = StreamRx<OwnedReadHalf>;

/// One end of a connection of any system.
pub(crate) enum Endpoint {
    Framed(Box<Framed<TcpStream, LengthDelimitedCodec>>),
    FramedTls(Box<Framed<TlsStream<TcpStream>, LengthDelimitedCodec>>),
    Bare(BareSender<TcpTx, Msg>, BareReceiver<TcpRx, Msg>),
    Ws(Box<WebSocketStream<TcpStream>>),
    /// On the server side, the server (and for the in-memory link a
    /// connector, without which the server's listener reports an error
    /// every 10 ms) are kept here so that they live as long as the
    /// connection.
    Stable {
        tx: StableSender<Msg>,
        rx: StableReceiver<Msg>,
        _server: Option<(Box<Server<Msg>>, Option<MemConnector>)>,
    },
}

impl Endpoint {
    /// Sends `n` copies of `msg` the way a competent user streams: Framed
    /// and bare feed and flush every [`FLUSH_EVERY`]; stable just sends.
    pub(crate) async fn send_many(&mut self, msg: &Msg, n: u64) -> anyhow::Result<()> {
        match self {
            Endpoint::Framed(f) => framed_send_many(f, msg, n).await?,
            Endpoint::FramedTls(f) => framed_send_many(f, msg, n).await?,
            Endpoint::Ws(ws) => {
                for i in 1..=n {
                    ws.feed(ws_message(msg)?).await?;
                    if i % FLUSH_EVERY == 0 {
                        ws.flush().await?;
                    }
                }
                ws.flush().await?;
            }
            Endpoint::Bare(tx, _) => {
                for i in 1..=n {
                    tx.feed(msg).await?;
                    if i % FLUSH_EVERY == 0 {
                        tx.flush().await?;
                    }
                }
                tx.flush().await?;
            }
            Endpoint::Stable { tx, .. } => {
                for _ in 0..n {
                    // By path: with SinkExt in scope, `.send` on a
                    // `&mut StableSender` is the Sink's, which takes an owned message.
                    StableSender::send(tx, msg).await?;
                }
            }
        }
        Ok(())
    }

    /// Sends one message and pushes it out at once.
    pub(crate) async fn send_one(&mut self, msg: &Msg) -> anyhow::Result<()> {
        match self {
            Endpoint::Framed(f) => framed_send_one(f, msg).await?,
            Endpoint::FramedTls(f) => framed_send_one(f, msg).await?,
            Endpoint::Ws(ws) => ws.send(ws_message(msg)?).await?,
            Endpoint::Bare(tx, _) => tx.send(msg).await?,
            Endpoint::Stable { tx, .. } => StableSender::send(tx, msg).await?,
        }
        Ok(())
    }

    /// Receives and decodes one message; the end of the stream is an error.
    pub(crate) async fn recv(&mut self) -> anyhow::Result<Msg> {
        let got = match self {
            Endpoint::Framed(f) => framed_recv(f).await?,
            Endpoint::FramedTls(f) => framed_recv(f).await?,
            Endpoint::Ws(ws) => ws_recv(ws).await?,
            Endpoint::Bare(_, rx) => rx.recv().await?,
            Endpoint::Stable { rx, .. } => rx.recv().await?,
        };
        got.context("the connection ended early")
    }
}

async fn framed_send_many<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, LengthDelimitedCodec>,
    msg: &Msg,
    n: u64,
) -> anyhow::Result<()> {
    for i in 1..=n {
        let buf = postcard::to_allocvec(msg)?;
        f.feed(bytes::Bytes::from(buf)).await?;
        if i % FLUSH_EVERY == 0 {
            SinkExt::<bytes::Bytes>::flush(f).await?;
        }
    }
    SinkExt::<bytes::Bytes>::flush(f).await?;
    Ok(())
}

async fn framed_send_one<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, LengthDelimitedCodec>,
    msg: &Msg,
) -> anyhow::Result<()> {
    let buf = postcard::to_allocvec(msg)?;
    f.send(bytes::Bytes::from(buf)).await?;
    Ok(())
}

async fn framed_recv<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, LengthDelimitedCodec>,
) -> anyhow::Result<Option<Msg>> {
    Ok(match f.next().await {
        Some(frame) => Some(postcard::from_bytes::<Msg>(&frame?)?),
        None => None,
    })
}

/// One postcard-encoded message as one binary WebSocket message.
fn ws_message(msg: &Msg) -> anyhow::Result<Message> {
    Ok(Message::binary(bytes::Bytes::from(postcard::to_allocvec(
        msg,
    )?)))
}

/// The next binary message, decoded; control frames are answered by
/// tokio-websockets and never returned.
async fn ws_recv(ws: &mut WebSocketStream<TcpStream>) -> anyhow::Result<Option<Msg>> {
    loop {
        match ws.next().await {
            None => return Ok(None),
            Some(m) => {
                let m = m?;
                if m.is_close() {
                    return Ok(None);
                }
                if m.is_binary() {
                    return Ok(Some(postcard::from_bytes::<Msg>(m.as_payload())?));
                }
            }
        }
    }
}

/// A server side waiting for its client.
pub(crate) enum Listening {
    Framed(tokio::net::TcpListener),
    FramedTls(tokio::net::TcpListener, tokio_rustls::TlsAcceptor),
    Bare(TcpListener),
    Ws(tokio::net::TcpListener),
    Stable(Box<Server<Msg>>, Option<MemConnector>),
}

/// How the client reaches the server.
pub(crate) enum Dial {
    Tcp(SocketAddr),
    /// TLS to `localhost` at this address.
    Tls(SocketAddr),
    /// `ws://127.0.0.1:PORT/`.
    Ws(SocketAddr),
    Mem(MemConnector),
}

/// Starts the server side of `system`. For the stable systems this spawns
/// the server's tasks on the current runtime.
pub(crate) async fn listen(system: System) -> anyhow::Result<(Listening, Dial)> {
    Ok(match system {
        System::Framed => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            (Listening::Framed(l), Dial::Tcp(addr))
        }
        System::Bare => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            (Listening::Bare(l), Dial::Tcp(addr))
        }
        System::Stable => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let server = Server::new(l, Config::default());
            (Listening::Stable(Box::new(server), None), Dial::Tcp(addr))
        }
        System::FramedTls => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let acceptor = tokio_rustls::TlsAcceptor::from(bench_tls()?.server.config());
            (Listening::FramedTls(l, acceptor), Dial::Tls(addr))
        }
        System::StableTls => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let l = TlsListener::new(l, bench_tls()?.server.clone());
            let server = Server::new(l, Config::default());
            (Listening::Stable(Box::new(server), None), Dial::Tls(addr))
        }
        System::WsPlain => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            (Listening::Ws(l), Dial::Ws(addr))
        }
        System::StableWs => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let l = WsListener::new(l);
            let server = Server::new(l, Config::default());
            (Listening::Stable(Box::new(server), None), Dial::Ws(addr))
        }
        System::StableMem => {
            let (l, c): (MemListener, MemConnector) = mem::listener(MEM_CAPACITY);
            let server = Server::new(l, Config::default());
            let keep = c.clone();
            (
                Listening::Stable(Box::new(server), Some(keep)),
                Dial::Mem(c),
            )
        }
    })
}

/// Accepts the one client of a [`Listening`].
pub(crate) async fn accept(listening: Listening) -> anyhow::Result<Endpoint> {
    Ok(match listening {
        Listening::Framed(l) => {
            let (stream, _) = l.accept().await?;
            stream.set_nodelay(true)?;
            Endpoint::Framed(Box::new(Framed::new(stream, LengthDelimitedCodec::new())))
        }
        Listening::FramedTls(l, acceptor) => {
            let (stream, _) = l.accept().await?;
            stream.set_nodelay(true)?;
            let stream = TlsStream::Server(acceptor.accept(stream).await?);
            Endpoint::FramedTls(Box::new(Framed::new(stream, LengthDelimitedCodec::new())))
        }
        Listening::Ws(l) => {
            let (stream, _) = l.accept().await?;
            stream.set_nodelay(true)?;
            let (_request, ws) = tokio_websockets::ServerBuilder::new()
                .limits(ws_limits())
                .accept(stream)
                .await?;
            Endpoint::Ws(Box::new(ws))
        }
        Listening::Bare(mut l) => {
            let link = l.accept().await?.establish().await?;
            let (tx, rx) = BareConduit::<_, Msg>::new(link).split();
            Endpoint::Bare(tx, rx)
        }
        Listening::Stable(server, keep) => {
            let conduit = server.accept().await.context("the server stopped")?;
            let (tx, rx) = conduit.split();
            Endpoint::Stable {
                tx,
                rx,
                _server: Some((server, keep)),
            }
        }
    })
}

/// Connects the client side of `system`.
pub(crate) async fn dial(system: System, dial: Dial) -> anyhow::Result<Endpoint> {
    Ok(match (system, dial) {
        (System::Framed, Dial::Tcp(addr)) => {
            let stream = TcpStream::connect(addr).await?;
            // What anyone measuring latency does; tether's TCP links set it too.
            stream.set_nodelay(true)?;
            Endpoint::Framed(Box::new(Framed::new(stream, LengthDelimitedCodec::new())))
        }
        (System::Bare, Dial::Tcp(addr)) => {
            let link = TcpConnector::new(addr).connect().await?;
            let (tx, rx) = BareConduit::<_, Msg>::new(link).split();
            Endpoint::Bare(tx, rx)
        }
        (System::Stable, Dial::Tcp(addr)) => {
            stable_client(TcpConnector::new(addr), Config::default()).await?
        }
        (System::StableMem, Dial::Mem(c)) => stable_client(c, Config::default()).await?,
        (System::FramedTls, Dial::Tls(addr)) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(bench_tls()?.client.config());
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let stream = TlsStream::Client(connector.connect(name, stream).await?);
            Endpoint::FramedTls(Box::new(Framed::new(stream, LengthDelimitedCodec::new())))
        }
        (System::StableTls, Dial::Tls(addr)) => {
            let c = TlsConnector::new("127.0.0.1", addr.port(), bench_tls()?.client.clone())
                .server_name("localhost");
            stable_client(c, Config::default()).await?
        }
        (System::WsPlain, Dial::Ws(addr)) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (ws, _response) = tokio_websockets::ClientBuilder::new()
                .uri(&format!("ws://{addr}/"))?
                .limits(ws_limits())
                .connect_on(stream)
                .await?;
            Endpoint::Ws(Box::new(ws))
        }
        (System::StableWs, Dial::Ws(addr)) => {
            let c = WsConnector::new(&format!("ws://{addr}/"))?;
            stable_client(c, Config::default()).await?
        }
        _ => bail!("{system:?} cannot dial that address"),
    })
}

/// The plain WebSocket's limits: the same largest message as tether's
/// links (8 MiB).
fn ws_limits() -> tokio_websockets::Limits {
    tokio_websockets::Limits::default().max_payload_len(Some(tether::link::DEFAULT_MAX_PAYLOAD))
}

async fn stable_client<C: Connector>(connector: C, config: Config) -> anyhow::Result<Endpoint> {
    let conduit = StableConduit::<Msg>::connect(connector, config).await?;
    let (tx, rx) = conduit.split();
    Ok(Endpoint::Stable {
        tx,
        rx,
        _server: None,
    })
}

/// A connected client and server of `system`, both on the current runtime.
pub(crate) async fn connect_pair(system: System) -> anyhow::Result<(Endpoint, Endpoint)> {
    let (listening, d) = listen(system).await?;
    let (client, server) = tokio::join!(dial(system, d), accept(listening));
    Ok((client?, server?))
}

/// Checks that a received message is the one sent.
fn check_len(msg: &Msg, size: usize) -> anyhow::Result<()> {
    if msg.len() != size {
        bail!("received {} bytes, sent {size}", msg.len());
    }
    Ok(())
}

/// One-way throughput: the client streams `count` messages of `size` bytes,
/// the server receives them in another task. Returns the time from the first
/// send to the last receive.
pub(crate) async fn throughput(
    system: System,
    size: usize,
    count: u64,
) -> anyhow::Result<Duration> {
    let (mut client, mut server) = connect_pair(system).await?;
    let msg = payload(size);
    let receiver = tokio::spawn(async move {
        for _ in 0..count {
            check_len(&server.recv().await?, size)?;
        }
        anyhow::Ok((Instant::now(), server))
    });
    let sender = tokio::spawn(async move {
        let start = Instant::now();
        client.send_many(&msg, count).await?;
        anyhow::Ok((start, client))
    });
    let (start, client) = finished(sender, "sender").await?;
    let (end, server) = finished(receiver, "receiver").await?;
    shut_down(client, server).await;
    Ok(end - start)
}

/// Ping-pong: one message in flight, the server echoes it (decoded and
/// encoded again). Returns `rounds` round-trip times, after 200 unmeasured
/// rounds.
pub(crate) async fn ping_pong(
    system: System,
    size: usize,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (mut client, mut server) = connect_pair(system).await?;
    let echo = tokio::spawn(async move {
        while let Ok(msg) = server.recv().await {
            if server.send_one(&msg).await.is_err() {
                break;
            }
        }
        server
    });
    let msg = payload(size);
    let mut samples = Vec::with_capacity(rounds);
    let run = async {
        for i in 0..rounds + 200 {
            let start = Instant::now();
            client.send_one(&msg).await?;
            let back = client.recv().await?;
            let rtt = start.elapsed();
            check_len(&back, size)?;
            if i >= 200 {
                samples.push(rtt);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(STEP_TIMEOUT, run)
        .await
        .context("ping-pong stuck")??;
    if let Endpoint::Stable { tx, .. } = &client {
        let _ = tokio::time::timeout(Duration::from_secs(5), tx.close()).await;
    }
    drop(client);
    if let Ok(Ok(server)) = tokio::time::timeout(Duration::from_secs(5), echo).await {
        drop(server);
    }
    Ok(samples)
}

/// Ends a connection: stable sessions are closed gracefully (so their tasks
/// are gone before the next measurement), the others just dropped.
async fn shut_down(client: Endpoint, server: Endpoint) {
    if let Endpoint::Stable { tx, .. } = &client {
        let _ = tokio::time::timeout(Duration::from_secs(5), tx.close()).await;
    }
    drop(client);
    drop(server);
}

/// Allocations on each side, per message, in steady state.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct AllocRun {
    /// Messages measured (after the warm-up).
    pub(crate) messages: u64,
    /// What the sending side's thread allocated while they were sent.
    pub(crate) send: AllocCounts,
    /// What the receiving side's thread allocated while they were received.
    pub(crate) recv: AllocCounts,
}

/// Counts allocations per message: the client (sender) runs on `send_rt`,
/// whose one worker thread counts into [`SLOT_SENDER`]; the server
/// (receiver) on `recv_rt`, counting into [`SLOT_RECEIVER`]. `warm`
/// messages are sent and received first; then, with the conduit quiet, the
/// counters are read, `n` more messages go through, the conduit is left to
/// settle (trailing acks), and the counters are read again.
pub(crate) async fn alloc_run(
    system: System,
    counter: &'static dyn AllocCounter,
    send_rt: &tokio::runtime::Handle,
    recv_rt: &tokio::runtime::Handle,
    size: usize,
    warm: u64,
    n: u64,
) -> anyhow::Result<AllocRun> {
    let (listening, d) = recv_rt.spawn(listen(system)).await??;
    let (warm_tx, warm_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (end_recv_tx, end_recv_rx) = oneshot::channel::<()>();
    let (end_send_tx, end_send_rx) = oneshot::channel::<()>();
    let receiver = recv_rt.spawn(async move {
        let mut ep = accept(listening).await?;
        for _ in 0..warm {
            check_len(&ep.recv().await?, size)?;
        }
        let _ = warm_tx.send(());
        for _ in 0..n {
            check_len(&ep.recv().await?, size)?;
        }
        let _ = done_tx.send(());
        let _ = end_recv_rx.await;
        anyhow::Ok(ep)
    });
    let sender = send_rt.spawn(async move {
        let msg = payload(size);
        let mut ep = dial(system, d).await?;
        ep.send_many(&msg, warm).await?;
        go_rx.await?;
        ep.send_many(&msg, n).await?;
        let _ = end_send_rx.await;
        anyhow::Ok(ep)
    });
    let measured = async {
        warm_rx.await.context("receiver failed in the warm-up")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = (counter.counts(SLOT_SENDER), counter.counts(SLOT_RECEIVER));
        let _ = go_tx.send(());
        done_rx.await.context("receiver failed")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = (counter.counts(SLOT_SENDER), counter.counts(SLOT_RECEIVER));
        anyhow::Ok(AllocRun {
            messages: n,
            send: after.0.since(before.0),
            recv: after.1.since(before.1),
        })
    };
    let run = match tokio::time::timeout(STEP_TIMEOUT, measured).await {
        Ok(run) => run,
        Err(_) => Err(anyhow::anyhow!("allocation run stuck")),
    };
    let _ = end_send_tx.send(());
    let _ = end_recv_tx.send(());
    match run {
        Ok(run) => {
            let client = sender.await??;
            let server = receiver.await??;
            let _ = send_rt.spawn(shut_down(client, server)).await;
            Ok(run)
        }
        Err(e) => {
            sender.abort();
            // The receiver's own error, if it has one, is the real cause.
            match tokio::time::timeout(Duration::from_secs(1), receiver).await {
                Ok(Ok(Err(cause))) => Err(cause.context(e)),
                _ => Err(e),
            }
        }
    }
}
