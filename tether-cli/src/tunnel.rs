//! `tether tunnel`: a port forward, or an ssh `ProxyCommand`, that
//! survives the network.
//!
//! `tether tunnel serve` accepts tunnel clients (TCP, or TLS when given a
//! certificate) and connects each stream they open to a `--forward`
//! target; `tether tunnel connect` joins stdin/stdout (`--stdio`) or every
//! connection to a local port (`--local`) to streams of one stable
//! session. The streams are [`tether::tunnel`]'s; the session survives
//! cuts, sleep and network changes for the server's resume window.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ring::hmac;
use tether::link::any::{AnyConnector, AnyListener};
use tether::link::{TcpListener, TlsListener};
use tether::tunnel::{serve_session, StreamError, TunnelClient, TunnelFrame};
use tether::{Admission, ConduitEvent, ConduitState, Config, Denied, Grant, Server, StableConduit};

use crate::echo::stop_signal;
use crate::transport::{client_tls, server_tls};

/// `tether tunnel serve`'s settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Targets by name (`""`: the default, for clients that name none).
    pub forwards: Vec<(String, String)>,
    /// TLS: certificate chain and key (PEM), and optionally the CA that
    /// client certificates must chain to.
    pub tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// A file of tokens, one per line: a client must present one.
    pub token_file: Option<PathBuf>,
    /// How long a session whose client is away is kept, its target
    /// connections open.
    pub resume_window: Duration,
}

/// Parses `--forward [NAME=]HOST:PORT`.
pub fn parse_forward(s: &str) -> Result<(String, String), String> {
    let (name, target) = match s.split_once('=') {
        Some((name, target)) => (name.trim(), target.trim()),
        None => ("", s.trim()),
    };
    if !target.contains(':') || target.ends_with(':') {
        return Err(format!("{s:?}: expected HOST:PORT or NAME=HOST:PORT"));
    }
    if name.contains(char::is_whitespace) {
        return Err(format!("{s:?}: a target name has no spaces"));
    }
    Ok((name.to_owned(), target.to_owned()))
}

/// Reads a token file: one token per line; blank lines and lines starting
/// with `#` are skipped.
fn read_tokens(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "no token in {}", path.display());
    Ok(tokens)
}

/// Admits clients that present one of the tokens. Each token is kept as
/// an HMAC tag under a key drawn at start, and a presented credential is
/// checked with `hmac::verify`, which compares in constant time.
struct Tokens {
    key: hmac::Key,
    tags: Vec<hmac::Tag>,
}

impl Tokens {
    fn new(tokens: &[String]) -> anyhow::Result<Tokens> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("no randomness for the token key"))?;
        let tags = tokens
            .iter()
            .map(|t| hmac::sign(&key, t.as_bytes()))
            .collect();
        Ok(Tokens { key, tags })
    }

    fn admit(&self, request: &Admission) -> Result<Grant, Denied> {
        let ok = self
            .tags
            .iter()
            .any(|tag| hmac::verify(&self.key, &request.credential, tag.as_ref()).is_ok());
        if ok {
            Ok(Grant::none())
        } else {
            Err(Denied::new("no valid token"))
        }
    }
}

/// Runs `tether tunnel serve` until Ctrl-C or SIGTERM; SIGUSR1 prints the
/// sessions it holds.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        !opts.forwards.is_empty(),
        "nothing to forward to: give --forward"
    );
    let mut targets = HashMap::new();
    for (name, target) in &opts.forwards {
        anyhow::ensure!(
            targets.insert(name.clone(), target.clone()).is_none(),
            "the target name {name:?} is given twice"
        );
    }
    // With one target, it is also the default.
    if targets.len() == 1 && !targets.contains_key("") {
        let only = targets.values().next().cloned().expect("one target");
        targets.insert(String::new(), only);
    }
    let config = Config::default().resume_window(opts.resume_window);
    let tcp = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = tcp.local_addr()?;
    let (listener, url) = match &opts.tls {
        Some((cert, key, ca)) => {
            let tls = server_tls(cert, key, ca.as_deref())?;
            (
                AnyListener::new().with(TlsListener::new(tcp, tls)),
                format!("tls://{addr}"),
            )
        }
        None => (AnyListener::new().with(tcp), addr.to_string()),
    };
    let server = Arc::new(match &opts.token_file {
        Some(path) => {
            let tokens = Tokens::new(&read_tokens(path)?)?;
            Server::with_authorizer(listener, config, move |a: &Admission| tokens.admit(a))
        }
        None => Server::new(listener, config),
    });
    eprintln!("tether tunnel serving on {url}");
    for (name, target) in &opts.forwards {
        let name = if name.is_empty() { "(default)" } else { name };
        eprintln!("  {name} -> {target}");
    }
    let targets = Arc::new(targets);
    let accepting = server.clone();
    let acceptor = tokio::spawn(async move {
        while let Some(session) = accepting.accept().await {
            let targets = targets.clone();
            tokio::spawn(serve_session(session, move |name| {
                targets.get(name).cloned()
            }));
        }
    });
    let status = tokio::spawn(print_status_on_signal(server.clone()));
    stop_signal().await;
    status.abort();
    let report = server.shutdown(Duration::from_secs(5)).await;
    acceptor.abort();
    eprintln!(
        "tether tunnel stopped: {} sessions closed, {} lost",
        report.closed, report.lost
    );
    Ok(())
}

