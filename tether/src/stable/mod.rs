//! Stable conduits: typed, ordered, exactly-once message channels that
//! survive link failures.
//!
//! A client builds one with [`StableConduit::connect`] from a
//! [`Connector`](crate::link::Connector); a [`Server`] hands one out per
//! session from [`Server::accept`]. Both ends behave the same: `send` never
//! fails because a link dropped (the message is kept in the replay buffer and
//! written on this link or the next), `recv` yields every message once and in
//! order, and only the loss of the whole session reaches the application, as
//! [`Error::SessionLost`].
//!
//! The sending half ([`StableSender`]) is `Clone` and can be used from many
//! tasks; the receiving half ([`StableReceiver`]) lives on one task. Sending
//! never waits on receiving or the other way round.
//!
//! Both halves, and the conduit itself, are also a `futures`
//! [`Sink`](futures_util::Sink) and [`Stream`](futures_util::Stream), for
//! `SinkExt` and `StreamExt` (`send_all`, `forward`, combinators) with the
//! guarantees of `send` and `recv`: the stream yields each message once,
//! in order, a decode error as an item, the loss of the session once and
//! then `None`; a flushed sink means every message given is in the replay
//! buffer (delivered unless the session is lost), not acknowledged; closing
//! the sink is the graceful close. See the
//! [`Sink`](StableSender#impl-Sink%3CS%3E-for-StableSender%3CS%3E) for an
//! example.

mod attach;
pub(crate) mod budget;
mod client;
mod config;
mod events;
mod inbox;
mod recv;
mod send;
mod server;
mod shared;
mod sink;

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{de::DeserializeOwned, Serialize};
use tether_proto::frame::decode_item;
use tokio::sync::watch;

use self::attach::Handles;
pub use self::config::{Config, ReconnectPolicy};
pub use self::events::{ConduitEvent, Events, LinkLoss};
use self::inbox::{Delivered, Taken};
pub use self::server::{
    Admission, Authorize, Denied, Grant, LiveSessions, Server, ServerSnapshot, ServerStats,
    SessionInfo, SessionSummary, SessionTotals, ShutdownReport,
};
use self::shared::{Shared, Terminal};
use self::sink::SinkState;
use crate::borrowed::{Borrowed, BorrowedMessage};
use crate::error::Error;

/// Where a stable conduit stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConduitState {
    /// Establishing the first link.
    Connecting,
    /// The first link is attached and frames flow.
    Connected,
    /// A later link is attached after a resume, and frames flow again.
    Resumed,
    /// The link was lost; the client is getting a new one, or the server is
    /// waiting for the client to resume.
    Reconnecting,
    /// Client: a link is attached, but nothing has arrived on it for the
    /// [stall timeout](crate::Config::stall_timeout) while the client
    /// waits for an answer. The state goes back to what it was when
    /// something arrives, or to `Reconnecting` when the link is replaced.
    Stalled,
    /// The session is lost for good (see [`SessionLost`](crate::SessionLost)).
    Lost,
    /// The session ended gracefully: closed by this side or by the peer.
    Closed,
}

/// A snapshot of a conduit's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Current state.
    pub state: ConduitState,
    /// Links replaced after the first.
    pub reconnects: u64,
    /// Frames handed to links, replays included.
    pub frames_sent: u64,
    /// Frames received and queued for the application (duplicates excluded).
    pub frames_received: u64,
    /// Frames sent again after a resume because the peer had not received
    /// them (frames first written after the resume are not counted).
    pub frames_replayed: u64,
    /// Bytes of those frames.
    pub bytes_replayed: u64,
    /// Received frames dropped as duplicates of already delivered ones.
    pub duplicates_dropped: u64,
    /// Frames in the replay buffer now (sent, not yet acknowledged).
    pub replay_frames: usize,
    /// Bytes in the replay buffer now.
    pub replay_bytes: usize,
    /// Bytes received and waiting for the application, each message
    /// counted as its length plus 64 bytes of bookkeeping (what
    /// [`Config::max_recv_queue_bytes`] bounds).
    pub recv_queue_bytes: usize,
    /// The most bytes the replay buffer ever held.
    pub max_replay_bytes: usize,
    /// Links declared dead because no pong came within the keepalive
    /// timeout.
    pub keepalive_timeouts: u64,
    /// Pongs that answered no outstanding ping (forged, replayed or late):
    /// they refreshed nothing.
    pub unsolicited_pongs: u64,
    /// Links without keepalive dropped because nothing arrived for the
    /// idle timeout.
    pub idle_timeouts: u64,
    /// Base-format links ended because a `send` waited a keepalive
    /// interval for an acknowledgement (the resume's hellos then trim the
    /// replay buffer).
    pub ack_stalls: u64,
    /// Smoothed round-trip time from keepalive pings, once one was answered.
    pub rtt: Option<std::time::Duration>,
    /// Once the session is lost: how many of the messages this side's
    /// `send` accepted the peer did not acknowledge. They are the last ones
    /// sent; every message before them reached the peer's application.
    /// 0 while the session lives and after a graceful close.
    pub undelivered: u64,
    /// Resumes with proof of possession (`PROOF`) that verified: the
    /// server checked this client's proof, and the client the server's.
    pub proof_resumes: u64,
}

