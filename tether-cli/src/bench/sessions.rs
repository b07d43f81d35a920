//! Workloads with many sessions: resident memory per idle server session,
//! and the reconnect storm. Both need more file descriptors than one process
//! may hold here (10,000 TCP sessions are 20,000 sockets when both ends live
//! in one process), so over TCP the clients run in a child process: this
//! same binary, started as `tether bench --role clients`, driven by one-line
//! commands on its standard input. The idle-memory server runs in a child
//! of its own too (`--role idle-server`), so that its resident set holds
//! nothing but a fresh runtime and the sessions.

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::task::AtomicWaker;
use serde::{Deserialize, Serialize};
use tether::link::mem;
use tether::link::tls::{ClientTls, ServerTls, TlsConnector, TlsListener};
use tether::link::ws::{WsConnector, WsListener};
use tether::link::{Connector, LinkError, StreamConfig, StreamLink, TcpListener};
use tether::{Config, Server, ServerStats, StableConduit, StableSender};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::alloc::AllocCounter;
use super::systems::{Msg, MEM_CAPACITY};

/// Listen backlog of the many-session servers: Linux caps it at
/// `net.core.somaxconn` (4096 by default). tether's `TcpListener::bind`
/// takes tokio's default of 1024.
pub(crate) const BACKLOG: u32 = 4096;

/// Connections being set up at once when a fleet of clients starts.
const CONNECT_CONCURRENCY: usize = 128;

/// Messages per session these workloads send at most (indices 0..MAX_IDX).
const MAX_IDX: usize = 4;

/// Size of every session message (id, index, padding).
const SESSION_MSG_SIZE: usize = 32;

/// Longest wait for a fleet to connect or a round of messages to arrive.
const FLEET_TIMEOUT: Duration = Duration::from_secs(300);

/// Message `idx` of session `id`.
pub(crate) fn session_msg(id: u64, idx: u64) -> Msg {
    let mut v = Vec::with_capacity(SESSION_MSG_SIZE);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&idx.to_le_bytes());
    v.resize(SESSION_MSG_SIZE, 0x5a);
    Msg::from(v)
}

fn parse_session_msg(msg: &[u8]) -> Option<(u64, u64)> {
    if msg.len() != SESSION_MSG_SIZE {
        return None;
    }
    let id = u64::from_le_bytes(msg[..8].try_into().ok()?);
    let idx = u64::from_le_bytes(msg[8..16].try_into().ok()?);
    Some((id, idx))
}

/// The client configuration of the storm and resume workloads: reconnect at
/// once. (With a zero minimum the backoff bound stays zero: every retry is
/// immediate; `max_backoff` is set anyway.)
pub(crate) fn resume_config() -> Config {
    Config::default().reconnect_with(|r| {
        r.min_backoff(Duration::ZERO)
            .max_backoff(Duration::from_millis(100))
    })
}

/// The server configuration of the many-session workloads: the default,
/// with the per-source caps (1,024 sessions and 64 pending handshakes per
/// address by default) and the global pending cap raised to `sessions`,
/// since every bench client comes from 127.0.0.1. The storm measures how
/// fast a server takes back every session at once, not its admission
/// control (tether-cli's hostile tests do that).
pub(crate) fn server_config(sessions: usize) -> Config {
    Config::default()
        .max_sessions_per_source(sessions.max(1024))
        .max_pending_per_source(sessions.max(64))
        .max_pending_handshakes(sessions.max(1024))
}

/// A 2-worker multi-thread runtime, as every workload uses.
pub(crate) fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// A tether TCP listener on loopback with a listen backlog of [`BACKLOG`].
pub(crate) fn listener_with_backlog() -> io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(BACKLOG)?;
    Ok(TcpListener::from_tokio(listener, StreamConfig::default()))
}

