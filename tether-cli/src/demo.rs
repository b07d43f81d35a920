//! `tether demo`: a stable conduit under injected faults, checked end to end.
//!
//! A client streams numbered messages to an echo server through a
//! [`FaultProxy`] that cuts the TCP connection at random moments (mid-frame
//! and during the handshake included), and receives the echoes at the same
//! time. Every echo is checked: each index must come back exactly once, in
//! order, with its payload intact.
//!
//! The link runs over any [`Transport`]: TCP, TLS, WebSocket and secure
//! WebSocket go through the [`FaultProxy`], which cuts the TCP connection
//! under TLS and WebSocket at arbitrary bytes (inside TLS records, inside
//! the TLS and HTTP handshakes); Unix sockets go through a
//! [`UnixFaultRelay`] that cuts the same way. The in-process server
//! presents a certificate for `localhost` from a CA generated at run time
//! ([`Pki`]), which the client trusts and checks the name `localhost`
//! against.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tether::fault::{FaultConfig, FaultProxy, ProxyStats};
use tether::link::any::{AnyConnector, AnyListener};
use tether::link::{
    ClientTls, ServerTls, TcpConnector, TcpListener, TlsConnector, TlsListener, UnixConnector,
    UnixListener, WsConnector, WsListener,
};
use tether::{Config, Connector, StableConduit, StableReceiver, Stats};
use tokio::sync::mpsc;

use crate::pki::Pki;
use crate::relay::UnixFaultRelay;
use crate::transport::{join_host_port, Endpoint, Transport};
use crate::Bytes;

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Messages the client sends (and expects back).
    pub messages: u64,
    /// Payload size of each message in bytes (at least 8: the index).
    pub size: usize,
    /// Mean bytes between cuts, both directions counted; 0 disables cuts.
    pub cut_every: u64,
    /// Probability that a new connection is cut inside its handshake.
    pub handshake_cuts: f64,
    /// Seed of the fault schedule and payloads.
    pub seed: u64,
    /// The transport (see [`transport_of`] to pick it from `server`).
    pub transport: Transport,
    /// Run only the client, against this echo server (the proxy sits in
    /// front of it): a URL or `host:port` (see [`Endpoint::parse`]; a bare
    /// address means `transport`). `None`: run a server in this process.
    pub server: Option<String>,
    /// With `server` over TLS: the PEM file of the CA to trust (default:
    /// Mozilla's roots). The name checked is the server's host.
    pub ca: Option<PathBuf>,
    /// Give up when no echo arrives for this long.
    pub stall_timeout: Duration,
    /// Redraw a live progress line on stderr (meant for a terminal).
    pub progress: bool,
    /// Stream from client to server only (no echo): the server checks the
    /// messages, and the client's replay buffer shows the bound holding.
    pub one_way: bool,
}

/// What the demo measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    /// Whether every message came back exactly once, in order, intact.
    pub ok: bool,
    /// The transport: `tcp`, `unix`, `tls`, `ws` or `wss`.
    pub transport: Transport,
    /// Seed used.
    pub seed: u64,
    /// Payload size.
    pub message_size: usize,
    /// Messages accepted by `send`.
    pub messages_sent: u64,
    /// Distinct messages echoed back.
    pub messages_received: u64,
    /// Sent but never echoed.
    pub lost: u64,
    /// Echoes of an index already seen.
    pub duplicated: u64,
    /// Echoes that arrived after a later index.
    pub reordered: u64,
    /// Echoes whose payload did not match what was sent.
    pub corrupted: u64,
    /// Links the client replaced.
    pub reconnects: u64,
    /// Frames resent after resumes, both sides (the server side only when it
    /// runs in this process).
    pub replayed_frames: u64,
    /// Frames the client resent.
    pub client_replayed_frames: u64,
    /// Frames the server resent (0 with `--server`).
    pub server_replayed_frames: u64,
    /// The most bytes any replay buffer held (client, and server sessions
    /// when the server runs in this process).
    pub max_replay_bytes: usize,
    /// Links declared dead because keepalive pongs stopped.
    pub keepalive_timeouts: u64,
    /// Whether the run was one-way.
    pub one_way: bool,
    /// Connections the proxy cut (for TLS and WebSocket: the TCP
    /// connections under them; for Unix sockets: cut by the relay).
    pub cuts: u64,
    /// Of those, cut inside the handshake.
    pub handshake_cuts: u64,
    /// Of those, cut inside a read chunk (an estimate of mid-frame cuts).
    pub mid_frame_cuts: u64,
    /// Wall time from the first send to the last echo.
    pub elapsed_s: f64,
    /// Echoed messages per second.
    pub round_trips_per_s: f64,
    /// Stopped by Ctrl-C: the report is partial, and messages sent but not
    /// yet echoed were in flight, not lost (`lost` is 0, see `in_flight`).
    pub interrupted: bool,
    /// Messages sent and not yet checked when the run was interrupted.
    pub in_flight: u64,
    /// Set when the run stopped early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The error text of a run stopped by Ctrl-C.
