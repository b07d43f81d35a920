//! Integration tests of the bare conduit: typed round trips over every
//! transport, batching with `feed`/`flush`, zero-copy borrowed receives,
//! typed decode and encode failures, and link failures surfacing as
//! `Error::Link`.

mod common;

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether::link::mem::{self, MemConfig, MemLink};
use tether::link::stream::{StreamConfig, StreamLink};
use tether::link::{Link, LinkError, LinkRx, LinkTx};
use tether::proto::FrameError;
use tether::{BareConduit, BareReceiver, BareSender, Borrowed, Error};
use tokio::sync::Barrier;

use common::transport::Transport;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs a test body with a deadline, so that a bug fails the test instead
/// of hanging it.
async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), body)
        .await
        .expect("test timed out")
}

/// Deterministic bytes: `len` of them, depending on `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(len as u64);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

fn mem_links() -> (MemLink, MemLink) {
    mem::pair(16)
}

type DuplexLink = StreamLink<
    tokio::io::ReadHalf<tokio::io::DuplexStream>,
    tokio::io::WriteHalf<tokio::io::DuplexStream>,
>;

fn duplex_links() -> (DuplexLink, DuplexLink) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (
        StreamLink::new(a, StreamConfig::default()),
        StreamLink::new(b, StreamConfig::default()),
    )
}

/// Asserts that `part` lies inside `whole` (same memory, not a copy), and
/// returns its offset in `whole`.
fn offset_inside(part: &[u8], whole: &Bytes) -> usize {
    let start = whole.as_ptr() as usize;
    let end = start + whole.len();
    let p = part.as_ptr() as usize;
    assert!(
        !part.is_empty() && p >= start && p + part.len() <= end,
        "borrowed data at {p:#x}+{} is not inside the received buffer {start:#x}..{end:#x}",
        part.len()
    );
    p - start
}

// ---------------------------------------------------------------------------
// A realistic message type
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
enum Kind {
    Empty,
    Text(String),
    Pair { left: i32, right: i64 },
    Chunk(Vec<u8>),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Header {
    seq: u64,
    from: char,
    tags: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Msg {
    header: Header,
    name: String,
    body: Vec<u8>,
    kind: Kind,
    reply_to: Option<u64>,
    ratio: f32,
}

const LARGE: usize = 1024 * 1024;

/// The messages side `from` sends: index 0 is the empty-ish one, one in the
/// middle carries a 1 MiB body, the rest vary.
fn messages(from: char, count: u64) -> Vec<Msg> {
    (0..count)
        .map(|i| {
            let seed = u64::from(from) << 32 | i;
            if i == 0 {
                return Msg {
                    header: Header {
                        seq: 0,
                        from,
                        tags: Vec::new(),
                    },
                    name: String::new(),
                    body: Vec::new(),
                    kind: Kind::Empty,
                    reply_to: None,
                    ratio: 0.0,
                };
            }
            let body_len = if i == count / 2 {
                LARGE
            } else {
                (i as usize * 37) % 700
            };
            let kind = match i % 4 {
                0 => Kind::Empty,
                1 => Kind::Text(format!("text #{i} from {from} – ünïcödé ✓")),
                2 => Kind::Pair {
                    left: -(i as i32),
                    right: i64::MAX - i as i64,
                },
                _ => Kind::Chunk(pattern(i as usize % 50, seed ^ 1)),
            };
            Msg {
                header: Header {
                    seq: i * 1_000_003,
                    from,
                    tags: (0..i % 3).map(|t| format!("tag{t}")).collect(),
                },
                name: format!("{from}-{i}"),
                body: pattern(body_len, seed),
                kind,
                reply_to: (i % 2 == 0).then_some(i - 1),
                ratio: i as f32 / 8.0,
            }
        })
        .collect()
}

/// A short description for failure messages (the full Debug of a 1 MiB
/// body is useless).
fn summary(m: &Msg) -> String {
    format!(
        "{{ header: {:?}, name: {:?}, body: {} bytes, kind: {:?}, reply_to: {:?} }}",
        m.header,
        m.name,
        m.body.len(),
        match &m.kind {
            Kind::Chunk(c) => format!("Chunk({} bytes)", c.len()),
            other => format!("{other:?}"),
        },
        m.reply_to
    )
}

fn assert_same(got: &[Msg], want: &[Msg], direction: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g == w,
            "{direction}: message {i} differs\n got: {}\nwant: {}",
            summary(g),
            summary(w)
        );
    }
    assert_eq!(got.len(), want.len(), "{direction}: message count");
}

