//! What a pending handshake and an idle session cost the real `tether echo`
//! in resident memory, the two figures docs/SECURITY.md quotes.
//!
//! Like tests/hostile.rs (whose helpers it reuses), it starts `tether echo
//! --listen 127.0.0.1:0`, opens raw sockets from chosen 127.0.0.x source
//! addresses, reads the child's VmRSS from /proc/PID/status before and
//! after, and prints every figure and each pass criterion:
//!
//! 1. pending handshakes: 4,096 TCP connections that send nothing (16
//!    sources, 256 each), held while the server waits for their hellos;
//! 2. idle sessions: 4,000 new sessions (4 sources, 1,000 each) offering
//!    every extension, each proven by a window frame, then left silent.
//!
//! The bounds are the formulas' (a task, the socket's registration and a
//! 512-byte first read buffer for a pending handshake; about 10 KiB of
//! session state plus the link's first read and write buffers for an idle
//! session). Kernel socket buffers are not in the process's RSS.
//!
//! Both parts hold thousands of descriptors in this process and in the
//! echo, which inherits this process's limit: below 10,000 the counts are
//! scaled down to what fits, and the per-unit figures stay comparable.
//!
//! Run with `-- --nocapture` to read the figures.

mod common;
#[allow(dead_code)]
#[path = "hostile/echo.rs"]
mod echo;
#[allow(dead_code)]
#[path = "hostile/raw.rs"]
mod raw;
#[allow(dead_code)]
#[path = "hostile/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "hostile/wire.rs"]
mod wire;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};

use echo::{mib, Echo};
use raw::{connect_from, handshake, proc_hex, Raw};
use report::{run, Report};
use wire::{ext, tag};

/// Last octets of the sources of the pending handshakes: 127.0.0.10–25.
const PENDING_SOURCES: std::ops::Range<u8> = 10..26;
/// Pending handshakes per source (the echo's per-source cap).
const PENDING_PER_SOURCE: usize = 256;
/// Bound on the bytes of RSS per pending handshake.
const PENDING_BOUND: u64 = 8 * 1024;

/// Last octets of the sources of the idle sessions: 127.0.0.30–33.
const SESSION_SOURCES: std::ops::Range<u8> = 30..34;
/// Idle sessions per source (the echo's per-source cap).
const SESSIONS_PER_SOURCE: usize = 1_000;
/// Bound on the bytes of RSS per idle session.
const SESSION_BOUND: u64 = 24 * 1024;
/// The source of the one session left unproven, to show that an unproven
/// session is closed within the handshake timeout (so the proven ones that
/// stay open were proven).
const CONTROL_SOURCE: u8 = 34;
/// The idle-session echo's handshake timeout: an unproven session is
/// dropped this long after its hello.
const PROOF_TIMEOUT: Duration = Duration::from_secs(2);

/// `ACKS | KEEPALIVE | CLOSE | FRAGMENTS | ADMISSION`: everything tether
/// speaks (`ext::ALL`).
const OFFER: u8 = ext::ACKS | ext::KEEPALIVE | 0x10 | 0x20 | ext::ADMISSION;
/// The window frame of vector control-window-recv (docs/PROTOCOL.md): 4096
/// frames, 1 MiB, receive bound 64 MiB.
const WINDOW_VECTOR: [u8; 11] = [
    0x00, 0x06, 0x80, 0x20, 0x80, 0x80, 0x40, 0x80, 0x80, 0x80, 0x20,
];

/// Connections or handshakes in flight at once.
const CONCURRENCY: usize = 128;
/// Descriptors each process needs besides the measured sockets.
const FD_MARGIN: usize = 256;
/// Below this descriptor limit the counts are scaled down.
const FD_WANTED: usize = 10_000;

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// This process's soft limit on open files (the echo inherits it).
fn nofile_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(usize::MAX)
    } else {
        soft.parse().ok()
    }
}