const INTERRUPTED: &str = "interrupted by Ctrl-C";

fn mix(mut x: u64) -> u64 {
    x ^= x >> 31;
    x = x.wrapping_mul(0x9e3779b97f4a7c15);
    x ^ (x >> 29)
}

/// The payload of message `idx`: its index, then bytes derived from the seed
/// and the index, so any corruption or mix-up shows.
pub fn payload(seed: u64, idx: u64, size: usize) -> Vec<u8> {
    let size = size.max(8);
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&idx.to_le_bytes());
    let h = mix(seed ^ idx.rotate_left(17));
    out.extend((0..size - 8).map(|i| (h >> ((i % 8) * 8)) as u8 ^ (i as u8)));
    out
}

/// The message size limit: the links' default maximum payload (8 MiB),
/// which the demo's conduits keep as their largest message.
pub const MESSAGE_LIMIT: usize = tether::link::DEFAULT_MAX_PAYLOAD;

/// The largest payload a demo message may carry: its encoding (a varint
/// length and the bytes) and the largest frame header must fit
/// [`MESSAGE_LIMIT`].
pub fn max_payload_size() -> usize {
    let varint = |n: usize| (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize;
    let mut size = MESSAGE_LIMIT - tether::proto::MAX_HEADER_LEN;
    while size + varint(size) + tether::proto::MAX_HEADER_LEN > MESSAGE_LIMIT {
        size -= 1;
    }
    size
}

/// `--size`: at least 8 (each message starts with its index), at most
/// [`max_payload_size`].
pub fn parse_size(s: &str) -> Result<usize, String> {
    let size: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("not a number of bytes: {s:?}"))?;
    let max = max_payload_size();
    if size < 8 {
        return Err(format!(
            "{size} is too small: a message is at least 8 bytes (it starts with its index)"
        ));
    }
    if size > max {
        return Err(format!(
            "{size} is too large: a message must fit the {} MiB message limit, \
             which leaves at most {max} bytes of payload",
            MESSAGE_LIMIT >> 20
        ));
    }
    Ok(size)
}

/// `--handshake-cuts`: a probability, from 0 up to (not including) 1.
pub fn parse_handshake_cuts(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a probability: {s:?} (use a number such as 0.1)"))?;
    if p.is_nan() || !(0.0..1.0).contains(&p) {
        return Err(format!(
            "{s} is not a probability from 0 up to 1 (0.1: one new connection in ten is cut \
             in its handshake; 1 is left out, as no connection could ever complete one)"
        ));
    }
    Ok(p)
}

/// `--stall-timeout`: whole seconds, at least 1.
pub fn parse_stall_timeout(s: &str) -> Result<u64, String> {
    let secs: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a whole number of seconds: {s:?}"))?;
    if secs == 0 {
        return Err("must be at least 1 second".into());
    }
    Ok(secs)
}

/// The one JSON object `--json` prints when the demo cannot run or report
/// (a bad argument, a server that is not there): `ok` false and the error.
pub fn failure_json(error: &str) -> String {
    serde_json::json!({ "ok": false, "error": error }).to_string()
}

/// The demo's replay-buffer bound in bytes.
pub const DEMO_REPLAY_BYTES: usize = 1 << 20;

/// How many messages a demo of `size`-byte messages sends by default:
/// 1,000,000, but no more than make 256 MiB, so that large messages finish
/// in seconds too.
pub fn default_messages(size: usize) -> u64 {
    const TOTAL: u64 = 256 << 20;
    (TOTAL / size.max(8) as u64).clamp(1, 1_000_000)
}

fn demo_config(seed: u64) -> Config {
    Config::default()
        .seed(seed)
        .handshake_timeout(Duration::from_secs(2))
        // The replay bound is also the window of unacknowledged messages:
        // enough to keep loopback busy, small enough that a cut replays
        // little.
        .max_replay(DEMO_REPLAY_BYTES, 4096)
        .reconnect_with(|r| {
            r.min_backoff(Duration::from_millis(1))
                .max_backoff(Duration::from_millis(100))
                .give_up_after(Some(Duration::from_secs(30)))
        })
}

/// Checks each arriving message against what was sent. Memory grows with
/// the messages that arrive out of order, never with the count asked for:
/// every index below `contiguous` has arrived, `ahead` holds those above it
/// (empty while messages arrive in order, as they must).
struct Checker {
    messages: u64,
    contiguous: u64,
    ahead: BTreeSet<u64>,
    highest: Option<u64>,
    received: u64,
    duplicated: u64,
    reordered: u64,
    corrupted: u64,
}

