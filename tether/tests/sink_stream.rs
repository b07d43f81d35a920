//! `futures` `Sink` and `Stream` on stable conduits: `SinkExt` and
//! `StreamExt` both ways, `feed` then `flush`, `forward` and `send_all`,
//! the stream's end, its terminal and per-message errors, backpressure
//! through `poll_ready`, a `send_all` cancelled part-way, and 20,000
//! messages each way through `forward` over TCP links a fault proxy cuts
//! every few KiB.
//!
//! Nothing here waits for a timer to decide an outcome: a wait that must
//! stay pending is checked for a while (a slow machine can only make such a
//! check pass for the wrong reason, never fail it), and every wait that
//! must end has a generous deadline.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{stream, Sink, SinkExt, StreamExt};
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::{mem, TcpConnector, TcpListener};
use tether::{Config, Error, Server, SessionLost, StableConduit};
use tokio::time::timeout;

/// Deadline for anything that must finish.
const LONG: Duration = Duration::from_secs(60);

/// Every configuration of this file, in one place: fast reconnects,
/// reproducible jitter, and optionally a replay bound of `replay_frames`
/// messages or a give-up deadline.
fn config(seed: u64, replay_frames: Option<usize>, give_up_after: Option<Duration>) -> Config {
    let c = Config::default()
        .seed(seed)
        .handshake_timeout(Duration::from_secs(5))
        .reconnect_with(|r| {
            r.min_backoff(Duration::from_millis(1))
                .max_backoff(Duration::from_millis(20))
                .give_up_after(Some(give_up_after.unwrap_or(Duration::from_secs(60))))
        });
    match replay_frames {
        Some(frames) => c.max_replay(1 << 20, frames),
        None => c,
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    timeout(LONG, f)
        .await
        .unwrap_or_else(|_| panic!("stuck: {what}"))
}

/// [`within`], naming the seed of the run.
async fn within_seed<T>(seed: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    timeout(LONG, f)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: stuck: {what}"))
}

/// A server, a client conduit and its session over an in-memory link.
async fn mem_pair<S, R>(
    client_cfg: Config,
) -> (
    Server<R, S>,
    mem::MemConnector,
    StableConduit<S, R>,
    StableConduit<R, S>,
)
where
    S: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    R: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let (listener, connector) = mem::listener(64);
    let server = Server::<R, S>::new(listener, config(1, None, None));
    let client = StableConduit::<S, R>::connect(connector.clone(), client_cfg)
        .await
        .expect("connect");
    let session = within("accept", server.accept()).await.expect("a session");
    (server, connector, client, session)
}

// ---- SinkExt and StreamExt ----

#[tokio::test]
async fn sink_send_and_stream_next_both_ways() {
    let (_server, _c, mut client, mut session) =
        mem_pair::<String, String>(config(2, None, None)).await;
    // The conduits themselves.
    SinkExt::send(&mut client, "ping".to_string())
        .await
        .unwrap();
    assert_eq!(session.next().await.unwrap().unwrap(), "ping");
    SinkExt::send(&mut session, "pong".to_string())
        .await
        .unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), "pong");
    // And their halves.
    let (mut ctx, mut crx) = client.split();
    let (mut stx, mut srx) = session.split();
    for i in 0..10 {
        SinkExt::send(&mut ctx, format!("c{i}")).await.unwrap();
        SinkExt::send(&mut stx, format!("s{i}")).await.unwrap();
    }
    for i in 0..10 {
        assert_eq!(srx.next().await.unwrap().unwrap(), format!("c{i}"));
        assert_eq!(crx.next().await.unwrap().unwrap(), format!("s{i}"));
    }
    // A clone is a sink of its own, on the same session.
    let mut clone = ctx.clone();
    SinkExt::send(&mut clone, "from a clone".to_string())
        .await
        .unwrap();
    assert_eq!(srx.next().await.unwrap().unwrap(), "from a clone");
}

/// `feed` queues without flushing; `flush` is ready once everything fed is
/// in the replay buffer, and it all arrives in order.
#[tokio::test]
async fn feed_many_then_flush() {
    const N: u64 = 5_000;
    let (_server, _c, client, mut session) = mem_pair::<u64, u64>(config(3, None, None)).await;
    let (mut tx, _rx) = client.split();
    let reader = tokio::spawn(async move {
        for want in 0..N {
            let got = within("read", session.next()).await.expect("ended early");
            assert_eq!(got.unwrap(), want);
        }
        session
    });
    for i in 0..N {
        within("feed", tx.feed(i)).await.unwrap();
    }
    within("flush", SinkExt::flush(&mut tx)).await.unwrap();
    within("reader", reader).await.unwrap();
}

