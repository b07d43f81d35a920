//! [`WsLink`] and its halves over an upgraded stream ([`WsIo`]).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_websockets::{CloseCode, Message, WebSocketStream};

use super::{WsConfig, WsError};
use crate::link::{Link, LinkError, LinkRx, LinkTx, PeerInfo};

/// The byte stream under a WebSocket: TCP or TLS over TCP, after the HTTP
/// upgrade, with the bytes that were read past the HTTP head (frames the
/// peer sent right behind it) served first.
///
/// Writes smaller than [`COALESCE`] are gathered into one buffer and go
/// out together at the next flush (or when the buffer fills): the
/// WebSocket layer writes each frame as two slices (header, payload), at
/// most 64 slices a call, so a batch of small frames would otherwise cost
/// one system call per 32 frames. Larger writes go straight to the stream
/// after what is buffered, uncopied. The buffer is allocated when a small
/// write arrives and released at the flush, so an idle link holds none.
pub(crate) struct WsIo {
    prefix: Bytes,
    inner: Transport,
    /// Small writes not yet written to `inner`, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
}

/// Writes below this many bytes (all slices of one call together) are
/// buffered; the buffer is written out before it would grow past it.
const COALESCE: usize = 16 * 1024;

pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl WsIo {
    pub(crate) fn new(inner: Transport, prefix: Bytes) -> Self {
        WsIo {
            prefix,
            inner,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Writes out everything buffered. Keeps the allocation.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let pending = &self.out[self.out_pos..];
            let written = match &mut self.inner {
                Transport::Tcp(io) => Pin::new(io).poll_write(cx, pending),
                Transport::Tls(io) => Pin::new(&mut **io).poll_write(cx, pending),
            };
            match ready!(written)? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.out_pos += n,
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs` (`len` bytes in all): buffered when small, else written
    /// to the stream once the buffer is empty.
    fn poll_put(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        len: usize,
    ) -> Poll<io::Result<usize>> {
        if len >= COALESCE {
            ready!(self.poll_drain(cx))?;
            return match &mut self.inner {
                Transport::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
                Transport::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
            };
        }
        if self.out.len() + len > COALESCE {
            ready!(self.poll_drain(cx))?;
        }
        if self.out.capacity() == 0 {
            self.out.reserve_exact(COALESCE);
        }
        for buf in bufs {
            self.out.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    /// The same stream, serving `prefix` before anything else is read.
    pub(crate) fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = prefix;
        self
    }
}

macro_rules! transport {
    ($self:expr, $io:ident => $body:expr) => {
        match &mut $self.get_mut().inner {
            Transport::Tcp($io) => {
                let $io = Pin::new($io);
                $body
            }
            Transport::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $body
            }
        }
    };
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        transport!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_put(cx, &[io::IoSlice::new(buf)], buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.get_mut().poll_put(cx, bufs, len)
    }

    /// Always: small slices are gathered here, large ones passed on.
    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Writes out the buffer, releases it, and flushes the stream.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        self.out = Vec::new();
        transport!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        self.out = Vec::new();
        transport!(self, io => io.poll_shutdown(cx))
    }
}

type Ws = WebSocketStream<WsIo>;

/// The WebSocket both halves drive; locked only inside one poll, never
/// across an `.await`.
type Shared = Arc<Mutex<Ws>>;

fn lock(ws: &Shared) -> MutexGuard<'_, Ws> {
    // A poisoned lock means a poll panicked: the stream's state is still
    // memory-safe, and the half that panicked is gone.
    ws.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a tokio-websockets error means for tether.
fn link_error(err: tokio_websockets::Error) -> LinkError {
    use tokio_websockets::Error as E;
    match err {
        E::PayloadTooLong { len, max_len } => LinkError::TooLarge { len, max: max_len },
        E::Io(e)
            if e.kind() == io::ErrorKind::Other && e.to_string() == "bytes remaining on stream" =>
        {
            LinkError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "websocket: end of stream inside a frame",
            ))
        }
        E::Io(e) => LinkError::from(e),
        E::AlreadyClosed => LinkError::Io(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "websocket: the peer closed the connection",
        )),
        E::Protocol(e) => LinkError::WebSocket(WsError::Protocol(e.to_string())),
        other => LinkError::WebSocket(WsError::Protocol(other.to_string())),
    }
}

/// A link over one WebSocket connection (`ws://` or `wss://`), client or
/// server side: one binary message per payload.
pub struct WsLink {
    ws: Shared,
    peer: PeerInfo,
    max_payload: usize,
}

impl std::fmt::Debug for WsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsLink")
            .field("peer", &self.peer)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl WsLink {
    pub(crate) fn new(ws: Ws, peer: PeerInfo, config: &WsConfig) -> Self {
        WsLink {
            ws: Arc::new(Mutex::new(ws)),
            peer,
            max_payload: config.max_payload,
        }
    }
}

impl Link for WsLink {
    type Tx = WsTx;
    type Rx = WsRx;

    fn split(self) -> (WsTx, WsRx) {
        let tx = WsTx {
            ws: self.ws.clone(),
            max_payload: self.max_payload,
            state: TxState::Open,
        };
        let rx = WsRx {
            ws: self.ws,
            configured_max: self.max_payload,
            state: RxState::Open,
        };
        (tx, rx)
    }

    fn peer(&self) -> PeerInfo {
        self.peer.clone()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxState {
    Open,
    /// `close` queued the Close frame; it may still be flushing.
    Closing,
    Closed,
    Dead,
}

/// The sending half of a [`WsLink`].
pub struct WsTx {
    ws: Shared,
    max_payload: usize,
    state: TxState,
}

impl std::fmt::Debug for WsTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTx")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl WsTx {
    fn check_open(&self) -> Result<(), LinkError> {
        match self.state {
            TxState::Open => Ok(()),
            TxState::Closing | TxState::Closed => Err(LinkError::Closed),
            TxState::Dead => Err(LinkError::Dead),
        }
    }

    fn fail<T>(&mut self, err: tokio_websockets::Error) -> Result<T, LinkError> {
        self.state = TxState::Dead;
        Err(link_error(err))
    }
}

impl LinkTx for WsTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        self.check_open()?;
        if payload.len() > self.max_payload {
            self.state = TxState::Dead;
            return Err(LinkError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        let mut message = Some(Message::binary(payload));
        // `poll_ready` writes queued frames out while more than the write
        // buffer is queued; the message is queued only once it is ready,
        // in the same poll, so a dropped feed queued nothing.
        let result = poll_fn(|cx| {
            let mut ws = lock(&self.ws);
            ready!(Pin::new(&mut *ws).poll_ready(cx))?;
            let message = message.take().expect("polled after completion");
            Poll::Ready(Pin::new(&mut *ws).start_send(message))
        })
        .await;
        result.or_else(|e| self.fail(e))
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        self.check_open()?;
        let result = poll_fn(|cx| Pin::new(&mut *lock(&self.ws)).poll_flush(cx)).await;
        result.or_else(|e| self.fail(e))
    }

    /// Queues a Close frame (code 1000) after everything fed, flushes, and
    /// shuts down the write side of the connection (TLS: `close_notify`
    /// first). If the peer closed first, its Close was already answered
    /// and only the flush and shutdown remain.
    async fn close(&mut self) -> Result<(), LinkError> {
        match self.state {
            TxState::Closed => return Ok(()),
            TxState::Dead => return Err(LinkError::Dead),
            TxState::Open => {
                let mut ws = lock(&self.ws);
                let close = Message::close(Some(CloseCode::NORMAL_CLOSURE), "");
                // `AlreadyClosed`: the peer's Close came first and the
                // stream queued its answer itself.
                match Pin::new(&mut *ws).start_send(close) {
                    Ok(()) | Err(tokio_websockets::Error::AlreadyClosed) => {}
                    Err(e) => {
                        drop(ws);
                        return self.fail(e);
                    }
                }
                self.state = TxState::Closing;
            }
            TxState::Closing => {}
        }
        let result = poll_fn(|cx| {
            let mut ws = lock(&self.ws);
            ready!(Pin::new(&mut *ws).poll_flush(cx))?;
            Pin::new(ws.get_mut())
                .poll_shutdown(cx)
                .map_err(tokio_websockets::Error::Io)
        })
        .await;
        match result {
            Ok(()) => {
                self.state = TxState::Closed;
                Ok(())
            }
            // The peer may close its end as soon as it has our Close.
            Err(tokio_websockets::Error::Io(e)) if e.kind() == io::ErrorKind::NotConnected => {
                self.state = TxState::Closed;
                Ok(())
            }
            Err(e) => self.fail(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxState {
    Open,
    /// The peer's Close frame arrived; its answer is being flushed.
    PeerClosed,
    Ended,
    Dead,
}

/// The receiving half of a [`WsLink`].
pub struct WsRx {
    ws: Shared,
    configured_max: usize,
    state: RxState,
}

impl std::fmt::Debug for WsRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsRx")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl WsRx {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, LinkError>> {
        let mut ws = lock(&self.ws);
        loop {
            match self.state {
                RxState::Ended => return Poll::Ready(Ok(None)),
                RxState::Dead => return Poll::Ready(Err(LinkError::Dead)),
                RxState::Open | RxState::PeerClosed => {}
            }
            let next = ready!(Pin::new(&mut *ws).poll_next(cx));
            if self.state == RxState::PeerClosed {
                // The stream flushed the answer to the peer's Close (or
                // could not: the peer is gone, which changes nothing).
                self.state = RxState::Ended;
                continue;
            }
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    self.state = RxState::Dead;
                    if !matches!(e, tokio_websockets::Error::Io(_)) {
                        // The stream queued a Close saying why (1002 for a
                        // protocol violation, 1009 for a message too big):
                        // send it, best effort.
                        let _ = Pin::new(&mut *ws).poll_flush(cx);
                    }
                    return Poll::Ready(Err(link_error(e)));
                }
                None => {
                    self.state = RxState::Dead;
                    return Poll::Ready(Err(LinkError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "websocket: the connection ended without a Close frame",
                    ))));
                }
            };
            if message.is_binary() {
                return Poll::Ready(Ok(Some(message.into_payload().into())));
            }
            if message.is_close() {
                self.state = RxState::PeerClosed;
                continue;
            }
            if message.is_text() {
                self.state = RxState::Dead;
                // Tell the peer why (1003, unsupported data), best effort.
                let close = Message::close(Some(CloseCode::UNSUPPORTED_DATA), "binary only");
                if Pin::new(&mut *ws).start_send(close).is_ok() {
                    let _ = Pin::new(&mut *ws).poll_flush(cx);
                }
                return Poll::Ready(Err(LinkError::WebSocket(WsError::TextMessage)));
            }
            // Ping (answered by the stream itself) or pong: not payloads.
        }
    }
}

impl LinkRx for WsRx {
    /// The next binary message. A Close frame from the peer is a clean end
    /// (`Ok(None)`, after answering it); the connection ending without one
    /// is [`LinkError::Io`] of kind `UnexpectedEof`; a text message is
    /// [`WsError::TextMessage`]; a message over the limit is
    /// [`LinkError::TooLarge`], seen in the frame header before anything is
    /// reserved for it. Cancel-safe: the stream keeps partial frames.
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn set_max_payload(&mut self, max: usize) {
        let max = max.min(self.configured_max);
        lock(&self.ws).limits_mut().set_max_payload_len(Some(max));
    }
}