impl Checker {
    fn new(messages: u64) -> Self {
        Checker {
            messages,
            contiguous: 0,
            ahead: BTreeSet::new(),
            highest: None,
            received: 0,
            duplicated: 0,
            reordered: 0,
            corrupted: 0,
        }
    }

    fn check(&mut self, seed: u64, size: usize, msg: &[u8]) {
        let Some(idx) = msg
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        else {
            self.corrupted += 1;
            return;
        };
        if idx >= self.messages || msg != payload(seed, idx, size) {
            self.corrupted += 1;
            return;
        }
        if idx < self.contiguous || !self.ahead.insert(idx) {
            self.duplicated += 1;
            return;
        }
        while self.ahead.remove(&self.contiguous) {
            self.contiguous += 1;
        }
        self.received += 1;
        match self.highest {
            Some(h) if idx < h => self.reordered += 1,
            _ => self.highest = Some(idx),
        }
    }
}

/// Where the checked messages come from: the client's receiver (echoes), or
/// the in-process server's sessions (one-way).
enum Source {
    Echoes(StableReceiver<Bytes>),
    Server(mpsc::UnboundedReceiver<Result<Option<Bytes>, tether::Error>>),
}

impl Source {
    async fn next(&mut self) -> Result<Option<Bytes>, tether::Error> {
        match self {
            Source::Echoes(rx) => rx.recv().await,
            Source::Server(rx) => rx.recv().await.unwrap_or(Ok(None)),
        }
    }
}

/// The task sending the messages: `Err` with the reason if a send failed.
type Sender = tokio::task::JoinHandle<Result<(), String>>;

/// Receives and checks every message until all have arrived, or the run
/// stops: no message for the stall timeout, the session ends, Ctrl-C, or
/// the sender fails (a failed send is the cause, reported at once rather
/// than as a stall later). Returns the checker, why the run stopped early,
/// and whether `sender` has ended (and must not be awaited again).
async fn receive_all(
    mut rx: Source,
    opts: &DemoOptions,
    progress: Arc<AtomicU64>,
    sender: &mut Sender,
) -> (Checker, Option<String>, bool) {
    let mut checker = Checker::new(opts.messages);
    let mut sender_ended = false;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    while checker.received < opts.messages {
        let next = tokio::select! {
            next = tokio::time::timeout(opts.stall_timeout, rx.next()) => next,
            ended = &mut *sender, if !sender_ended => {
                sender_ended = true;
                match ended {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => return (checker, Some(format!("send failed: {e}")), true),
                    Err(e) => {
                        let why = format!("the sending task failed: {e}");
                        return (checker, Some(why), true);
                    }
                }
            }
            _ = &mut interrupt => return (checker, Some(INTERRUPTED.into()), sender_ended),
        };
        let why = match next {
            Ok(Ok(Some(msg))) => {
                checker.check(opts.seed, opts.size, &msg);
                progress.store(checker.received, Ordering::Relaxed);
                continue;
            }
            Ok(Ok(None)) => "the session ended early".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no echo for {} s", opts.stall_timeout.as_secs()),
        };
        return (checker, Some(why), sender_ended);
    }
    (checker, None, sender_ended)
}

/// The path the in-process WebSocket server serves.
pub const WS_PATH: &str = "/tether";

/// The transport a demo runs over: `--server`'s scheme if it has one (it
/// must then agree with `transport` if that was given too), else
/// `transport`, else TCP.
pub fn transport_of(
    transport: Option<Transport>,
    server: Option<&str>,
) -> anyhow::Result<Transport> {
    let Some(server) = server else {
        return Ok(transport.unwrap_or_default());
    };
    let from_url = Endpoint::parse(server, transport.unwrap_or_default())?.transport();
    match transport {
        Some(t) if t != from_url => anyhow::bail!(
            "--transport {t} does not match --server {server:?}, which is {from_url}; \
             give one or the other"
        ),
        _ => Ok(from_url),
    }
}

/// Where the client's links go (before the proxy or relay is put in
/// front).
#[derive(Debug)]
enum Target {
    /// A server over TCP: its address, the name its certificate is checked
    /// against (TLS), the WebSocket path.
    Net {
        transport: Transport,
        addr: SocketAddr,
        name: String,
        path: String,
    },
    /// A Unix-domain socket.
    Unix(PathBuf),
}

/// A socket file under the temporary directory, removed when dropped.
struct SocketFile(PathBuf);

/// A fresh socket path under the temporary directory, unique in the
/// machine (process id and a counter), nothing left at it.
fn socket_path(role: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "tether-demo-{}-{role}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    path
}

