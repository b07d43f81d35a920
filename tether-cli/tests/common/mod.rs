//! What every test of the built `tether` command needs: the binary, a
//! command line with its output piped, a wait with a deadline that
//! collects the output, a child's stderr as lines, and a running `tether`
//! that announced its address (`Running`, `tunnel_serve`).

#![allow(dead_code)] // each test crate uses its own part of this

pub(crate) mod ssh;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The command under test: `TETHER_BIN` if set (an older build, to see a
/// test fail), else this crate's `tether`.
pub(crate) fn bin() -> String {
    std::env::var("TETHER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tether").to_owned())
}

/// `tether ARGS...` with `RUST_LOG=warn`, no stdin, stdout and stderr
/// piped; callers change what they need before spawning it.
pub(crate) fn command(args: &[&str]) -> Command {
    let mut command = Command::new(bin());
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits for `child` to end and collects its output, reading both pipes
/// meanwhile so that it never blocks on a full one; panics after `within`.
pub(crate) fn finish(mut child: Child, within: Duration, what: &str) -> Output {
    let (done_tx, done_rx) = mpsc::channel();
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stderr.read_to_end(&mut v);
            v
        });
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let status = child.wait().expect("wait");
        let _ = done_tx.send(Output {
            status,
            stdout: out,
            stderr: err.join().unwrap_or_default(),
        });
    });
    done_rx
        .recv_timeout(within)
        .unwrap_or_else(|_| panic!("{what} (pid {pid}) still running after {within:?}"))
}

/// Runs the shell command `line` under a pseudo-terminal (util-linux
/// `script`), as at a terminal, and collects its output (the terminal's,
/// on stdout); panics after `within`. `None`, having said so on stderr,
/// where there is no `script`.
pub(crate) fn on_terminal(line: &str, within: Duration, what: &str) -> Option<Output> {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped {what}: no `script` command for a pseudo-terminal");
        return None;
    }
    let child = Command::new("script")
        .args(["-qec", line, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script");
    Some(finish(child, within, what))
}

/// Reads `child`'s stderr lines into a channel, from a thread that keeps
/// draining the pipe after the receiver is gone.
pub(crate) fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            // Nobody listening any more: go on draining.
            let _ = tx.send(line);
        }
    });
    rx
}

/// A running `tether` child, killed on drop.
pub(crate) struct Running {
    pub(crate) child: Child,
    /// Its stderr, line by line.
    pub(crate) lines: mpsc::Receiver<String>,
}

impl Running {
    /// Starts `tether ARGS...` and waits for a stderr line starting with
    /// `prefix`; returns the rest of that line's first word after it.
    pub(crate) fn spawn(args: &[&str], prefix: &str) -> (Running, String) {
        let mut child = command(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tether");
        let lines = stderr_lines(&mut child);
        let mut seen = Vec::new();
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("tether {args:?} did not print {prefix:?}: {seen:?}"));
            if let Some(rest) = line.strip_prefix(prefix) {
                let word = rest.split_whitespace().next().unwrap_or("").to_owned();
                return (Running { child, lines }, word);
            }
            seen.push(line);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tether tunnel serve --listen 127.0.0.1:0 --forward FIRST [ARGS...]`:
/// the server and the address it announced.
pub(crate) fn tunnel_serve(args: &[&str]) -> (Running, String) {
    let mut all = vec!["tunnel", "serve", "--listen", "127.0.0.1:0", "--forward"];
    all.extend_from_slice(args);
    Running::spawn(&all, "tether tunnel serving on ")
}