/// Runs `task` for every source `per_source` times (sources interleaved,
/// so that no source runs ahead), [`CONCURRENCY`] at a time.
async fn for_each_source<T, F, Fut>(
    sources: &[IpAddr],
    per_source: usize,
    task: F,
) -> Vec<Result<T, String>>
where
    F: Fn(IpAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T, String>> + Send,
    T: Send + 'static,
{
    let total = sources.len() * per_source;
    let sources: Arc<Vec<IpAddr>> = Arc::new(sources.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CONCURRENCY.min(total) {
        let (next, sources, task) = (next.clone(), sources.clone(), task.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return out;
                }
                out.push(task(sources[i % sources.len()]).await);
            }
        });
    }
    let mut out = Vec::with_capacity(total);
    while let Some(r) = workers.join_next().await {
        out.extend(r.expect("worker"));
    }
    out
}

/// Every IPv4 TCP socket's state (the `st` column of /proc/net/tcp), by
/// local and remote address, read once.
fn tcp_states() -> HashMap<(String, String), u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace().skip(1);
            let (l, r, st) = (cols.next()?, cols.next()?, cols.next()?);
            Some((
                (l.to_string(), r.to_string()),
                u8::from_str_radix(st, 16).ok()?,
            ))
        })
        .collect()
}

/// How many of `streams` the kernel still has established (state 0x01):
/// neither closed (0x08, close-wait) nor reset by the server.
fn established(streams: &[&TcpStream]) -> usize {
    let states = tcp_states();
    streams
        .iter()
        .filter(|s| {
            let key = s
                .local_addr()
                .ok()
                .and_then(proc_hex)
                .zip(s.peer_addr().ok().and_then(proc_hex));
            key.and_then(|k| states.get(&k).copied()) == Some(0x01)
        })
        .count()
}