/// Sends every message, closes, and checks that the closed sender refuses
/// more. With `sent`, waits there once everything is sent and flushed
/// before closing (see [`round_trip_over`]).
async fn send_all<T: LinkTx>(
    mut tx: BareSender<T, Msg>,
    msgs: Vec<Msg>,
    sent: Option<Arc<Barrier>>,
) {
    for m in &msgs {
        tx.send(m).await.unwrap();
    }
    if let Some(sent) = sent {
        sent.wait().await;
    }
    tx.close().await.unwrap();
    // Closing twice is fine; sending after close is a typed link error.
    tx.close().await.unwrap();
    match tx.send(&msgs[0]).await {
        Err(Error::Link(LinkError::Closed)) => {}
        other => panic!("send after close: expected Link(Closed), got {other:?}"),
    }
}

/// Receives until the clean end of stream, then checks that the end is
/// sticky.
async fn recv_all<T: LinkRx>(mut rx: BareReceiver<T, Msg>) -> Vec<Msg> {
    let mut got = Vec::new();
    while let Some(m) = rx.recv().await.unwrap() {
        got.push(m);
    }
    assert!(
        rx.recv().await.unwrap().is_none(),
        "end of stream is sticky"
    );
    got
}

/// Both directions at once, each half on its own task. With `half_close`,
/// each side closes as soon as it has sent everything, while the other may
/// still be sending; without (WebSocket, where a peer's Close ends both
/// directions), neither closes before both have sent everything.
async fn round_trip_over<A: Link, B: Link>(a: A, b: B, half_close: bool) {
    const COUNT: u64 = 120;
    let from_a = messages('a', COUNT);
    let from_b = messages('b', COUNT);
    assert!(from_a.iter().any(|m| m.body.len() == LARGE));

    let (a_tx, a_rx) = BareConduit::<A, Msg>::new(a).split();
    let (b_tx, b_rx) = BareConduit::<B, Msg>::new(b).split();
    let sent = (!half_close).then(|| Arc::new(Barrier::new(2)));
    let send_a = tokio::spawn(send_all(a_tx, from_a.clone(), sent.clone()));
    let send_b = tokio::spawn(send_all(b_tx, from_b.clone(), sent));
    let recv_a = tokio::spawn(recv_all(a_rx));
    let recv_b = tokio::spawn(recv_all(b_rx));

    send_a.await.unwrap();
    send_b.await.unwrap();
    assert_same(&recv_b.await.unwrap(), &from_a, "a -> b");
    assert_same(&recv_a.await.unwrap(), &from_b, "b -> a");
}

/// Over every transport's connector and listener.
async fn round_trip(t: Transport) {
    bounded(async {
        let mut fx = t.fixture().await;
        let (a, b) = fx.pair().await;
        round_trip_over(a, b, t.half_close()).await;
    })
    .await;
}

