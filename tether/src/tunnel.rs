//! Byte streams multiplexed over one stable session: the core of
//! `tether tunnel`, a port forward (or an ssh `ProxyCommand`) that survives
//! the network.
//!
//! A client opens streams to named targets ([`TunnelClient::open`]); the
//! server ([`serve_session`]) connects each to a TCP target it chooses by
//! name, and the bytes flow both ways as [`TunnelFrame`]s over the
//! session's [`StableConduit`]. The conduit makes them survive cuts: a
//! stream sees every byte once, in order, however often the link under the
//! session is replaced, and the server keeps its target connections open
//! while the client is away (for the resume window).
//!
//! # Flow control
//!
//! Each stream has a credit window of [`STREAM_WINDOW`] bytes in each
//! direction: a side sends at most that many bytes of a stream that the
//! other side has not yet written to its socket, and the other side grants
//! them back ([`TunnelFrame::Credit`]) as it writes (in batches of a
//! quarter window, or as soon as nothing more of the stream is waiting). So a stream whose
//! socket does not drain stops its sender after one window, holds at most
//! one window of memory on the receiving side, and never holds up the other
//! streams of the session: the conduit itself is always read. A peer that
//! sends more than the window on a stream has that stream reset: what it
//! sent is dropped, a [`TunnelFrame::Reset`] tells it why, and the stream
//! ends on this side with [`StreamError::Violation`].
//!
//! # Ends
//!
//! A socket's end of stream travels as [`TunnelFrame::Fin`] and becomes a
//! half-close (`shutdown`) of the socket on the other side; a socket error
//! (a reset) travels as [`TunnelFrame::Reset`] with its reason, and the
//! other side's socket is reset in turn (`SO_LINGER` zero). A target that
//! refuses the connection answers the open with
//! [`TunnelFrame::Refused`] and its reason. When the session is lost, every
//! stream ends with a reset.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::bytebuf::ByteBuf;
use crate::error::Error;
use crate::stable::{StableConduit, StableReceiver, StableSender};

/// Bytes of one stream a side may have in flight (sent, not yet written
/// to the receiver's socket), in each direction.
pub const STREAM_WINDOW: usize = 256 * 1024;

/// The largest data frame: what one socket read takes.
pub const MAX_CHUNK: usize = 32 * 1024;

/// The most streams [`serve_session`] keeps open in one session; an open
/// beyond it is refused ("too many streams").
pub const MAX_STREAMS: usize = 1024;

/// How long the server waits for a target to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One message of the tunnel protocol, carried by a stable conduit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TunnelFrame {
    /// Client: open stream `id` to the target the server knows as
    /// `target` (empty: the server's default).
    Open {
        /// The stream, chosen by the client, never reused in a session.
        id: u32,
        /// The target's name.
        target: String,
    },
    /// Server: stream `id` is connected to its target.
    Opened {
        /// The stream.
        id: u32,
    },
    /// Server: stream `id` could not be opened.
    Refused {
        /// The stream.
        id: u32,
        /// Why: an unknown target, or the target's connection error.
        reason: String,
    },
    /// Bytes of stream `id`.
    Data {
        /// The stream.
        id: u32,
        /// At most [`MAX_CHUNK`] bytes.
        bytes: ByteBuf,
    },
    /// The sender of this frame wrote `bytes` more of stream `id` to its
    /// socket: the peer may send that many more.
    Credit {
        /// The stream.
        id: u32,
        /// Bytes granted back.
        bytes: u32,
    },
    /// The sender's socket ended (end of stream): the receiver half-closes
    /// its socket once the data before this frame is written.
    Fin {
        /// The stream.
        id: u32,
    },
    /// Stream `id` ended abnormally; the receiver resets its socket.
    Reset {
        /// The stream.
        id: u32,
        /// Why.
        reason: String,
    },
}