/// A stable conduit: sends `S`, receives `R`.
///
/// Use it directly, or [`split`](Self::split) it into a clonable sender and a
/// receiver for separate tasks.
///
/// A client gets one from [`connect`](Self::connect), a server one per
/// session from [`Server::accept`]. Here over memory; a
/// [`TcpConnector`](crate::link::TcpConnector) (or any other
/// [`Connector`](crate::link::Connector)) works the same:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tether::Error> {
/// use tether::{link::mem, Config, Server, StableConduit};
///
/// let (listener, connector) = mem::listener(16);
/// let server = Server::<String>::new(listener, Config::default());
/// let mut client =
///     StableConduit::<String>::connect(connector.clone(), Config::default()).await?;
/// let mut session = server.accept().await.expect("a session");
///
/// client.send("ping").await?; // a &str for a conduit of String
/// connector.kill_all(); // the link dies: the client reconnects and resumes
/// assert_eq!(session.recv().await?.as_deref(), Some("ping"));
/// session.send("pong").await?;
/// assert_eq!(client.recv().await?.as_deref(), Some("pong"));
///
/// // Split: the sender is Clone (one per task), the receiver lives on one.
/// let (tx, mut rx) = client.split();
/// let tx2 = tx.clone();
/// tokio::spawn(async move { tx2.send("from a task").await });
/// assert_eq!(session.recv().await?.as_deref(), Some("from a task"));
/// session.send("to the receiver").await?;
/// assert_eq!(rx.recv().await?.as_deref(), Some("to the receiver"));
///
/// tx.close().await?; // graceful: the session reads `Ok(None)` at the end
/// assert_eq!(session.recv().await?, None);
/// # Ok(())
/// # }
/// ```
pub struct StableConduit<S, R = S> {
    tx: StableSender<S>,
    rx: StableReceiver<R>,
    info: Option<Arc<SessionInfo>>,
}

impl<S, R> std::fmt::Debug for StableConduit<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableConduit")
            .field("state", &self.tx.shared.state())
            .finish_non_exhaustive()
    }
}

impl<S, R> StableConduit<S, R> {
    pub(crate) fn from_handles(handles: Handles) -> Self {
        // The handles' two counts pass to the sender and the receiver.
        let shared = handles.into_shared();
        StableConduit {
            tx: StableSender {
                shared: shared.clone(),
                sink: SinkState::default(),
                _msg: PhantomData,
            },
            rx: StableReceiver {
                shared,
                ready: VecDeque::new(),
                consumption: recv::Consumption::default(),
                stream_ended: false,
                _msg: PhantomData,
            },
            info: None,
        }
    }

    pub(crate) fn with_info(mut self, info: Arc<SessionInfo>) -> Self {
        self.info = Some(info);
        self
    }

    /// On a server's session: who the client is (its id, peer address, and
    /// what the authorization hook decided). `None` on a client's conduit.
    /// Read it before [`split`](Self::split), which drops it.
    pub fn session_info(&self) -> Option<&Arc<SessionInfo>> {
        self.info.as_ref()
    }

