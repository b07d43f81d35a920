//! The transport matrix: every conduit test that exchanges traffic over a
//! link runs once per [`Transport`], through [`transport_tests!`]: memory,
//! TCP, Unix sockets, TLS, WebSocket (`ws://`) and secure WebSocket
//! (`wss://`).
//!
//! - [`Transport`]: the transports, [`Transport::ALL`] in a fixed order.
//! - [`Fixture`]: for one transport, a listener on a fresh address (port 0,
//!   a unique socket path, a fresh in-memory listener) and a connector that
//!   reaches it directly; TLS and `wss://` with run-time certificates from
//!   [`pki`](super::pki), verified for `localhost`. The WebSocket
//!   listeners serve the path `/`; their connectors dial the listener's
//!   address (no name resolution) with the URL `ws://127.0.0.1:PORT/` or
//!   `wss://localhost:PORT/`.
//! - [`Cutter`]: a connector to the same listener whose links are cut. For
//!   the transports over TCP (TCP, TLS, both WebSockets) the cuts are made
//!   by a [`FaultProxy`] between client and server, so the TCP connection
//!   is reset under TLS and under WebSocket framing at an arbitrary byte;
//!   the WebSocket connectors dial the proxy with
//!   [`WsConnector::connect_to`] and still send the listener's `Host` and
//!   check its certificate, as a direct connection would. The proxy's
//!   handshake cuts fall in the first 32 client bytes, which on TLS is the
//!   ClientHello and on WebSocket the HTTP upgrade request, not tether's
//!   hello. Unix sockets go through a byte-counting relay that closes both
//!   sockets at the budget, inside a frame as often as not; in-memory links
//!   through a payload relay that kills both links at the budget. All
//!   three take each connection's budget from [`FaultConfig::plan`] (a
//!   function of the seed and the connection's index), so a seed gives the
//!   same cut plan on every transport, and all three can cut every live
//!   link at once ([`Cutter::cut_all`]) and refuse connects
//!   ([`Cutter::set_refuse`]).
//!
//! Adding a transport is one variant of [`Transport`], one entry in
//! [`Transport::ALL`] and [`Transport::name`], one arm in
//! [`Transport::fixture`], [`Transport::over_tcp`], [`Fixture::cutting`]
//! and [`Fixture::check_client_peer`], and one test in
//! [`transport_tests!`]; the simulation's real-transport kinds
//! (`tests/sim/scenario.rs`) name their transport too.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tether::fault::{CutPlan, FaultConfig, FaultProxy, ProxyStats};
use tether::link::any::{AnyConnector, AnyLink, AnyListener};
use tether::link::mem;
use tether::link::{
    ClientTls, ServerTls, StreamConfig, StreamLink, TcpConnector, TcpListener, TlsConnector,
    TlsListener, UnixConnector, UnixListener, WsConnector, WsListener,
};
use tether::link::{PeerInfo, PendingLink};
use tether::{Connector, Link, LinkError, LinkRx, LinkTx, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::pki::Ca;

/// One transport of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// In-memory links.
    Mem,
    /// TCP on 127.0.0.1.
    Tcp,
    /// A Unix-domain socket under the temporary directory.
    Unix,
    /// TLS over TCP, a certificate for `localhost` from a fresh CA.
    Tls,
    /// WebSocket, `ws://127.0.0.1:PORT/`.
    Ws,
    /// Secure WebSocket, `wss://localhost:PORT/`, over TLS as [`Tls`](Transport::Tls).
    Wss,
}

impl Transport {
    /// Every transport, in the order the generated tests are listed.
    pub const ALL: [Transport; 6] = [
        Transport::Mem,
        Transport::Tcp,
        Transport::Unix,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
    ];