/// How a stream ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The server could not open the stream: an unknown target, or the
    /// target refused or failed the connection.
    #[error("the tunnel server could not open the stream: {0}")]
    Refused(String),
    /// The other side reset the stream (its socket failed or was reset).
    #[error("the stream was reset by the other side: {0}")]
    ResetByPeer(String),
    /// This side's socket failed; the other side was told.
    #[error("the local socket failed: {0}")]
    Local(String),
    /// The session ended (lost or closed) with the stream open.
    #[error("the tunnel session ended: {0}")]
    Session(String),
    /// The other side broke the tunnel's rules on this stream (it sent
    /// more than its credit allowed); this side reset the stream and told
    /// it why.
    #[error("the other side broke the stream's flow control: {0}")]
    Violation(String),
}

/// What the demultiplexer hands one stream's writer.
enum Inbound {
    Data(ByteBuf),
    Fin,
    Reset(String),
    /// The peer sent over the window: reset the stream and tell it why.
    Overrun(String),
}

struct StreamEntry {
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Bytes received and not yet written to the socket: at most the
    /// window for a peer that keeps to it.
    unwritten: Arc<AtomicUsize>,
    /// What this side may still send (the peer's grants).
    credit: Arc<Semaphore>,
}

/// The state both ends of a tunnel session share.
struct Mux {
    tx: StableSender<TunnelFrame>,
    streams: Mutex<HashMap<u32, StreamEntry>>,
    /// Client: opens waiting for the server's answer.
    opening: Mutex<HashMap<u32, oneshot::Sender<Result<(), String>>>>,
    /// Why the session ended, once it did.
    ended: Mutex<Option<String>>,
    /// Wakes those waiting for the end.
    end_wake: tokio::sync::Notify,
}