// ---- forward and send_all ----

/// A client's `send_all` into its session, whose stream is `forward`ed into
/// a second session; the second client reads every message exactly once
/// and in order, then the end: the first client's close ends the first
/// stream, and `forward` closes the second session when it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_pipes_one_session_into_another() {
    const N: u64 = 10_000;
    let (listener, connector) = mem::listener(64);
    let server = Server::<u64>::new(listener, config(4, None, None));
    let first = StableConduit::<u64>::connect(connector.clone(), config(5, Some(64), None))
        .await
        .unwrap();
    let first_session = within("accept", server.accept()).await.unwrap();
    let second = StableConduit::<u64>::connect(connector, config(6, None, None))
        .await
        .unwrap();
    let second_session = within("accept", server.accept()).await.unwrap();

    let (_unused, inbound) = first_session.split();
    let pipe = tokio::spawn(inbound.forward(second_session));
    let (mut tx, _rx) = first.split();
    let mut items = stream::iter(0..N).map(Ok);
    within("send_all", tx.send_all(&mut items)).await.unwrap();
    within("close", SinkExt::close(&mut tx)).await.unwrap();

    let (_tx2, mut rx2) = second.split();
    for want in 0..N {
        let got = within("read", rx2.next()).await;
        assert_eq!(got.expect("ended early").unwrap(), want);
    }
    assert!(within("end", rx2.next()).await.is_none());
    within("pipe", pipe).await.unwrap().unwrap();
}

// ---- how the stream ends ----

#[tokio::test]
async fn stream_ends_with_none_after_the_peer_closes() {
    let (_server, _c, client, mut session) =
        mem_pair::<String, String>(config(7, None, None)).await;
    client.send("one").await.unwrap();
    client.send("two").await.unwrap();
    within("close", client.close()).await.unwrap();
    assert_eq!(session.next().await.unwrap().unwrap(), "one");
    assert_eq!(session.next().await.unwrap().unwrap(), "two");
    assert!(session.next().await.is_none());
    assert!(futures_util::stream::FusedStream::is_terminated(&session));
    assert!(session.next().await.is_none(), "fused");
}

/// A lost session: the messages that arrived first, then the loss once,
/// then `None` for good (where `recv` would keep returning the loss).
#[tokio::test]
async fn a_terminal_error_is_yielded_once_then_none() {
    let (_server, connector, client, session) =
        mem_pair::<u32, u32>(config(8, None, Some(Duration::from_millis(300)))).await;
    for i in 0..3 {
        session.send(&i).await.unwrap();
    }
    within("delivery", async {
        while client.stats().frames_received < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The client cannot come back: it gives up.
    connector.set_refuse(true);
    connector.kill_all();
    let (_tx, mut rx) = client.split();
    for want in 0..3 {
        assert_eq!(rx.next().await.unwrap().unwrap(), want);
    }
    match within("loss", rx.next()).await {
        Some(Err(Error::SessionLost(SessionLost::GaveUp { .. }))) => {}
        other => panic!("expected the loss, got {other:?}"),
    }
    assert!(rx.next().await.is_none());
    assert!(rx.next().await.is_none());
    // recv still says why.
    assert!(matches!(rx.recv().await, Err(Error::SessionLost(_))));
}

/// A message that does not decode is an error item; the next one arrives.
#[tokio::test]
async fn a_decode_error_is_an_item_and_the_stream_goes_on() {
    let (listener, connector) = mem::listener(64);
    let server = Server::<u64>::new(listener, config(9, None, None));
    let client = StableConduit::<String>::connect(connector, config(10, None, None))
        .await
        .unwrap();
    let mut session = within("accept", server.accept()).await.unwrap();
    client.send("not a u64").await.unwrap();
    client.send("").await.unwrap(); // encodes as the u64 0
    match session.next().await {
        Some(Err(Error::Decode { expected, .. })) => assert_eq!(expected, "u64"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert_eq!(session.next().await.unwrap().unwrap(), 0);
}

// ---- backpressure ----

fn poll_ready<S: Sink<u64> + Unpin>(
    sink: &mut S,
) -> impl std::future::Future<Output = Result<(), S::Error>> + '_ {
    poll_fn(move |cx| Pin::new(&mut *sink).poll_ready(cx))
}

/// A replay bound of 4 messages and a peer that does not read: four
/// messages go into the buffer, the fifth is held by the sink, and
/// `poll_ready` stays pending until the peer reads and acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_ready_waits_for_room_in_the_replay_buffer() {
    let (_server, _c, client, mut session) = mem_pair::<u64, u64>(config(11, Some(4), None)).await;
    let (mut tx, _rx) = client.split();
    for i in 0..5 {
        // `feed` waits for readiness first: the first five go through.
        within("feed", tx.feed(i)).await.unwrap();
    }
    assert_eq!(tx.stats().replay_frames, 4);
    let ready = timeout(Duration::from_millis(300), poll_ready(&mut tx)).await;
    assert!(
        ready.is_err(),
        "poll_ready completed with a full buffer and a peer that does not read"
    );
    let waiting = tokio::spawn(async move {
        poll_ready(&mut tx).await.unwrap();
        tx
    });
    for want in 0..5 {
        assert_eq!(within("read", session.next()).await.unwrap().unwrap(), want);
    }
    let mut tx = within("poll_ready after the peer read", waiting)
        .await
        .unwrap();
    SinkExt::send(&mut tx, 5).await.unwrap();
    assert_eq!(within("read", session.next()).await.unwrap().unwrap(), 5);
}

/// A sink that records what its inner sink accepted (`start_send` Ok).
struct Recording<'a, S> {
    inner: &'a mut S,
    accepted: &'a mut Vec<u64>,
}

impl<S: Sink<u64> + Unpin> Sink<u64> for Recording<'_, S> {
    type Error = S::Error;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut *self.inner).poll_ready(cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: u64) -> Result<(), S::Error> {
        Pin::new(&mut *self.inner).start_send(item)?;
        self.accepted.push(item);
        Ok(())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut *self.inner).poll_close(cx)
    }
}

