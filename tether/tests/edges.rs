//! Regression tests for issue 9: the delivery guarantee at the edges of a
//! session's life (drop, close, late hellos, slow readers, large messages,
//! lost server hellos, stale acks, trimming on resume, the close timeout).
//! One test (or one pair, one per side) per finding of the issue, named
//! after it.
//!
//! Every test runs on tokio's paused clock over in-memory links, through
//! [`Net`], a connector whose links do exactly what a test plans for them:
//! refuse, hold a hello back, add latency, lose the server's hello, die
//! after a byte budget or a lifetime, swallow what the client sends, or
//! swallow a close frame and die. Nothing is random: each run takes the same
//! interleaving.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{config, Msg};
use tether::link::mem::{self, MemConnector, MemKiller, MemLink, MemListener};
use tether::link::{Connector, Link, LinkError, LinkRx, LinkTx};
use tether::proto::frame::{encode_frame, FrameHeader};
use tether::proto::{decode_frame, ext, ClientHello, Seq, ServerHello};
use tether::{ConduitState, Config, Error, Server, SessionLost, StableConduit, StableReceiver};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

fn is_close_timed_out(e: &Error) -> bool {
    matches!(e.session_lost(), Some(SessionLost::CloseTimedOut))
}

fn undelivered(s: &tether::Stats) -> u64 {
    s.undelivered
}

// ---- a network whose links do what the test plans ----

/// What one link does. The default is a plain in-memory link.
#[derive(Clone, Debug, Default)]
struct Plan {
    /// Every payload the client sends arrives this much later (in order).
    latency_up: Duration,
    /// The client's first payload (its hello) arrives this much later,
    /// whatever became of the attempt meanwhile; later payloads queue behind
    /// it.
    hold_hello: Option<Duration>,
    /// The server's first payload (its hello) is lost, and the link dies.
    lose_server_hello: bool,
    /// The link dies when the payload bytes it carried, both ways, would
    /// exceed this; the payload that does not fit is lost, and so is
    /// everything after it.
    budget: Option<usize>,
    /// What the client sends after its hello is accepted and never arrives.
    blackhole_up: bool,
    /// The link dies this long after it was made.
    lifetime: Option<Duration>,
}

#[derive(Default)]
struct NetState {
    refuse: AtomicBool,
    connect_delay: Mutex<Duration>,
    default_plan: Mutex<Plan>,
    plans: Mutex<HashMap<usize, Plan>>,
    links: AtomicUsize,
    kills: AtomicU64,
    /// One-shot: the next close frame the client sends is swallowed, and
    /// its link dies.
    swallow_close_up: AtomicBool,
    /// One-shot: the next close frame the server sends is swallowed, and
    /// its link dies.
    swallow_close_down: AtomicBool,
    swallowed_closes: AtomicU64,
    lost_server_hellos: AtomicU64,
}

/// The client's connector; the server listens on the matching
/// [`MemListener`].
#[derive(Clone)]
struct Net {
    inner: MemConnector,
    state: Arc<NetState>,
}

fn net() -> (MemListener, Net) {
    let (listener, inner) = mem::listener(64);
    let net = Net {
        inner,
        state: Arc::default(),
    };
    (listener, net)
}

impl Net {
    fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }
    /// Every connection attempt takes this long (so that even a client that
    /// reconnects at once lets the clock move).
    fn connect_delay(&self, d: Duration) {
        *self.state.connect_delay.lock().unwrap() = d;
    }
    /// The plan of link number `idx` (0 is the first link ever made).
    fn plan(&self, idx: usize, plan: Plan) {
        self.state.plans.lock().unwrap().insert(idx, plan);
    }
    /// The plan of every link made from now on without a plan of its own.
    fn plan_all(&self, plan: Plan) {
        *self.state.default_plan.lock().unwrap() = plan;
    }
    fn swallow_next_client_close(&self) {
        self.state.swallow_close_up.store(true, Ordering::SeqCst);
    }
    fn swallow_next_server_close(&self) {
        self.state.swallow_close_down.store(true, Ordering::SeqCst);
    }
    fn kill_all(&self) {
        self.inner.kill_all();
    }
    fn links(&self) -> usize {
        self.state.links.load(Ordering::SeqCst)
    }
    fn kills(&self) -> u64 {
        self.state.kills.load(Ordering::SeqCst)
    }
    fn swallowed_closes(&self) -> u64 {
        self.state.swallowed_closes.load(Ordering::SeqCst)
    }
    fn lost_server_hellos(&self) -> u64 {
        self.state.lost_server_hellos.load(Ordering::SeqCst)
    }
}

/// A close frame: seq field 0, kind `05` (the same shape before and after
/// issue 9). Data frames have tag `00`, `01` or `08` there, hellos start
/// with their magic.
fn is_close_frame(p: &[u8]) -> bool {
    p.len() >= 3 && p[0] == 0 && p[1] == 0x05
}