impl Mux {
    fn new(tx: StableSender<TunnelFrame>) -> Arc<Mux> {
        Arc::new(Mux {
            tx,
            streams: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            ended: Mutex::new(None),
            end_wake: tokio::sync::Notify::new(),
        })
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, StreamEntry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers stream `id`: what its writer will receive. `None` once
    /// the session ended, or with `max` streams open already.
    fn register(&self, id: u32, max: usize) -> Option<Registered> {
        if self.ended().is_some() {
            return None;
        }
        let mut streams = self.streams();
        if streams.len() >= max {
            return None;
        }
        let (inbound, rx) = mpsc::unbounded_channel();
        let unwritten = Arc::new(AtomicUsize::new(0));
        let credit = Arc::new(Semaphore::new(STREAM_WINDOW));
        streams.insert(
            id,
            StreamEntry {
                inbound,
                unwritten: unwritten.clone(),
                credit: credit.clone(),
            },
        );
        Some(Registered {
            rx,
            unwritten,
            credit,
        })
    }

    fn forget(&self, id: u32) {
        self.streams().remove(&id);
    }

    /// Hands one received frame to its stream; an `Open` is returned for
    /// the caller (the server) to answer.
    fn dispatch(&self, frame: TunnelFrame) -> Option<(u32, String)> {
        match frame {
            TunnelFrame::Open { id, target } => return Some((id, target)),
            TunnelFrame::Opened { id } => self.answer(id, Ok(())),
            TunnelFrame::Refused { id, reason } => self.answer(id, Err(reason)),
            TunnelFrame::Data { id, bytes } => {
                let mut streams = self.streams();
                if let Some(entry) = streams.get(&id) {
                    let held = entry.unwritten.fetch_add(bytes.len(), Ordering::AcqRel);
                    if held + bytes.len() > STREAM_WINDOW {
                        // The stream is dropped from the table at once, so
                        // whatever else the peer sends on it is discarded
                        // instead of queued; its writer resets it.
                        let reason = format!(
                            "{} bytes sent over the stream's window of {STREAM_WINDOW}",
                            held + bytes.len() - STREAM_WINDOW
                        );
                        if let Some(entry) = streams.remove(&id) {
                            entry.credit.close();
                            let _ = entry.inbound.send(Inbound::Overrun(reason));
                        }
                    } else {
                        let _ = entry.inbound.send(Inbound::Data(bytes));
                    }
                }
            }
            TunnelFrame::Credit { id, bytes } => {
                if let Some(entry) = self.streams().get(&id) {
                    // Never more than a window outstanding, whatever the
                    // peer grants.
                    let room = STREAM_WINDOW.saturating_sub(entry.credit.available_permits());
                    entry.credit.add_permits((bytes as usize).min(room));
                }
            }
            TunnelFrame::Fin { id } => {
                if let Some(entry) = self.streams().get(&id) {
                    let _ = entry.inbound.send(Inbound::Fin);
                }
            }
            TunnelFrame::Reset { id, reason } => {
                if let Some(entry) = self.streams().get(&id) {
                    let _ = entry.inbound.send(Inbound::Reset(reason));
                    entry.credit.close();
                }
            }
        }
        None
    }

    fn answer(&self, id: u32, result: Result<(), String>) {
        let waiter = self
            .opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }

    /// The session ended: every stream and every open ends with `why`.
    fn end(&self, why: String) {
        *self.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
        for (_, entry) in self.streams().drain() {
            let _ = entry.inbound.send(Inbound::Reset(why.clone()));
            entry.credit.close();
        }
        for (_, waiter) in self
            .opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
        {
            let _ = waiter.send(Err(why.clone()));
        }
        self.end_wake.notify_waiters();
    }

    /// The local socket of stream `id` failed with `error`: the peer is
    /// told to reset its end, and the stream ends with the reason.
    async fn reset_local(&self, id: u32, error: &io::Error) -> StreamError {
        let reason = error.to_string();
        self.send_reset(id, &reason).await;
        StreamError::Local(reason)
    }

    /// Tells the peer to reset stream `id`, and why. A session that ended
    /// meanwhile ends the stream anyway: nothing to tell.
    async fn send_reset(&self, id: u32, reason: &str) {
        let reset = TunnelFrame::Reset {
            id,
            reason: reason.to_owned(),
        };
        let _ = self.tx.send(&reset).await;
    }

    fn ended(&self) -> Option<String> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

struct Registered {
    rx: mpsc::UnboundedReceiver<Inbound>,
    unwritten: Arc<AtomicUsize>,
    credit: Arc<Semaphore>,
}

/// Reads the session and hands each frame to its stream until the session
/// ends; `on_open` gets each `Open` (server side).
async fn demux(
    mux: Arc<Mux>,
    mut rx: StableReceiver<TunnelFrame>,
    mut on_open: impl FnMut(u32, String),
) {
    let why = loop {
        match rx.recv().await {
            Ok(Some(frame)) => {
                if let Some((id, target)) = mux.dispatch(frame) {
                    on_open(id, target);
                }
            }
            Ok(None) => break "closed by the other side".to_string(),
            Err(Error::Decode { .. }) => {
                break "the other side does not speak the tunnel protocol".to_string()
            }
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(%why, "tunnel session ended");
    mux.end(why);
}

/// Byte counts of one stream that ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// Bytes read from the local socket and sent.
    pub sent: u64,
    /// Bytes received and written to the local socket.
    pub received: u64,
}

/// Carries one stream between a socket (`reader`, `writer`) and the
/// session until both directions ended: the reader's bytes go out as data
/// under the credit window, its end as `Fin`; what arrives is written to
/// `writer`, and credit granted back as it is written.
async fn pump<Rd, Wr>(
    mux: &Mux,
    id: u32,
    reg: Registered,
    mut reader: Rd,
    mut writer: Wr,
) -> Result<StreamSummary, StreamError>
where
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    let Registered {
        mut rx,
        unwritten,
        credit,
    } = reg;
    let outbound = async {
        let mut sent = 0u64;
        loop {
            let mut chunk = Vec::with_capacity(MAX_CHUNK);
            let n = match reader.read_buf(&mut chunk).await {
                Ok(n) => n,
                Err(e) => return Err(mux.reset_local(id, &e).await),
            };
            if n == 0 {
                mux.tx
                    .send(&TunnelFrame::Fin { id })
                    .await
                    .map_err(|e| StreamError::Session(e.to_string()))?;
                return Ok(sent);
            }
            match credit.acquire_many(n as u32).await {
                Ok(permits) => permits.forget(),
                // Closed: the stream was reset or the session ended; the
                // inbound side says why.
                Err(_) => return Ok(sent),
            }
            mux.tx
                .send(&TunnelFrame::Data {
                    id,
                    bytes: ByteBuf::from(chunk),
                })
                .await
                .map_err(|e| StreamError::Session(e.to_string()))?;
            sent += n as u64;
        }
    };
    let inbound = async {
        let mut received = 0u64;
        // Written and not yet granted back: granted in batches of a
        // quarter window, or whenever nothing more is waiting (so that a
        // sender waiting for credit always gets it).
        let mut ungranted = 0usize;
        loop {
            match rx.recv().await {
                Some(Inbound::Data(bytes)) => {
                    let written = match writer.write_all(&bytes).await {
                        // A buffered writer (stdout is line-buffered) holds
                        // what has no newline until it is flushed: flush
                        // whenever nothing more is waiting.
                        Ok(()) if rx.is_empty() => writer.flush().await,
                        other => other,
                    };
                    if let Err(e) = written {
                        credit.close();
                        return Err(mux.reset_local(id, &e).await);
                    }
                    unwritten.fetch_sub(bytes.len(), Ordering::AcqRel);
                    received += bytes.len() as u64;
                    ungranted += bytes.len();
                    if ungranted >= STREAM_WINDOW / 4 || rx.is_empty() {
                        let _ = mux
                            .tx
                            .send(&TunnelFrame::Credit {
                                id,
                                bytes: ungranted as u32,
                            })
                            .await;
                        ungranted = 0;
                    }
                }
                Some(Inbound::Fin) => {
                    let _ = writer.flush().await;
                    let _ = writer.shutdown().await;
                    return Ok(received);
                }
                Some(Inbound::Reset(reason)) => {
                    credit.close();
                    return Err(match mux.ended() {
                        Some(why) => StreamError::Session(why),
                        None => StreamError::ResetByPeer(reason),
                    });
                }
                Some(Inbound::Overrun(reason)) => {
                    tracing::warn!(stream = id, %reason, "tunnel peer overran a stream's window");
                    mux.send_reset(id, &reason).await;
                    return Err(StreamError::Violation(reason));
                }
                None => {
                    credit.close();
                    return Err(StreamError::Session(mux.ended().unwrap_or_default()));
                }
            }
        }
    };
    tokio::pin!(outbound, inbound);
    // A reset or a failure on either side ends both; otherwise both run to
    // their end (a half-closed stream keeps the other direction).
    let (mut sent, mut received) = (None, None);
    while sent.is_none() || received.is_none() {
        tokio::select! {
            r = &mut outbound, if sent.is_none() => match r {
                Ok(n) => sent = Some(n),
                Err(e) => return Err(e),
            },
            r = &mut inbound, if received.is_none() => match r {
                Ok(n) => received = Some(n),
                Err(e) => return Err(e),
            },
        }
    }
    Ok(StreamSummary {
        sent: sent.unwrap_or(0),
        received: received.unwrap_or(0),
    })
}

/// The client end of a tunnel session: opens streams to the server's
/// targets.
#[derive(Clone)]
pub struct TunnelClient {
    mux: Arc<Mux>,
    next_id: Arc<AtomicU32>,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient").finish_non_exhaustive()
    }
}

impl TunnelClient {
    /// Takes over a client conduit (from
    /// [`StableConduit::connect`](crate::StableConduit::connect)) and reads
    /// it in a task of its own.
    pub fn new(conduit: StableConduit<TunnelFrame>) -> TunnelClient {
        let (tx, rx) = conduit.split();
        let mux = Mux::new(tx);
        tokio::spawn(demux(mux.clone(), rx, |id, _| {
            tracing::warn!(id, "the tunnel server tried to open a stream: ignored");
        }));
        TunnelClient {
            mux,
            next_id: Arc::new(AtomicU32::new(1)),
        }
    }

