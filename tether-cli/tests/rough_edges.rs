//! The rough edges of `tether demo` and `tether echo` that issue 12 found
//! by trying the command as a new user would, each checked through the
//! built binary: arguments refused at once with the reason, `--json`
//! answering in JSON on every failure, a count of messages that costs no
//! memory, a successful run that ends quietly, log lines without colour
//! codes in a pipe, and `tether echo` logging each session with its peer.
//!
//! `TETHER_BIN=PATH` runs the tests against another build of the command
//! (an older one, to see them fail). Deadlines are generous: nothing here
//! measures speed.

use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{command, finish, stderr_lines};

/// Starts `tether ARGS...` with `RUST_LOG=log`, stdout and stderr piped,
/// `NO_COLOR` unset (the colour decision is the command's own).
fn spawn(args: &[&str], log: &str) -> Child {
    command(args)
        .env("RUST_LOG", log)
        .env_remove("NO_COLOR")
        .spawn()
        .expect("spawn tether")
}

/// Runs `tether ARGS...` to its end (at most two minutes).
fn tether(args: &[&str]) -> Output {
    finish(
        spawn(args, "warn"),
        Duration::from_secs(120),
        &format!("tether {args:?}"),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The one JSON object a `--json` run printed.
fn json_of(out: &Output) -> Value {
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{}",
            text(&out.stderr)
        )
    })
}

/// Runs `tether demo ARGS...`, expects it to refuse its arguments (usage
/// status 2) with an error containing every one of `words`, and checks
/// that `--json` also gets a JSON object with `ok` false and that error.
fn refused(args: &[&str], words: &[&str]) {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    let out = tether(&all);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "tether {all:?} was not refused as a usage error:\n{}\n{stderr}",
        text(&out.stdout)
    );
    for word in words {
        assert!(stderr.contains(word), "{word:?} not in:\n{stderr}");
    }
    all.push("--json");
    let out = tether(&all);
    assert_eq!(out.status.code(), Some(2), "tether {all:?}");
    let report = json_of(&out);
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().expect("an error string");
    for word in words {
        assert!(
            error.contains(word),
            "{word:?} not in the JSON error {error:?}"
        );
    }
}

/// A demo run that must succeed, as JSON.
fn demo_ok(args: &[&str]) -> (Value, String) {
    let mut all = vec!["demo", "--json", "--stall-timeout", "60"];
    all.extend_from_slice(args);
    let out = tether(&all);
    let report = json_of(&out);
    assert!(
        out.status.success(),
        "tether {all:?}: {report}\n{}",
        text(&out.stderr)
    );
    assert_eq!(report["ok"], true, "{report}");
    (report, text(&out.stderr))
}

#[test]
fn a_message_over_the_limit_is_refused_with_the_limit() {
    // It used to wait for the stall timeout (30 s), then blame a missing
    // echo, the sender's `TooLarge` discarded.
    refused(
        &["--size", "9000000"],
        &["9000000", "too large", "8 MiB", "8388593"],
    );
    refused(&["--size", "8388594"], &["too large", "8388593"]);
    // The largest size allowed is sent and echoed.
    let (report, _) = demo_ok(&["--size", "8388593", "--messages", "2", "--cut-every", "0"]);
    assert_eq!(report["message_size"], 8388593, "{report}");
    assert_eq!(report["messages_received"], 2, "{report}");
}

#[test]
fn a_message_under_eight_bytes_is_refused() {
    // It used to be raised to 8 without a word.
    refused(&["--size", "4"], &["4 is too small", "at least 8"]);
    refused(&["--size", "0"], &["at least 8"]);
    let (report, _) = demo_ok(&["--size", "8", "--messages", "100", "--cut-every", "0"]);
    assert_eq!(report["message_size"], 8, "{report}");
}