struct Ctl {
    killer: MemKiller,
    plan: Plan,
    carried: AtomicUsize,
    net: Arc<NetState>,
}

impl Ctl {
    fn kill(&self) {
        if !self.killer.is_killed() {
            self.killer.kill();
            self.net.kills.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Counts a payload against the budget: `false` when it does not fit.
    fn carry(&self, len: usize) -> bool {
        let Some(budget) = self.plan.budget else {
            return true;
        };
        let before = self.carried.fetch_add(len, Ordering::SeqCst);
        before + len <= budget
    }

    /// The link dies once the peer has read what is already in flight (a
    /// kill drops that at once, and the peer's reader only runs later).
    fn kill_soon(self: &Arc<Self>) {
        let ctl = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ctl.kill();
        });
    }
}

type Queued = (Instant, Option<Bytes>);

enum Out {
    Direct(<MemLink as Link>::Tx),
    /// A forwarding task delivers each payload at its time; `None` closes.
    Delayed(mpsc::UnboundedSender<Queued>),
}

struct NetTx {
    out: Out,
    ctl: Arc<Ctl>,
    sent: usize,
    /// Over its budget: nothing more gets through.
    spent: bool,
}

struct NetRx {
    inner: <MemLink as Link>::Rx,
    ctl: Arc<Ctl>,
    received: usize,
}

struct NetLink(NetTx, NetRx);

impl Link for NetLink {
    type Tx = NetTx;
    type Rx = NetRx;
    fn split(self) -> (NetTx, NetRx) {
        (self.0, self.1)
    }
}

impl LinkTx for NetTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        let first = self.sent == 0;
        self.sent += 1;
        if self.ctl.killer.is_killed() || self.spent {
            return Err(LinkError::Reset);
        }
        if !first && self.ctl.plan.blackhole_up {
            return Ok(());
        }
        if is_close_frame(&payload) && self.ctl.net.swallow_close_up.swap(false, Ordering::SeqCst) {
            self.ctl.net.swallowed_closes.fetch_add(1, Ordering::SeqCst);
            self.ctl.kill();
            return Err(LinkError::Reset);
        }
        if !self.ctl.carry(payload.len()) {
            // Over the budget: this payload and every later one are lost,
            // what was sent before it still arrives.
            self.spent = true;
            self.ctl.kill_soon();
            return Err(LinkError::Reset);
        }
        match &mut self.out {
            Out::Direct(tx) => tx.feed(payload).await,
            Out::Delayed(queue) => {
                let plan = &self.ctl.plan;
                let delay = match plan.hold_hello {
                    Some(hold) if first => hold,
                    _ => plan.latency_up,
                };
                queue
                    .send((Instant::now() + delay, Some(payload)))
                    .map_err(|_| LinkError::Reset)
            }
        }
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        match &mut self.out {
            Out::Direct(tx) => tx.flush().await,
            Out::Delayed(_) if self.ctl.killer.is_killed() => Err(LinkError::Reset),
            Out::Delayed(_) => Ok(()),
        }
    }

    async fn close(&mut self) -> Result<(), LinkError> {
        match &mut self.out {
            Out::Direct(tx) => tx.close().await,
            Out::Delayed(queue) => queue
                .send((Instant::now() + self.ctl.plan.latency_up, None))
                .map_err(|_| LinkError::Reset),
        }
    }
}

impl LinkRx for NetRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        let Some(payload) = self.inner.recv().await? else {
            return Ok(None);
        };
        let first = self.received == 0;
        self.received += 1;
        let net = &self.ctl.net;
        if first && self.ctl.plan.lose_server_hello {
            net.lost_server_hellos.fetch_add(1, Ordering::SeqCst);
            self.ctl.kill();
            return Err(LinkError::Reset);
        }
        if is_close_frame(&payload) && net.swallow_close_down.swap(false, Ordering::SeqCst) {
            net.swallowed_closes.fetch_add(1, Ordering::SeqCst);
            self.ctl.kill();
            return Err(LinkError::Reset);
        }
        if !self.ctl.carry(payload.len()) {
            self.ctl.kill();
            return Err(LinkError::Reset);
        }
        Ok(Some(payload))
    }

    fn set_max_payload(&mut self, max: usize) {
        self.inner.set_max_payload(max);
    }
}

