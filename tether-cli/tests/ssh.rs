//! The ssh test harness (`common::ssh`) checked against a real OpenSSH
//! server with no ProxyCommand and with a plain TCP one made of bash and
//! coreutils, so that the end-to-end tests of `tether tunnel` only have
//! to swap the tether command in: a long stream arrives complete, and an
//! interactive shell keeps its state.
//!
//! sshd and tmux are optional unless `TETHER_REQUIRE_SSHD=1` (install:
//! `apt-get install -y openssh-server openssh-client tmux`).

use std::time::Duration;

mod common;
use common::ssh::{
    interactive_shell_keeps_state, ssh_status, streamed_output_is_complete, Sshd,
    PLAIN_TCP_PROXY_COMMAND,
};

/// Lines of `seq` streamed through each session: about 15 MB.
const LINES: u64 = 2_000_000;

#[test]
fn harness_streams_without_a_proxy_command() {
    let Some(sshd) = Sshd::start() else { return };
    let elapsed = streamed_output_is_complete(&sshd, None, LINES);
    eprintln!("{LINES} lines straight to sshd in {elapsed:?}");
}

#[test]
fn harness_streams_through_a_plain_proxy_command() {
    let Some(sshd) = Sshd::start() else { return };
    // The tether tunnel goes here: `tether tunnel connect SERVER --stdio`
    // as the ProxyCommand, `tether tunnel serve --listen SERVER --forward
    // 127.0.0.1:PORT` (`sshd.port()`) started beside sshd.
    let elapsed = streamed_output_is_complete(&sshd, Some(PLAIN_TCP_PROXY_COMMAND), LINES);
    eprintln!("{LINES} lines through {PLAIN_TCP_PROXY_COMMAND:?} in {elapsed:?}");
}

#[test]
fn harness_keeps_shell_state_interactively() {
    let Some(sshd) = Sshd::start() else { return };
    // With the tether tunnel as the ProxyCommand, `during` cuts the
    // network for 30 s; here a pause only checks the harness itself.
    interactive_shell_keeps_state(&sshd, Some(PLAIN_TCP_PROXY_COMMAND), || {
        std::thread::sleep(Duration::from_secs(2))
    });
}

#[test]
fn harness_keeps_shell_state_without_a_proxy_command() {
    let Some(sshd) = Sshd::start() else { return };
    interactive_shell_keeps_state(&sshd, None, || {
        std::thread::sleep(Duration::from_millis(200))
    });
}

// The harness must be able to fail: a session cut for good is noticed.

#[test]
fn harness_notices_a_shell_lost_for_good() {
    let Some(sshd) = Sshd::start() else { return };
    // The proxy records its pid and its reader's from sshd, so that
    // `during` can kill both: ssh sees its connection end, and the
    // session with it. (Killing only one would leave ssh waiting: the
    // cut is not noticed without ServerAlive probes.)
    let pid_file = sshd.dir().join("proxy.pids");
    let proxy = format!(
        "bash -c 'exec 3<>/dev/tcp/%h/%p; cat <&3 & echo $$ $! > {}; cat >&3; kill $!'",
        pid_file.display()
    );
    let failure = panic_message(|| {
        interactive_shell_keeps_state(&sshd, Some(&proxy), || {
            let pids = std::fs::read_to_string(&pid_file).expect("the proxy's pids");
            let status = std::process::Command::new("kill")
                .arg("-KILL")
                .args(pids.split_whitespace())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {pids}");
        })
    });
    assert!(
        failure.contains("ssh ended (status 255)") && failure.contains("before=survived-"),
        "not the failure expected:\n{failure}"
    );
}

#[test]
fn harness_notices_a_stream_cut_short() {
    let Some(sshd) = Sshd::start() else { return };
    // A proxy that ends after passing 1 MB of sshd's output on: ssh cannot
    // finish the session. (One that merely stopped passing it on would
    // leave ssh waiting, until `streamed_output_is_complete`'s deadline.)
    // `<&0`: a background command's stdin is /dev/null otherwise; `stdbuf
    // -o0`: head would hold sshd's first bytes back in its buffer.
    let proxy =
        "bash -c 'exec 3<>/dev/tcp/%h/%p; cat <&0 >&3 & stdbuf -o0 head -c 1000000 <&3; kill $!'";
    let failure = panic_message(|| {
        streamed_output_is_complete(&sshd, Some(proxy), LINES);
    });
    assert!(
        failure.contains("failed (exit status: 255)"),
        "not the failure expected:\n{failure}"
    );
}

// ssh's end is seen even when it lands on a line being typed (a CI run
// once showed this pane and waited 60 s for a value instead).

#[test]
fn ssh_status_is_found_after_typed_text() {
    let pane = "tether$ Connection to 127.0.0.1 closed by remote host.\n\
                echo \"after=$X\"ssh exited with status 255\n\n";
    assert_eq!(ssh_status(pane).as_deref(), Some("255"));
    assert_eq!(
        ssh_status("ssh exited with status 0\n").as_deref(),
        Some("0")
    );
    assert_eq!(ssh_status("tether$ echo \"after=$X\"\n"), None);
}

/// The message `check` panics with; panics if it does not.
fn panic_message(check: impl FnOnce()) -> String {
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check))
        .expect_err("the harness did not notice");
    panicked
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panicked.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}