impl SocketFile {
    fn new(role: &str) -> SocketFile {
        SocketFile(socket_path(role))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The in-process server's listener on `transport`, where it is, and its
/// socket file (Unix).
async fn local_listener(
    transport: Transport,
    pki: Option<&Pki>,
) -> anyhow::Result<(AnyListener, Target, Option<SocketFile>)> {
    let server_tls = || -> anyhow::Result<ServerTls> {
        let pki = pki.context("no certificates")?;
        Ok(ServerTls::from_pem(
            pki.cert_pem.as_bytes(),
            pki.key_pem.as_bytes(),
        )?)
    };
    let any = AnyListener::new();
    if transport == Transport::Unix {
        let file = SocketFile::new("server");
        let listener = UnixListener::bind(file.path())
            .with_context(|| format!("cannot listen on {}", file.path().display()))?;
        let target = Target::Unix(file.path().to_owned());
        return Ok((any.with(listener), target, Some(file)));
    }
    let tcp = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1:0")?;
    let addr = tcp.local_addr()?;
    let (any, path) = match transport {
        Transport::Tls => (any.with(TlsListener::new(tcp, server_tls()?)), ""),
        Transport::Ws => (any.with(WsListener::new(tcp).path(WS_PATH)), WS_PATH),
        Transport::Wss => {
            let listener = WsListener::new(tcp).path(WS_PATH).tls(server_tls()?);
            (any.with(listener), WS_PATH)
        }
        Transport::Tcp | Transport::Unix => (any.with(tcp), ""),
    };
    let target = Target::Net {
        transport,
        addr,
        name: "localhost".into(),
        path: path.into(),
    };
    Ok((any, target, None))
}

/// The external server `server` names: host names resolved now, to the
/// first address that accepts a TCP connection if there are several.
async fn external_target(server: &str, transport: Transport) -> anyhow::Result<Target> {
    let (transport, host, port, path) = match Endpoint::parse(server, transport)? {
        Endpoint::Unix(path) => return Ok(Target::Unix(path)),
        Endpoint::Net {
            transport,
            host,
            port,
            path,
        } => (transport, host, port, path),
    };
    let authority = join_host_port(&host, port);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .collect();
    let addr = match addrs.as_slice() {
        [] => anyhow::bail!("{authority} resolves to no address"),
        [one] => *one,
        several => {
            let mut found = None;
            for &addr in several {
                let probe = tokio::net::TcpStream::connect(addr);
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), probe).await {
                    found = Some(addr);
                    break;
                }
            }
            found.with_context(|| format!("no address of {authority} accepts: {several:?}"))?
        }
    };
    Ok(Target::Net {
        transport,
        addr,
        name: host,
        path,
    })
}

/// What cuts the client's links: the TCP proxy, or the Unix relay.
enum Cutter {
    Proxy(FaultProxy),
    Relay(UnixFaultRelay),
}

impl Cutter {
    async fn start(target: &Target, faults: FaultConfig) -> anyhow::Result<Cutter> {
        Ok(match target {
            Target::Net { addr, .. } => Cutter::Proxy(
                FaultProxy::start(*addr, faults)
                    .await
                    .context("cannot start the fault proxy")?,
            ),
            // The relay removes its socket file when dropped.
            Target::Unix(path) => Cutter::Relay(
                UnixFaultRelay::start(path, socket_path("relay"), faults)
                    .context("cannot start the Unix relay")?,
            ),
        })
    }

    fn stats(&self) -> ProxyStats {
        match self {
            Cutter::Proxy(p) => p.stats(),
            Cutter::Relay(r) => r.stats(),
        }
    }

    fn shutdown(&self) {
        match self {
            Cutter::Proxy(p) => p.shutdown(),
            Cutter::Relay(r) => r.shutdown(),
        }
    }

    /// A connector that reaches `target` through this cutter.
    fn connector(&self, target: &Target, tls: Option<ClientTls>) -> anyhow::Result<AnyConnector> {
        match self {
            Cutter::Proxy(p) => connector(target, Some(p.local_addr()), tls),
            Cutter::Relay(r) => Ok(UnixConnector::new(r.path()).into()),
        }
    }
}