    /// Why the session ended, once it did.
    pub fn ended(&self) -> Option<String> {
        self.mux.ended()
    }

    /// Resolves once the session ended (lost or closed); see
    /// [`ended`](Self::ended) for why.
    pub async fn wait_ended(&self) {
        loop {
            let woken = self.mux.end_wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.mux.ended().is_some() {
                return;
            }
            woken.await;
        }
    }

    /// The session's counters (state, reconnects, RTT, bytes replayed).
    pub fn stats(&self) -> crate::Stats {
        self.mux.tx.stats()
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.mux.streams().len()
    }

    /// Closes the session gracefully (every stream should have ended):
    /// the server learns the client is gone for good and closes the
    /// session at once instead of holding it for the resume window.
    pub async fn close(&self) -> Result<(), Error> {
        self.mux.tx.close().await
    }

    /// Opens a stream to `target` (empty: the server's default) and
    /// carries it between `reader`/`writer` and the target until both
    /// directions end.
    pub async fn forward<Rd, Wr>(
        &self,
        target: &str,
        reader: Rd,
        writer: Wr,
    ) -> Result<StreamSummary, StreamError>
    where
        Rd: AsyncRead + Unpin,
        Wr: AsyncWrite + Unpin,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reg = self
            .mux
            .register(id, usize::MAX)
            .ok_or_else(|| StreamError::Session(self.mux.ended().unwrap_or_default()))?;
        let (answer_tx, answer) = oneshot::channel();
        self.mux
            .opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, answer_tx);
        let opened = async {
            self.mux
                .tx
                .send(&TunnelFrame::Open {
                    id,
                    target: target.to_owned(),
                })
                .await
                .map_err(|e| StreamError::Session(e.to_string()))?;
            match answer.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(match self.mux.ended() {
                    Some(why) => StreamError::Session(why),
                    None => StreamError::Refused(reason),
                }),
                Err(_) => Err(StreamError::Session(self.mux.ended().unwrap_or_default())),
            }
        };
        let result = match opened.await {
            Ok(()) => pump(&self.mux, id, reg, reader, writer).await,
            Err(e) => Err(e),
        };
        self.mux.forget(id);
        result
    }

    /// Carries a TCP connection to `target`, as
    /// [`forward`](Self::forward); a stream that ends with an error resets
    /// the connection, as the other end's did.
    pub async fn forward_tcp(
        &self,
        target: &str,
        mut stream: TcpStream,
    ) -> Result<StreamSummary, StreamError> {
        let (reader, writer) = stream.split();
        let result = self.forward(target, reader, writer).await;
        if result.is_err() {
            let _ = stream.set_zero_linger();
        }
        result
    }
}

