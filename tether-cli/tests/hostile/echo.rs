//! The `tether echo` child process: spawned on 127.0.0.1 port 0, its
//! address parsed from its "listening on" line, its stderr kept (the
//! logging tests count it), its memory read from /proc, killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

/// Set to run every test against a `tether echo` that lacks the issue-10
/// flags: the echo then starts with `--listen` only (today's defaults), and
/// the tests measure what today's code does. Their criteria stay those of
/// the fixed server, so the run records the "before" figures.
pub(crate) const BASELINE_ENV: &str = "TETHER_HOSTILE_BASELINE";

const LISTENING: &str = "tether echo listening on ";

/// A running `tether echo`. Dropping it kills the process.
pub(crate) struct Echo {
    child: Child,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Its process id, for /proc.
    pub(crate) pid: u32,
    /// Every stderr line after the "listening" line.
    lines: Arc<Mutex<Vec<String>>>,
    /// While set, nobody reads the child's stderr: its pipe fills up, as
    /// behind a stalled terminal or log collector.
    stderr_paused: Arc<AtomicBool>,
    /// The flags it was started with (empty in baseline mode, see
    /// [`BASELINE_ENV`]).
    pub(crate) flags: Vec<String>,
}

impl Echo {
    /// Starts `tether echo --listen 127.0.0.1:0 FLAGS...`.
    pub(crate) fn spawn(flags: &[&str]) -> Echo {
        let baseline = std::env::var_os(BASELINE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        let used: Vec<String> = if baseline {
            Vec::new()
        } else {
            flags.iter().map(|s| s.to_string()).collect()
        };
        let mut child = crate::common::command(&["echo", "--listen", "127.0.0.1:0"])
            .args(&used)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tether echo");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel::<Result<SocketAddr, String>>();
        let kept = lines.clone();
        let stderr_paused = Arc::new(AtomicBool::new(false));
        let paused = stderr_paused.clone();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            let mut early = Vec::new();
            let mut reader = BufReader::new(stderr);
            loop {
                while paused.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = line.trim_end_matches(['\n', '\r']).to_string();
                if let Some(tx) = &addr_tx {
                    if let Some(rest) = line.strip_prefix(LISTENING) {
                        let _ = tx.send(rest.trim().parse().map_err(|e| format!("{rest}: {e}")));
                        addr_tx = None;
                    } else {
                        early.push(line);
                    }
                    continue;
                }
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
            if let Some(tx) = addr_tx {
                let _ = tx.send(Err(early.join("\n")));
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(addr)) => addr,
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                let why = match outcome {
                    Ok(Err(stderr)) => format!("it exited; stderr:\n{stderr}"),
                    _ => "no \"listening on\" line within 20 s".to_string(),
                };
                panic!(
                    "tether echo {used:?} did not start: {why}\n\
                     (a flag it rejects is one issue 10 adds: implement it, or set \
                     {BASELINE_ENV}=1 to measure today's echo with its defaults)"
                );
            }
        };
        let pid = child.id();
        eprintln!(
            "tether echo pid {pid} on {addr}, flags {used:?}{}",
            if baseline {
                format!(" (BASELINE: {flags:?} not passed)")
            } else {
                String::new()
            }
        );
        Echo {
            child,
            addr,
            pid,
            lines,
            stderr_paused,
            flags: used,
        }
    }

    /// Resident set size now, in KiB (VmRSS).
    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid)
    }

    /// Data segment size now, in KiB (VmData): memory reserved, touched or
    /// not.
    pub(crate) fn data_kib(&self) -> u64 {
        status_kib(self.pid, "VmData:")
    }

    /// Peak resident set size, in KiB (VmHWM).
    pub(crate) fn peak_kib(&self) -> u64 {
        status_kib(self.pid, "VmHWM:")
    }

    /// Open file descriptors (sockets, mostly).
    pub(crate) fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Whether the process is still running (it did not panic or exit).
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The stderr lines printed after startup.
    pub(crate) fn stderr_lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops (or resumes) reading the child's stderr.
    pub(crate) fn pause_stderr(&self, paused: bool) {
        self.stderr_paused.store(paused, Ordering::Relaxed);
    }

    /// Whether `flag` was passed (false in baseline mode).
    pub(crate) fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Sends SIGINT (as Ctrl-C would) and waits up to `limit` for the
    /// process to exit; its exit status, or `None` if it is still running.
    pub(crate) fn interrupt(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        // The shell's builtin `kill`: no dependency on a kill binary.
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -INT {}", self.pid)])
            .status()
            .expect("run sh -c kill");
        assert!(sent.success(), "kill -INT {} failed", self.pid);
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.stderr_lines();
        if !lines.is_empty() {
            let shown: Vec<_> = lines.iter().take(5).collect();
            eprintln!(
                "tether echo pid {} printed {} stderr lines; first: {shown:#?}",
                self.pid,
                lines.len()
            );
        }
    }
}

/// A field of /proc/PID/status, in KiB (0 if the process is gone).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The resident set size of process `pid`, in KiB (VmRSS), for samplers
/// that run in their own task.
pub(crate) fn rss_kib_of(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The kernel's counters of connections lost at a full listen queue
/// (TcpExt ListenOverflows, ListenDrops), for this network namespace.
pub(crate) fn listen_overflows() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return (0, 0);
    };
    let find = |name: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    (find("ListenOverflows"), find("ListenDrops"))
}

/// KiB as MiB, for printing.
pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
