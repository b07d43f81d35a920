//! Check for the fuzz target `stream_decoder` (tether's stream link
//! receiver, `tether/src/link/stream/rx.rs`).
//!
//! Shared with `tether/tests/fuzz_corpus.rs` through `#[path]`: no
//! libFuzzer, and only crates tether itself depends on.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tether::link::stream::StreamRx;
use tether::link::{Link, LinkError, LinkRx, StreamConfig, StreamLink};
use tokio::io::{AsyncRead, ReadBuf};

/// The length prefix of a stream frame (PROTOCOL.md §1).
const HEAD_LEN: usize = 4;

/// The decoder's largest read chunk: the most free space it offers one read
/// beyond the current frame (`READ_CHUNK` in `tether/src/link/stream/rx.rs`).
const READ_CHUNK: usize = 32 * 1024;

/// `max_payload` by the two low bits of the config byte: mostly 4096, the
/// size the decoder is meant to be fuzzed at, plus two tiny limits that put
/// the `TooLarge` boundary where short inputs reach it.
const MAX_PAYLOADS: [usize; 4] = [4096, 4096, 25, 0];

/// The most the read buffer may hold: what one frame needs (prefix and
/// largest payload) plus one read chunk, and the same again for the
/// amortized growth of the buffer (`bytes` doubles a buffer it reallocates).
/// Anything that grows with the input, not with `max_payload`, breaks it.
pub fn capacity_bound(max_payload: usize) -> usize {
    2 * (max_payload + HEAD_LEN + READ_CHUNK)
}

/// How the input ends, by the framing rules (PROTOCOL.md §1 and the
/// `LinkError` documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// End-of-file at a frame boundary: `Ok(None)`, for good.
    Clean,
    /// End-of-file inside a prefix or a payload.
    Truncated { expected: usize, got: usize },
    /// A prefix over `max_payload`, reported as soon as the prefix is in.
    TooLarge { len: usize, max: usize },
    /// The reader fails instead of reporting end-of-file.
    Io,
}

/// What a correct decoder yields for `stream`: its payloads, then how it
/// ends.
fn reference(stream: &[u8], max: usize, fail_at_end: bool) -> (Vec<&[u8]>, End) {
    let mut payloads = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < HEAD_LEN {
            let end = match rest.len() {
                _ if fail_at_end => End::Io,
                0 => End::Clean,
                got => End::Truncated {
                    expected: HEAD_LEN,
                    got,
                },
            };
            return (payloads, end);
        }
        let len = u32::from_le_bytes(rest[..HEAD_LEN].try_into().unwrap()) as usize;
        if len > max {
            return (payloads, End::TooLarge { len, max });
        }
        let body = &rest[HEAD_LEN..];
        if body.len() < len {
            let end = if fail_at_end {
                End::Io
            } else {
                End::Truncated {
                    expected: len,
                    got: body.len(),
                }
            };
            return (payloads, end);
        }
        payloads.push(&body[..len]);
        rest = &body[len..];
    }
}

/// An in-memory `AsyncRead` that hands out its bytes in chunks of the given
/// sizes (cycling), returns `Pending` before the reads its mask says (bit
/// `i % 8` for the `i`-th read), and ends with end-of-file or an error.
struct FuzzReader {
    data: Vec<u8>,
    pos: usize,
    chunks: Vec<usize>,
    reads: usize,
    pending_mask: u8,
    pended: bool,
    fail_at_end: bool,
    /// The most free space any read was offered.
    max_offered: Arc<AtomicUsize>,
}

