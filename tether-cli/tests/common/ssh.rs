//! A real OpenSSH server for end-to-end tests of ssh sessions carried by
//! a ProxyCommand (the `tether tunnel connect --stdio` one, in the end):
//! the distribution's `sshd` on a free loopback port with throwaway keys
//! and everything in a fresh temp dir, an `ssh` client command for it,
//! and two checks of a session: a long stream arriving complete, and an
//! interactive shell (driven through tmux) keeping its state across
//! whatever `during` does to the network.
//!
//! sshd is optional unless `TETHER_REQUIRE_SSHD=1` (as in CI): without it
//! `Sshd::start` prints a skip line and returns `None`.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::finish;

const SSHD: &str = "/usr/sbin/sshd";

/// Told to whoever runs the tests without sshd or tmux.
const INSTALL_HINT: &str =
    "apt-get update && apt-get install -y openssh-server openssh-client tmux";

/// A ProxyCommand made of bash and coreutils only: a plain TCP
/// connection to `%h:%p`, what the harness is checked with before the
/// tether tunnel takes its place. ssh expands `%h` and `%p`; `$!` is the
/// background reader, killed once ssh closes the writer's stdin.
pub(crate) const PLAIN_TCP_PROXY_COMMAND: &str =
    "bash -c 'exec 3<>/dev/tcp/%h/%p; cat <&3 & cat >&3; kill $!'";