/// Waits until the echo holds `want` more descriptors than `base`, at
/// least `min`, at most `max`; returns how many more it holds.
async fn wait_for_fds(
    echo: &Echo,
    base: usize,
    want: usize,
    min: Duration,
    max: Duration,
) -> usize {
    let start = Instant::now();
    loop {
        let now = echo.fds().saturating_sub(base);
        if (now >= want && start.elapsed() >= min) || start.elapsed() >= max {
            return now;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes per unit of an RSS growth from `before` to `after` KiB.
fn per_unit(before: u64, after: u64, units: usize) -> u64 {
    after.saturating_sub(before) * 1024 / units.max(1) as u64
}

/// The first error among `results`, and how many there were.
fn errors<T>(results: &[Result<T, String>]) -> (usize, String) {
    let n = results.iter().filter(|r| r.is_err()).count();
    let first = results
        .iter()
        .find_map(|r| r.as_ref().err().cloned())
        .map(|e| format!(" (first: {e})"))
        .unwrap_or_default();
    (n, first)
}

/// Part 1: connections that send nothing, held in their handshake.
async fn pending_handshakes(report: &mut Report, per_source: usize) {
    let sources: Vec<IpAddr> = PENDING_SOURCES.map(loopback).collect();
    let n = sources.len() * per_source;
    let mut echo = Echo::spawn(&[
        "--max-pending",
        "4096",
        "--max-pending-per-source",
        "256",
        "--handshake-timeout",
        "30s",
    ]);
    let addr = echo.addr;
    report.figure(
        "pending handshakes",
        format!(
            "{n} silent connections, {per_source} from each of {}..={}, {CONCURRENCY} \
             connecting at a time; echo flags {:?}",
            sources[0],
            sources[sources.len() - 1],
            echo.flags
        ),
    );
    // Let the child finish starting up before the baseline.
    sleep(Duration::from_millis(200)).await;
    let (rss0, data0, fds0) = (echo.rss_kib(), echo.data_kib(), echo.fds());
    let start = Instant::now();
    let results = for_each_source(&sources, per_source, move |src| async move {
        let s = connect_from(src, addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // A reset on drop: no TIME_WAIT left behind.
        s.set_zero_linger().map_err(|e| e.to_string())?;
        Ok(s)
    })
    .await;
    let connected_in = start.elapsed();
    let (failed, first_error) = errors(&results);
    let streams: Vec<TcpStream> = results.into_iter().filter_map(Result::ok).collect();
    let held = wait_for_fds(
        &echo,
        fds0,
        n,
        Duration::from_millis(500),
        Duration::from_secs(3),
    )
    .await;
    let (rss1, data1) = (echo.rss_kib(), echo.data_kib());
    let open = established(&streams.iter().collect::<Vec<_>>());
    let per = per_unit(rss0, rss1, n);
    report.figure(
        "pending handshakes",
        format!(
            "{} connected in {connected_in:?}, {failed} failed{first_error}; echo holds {held} \
             more descriptors; {open} still established after {:?}; RSS {:.2} -> {:.2} MiB \
             (+{} KiB), VmData {:.1} -> {:.1} MiB",
            streams.len(),
            start.elapsed(),
            mib(rss0),
            mib(rss1),
            rss1.saturating_sub(rss0),
            mib(data0),
            mib(data1)
        ),
    );
    report.figure(
        "RSS per pending handshake",
        format!("{per} bytes ({:.2} KiB)", per as f64 / 1024.0),
    );
    report.check(
        &format!("all {n} connections accepted and held open (none refused or closed)"),
        failed == 0 && open == n && held >= n,
        format!("{failed} connects failed, {open} established, echo +{held} descriptors"),
    );
    report.check(
        &format!(
            "RSS per pending handshake <= {} KiB (a task, the socket's registration, a \
             512-byte first read buffer)",
            PENDING_BOUND / 1024
        ),
        per <= PENDING_BOUND,
        format!("{per} bytes"),
    );
    let alive = echo.alive();
    report.check("tether echo still running", alive, alive);
    drop(streams);
}

/// One idle session: a new-session hello offering [`OFFER`], the
/// ServerHello (not a rejection), then a window frame, which proves the
/// key. The link is kept and nothing more is sent or read.
async fn idle_session(src: IpAddr, dst: SocketAddr) -> Result<(Raw, u8), String> {
    let (mut raw, hello) = handshake(src, dst, OFFER).await?;
    raw.reset_on_drop();
    raw.send(&WINDOW_VECTOR)
        .await
        .map_err(|e| format!("sending the window frame: {e}"))?;
    Ok((raw, hello.extensions()))
}

/// Part 2: proven sessions left idle.
async fn idle_sessions(report: &mut Report, per_source: usize) {
    let sources: Vec<IpAddr> = SESSION_SOURCES.map(loopback).collect();
    let n = sources.len() * per_source;
    let mut echo = Echo::spawn(&[
        "--max-sessions-per-source",
        "1000",
        "--handshake-timeout",
        "2s",
        "--keepalive-interval",
        "60s",
        "--keepalive-timeout",
        "120s",
    ]);
    let addr = echo.addr;
    report.figure(
        "idle sessions",
        format!(
            "{n} sessions, {per_source} from each of {}..={}, offering {OFFER:#04x}, each \
             proven by the window frame {WINDOW_VECTOR:02x?}, then silent; one more from \
             {} left unproven; {CONCURRENCY} handshakes at a time; echo flags {:?}",
            sources[0],
            sources[sources.len() - 1],
            loopback(CONTROL_SOURCE),
            echo.flags
        ),
    );
    sleep(Duration::from_millis(200)).await;
    let (rss0, data0, fds0) = (echo.rss_kib(), echo.data_kib(), echo.fds());
    let start = Instant::now();
    let results = for_each_source(&sources, per_source, move |src| idle_session(src, addr)).await;
    let opened_in = start.elapsed();
    let last_opened = Instant::now();
    let (failed, first_error) = errors(&results);
    let mut negotiated = BTreeSet::new();
    let mut links = Vec::with_capacity(n);
    for (raw, extensions) in results.into_iter().flatten() {
        negotiated.insert(extensions);
        links.push(raw);
    }
    // The control: a session that never proves its key.
    let control = match handshake(loopback(CONTROL_SOURCE), addr, OFFER).await {
        Ok((raw, _)) => {
            raw.reset_on_drop();
            Ok(raw)
        }
        Err(e) => Err(e),
    };
    // Every unproven session is gone one handshake timeout after its hello.
    tokio::time::sleep_until(last_opened + PROOF_TIMEOUT + Duration::from_millis(500)).await;
    let held = wait_for_fds(&echo, fds0, n, Duration::ZERO, Duration::from_secs(1)).await;
    let (rss1, data1) = (echo.rss_kib(), echo.data_kib());
    let measured_at = start.elapsed();
    let open = established(&links.iter().map(|r| &r.stream).collect::<Vec<_>>());
    let control_closed = match control {
        Ok(mut raw) => match raw.wait_closed(Duration::from_millis(500)).await {
            Some(_) => Ok(true),
            None => Ok(false),
        },
        Err(e) => Err(e),
    };
    let per = per_unit(rss0, rss1, n);
    let all_acks = !negotiated.is_empty() && negotiated.iter().all(|e| e & ext::ACKS != 0);
    let negotiated: Vec<String> = negotiated.iter().map(|e| format!("{e:#04x}")).collect();
    report.figure(
        "idle sessions",
        format!(
            "{} opened in {opened_in:?}, {failed} failed{first_error}; negotiated {negotiated:?}; \
             measured {measured_at:?} after the first hello: echo holds {held} more descriptors, \
             {open} still established; RSS {:.2} -> {:.2} MiB (+{} KiB), VmData {:.1} -> {:.1} MiB",
            links.len(),
            mib(rss0),
            mib(rss1),
            rss1.saturating_sub(rss0),
            mib(data0),
            mib(data1)
        ),
    );
    report.figure(
        "RSS per idle session",
        format!("{per} bytes ({:.2} KiB)", per as f64 / 1024.0),
    );
    report.check(
        &format!("all {n} sessions got a ServerHello that is not a rejection"),
        failed == 0,
        format!("{} accepted, {failed} failed{first_error}", links.len()),
    );
    report.check(
        "every session negotiated ACKS (so its window frame is well-formed)",
        all_acks,
        format!("{negotiated:?}"),
    );
    report.check(
        &format!(
            "all {n} sessions proven: still open {PROOF_TIMEOUT:?} (the handshake timeout) after \
             their hellos"
        ),
        open == n && held >= n,
        format!("{open} established, echo +{held} descriptors"),
    );
    report.check(
        "the control session, never proven, was closed by then (so the check above can fail)",
        matches!(control_closed, Ok(true)),
        match &control_closed {
            Ok(true) => "closed".to_string(),
            Ok(false) => "still open".to_string(),
            Err(e) => e.clone(),
        },
    );
    report.check(
        &format!(
            "RSS per idle session <= {} KiB (about 10 KiB of session state, the link's first \
             read and write buffers)",
            SESSION_BOUND / 1024
        ),
        per <= SESSION_BOUND,
        format!("{per} bytes"),
    );
    let alive = echo.alive();
    report.check("tether echo still running", alive, alive);
    drop(links);
}

#[test]
fn memory_per_pending_handshake_and_per_idle_session() {
    run(async {
        // The window frame is the document's vector.
        assert_eq!(
            wire::control(tag::WINDOW, &[4096, 1 << 20, 64 << 20]),
            WINDOW_VECTOR
        );
        let limit = nofile_limit();
        // Each part holds its sockets in this process and in the echo,
        // which inherits this limit; the parts run one after the other.
        let room = limit.unwrap_or(FD_WANTED).saturating_sub(FD_MARGIN);
        let pending_per_source = PENDING_PER_SOURCE.min(room / PENDING_SOURCES.len()).max(1);
        let sessions_per_source = SESSIONS_PER_SOURCE.min(room / SESSION_SOURCES.len()).max(1);
        let scaled =
            pending_per_source < PENDING_PER_SOURCE || sessions_per_source < SESSIONS_PER_SOURCE;
        let mut report = Report::new(
            "memory_per_pending_handshake_and_per_idle_session",
            format!(
                "open-files limit {}{}; {} pending handshakes, then {} idle sessions",
                limit.map_or("unknown".to_string(), |l| l.to_string()),
                if limit.is_some_and(|l| l < FD_WANTED) || scaled {
                    format!(" (below {FD_WANTED}: counts scaled down to fit)")
                } else {
                    String::new()
                },
                PENDING_SOURCES.len() * pending_per_source,
                SESSION_SOURCES.len() * sessions_per_source
            ),
        );
        let start = Instant::now();
        pending_handshakes(&mut report, pending_per_source).await;
        idle_sessions(&mut report, sessions_per_source).await;
        report.figure("took", format!("{:?}", start.elapsed()));
        report.finish();
    });
}