/// Prints the sessions the server holds on every SIGUSR1.
async fn print_status_on_signal(server: Arc<Server<TunnelFrame>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            return;
        };
        while usr1.recv().await.is_some() {
            eprint!("{}", status_text(&server));
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

/// One line per session: id, peer, state, reconnects, RTT, bytes replayed.
pub fn status_text(server: &Server<TunnelFrame>) -> String {
    let sessions = server.sessions();
    let mut out = format!("tether tunnel: {} sessions\n", sessions.len());
    for s in sessions {
        let peer = s
            .info
            .peer()
            .addr
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        let id = s
            .info
            .session_id()
            .map_or_else(|| s.info.id().to_string(), |id| id.to_string());
        out.push_str(&format!(
            "  {id} {peer} {:?} reconnects {} rtt {} replayed {} B\n",
            s.stats.state,
            s.stats.reconnects,
            s.stats.rtt.map_or_else(
                || "-".to_owned(),
                |r| format!("{:.1} ms", r.as_secs_f64() * 1e3)
            ),
            s.stats.bytes_replayed,
        ));
    }
    out
}

/// Where `tether tunnel connect` takes its streams from.
#[derive(Clone, Debug)]
pub enum Local {
    /// Standard input and output: one stream (an ssh `ProxyCommand`).
    Stdio,
    /// Every connection accepted on this address: one stream each.
    Listen(SocketAddr),
}

/// `tether tunnel connect`'s settings.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The server: `host:port`, `tcp://`, `tls://` (a URL of `link::any`).
    pub server: String,
    /// The CA to trust for `tls://` (Mozilla's roots otherwise).
    pub ca: Option<PathBuf>,
    /// The token to present.
    pub token: Option<String>,
    /// The server's target name (empty: its default).
    pub to: String,
    /// Where streams come from.
    pub local: Local,
    /// One JSON object per event on stderr instead of text.
    pub json: bool,
}

/// Runs `tether tunnel connect`. Returns whether every stream ended
/// cleanly.
pub async fn connect(opts: ConnectOptions) -> anyhow::Result<bool> {
    let url = if opts.server.contains("://") {
        opts.server.clone()
    } else {
        format!("tcp://{}", opts.server)
    };
    let tls = match &opts.ca {
        Some(ca) => Some(client_tls(ca)?),
        None => None,
    };
    let connector = AnyConnector::parse(&url, tls).map_err(|e| anyhow::anyhow!("{e}"))?;
    // A client that just lost its network can always come back: it
    // retries for as long as the server keeps the session.
    let mut config = Config::default().reconnect_with(|r| r.give_up_after(None));
    if let Some(token) = &opts.token {
        config = config.credential(token.clone().into_bytes());
    }
    let conduit = StableConduit::<TunnelFrame>::connect(connector, config)
        .await
        .with_context(|| format!("cannot reach the tunnel server {}", opts.server))?;
    let listening = matches!(opts.local, Local::Listen(_));
    let redraw = listening && !opts.json && std::io::stderr().is_terminal();
    let reporter = tokio::spawn(report_events(conduit.events(), opts.json, redraw));
    let client = TunnelClient::new(conduit);
    let status = redraw.then(|| tokio::spawn(status_line(client.clone())));
    let ok = match &opts.local {
        Local::Stdio => {
            let result = client
                .forward(&opts.to, tokio::io::stdin(), tokio::io::stdout())
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
            match result {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("tether tunnel: {e}");
                    false
                }
            }
        }
        Local::Listen(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!(
                "tether tunnel forwarding {} to {}{}",
                listener.local_addr()?,
                opts.server,
                if opts.to.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", opts.to)
                }
            );
            let streams = Arc::new(AtomicU64::new(0));
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let (client, to) = (client.clone(), opts.to.clone());
                        let n = streams.fetch_add(1, Ordering::Relaxed) + 1;
                        tokio::spawn(async move {
                            match client.forward_tcp(&to, stream).await {
                                Ok(s) => tracing::info!(stream = n, %peer, sent = s.sent, received = s.received, "stream ended"),
                                Err(e) => {
                                    tracing::warn!(stream = n, %peer, error = %e, "stream failed");
                                    if matches!(e, StreamError::Refused(_)) {
                                        eprintln!("tether tunnel: {e}");
                                    }
                                }
                            }
                        });
                    }
                    () = stop_signal() => break true,
                    () = client.wait_ended() => break false,
                }
            }
        }
    };
    reporter.abort();
    if let Some(status) = status {
        status.abort();
        eprintln!();
    }
    if let Some(why) = client.ended() {
        if !ok {
            eprintln!("tether tunnel: the session ended: {why}");
        }
    }
    Ok(ok)
}