impl Connector for Net {
    type Link = NetLink;
    async fn connect(&self) -> Result<NetLink, LinkError> {
        let delay = *self.state.connect_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.state.refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        }
        let link = self.inner.connect().await?;
        let idx = self.state.links.fetch_add(1, Ordering::SeqCst);
        let plan = self
            .state
            .plans
            .lock()
            .unwrap()
            .remove(&idx)
            .unwrap_or_else(|| self.state.default_plan.lock().unwrap().clone());
        let ctl = Arc::new(Ctl {
            killer: link.killer(),
            plan: plan.clone(),
            carried: AtomicUsize::new(0),
            net: self.state.clone(),
        });
        if let Some(lifetime) = plan.lifetime {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                tokio::time::sleep(lifetime).await;
                ctl.kill();
            });
        }
        let (tx, rx) = link.split();
        let out = if plan.hold_hello.is_some() || !plan.latency_up.is_zero() {
            let (queue, mut queued) = mpsc::unbounded_channel::<Queued>();
            tokio::spawn(async move {
                let mut tx = tx;
                // Delivers what was queued even after the client dropped
                // its half (a hello in flight still arrives), then drops
                // the link.
                while let Some((at, payload)) = queued.recv().await {
                    tokio::time::sleep_until(at).await;
                    let sent = match payload {
                        Some(p) => tx.send(p).await,
                        None => tx.close().await,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
            Out::Delayed(queue)
        } else {
            Out::Direct(tx)
        };
        Ok(NetLink(
            NetTx {
                out,
                ctl: ctl.clone(),
                sent: 0,
                spent: false,
            },
            NetRx {
                inner: rx,
                ctl,
                received: 0,
            },
        ))
    }
}

// ---- sessions, messages, and checks ----

/// A server on `listener` and a client through `net`, with the session the
/// server accepted.
async fn connect<S>(
    listener: MemListener,
    net: &Net,
    client_cfg: Config,
    server_cfg: Config,
) -> (Server<S>, StableConduit<S>, StableConduit<S>)
where
    S: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let server = Server::<S>::new(listener, server_cfg);
    let client = StableConduit::<S>::connect(net.clone(), client_cfg)
        .await
        .unwrap();
    let session = timeout(Duration::from_secs(10), server.accept())
        .await
        .expect("the server never handed out the session")
        .unwrap();
    (server, client, session)
}

async fn setup(
    client_cfg: Config,
    server_cfg: Config,
) -> (Server<Msg>, Net, StableConduit<Msg>, StableConduit<Msg>) {
    let (listener, net) = net();
    let (server, client, session) = connect(listener, &net, client_cfg, server_cfg).await;
    (server, net, client, session)
}

/// Message `idx` of `stream`, with a payload derived from both.
fn msg(stream: u32, idx: u64) -> Msg {
    (stream, idx, common::payload(9, stream, idx, 300))
}

/// Message `idx` of `stream` with a payload of exactly `len` bytes.
fn sized(stream: u32, idx: u64, len: usize) -> Msg {
    let bytes = (0..len)
        .map(|i| (idx as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    (stream, idx, bytes)
}

/// How a receiver ended.
#[derive(Debug, PartialEq)]
enum End {
    /// `Ok(None)`: the session ended cleanly.
    Clean,
    /// An error, as text.
    Failed(String),
    /// Nothing more within the deadline.
    Stuck,
}

/// Receives until the end of the stream, an error, or `deadline` passed.
async fn drain(rx: &mut StableReceiver<Msg>, deadline: Duration) -> (Vec<Msg>, End) {
    let until = Instant::now() + deadline;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Ok(Some(m))) => got.push(m),
            Ok(Ok(None)) => return (got, End::Clean),
            Ok(Err(e)) => return (got, End::Failed(e.to_string())),
            Err(_) => return (got, End::Stuck),
        }
    }
}

/// Receives up to `n` messages; returns them and, if it stopped short, how.
async fn drain_n(
    rx: &mut StableReceiver<Msg>,
    n: usize,
    deadline: Duration,
) -> (Vec<Msg>, Option<End>) {
    let until = Instant::now() + deadline;
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Ok(Some(m))) => got.push(m),
            Ok(Ok(None)) => return (got, Some(End::Clean)),
            Ok(Err(e)) => return (got, Some(End::Failed(e.to_string()))),
            Err(_) => return (got, Some(End::Stuck)),
        }
    }
    (got, None)
}

/// Receives exactly `n` messages, or says what happened instead.
async fn recv_n(rx: &mut StableReceiver<Msg>, n: usize, deadline: Duration) -> Vec<Msg> {
    let until = Instant::now() + deadline;
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Ok(Some(m))) => got.push(m),
            other => panic!(
                "after {} of {n} messages the receiver gave {other:?}",
                got.len()
            ),
        }
    }
    got
}

/// Fails on the first message that differs from `expected` (lost,
/// duplicated, reordered, corrupted), and on any missing or extra one.
fn check_exact(what: &str, got: &[Msg], expected: &[Msg]) {
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            g == e,
            "{what}: message {i} is ({}, {}) with {} bytes, expected ({}, {}) with {} bytes",
            g.0,
            g.1,
            g.2.len(),
            e.0,
            e.1,
            e.2.len()
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "{what}: received {} messages, expected {}",
        got.len(),
        expected.len()
    );
}

/// Fails unless the receiver delivered exactly `expected` and then ended
/// cleanly; every message says how it ended.
fn check_drained(what: &str, got: &[Msg], end: &End, expected: &[Msg]) {
    check_exact(&format!("{what} (then {end:?})"), got, expected);
    assert_eq!(
        *end,
        End::Clean,
        "{what}: every message, then not a clean end"
    );
}