/// Which message of which session arrived, checked: every message of every
/// session must arrive exactly once and in order.
pub(crate) struct Tracker {
    sessions: usize,
    /// Per session, bit `k`: message `k` arrived.
    seen: Vec<AtomicU8>,
    /// Per index, how many sessions delivered it.
    arrived: [AtomicU64; MAX_IDX],
    duplicated: AtomicU64,
    reordered: AtomicU64,
    malformed: AtomicU64,
    /// Sessions accepted (server side).
    accepted: AtomicU64,
    /// Sessions that ended with an error.
    failed: AtomicU64,
    changed: Notify,
}

impl Tracker {
    pub(crate) fn new(sessions: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            sessions,
            seen: (0..sessions).map(|_| AtomicU8::new(0)).collect(),
            arrived: Default::default(),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn record(&self, msg: &[u8]) {
        let Some((id, idx)) = parse_session_msg(msg) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (Some(seen), true) = (self.seen.get(id as usize), (idx as usize) < MAX_IDX) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let bit = 1u8 << idx;
        let before = seen.fetch_or(bit, Ordering::AcqRel);
        if before & bit != 0 {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Message k must come after every earlier one and before any later.
        if before != bit - 1 {
            self.reordered.fetch_add(1, Ordering::Relaxed);
        }
        let n = self.arrived[idx as usize].fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.sessions as u64 {
            self.changed.notify_waiters();
        }
    }

    fn arrived(&self, idx: usize) -> u64 {
        self.arrived[idx].load(Ordering::Acquire)
    }

    /// Waits until every session delivered message `idx`; `false` on timeout.
    pub(crate) async fn wait_all(&self, idx: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.arrived(idx) >= self.sessions as u64 {
                return true;
            }
            // Waking on accepts too: poll at least every 100 ms.
            let wake = (tokio::time::Instant::now() + Duration::from_millis(100)).min(deadline);
            if tokio::time::timeout_at(wake, notified).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return self.arrived(idx) >= self.sessions as u64;
            }
        }
    }