/// Serves one tunnel session (a conduit from
/// [`Server::accept`](crate::Server::accept)) until it ends: each stream
/// the client opens is connected to `resolve(target)` (a `host:port`, or
/// `None` to refuse the name), and carried until both directions end.
/// Target connections stay open while the client is away: the session
/// waits for its resume.
pub async fn serve_session<F>(conduit: StableConduit<TunnelFrame>, resolve: F)
where
    F: Fn(&str) -> Option<String> + Send + Sync + 'static,
{
    serve_session_with_limit(conduit, resolve, MAX_STREAMS).await;
}

/// [`serve_session`] with at most `max_streams` streams open at once.
pub async fn serve_session_with_limit<F>(
    conduit: StableConduit<TunnelFrame>,
    resolve: F,
    max_streams: usize,
) where
    F: Fn(&str) -> Option<String> + Send + Sync + 'static,
{
    let (tx, rx) = conduit.split();
    let mux = Mux::new(tx);
    let resolve = Arc::new(resolve);
    let opener = mux.clone();
    demux(mux, rx, move |id, target| {
        let mux = opener.clone();
        let resolve = resolve.clone();
        tokio::spawn(async move {
            let Some(reg) = mux.register(id, max_streams) else {
                if mux.ended().is_none() {
                    let reason = format!("too many streams (at most {max_streams} per session)");
                    let _ = mux.tx.send(&TunnelFrame::Refused { id, reason }).await;
                }
                return;
            };
            let connected = match resolve(&target) {
                None => Err(format!("unknown target {target:?}")),
                Some(addr) => {
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                        Ok(Ok(stream)) => Ok(stream),
                        Ok(Err(e)) => Err(format!("connecting to {addr}: {e}")),
                        Err(_) => Err(format!(
                            "connecting to {addr}: no answer within {}",
                            crate::error::Human(CONNECT_TIMEOUT)
                        )),
                    }
                }
            };
            let mut stream = match connected {
                Ok(stream) => stream,
                Err(reason) => {
                    tracing::info!(id, %target, %reason, "tunnel stream refused");
                    mux.forget(id);
                    let _ = mux.tx.send(&TunnelFrame::Refused { id, reason }).await;
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            if mux.tx.send(&TunnelFrame::Opened { id }).await.is_err() {
                mux.forget(id);
                return;
            }
            tracing::debug!(id, %target, "tunnel stream opened");
            let (reader, writer) = stream.split();
            let result = pump(&mux, id, reg, reader, writer).await;
            mux.forget(id);
            match result {
                Ok(s) => {
                    tracing::debug!(
                        id,
                        sent = s.sent,
                        received = s.received,
                        "tunnel stream ended"
                    )
                }
                Err(e) => {
                    tracing::debug!(id, error = %e, "tunnel stream reset");
                    let _ = stream.set_zero_linger();
                }
            }
        });
    })
    .await;
}

/// The bytes one side holds for a stream at most: what a hostile or broken
/// peer can make it hold (one window of unwritten data) plus one read.
pub const fn stream_memory_bound() -> usize {
    STREAM_WINDOW + MAX_CHUNK
}

impl From<StreamError> for io::Error {
    fn from(err: StreamError) -> io::Error {
        let kind = match &err {
            StreamError::Refused(_) => io::ErrorKind::ConnectionRefused,
            StreamError::ResetByPeer(_) => io::ErrorKind::ConnectionReset,
            StreamError::Local(_) => io::ErrorKind::Other,
            StreamError::Session(_) => io::ErrorKind::ConnectionAborted,
            StreamError::Violation(_) => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors of `docs/PROTOCOL.md` (the tunnel section).
    #[test]
    fn frames_encode_as_documented() {
        let cases: [(TunnelFrame, &[u8]); 5] = [
            (
                TunnelFrame::Open {
                    id: 1,
                    target: "ssh".into(),
                },
                &[0x00, 0x01, 0x03, b's', b's', b'h'],
            ),
            (TunnelFrame::Opened { id: 1 }, &[0x01, 0x01]),
            (
                TunnelFrame::Data {
                    id: 1,
                    bytes: ByteBuf::from(vec![0xab, 0xcd]),
                },
                &[0x03, 0x01, 0x02, 0xab, 0xcd],
            ),
            (
                TunnelFrame::Credit {
                    id: 1,
                    bytes: 65_536,
                },
                &[0x04, 0x01, 0x80, 0x80, 0x04],
            ),
            (TunnelFrame::Fin { id: 300 }, &[0x05, 0xac, 0x02]),
        ];
        for (frame, bytes) in cases {
            let encoded = postcard::to_allocvec(&frame).unwrap();
            assert_eq!(encoded, bytes, "{frame:?}");
            let decoded: TunnelFrame = postcard::from_bytes(bytes).unwrap();
            assert_eq!(decoded, frame);
        }
    }
}