/// A connector that reaches `target`, through the TCP address `via` if
/// given (a proxy in front of it), else directly; TLS checks the target's
/// name with `tls` (Mozilla's roots if `None`).
fn connector(
    target: &Target,
    via: Option<SocketAddr>,
    tls: Option<ClientTls>,
) -> anyhow::Result<AnyConnector> {
    let (transport, target_addr, name, path) = match target {
        Target::Unix(path) => return Ok(UnixConnector::new(path).into()),
        Target::Net {
            transport,
            addr,
            name,
            path,
        } => (*transport, *addr, name, path),
    };
    let addr = via.unwrap_or(target_addr);
    let tls = || tls.clone().unwrap_or_else(ClientTls::webpki_roots);
    // A WebSocket URL names the target (its `Host` header and, for wss,
    // the name checked), and the connector dials the proxy in front of it.
    let ws = |scheme: &str, tls: Option<ClientTls>| -> anyhow::Result<WsConnector> {
        let host = match name.parse::<std::net::IpAddr>() {
            Ok(_) => target_addr.to_string(),
            Err(_) => format!("{name}:{}", target_addr.port()),
        };
        let connector = WsConnector::parse(&format!("{scheme}://{host}{path}"), tls)?;
        Ok(match via {
            Some(via) => connector.connect_to(via),
            None => connector,
        })
    };
    Ok(match transport {
        Transport::Tcp => TcpConnector::new(addr).into(),
        Transport::Unix => anyhow::bail!("a Unix socket has no TCP address"),
        Transport::Tls => TlsConnector::new(addr.ip().to_string(), addr.port(), tls())
            .server_name(name.as_str())
            .into(),
        Transport::Ws => ws("ws", None)?.into(),
        Transport::Wss => ws("wss", Some(tls()))?.server_name(name).into(),
    })
}

/// Connects one link straight to an external server (no cuts) and drops
/// it: a server that is not there, or a certificate that does not verify,
/// is a clear error at once rather than a reconnect loop that gives up
/// after the conduit's deadline.
async fn preflight(server: &str, target: &Target, tls: Option<ClientTls>) -> anyhow::Result<()> {
    let direct = connector(target, None, tls)?;
    match tokio::time::timeout(Duration::from_secs(10), direct.connect()).await {
        Ok(Ok(_link)) => Ok(()),
        Ok(Err(e)) => anyhow::bail!("cannot reach {server}: {e}"),
        Err(_) => anyhow::bail!("cannot reach {server}: no link within 10 s"),
    }
}

