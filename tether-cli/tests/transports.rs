//! The `tether` command on every transport (issue 11): `tether demo
//! --transport X` through the fault proxy (or, for Unix sockets, the
//! cutting relay), one `tether echo` serving TCP, TLS, WebSocket, secure
//! WebSocket and a Unix socket at once and answering `tether demo --server`
//! over each, and the errors of bad certificate files and busy addresses.
//!
//! Every run spawns the built binary. Certificates are made here at run
//! time (rcgen, through `tether_cli::pki`) and written to a temporary
//! directory that is removed afterwards. Deadlines are generous: nothing
//! here measures speed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tether_cli::pki::Pki;

mod common;
use common::{command, finish, stderr_lines};

/// Runs `tether ARGS...` to its end; panics if it takes over two minutes.
fn tether(args: &[&str]) -> Output {
    let child = command(args)
        .env("NO_COLOR", "1")
        .spawn()
        .expect("spawn tether");
    finish(child, Duration::from_secs(120), &format!("tether {args:?}"))
}

/// Runs a demo and returns its JSON report, after checking that it exited
/// with success and delivered everything exactly once, in order.
fn demo(args: &[&str]) -> Value {
    let mut all = vec!["demo", "--json", "--stall-timeout", "60"];
    all.extend_from_slice(args);
    let out = tether(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tether {all:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
    assert_eq!(report["ok"], true, "{report}");
    for field in ["lost", "duplicated", "reordered", "corrupted"] {
        assert_eq!(report[field], 0, "{field}: {report}");
    }
    assert_eq!(
        report["messages_received"], report["messages_sent"],
        "{report}"
    );
    report
}

/// A directory under the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tether-cli-transports-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write a temporary file");
        path.to_str().expect("UTF-8 path").to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fresh certificates for `localhost` and 127.0.0.1 in `dir`: the
/// server's chain, its key and the CA, as paths.
fn certificates(dir: &TempDir) -> (String, String, String) {
    let pki = Pki::localhost().expect("generate certificates");
    (
        dir.write("cert.pem", &pki.cert_pem),
        dir.write("key.pem", &pki.key_pem),
        dir.write("ca.pem", &pki.ca_pem),
    )
}

/// Checks a demo over `transport` in one process: every message back once,
/// in order, over links cut many times.
fn demo_over(transport: &str) {
    let report = demo(&[
        "--transport",
        transport,
        "--messages",
        "3000",
        "--cut-every",
        "8192",
        "--seed",
        "11",
    ]);
    assert_eq!(report["transport"], transport, "{report}");
    assert_eq!(report["messages_sent"], 3000, "{report}");
    let cuts = report["cuts"].as_u64().expect("cuts");
    assert!(cuts > 0, "no cut: {report}");
    assert!(
        report["reconnects"].as_u64().expect("reconnects") > 0,
        "{report}"
    );
    println!("{transport}: {report}");
}

#[test]
fn demo_over_tcp() {
    demo_over("tcp");
}

#[test]
fn demo_over_unix() {
    demo_over("unix");
}

#[test]
fn demo_over_tls() {
    demo_over("tls");
}

#[test]
fn demo_over_ws() {
    demo_over("ws");
}

#[test]
fn demo_over_wss() {
    demo_over("wss");
}

/// A running `tether echo`, killed when dropped.
struct Echo {
    child: Child,
    /// What it announced, in order: `host:port` for TCP, URLs for the rest.
    urls: Vec<String>,
}

impl Echo {
    /// Starts `tether echo ARGS...` and waits for `listeners` "listening
    /// on" lines.
    fn spawn(args: &[&str], listeners: usize) -> Echo {
        let mut child = command(&[&["echo"], args].concat())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tether echo");
        let rx = stderr_lines(&mut child);
        let mut echo = Echo {
            child,
            urls: Vec::new(),
        };
        let mut seen = Vec::new();
        while echo.urls.len() < listeners {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("tether echo {args:?} did not start: {seen:?}"));
            match line.strip_prefix("tether echo listening on ") {
                Some(url) => echo.urls.push(url.trim().to_owned()),
                None => seen.push(line),
            }
        }
        echo
    }

    /// The announced URL with this prefix.
    fn url(&self, prefix: &str) -> &str {
        self.urls
            .iter()
            .find(|u| u.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} listener in {:?}", self.urls))
    }
}

impl Echo {
    /// Sends SIGTERM and waits for a successful exit.
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "tether echo exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("tether echo still running 60 s after SIGTERM");
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `tether echo` serves every transport at once; `tether demo
/// --server` is answered over each, by address, by host name and by URL.
#[test]
fn one_echo_serves_every_transport() {
    let dir = TempDir::new();
    let (cert, key, ca) = certificates(&dir);
    let socket = dir.path("echo.sock");
    let socket = socket.to_str().expect("UTF-8 path");
    let echo = Echo::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0/tether",
            "--wss",
            "127.0.0.1:0/secure",
            "--unix",
            socket,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        5,
    );
    let tcp = echo.url("127.0.0.1:").to_owned();
    let tls = echo.url("tls://").to_owned();
    let ws = echo.url("ws://").to_owned();
    let wss = echo.url("wss://").to_owned();
    assert!(ws.ends_with("/tether"), "{ws}");
    assert!(wss.ends_with("/secure"), "{wss}");
    assert_eq!(echo.url("unix:"), format!("unix:{socket}"));
    let port = |s: &str| {
        s.rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .expect("a port")
            .to_owned()
    };
    let by_name = |url: &str| url.replacen("127.0.0.1", "localhost", 1);
    let cases: Vec<(String, &str, Vec<&str>)> = vec![
        (tcp.clone(), "tcp", vec![]),
        (format!("localhost:{}", port(&tcp)), "tcp", vec![]),
        (format!("tcp://{tcp}"), "tcp", vec![]),
        (tls.clone(), "tls", vec!["--ca", &ca]),
        (by_name(&tls), "tls", vec!["--ca", &ca]),
        (ws.clone(), "ws", vec![]),
        (by_name(&ws), "ws", vec![]),
        (wss.clone(), "wss", vec!["--ca", &ca]),
        (by_name(&wss), "wss", vec!["--ca", &ca]),
        (format!("unix:{socket}"), "unix", vec![]),
    ];
    for (server, transport, extra) in &cases {
        let mut args = vec![
            "--server",
            server.as_str(),
            "--messages",
            "1000",
            "--cut-every",
            "8192",
            "--seed",
            "5",
        ];
        args.extend(extra.iter().copied());
        let report = demo(&args);
        assert_eq!(report["transport"], *transport, "{server}: {report}");
        assert!(
            report["cuts"].as_u64().expect("cuts") > 0,
            "{server}: {report}"
        );
        println!("{server}: {report}");
    }
    // A bare host:port with --transport tls means TLS there.
    let report = demo(&[
        "--server",
        &format!("localhost:{}", port(&tls)),
        "--transport",
        "tls",
        "--ca",
        &ca,
        "--messages",
        "200",
    ]);
    assert_eq!(report["transport"], "tls", "{report}");
    // SIGTERM: a clean exit, which removes the socket file.
    echo.terminate();
    assert!(!Path::new(socket).exists(), "{socket} left behind");
}

/// Against an external TLS server, the certificate is checked: without
/// the CA it fails at once with the reason, naming the server.
#[test]
fn demo_refuses_an_untrusted_server_at_once() {
    let dir = TempDir::new();
    let (cert, key, _ca) = certificates(&dir);
    let echo = Echo::spawn(
        &[
            "--tls",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        1,
    );
    let tls = echo.url("tls://").to_owned();
    let out = tether(&["demo", "--server", &tls, "--messages", "10"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&tls), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
}

/// Runs `tether echo ARGS...`, which must fail; returns its stderr.
fn echo_fails(args: &[&str]) -> String {
    let mut all = vec!["echo"];
    all.extend_from_slice(args);
    let out = tether(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "tether {all:?} succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn bad_certificate_files_are_named() {
    let dir = TempDir::new();
    let (cert, key, ca) = certificates(&dir);
    let missing = dir.path("missing.pem");
    let missing = missing.to_str().expect("UTF-8 path");
    let junk = dir.write("junk.pem", "not PEM at all\n");
    let tls = ["--tls", "127.0.0.1:0"];

    let err = echo_fails(&[&tls[..], &["--tls-cert", missing, "--tls-key", &key]].concat());
    assert!(err.contains(missing) && err.contains("--tls-cert"), "{err}");
    let err = echo_fails(&[&tls[..], &["--tls-cert", &cert, "--tls-key", missing]].concat());
    assert!(err.contains(missing) && err.contains("--tls-key"), "{err}");
    let err = echo_fails(&[&tls[..], &["--tls-cert", &junk, "--tls-key", &key]].concat());
    assert!(
        err.contains(&junk) && err.contains("no certificate"),
        "{err}"
    );
    let err = echo_fails(&[&tls[..], &["--tls-cert", &cert, "--tls-key", &junk]].concat());
    assert!(err.contains(&junk) && err.contains("private key"), "{err}");
    // A key that is not the certificate's: the CA's certificate with the
    // server's key.
    let err = echo_fails(&[&tls[..], &["--tls-cert", &ca, "--tls-key", &key]].concat());
    assert!(err.contains(&ca) && err.contains(&key), "{err}");
    let args = [&tls[..], &["--tls-cert", &cert, "--tls-key", &key]].concat();
    let err = echo_fails(&[&args[..], &["--client-ca", &junk]].concat());
    assert!(err.contains(&junk) && err.contains("--client-ca"), "{err}");

    // Flags that do not go together.
    let err = echo_fails(&["--tls-key", &key]);
    assert!(err.contains("--tls-cert"), "{err}");
    let err = echo_fails(&["--tls", "127.0.0.1:0"]);
    assert!(err.contains("--tls-cert"), "{err}");
    let err = echo_fails(&["--wss", "127.0.0.1:0/x", "--tls-cert", &cert]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = echo_fails(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(err.contains("nothing serves TLS"), "{err}");
    let err = echo_fails(&["--ws", "localhost:8080"]);
    assert!(err.contains("localhost:8080"), "{err}");

    // The demo's --ca is checked the same way.
    let err = tether(&[
        "demo",
        "--server",
        "tls://127.0.0.1:1",
        "--ca",
        missing,
        "--messages",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains(missing),
        "{stderr}"
    );
}

#[test]
fn an_address_in_use_is_named() {
    let dir = TempDir::new();
    let (cert, key, _ca) = certificates(&dir);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("address").to_string();
    for (flag, value, named) in [
        ("--listen", addr.clone(), addr.clone()),
        ("--tls", addr.clone(), format!("tls://{addr}")),
        ("--ws", format!("{addr}/x"), format!("ws://{addr}/x")),
    ] {
        let err = echo_fails(&[
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            flag,
            &value,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ]);
        assert!(err.contains(&named), "{flag}: {err}");
        assert!(err.to_lowercase().contains("in use"), "{flag}: {err}");
        // Nothing was announced: the run bound nothing for good.
        assert!(!err.contains("listening on"), "{flag}: {err}");
    }
}

#[test]
fn bad_demo_servers_are_clear_errors() {
    for (args, expect) in [
        (&["--server", "http://127.0.0.1:80"][..], "unknown scheme"),
        (&["--server", "localhost"][..], "no port"),
        (
            &["--server", "ws://127.0.0.1:1/", "--transport", "tls"][..],
            "does not match",
        ),
        (
            &["--transport", "tls", "--ca", "x.pem"][..],
            "--ca is for --server",
        ),
        (
            &["--server", "127.0.0.1:1", "--ca", "x.pem"][..],
            "--ca is for TLS",
        ),
        (&["--transport", "quic"][..], "quic"),
    ] {
        let mut all = vec!["demo", "--messages", "1"];
        all.extend_from_slice(args);
        let out = tether(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?}: {stderr}");
        assert!(stderr.contains(expect), "{all:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{all:?}: {stderr}");
    }
}