    /// The public session id of a session with proof-of-possession resume
    /// (`PROOF`), on either side; `None` for a session with bearer resume
    /// keys. Not a secret: it is in every hello of the session, and links
    /// its resumes.
    pub fn session_id(&self) -> Option<tether_proto::SessionId> {
        if let Some(info) = &self.info {
            return info.session_id();
        }
        *self
            .tx
            .shared
            .session_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tests only: every resume secret this client held, if
    /// [`Config::record_secrets_for_tests`] was set (empty otherwise).
    #[doc(hidden)]
    pub fn secrets_held(&self) -> Vec<[u8; 32]> {
        match &self.tx.shared.secret_log {
            Some(log) => log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            None => Vec::new(),
        }
    }

    /// Splits into a sender (clonable) and a receiver.
    pub fn split(self) -> (StableSender<S>, StableReceiver<R>) {
        (self.tx, self.rx)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.tx.stats()
    }

    /// Watches state changes (connected, reconnecting, stalled, lost,
    /// closed).
    pub fn state_changes(&self) -> watch::Receiver<ConduitState> {
        self.tx.state_changes()
    }

    /// The conduit's events from now on: each lost link with its cause,
    /// each failed reconnect attempt with its number, error and next retry
    /// delay, each resume, stall, and the end. See [`ConduitEvent`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tether::{link::mem, Config, ConduitEvent, Server, StableConduit};
    ///
    /// let (listener, connector) = mem::listener(16);
    /// let server = Server::<String>::new(listener, Config::default());
    /// let client = StableConduit::<String>::connect(connector, Config::default()).await?;
    /// let mut events = client.events();
    /// tokio::spawn(async move {
    ///     while let Some(event) = events.next().await {
    ///         match event {
    ///             ConduitEvent::AttemptFailed { attempt, error, next_retry, .. } => {
    ///                 eprintln!("attempt {attempt} failed ({error}); next in {next_retry:?}")
    ///             }
    ///             other => eprintln!("{other:?}"),
    ///         }
    ///     }
    /// });
    /// client.send("hello").await?;
    /// # drop(server);
    /// # Ok(())
    /// # }
    /// ```
    pub fn events(&self) -> Events {
        self.tx.events()
    }

    /// Client: drops the current link and gets a new one at once, or cuts
    /// the wait before the next attempt short and starts the backoff over.
    /// Nothing is lost: the new link resumes the session. Call it when the
    /// network changed (a new interface, a wake from sleep) or the conduit
    /// is [`Stalled`](ConduitState::Stalled). No effect on a server's
    /// session (only the client can dial) or once the session ended.
    pub fn reconnect_now(&self) {
        self.tx.reconnect_now();
    }

    /// Once the session is lost: the messages the peer never acknowledged,
    /// raw; see [`StableSender::take_undelivered_raw`].
    pub fn take_undelivered_raw(&self) -> Vec<bytes::Bytes> {
        self.tx.take_undelivered_raw()
    }
}

impl<S: DeserializeOwned, R> StableConduit<S, R> {
    /// Once the session is lost: the messages the peer never acknowledged,
    /// decoded; see [`StableSender::take_undelivered`].
    pub fn take_undelivered(&self) -> Result<Vec<S>, Error> {
        self.tx.take_undelivered()
    }
}

impl<S, R> StableConduit<S, R> {
    /// Closes the session gracefully and waits until the close is complete
    /// on both sides; see [`StableSender::close`].
    ///
    /// This drops the receiving half first: messages the peer sent before
    /// it learned of the close still arrive, count as delivered and are
    /// discarded. To read them, [`split`](Self::split) the conduit, call
    /// [`StableSender::close`] and keep calling
    /// [`recv`](StableReceiver::recv) until it returns `Ok(None)`.
    pub async fn close(self) -> Result<(), Error> {
        let StableConduit { tx, rx, .. } = self;
        drop(rx);
        tx.close().await
    }
}

impl<S: Serialize, R> StableConduit<S, R> {
    /// Sends one message: an `&S`, or anything `S` borrows as (`&str` for
    /// `String`, `&[T]` for `Vec<T>`); see [`StableSender::send`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tether::{link::mem, Config, Server, StableConduit};
    ///
    /// let (listener, connector) = mem::listener(16);
    /// let server = Server::<String>::new(listener, Config::default());
    /// let client = StableConduit::<String>::connect(connector, Config::default()).await?;
    /// let mut session = server.accept().await.expect("a session");
    ///
    /// client.send("hello").await?; // a &str for a String
    /// client.send(&String::from("world")).await?; // or a &String
    /// assert_eq!(session.recv().await?.as_deref(), Some("hello"));
    /// assert_eq!(session.recv().await?.as_deref(), Some("world"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send<Q>(&self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.tx.send(msg).await
    }
}

impl<S, R: DeserializeOwned> StableConduit<S, R> {
    /// Receives one message; see [`StableReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<R>, Error> {
        self.rx.recv().await
    }
}

/// The sending half of a stable conduit. Clone it to send from several
/// tasks; messages from one task keep their order.
pub struct StableSender<S> {
    shared: Arc<Shared>,
    /// This handle's `Sink` state (each clone has its own).
    sink: SinkState,
    _msg: PhantomData<fn(&S)>,
}

impl<S> Clone for StableSender<S> {
    fn clone(&self) -> Self {
        self.shared.handle_added();
        StableSender {
            shared: self.shared.clone(),
            sink: SinkState::default(),
            _msg: PhantomData,
        }
    }
}

impl<S> Drop for StableSender<S> {
    fn drop(&mut self) {
        self.shared.handle_dropped();
    }
}