/// `send_all`s dropped part-way, many times, against a small replay bound
/// and a reader that reads in bursts: whatever the sink accepted arrives,
/// once and in order, and nothing else. (An item `send_all` pulled from
/// its stream but never got into the sink is dropped with it; the sink
/// never saw it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_all_loses_and_duplicates_nothing_accepted() {
    const N: u64 = 3_000;
    let (_server, _c, client, mut session) = mem_pair::<u64, u64>(config(12, Some(8), None)).await;
    let (mut tx, _rx) = client.split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(item) = within("read", session.next()).await {
            got.push(item.unwrap());
            if got.len() % 97 == 0 {
                // Read in bursts, so that sends wait for room now and then.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        got
    });
    let mut accepted = Vec::new();
    let mut items = stream::iter(0..N).map(Ok);
    let mut rounds = 0u64;
    let mut cancelled = 0;
    loop {
        rounds += 1;
        let mut sink = Recording {
            inner: &mut tx,
            accepted: &mut accepted,
        };
        // Cancelled after a handful of polls, wherever it stands then.
        let mut send_all = std::pin::pin!(sink.send_all(&mut items));
        let mut polls = 0;
        let done = poll_fn(|cx| match send_all.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if polls > rounds % 7 => Poll::Ready(None),
            Poll::Pending => {
                polls += 1;
                Poll::Pending
            }
        });
        match within("send_all", done).await {
            Some(result) => {
                result.unwrap();
                break;
            }
            None => cancelled += 1,
        }
    }
    assert!(cancelled > 0, "no send_all was cancelled part-way");
    within("flush", SinkExt::flush(&mut tx)).await.unwrap();
    within("close", SinkExt::close(&mut tx)).await.unwrap();
    let got = within("reader", reader).await.unwrap();
    assert_eq!(got, accepted, "received is not exactly what was accepted");
    assert!(
        accepted.windows(2).all(|w| w[0] < w[1]),
        "accepted out of order"
    );
    let dropped = N - accepted.len() as u64;
    assert!(
        dropped <= cancelled,
        "{dropped} items lost over {cancelled} cancellations"
    );
}

// ---- no allocation per message ----