async fn wait_state(
    conduit_states: &mut tokio::sync::watch::Receiver<ConduitState>,
    s: ConduitState,
) {
    timeout(
        Duration::from_secs(10),
        conduit_states.wait_for(|now| *now == s),
    )
    .await
    .unwrap_or_else(|_| panic!("never reached {s:?}"))
    .unwrap();
}

// ---- 1. dropping every handle while the link is down ----

/// `dropper` sends while its link is down and unreachable, then drops every
/// handle; once the network is back, `reader`'s application gets every
/// message, then the end of the stream, and its own close completes.
async fn drop_every_handle_while_down(
    net: &Net,
    dropper: StableConduit<Msg>,
    reader: StableConduit<Msg>,
    stream: u32,
    who: &str,
) {
    let (rtx, mut rrx) = reader.split();
    dropper.send(&msg(stream, 0)).await.unwrap();
    check_exact(
        "before the cut",
        &recv_n(&mut rrx, 1, Duration::from_secs(5)).await,
        &[msg(stream, 0)],
    );

    let mut states = dropper.state_changes();
    net.refuse(true);
    net.kill_all();
    wait_state(&mut states, ConduitState::Reconnecting).await;
    let sent: Vec<Msg> = (1..=50).map(|i| msg(stream, i)).collect();
    for m in &sent {
        dropper.send(m).await.unwrap();
    }
    drop(dropper);
    tokio::time::sleep(Duration::from_secs(1)).await;
    net.refuse(false);

    let (got, end) = drain(&mut rrx, Duration::from_secs(30)).await;
    check_drained(
        &format!("{who}, after its peer dropped its handles"),
        &got,
        &end,
        &sent,
    );
    let closed = timeout(Duration::from_secs(15), rtx.close()).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the {who}'s close after its peer's: {closed:?}"
    );
}

/// The client sends while it cannot reconnect and drops every handle: when
/// the network comes back, the server's application gets every message,
/// then the end of the stream.
#[tokio::test(start_paused = true)]
async fn finding_1_client_drops_every_handle_while_reconnecting() {
    let mut server_cfg = config(11);
    server_cfg = server_cfg.resume_window(Duration::from_secs(20));
    let (_server, net, client, session) = setup(config(11), server_cfg).await;
    drop_every_handle_while_down(&net, client, session, 0, "server").await;
}

/// The mirror: the server's application sends while its client is away and
/// drops every handle; the client, once back, gets every message, then the
/// end of the stream.
#[tokio::test(start_paused = true)]
async fn finding_1_server_drops_every_handle_while_waiting_for_a_resume() {
    let (_server, net, client, session) = setup(config(12), config(12)).await;
    drop_every_handle_while_down(&net, session, client, 1, "client").await;
}

// ---- 2. a close racing a cut ----

/// The server's close frame dies with its link: the server's close() still
/// returns Ok, and the client, after resuming, gets every message and then
/// the end of the stream (never a rejected resume).
#[tokio::test(start_paused = true)]
async fn finding_2_server_close_frame_lost_with_its_link() {
    let (_server, net, client, session) = setup(config(21), config(21)).await;
    let (ctx, mut crx) = client.split();
    let reader = tokio::spawn(async move {
        let drained = drain(&mut crx, Duration::from_secs(30)).await;
        (drained, crx)
    });
    let (stx, _srx) = session.split();
    let sent: Vec<Msg> = (0..20).map(|i| msg(1, i)).collect();
    for m in &sent {
        stx.send(m).await.unwrap();
    }
    net.swallow_next_server_close();
    let closed = timeout(Duration::from_secs(30), stx.close())
        .await
        .expect("the server's close() never returned");
    assert!(closed.is_ok(), "the server's close() = {closed:?}");
    let ((got, end), _crx) = reader.await.unwrap();
    assert_eq!(net.swallowed_closes(), 1, "no close frame was swallowed");
    check_drained(
        "client, after the server's close() returned Ok",
        &got,
        &end,
        &sent,
    );
    let closed = timeout(Duration::from_secs(15), ctx.close()).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the client's close: {closed:?}"
    );
}