impl<S> std::fmt::Debug for StableSender<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableSender")
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

impl<S> StableSender<S> {
    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Watches state changes.
    pub fn state_changes(&self) -> watch::Receiver<ConduitState> {
        self.shared.subscribe()
    }

    /// The conduit's events from now on; see [`StableConduit::events`].
    pub fn events(&self) -> Events {
        self.shared.events.subscribe()
    }

    /// Client: a new link now; see [`StableConduit::reconnect_now`].
    pub fn reconnect_now(&self) {
        self.shared.reconnect_request.notify_waiters();
    }

    /// Once the session is lost: the messages this side's `send` accepted
    /// that the peer never acknowledged, oldest first, as raw encodings
    /// (each decodes as an `S`). [`Stats::undelivered`] counts them. Every
    /// message before them reached the peer's application; these may or may
    /// not have (a peer can consume a message and lose the link before its
    /// acknowledgement arrives), so resend them only where that is safe, or
    /// where the application can tell.
    ///
    /// Empty while the session lives, after a graceful close, and after
    /// the first call. Kept until taken or every handle is dropped (at most
    /// the replay bound).
    pub fn take_undelivered_raw(&self) -> Vec<bytes::Bytes> {
        self.shared.take_undelivered()
    }

    /// Once the session is lost: the messages the peer never acknowledged,
    /// decoded, to resend on a new session; see
    /// [`take_undelivered_raw`](Self::take_undelivered_raw).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tether::{link::mem, ConduitState, Config, Server, StableConduit};
    ///
    /// let (listener, connector) = mem::listener(16);
    /// let server = Server::<String>::new(listener, Config::default());
    /// let config = Config::default()
    ///     .reconnect_with(|r| r.give_up_after(Some(Duration::from_millis(100))));
    /// let client = StableConduit::<String>::connect(connector.clone(), config).await?;
    /// let _session = server.accept().await.expect("a session"); // never read
    /// let (tx, _rx) = client.split();
    /// tx.send("not read").await?;
    /// connector.set_refuse(true); // the network goes away,
    /// connector.kill_all(); // for longer than the client waits
    /// tx.state_changes().wait_for(|s| *s == ConduitState::Lost).await?;
    /// for msg in tx.take_undelivered()? {
    ///     println!("not acknowledged: {msg}"); // resend it on a new session
    /// }
    /// # assert_eq!(tx.stats().undelivered, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn take_undelivered(&self) -> Result<Vec<S>, Error>
    where
        S: DeserializeOwned,
    {
        self.take_undelivered_raw()
            .iter()
            .map(|item| decode_item(item).map_err(|e| Error::decode::<S>(None, e)))
            .collect()
    }

    /// Closes the session gracefully, and waits until the close is
    /// complete on both sides.
    ///
    /// From now on `send` (on every clone) fails with [`Error::Closed`];
    /// every message accepted before is still delivered. The peer's
    /// receiver yields them, then `Ok(None)`, and the peer stops accepting
    /// sends too (they fail with [`Error::PeerClosed`]); what it had
    /// accepted before it learned of the close is
    /// delivered to this side's receiver, which then also ends with
    /// `Ok(None)`. The close survives link failures: the client reconnects
    /// and finishes it, and a server that completed it answers a late
    /// resume with "closed". [`Config::close_timeout`] bounds the whole
    /// close; if it passes with messages undelivered, the session is lost
    /// with [`SessionLost::CloseTimedOut`](crate::SessionLost::CloseTimedOut)
    /// and [`Stats::undelivered`] says how many of this side's messages did
    /// not arrive.
    ///
    /// Dropping every handle (senders and receiver) starts the same close
    /// in the background, whatever the link is doing.
    ///
    /// If the tokio runtime shuts down first, the session's tasks stop with
    /// it: nothing more is sent or acknowledged, and the peer learns of it
    /// as a lost session after its resume window or give-up deadline.
    pub async fn close(&self) -> Result<(), Error> {
        self.shared.begin_close();
        self.shared.wait_ended().await
    }
}