/// Counts the allocations of the current thread (a test's current-thread
/// runtime runs every task of its conduits there).
struct Counting;

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        std::alloc::System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The same 20,000 messages through `send`/`recv`, then through
/// `SinkExt::send`/`StreamExt::next`, on both kinds of conduit: the
/// `Sink` and `Stream` allocate no more per message than the methods
/// (what a future boxed per call would add is one per message).
#[test]
fn sink_and_stream_allocate_no_more_per_message_than_send_and_recv() {
    const N: u64 = 20_000;
    const BATCH: u64 = 100;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (_server, _c, client, session) = mem_pair::<u64, u64>(config(13, None, None)).await;
        let (mut tx, _crx) = client.split();
        let (_stx, mut rx) = session.split();
        let mut stable = [0u64; 2];
        for (round, count) in stable.iter_mut().enumerate() {
            for warm_up in [true, false] {
                let before = allocs();
                for batch in 0..N / BATCH {
                    for i in batch * BATCH..(batch + 1) * BATCH {
                        if round == 0 {
                            tx.send(&i).await.unwrap();
                        } else {
                            SinkExt::send(&mut tx, i).await.unwrap();
                        }
                    }
                    for want in batch * BATCH..(batch + 1) * BATCH {
                        let got = if round == 0 {
                            rx.recv().await.unwrap()
                        } else {
                            rx.next().await.transpose().unwrap()
                        };
                        assert_eq!(got, Some(want));
                    }
                }
                if !warm_up {
                    *count = allocs() - before;
                }
            }
        }
        let (a, b) = mem::pair(1024);
        let mut a = Bare::<u64>::new(a);
        let mut b = Bare::<u64>::new(b);
        let mut bare = [0u64; 2];
        for (round, count) in bare.iter_mut().enumerate() {
            for warm_up in [true, false] {
                let before = allocs();
                for batch in 0..N / BATCH {
                    for i in batch * BATCH..(batch + 1) * BATCH {
                        if round == 0 {
                            a.feed(&i).await.unwrap();
                        } else {
                            SinkExt::feed(&mut a, i).await.unwrap();
                        }
                    }
                    if round == 0 {
                        a.flush().await.unwrap();
                    } else {
                        SinkExt::flush(&mut a).await.unwrap();
                    }
                    for want in batch * BATCH..(batch + 1) * BATCH {
                        let got = if round == 0 {
                            b.recv().await.unwrap()
                        } else {
                            b.next().await.transpose().unwrap()
                        };
                        assert_eq!(got, Some(want));
                    }
                }
                if !warm_up {
                    *count = allocs() - before;
                }
            }
        }
        eprintln!(
            "allocations for {N} messages: stable {stable:?}, bare {bare:?} (methods, Sink/Stream)"
        );
        for (what, [methods, sink_stream]) in [("stable", stable), ("bare", bare)] {
            assert!(
                sink_stream <= methods + N / 50,
                "{what}: {sink_stream} allocations through the Sink and Stream, \
                 {methods} through the methods, for {N} messages"
            );
        }
    });
}

// ---- under cuts ----