    /// Waits until `n` sessions were accepted; `false` on timeout.
    async fn wait_accepted(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.accepted.load(Ordering::Acquire) < n as u64 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Messages `0..=upto` of every session that never arrived.
    pub(crate) fn lost(&self, upto: usize) -> u64 {
        let expected = self.sessions as u64 * (upto as u64 + 1);
        let got: u64 = (0..=upto).map(|i| self.arrived(i)).sum();
        expected.saturating_sub(got)
    }

    fn counts(&self, upto: usize) -> Delivery {
        Delivery {
            expected: self.sessions as u64 * (upto as u64 + 1),
            lost: self.lost(upto),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            sessions_failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Delivery check of a many-session workload.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Delivery {
    pub(crate) expected: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    pub(crate) malformed: u64,
    pub(crate) sessions_failed: u64,
}

impl Delivery {
    pub(crate) fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.malformed == 0
            && self.sessions_failed == 0
    }
}

/// Receives one session's messages into `tracker`, echoing them if asked.
async fn track_session(conduit: StableConduit<Msg>, tracker: Arc<Tracker>, echo: bool) {
    let (tx, mut rx) = conduit.split();
    loop {
        match rx.recv().await {
            Ok(Some(msg)) => {
                tracker.record(&msg);
                if echo && tx.send(&msg).await.is_err() {
                    tracker.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if e.session_lost().is_some() => {
                tracing::warn!(error = %e, "bench session lost");
                tracker.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                tracker.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Accepts sessions into `tracker` until told to stop; returns the server.
fn spawn_acceptor(
    server: Server<Msg>,
    tracker: Arc<Tracker>,
    echo: bool,
) -> (oneshot::Sender<()>, JoinHandle<Server<Msg>>) {
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => return server,
                conduit = server.accept() => match conduit {
                    Some(c) => {
                        tracker.accepted.fetch_add(1, Ordering::AcqRel);
                        tokio::spawn(track_session(c, tracker.clone(), echo));
                    }
                    None => return server,
                },
            }
        }
    });
    (stop_tx, task)
}

/// A set of client sessions, numbered from 0.
pub(crate) struct Fleet {
    senders: Vec<StableSender<Msg>>,
    /// Echoes received by the clients, checked like the server's receipts.
    echoes: Arc<Tracker>,
    receivers: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Connects `n` sessions through `connector`, at most
    /// [`CONNECT_CONCURRENCY`] handshakes at a time.
    pub(crate) async fn connect<C>(connector: C, config: Config, n: usize) -> anyhow::Result<Fleet>
    where
        C: Connector + Clone,
    {
        let echoes = Tracker::new(n);
        let mut pending = JoinSet::new();
        let mut conduits: Vec<Option<StableConduit<Msg>>> = (0..n).map(|_| None).collect();
        let mut next = 0;
        let mut done = 0;
        while done < n {
            while next < n && pending.len() < CONNECT_CONCURRENCY {
                let (c, cfg, id) = (connector.clone(), config.clone(), next);
                pending.spawn(async move { (id, StableConduit::<Msg>::connect(c, cfg).await) });
                next += 1;
            }
            let (id, conduit) = pending.join_next().await.context("no pending connect")??;
            conduits[id] =
                Some(conduit.with_context(|| format!("session {id} failed to connect"))?);
            done += 1;
        }
        let mut senders = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for conduit in conduits.into_iter().flatten() {
            let (tx, mut rx) = conduit.split();
            senders.push(tx);
            let echoes = echoes.clone();
            receivers.push(tokio::spawn(async move {
                while let Ok(Some(msg)) = rx.recv().await {
                    echoes.record(&msg);
                }
            }));
        }
        Ok(Fleet {
            senders,
            echoes,
            receivers,
        })
    }

    /// Every session sends its message `idx`.
    pub(crate) async fn send_all(&self, idx: u64) -> anyhow::Result<()> {
        for (id, tx) in self.senders.iter().enumerate() {
            tx.send(&session_msg(id as u64, idx)).await?;
        }
        Ok(())
    }

    /// Closes every session gracefully (so the server's sessions end
    /// without waiting for a resume), waiting up to 30 s in all.
    pub(crate) async fn close_all(&self) {
        let mut closing = JoinSet::new();
        for tx in &self.senders {
            let tx = tx.clone();
            closing.spawn(async move {
                let _ = tx.close().await;
            });
        }
        let all = async { while closing.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(30), all).await;
    }

    pub(crate) fn stats(&self) -> FleetStats {
        let mut s = FleetStats {
            sessions: self.senders.len(),
            ..FleetStats::default()
        };
        for tx in &self.senders {
            let st = tx.stats();
            if st.reconnects >= 1 {
                s.resumed += 1;
            }
            s.reconnects_total += st.reconnects;
            s.frames_replayed += st.frames_replayed;
            if st.state == tether::ConduitState::Lost {
                s.lost_sessions += 1;
            }
        }
        s
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for r in &self.receivers {
            r.abort();
        }
    }
}

/// What the clients of a fleet report.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct FleetStats {
    pub(crate) sessions: usize,
    /// Sessions whose link was replaced at least once.
    pub(crate) resumed: usize,
    pub(crate) reconnects_total: u64,
    pub(crate) frames_replayed: u64,
    /// Sessions lost for good.
    pub(crate) lost_sessions: usize,
}

// ---------------------------------------------------------------------------
// A TCP connector whose links can all be cut at once.

/// Cuts one link: after [`kill`](Self::kill) every read and write of the
/// link fails with `ConnectionReset`, and pending ones wake up to fail.
#[derive(Default)]
struct KillSwitch {
    killed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.read.wake();
        self.write.wake();
    }

    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> io::Result<()> {
        if !self.killed.load(Ordering::Acquire) {
            waker.register(cx.waker());
            if !self.killed.load(Ordering::Acquire) {
                return Ok(());
            }
        }
        Err(io::Error::new(io::ErrorKind::ConnectionReset, "link cut"))
    }
}

/// The read half of a cuttable TCP link.
pub(crate) struct CutRead {
    inner: OwnedReadHalf,
    switch: Arc<KillSwitch>,
}

impl AsyncRead for CutRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.switch.check(&self.switch.read, cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// The write half of a cuttable TCP link.
pub(crate) struct CutWrite {
    inner: OwnedWriteHalf,
    switch: Arc<KillSwitch>,
}

impl AsyncWrite for CutWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.switch.check(&self.switch.write, cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.switch.check(&self.switch.write, cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.switch.check(&self.switch.write, cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.switch.check(&self.switch.write, cx)?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects TCP links (`TCP_NODELAY`, default stream settings, like
/// [`tether::link::TcpConnector`]) that [`kill_all`](Self::kill_all) cuts at once: each
/// client sees its link fail and drops it (closing the socket, which the
/// server sees as the end of the stream), as after a reset.
#[derive(Clone)]
pub(crate) struct CuttableTcp {
    addr: SocketAddr,
    switches: Arc<Mutex<Vec<Weak<KillSwitch>>>>,
}

impl CuttableTcp {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        CuttableTcp {
            addr,
            switches: Arc::default(),
        }
    }

    /// Cuts every link connected so far.
    pub(crate) fn kill_all(&self) {
        let switches =
            std::mem::take(&mut *self.switches.lock().unwrap_or_else(PoisonError::into_inner));
        for s in switches.iter().filter_map(Weak::upgrade) {
            s.kill();
        }
    }
}

impl Connector for CuttableTcp {
    type Link = StreamLink<CutRead, CutWrite>;

    async fn connect(&self) -> Result<Self::Link, LinkError> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let switch = Arc::new(KillSwitch::default());
        self.switches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&switch));
        Ok(StreamLink::from_halves(
            CutRead {
                inner: r,
                switch: switch.clone(),
            },
            CutWrite { inner: w, switch },
            StreamConfig::default(),
        ))
    }
}

// ---------------------------------------------------------------------------
// Child processes.

/// A child `tether bench --role ...` process, driven by lines.
struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl ChildProc {
    fn spawn(args: &[String]) -> anyhow::Result<ChildProc> {
        let exe = std::env::current_exe().context("cannot find the tether binary")?;
        let mut child = Command::new(exe)
            .arg("bench")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a child process")?;
        let stdout = child.stdout.take().context("no child stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(ChildProc {
            child,
            stdin,
            lines,
        })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("child stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// The next line, which must start with `prefix`; returns the rest.
    async fn expect(&mut self, prefix: &str, limit: Duration) -> anyhow::Result<String> {
        let line = tokio::time::timeout(limit, self.lines.recv())
            .await
            .with_context(|| format!("child did not answer {prefix:?} in {limit:?}"))?
            .with_context(|| format!("child exited before answering {prefix:?}"))?;
        match line.strip_prefix(prefix) {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("child answered {line:?}, expected {prefix:?}"),
        }
    }

    /// Closes its input (which ends it) and waits for it.
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn reply(line: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// `--role clients`: connects `sessions` stable sessions to `addr` and
/// obeys commands on stdin, one per line, answering on stdout:
///
/// - `send K`: every session sends its message K → `sent`
/// - `cut-send K`: cut every link, then every session sends message K →
///   `sent`
/// - `await-echo K`: wait until every session got message K back → `echoed`
/// - `stats` → `stats {json}`
///
/// It answers `ready` once connected and exits when stdin closes.
///
/// With `tls_ca` (a PEM file) the sessions run over TLS to `localhost` at
/// `addr`, trusting that CA; with `ws`, over WebSocket to
/// `ws://ADDR/`; `cut-send` is then refused.
pub(crate) fn run_clients(
    addr: SocketAddr,
    sessions: usize,
    tls_ca: Option<PathBuf>,
    ws: bool,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let plain_tcp = tls_ca.is_none() && !ws;
    rt.block_on(async {
        let cutter = CuttableTcp::new(addr);
        let fleet = match &tls_ca {
            None if ws => {
                let connector = WsConnector::new(&format!("ws://{addr}/"))?;
                Fleet::connect(connector, resume_config(), sessions).await?
            }
            None => Fleet::connect(cutter.clone(), resume_config(), sessions).await?,
            Some(ca) => {
                let tls = ClientTls::from_ca_file(ca)?;
                let connector = TlsConnector::new(addr.ip().to_string(), addr.port(), tls)
                    .server_name("localhost");
                Fleet::connect(connector, resume_config(), sessions).await?
            }
        };
        reply("ready")?;
        let mut commands = stdin_lines();
        while let Some(line) = commands.recv().await {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["send", k] => {
                    fleet.send_all(k.parse()?).await?;
                    reply("sent")?;
                }
                ["cut-send", _] if !plain_tcp => bail!("cut-send needs plain TCP"),
                ["cut-send", k] => {
                    cutter.kill_all();
                    fleet.send_all(k.parse()?).await?;
                    reply("sent")?;
                }
                ["await-echo", k] => {
                    let ok = fleet.echoes.wait_all(k.parse()?, FLEET_TIMEOUT).await;
                    reply(if ok { "echoed" } else { "timeout" })?;
                }
                ["stats"] => {
                    let stats = fleet.stats();
                    let delivery = fleet.echoes.counts(0);
                    reply(&format!(
                        "stats {}",
                        serde_json::json!({ "fleet": stats, "echoes": delivery })
                    ))?;
                }
                _ => bail!("unknown command {line:?}"),
            }
        }
        fleet.close_all().await;
        drop(fleet);
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Idle memory.

fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}

/// One reading of the idle server's memory.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct MemPoint {
    /// Resident set size (VmRSS).
    pub(crate) rss: u64,
    /// Live heap bytes counted by the allocator since counting began.
    pub(crate) heap: i64,
}

/// What `--role idle-server` measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct IdleReport {
    pub(crate) sessions: usize,
    /// Before any session.
    pub(crate) base: MemPoint,
    /// Every session open, handshake done, nothing sent.
    pub(crate) fresh: MemPoint,
    /// Every session has carried one 32-byte message each way.
    pub(crate) used: MemPoint,
    /// (used.rss - base.rss) / sessions: the headline figure.
    pub(crate) rss_per_session: f64,
    /// (fresh.rss - base.rss) / sessions.
    pub(crate) rss_per_fresh_session: f64,
    /// (used.heap - base.heap) / sessions.
    pub(crate) heap_per_session: f64,
    /// (fresh.heap - base.heap) / sessions.
    pub(crate) heap_per_fresh_session: f64,
    pub(crate) delivery: Delivery,
    pub(crate) server: ServerCounts,
}

/// The server counters the report keeps.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ServerCounts {
    pub(crate) sessions_created: u64,
    pub(crate) resumes: u64,
    pub(crate) rejected: u64,
    pub(crate) bad_handshakes: u64,
}

impl From<ServerStats> for ServerCounts {
    fn from(s: ServerStats) -> Self {
        ServerCounts {
            sessions_created: s.sessions_created,
            resumes: s.resumes,
            rejected: s.rejected,
            bad_handshakes: s.bad_handshakes,
        }
    }
}

async fn mem_point(counter: Option<&'static dyn AllocCounter>) -> anyhow::Result<MemPoint> {
    // Let acks, pongs and freed task memory settle first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let heap = counter.map_or(0, |c| {
        super::alloc::AllocCounts::sum((0..super::alloc::SLOTS).map(|s| c.counts(s))).live_delta()
    });
    Ok(MemPoint {
        rss: rss_bytes()?,
        heap,
    })
}

/// The link under the idle sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// Plain TCP.
    Tcp,
    /// TLS with a throwaway certificate whose CA the clients are given in
    /// a temporary file.
    Tls,
    /// WebSocket (`ws://`) over TCP.
    Ws,
}

/// `--role idle-server` (`idle-server-ws` over WebSocket, `--tls-ca` for
/// TLS): serves `sessions` sessions from a child client process, echoing,
/// and prints one JSON [`IdleReport`].
pub(crate) fn run_idle_server(
    sessions: usize,
    over: Over,
    counter: Option<&'static dyn AllocCounter>,
) -> anyhow::Result<()> {
    if let Some(c) = counter {
        c.set_enabled(true);
    }
    let rt = runtime()?;
    let report = rt.block_on(async {
        let listener = listener_with_backlog()?;
        let addr = listener.local_addr()?;
        let clients = if over == Over::Ws {
            "clients-ws"
        } else {
            "clients"
        };
        let mut args = vec![
            "--role".into(),
            clients.into(),
            "--addr".into(),
            addr.to_string(),
            "--sessions".into(),
            sessions.to_string(),
        ];
        let mut ca_file = None;
        let server = if over == Over::Ws {
            Server::<Msg>::new(WsListener::new(listener), server_config(sessions))
        } else if over == Over::Tls {
            let pki = crate::pki::Pki::localhost()?;
            let path =
                std::env::temp_dir().join(format!("tether-bench-ca-{}.pem", std::process::id()));
            std::fs::write(&path, &pki.ca_pem)?;
            args.extend(["--tls-ca".into(), path.display().to_string()]);
            ca_file = Some(RemoveOnDrop(path));
            let tls = ServerTls::from_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())?;
            Server::<Msg>::new(TlsListener::new(listener, tls), server_config(sessions))
        } else {
            Server::<Msg>::new(listener, server_config(sessions))
        };
        let tracker = Tracker::new(sessions);
        let (stop, acceptor) = spawn_acceptor(server, tracker.clone(), true);
        let base = mem_point(counter).await?;
        let mut clients = ChildProc::spawn(&args)?;
        clients.expect("ready", FLEET_TIMEOUT).await?;
        if !tracker.wait_accepted(sessions, FLEET_TIMEOUT).await {
            bail!("the server did not accept {sessions} sessions");
        }
        let fresh = mem_point(counter).await?;
        clients.send("send 0")?;
        clients.expect("sent", FLEET_TIMEOUT).await?;
        clients.send("await-echo 0")?;
        clients.expect("echoed", FLEET_TIMEOUT).await?;
        if !tracker.wait_all(0, FLEET_TIMEOUT).await {
            bail!("not every message reached the server");
        }
        let used = mem_point(counter).await?;
        let delivery = tracker.counts(0);
        clients.finish();
        drop(ca_file);
        let _ = stop.send(());
        let server = acceptor.await?;
        let n = sessions.max(1) as f64;
        Ok::<_, anyhow::Error>(IdleReport {
            sessions,
            base,
            fresh,
            used,
            rss_per_session: (used.rss as f64 - base.rss as f64) / n,
            rss_per_fresh_session: (fresh.rss as f64 - base.rss as f64) / n,
            heap_per_session: (used.heap - base.heap) as f64 / n,
            heap_per_fresh_session: (fresh.heap - base.heap) as f64 / n,
            delivery,
            server: server.stats().into(),
        })
    })?;
    reply(&serde_json::to_string(&report)?)?;
    // Sessions are not closed one by one: the process ends here.
    std::process::exit(0);
}

/// A file removed when this is dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the idle-memory workload in a child server process, over `over`.
pub(crate) async fn idle_memory(sessions: usize, over: Over) -> anyhow::Result<IdleReport> {
    let role = if over == Over::Ws {
        "idle-server-ws"
    } else {
        "idle-server"
    };
    let mut args = vec![
        "--role".into(),
        role.into(),
        "--sessions".into(),
        sessions.to_string(),
    ];
    if over == Over::Tls {
        args.push("--tls-ca".into());
        args.push("server".into());
    }
    let mut server = ChildProc::spawn(&args)?;
    let line = server.expect("{", FLEET_TIMEOUT).await?;
    server.finish();
    Ok(serde_json::from_str(&format!("{{{line}"))?)
}

// ---------------------------------------------------------------------------
// Reconnect storm.

/// What a reconnect storm measured.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct StormReport {
    pub(crate) sessions: usize,
    /// From the cut to the arrival of the last session's post-cut message.
    pub(crate) elapsed_s: f64,
    /// Sessions whose client reports at least one reconnect.
    pub(crate) resumed: usize,
    /// Messages sent (one before the cut, one after, per session) that
    /// never arrived.
    pub(crate) lost: u64,
    pub(crate) delivery: Delivery,
    pub(crate) clients: FleetStats,
    pub(crate) server: ServerCounts,
    /// Whether every session resumed and every message arrived exactly
    /// once, in order.
    pub(crate) ok: bool,
}

