//! In-memory links: two bounded channels, one per direction.
//!
//! A [`pair`] is the fastest link and the one the tests use to simulate
//! failures:
//!
//! - capacity is counted in payloads; [`feed`](LinkTx::feed) waits for a free
//!   slot (backpressure) with a cancel-safe reservation;
//! - [`MemKiller::kill`] fails the whole link, both directions and both
//!   ends, as an abrupt failure: pending and later calls return
//!   [`LinkError::Reset`], then [`LinkError::Dead`]; payloads still in
//!   flight are lost, as on a real network;
//! - a half dropped without [`close`](LinkTx::close) makes the peer's `recv`
//!   return [`LinkError::Reset`] (not `Ok(None)`), while a closed half gives
//!   the peer every earlier payload, then `Ok(None)`;
//! - [`listener`] returns a [`MemListener`] and a [`MemConnector`] for
//!   reconnect tests, with [`MemConnector::kill_all`] and
//!   [`MemConnector::set_refuse`] to inject faults.
//!
//! Payloads are passed through as [`Bytes`], never copied. Like the stream
//! links, the in-memory link refuses payloads over a maximum
//! ([`DEFAULT_MAX_PAYLOAD`] unless configured with [`MemConfig`]), so code
//! tested here behaves the same over a socket.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{Connector, Link, LinkError, LinkRx, LinkTx, Listener, Ready, DEFAULT_MAX_PAYLOAD};

/// How many connections a [`MemListener`] holds before [`MemConnector::connect`]
/// waits for an `accept`.
const ACCEPT_BACKLOG: usize = 64;

/// Settings of an in-memory link.
#[derive(Clone, Debug)]
pub struct MemConfig {
    /// Payloads that can be in flight per direction before `feed` waits.
    /// Default 64; a capacity of 0 is treated as 1.
    pub capacity: usize,
    /// Largest payload accepted by `feed` and `recv` (which
    /// [`LinkRx::set_max_payload`] can lower). Default
    /// [`DEFAULT_MAX_PAYLOAD`] (8 MiB), like the stream links.
    pub max_payload: usize,
}