/// Reports the session's events on stderr: one JSON object per event with
/// `--json`; otherwise a line per change for `--stdio` (whose terminal
/// belongs to ssh), or a status line redrawn in place on a terminal.
async fn report_events(mut events: tether::Events, json: bool, redraw: bool) {
    let started = Instant::now();
    let mut lost_at: Option<Instant> = None;
    let mut reconnects = 0u64;
    while let Some(event) = events.next().await {
        if json {
            eprintln!("{}", event_json(&event, started.elapsed()));
            continue;
        }
        let line = match &event {
            ConduitEvent::LinkLost { cause } => {
                lost_at = Some(Instant::now());
                format!("link lost ({cause}); reconnecting")
            }
            ConduitEvent::AttemptFailed {
                attempt,
                error,
                next_retry,
                ..
            } => {
                let heard = lost_at.map_or(0, |t| t.elapsed().as_secs());
                match next_retry {
                    Some(d) => format!(
                        "reconnecting, last heard {heard} s ago (attempt {attempt}: {error}; next in {} ms)",
                        d.as_millis()
                    ),
                    None => format!("giving up after attempt {attempt}: {error}"),
                }
            }
            ConduitEvent::Resumed { outage, .. } => {
                reconnects += 1;
                lost_at = None;
                format!(
                    "resumed after {:.1} s ({reconnects} reconnects so far)",
                    outage.as_secs_f64()
                )
            }
            ConduitEvent::Stalled { quiet } => {
                format!("stalled: nothing heard for {:.1} s", quiet.as_secs_f64())
            }
            ConduitEvent::Unstalled => "the link answers again".to_owned(),
            ConduitEvent::Lost(reason) => format!("session lost: {reason}"),
            ConduitEvent::Closed => "session closed".to_owned(),
            other => format!("{other:?}"),
        };
        if redraw {
            // The status line shows the state; the events that change it
            // are kept above it.
            eprint!("\r{:<100}\r", "");
        }
        eprintln!("tether tunnel: {line}");
    }
}

/// Redraws a status line on stderr every second: state, RTT, reconnects,
/// bytes replayed, streams; while reconnecting, how long ago the server
/// was last heard.
async fn status_line(client: TunnelClient) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_heard = Instant::now();
    loop {
        tick.tick().await;
        let s = client.stats();
        let state = match s.state {
            ConduitState::Reconnecting => {
                format!(
                    "reconnecting, last heard {} s ago",
                    last_heard.elapsed().as_secs()
                )
            }
            ConduitState::Stalled => {
                format!(
                    "stalled, last heard {} s ago",
                    last_heard.elapsed().as_secs()
                )
            }
            other => {
                last_heard = Instant::now();
                format!("{other:?}").to_lowercase()
            }
        };
        let rtt = s.rtt.map_or_else(
            || "-".to_owned(),
            |r| format!("{:.1} ms", r.as_secs_f64() * 1e3),
        );
        eprint!(
            "\r{:<100}",
            format!(
                "tether tunnel: {state} | rtt {rtt} | {} reconnects | {} KiB replayed | {} streams",
                s.reconnects,
                s.bytes_replayed / 1024,
                client.open_streams()
            )
        );
    }
}

/// One event as a JSON object.
fn event_json(event: &ConduitEvent, at: Duration) -> serde_json::Value {
    use serde_json::json;
    let t = at.as_secs_f64();
    match event {
        ConduitEvent::LinkLost { cause } => {
            json!({"t": t, "event": "link_lost", "state": "reconnecting", "cause": cause.to_string()})
        }
        ConduitEvent::AttemptFailed {
            attempt,
            error,
            next_retry,
            ..
        } => json!({"t": t, "event": "attempt_failed", "state": "reconnecting", "attempt": attempt,
                    "error": error.to_string(), "kind": format!("{:?}", error.kind()),
                    "next_retry_ms": next_retry.map(|d| d.as_millis() as u64)}),
        ConduitEvent::Resumed { attempts, outage } => {
            json!({"t": t, "event": "resumed", "state": "resumed", "attempts": attempts, "outage_s": outage.as_secs_f64()})
        }
        ConduitEvent::Stalled { quiet } => {
            json!({"t": t, "event": "stalled", "state": "stalled", "quiet_s": quiet.as_secs_f64()})
        }
        ConduitEvent::Unstalled => json!({"t": t, "event": "unstalled"}),
        ConduitEvent::Lost(reason) => {
            json!({"t": t, "event": "lost", "state": "lost", "reason": reason.to_string()})
        }
        ConduitEvent::Closed => json!({"t": t, "event": "closed", "state": "closed"}),
        other => json!({"t": t, "event": format!("{other:?}")}),
    }
}