/// The storm over TCP: clients in a child process, links cut on the client
/// side all at once.
pub(crate) async fn storm_tcp(sessions: usize) -> anyhow::Result<StormReport> {
    let listener = listener_with_backlog()?;
    let addr = listener.local_addr()?;
    let server = Server::<Msg>::new(listener, server_config(sessions));
    let tracker = Tracker::new(sessions);
    let (stop, acceptor) = spawn_acceptor(server, tracker.clone(), false);
    let mut clients = ChildProc::spawn(&[
        "--role".into(),
        "clients".into(),
        "--addr".into(),
        addr.to_string(),
        "--sessions".into(),
        sessions.to_string(),
    ])?;
    clients.expect("ready", FLEET_TIMEOUT).await?;
    clients.send("send 0")?;
    clients.expect("sent", FLEET_TIMEOUT).await?;
    if !tracker.wait_all(0, FLEET_TIMEOUT).await {
        bail!("not every pre-cut message arrived");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    clients.send("cut-send 1")?;
    let all = tracker.wait_all(1, FLEET_TIMEOUT).await;
    let elapsed = start.elapsed();
    clients.expect("sent", FLEET_TIMEOUT).await?;
    clients.send("stats")?;
    let stats: serde_json::Value =
        serde_json::from_str(&clients.expect("stats", FLEET_TIMEOUT).await?)?;
    let fleet: FleetStats = serde_json::from_value(stats["fleet"].clone())?;
    let delivery = tracker.counts(1);
    clients.finish();
    let _ = stop.send(());
    let server = acceptor.await?;
    Ok(storm_report(
        sessions,
        elapsed,
        all,
        delivery,
        fleet,
        server.stats(),
    ))
}

/// The storm over the in-memory link, in this process:
/// `MemConnector::kill_all` cuts every link.
pub(crate) async fn storm_mem(sessions: usize) -> anyhow::Result<StormReport> {
    let (listener, connector) = mem::listener(MEM_CAPACITY);
    let server = Server::<Msg>::new(listener, server_config(sessions));
    let tracker = Tracker::new(sessions);
    let (stop, acceptor) = spawn_acceptor(server, tracker.clone(), false);
    let fleet = Fleet::connect(connector.clone(), resume_config(), sessions).await?;
    fleet.send_all(0).await?;
    if !tracker.wait_all(0, FLEET_TIMEOUT).await {
        bail!("not every pre-cut message arrived");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    connector.kill_all();
    fleet.send_all(1).await?;
    let all = tracker.wait_all(1, FLEET_TIMEOUT).await;
    let elapsed = start.elapsed();
    let stats = fleet.stats();
    let delivery = tracker.counts(1);
    fleet.close_all().await;
    drop(fleet);
    let _ = stop.send(());
    let server = acceptor.await?;
    Ok(storm_report(
        sessions,
        elapsed,
        all,
        delivery,
        stats,
        server.stats(),
    ))
}

fn storm_report(
    sessions: usize,
    elapsed: Duration,
    all_arrived: bool,
    delivery: Delivery,
    clients: FleetStats,
    server: ServerStats,
) -> StormReport {
    StormReport {
        sessions,
        elapsed_s: elapsed.as_secs_f64(),
        resumed: clients.resumed,
        lost: delivery.lost,
        ok: all_arrived
            && delivery.ok()
            && clients.resumed == sessions
            && clients.lost_sessions == 0,
        delivery,
        clients,
        server: server.into(),
    }
}