impl Default for MemConfig {
    fn default() -> Self {
        MemConfig {
            capacity: 64,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Creates two connected in-memory links, with room for `capacity` payloads
/// in flight per direction (0 is treated as 1) and the default maximum
/// payload size.
pub fn pair(capacity: usize) -> (MemLink, MemLink) {
    pair_with_config(MemConfig {
        capacity,
        ..MemConfig::default()
    })
}

/// Creates two connected in-memory links with the given settings.
pub fn pair_with_config(config: MemConfig) -> (MemLink, MemLink) {
    let capacity = config.capacity.max(1);
    let switch = KillSwitch::new();
    let (a_to_b, b_from_a) = direction(capacity);
    let (b_to_a, a_from_b) = direction(capacity);
    let a = MemLink::new(a_to_b, a_from_b, &switch, config.max_payload);
    let b = MemLink::new(b_to_a, b_from_a, &switch, config.max_payload);
    (a, b)
}

/// Creates an in-memory listener and a connector that reaches it. Every
/// link created by the connector has room for `capacity` payloads in flight
/// per direction.
pub fn listener(capacity: usize) -> (MemListener, MemConnector) {
    listener_with_config(MemConfig {
        capacity,
        ..MemConfig::default()
    })
}

/// Creates an in-memory listener and a connector whose links use `config`.
pub fn listener_with_config(config: MemConfig) -> (MemListener, MemConnector) {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let connector = MemConnector {
        inner: Arc::new(ConnectorInner {
            accept: tx,
            config,
            refuse: AtomicBool::new(false),
            killers: Mutex::new(Vec::new()),
        }),
    };
    (MemListener { incoming: rx }, connector)
}

/// State shared by the two ends of one direction.
#[derive(Debug)]
struct DirectionState {
    /// Set by the sender's `close()` before it drops its channel sender, so
    /// the receiver can tell a graceful close from a vanished peer.
    closed: AtomicBool,
}

fn direction(capacity: usize) -> (Sending, Receiving) {
    let (tx, rx) = mpsc::channel(capacity);
    let state = Arc::new(DirectionState {
        closed: AtomicBool::new(false),
    });
    (
        Sending {
            tx,
            state: state.clone(),
        },
        Receiving { rx, state },
    )
}

struct Sending {
    tx: mpsc::Sender<Bytes>,
    state: Arc<DirectionState>,
}

struct Receiving {
    rx: mpsc::Receiver<Bytes>,
    state: Arc<DirectionState>,
}

/// The abrupt-failure switch shared by both ends of one link.
///
/// Each half holds the sender (so the channel outlives every waiter) and
/// its own receiver (so a pending call wakes up when the switch flips).
#[derive(Clone, Debug)]
struct KillSwitch {
    tx: Arc<watch::Sender<bool>>,
}

impl KillSwitch {
    fn new() -> Self {
        KillSwitch {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    fn kill(&self) {
        self.tx.send_replace(true);
    }

    fn is_killed(&self) -> bool {
        *self.tx.borrow()
    }

    /// Whether any half of the link still exists.
    fn has_halves(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

/// Resolves once the switch is flipped. Cancel-safe.
async fn killed(watcher: &mut watch::Receiver<bool>) {
    // The half owning `watcher` also owns the sender, so the channel cannot
    // close under us; an error would only mean "nobody can kill any more",
    // and then the caller's other branch decides.
    if watcher.wait_for(|killed| *killed).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxState {
    Open,
    Closed,
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    Open,
    Eof,
    Dead,
}

/// One end of an in-memory link. Split it with [`Link::split`].
#[derive(Debug)]
pub struct MemLink {
    tx: MemTx,
    rx: MemRx,
}

impl MemLink {
    fn new(out: Sending, inc: Receiving, switch: &KillSwitch, max_payload: usize) -> Self {
        MemLink {
            tx: MemTx {
                tx: Some(out.tx),
                direction: out.state,
                switch: switch.clone(),
                watcher: switch.tx.subscribe(),
                state: TxState::Open,
                max_payload,
            },
            rx: MemRx {
                rx: inc.rx,
                direction: inc.state,
                switch: switch.clone(),
                watcher: switch.tx.subscribe(),
                state: RxState::Open,
                max_payload,
                configured_max: max_payload,
            },
        }
    }

    /// A handle that kills this link (both ends, both directions) on demand.
    pub fn killer(&self) -> MemKiller {
        MemKiller {
            switch: self.tx.switch.clone(),
        }
    }
}

impl Link for MemLink {
    type Tx = MemTx;
    type Rx = MemRx;

    fn split(self) -> (MemTx, MemRx) {
        (self.tx, self.rx)
    }
}

/// Kills one in-memory link as an abrupt failure. Cloneable; outlives the
/// link harmlessly.
#[derive(Clone, Debug)]
pub struct MemKiller {
    switch: KillSwitch,
}

impl MemKiller {
    /// Fails the whole link in both directions for both ends: pending and
    /// later `recv`, `feed`, `flush` and `close` calls return
    /// [`LinkError::Reset`] once per half, then [`LinkError::Dead`].
    /// Payloads still in flight are dropped. Idempotent.
    pub fn kill(&self) {
        self.switch.kill();
    }

    /// Whether [`kill`](MemKiller::kill) was called.
    pub fn is_killed(&self) -> bool {
        self.switch.is_killed()
    }
}

/// The sending half of an in-memory link.
pub struct MemTx {
    /// `None` once closed: dropping the channel sender is the end-of-stream.
    tx: Option<mpsc::Sender<Bytes>>,
    direction: Arc<DirectionState>,
    switch: KillSwitch,
    watcher: watch::Receiver<bool>,
    state: TxState,
    max_payload: usize,
}

impl fmt::Debug for MemTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemTx")
            .field("state", &self.state)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl MemTx {
    /// Records the first error and returns it; later calls see `Dead`.
    fn fail<T>(&mut self, err: LinkError) -> Result<T, LinkError> {
        self.state = TxState::Dead;
        self.tx = None;
        Err(err)
    }

    /// The checks shared by every operation, in priority order.
    fn check(&mut self) -> Result<(), LinkError> {
        match self.state {
            TxState::Dead => Err(LinkError::Dead),
            _ if self.switch.is_killed() => self.fail(LinkError::Reset),
            TxState::Closed => self.fail(LinkError::Closed),
            TxState::Open => Ok(()),
        }
    }
}

impl LinkTx for MemTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        self.check()?;
        if payload.len() > self.max_payload {
            let max = self.max_payload;
            return self.fail(LinkError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let Some(tx) = self.tx.as_ref() else {
            return self.fail(LinkError::Closed);
        };
        // `reserve` is cancel-safe: dropped while waiting, it holds no slot.
        let outcome = tokio::select! {
            biased;
            () = killed(&mut self.watcher) => Err(LinkError::Reset),
            permit = tx.reserve() => match permit {
                Ok(permit) => {
                    permit.send(payload);
                    Ok(())
                }
                // The peer's receiving half is gone.
                Err(_) => Err(LinkError::Reset),
            },
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(err) => self.fail(err),
        }
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        self.check()?;
        // Payloads are handed over on `feed`; there is nothing to push. A
        // vanished peer is reported here rather than never.
        match &self.tx {
            Some(tx) if tx.is_closed() => self.fail(LinkError::Reset),
            _ => Ok(()),
        }
    }

    async fn close(&mut self) -> Result<(), LinkError> {
        match self.state {
            TxState::Dead => Err(LinkError::Dead),
            _ if self.switch.is_killed() => self.fail(LinkError::Reset),
            TxState::Closed => Ok(()),
            TxState::Open => {
                // Mark the close before the channel sender goes away, so the
                // receiver, seeing the channel end, reads `closed == true`.
                self.direction.closed.store(true, Ordering::SeqCst);
                self.tx = None;
                self.state = TxState::Closed;
                Ok(())
            }
        }
    }
}

/// The receiving half of an in-memory link.
pub struct MemRx {
    rx: mpsc::Receiver<Bytes>,
    direction: Arc<DirectionState>,
    switch: KillSwitch,
    watcher: watch::Receiver<bool>,
    state: RxState,
    /// The largest payload accepted now (see [`LinkRx::set_max_payload`]).
    max_payload: usize,
    /// [`MemConfig::max_payload`].
    configured_max: usize,
}

impl fmt::Debug for MemRx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemRx")
            .field("state", &self.state)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl MemRx {
    fn fail<T>(&mut self, err: LinkError) -> Result<T, LinkError> {
        self.state = RxState::Dead;
        self.rx.close();
        Err(err)
    }
}

impl LinkRx for MemRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        if self.state == RxState::Dead {
            return Err(LinkError::Dead);
        }
        if self.switch.is_killed() {
            return self.fail(LinkError::Reset);
        }
        if self.state == RxState::Eof {
            return Ok(None);
        }
        // Both branches are cancel-safe: `mpsc::Receiver::recv` loses nothing
        // when dropped, and the kill watcher only marks a value as seen.
        let next = tokio::select! {
            biased;
            () = killed(&mut self.watcher) => None,
            message = self.rx.recv() => Some(message),
        };
        match next {
            None => self.fail(LinkError::Reset),
            Some(Some(payload)) if payload.len() > self.max_payload => {
                let max = self.max_payload;
                self.fail(LinkError::TooLarge {
                    len: payload.len(),
                    max,
                })
            }
            Some(Some(payload)) => Ok(Some(payload)),
            Some(None) if self.direction.closed.load(Ordering::SeqCst) => {
                self.state = RxState::Eof;
                Ok(None)
            }
            Some(None) => self.fail(LinkError::Reset),
        }
    }

    fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max.min(self.configured_max);
    }
}

/// Accepts in-memory links created by its [`MemConnector`]s.
#[derive(Debug)]
pub struct MemListener {
    incoming: mpsc::Receiver<MemLink>,
}

impl Listener for MemListener {
    type Link = MemLink;
    type Pending = Ready<MemLink>;

    /// Waits for the next connection (which needs no setup). Fails with an
    /// [`io::ErrorKind::NotConnected`] error once every connector is gone.
    /// Cancel-safe.
    async fn accept(&mut self) -> Result<Ready<MemLink>, LinkError> {
        self.incoming.recv().await.map(Ready).ok_or_else(|| {
            LinkError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "every MemConnector of this listener was dropped",
            ))
        })
    }
}

/// Connects to a [`MemListener`]: each [`connect`](Connector::connect)
/// creates a fresh [`pair`] and hands one end to the listener. Clones share
/// the same listener, refusal flag and kill list.
#[derive(Clone, Debug)]
pub struct MemConnector {
    inner: Arc<ConnectorInner>,
}

#[derive(Debug)]
struct ConnectorInner {
    accept: mpsc::Sender<MemLink>,
    config: MemConfig,
    refuse: AtomicBool,
    killers: Mutex<Vec<MemKiller>>,
}

impl MemConnector {
    /// Kills every link this connector (or a clone) created so far, as with
    /// [`MemKiller::kill`]. Links created later are not affected.
    pub fn kill_all(&self) {
        let killers = self.lock_killers();
        for killer in killers.iter() {
            killer.kill();
        }
    }

    /// While `refuse` is true, [`connect`](Connector::connect) fails with an
    /// [`io::ErrorKind::ConnectionRefused`] error.
    pub fn set_refuse(&self, refuse: bool) {
        self.inner.refuse.store(refuse, Ordering::SeqCst);
    }

    fn lock_killers(&self) -> std::sync::MutexGuard<'_, Vec<MemKiller>> {
        // The list stays consistent even if a holder panicked.
        self.inner
            .killers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn refused(why: &'static str) -> LinkError {
    LinkError::Io(io::Error::new(io::ErrorKind::ConnectionRefused, why))
}

impl Connector for MemConnector {
    type Link = MemLink;

    /// Creates a pair and queues one end for the listener; waits while the
    /// listener's backlog is full. Fails with
    /// [`io::ErrorKind::ConnectionRefused`] while refusing or once the
    /// listener is dropped. Cancel-safe: dropped, it delivers nothing.
    async fn connect(&self) -> Result<MemLink, LinkError> {
        if self.inner.refuse.load(Ordering::SeqCst) {
            return Err(refused("MemConnector is set to refuse connections"));
        }
        if self.inner.accept.is_closed() {
            return Err(refused("the MemListener was dropped"));
        }
        let (ours, theirs) = pair_with_config(self.inner.config.clone());
        {
            // Registered before delivery so a concurrent kill_all covers it;
            // links whose halves are all gone are forgotten here.
            let mut killers = self.lock_killers();
            killers.retain(|k| k.switch.has_halves());
            killers.push(ours.killer());
        }
        self.inner
            .accept
            .send(theirs)
            .await
            .map_err(|_| refused("the MemListener was dropped"))?;
        Ok(ours)
    }
}