transport_tests!(round_trip);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_duplex() {
    bounded(async {
        let (a, b) = duplex_links();
        round_trip_over(a, b, true).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// The unsplit conduit, with different types per direction
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Request {
    Add(u32, u32),
    Echo(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Response {
    Sum(u64),
    Echoed { text: String, len: usize },
}

#[tokio::test]
async fn unsplit_conduit_request_response() {
    bounded(async {
        let (a, b) = mem_links();
        let mut client = BareConduit::<_, Request, Response>::new(a);
        let mut server = BareConduit::<_, Response, Request>::new(b);
        let server_task = tokio::spawn(async move {
            let mut served = 0;
            while let Some(req) = server.recv().await.unwrap() {
                let resp = match req {
                    Request::Add(x, y) => Response::Sum(u64::from(x) + u64::from(y)),
                    Request::Echo(text) => Response::Echoed {
                        len: text.len(),
                        text,
                    },
                };
                server.send(&resp).await.unwrap();
                served += 1;
            }
            served
        });
        for i in 0..50u32 {
            client.send(&Request::Add(i, u32::MAX)).await.unwrap();
            assert_eq!(
                client.recv().await.unwrap(),
                Some(Response::Sum(u64::from(i) + u64::from(u32::MAX)))
            );
            let text = "x".repeat(i as usize);
            client.send(&Request::Echo(text.clone())).await.unwrap();
            assert_eq!(
                client.recv().await.unwrap(),
                Some(Response::Echoed {
                    len: i as usize,
                    text
                })
            );
        }
        // `BareConduit` itself has no `close`; split to close gracefully.
        let (mut tx, _rx) = client.split();
        tx.close().await.unwrap();
        assert_eq!(server_task.await.unwrap(), 100);
    })
    .await;
}

// ---------------------------------------------------------------------------
// feed many, flush once
// ---------------------------------------------------------------------------

/// Feeds many messages (small ones, and some over the stream links' copy
/// threshold) with one flush at the end. On stream links, fed messages must
/// not reach the peer before the flush (`held_until_flush`).
async fn feed_then_flush_over<A: Link, B: Link>(a: A, b: B, held_until_flush: bool) {
    const COUNT: u32 = 2_000;
    let item = |i: u32| -> (u32, Vec<u8>) {
        let len = if i % 250 == 7 {
            6_000
        } else {
            (i % 40) as usize
        };
        (i, pattern(len, u64::from(i)))
    };
    let (mut tx, _a_rx) = BareConduit::<A, (u32, Vec<u8>)>::new(a).split();
    let (_b_tx, mut rx) = BareConduit::<B, (u32, Vec<u8>)>::new(b).split();

    // A first few, well under any write buffer.
    for i in 0..10 {
        tx.feed(&item(i)).await.unwrap();
    }
    if held_until_flush {
        let early = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
        assert!(
            early.is_err(),
            "a fed message arrived before any flush: {early:?}"
        );
    }

    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(m) = rx.recv().await.unwrap() {
            got.push(m);
        }
        got
    });
    for i in 10..COUNT {
        tx.feed(&item(i)).await.unwrap();
    }
    tx.flush().await.unwrap();
    tx.close().await.unwrap();

    let got = reader.await.unwrap();
    assert_eq!(got.len(), COUNT as usize);
    for (i, m) in got.iter().enumerate() {
        assert!(*m == item(i as u32), "message {i} out of order or corrupt");
    }
}

async fn feed_then_flush(t: Transport) {
    bounded(async {
        let mut fx = t.fixture().await;
        let (a, b) = fx.pair().await;
        // The in-memory link hands payloads over on `feed` already; the
        // byte-stream links (TLS included) and the WebSocket links write on
        // flush.
        feed_then_flush_over(a, b, t != Transport::Mem).await;
    })
    .await;
}

transport_tests!(feed_then_flush);

#[tokio::test]
async fn feed_then_flush_duplex() {
    bounded(async {
        let (a, b) = duplex_links();
        feed_then_flush_over(a, b, true).await;
    })
    .await;
}

#[tokio::test]
async fn recv_bytes_is_the_postcard_encoding() {
    bounded(async {
        let (a, b) = mem_links();
        let (mut tx, _) = BareConduit::<_, Msg>::new(a).split();
        let (_, mut rx) = BareConduit::<_, Msg>::new(b).split();
        let msgs = messages('z', 5);
        for m in &msgs {
            tx.send(m).await.unwrap();
        }
        for m in &msgs {
            let bytes = rx.recv_bytes().await.unwrap().unwrap();
            assert_eq!(bytes[..], postcard::to_allocvec(m).unwrap()[..]);
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Borrowed receives
// ---------------------------------------------------------------------------

/// What the sending side writes. `untagged` makes each variant encode
/// exactly as its content, so one sender can produce payloads that the
/// receiver reads as different types.
#[derive(Serialize, Debug)]
#[serde(untagged)]
enum Wire {
    Text(String),
    Blob(Vec<u8>),
    Number(u64),
    Record(WireRecord),
}

#[derive(Serialize, Debug, Clone)]
struct WireRecord {
    name: String,
    id: u32,
    blob: Vec<u8>,
    note: String,
}

/// The borrowed view of a [`WireRecord`].
#[derive(Deserialize, yoke::Yokeable, Debug)]
struct Record<'a> {
    #[serde(borrow)]
    name: &'a str,
    id: u32,
    #[serde(borrow)]
    blob: &'a [u8],
    #[serde(borrow)]
    note: Cow<'a, str>,
}

const TEXT: &str = "borrowed text – not copied ✓ (ünïcödé)";

fn blob() -> Vec<u8> {
    pattern(3_000, 42)
}

fn record() -> WireRecord {
    WireRecord {
        name: "record name".to_owned(),
        id: 0xdead_beef,
        blob: pattern(500, 7),
        note: "a note borrowed through Cow".to_owned(),
    }
}

/// Checks the three borrowed messages: contents, and that every borrowed
/// field points into the message's own buffer.
fn check_borrowed(
    text: &Borrowed<&'static str>,
    bytes: &Borrowed<&'static [u8]>,
    rec: &Borrowed<Record<'static>>,
) {
    let s: &str = text.get();
    assert_eq!(s, TEXT);
    // The string is the tail of the payload, after its varint length.
    let at = offset_inside(s.as_bytes(), text.bytes());
    assert_eq!(at + s.len(), text.bytes().len());

    let b: &[u8] = bytes.get();
    assert_eq!(b, &blob()[..]);
    let at = offset_inside(b, bytes.bytes());
    // 3000 as a varint is two bytes.
    assert_eq!(at, 2);
    assert_eq!(&bytes.bytes()[..2], &[0xb8, 0x17]);

    let r = rec.get();
    let want = record();
    assert_eq!(r.name, want.name);
    assert_eq!(r.id, want.id);
    assert_eq!(r.blob, &want.blob[..]);
    assert_eq!(r.note, want.note);
    offset_inside(r.name.as_bytes(), rec.bytes());
    offset_inside(r.blob, rec.bytes());
    match &r.note {
        Cow::Borrowed(note) => {
            offset_inside(note.as_bytes(), rec.bytes());
        }
        Cow::Owned(_) => panic!("#[serde(borrow)] Cow field was copied"),
    }
}

async fn borrowed_over<A: Link, B: Link>(a: A, b: B) {
    let (mut tx, _a_rx) = BareConduit::<A, Wire>::new(a).split();
    let (_b_tx, mut rx) = BareConduit::<B, ()>::new(b).split();

    tx.send(&Wire::Text(TEXT.to_owned())).await.unwrap();
    tx.send(&Wire::Blob(blob())).await.unwrap();
    tx.send(&Wire::Record(record())).await.unwrap();

    let text = rx.recv_borrowed::<&'static str>().await.unwrap().unwrap();
    let bytes = rx.recv_borrowed::<&'static [u8]>().await.unwrap().unwrap();
    let rec = rx
        .recv_borrowed::<Record<'static>>()
        .await
        .unwrap()
        .unwrap();
    check_borrowed(&text, &bytes, &rec);

    // Move the three messages to another task, which reads them only after
    // the conduit has received (and dropped) much more traffic.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        go_rx.await.unwrap();
        check_borrowed(&text, &bytes, &rec);
        format!("{:?}", rec)
    });

    let sender = tokio::spawn(async move {
        for i in 0..40u64 {
            let len = if i % 10 == 3 {
                300_000
            } else {
                100 + i as usize
            };
            tx.send(&Wire::Blob(pattern(len, 1_000 + i))).await.unwrap();
            tx.send(&Wire::Text(format!("filler {i}"))).await.unwrap();
            tx.send(&Wire::Number(i)).await.unwrap();
        }
        tx.close().await.unwrap();
    });
    for i in 0..40u64 {
        let len = if i % 10 == 3 {
            300_000
        } else {
            100 + i as usize
        };
        let b = rx.recv_borrowed::<&'static [u8]>().await.unwrap().unwrap();
        assert_eq!(*b.get(), &pattern(len, 1_000 + i)[..]);
        offset_inside(b.get(), b.bytes());
        let t = rx.recv_borrowed::<&'static str>().await.unwrap().unwrap();
        assert_eq!(*t.get(), format!("filler {i}"));
        let n = rx.recv_bytes().await.unwrap().unwrap();
        assert_eq!(tether::proto::frame::decode_item::<u64>(&n).unwrap(), i);
    }
    assert!(rx.recv_borrowed::<&'static str>().await.unwrap().is_none());
    sender.await.unwrap();

    go_tx.send(()).unwrap();
    let debug = holder.await.unwrap();
    assert!(debug.contains("record name"), "{debug}");
}

async fn borrowed(t: Transport) {
    bounded(async {
        let mut fx = t.fixture().await;
        let (a, b) = fx.pair().await;
        borrowed_over(a, b).await;
    })
    .await;
}

transport_tests!(borrowed);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_duplex() {
    bounded(async {
        let (a, b) = duplex_links();
        borrowed_over(a, b).await;
    })
    .await;
}

/// End to end over the in-memory link, which passes payloads by reference:
/// the buffer a `Borrowed` holds is the very `Bytes` the sender handed to
/// the link, and the message points into it.
#[tokio::test]
async fn borrowed_mem_keeps_the_senders_buffer() {
    bounded(async {
        let (a, b) = mem_links();
        let (mut tx, _) = BareConduit::<_, ()>::new(a).split();
        let (_, mut rx) = BareConduit::<_, ()>::new(b).split();

        let mut encoded = postcard::to_allocvec(TEXT).unwrap();
        encoded.shrink_to_fit();
        let payload = Bytes::from(encoded);
        let (start, len) = (payload.as_ptr(), payload.len());
        LinkTx::send(tx.get_mut(), payload).await.unwrap();

        let msg = rx.recv_borrowed::<&'static str>().await.unwrap().unwrap();
        assert_eq!(msg.bytes().as_ptr(), start, "the payload was copied");
        assert_eq!(msg.bytes().len(), len);
        let at = offset_inside(msg.get().as_bytes(), msg.bytes());
        assert_eq!(at, 1);
        assert_eq!(*msg.get(), TEXT);
    })
    .await;
}

#[test]
fn borrowed_decode_keeps_the_given_buffer() {
    let payload = Bytes::from(postcard::to_allocvec(&(7u8, TEXT)).unwrap());
    let start = payload.as_ptr();
    let msg = Borrowed::<(u8, &'static str)>::decode(payload).unwrap();
    assert_eq!(msg.bytes().as_ptr(), start, "the payload was copied");
    let (n, s) = *msg.get();
    assert_eq!((n, s), (7, TEXT));
    assert_eq!(offset_inside(s.as_bytes(), msg.bytes()), 2);
}

/// `Vec<u8>` (a serde sequence) and `&[u8]` encode to the same postcard
/// bytes, which is why a `Vec<u8>` sender can feed a `&[u8]` borrower.
#[test]
fn vec_and_slice_encode_alike() {
    let data = pattern(200, 3);
    let as_vec = postcard::to_allocvec(&data).unwrap();
    let as_slice = postcard::to_allocvec(&data[..]).unwrap();
    assert_eq!(as_vec, as_slice);
    assert_eq!(&as_vec[..2], &[0xc8, 0x01]);
    assert_eq!(&as_vec[2..], &data[..]);
}

/// A top-level `Cow<'static, str>` is accepted by `recv_borrowed` but
/// serde's `Deserialize for Cow` always builds `Cow::Owned`: it copies.
/// Only a `#[serde(borrow)]` field (see [`Record::note`]) borrows.
#[tokio::test]
async fn borrowed_top_level_cow_is_owned() {
    bounded(async {
        let (a, b) = mem_links();
        let (mut tx, _) = BareConduit::<_, String>::new(a).split();
        let (_, mut rx) = BareConduit::<_, ()>::new(b).split();
        tx.send(&TEXT.to_owned()).await.unwrap();
        let cow = rx
            .recv_borrowed::<Cow<'static, str>>()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cow.get(), TEXT);
        assert!(matches!(cow.get(), Cow::Owned(_)));
    })
    .await;
}

// ---------------------------------------------------------------------------
// Decode failures
// ---------------------------------------------------------------------------

fn expect_decode_error(result: Result<Option<u64>, Error>) -> Error {
    match result {
        Err(err @ Error::Decode { seq: None, .. }) => err,
        other => panic!("expected Error::Decode {{ seq: None, .. }}, got {other:?}"),
    }
}

/// A `String` received as `u64`: its length decodes as the number and its
/// bytes are left over. The conduit stays usable.
async fn wrong_type_over<A: Link, B: Link>(a: A, b: B) {
    let (mut tx, _a_rx) = BareConduit::<A, Wire>::new(a).split();
    let (_b_tx, mut rx) = BareConduit::<B, (), u64>::new(b).split();

    tx.send(&Wire::Text("hello".to_owned())).await.unwrap();
    tx.send(&Wire::Number(u64::MAX)).await.unwrap();
    tx.send(&Wire::Text("y".repeat(200))).await.unwrap();
    tx.send(&Wire::Number(300)).await.unwrap();
    tx.close().await.unwrap();

    let err = expect_decode_error(rx.recv().await);
    assert!(
        matches!(
            err,
            Error::Decode {
                seq: None,
                expected: "u64",
                error: FrameError::TrailingBytes(5),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "could not decode message as u64: frame item decoded but 5 trailing byte(s) were left over"
    );
    assert_eq!(rx.recv().await.unwrap(), Some(u64::MAX));

    let err = expect_decode_error(rx.recv().await);
    assert!(
        matches!(
            err,
            Error::Decode {
                seq: None,
                expected: "u64",
                error: FrameError::TrailingBytes(200),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(rx.recv().await.unwrap(), Some(300));
    assert_eq!(rx.recv().await.unwrap(), None);
}

async fn wrong_type_is_decode_error(t: Transport) {
    bounded(async {
        let mut fx = t.fixture().await;
        let (a, b) = fx.pair().await;
        wrong_type_over(a, b).await;
    })
    .await;
}

transport_tests!(wrong_type_is_decode_error);

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Color {
    Red,
    Green,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Small {
    flag: bool,
    name: String,
    color: Color,
    extra: Option<u8>,
}

/// Garbage written straight to the link, each followed by a valid message.
#[tokio::test]
async fn garbage_is_typed_decode_error_and_conduit_survives() {
    bounded(async {
        let (a, b) = mem_links();
        let (mut tx, _) = BareConduit::<_, Small>::new(a).split();
        let (_, mut rx) = BareConduit::<_, (), Small>::new(b).split();

        let valid = |i: u8| Small {
            flag: i % 2 == 0,
            name: format!("valid {i}"),
            color: Color::Green,
            extra: Some(i),
        };
        // The well-formed encoding of Small { true, "hi", Green, None }.
        let good: &[u8] = &[0x01, 0x02, b'h', b'i', 0x01, 0x00];
        assert_eq!(
            tether::proto::frame::decode_item::<Small>(good).unwrap(),
            Small {
                flag: true,
                name: "hi".to_owned(),
                color: Color::Green,
                extra: None
            }
        );
        let mut trailing = good.to_vec();
        trailing.extend_from_slice(&[0xaa, 0xbb]);

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty payload", vec![]),
            ("bool 2", vec![0x02, 0x00, 0x00, 0x00]),
            ("bad utf-8", vec![0x01, 0x02, 0xff, 0xfe, 0x00, 0x00]),
            ("enum variant 7", vec![0x01, 0x00, 0x07, 0x00]),
            ("option tag 5", vec![0x01, 0x00, 0x00, 0x05]),
            ("string cut short", vec![0x01, 0x05, b'a']),
            ("trailing bytes", trailing),
        ];
        for (i, (_, garbage)) in cases.iter().enumerate() {
            LinkTx::send(tx.get_mut(), Bytes::from(garbage.clone()))
                .await
                .unwrap();
            tx.send(&valid(i as u8)).await.unwrap();
        }

        for (i, (what, _)) in cases.iter().enumerate() {
            let err = match rx.recv().await {
                Err(err) => err,
                Ok(m) => panic!("{what}: decoded as {m:?}"),
            };
            let Error::Decode {
                seq: None,
                error: source,
                ..
            } = &err
            else {
                panic!("{what}: expected Decode {{ seq: None, .. }}, got {err:?}");
            };
            let fits = match *what {
                "empty payload" | "string cut short" => matches!(
                    source,
                    FrameError::Decode(postcard::Error::DeserializeUnexpectedEnd)
                ),
                "bool 2" => matches!(
                    source,
                    FrameError::Decode(postcard::Error::DeserializeBadBool)
                ),
                "bad utf-8" => matches!(
                    source,
                    FrameError::Decode(postcard::Error::DeserializeBadUtf8)
                ),
                // serde's derived visitor rejects the index with a custom
                // error.
                "enum variant 7" => {
                    matches!(source, FrameError::Decode(postcard::Error::SerdeDeCustom))
                }
                "option tag 5" => matches!(
                    source,
                    FrameError::Decode(postcard::Error::DeserializeBadOption)
                ),
                "trailing bytes" => matches!(source, FrameError::TrailingBytes(2)),
                _ => unreachable!(),
            };
            assert!(fits, "{what}: unexpected source {source:?}");

            // Display says what failed, the cause once (no source chain
            // to repeat it); as io::Error it is invalid data.
            let text = err.to_string();
            assert!(
                text.starts_with("could not decode message as bare::Small: "),
                "{text}"
            );
            assert!(text.ends_with(&source.to_string()), "{text}");
            assert_eq!(text.matches(&source.to_string()).count(), 1, "{text}");
            assert!(std::error::Error::source(&err).is_none(), "{text}");
            assert_eq!(
                std::io::Error::from(err).kind(),
                std::io::ErrorKind::InvalidData
            );

            assert_eq!(rx.recv().await.unwrap(), Some(valid(i as u8)), "{what}");
        }
    })
    .await;
}

#[tokio::test]
async fn borrowed_decode_error_keeps_conduit_usable() {
    bounded(async {
        let (a, b) = mem_links();
        let (mut tx, _) = BareConduit::<_, String>::new(a).split();
        let (_, mut rx) = BareConduit::<_, ()>::new(b).split();

        LinkTx::send(tx.get_mut(), Bytes::from_static(&[0x02, 0xff, 0xfe]))
            .await
            .unwrap();
        tx.send(&"fine".to_owned()).await.unwrap();
        LinkTx::send(tx.get_mut(), Bytes::from_static(&[0x09, b'x']))
            .await
            .unwrap();
        tx.send(&"still fine".to_owned()).await.unwrap();

        match rx.recv_borrowed::<&'static str>().await {
            Err(Error::Decode {
                seq: None,
                expected: "&str",
                error: FrameError::Decode(postcard::Error::DeserializeBadUtf8),
                ..
            }) => {}
            other => panic!("expected a bad-utf-8 Decode error, got {other:?}"),
        }
        assert_eq!(
            *rx.recv_borrowed::<&'static str>()
                .await
                .unwrap()
                .unwrap()
                .get(),
            "fine"
        );
        match rx.recv_borrowed::<&'static [u8]>().await {
            Err(Error::Decode {
                seq: None,
                expected: "&[u8]",
                error: FrameError::Decode(postcard::Error::DeserializeUnexpectedEnd),
                ..
            }) => {}
            other => panic!("expected an unexpected-end Decode error, got {other:?}"),
        }
        assert_eq!(
            *rx.recv_borrowed::<&'static str>()
                .await
                .unwrap()
                .unwrap()
                .get(),
            "still fine"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// Encode failures
// ---------------------------------------------------------------------------

/// Serializes as a `u32`, or writes part of a tuple and then fails.
struct MaybeFails {
    value: u32,
    fail: bool,
}

impl Serialize for MaybeFails {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeTuple};
        if !self.fail {
            return serializer.serialize_u32(self.value);
        }
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(&self.value)?;
        tuple.serialize_element("partial")?;
        Err(S::Error::custom("refusing to finish"))
    }
}

#[tokio::test]
async fn encode_error_sends_nothing_and_conduit_survives() {
    bounded(async {
        let (a, b) = mem_links();
        let (mut tx, _) = BareConduit::<_, MaybeFails>::new(a).split();
        let (_, mut rx) = BareConduit::<_, (), u32>::new(b).split();

        for (i, via_feed) in [(1u32, false), (2, true)] {
            let bad = MaybeFails {
                value: 0xffff,
                fail: true,
            };
            let err = if via_feed {
                tx.feed(&bad).await.unwrap_err()
            } else {
                tx.send(&bad).await.unwrap_err()
            };
            assert!(
                matches!(
                    err,
                    Error::Encode(FrameError::Encode(postcard::Error::SerdeSerCustom))
                ),
                "{err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with("could not encode message: could not serialize the frame item"),
                "{err}"
            );
            tx.send(&MaybeFails {
                value: i,
                fail: false,
            })
            .await
            .unwrap();
        }
        tx.close().await.unwrap();

        // Exactly the two good messages arrive, with no partial bytes of the
        // failed ones in front of them.
        for i in 1..=2u8 {
            assert_eq!(rx.recv_bytes().await.unwrap().unwrap()[..], [i]);
        }
        assert_eq!(rx.recv_bytes().await.unwrap(), None);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Link failures
// ---------------------------------------------------------------------------

/// Asserts that a conduit call failed with `Error::Link(LinkError::$kind)`.
macro_rules! assert_link {
    ($result:expr, $kind:ident) => {{
        let result = &$result;
        assert!(
            matches!(result, Err(Error::Link(LinkError::$kind))),
            "{}: expected Link({}), got {result:?}",
            stringify!($result),
            stringify!($kind)
        );
    }};
}

#[tokio::test]
async fn killed_mem_link_is_reset_then_dead() {
    bounded(async {
        let (a, b) = mem_links();
        let killer = a.killer();
        let (mut a_tx, mut a_rx) = BareConduit::<_, u32>::new(a).split();
        let (mut b_tx, mut b_rx) = BareConduit::<_, u32>::new(b).split();

        a_tx.send(&1).await.unwrap();
        assert_eq!(b_rx.recv().await.unwrap(), Some(1));

        // A receive waiting when the link dies is woken with the error.
        let waiting = tokio::spawn(async move {
            let first = a_rx.recv().await;
            (first, a_rx)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "recv returned with nothing sent");

        // In flight when the link dies: lost, as on a real network.
        a_tx.send(&2).await.unwrap();
        killer.kill();
        assert!(killer.is_killed());

        let (first, mut a_rx) = waiting.await.unwrap();
        assert_link!(first, Reset);
        assert_link!(a_rx.recv().await, Dead);
        assert_link!(a_rx.recv_bytes().await, Dead);
        assert_link!(a_rx.recv_borrowed::<&'static str>().await, Dead);

        let err = b_rx.recv().await;
        assert_link!(err, Reset);
        let err = err.unwrap_err();
        assert_eq!(
            err.to_string(),
            "link failed: link reset: the peer vanished without closing"
        );
        assert_eq!(
            std::io::Error::from(err).kind(),
            std::io::ErrorKind::ConnectionReset
        );
        assert_link!(b_rx.recv().await, Dead);

        assert_link!(a_tx.send(&3).await, Reset);
        assert_link!(a_tx.send(&3).await, Dead);
        assert_link!(a_tx.feed(&3).await, Dead);
        assert_link!(a_tx.flush().await, Dead);
        assert_link!(a_tx.close().await, Dead);

        assert_link!(b_tx.feed(&4).await, Reset);
        assert_link!(b_tx.flush().await, Dead);
        assert_link!(b_tx.send(&4).await, Dead);
    })
    .await;
}

#[tokio::test]
async fn killed_while_sender_waits_for_capacity() {
    bounded(async {
        let (a, b) = mem::pair(1);
        let killer = b.killer();
        let (mut tx, _a_rx) = BareConduit::<_, u32>::new(a).split();
        let (_b_tx, _b_rx) = BareConduit::<_, u32>::new(b).split();
        tx.send(&1).await.unwrap();
        // The channel holds one payload; this one waits for room.
        let waiting = tokio::spawn(async move {
            let first = tx.send(&2).await;
            (first, tx)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "send did not wait for capacity");
        killer.kill();
        let (first, mut tx) = waiting.await.unwrap();
        assert_link!(first, Reset);
        assert_link!(tx.send(&3).await, Dead);
    })
    .await;
}

#[tokio::test]
async fn peer_dropped_without_close_is_reset() {
    bounded(async {
        let (a, b) = mem_links();
        let (a_tx, a_rx) = BareConduit::<_, u32>::new(a).split();
        let (mut b_tx, mut b_rx) = BareConduit::<_, u32>::new(b).split();
        drop(a_tx);
        assert_link!(b_rx.recv().await, Reset);
        assert_link!(b_rx.recv().await, Dead);
        drop(a_rx);
        assert_link!(b_tx.send(&1).await, Reset);
        assert_link!(b_tx.send(&1).await, Dead);
    })
    .await;
}

#[tokio::test]
async fn oversized_message_is_link_error() {
    bounded(async {
        let (a, b) = mem::pair_with_config(MemConfig {
            capacity: 4,
            max_payload: 1024,
        });
        let (mut tx, _) = BareConduit::<_, Vec<u8>>::new(a).split();
        let (_, mut rx) = BareConduit::<_, (), Vec<u8>>::new(b).split();

        // 1022 bytes plus a 2-byte length: exactly the maximum.
        tx.send(&vec![9; 1022]).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap().len(), 1022);

        match tx.send(&vec![9; 1023]).await {
            Err(Error::Link(LinkError::TooLarge {
                len: 1025,
                max: 1024,
            })) => {}
            other => panic!("expected Link(TooLarge {{ 1025, 1024 }}), got {other:?}"),
        }
        // Like every link error, fatal to the sending half.
        assert_link!(tx.send(&vec![1]).await, Dead);
    })
    .await;
}

/// The unsplit conduit offers the halves' methods: feed, flush, borrowed
/// receive, close.
#[tokio::test]
async fn unsplit_conduit_feeds_borrows_and_closes() {
    let (a, b) = tether::link::mem::pair(16);
    let mut a = tether::BareConduit::<_, String>::new(a);
    let mut b = tether::BareConduit::<_, String>::new(b);
    a.feed(&"one".to_string()).await.unwrap();
    a.feed(&"two".to_string()).await.unwrap();
    a.flush().await.unwrap();
    a.close().await.unwrap();
    let one = b.recv_borrowed::<&'static str>().await.unwrap().unwrap();
    assert_eq!(*one.get(), "one");
    assert_eq!(b.recv().await.unwrap().as_deref(), Some("two"));
    assert!(b.recv().await.unwrap().is_none());
}