#[test]
fn handshake_cuts_must_be_a_probability() {
    // 1.5 used to be accepted (and hang at 0 %); -0.1 was taken for a flag.
    for bad in ["1.5", "-0.1", "1", "nan", "lots"] {
        refused(&["--handshake-cuts", bad], &["--handshake-cuts"]);
    }
    refused(&["--handshake-cuts", "-0.1"], &["-0.1", "probability"]);
    refused(&["--handshake-cuts", "1.5"], &["1.5", "probability"]);
    for good in ["0", "0.5", "0.9"] {
        demo_ok(&[
            "--handshake-cuts",
            good,
            "--messages",
            "200",
            "--cut-every",
            "4096",
            "--seed",
            "3",
        ]);
    }
}

#[test]
fn the_stall_timeout_is_at_least_a_second() {
    refused(&["--stall-timeout", "0"], &["at least 1 second"]);
    refused(&["--stall-timeout", "-3"], &["--stall-timeout"]);
}

#[test]
fn cut_every_zero_says_cuts_are_off() {
    // It used to announce "cutting every ~0 bytes".
    let out = tether(&[
        "demo",
        "--messages",
        "100",
        "--cut-every",
        "0",
        "--seed",
        "5",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("every ~0"), "{stderr}");
    assert!(stderr.contains("cuts off (--cut-every 0)"), "{stderr}");
    assert!(stdout.contains("cuts were off"), "{stdout}");
    assert!(!stdout.contains("every 0 bytes"), "{stdout}");
}

#[test]
fn an_absurd_count_of_messages_costs_no_memory() {
    // It used to abort at once: "memory allocation of 2305843009213693952
    // bytes failed". Now it runs, in little memory, until Ctrl-C, and
    // reports what it checked.
    let child = spawn(
        &[
            "demo",
            "--json",
            "--messages",
            "18446744073709551615",
            "--cut-every",
            "65536",
            "--seed",
            "7",
        ],
        "warn",
    );
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(3));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let signalled = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill");
    let out = finish(child, Duration::from_secs(60), "the interrupted demo");
    assert!(
        signalled.success(),
        "the demo had already ended: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(rss_kib > 0, "no VmRSS for pid {pid}: {status}");
    println!("resident memory after 3 s: {rss_kib} KiB");
    assert!(rss_kib < 256 * 1024, "{rss_kib} KiB resident");
    let report = json_of(&out);
    assert_eq!(report["interrupted"], true, "{report}");
    assert!(
        report["messages_received"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
    for field in ["lost", "duplicated", "reordered", "corrupted"] {
        assert_eq!(report[field], 0, "{field}: {report}");
    }
}

#[test]
fn no_server_fails_at_once_naming_it_and_json_says_so() {
    // A port with nothing listening: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let server = format!("127.0.0.1:{port}");
    let out = tether(&["demo", "--server", &server]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach {server}")),
        "{stderr}"
    );
    assert_eq!(stderr.matches("refused").count(), 1, "{stderr}");
    let out = tether(&["demo", "--json", "--server", &server]);
    assert_eq!(out.status.code(), Some(1));
    let report = json_of(&out);
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().expect("an error string");
    assert!(error.contains(&server), "{error}");
    assert!(error.contains("refused"), "{error}");
}

#[test]
fn a_successful_run_ends_quietly() {
    // About one run in twelve used to print `WARN ... stable session lost
    // reason=the server shut down` after "OK": a session the server opened
    // for a handshake that a cut ended (the client, never hearing back,
    // opened another) was lost at the demo's server shutdown. Handshake
    // cuts at 0.5 make such sessions common.
    for seed in 20..32 {
        let seed = seed.to_string();
        let args = [
            "demo",
            "--messages",
            "20000",
            "--cut-every",
            "65536",
            "--handshake-cuts",
            "0.5",
            "--seed",
            &seed,
        ];
        let out = tether(&args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{args:?}:\n{stdout}\n{stderr}");
        assert!(stdout.starts_with("OK"), "{stdout}");
        assert!(
            !stderr.contains("WARN") && !stderr.contains("ERROR"),
            "seed {seed}: the run logged after OK:\n{stderr}"
        );
    }
}

#[test]
fn log_lines_have_no_colour_codes_in_a_pipe() {
    let child = spawn(
        &[
            "demo",
            "--messages",
            "200",
            "--cut-every",
            "4096",
            "--seed",
            "9",
        ],
        "debug",
    );
    let out = finish(child, Duration::from_secs(120), "the demo");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("DEBUG"), "no log lines to check: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a pipe:\n{stderr}"
    );
}

/// Waits up to a minute for a line of `lines` containing every one of
/// `words`; returns it, or panics with everything read.
fn wait_for(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>, words: &[&str]) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    if let Some(l) = seen.iter().find(|l| words.iter().all(|w| l.contains(w))) {
        return l.clone();
    }
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if words.iter().all(|w| line.contains(w)) {
                    return line;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line with {words:?} in:\n{}", seen.join("\n"));
}

#[test]
fn echo_logs_each_session_with_its_peer() {
    let mut echo = spawn(&["echo", "--listen", "127.0.0.1:0"], "info");
    let lines = stderr_lines(&mut echo);
    let mut seen = Vec::new();
    let announce = wait_for(&lines, &mut seen, &["tether echo listening on"]);
    let addr = announce.rsplit(' ').next().expect("an address").to_owned();
    let (report, _) = demo_ok(&["--server", &addr, "--messages", "300", "--cut-every", "0"]);
    assert_eq!(report["messages_received"], 300, "{report}");
    // The library's line, with the peer and the public session id.
    let started = wait_for(
        &lines,
        &mut seen,
        &["session started", "peer=127.0.0.1:", "session="],
    );
    let ended = wait_for(
        &lines,
        &mut seen,
        &[
            "echo session ended",
            "peer=127.0.0.1:",
            "id=1",
            "echoed=300",
        ],
    );
    assert!(ended.contains("closed by the client"), "{ended}");
    wait_for(
        &lines,
        &mut seen,
        &["session ended: closed", "peer=127.0.0.1:", "session="],
    );
    println!("{started}\n{ended}");
    let _ = echo.kill();
    let _ = echo.wait();
}

#[test]
fn the_text_report_speaks_plainly() {
    // It used to say "frames replayed", "replay buffer" and "mean every
    // 262144 bytes", with cut counts that overlapped without saying so.
    let out = tether(&[
        "demo",
        "--messages",
        "5000",
        "--cut-every",
        "16384",
        "--seed",
        "13",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for words in [
        "OK: every message came back exactly once, in order, intact",
        "The TCP connection was killed ",
        "the application noticed none of it",
        "5,000 of 64 bytes sent to the server and back, 5,000 came back",
        "while a new connection was still being set up (its handshake)",
        "(handshake cuts included)",
        "each time resuming the same session",
        "nothing is delivered twice",
        "kept for resending",
    ] {
        assert!(stdout.contains(words), "{words:?} not in:\n{stdout}");
    }
    for jargon in ["frames replayed", "replay buffer", "mean every"] {
        assert!(!stdout.contains(jargon), "{jargon:?} in:\n{stdout}");
    }
    // The JSON report keeps its field names.
    let (report, _) = demo_ok(&["--messages", "500", "--cut-every", "16384", "--seed", "13"]);
    for field in [
        "cuts",
        "handshake_cuts",
        "mid_frame_cuts",
        "replayed_frames",
        "client_replayed_frames",
        "server_replayed_frames",
        "max_replay_bytes",
        "reconnects",
    ] {
        assert!(report.get(field).is_some(), "{field} missing: {report}");
    }
}

#[test]
fn the_progress_line_is_redrawn_on_a_terminal_and_absent_in_a_pipe() {
    // Long enough for several 250 ms ticks on any machine.
    let args = ["demo", "--messages", "400000", "--seed", "5"];
    let piped = tether(&args);
    let stderr = text(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(
        !stderr.contains("%] sent"),
        "a progress line in a pipe:\n{stderr}"
    );
    // The same run under a pseudo-terminal.
    let line = format!("{} {}", common::bin(), args.join(" "));
    let Some(out) = common::on_terminal(&line, Duration::from_secs(120), "the demo on a terminal")
    else {
        return;
    };
    let all = text(&out.stdout);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("\r["), "no redrawn progress line:\n{all}");
    assert!(all.contains("%] sent"), "no progress line:\n{all}");
    assert!(all.contains("OK: every message"), "{all}");
}