/// The client's close frame dies with its link: the client's close() still
/// returns Ok, and the server gets every message and then the end of the
/// stream (never an expired session).
#[tokio::test(start_paused = true)]
async fn finding_2_client_close_frame_lost_with_its_link() {
    let mut server_cfg = config(22);
    server_cfg = server_cfg.resume_window(Duration::from_secs(10));
    let (_server, net, client, session) = setup(config(22), server_cfg).await;
    let (stx, mut srx) = session.split();
    let reader = tokio::spawn(async move {
        let drained = drain(&mut srx, Duration::from_secs(30)).await;
        (drained, srx)
    });
    let sent: Vec<Msg> = (0..20).map(|i| msg(0, i)).collect();
    for m in &sent {
        client.send(m).await.unwrap();
    }
    net.swallow_next_client_close();
    let closed = timeout(Duration::from_secs(30), client.close())
        .await
        .expect("the client's close() never returned");
    assert!(closed.is_ok(), "the client's close() = {closed:?}");
    let ((got, end), _srx) = reader.await.unwrap();
    assert_eq!(net.swallowed_closes(), 1, "no close frame was swallowed");
    check_drained(
        "server, after the client's close() returned Ok",
        &got,
        &end,
        &sent,
    );
    let closed = timeout(Duration::from_secs(15), stx.close()).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the server's close: {closed:?}"
    );
}

// ---- 3. a stale resume hello ----

/// The client's first resume attempt times out, but its hello (with the
/// old key) is still in flight and reaches the server after the next
/// attempt succeeded and before the client proved its fresh key there. The
/// stale hello must not revoke the fresh key: no message lost, no
/// `SessionLost`.
#[tokio::test(start_paused = true)]
async fn finding_3_a_late_resume_hello_does_not_revoke_the_live_key() {
    let mut client_cfg = config(31);
    client_cfg = client_cfg.handshake_timeout(Duration::from_secs(1));
    // The server waits longer for a hello than the client for an answer.
    let (_server, net, client, session) = setup(client_cfg, config(31)).await;
    let (ctx, mut crx) = client.split();
    let (stx, mut srx) = session.split();
    // Traffic on the first link: the server knows the client holds its key.
    ctx.send(&msg(0, 0)).await.unwrap();
    stx.send(&msg(1, 0)).await.unwrap();
    check_exact(
        "server",
        &recv_n(&mut srx, 1, Duration::from_secs(5)).await,
        &[msg(0, 0)],
    );
    check_exact(
        "client",
        &recv_n(&mut crx, 1, Duration::from_secs(5)).await,
        &[msg(1, 0)],
    );

    // Link 1: the resume hello arrives after 1.5 s, when the client gave
    // up on it at 1 s. Link 2: the hello arrives at once, and what the
    // client sends next (the proof that it got the fresh key) takes 1 s, so
    // the stale hello reaches the server in between.
    net.plan(
        1,
        Plan {
            hold_hello: Some(Duration::from_millis(1500)),
            ..Plan::default()
        },
    );
    net.plan(
        2,
        Plan {
            hold_hello: Some(Duration::ZERO),
            latency_up: Duration::from_secs(1),
            ..Plan::default()
        },
    );
    net.kill_all();
    let up: Vec<Msg> = (1..20).map(|i| msg(0, i)).collect();
    let down: Vec<Msg> = (1..20).map(|i| msg(1, i)).collect();
    for (u, d) in up.iter().zip(&down) {
        ctx.send(u).await.unwrap();
        stx.send(d).await.unwrap();
    }
    let (got_down, end) = drain_n(&mut crx, down.len(), Duration::from_secs(30)).await;
    check_exact(&format!("client (stopped: {end:?})"), &got_down, &down);
    // Past the late hello's arrival: the session goes on, both ways, and
    // what the client sent during the cut arrives.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(net.links() >= 3, "the late hello was never sent");
    let sent = ctx.send(&msg(0, 20)).await;
    assert!(
        sent.is_ok(),
        "the client's send after the late hello: {sent:?}"
    );
    stx.send(&msg(1, 20)).await.unwrap();
    let (got, end) = drain_n(&mut crx, 1, Duration::from_secs(30)).await;
    check_exact(
        &format!("client, after the late hello (stopped: {end:?})"),
        &got,
        &[msg(1, 20)],
    );
    let all_up: Vec<Msg> = (1..=20).map(|i| msg(0, i)).collect();
    let (got_up, end) = drain_n(&mut srx, all_up.len(), Duration::from_secs(30)).await;
    check_exact(&format!("server (stopped: {end:?})"), &got_up, &all_up);
    assert_ne!(ctx.stats().state, ConduitState::Lost);
    assert_ne!(stx.stats().state, ConduitState::Lost);
}

// ---- 4. a slow reader and keepalive ----