    /// The transport's name, as in the generated tests' names.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mem => "mem",
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// Whether the transport runs over a TCP connection, which a
    /// [`FaultProxy`] can cut.
    pub fn over_tcp(self) -> bool {
        match self {
            Transport::Tcp | Transport::Tls | Transport::Ws | Transport::Wss => true,
            Transport::Mem | Transport::Unix => false,
        }
    }

    /// Whether a link's halves close independently: after one side's
    /// [`LinkTx::close`] the other can still send. Not on WebSocket, where
    /// the peer's Close frame is answered at once and ends both directions
    /// (RFC 6455, section 5.5.1): a later send there fails.
    pub fn half_close(self) -> bool {
        !matches!(self, Transport::Ws | Transport::Wss)
    }

    /// A listener of this transport on a fresh address, and a connector
    /// that reaches it. Must be called within a tokio runtime.
    pub async fn fixture(self) -> Fixture {
        match self {
            Transport::Mem => {
                let (listener, connector) = mem::listener(64);
                Fixture::new(self, AnyListener::new().with(listener), connector.into())
            }
            Transport::Tcp => {
                let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
                let addr = listener.local_addr().unwrap();
                let mut fx = Fixture::new(
                    self,
                    AnyListener::new().with(listener),
                    TcpConnector::new(addr).into(),
                );
                fx.addr = Some(addr);
                fx
            }
            Transport::Unix => {
                let socket = SocketPath::new();
                let listener = UnixListener::bind(socket.path()).unwrap();
                let connector = UnixConnector::new(socket.path());
                let mut fx =
                    Fixture::new(self, AnyListener::new().with(listener), connector.into());
                fx.socket = Some(socket);
                fx
            }
            Transport::Tls => {
                let pki = Arc::new(Pki::new());
                let listener = TlsListener::bind((Ipv4Addr::LOCALHOST, 0), pki.server_tls())
                    .await
                    .unwrap();
                let addr = listener.local_addr().unwrap();
                let mut fx = Fixture::new(
                    self,
                    AnyListener::new().with(listener),
                    tls_connector(addr, &pki).into(),
                );
                fx.addr = Some(addr);
                fx.pki = Some(pki);
                fx
            }
            Transport::Ws | Transport::Wss => {
                let secure = self == Transport::Wss;
                let pki = secure.then(|| Arc::new(Pki::new()));
                let mut listener = WsListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
                if let Some(pki) = &pki {
                    listener = listener.tls(pki.server_tls());
                }
                let addr = listener.local_addr().unwrap();
                let connector = ws_connector(addr, pki.as_deref());
                let mut fx =
                    Fixture::new(self, AnyListener::new().with(listener), connector.into());
                fx.addr = Some(addr);
                fx.pki = pki;
                fx
            }
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One test function per transport: `transport_tests!(round_trip);` makes
/// a module `round_trip` with the tests `round_trip::mem`,
/// `round_trip::tcp`, ..., each calling `round_trip(Transport::X)` (an
/// `async fn` next to the macro call) on a two-thread runtime.
/// `cargo test -p tether --test bare round_trip::` runs them all,
/// `cargo test -p tether --test bare ::tls` every TLS one.
#[macro_export]
macro_rules! transport_tests {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use super::common::transport::Transport;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mem() {
                super::$name(Transport::Mem).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$name(Transport::Tcp).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unix() {
                super::$name(Transport::Unix).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tls() {
                super::$name(Transport::Tls).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ws() {
                super::$name(Transport::Ws).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn wss() {
                super::$name(Transport::Wss).await;
            }
        }
    )+};
}

/// A CA and a server certificate for `localhost` and 127.0.0.1.
pub struct Pki {
    pub ca: Ca,
    pub server: super::pki::Issued,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = Ca::new("tether matrix CA");
        let server = ca.localhost();
        Pki { ca, server }
    }

    pub fn server_tls(&self) -> ServerTls {
        ServerTls::from_pem(
            self.server.cert_pem.as_bytes(),
            self.server.key_pem.as_bytes(),
        )
        .unwrap()
    }

    pub fn client_tls(&self) -> ClientTls {
        ClientTls::from_ca_pem(self.ca.cert_pem.as_bytes()).unwrap()
    }
}

/// A TLS connector to `addr` that checks the certificate for `localhost`
/// (no name resolution on connect).
fn tls_connector(addr: SocketAddr, pki: &Pki) -> TlsConnector {
    TlsConnector::new(addr.ip().to_string(), addr.port(), pki.client_tls()).server_name("localhost")
}

/// A WebSocket connector to the listener at `addr`: `ws://127.0.0.1:PORT/`,
/// or with `pki` `wss://localhost:PORT/` (the certificate checked for
/// `localhost`), dialling `addr` itself (no name resolution on connect).
fn ws_connector(addr: SocketAddr, pki: Option<&Pki>) -> WsConnector {
    let url = match pki {
        Some(_) => format!("wss://localhost:{}/", addr.port()),
        None => format!("ws://{addr}/"),
    };
    WsConnector::parse(&url, pki.map(Pki::client_tls))
        .unwrap()
        .connect_to(addr)
}

/// A socket path under the temporary directory, unique in the machine,
/// removed when dropped.
pub struct SocketPath(PathBuf);

impl SocketPath {
    pub fn new() -> SocketPath {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tether-matrix-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        SocketPath(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A listener of one transport and the ways to reach it. Keep it alive for
/// the test: it owns the socket path and the certificates.
pub struct Fixture {
    pub transport: Transport,
    listener: Option<AnyListener>,
    connector: AnyConnector,
    /// The listener's TCP address (transports over TCP).
    addr: Option<SocketAddr>,
    pki: Option<Arc<Pki>>,
    socket: Option<SocketPath>,
}

impl Fixture {
    fn new(transport: Transport, listener: AnyListener, connector: AnyConnector) -> Fixture {
        Fixture {
            transport,
            listener: Some(listener),
            connector,
            addr: None,
            pki: None,
            socket: None,
        }
    }

    /// The listener (once).
    pub fn listener(&mut self) -> AnyListener {
        self.listener
            .take()
            .expect("the listener was taken already")
    }

    /// A connector straight to the listener.
    pub fn connector(&self) -> AnyConnector {
        self.connector.clone()
    }

    /// The certificates of a TLS or secure WebSocket fixture.
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_deref()
    }

    /// A connector to the listener whose links are cut as `faults` plans
    /// (see the module documentation). `FaultConfig::max_connection_age`
    /// applies to the transports over TCP only.
    pub async fn cutting(&self, faults: FaultConfig) -> Cutter {
        let via = match self.addr {
            Some(addr) => {
                let proxy = FaultProxy::start(addr, faults).await.unwrap();
                let to = proxy.local_addr();
                let via = match self.transport {
                    Transport::Tcp => AnyConnector::from(TcpConnector::new(to)),
                    Transport::Tls => {
                        tls_connector(to, self.pki.as_ref().expect("certificates")).into()
                    }
                    // The request and the certificate check name the
                    // listener, as a direct connection would.
                    Transport::Ws | Transport::Wss => ws_connector(addr, self.pki.as_deref())
                        .connect_to(to)
                        .into(),
                    other => unreachable!("{other} is not over TCP"),
                };
                Via::Proxy(proxy, via)
            }
            None => Via::Relay(Relay {
                faults,
                socket: self.socket.as_ref().map(|s| s.path().to_path_buf()),
                stats: Arc::default(),
                cut: watch::Sender::new(0),
            }),
        };
        Cutter {
            inner: Arc::new(CutterInner {
                transport: self.transport,
                direct: self.connector.clone(),
                via,
                calm: AtomicBool::new(false),
                refuse: AtomicBool::new(false),
            }),
        }
    }

    /// One link each way: the client's end and the server's (established).
    pub async fn pair(&mut self) -> (AnyLink, AnyLink) {
        let mut listener = self.listener();
        let connector = self.connector();
        let (client, server) = tokio::join!(connector.connect(), async {
            listener.accept().await?.establish().await
        });
        (client.unwrap(), server.unwrap())
    }

    /// Checks what a server learnt about a client of this fixture: an
    /// address on the transports over TCP (from `client_ip`, if given),
    /// what TLS verified on TLS and secure WebSocket, the upgrade request
    /// (`GET /`, `Host` naming the listener) on both WebSockets, nothing
    /// on the others.
    pub fn check_client_peer(&self, peer: &PeerInfo, client_ip: Option<&str>) {
        let t = self.transport;
        if t.over_tcp() {
            let addr = peer
                .addr
                .unwrap_or_else(|| panic!("{t}: no client address"));
            if let Some(ip) = client_ip {
                assert_eq!(addr.ip().to_string(), ip, "{t}");
            }
        } else {
            assert!(peer.addr.is_none(), "{t}: {peer:?}");
        }
        match t {
            Transport::Tls | Transport::Wss => {
                let tls = peer
                    .tls
                    .as_ref()
                    .unwrap_or_else(|| panic!("{t}: no TLS information"));
                assert!(tls.protocol_version().is_some(), "{t}: {tls:?}");
                assert_eq!(tls.server_name(), Some("localhost"), "{t}: {tls:?}");
            }
            _ => assert!(peer.tls.is_none(), "{t}: {peer:?}"),
        }
        match t {
            Transport::Ws | Transport::Wss => {
                let http = peer
                    .http
                    .as_ref()
                    .unwrap_or_else(|| panic!("{t}: no HTTP request"));
                assert_eq!(http.method(), "GET", "{t}: {http:?}");
                assert_eq!(http.target(), "/", "{t}: {http:?}");
                let port = self.addr.expect("a WebSocket listener's address").port();
                let host = match t {
                    Transport::Wss => format!("localhost:{port}"),
                    _ => format!("127.0.0.1:{port}"),
                };
                assert_eq!(http.header("host"), Some(host.as_str()), "{t}: {http:?}");
                assert_eq!(http.header("upgrade"), Some("websocket"), "{t}: {http:?}");
            }
            _ => assert!(peer.http.is_none(), "{t}: {peer:?}"),
        }
    }
}

/// A connector whose links are cut: see [`Fixture::cutting`].
#[derive(Clone)]
pub struct Cutter {
    inner: Arc<CutterInner>,
}

struct CutterInner {
    transport: Transport,
    direct: AnyConnector,
    via: Via,
    /// Once set, new links bypass the cuts.
    calm: AtomicBool,
    refuse: AtomicBool,
}

enum Via {
    Proxy(FaultProxy, AnyConnector),
    Relay(Relay),
}

impl Cutter {
    /// What was cut so far. On the relays, `mid_frame_cuts` counts the Unix
    /// budget cuts that withheld part of a read chunk, as the proxy does.
    pub fn stats(&self) -> ProxyStats {
        match &self.inner.via {
            Via::Proxy(proxy, _) => proxy.stats(),
            Via::Relay(relay) => *relay.stats.lock().unwrap(),
        }
    }

    /// Cuts every live link now (links made later are not affected).
    pub fn cut_all(&self) {
        match &self.inner.via {
            Via::Proxy(proxy, _) => proxy.cut_all(),
            Via::Relay(relay) => {
                relay.cut.send_modify(|generation| *generation += 1);
            }
        }
    }

    /// While `refuse` is true, `connect` fails as if nobody listened.
    pub fn set_refuse(&self, refuse: bool) {
        self.inner.refuse.store(refuse, Ordering::SeqCst);
    }

    /// From now on, new links go straight to the listener and are never
    /// cut (the links already cut-prone stay so).
    pub fn calm(&self) {
        self.inner.calm.store(true, Ordering::SeqCst);
    }

    pub fn transport(&self) -> Transport {
        self.inner.transport
    }
}

impl Connector for Cutter {
    type Link = AnyLink;

    async fn connect(&self) -> Result<AnyLink, LinkError> {
        let inner = &self.inner;
        if inner.refuse.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refusing").into());
        }
        if inner.calm.load(Ordering::SeqCst) {
            return inner.direct.connect().await;
        }
        match &inner.via {
            Via::Proxy(_, via) => via.connect().await,
            Via::Relay(relay) => relay.connect(&inner.direct).await,
        }
    }
}

// ---- the relays of Mem and Unix ----

/// What a relayed link has left of its budget.
struct Budget {
    plan: CutPlan,
    used: Mutex<u64>,
}

impl Budget {
    /// Of `n` bytes going up (client to server) or down, how many may pass;
    /// fewer than `n` (or the budget used up) means: cut now.
    fn take(&self, n: usize, up: bool) -> (usize, bool) {
        let Some(budget) = self.plan.budget else {
            return (n, false);
        };
        if self.plan.handshake && !up {
            return (n, false);
        }
        let mut used = self.used.lock().unwrap();
        let left = budget.saturating_sub(*used);
        let pass = left.min(n as u64);
        *used += pass;
        (pass as usize, pass < n as u64 || *used >= budget)
    }
}

struct Relay {
    faults: FaultConfig,
    /// The Unix socket path; `None` for in-memory links.
    socket: Option<PathBuf>,
    stats: Arc<Mutex<ProxyStats>>,
    /// Bumped by `cut_all`.
    cut: watch::Sender<u64>,
}

/// How a relay ended.
enum Ended {
    /// Both directions reached their end, passed on.
    Done,
    /// A budget cut; `true` if part of a chunk was withheld.
    Budget(bool),
    /// `cut_all`.
    CutAll,
    /// One side failed or vanished.
    Failed,
}

/// Counts how a relayed link ended.
fn record(stats: &Mutex<ProxyStats>, ended: &Ended, plan: CutPlan, forwarded: u64) {
    {
        let mut stats = stats.lock().unwrap();
        stats.bytes_forwarded += forwarded;
        match *ended {
            Ended::Budget(partial) => {
                stats.cuts += 1;
                stats.handshake_cuts += u64::from(plan.handshake);
                stats.mid_frame_cuts += u64::from(partial);
            }
            Ended::CutAll => stats.cuts += 1,
            Ended::Done | Ended::Failed => {}
        }
    }
}

impl Relay {
    fn plan(&self) -> CutPlan {
        let mut stats = self.stats.lock().unwrap();
        let plan = self.faults.plan(stats.connections);
        stats.connections += 1;
        plan
    }

    async fn connect(&self, direct: &AnyConnector) -> Result<AnyLink, LinkError> {
        match &self.socket {
            Some(path) => self.connect_unix(path).await,
            None => self.connect_mem(direct).await,
        }
    }

    /// A Unix socket pair for the client, relayed byte by byte to a fresh
    /// connection to the listener; at the cut both sockets are closed.
    async fn connect_unix(&self, path: &Path) -> Result<AnyLink, LinkError> {
        let upstream = tokio::net::UnixStream::connect(path).await?;
        let (client, relay_end) = tokio::net::UnixStream::pair()?;
        let plan = self.plan();
        let budget = Arc::new(Budget {
            plan,
            used: Mutex::new(0),
        });
        let mut cut = self.cut.subscribe();
        cut.mark_unchanged();
        let forwarded = Arc::new(AtomicU64::new(0));
        let (up_from, up_to) = relay_end.into_split();
        let (down_from, down_to) = upstream.into_split();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let up = pump(up_from, down_to, budget.clone(), true, forwarded.clone());
            let down = pump(down_from, up_to, budget.clone(), false, forwarded.clone());
            let ended = tokio::select! {
                ended = first_end(up, down) => ended,
                _ = cut.changed() => Ended::CutAll,
            };
            // Every socket of the relay is closed here, both peers see the
            // end wherever their frames were.
            record(&stats, &ended, plan, forwarded.load(Ordering::Relaxed));
        });
        Ok(AnyLink::Unix(StreamLink::unix(
            client,
            StreamConfig::default(),
        )))
    }

    /// An in-memory pair for the client, relayed payload by payload to a
    /// fresh link to the listener; at the cut both links are killed.
    async fn connect_mem(&self, direct: &AnyConnector) -> Result<AnyLink, LinkError> {
        let AnyLink::Mem(upstream) = direct.connect().await? else {
            unreachable!("an in-memory fixture connects in memory");
        };
        let (client, relay_end) = mem::pair(64);
        let killers = [upstream.killer(), relay_end.killer()];
        let plan = self.plan();
        let budget = Arc::new(Budget {
            plan,
            used: Mutex::new(0),
        });
        let mut cut = self.cut.subscribe();
        cut.mark_unchanged();
        let forwarded = Arc::new(AtomicU64::new(0));
        let (up_to, down_from) = upstream.split();
        let (down_to, up_from) = relay_end.split();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let up = relay_payloads(up_from, up_to, &budget, true, &forwarded);
            let down = relay_payloads(down_from, down_to, &budget, false, &forwarded);
            let ended = tokio::select! {
                ended = first_end(up, down) => ended,
                _ = cut.changed() => Ended::CutAll,
            };
            if !matches!(ended, Ended::Done) {
                for k in &killers {
                    k.kill();
                }
            }
            record(&stats, &ended, plan, forwarded.load(Ordering::Relaxed));
        });
        Ok(AnyLink::Mem(client))
    }
}