impl<S: Serialize> StableSender<S> {
    /// Sends one message.
    ///
    /// The message is serialized once, sequenced, and kept in the replay
    /// buffer before this returns; it reaches the peer exactly once, on the
    /// current link or a later one, unless the session is lost. A failing
    /// link never makes `send` fail. Waits while the replay buffer is full
    /// (backpressure). Cancel-safe: if the future is dropped before it
    /// completes, the message was not queued.
    ///
    /// `msg` is an `&S` or a reference to anything `S` borrows as
    /// ([`Borrow`]): `send("hello")` on a sender of `String`,
    /// `send(&[1, 2, 3][..])` on one of `Vec<u8>`. Std's `Borrow` impls
    /// serialize the same as their owner (`str` as `String`, `[T]` as
    /// `Vec<T>`, `T` as `Box<T>` or `Arc<T>`), so the peer decodes an `S`;
    /// a `Borrow` impl of your own must keep to that.
    ///
    /// Errors: [`Error::SessionLost`] (terminal), [`Error::Encode`] (this
    /// message only), [`Error::TooLarge`] (this message only),
    /// [`Error::Closed`] once this side began closing,
    /// [`Error::PeerClosed`] once the peer did.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tether::{link::mem, Config, Server, StableConduit};
    ///
    /// let (listener, connector) = mem::listener(16);
    /// let server = Server::<Vec<u8>>::new(listener, Config::default());
    /// let client = StableConduit::<Vec<u8>>::connect(connector, Config::default()).await?;
    /// let (tx, _rx) = client.split();
    /// let mut session = server.accept().await.expect("a session");
    ///
    /// tx.send(&[1u8, 2, 3][..]).await?; // a slice for a Vec<u8>
    /// assert_eq!(session.recv().await?, Some(vec![1, 2, 3]));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send<Q>(&self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.shared.send(msg).await
    }
}

/// The receiving half of a stable conduit.
pub struct StableReceiver<R> {
    shared: Arc<Shared>,
    /// Items taken from the inbox in one batch, not yet returned.
    ready: VecDeque<Delivered>,
    /// Items taken from `ready`, reported once it runs dry.
    consumption: recv::Consumption,
    /// The `Stream` returned its end (`None`), or the error that ended the
    /// session, once: from then on it returns `None`.
    stream_ended: bool,
    _msg: PhantomData<fn() -> R>,
}

impl<R> Drop for StableReceiver<R> {
    fn drop(&mut self) {
        // Nobody will read these: count them consumed so that the peer can
        // free them.
        self.consumption.report(&self.shared);
        let queued = self.shared.inbox.close_receiver();
        for (seq, item) in self.ready.drain(..).chain(queued) {
            self.shared.consumed(seq, item.len());
        }
        self.shared.handle_dropped();
    }
}

impl<R> std::fmt::Debug for StableReceiver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableReceiver")
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

impl<R> StableReceiver<R> {
    /// The next item, consumed only when it is returned: what `recv` and
    /// the `Stream` both wait on. No allocation, no lock when a batch
    /// taken earlier still holds items.
    fn poll_next_item(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Delivered>, Error>> {
        loop {
            if let Some((seq, bytes)) = self.ready.pop_front() {
                self.consumption.took(seq, bytes.len());
                if self.ready.is_empty() {
                    self.consumption.report(&self.shared);
                }
                return Poll::Ready(Ok(Some((seq, bytes))));
            }
            match std::task::ready!(self.shared.inbox.poll_take(cx, &mut self.ready)) {
                Taken::Items | Taken::Empty => {}
                Taken::Ended => {
                    return Poll::Ready(match self.shared.terminal() {
                        Some(Terminal::Lost(reason)) => Err(Error::SessionLost(reason.clone())),
                        Some(Terminal::Closed) | None => Ok(None),
                    })
                }
            }
        }
    }

    async fn next_item(&mut self) -> Result<Option<Delivered>, Error> {
        std::future::poll_fn(|cx| self.poll_next_item(cx)).await
    }

    /// Receives a message that borrows from the received buffer without
    /// copying; see [`Borrowed`].
    pub async fn recv_borrowed<Y: BorrowedMessage>(
        &mut self,
    ) -> Result<Option<Borrowed<Y>>, Error> {
        match self.next_item().await? {
            Some((seq, bytes)) => Borrowed::decode(bytes)
                .map(Some)
                .map_err(|source| Error::decode::<Y>(Some(seq), source)),
            None => Ok(None),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }
}

impl<R: DeserializeOwned> StableReceiver<R> {
    /// Receives the next message, in order, exactly once.
    ///
    /// Messages that arrived before the session was lost are all delivered
    /// first; then every call returns [`Error::SessionLost`]. `Ok(None)` means
    /// the peer closed its side (everything it sent has been returned) or the
    /// session ended without error. A message that does not decode as `R`
    /// is consumed and reported as [`Error::Decode`]; the conduit stays
    /// usable. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<R>, Error> {
        match self.next_item().await? {
            Some((seq, bytes)) => decode_item(&bytes)
                .map(Some)
                .map_err(|source| Error::decode::<R>(Some(seq), source)),
            None => Ok(None),
        }
    }
}