impl AsyncRead for FuzzReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let turn = this.reads;
        if !this.pended && this.pending_mask & (1 << (turn % 8)) != 0 {
            this.pended = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.pended = false;
        this.reads += 1;
        // A read into no space returns 0, which means end-of-file.
        assert!(buf.remaining() > 0, "the decoder offered a read no space");
        this.max_offered
            .fetch_max(buf.remaining(), Ordering::Relaxed);
        if this.pos == this.data.len() {
            if this.fail_at_end {
                return Poll::Ready(Err(io::Error::other(
                    "fuzz reader: failure at end of input",
                )));
            }
            return Poll::Ready(Ok(()));
        }
        let chunk = match this.chunks.len() {
            0 => usize::MAX,
            n => this.chunks[turn % n],
        };
        let n = chunk.min(this.data.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Drives one `recv` to completion by hand (no runtime; the reader never
/// needs one). With `cancel`, every `Pending` drops the future and starts
/// a new one, which the link documents as losing nothing. Checks the read
/// buffer's capacity at every stop and that the decoder does not spin.
struct Driver {
    rx: StreamRx<FuzzReader>,
    cancel: bool,
    polls: usize,
    poll_limit: usize,
    bound: usize,
}

impl Driver {
    fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let outcome = {
                let mut fut = pin!(self.rx.recv());
                loop {
                    self.polls += 1;
                    assert!(
                        self.polls <= self.poll_limit,
                        "stream decoder hangs: over {} polls",
                        self.poll_limit
                    );
                    match fut.as_mut().poll(&mut cx) {
                        Poll::Ready(result) => break Some(result),
                        Poll::Pending if self.cancel => break None,
                        Poll::Pending => {}
                    }
                }
            };
            let capacity = self.rx.read_buffer_capacity();
            assert!(
                capacity <= self.bound,
                "read buffer capacity {capacity} is over {}",
                self.bound
            );
            if let Some(result) = outcome {
                return result;
            }
        }
    }
}

/// Target `stream_decoder`: a byte stream, cut into reads as the input
/// says, goes through `StreamLink`'s receiving half.
///
/// Layout: byte 0 is the config: bits 0-1 pick `max_payload`
/// ([`MAX_PAYLOADS`]), bit 2 makes the reader fail at the end instead of
/// reporting end-of-file, bit 3 cancels `recv` at every `Pending`, bits 4-6
/// are the number `n` of chunk-size bytes, bit 7 keeps every payload alive
/// until the end (so the decoder cannot reuse their memory). Byte 1 is the
/// reader's `Pending` mask. Then `n` chunk sizes (`0xff`: no limit, else
/// `b + 1`), then the stream itself.
///
/// Checks, against a reference reading of the framing:
/// - the payloads come out in order with their exact bytes;
/// - then exactly the right end: `Ok(None)` at a frame boundary (and again
///   on the next call, with the read buffer released); `Truncated` with the
///   right counts inside a prefix or payload; `TooLarge { len, max }` as
///   soon as an oversized prefix is in, whatever follows; `Io` when the
///   reader fails; and `Dead` after any error;
/// - nothing panics, the decoder never offers a read zero bytes of space,
///   never polls more than a small multiple of the input length (no hang),
///   and its read buffer never exceeds [`capacity_bound`], whatever the
///   announced lengths.
pub fn stream_decoder(data: &[u8]) {
    let config = data.first().copied().unwrap_or(0);
    let pending_mask = data.get(1).copied().unwrap_or(0);
    let max_payload = MAX_PAYLOADS[usize::from(config & 3)];
    let fail_at_end = config & 0x04 != 0;
    let cancel = config & 0x08 != 0;
    let n_chunks = usize::from((config >> 4) & 7);
    let keep_payloads = config & 0x80 != 0;
    let rest = data.get(2..).unwrap_or(&[]);
    let (sizes, stream) = rest.split_at(n_chunks.min(rest.len()));
    let chunks: Vec<usize> = sizes
        .iter()
        .map(|&b| {
            if b == 0xff {
                usize::MAX
            } else {
                usize::from(b) + 1
            }
        })
        .collect();

    let (payloads, end) = reference(stream, max_payload, fail_at_end);

    let max_offered = Arc::new(AtomicUsize::new(0));
    let reader = FuzzReader {
        data: stream.to_vec(),
        pos: 0,
        chunks,
        reads: 0,
        pending_mask,
        pended: false,
        fail_at_end,
        max_offered: Arc::clone(&max_offered),
    };
    let config = StreamConfig {
        max_payload,
        ..StreamConfig::default()
    };
    let (_tx, rx) = StreamLink::from_halves(reader, tokio::io::sink(), config).split();
    let bound = capacity_bound(max_payload);
    let mut driver = Driver {
        rx,
        cancel,
        polls: 0,
        // Each poll ends a recv, or stops at a Pending the reader returns
        // at most once per read, and each read but the last delivers bytes.
        poll_limit: 4 * stream.len() + 64,
        bound,
    };

    let mut kept = Vec::new();
    for (i, want) in payloads.iter().enumerate() {
        match driver.recv() {
            Ok(Some(got)) => {
                assert_eq!(&got[..], *want, "payload {i}");
                if keep_payloads {
                    kept.push(got);
                }
            }
            other => panic!("payload {i} ({} bytes) expected, got {other:?}", want.len()),
        }
    }
    let last = driver.recv();
    match (end, &last) {
        (End::Clean, Ok(None)) => {}
        (
            End::Truncated { expected, got },
            Err(LinkError::Truncated {
                expected: e,
                got: g,
            }),
        ) if (expected, got) == (*e, *g) => {}
        (End::TooLarge { len, max }, Err(LinkError::TooLarge { len: l, max: m }))
            if (len, max) == (*l, *m) => {}
        (End::Io, Err(LinkError::Io(_))) => {}
        _ => panic!(
            "after {} payloads expected {end:?}, got {last:?}",
            payloads.len()
        ),
    }
    if let Err(err) = &last {
        let _ = err.to_string();
    }
    let after = driver.recv();
    match end {
        End::Clean => {
            assert!(matches!(after, Ok(None)), "after end of stream: {after:?}");
            assert_eq!(
                driver.rx.read_buffer_capacity(),
                0,
                "buffer kept after end of stream"
            );
        }
        _ => assert!(
            matches!(after, Err(LinkError::Dead)),
            "after an error: {after:?}"
        ),
    }
    let offered = max_offered.load(Ordering::Relaxed);
    assert!(
        offered <= bound,
        "a read was offered {offered} bytes, over {bound}"
    );
    drop(kept);
}