/// How the two directions of a relay ended: the first to fail or reach its
/// cut ends the relay; a clean end waits for the other direction.
async fn first_end(
    up: impl std::future::Future<Output = Ended>,
    down: impl std::future::Future<Output = Ended>,
) -> Ended {
    tokio::pin!(up, down);
    let (first, up_first) = tokio::select! {
        e = &mut up => (e, true),
        e = &mut down => (e, false),
    };
    match first {
        Ended::Done if up_first => down.await,
        Ended::Done => up.await,
        other => other,
    }
}

/// Copies one direction of a Unix relay until its end or its cut.
async fn pump(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::net::unix::OwnedWriteHalf,
    budget: Arc<Budget>,
    up: bool,
    forwarded: Arc<AtomicU64>,
) -> Ended {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return Ended::Done;
            }
            Ok(n) => n,
            Err(_) => return Ended::Failed,
        };
        let (pass, cut) = budget.take(n, up);
        if to.write_all(&buf[..pass]).await.is_err() {
            return Ended::Failed;
        }
        forwarded.fetch_add(pass as u64, Ordering::Relaxed);
        if cut {
            return Ended::Budget(pass < n);
        }
    }
}

/// Relays one direction of an in-memory link until its end or its cut.
async fn relay_payloads<R: LinkRx, T: LinkTx>(
    mut from: R,
    mut to: T,
    budget: &Budget,
    up: bool,
    forwarded: &AtomicU64,
) -> Ended {
    loop {
        let payload: Bytes = match from.recv().await {
            Ok(Some(p)) => p,
            Ok(None) => {
                let _ = to.close().await;
                return Ended::Done;
            }
            Err(_) => return Ended::Failed,
        };
        let (pass, cut) = budget.take(payload.len(), up);
        if pass < payload.len() {
            // Payloads are whole on a memory link: this one is lost in
            // flight, which counts as a cut inside a frame.
            return Ended::Budget(true);
        }
        if to.send(payload).await.is_err() {
            return Ended::Failed;
        }
        forwarded.fetch_add(pass as u64, Ordering::Relaxed);
        if cut {
            return Ended::Budget(false);
        }
    }
}
