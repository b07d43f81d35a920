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
    interactive_shell_keeps_state, streamed_output_is_complete, Sshd, PLAIN_TCP_PROXY_COMMAND,
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