/// The server's application reads one message every 200 ms with a tiny
/// receive queue, for 20 s, over a link with no fault at all: keepalive
/// must never declare that link dead, on either side.
#[tokio::test(start_paused = true)]
async fn finding_4_a_slow_reader_keeps_its_healthy_link() {
    let mut client_cfg = config(41);
    client_cfg = client_cfg.keepalive(Duration::from_secs(1), Duration::from_secs(3));
    let mut server_cfg = client_cfg.clone();
    server_cfg = server_cfg.max_recv_queue_bytes(4 * 1024);
    let (_server, _net, client, session) = setup(client_cfg, server_cfg).await;
    let (ctx, _crx) = client.split();
    let (stx, mut srx) = session.split();
    let sent: Vec<Msg> = (0..100).map(|i| sized(0, i, 1000)).collect();
    let sender = {
        let (ctx, sent) = (ctx.clone(), sent.clone());
        tokio::spawn(async move {
            for m in &sent {
                ctx.send(m).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The client keeps within the server's receive bound (announced in
    // its window frame), so the queue fills up to it and no further.
    let queued = stx.stats().recv_queue_bytes;
    assert!(
        queued > 2 * 1024 && queued <= 4 * 1024 + 1100,
        "the receive queue holds {queued} bytes: not filled up to its bound of 4 KiB, \
         or over it by more than one message"
    );
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got.extend(recv_n(&mut srx, 1, Duration::from_secs(30)).await);
    }
    sender.await.unwrap();
    check_exact("slow server", &got, &sent);
    let (c, s) = (ctx.stats(), stx.stats());
    assert_eq!(
        [
            (c.keepalive_timeouts, c.reconnects),
            (s.keepalive_timeouts, s.reconnects)
        ],
        [(0, 0), (0, 0)],
        "(keepalive timeouts, reconnects) of [client, server] on a healthy link with a slow reader"
    );
}

// ---- 5. close and the messages in flight toward the closer ----

/// The server closes while the client is still sending over a link with
/// 10 ms of latency. The server keeps reading after its close: every
/// message the client's send accepted reaches it, then the end of the
/// stream; the client's sends after the close fail with `Error::PeerClosed`.
#[tokio::test(start_paused = true)]
async fn finding_5_close_delivers_every_message_the_peer_accepted() {
    let (listener, net) = net();
    net.plan_all(Plan {
        latency_up: Duration::from_millis(10),
        ..Plan::default()
    });
    let (_server, client, session) = connect::<Msg>(listener, &net, config(51), config(51)).await;
    let (ctx, mut crx) = client.split();
    let sender = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for i in 0.. {
            let m = msg(0, i);
            match ctx.send(&m).await {
                Ok(()) => accepted.push(m),
                Err(Error::PeerClosed) => break,
                Err(e) => panic!("send {i} failed with {e}, not PeerClosed"),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let after = ctx.send(&msg(0, u64::MAX)).await;
        (accepted, after)
    });
    let (stx, mut srx) = session.split();
    let mut got = recv_n(&mut srx, 50, Duration::from_secs(10)).await;
    let closing = tokio::spawn(async move { stx.close().await });
    let (rest, end) = drain(&mut srx, Duration::from_secs(30)).await;
    got.extend(rest);
    let (accepted, after) = timeout(Duration::from_secs(10), sender)
        .await
        .expect("the client's sends never failed with PeerClosed after the server's close")
        .unwrap();
    assert!(
        accepted.len() > 50,
        "no message was in flight toward the server when it closed"
    );
    check_drained("server, which closed", &got, &end, &accepted);
    assert!(
        matches!(after, Err(Error::PeerClosed)),
        "a send after the close: {after:?}"
    );
    let closed = timeout(Duration::from_secs(15), closing).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "the server's close(): {closed:?}"
    );
    let (_, end) = drain(&mut crx, Duration::from_secs(5)).await;
    assert_eq!(end, End::Clean, "the client's receiver");
}

// ---- 6. links shorter than one message ----

/// An 8,000,000-byte message through links that die after carrying
/// 256 KiB each: it is delivered (in pieces that survive the cuts), and so
/// is the message after it.
#[tokio::test(start_paused = true)]
async fn finding_6_a_large_message_crosses_links_shorter_than_itself() {
    let (listener, net) = net();
    net.plan_all(Plan {
        budget: Some(256 * 1024),
        ..Plan::default()
    });
    net.connect_delay(Duration::from_millis(5));
    let mut client_cfg = config(61);
    client_cfg = client_cfg.fragment_size(64 * 1024);
    let (_server, client, mut session) =
        connect::<Vec<u8>>(listener, &net, client_cfg, config(61)).await;
    let big: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
    client.send(&big).await.unwrap();
    // The replay buffer is over its bound now: this send waits for the ack
    // of the large one.
    let (ctx, _crx) = client.split();
    let small = tokio::spawn(async move { ctx.send(&vec![1, 2, 3]).await });
    let got = timeout(Duration::from_secs(60), session.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the 8 MB message was not delivered within 60 s ({} links made, {} killed)",
                net.links(),
                net.kills()
            )
        })
        .unwrap()
        .unwrap();
    assert!(got == big, "the large message arrived corrupted");
    let next = timeout(Duration::from_secs(10), session.recv()).await;
    assert!(
        matches!(&next, Ok(Ok(Some(v))) if *v == [1, 2, 3]),
        "the message after it: {next:?}"
    );
    let small = timeout(Duration::from_secs(10), small).await;
    assert!(
        matches!(small, Ok(Ok(Ok(())))),
        "the send after the large message: {small:?}"
    );
    assert!(
        net.kills() >= 20,
        "only {} links died: they were not shorter than the message",
        net.kills()
    );
}