/// A fresh name for each temp dir and tmux session of this process.
fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tether-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Whether `tool` (a path, or a name looked up in `PATH`) is a file.
fn installed(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).is_file();
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Runs `program ARGS...` to its end, panicking with its output if it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `word` quoted for `sh`.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The whole of `command` (program and arguments) as one `sh` command line.
fn shell_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| shell_quote(&word.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// An OpenSSH server of its own on 127.0.0.1, as the current user, with
/// its keys, configuration, pid file and log in a temp dir; killed and
/// its dir removed on drop.
pub(crate) struct Sshd {
    child: Child,
    dir: PathBuf,
    port: u16,
    user: String,
}

impl Sshd {
    /// Starts sshd and waits until its port accepts connections. `None`
    /// (after a skip line) when sshd is not installed, unless
    /// `TETHER_REQUIRE_SSHD=1`, which makes that a failure.
    pub(crate) fn start() -> Option<Sshd> {
        // The client and tmux come with it in CI; a half install is
        // skipped (or refused) as a whole rather than failing later.
        let missing: Vec<&str> = [SSHD, "ssh", "ssh-keygen", "tmux"]
            .into_iter()
            .filter(|tool| !installed(tool))
            .collect();
        if !missing.is_empty() {
            assert!(
                std::env::var("TETHER_REQUIRE_SSHD").as_deref() != Ok("1"),
                "sshd is required (TETHER_REQUIRE_SSHD=1) but {missing:?} missing: {INSTALL_HINT}"
            );
            eprintln!("SKIPPED: {missing:?} not installed ({INSTALL_HINT})");
            return None;
        }
        let dir = std::env::temp_dir().join(unique("sshd"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the sshd temp dir");
        for key in ["host_key", "client_key"] {
            let path = dir.join(key);
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-N",
                    "",
                    "-t",
                    "ed25519",
                    "-f",
                    &path.to_string_lossy(),
                ],
            );
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .expect("write authorized_keys");
        // sshd refuses to start without its privilege separation dir,
        // which a container may not have; only root can make it, and
        // only root needs it.
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = run("id", &["-un"]).trim().to_owned();
        // A port taken between free_port and sshd's bind: try another.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = free_port();
            let (child, started) = Self::spawn(&dir, port);
            let mut sshd = Sshd {
                child,
                dir: dir.clone(),
                port,
                user: user.clone(),
            };
            if started {
                return Some(sshd);
            }
            let log = sshd.log();
            assert!(
                attempts < 3 && log.contains("Address already in use"),
                "sshd did not start listening on 127.0.0.1:{port}:\n{log}"
            );
            // Keep the dir for the next attempt.
            let _ = sshd.child.kill();
            let _ = sshd.child.wait();
            std::mem::forget(sshd);
        }
    }

    /// Writes the configuration for `port`, starts sshd, and waits until
    /// it accepts (true) or exits (false); panics after 10 s.
    fn spawn(dir: &Path, port: u16) -> (Child, bool) {
        let d = dir.display();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n\
             StrictModes no\nPidFile {d}/sshd.pid\n"
        );
        let config_path = dir.join("sshd_config");
        std::fs::write(&config_path, config).expect("write sshd_config");
        let log = File::create(dir.join("sshd.log")).expect("create sshd.log");
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup sshd.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {SSHD}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return (child, true);
            }
            if child.try_wait().expect("wait for sshd").is_some() {
                return (child, false);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sshd not listening on 127.0.0.1:{port} after 10 s:\n{}",
                    std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port sshd listens on, on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding the keys, configuration, log and sockets.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// What sshd has logged so far (`-e`: its log goes to stderr, here a file).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// An `ssh` client command for this server, stdin null and output
    /// piped: no user configuration, the throwaway client key, a known
    /// hosts file of its own (the host key filed under one alias, so that
    /// a ProxyCommand may be given any host name), no prompts, and no
    /// ServerAlive probes (keeping the session alive is the tunnel's job).
    /// `proxy_command` is passed as `-o ProxyCommand=...` (ssh expands
    /// `%h` and `%p` to 127.0.0.1 and the port); an empty `remote_command`
    /// asks for a login shell.
    pub(crate) fn ssh(&self, proxy_command: Option<&str>, remote_command: &str) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(self.dir.join("client_key"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ))
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "HostKeyAlias=tether-test-sshd"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "ServerAliveInterval=0"])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-p")
            .arg(self.port.to_string());
        if let Some(proxy) = proxy_command {
            ssh.arg("-o").arg(format!("ProxyCommand={proxy}"));
        }
        ssh.arg(format!("{}@127.0.0.1", self.user));
        if !remote_command.is_empty() {
            ssh.arg(remote_command);
        }
        ssh.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ssh
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `seq 1 lines` as it prints it.
fn seq_output(lines: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=lines {
        out.extend_from_slice(i.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Runs `seq 1 lines` on the server over ssh (through `proxy_command` if
/// given) and checks that the output is exactly what `seq` prints and
/// that ssh succeeded; returns how long the session took. Two minutes at
/// most.
pub(crate) fn streamed_output_is_complete(
    sshd: &Sshd,
    proxy_command: Option<&str>,
    lines: u64,
) -> Duration {
    let expected = seq_output(lines);
    let started = Instant::now();
    let child = sshd
        .ssh(proxy_command, &format!("seq 1 {lines}"))
        .spawn()
        .expect("spawn ssh");
    let out = finish(
        child,
        Duration::from_secs(120),
        &format!("ssh seq 1 {lines} (ProxyCommand {proxy_command:?})"),
    );
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ssh seq 1 {lines} (ProxyCommand {proxy_command:?}) failed ({}) after {} bytes:\n\
         {stderr}\nsshd log:\n{}",
        out.status,
        out.stdout.len(),
        sshd.log()
    );
    if out.stdout != expected {
        let at = out
            .stdout
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(out.stdout.len().min(expected.len()));
        let line = expected[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        let got = String::from_utf8_lossy(&out.stdout);
        panic!(
            "ssh seq 1 {lines} (ProxyCommand {proxy_command:?}): {} bytes, {} lines \
             instead of {} bytes; first difference at byte {at} (line {line}); \
             first line {:?}, last line {:?}\nstderr:\n{stderr}",
            out.stdout.len(),
            got.lines().count(),
            expected.len(),
            got.lines().next(),
            got.lines().last(),
        );
    }
    elapsed
}

/// What the tmux pane shows, followed by ssh's status, once ssh has ended.
const SSH_EXITED: &str = "ssh exited with status ";

/// A tmux server on a private socket, killed on drop.
struct Tmux {
    socket: PathBuf,
    session: String,
}

impl Tmux {
    fn command(&self, args: &[&str]) -> Command {
        let mut tmux = Command::new("tmux");
        tmux.arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args)
            .stdin(Stdio::null());
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("could not run tmux (install it: {INSTALL_HINT}): {e}"));
        assert!(
            out.status.success(),
            "tmux {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` into the pane, then Enter.
    fn type_line(&self, text: &str) {
        self.run(&["send-keys", "-t", &self.session, "-l", text]);
        self.run(&["send-keys", "-t", &self.session, "Enter"]);
    }

    fn pane(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", &self.session])
    }

    /// Polls the pane every 100 ms until `found` picks something out of
    /// it; panics after `within`, or at once if ssh has ended meanwhile,
    /// showing the pane and sshd's log.
    fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        sshd: &Sshd,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let pane = self.pane();
            if let Some(value) = found(&pane) {
                return value;
            }
            if let Some(status) = ssh_status(&pane) {
                panic!(
                    "ssh ended (status {status}) before any {what} showed in the tmux pane; \
                     the pane:\n{pane}\nsshd log:\n{}",
                    sshd.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {what} in the tmux pane after {within:?}; the pane:\n{pane}\n\
                     sshd log:\n{}",
                    sshd.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command(&["kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// ssh's exit status, once the pane shows it. Searched for anywhere in a
/// line, not only at its start: when ssh ends while a line is being typed,
/// the terminal echoes the typed text and the status follows it on the
/// same line.
pub(crate) fn ssh_status(pane: &str) -> Option<String> {
    pane.lines().find_map(|line| {
        let (_, rest) = line.split_once(SSH_EXITED)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        (!digits.is_empty()).then_some(digits)
    })
}

/// The value after `prefix` on the first line of `pane` starting with it.
fn line_value(pane: &str, prefix: &str) -> Option<String> {
    pane.lines()
        .find_map(|line| line.trim().strip_prefix(prefix))
        .map(str::to_owned)
}

/// Logs into a shell over ssh (through `proxy_command` if given) in a
/// detached 200x50 tmux session, as someone would at a terminal: sets the
/// prompt, sets a shell variable to a random value and shows it, calls
/// `during` (where a test cuts the network), then shows the variable
/// again and checks that it is the same, i.e. the shell survived; exits
/// the shell, expects ssh to end with status 0, and kills the tmux server.
pub(crate) fn interactive_shell_keeps_state(
    sshd: &Sshd,
    proxy_command: Option<&str>,
    during: impl FnOnce(),
) {
    let tmux = Tmux {
        socket: sshd.dir().join(unique("tmux")),
        session: unique("ssh"),
    };
    // ssh gets the pane as its terminal, so it asks for a tty itself; the
    // pane stays after ssh ends, with its status, for the failure messages.
    let mut ssh = sshd.ssh(proxy_command, "");
    ssh.stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let line = format!("{}; echo \"{SSH_EXITED}$?\"; sleep 3600", shell_line(&ssh));
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        &tmux.session,
        "-x",
        "200",
        "-y",
        "50",
        &line,
    ]);
    let login = Duration::from_secs(20);
    // Anything at all (a prompt, a motd, an ssh error) before typing.
    tmux.wait_for("login", login, sshd, |pane| {
        (!pane.trim().is_empty()).then_some(())
    });
    tmux.type_line("export PS1='tether$ '");
    tmux.wait_for("'tether$' prompt", login, sshd, |pane| {
        pane.lines().any(|l| l.trim() == "tether$").then_some(())
    });
    // The typed line shows `$X`; only the output shows its value.
    tmux.type_line("X=survived-$RANDOM$RANDOM; echo \"before=$X\"");
    let before = tmux.wait_for("value of X", login, sshd, |pane| {
        line_value(pane, "before=survived-")
    });
    during();
    tmux.type_line("echo \"after=$X\"");
    let after = tmux.wait_for(
        "value of X after `during`",
        Duration::from_secs(60),
        sshd,
        |pane| line_value(pane, "after="),
    );
    assert_eq!(
        after,
        format!("survived-{before}"),
        "the shell lost its variable; the pane:\n{}",
        tmux.pane()
    );
    tmux.type_line("exit");
    let deadline = Instant::now() + login;
    let status = loop {
        let pane = tmux.pane();
        if let Some(status) = ssh_status(&pane) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ssh still running {login:?} after `exit`; the pane:\n{pane}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        status,
        "0",
        "ssh did not end cleanly; the pane:\n{}",
        tmux.pane()
    );
}