/// 20,000 messages from the client through `send_all`, echoed by the
/// server's session with `forward` (its stream into its own sink), back to
/// the client's stream; TCP through a proxy that cuts the connection every
/// few KiB on average. Every message arrives exactly once and in order both
/// ways, then the close ends both streams.
async fn forward_under_cuts(seed: u64) {
    const N: u64 = 20_000;
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: bind: {e}"));
    let addr = listener.local_addr().unwrap();
    let server = Server::<(u64, Vec<u8>)>::new(listener, config(seed, None, None));
    let faults = FaultConfig {
        seed,
        mean_bytes_between_cuts: 6 * 1024,
        handshake_cut_probability: 0.05,
        max_connection_age: None,
    };
    let proxy = FaultProxy::start(addr, faults)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: proxy: {e}"));
    let connector = TcpConnector::new(proxy.local_addr());
    let client = StableConduit::<(u64, Vec<u8>)>::connect(connector, config(seed, None, None))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: connect: {e}"));
    // A cut right after a complete new-session hello leaves the server a
    // session whose client retried: the client's is the newest one.
    // The server counts a session before its hello goes out.
    let created = server.stats().sessions_created;
    let mut taken = 0;
    let session = loop {
        let s = within_seed(seed, "accept", server.accept())
            .await
            .unwrap_or_else(|| panic!("seed {seed}: the server stopped"));
        taken += 1;
        if taken == created {
            break s;
        }
    };
    let (stx, srx) = session.split();
    let echo = tokio::spawn(srx.forward(stx));

    let (mut tx, mut rx) = client.split();
    let payload = |i: u64| vec![(i % 251) as u8; (i % 40) as usize];
    let sender = tokio::spawn(async move {
        let mut items = stream::iter(0..N).map(move |i| Ok((i, payload(i))));
        tx.send_all(&mut items).await.map(|()| tx)
    });
    for want in 0..N {
        match within_seed(seed, "echo", rx.next()).await {
            Some(Ok((i, p))) => {
                assert_eq!(i, want, "seed {seed}: echo {i} where {want} was due");
                assert_eq!(p, payload(i), "seed {seed}: echo {i} corrupted");
            }
            other => panic!("seed {seed}: echo {want}: {other:?}"),
        }
    }
    let mut tx = within_seed(seed, "sender", sender)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("seed {seed}: send_all: {e}"));
    within_seed(seed, "close", SinkExt::close(&mut tx))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: close: {e}"));
    assert!(
        within_seed(seed, "end", rx.next()).await.is_none(),
        "seed {seed}: more after the echoes"
    );
    within_seed(seed, "echo task", echo)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("seed {seed}: forward: {e}"));
    let cuts = proxy.stats().cuts;
    let stats = rx.stats();
    eprintln!(
        "seed {seed}: {cuts} cuts, {} reconnects, {} frames replayed",
        stats.reconnects, stats.frames_replayed
    );
    assert!(cuts >= 10, "seed {seed}: only {cuts} cuts");
    assert!(stats.reconnects > 0, "seed {seed}: never reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_both_ways_under_cuts() {
    for seed in [31, 32] {
        // Whatever fails in the run (an unwrap too) names the seed.
        let run = tokio::spawn(within_seed(seed, "the run", forward_under_cuts(seed)));
        run.await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

// ---- bare conduits ----

type Bare<S, R = S> = tether::BareConduit<mem::MemLink, S, R>;

#[tokio::test]
async fn bare_sink_and_stream_both_ways_then_the_end() {
    let (a, b) = mem::pair(64);
    let mut a = Bare::<String>::new(a);
    let mut b = Bare::<String>::new(b);
    SinkExt::send(&mut a, "ping".to_string()).await.unwrap();
    assert_eq!(b.next().await.unwrap().unwrap(), "ping");
    SinkExt::send(&mut b, "pong".to_string()).await.unwrap();
    assert_eq!(a.next().await.unwrap().unwrap(), "pong");
    // The async methods and the sink keep one order.
    a.feed("one").await.unwrap();
    SinkExt::feed(&mut a, "two".to_string()).await.unwrap();
    a.send("three").await.unwrap();
    for want in ["one", "two", "three"] {
        assert_eq!(b.next().await.unwrap().unwrap(), want);
    }
    SinkExt::close(&mut a).await.unwrap();
    assert!(b.next().await.is_none());
    assert!(b.next().await.is_none(), "fused");
}

/// Many fed, one flush; a decode error is an item and the next message
/// still arrives; `forward` of one bare stream into another conduit ends
/// (and closes the sink) when the first peer closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_feed_flush_decode_error_and_forward() {
    const N: u64 = 5_000;
    let (a, b) = mem::pair(16);
    let (c, d) = mem::pair(16);
    let a = Bare::<u64>::new(a);
    let b = Bare::<u64>::new(b);
    let c = Bare::<u64>::new(c);
    let mut d = Bare::<String, u64>::new(d);
    let (_b_tx, b_rx) = b.split();
    let (c_tx, _c_rx) = c.split();
    let pipe = tokio::spawn(b_rx.forward(c_tx));
    let (mut a_tx, _a_rx) = a.split();
    let feeder = tokio::spawn(async move {
        for i in 0..N {
            SinkExt::feed(&mut a_tx, i).await.unwrap();
        }
        SinkExt::flush(&mut a_tx).await.unwrap();
        SinkExt::close(&mut a_tx).await.unwrap();
    });
    for want in 0..N {
        assert_eq!(within("read", d.next()).await.unwrap().unwrap(), want);
    }
    assert!(within("end", d.next()).await.is_none());
    within("pipe", pipe).await.unwrap().unwrap();
    within("feeder", feeder).await.unwrap();

    let (e, f) = mem::pair(16);
    let mut e = Bare::<String>::new(e);
    let mut f = Bare::<u64>::new(f);
    SinkExt::send(&mut e, "not a u64".to_string())
        .await
        .unwrap();
    SinkExt::send(&mut e, String::new()).await.unwrap();
    assert!(matches!(f.next().await, Some(Err(Error::Decode { .. }))));
    assert_eq!(f.next().await.unwrap().unwrap(), 0);
    // A dead link: the error once, then the end.
    drop(e);
    match f.next().await {
        None | Some(Err(_)) => {}
        other => panic!("expected the end of a dropped link, got {other:?}"),
    }
    assert!(f.next().await.is_none());
}
