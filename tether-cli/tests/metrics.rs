//! `tether echo --metrics`: a demo run through the cutting proxy against
//! the echo server, then its `/metrics` scraped with a hand-written HTTP
//! request: the counters show the sessions, the resumes and the replayed
//! bytes, every line is Prometheus exposition text, and garbage, oversized
//! and idle requests get an error or a close while both the metrics and the
//! echo go on serving.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{command, finish, stderr_lines};

/// A running `tether echo --metrics`, killed when dropped.
struct Echo {
    child: Child,
    /// The TCP listener, `host:port`.
    addr: String,
    /// The metrics endpoint's address.
    metrics: SocketAddr,
}

impl Echo {
    fn spawn() -> Echo {
        let args = [
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ];
        let mut child = command(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tether echo");
        let rx = stderr_lines(&mut child);
        let (mut addr, mut metrics) = (None, None);
        let mut seen = Vec::new();
        while addr.is_none() || metrics.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("tether echo did not start: {seen:?}"));
            if let Some(a) = line.strip_prefix("tether echo listening on ") {
                addr = Some(a.trim().to_owned());
            } else if let Some(url) = line.strip_prefix("tether echo metrics on ") {
                let hostport = url
                    .trim()
                    .strip_prefix("http://")
                    .and_then(|u| u.strip_suffix("/metrics"))
                    .unwrap_or_else(|| panic!("not a metrics URL: {line}"));
                metrics = Some(hostport.parse().expect("host:port"));
            } else {
                seen.push(line);
            }
        }
        Echo {
            child,
            addr: addr.unwrap(),
            metrics: metrics.unwrap(),
        }
    }

    /// Runs `tether demo --server tcp://ADDR ARGS...`; it must succeed.
    fn demo(&self, args: &[&str]) {
        let server = format!("tcp://{}", self.addr);
        let mut all = vec![
            "demo",
            "--server",
            &server,
            "--json",
            "--stall-timeout",
            "60",
        ];
        all.extend_from_slice(args);
        let out = finish(
            command(&all).spawn().expect("spawn tether demo"),
            Duration::from_secs(120),
            "tether demo",
        );
        assert!(
            out.status.success(),
            "tether {all:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sends `request` (ignoring a write the server cut short) and returns
    /// whatever came back before the server closed: empty for a close
    /// without an answer.
    fn ask(&self, request: &[u8]) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect to metrics");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(request);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// `GET /metrics`: the answer's body, after checking the status line
    /// and the content type.
    fn scrape(&self) -> String {
        let answer = self.ask(b"GET /metrics HTTP/1.1\r\nHost: tether\r\n\r\n");
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        body.to_owned()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses Prometheus exposition text: each line a comment (`# HELP`,
/// `# TYPE`), blank, or `name{labels} value`. Returns the samples by
/// `name{labels}`, as written.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split(' ');
            let kind = words.next().unwrap_or("");
            assert!(kind == "HELP" || kind == "TYPE", "bad comment: {line}");
            let name = words.next().unwrap_or("");
            assert!(valid_name(name), "bad name in: {line}");
            if kind == "TYPE" {
                let t = words.next().unwrap_or("");
                assert!(["counter", "gauge"].contains(&t), "bad type in: {line}");
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad name in: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in: {line}"));
            for pair in inner.split(',') {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in: {line}"));
                assert!(valid_name(k), "bad label name in: {line}");
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "twice: {line}"
        );
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn sample(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

#[test]
fn echo_serves_prometheus_metrics_and_shrugs_off_bad_scrapers() {
    let echo = Echo::spawn();

    // Before any session: everything at zero, and already well formed.
    let samples = parse_exposition(&echo.scrape());
    assert_eq!(
        sample(&samples, "tether_server_sessions_created_total"),
        0.0
    );
    assert_eq!(sample(&samples, "tether_server_sessions_open"), 0.0);

    echo.demo(&["--messages", "20000"]);
    let text = echo.scrape();
    let samples = parse_exposition(&text);
    assert!(
        sample(&samples, "tether_server_sessions_created_total") >= 1.0,
        "{text}"
    );
    assert!(
        sample(&samples, "tether_server_resumes_total") >= 1.0,
        "{text}"
    );
    assert!(
        sample(&samples, "tether_server_replayed_bytes_total") > 0.0,
        "{text}"
    );
    assert!(
        sample(&samples, "tether_server_received_frames_total") >= 20000.0,
        "{text}"
    );
    assert!(
        sample(
            &samples,
            "tether_server_links_refused_total{reason=\"busy\"}"
        ) == 0.0,
        "{text}"
    );
    assert!(
        text.contains("# TYPE tether_server_replayed_bytes_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tether_server_sessions_open gauge"),
        "{text}"
    );

    // Other paths and methods: an error answer.
    let answer = echo.ask(b"GET /other HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer:?}");
    let answer = echo.ask(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer:?}");
    // Garbage: 400 or a close.
    let answer = echo.ask(b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400 "),
        "{answer:?}"
    );
    // A header that never ends: cut off at the request limit, 431 or a
    // close, not read forever.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    let answer = echo.ask(&huge);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431 "),
        "{answer:?}"
    );

    // Idle connections, sending nothing, hold no scrape up...
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(echo.metrics).unwrap())
        .collect();
    let t = Instant::now();
    parse_exposition(&echo.scrape());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // ...and are closed once their time is up.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }

    // The echo kept serving, and the metrics see the second session.
    echo.demo(&["--messages", "500", "--cut-every", "0"]);
    let samples = parse_exposition(&echo.scrape());
    assert!(sample(&samples, "tether_server_sessions_created_total") >= 2.0);
}