// ---- 7. a lost ServerHello without keepalive ----

/// Without KEEPALIVE (acks and close only, or the base format), the first
/// ServerHello is lost with its link: the client opens another session, and
/// accept() hands out exactly one session, the live one, never the orphan
/// (not even when it expires).
#[tokio::test(start_paused = true)]
async fn finding_7_a_session_whose_server_hello_was_lost_is_never_accepted() {
    for (seed, bits) in [(71, ext::ACKS | ext::CLOSE), (72, 0)] {
        let mut client_cfg = config(seed);
        client_cfg = client_cfg.extensions(bits);
        let mut server_cfg = client_cfg.clone();
        server_cfg = server_cfg.resume_window(Duration::from_secs(10));
        let (listener, net) = net();
        net.plan(
            0,
            Plan {
                lose_server_hello: true,
                ..Plan::default()
            },
        );
        let server = Server::<Msg>::new(listener, server_cfg);
        let client = StableConduit::<Msg>::connect(net.clone(), client_cfg)
            .await
            .unwrap();
        let (ctx, mut crx) = client.split();
        assert_eq!(
            (net.lost_server_hellos(), net.links()),
            (1, 2),
            "extensions {bits:#x}: (lost server hellos, links)"
        );
        ctx.send(&msg(0, 0)).await.unwrap();
        let session = timeout(Duration::from_secs(5), server.accept())
            .await
            .unwrap_or_else(|_| panic!("extensions {bits:#x}: no session handed out"))
            .unwrap();
        let (stx, mut srx) = session.split();
        let first = timeout(Duration::from_secs(3), srx.recv()).await;
        assert!(
            matches!(&first, Ok(Ok(Some(m))) if *m == msg(0, 0)),
            "extensions {bits:#x}: the session accept() handed out is not the client's: {first:?}"
        );
        let second = timeout(Duration::from_secs(15), server.accept()).await;
        assert!(
            second.is_err(),
            "extensions {bits:#x}: accept() handed out a second session (the orphan)"
        );
        stx.send(&msg(1, 0)).await.unwrap();
        check_exact(
            "client",
            &recv_n(&mut crx, 1, Duration::from_secs(5)).await,
            &[msg(1, 0)],
        );
    }
}

// ---- 8a. a stale piggybacked ack in the base format ----

/// The next payload from the server, to a raw peer.
async fn raw_recv(rx: &mut <MemLink as Link>::Rx) -> Bytes {
    match timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Ok(Some(payload))) => payload,
        other => panic!("the raw peer expected a payload from the server, got {other:?}"),
    }
}

fn raw_frame(seq: u32, ack: Option<u32>, m: &Msg) -> Bytes {
    let mut buf = BytesMut::new();
    let header = FrameHeader {
        seq: Seq(seq),
        ack: ack.map(Seq),
    };
    encode_frame(&header, m, &mut buf).unwrap();
    buf.freeze()
}

/// A base-format peer (no extensions) whose frames carry piggybacked acks
/// far outside the window, as a frame replayed 2^31 frames later would: the
/// tether side ignores them (no protocol violation), honours the valid ack
/// after them, and the session goes on.
#[tokio::test(start_paused = true)]
async fn finding_8a_a_stale_piggybacked_ack_is_ignored() {
    let (listener, c) = mem::listener(16);
    let server = Server::<Msg>::new(listener, config(81));
    let (mut tx, mut rx) = c.connect().await.unwrap().split();
    let hello = ClientHello {
        resume_key: None,
        last_received: None,
        extensions: 0,
    };
    tx.send(Bytes::copy_from_slice(&hello.encode()))
        .await
        .unwrap();
    let answer = ServerHello::decode(&raw_recv(&mut rx).await).unwrap();
    assert!(!answer.rejected);
    assert_eq!(answer.extensions, 0, "not the base format");
    tx.send(raw_frame(0, None, &msg(0, 0))).await.unwrap();
    let session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    let (stx, mut srx) = session.split();
    check_exact(
        "server",
        &recv_n(&mut srx, 1, Duration::from_secs(5)).await,
        &[msg(0, 0)],
    );

    // The server sends seqs 0, 1, 2.
    for i in 0..3 {
        stx.send(&msg(1, i)).await.unwrap();
    }
    for i in 0..3u32 {
        let payload = raw_recv(&mut rx).await;
        let (header, m) = decode_frame::<Msg>(&payload).unwrap();
        assert_eq!((header.seq, m), (Seq(i), msg(1, u64::from(i))));
    }
    // Acks far beyond what the server sent, and far before its window,
    // then a valid one for all three.
    tx.send(raw_frame(1, Some(2 + 0x7000_0000), &msg(0, 1)))
        .await
        .unwrap();
    tx.send(raw_frame(
        2,
        Some(2u32.wrapping_sub(0x7000_0000)),
        &msg(0, 2),
    ))
    .await
    .unwrap();
    tx.send(raw_frame(3, Some(2), &msg(0, 3))).await.unwrap();
    let (got, end) = drain_n(&mut srx, 3, Duration::from_secs(5)).await;
    check_exact(
        &format!("server (stopped: {end:?})"),
        &got,
        &[msg(0, 1), msg(0, 2), msg(0, 3)],
    );
    assert_eq!(
        stx.stats().replay_frames,
        0,
        "the valid ack after the stale ones freed nothing"
    );
    stx.send(&msg(1, 3)).await.unwrap();
    let payload = raw_recv(&mut rx).await;
    let (header, m) = decode_frame::<Msg>(&payload).unwrap();
    assert_eq!((header.seq, m), (Seq(3), msg(1, 3)));
}