/// Runs the demo and reports. Errors only for setup failures (cannot bind,
/// cannot connect); everything measured is in the report. Meant to be
/// called once per process: the in-process server is left running, for
/// the process's end to take away quietly.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    if opts.one_way && opts.server.is_some() {
        anyhow::bail!(
            "--one-way needs the server in this process (it checks the messages); drop --server"
        );
    }
    let transport = opts.transport;
    if opts.ca.is_some() && opts.server.is_none() {
        anyhow::bail!(
            "--ca is for --server: the in-process server's CA is generated at run time and trusted"
        );
    }
    if opts.ca.is_some() && !transport.secure() {
        anyhow::bail!("--ca is for TLS (tls, wss); {transport} has no certificates");
    }
    let config = demo_config(opts.seed);
    // Certificates for the in-process server, made now, never stored.
    let pki = match (&opts.server, transport.secure()) {
        (None, true) => Some(Pki::localhost()?),
        _ => None,
    };
    let client_tls = match (&pki, &opts.ca) {
        (Some(pki), _) => Some(ClientTls::from_ca_pem(pki.ca_pem.as_bytes())?),
        (None, Some(ca)) => Some(crate::transport::client_tls(ca)?),
        (None, None) => None,
    };
    // The echo server: in this process unless one was given.
    let server_stats: Arc<std::sync::Mutex<Vec<tether::StableSender<Bytes>>>> = Arc::default();
    let (arrived_tx, arrived_rx) = mpsc::unbounded_channel();
    let one_way = opts.one_way;
    let (target, server_task, _socket) = match &opts.server {
        Some(server) => {
            let target = external_target(server, transport).await?;
            preflight(server, &target, client_tls.clone()).await?;
            (target, None, None)
        }
        None => {
            let (listener, target, socket) = local_listener(transport, pki.as_ref()).await?;
            let sessions = server_stats.clone();
            let server = Arc::new(tether::Server::<Bytes>::new(listener, config.clone()));
            let acceptor = server.clone();
            let task = tokio::spawn(async move {
                let server = acceptor;
                while let Some(conduit) = server.accept().await {
                    let (tx, mut rx) = conduit.split();
                    sessions.lock().expect("not poisoned").push(tx.clone());
                    let arrived = arrived_tx.clone();
                    tokio::spawn(async move {
                        loop {
                            let got = rx.recv().await;
                            match got {
                                Ok(Some(msg)) if !one_way => {
                                    if tx.send(&msg).await.is_err() {
                                        break;
                                    }
                                }
                                // One-way: hand everything to the checker.
                                other if one_way => {
                                    let end = !matches!(other, Ok(Some(_)));
                                    let _ = arrived.send(other);
                                    if end {
                                        break;
                                    }
                                }
                                _ => break,
                            }
                        }
                    });
                }
            });
            (target, Some((server, task)), socket)
        }
    };
    let proxy = Arc::new(
        Cutter::start(
            &target,
            FaultConfig {
                seed: opts.seed,
                mean_bytes_between_cuts: opts.cut_every,
                handshake_cut_probability: if opts.cut_every == 0 {
                    0.0
                } else {
                    opts.handshake_cuts
                },
                max_connection_age: None,
            },
        )
        .await?,
    );
    let connector = proxy.connector(&target, client_tls)?;
    let conduit = StableConduit::<Bytes>::connect(connector, config).await?;
    let (tx, rx) = conduit.split();
    let started = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));

    let mut sender: Sender = {
        let (tx, sent, opts) = (tx.clone(), sent.clone(), opts.clone());
        tokio::spawn(async move {
            for idx in 0..opts.messages {
                let msg = Bytes::from(payload(opts.seed, idx, opts.size));
                if let Err(e) = tx.send(&msg).await {
                    return Err(e.to_string());
                }
                sent.store(idx + 1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let ticker = opts.progress.then(|| {
        let (tx, sent, received, n) = (tx.clone(), sent.clone(), received.clone(), opts.messages);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                print_progress(n, &sent, &received, &tx.stats(), proxy.stats());
            }
        })
    });
    let source = if one_way {
        drop(rx);
        Source::Server(arrived_rx)
    } else {
        Source::Echoes(rx)
    };
    let (checker, error, sender_ended) =
        receive_all(source, &opts, received.clone(), &mut sender).await;
    let elapsed = started.elapsed();
    if let Some(t) = ticker {
        t.abort();
        // Clear the progress line: the report follows.
        eprint!("\r{:110}\r", "");
    }
    let mut error = error;
    if !sender_ended && error.is_some() {
        // The sender may be blocked on a full replay buffer forever.
        sender.abort();
    } else if !sender_ended {
        // Every message came back, so its last send is returning.
        match sender.await {
            Ok(Err(e)) => error = Some(format!("send failed: {e}")),
            Err(e) => error = Some(format!("the sending task failed: {e}")),
            Ok(Ok(())) => {}
        }
    }
    let client: Stats = tx.stats();
    let server_side: Vec<Stats> = server_stats
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|s| s.stats())
        .collect();
    let server_replayed: u64 = server_side.iter().map(|s| s.frames_replayed).sum();
    let max_replay_bytes = server_side
        .iter()
        .map(|s| s.max_replay_bytes)
        .fold(client.max_replay_bytes, usize::max);
    let keepalive_timeouts = client.keepalive_timeouts
        + server_side
            .iter()
            .map(|s| s.keepalive_timeouts)
            .sum::<u64>();
    let p: ProxyStats = proxy.stats();
    // A clean end: the client closes (with the close handshake, so the
    // server learns that everything arrived), and that ends the one session
    // the demo is about.
    if error.is_none() {
        let _ = tokio::time::timeout(Duration::from_secs(5), tx.close()).await;
    }
    proxy.shutdown();
    // Then the server shuts down. Sessions whose client gave up on them
    // when a cut hit their handshake (the server's answer never arrived, so
    // the client opened another) were never proven: the shutdown drops them
    // quietly (they used to end as lost with a warning, after "OK", in
    // about one run in twelve).
    if let Some((server, task)) = server_task {
        server.shutdown(Duration::from_secs(1)).await;
        task.abort();
    }
    let messages_sent = sent.load(Ordering::Relaxed);
    let interrupted = error.as_deref() == Some(INTERRUPTED);
    let unchecked = messages_sent.saturating_sub(checker.received);
    let (lost, in_flight) = if interrupted {
        (0, unchecked)
    } else {
        (unchecked, 0)
    };
    let ok = error.is_none()
        && lost == 0
        && checker.duplicated == 0
        && checker.reordered == 0
        && checker.corrupted == 0;
    Ok(DemoReport {
        ok,
        transport,
        seed: opts.seed,
        message_size: opts.size.max(8),
        messages_sent,
        messages_received: checker.received,
        lost,
        duplicated: checker.duplicated,
        reordered: checker.reordered,
        corrupted: checker.corrupted,
        reconnects: client.reconnects,
        replayed_frames: client.frames_replayed + server_replayed,
        client_replayed_frames: client.frames_replayed,
        server_replayed_frames: server_replayed,
        max_replay_bytes,
        keepalive_timeouts,
        one_way,
        cuts: p.cuts,
        handshake_cuts: p.handshake_cuts,
        mid_frame_cuts: p.mid_frame_cuts,
        elapsed_s: elapsed.as_secs_f64(),
        round_trips_per_s: checker.received as f64 / elapsed.as_secs_f64().max(1e-9),
        interrupted,
        in_flight,
        error,
    })
}