// ---- 8b. resume trims by consumption, not reception ----

/// The server's application stalls (reads nothing) while the client keeps
/// sending with a 32 KiB replay bound, across 5 cuts: what waits at the
/// stalled server never exceeds about that bound, because a resume does
/// not free what was received but not consumed. Then everything the
/// client's send accepted is delivered, once and in order.
#[tokio::test(start_paused = true)]
async fn finding_8b_a_stalled_reader_stays_bounded_across_cuts() {
    const REPLAY: usize = 32 * 1024;
    let mut client_cfg = config(82);
    client_cfg = client_cfg.max_replay(REPLAY, 1024);
    let (_server, net, client, session) = setup(client_cfg, config(82)).await;
    let (ctx, _crx) = client.split();
    let (stx, mut srx) = session.split();
    let accepted = Arc::new(AtomicU64::new(0));
    let sender = {
        let (ctx, accepted) = (ctx.clone(), accepted.clone());
        tokio::spawn(async move {
            for i in 0.. {
                ctx.send(&sized(0, i, 1000)).await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let bound = REPLAY + 2 * 1024;
    let mut peak = 0;
    for cut in 0..=5u64 {
        // Sample what waits at the stalled server while traffic settles.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            peak = peak.max(stx.stats().recv_queue_bytes);
        }
        assert!(
            peak <= bound,
            "after {cut} cuts the stalled reader holds {peak} bytes, over the sender's \
             replay bound of {REPLAY} (+ one message)"
        );
        if cut < 5 {
            net.kill_all();
            timeout(Duration::from_secs(10), async {
                while ctx.stats().reconnects < cut + 1 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the client did not resume after cut {}", cut + 1));
        }
    }
    sender.abort();
    let _ = sender.await;
    let n = accepted.load(Ordering::SeqCst);
    assert!(
        n >= 30,
        "the client sent only {n} messages: not enough to fill its window"
    );
    let expected: Vec<Msg> = (0..n).map(|i| sized(0, i, 1000)).collect();
    let got = recv_n(&mut srx, expected.len(), Duration::from_secs(30)).await;
    check_exact("stalled server", &got, &expected);
    let extra = timeout(Duration::from_millis(500), srx.recv()).await;
    assert!(extra.is_err(), "more than was sent arrived: {extra:?}");
}

// ---- 8c. close_timeout bounds the whole close ----

/// The client closes with messages the server never received, over links
/// that each swallow what the client sends and die after 500 ms: close()
/// returns `SessionLost::CloseTimedOut` about `close_timeout` (2 s) after
/// it began, not a fresh timeout per link, and reports the undelivered
/// messages.
#[tokio::test(start_paused = true)]
async fn finding_8c_close_timeout_bounds_the_whole_close() {
    let mut client_cfg = config(83);
    client_cfg = client_cfg.close_timeout(Duration::from_secs(2));
    let (_server, net, client, _session) = setup(client_cfg, config(83)).await;
    let (ctx, _crx) = client.split();
    net.plan_all(Plan {
        blackhole_up: true,
        lifetime: Some(Duration::from_millis(500)),
        ..Plan::default()
    });
    let mut states = ctx.state_changes();
    net.kill_all();
    wait_state(&mut states, ConduitState::Resumed).await;
    for i in 0..5 {
        ctx.send(&msg(0, i)).await.unwrap();
    }
    let started = Instant::now();
    let closed = timeout(Duration::from_secs(4), ctx.close()).await;
    let took = started.elapsed();
    let result = closed.unwrap_or_else(|_| {
        panic!(
            "close() had not returned {took:?} after it began (close_timeout 2 s; {} links \
             died meanwhile)",
            net.kills()
        )
    });
    let err = result.expect_err("a close that could not complete returned Ok");
    assert!(
        is_close_timed_out(&err),
        "close() failed with {err}, not CloseTimedOut"
    );
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_millis(2500),
        "close() returned after {took:?}, not about close_timeout (2 s)"
    );
    assert!(
        net.kills() >= 4,
        "links did not keep dying during the close"
    );
    assert_eq!(
        undelivered(&ctx.stats()),
        5,
        "the messages the server never acknowledged"
    );
}