fn print_progress(n: u64, sent: &AtomicU64, received: &AtomicU64, s: &Stats, p: ProxyStats) {
    let got = received.load(Ordering::Relaxed);
    let line = format!(
        "[{:5.1}%] sent {}, checked {} | connection killed {}, resumed {} | \
         kept for resending: {} KiB",
        100.0 * got as f64 / n.max(1) as f64,
        count(sent.load(Ordering::Relaxed)),
        count(got),
        plural(p.cuts, "time", "times"),
        plural(s.reconnects, "time", "times"),
        count((s.replay_bytes / 1024) as u64),
    );
    eprint!("\r{line:<110}");
}

/// The line announcing a run, for people.
pub fn banner(opts: &DemoOptions) -> String {
    let what = if opts.one_way {
        "streamed one way"
    } else {
        "echoed"
    };
    let cutting = if opts.cut_every == 0 {
        "with cuts off (--cut-every 0)".to_string()
    } else {
        format!("every ~{} bytes", opts.cut_every)
    };
    let via = match (opts.transport, opts.cut_every) {
        (Transport::Tcp, 0) => "through a proxy".to_string(),
        (Transport::Unix, 0) => "over unix through a relay".to_string(),
        (t, 0) => format!("over {t} through a proxy"),
        (Transport::Tcp, _) => "through a proxy cutting".to_string(),
        (Transport::Unix, _) => "over unix through a relay cutting the connection".to_string(),
        (t, _) => format!("over {t} through a proxy cutting {}", t.cut_what()),
    };
    format!(
        "tether demo: {} messages of {} bytes {what} {via} {cutting} (seed {})",
        opts.messages, opts.size, opts.seed
    )
}

/// `n` with thousands separators: 1,000,000.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `n` followed by `one` or `many`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", count(n), if n == 1 { one } else { many })
}

/// The report as text for people who have never heard of tether: what
/// happened to the connection, what the application saw, and the figures
/// behind it, each in words (the JSON report keeps the raw counters).
pub fn render(r: &DemoReport, opts: &DemoOptions) -> String {
    let mut out = String::new();
    let sent_back = if r.one_way { "arrived" } else { "came back" };
    let verdict = if r.interrupted {
        format!(
            "INTERRUPTED (Ctrl-C), partial report: {} in flight, none lost so far{}",
            count(r.in_flight),
            if r.duplicated + r.reordered + r.corrupted == 0 {
                ""
            } else {
                ", but the delivery check FAILED"
            }
        )
    } else if r.ok {
        format!("OK: every message {sent_back} exactly once, in order, intact")
    } else {
        format!(
            "FAILED: {}",
            r.error
                .clone()
                .unwrap_or_else(|| "delivery check failed".into())
        )
    };
    out.push_str(&format!("{verdict}\n"));
    let connection = r.transport.cut_what();
    if r.ok && r.cuts > 0 {
        out.push_str(&format!(
            "\n  {} was killed {}; the application noticed none of it:\n  \
             it sent each message once, and each {sent_back} once.\n\n",
            capitalized(connection),
            plural(r.cuts, "time", "times"),
        ));
    } else {
        out.push('\n');
    }
    let route = if r.one_way {
        "from the client to the server"
    } else {
        "to the server and back"
    };
    out.push_str(&format!(
        "  messages   {} of {} bytes sent {route}, {} {sent_back}\n",
        count(r.messages_sent),
        count(r.message_size as u64),
        count(r.messages_received),
    ));
    out.push_str(&format!(
        "             lost {}, duplicated {}, out of order {}, corrupted {}\n",
        count(r.lost),
        count(r.duplicated),
        count(r.reordered),
        count(r.corrupted)
    ));
    if opts.cut_every == 0 {
        out.push_str(&format!(
            "  cuts       none: cuts were off (--cut-every 0), {connection} was never killed\n"
        ));
    } else {
        out.push_str(&format!(
            "  cuts       {connection} was killed {}, on average every {} bytes forwarded:\n",
            plural(r.cuts, "time", "times"),
            count(opts.cut_every)
        ));
        out.push_str(&format!(
            "             {} of them while a new connection was still being set up (its handshake);\n",
            count(r.handshake_cuts)
        ));
        out.push_str(&format!(
            "             about {} of the {} (handshake cuts included) fell in the middle of a message\n",
            count(r.mid_frame_cuts),
            count(r.cuts)
        ));
        out.push_str("             or handshake rather than between two\n");
    }
    if r.reconnects == 0 {
        out.push_str("  recovery   the client never had to reconnect\n");
    } else {
        out.push_str(&format!(
            "  recovery   the client reconnected {}, each time resuming the same session;\n",
            plural(r.reconnects, "time", "times")
        ));
        out.push_str(
            "             after each reconnect, each side resent what the other had not yet confirmed\n",
        );
        if opts.server.is_some() {
            // The server is another process: its resends are its own.
            out.push_str(&format!(
                "             receiving: {} by the client (the server's are not counted here),\n",
                plural(r.client_replayed_frames, "resend", "resends"),
            ));
        } else {
            out.push_str(&format!(
                "             receiving: {} ({} by the client, {} by the server),\n",
                plural(r.replayed_frames, "resend", "resends"),
                count(r.client_replayed_frames),
                count(r.server_replayed_frames)
            ));
        }
        out.push_str(
            "             each a message or a piece of one; the receiver drops the copies it already\n",
        );
        out.push_str("             has, so nothing is delivered twice\n");
    }
    if r.keepalive_timeouts > 0 {
        out.push_str(&format!(
            "             {} declared dead because the other side stopped answering pings\n",
            plural(r.keepalive_timeouts, "connection was", "connections were")
        ));
    }
    let mut memory = format!(
        "  memory     at most {} KiB of sent messages were kept for resending (limit {} KiB)",
        count((r.max_replay_bytes / 1024) as u64),
        count((DEMO_REPLAY_BYTES / 1024) as u64)
    );
    if r.max_replay_bytes > DEMO_REPLAY_BYTES {
        memory.push_str("; a single message larger than the limit is kept whole");
    }
    out.push_str(&format!("{memory}\n"));
    out.push_str(&format!(
        "  time       {:.2} s, {} messages checked per second (seed {}, to replay this run)\n",
        r.elapsed_s,
        count(r.round_trips_per_s as u64),
        r.seed
    ));
    out
}

/// `s` with its first letter in upper case.
fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(messages: u64, stall_timeout: Duration) -> DemoOptions {
        DemoOptions {
            messages,
            size: 16,
            cut_every: 0,
            handshake_cuts: 0.0,
            seed: 1,
            transport: Transport::Tcp,
            server: None,
            ca: None,
            stall_timeout,
            progress: false,
            one_way: false,
        }
    }

    /// A failed send is the run's cause at once, not a stall much later.
    #[tokio::test]
    async fn a_failed_send_stops_the_run_at_once_with_its_error() {
        let (_keep, arrived) = mpsc::unbounded_channel();
        let opts = options(10, Duration::from_secs(3600));
        let mut sender: Sender = tokio::spawn(async { Err("message too large".to_string()) });
        let run = receive_all(Source::Server(arrived), &opts, Arc::default(), &mut sender);
        let (checker, error, sender_ended) = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the run stopped before its stall timeout");
        assert_eq!(error.as_deref(), Some("send failed: message too large"));
        assert!(sender_ended);
        assert_eq!(checker.received, 0);
    }

    /// A sender that finished is not a reason to stop receiving.
    #[tokio::test]
    async fn a_finished_sender_lets_the_echoes_arrive() {
        let (tx, arrived) = mpsc::unbounded_channel();
        let opts = options(3, Duration::from_secs(60));
        let mut sender: Sender = tokio::spawn(async { Ok(()) });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for idx in 0..3 {
                let _ = tx.send(Ok(Some(Bytes::from(payload(1, idx, 16)))));
            }
        });
        let (checker, error, sender_ended) =
            receive_all(Source::Server(arrived), &opts, Arc::default(), &mut sender).await;
        assert_eq!(error, None);
        assert!(sender_ended);
        assert_eq!(checker.received, 3);
    }

    /// The checker's verdicts, in memory independent of the count.
    #[test]
    fn the_checker_tells_duplicates_reorders_and_corruption_apart() {
        let mut c = Checker::new(u64::MAX);
        for idx in [0, 1, 3, 2, 2, 0, 4] {
            c.check(9, 16, &payload(9, idx, 16));
        }
        c.check(9, 16, b"short");
        let mut bad = payload(9, 5, 16);
        bad[12] ^= 1;
        c.check(9, 16, &bad);
        assert_eq!(c.received, 5);
        assert_eq!(c.duplicated, 2);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.corrupted, 2);
        assert_eq!(c.contiguous, 5);
        assert!(c.ahead.is_empty());
        let mut small = Checker::new(3);
        small.check(9, 16, &payload(9, 3, 16));
        assert_eq!(small.corrupted, 1, "an index past the count");
    }

    #[test]
    fn argument_parsers_say_why() {
        assert_eq!(parse_size("8"), Ok(8));
        assert_eq!(parse_size(&max_payload_size().to_string()), Ok(8_388_593));
        assert!(parse_size("7").unwrap_err().contains("at least 8"));
        assert!(parse_size("9000000").unwrap_err().contains("8 MiB"));
        assert_eq!(parse_handshake_cuts("0"), Ok(0.0));
        assert_eq!(parse_handshake_cuts("0.1"), Ok(0.1));
        for bad in ["1", "1.5", "-0.1", "NaN", "x"] {
            assert!(parse_handshake_cuts(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_stall_timeout("1"), Ok(1));
        assert!(parse_stall_timeout("0").is_err());
    }
}
