//! # Console round trip: `cargo bench --bench console`
//!
//! A `harness = false` bench: `vmm-fleet up DIR --control DIR/control.sock` over one VM,
//! the built-in guest idling with `builtin.console: echo` (it writes back every byte its
//! UART receives; heartbeat every 60 s so that nothing else is on the console), then
//! `vmm-fleet console --control DIR/control.sock echo` on a pseudo-terminal, as a user
//! runs it. Each keystroke (one byte written to the pty master) is timed until the same
//! byte is read back from the master: the whole path, client -> socket -> supervisor ->
//! control channel -> child's control thread -> UART -> guest interrupt handler -> UART
//! -> child's stdout pipe -> the supervisor's output thread -> watcher queue -> socket ->
//! client -> pty. One keystroke at a time, N of them; median, p90, min, max. Twice:
//! typed back to back (the next key as soon as the echo is on screen), and typed with a
//! 20 ms pause before each key (fast human typing is 100 ms or more per key). The output
//! thread waits 2 ms after a read that found something (`LINGER` in
//! src/supervisor/output.rs: it batches a guest's byte-per-exit output), so a key typed
//! back to back waits out the linger of the previous echo; a key after a pause does not.
//!
//! The same is measured without the CLI and the pty (a client speaking the protocol on
//! the socket itself), to show what the client adds.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use common::{Fleet, Res, Stats, TempDir, VMM, host_line, kvm_unavailable, ms, print_total};

const KEYSTROKES: usize = 300;
const WARMUP: usize = 20;
const LIMIT: Duration = Duration::from_secs(60);
/// The pause before each key of a paced run.
const PAUSE: Duration = Duration::from_millis(20);

fn main() {
    let started = Instant::now();
    println!("console round trip (keystroke to echo), {}", host_line());
    if let Some(why) = kvm_unavailable() {
        println!("skipped: /dev/kvm: {why}");
        return;
    }
    if let Err(e) = run() {
        eprintln!("console bench failed: {e}");
        std::process::exit(1);
    }
    print_total(started);
}

fn run() -> Res<()> {
    let dir = TempDir::new("vmm-fleet-bench-console")?;
    let yaml = "name: echo\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\nbuiltin:\n  then: idle\n  \
                heartbeat_ms: 60000\n  console: echo\n";
    fs::write(dir.path().join("echo.yaml"), yaml).map_err(|e| e.to_string())?;
    let sock = dir.path().join("control.sock");
    let sock_arg = sock.to_string_lossy().into_owned();
    let fleet = Fleet::up(
        dir.path(),
        &["--control", &sock_arg, "--metrics-address", "127.0.0.1:0"],
    )?;
    let deadline = Instant::now() + LIMIT;
    while UnixStream::connect(&sock).is_err() {
        if Instant::now() > deadline {
            return Err(format!("no control socket; log:\n{}", fleet.log_tail(20)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The raw protocol first (it also waits for the guest to echo at all).
    let raw = raw_client(&sock)?;
    let raw_b2b = measure("socket client", Duration::ZERO, |b| raw.round_trip(b))?;
    let raw_paced = measure("socket client", PAUSE, |b| raw.round_trip(b))?;
    drop(raw);
    let cli = CliClient::start(&sock)?;
    let cli_b2b = measure("vmm-fleet console", Duration::ZERO, |b| cli.round_trip(b))?;
    let cli_paced = measure("vmm-fleet console", PAUSE, |b| cli.round_trip(b))?;
    let mut cli = cli;
    cli.detach()?;
    println!();
    println!("{KEYSTROKES} keystrokes each (after {WARMUP} warm-up), one at a time:");
    for (what, s) in [
        ("vmm-fleet console, pty, paced", cli_paced),
        ("vmm-fleet console, pty, b2b", cli_b2b),
        ("socket client, paced", raw_paced),
        ("socket client, b2b", raw_b2b),
    ] {
        println!(
            "  {what:32} median {:6.2} ms   p90 {:6.2} ms   min {:6.2} ms   max {:6.2} ms",
            s.median, s.p90, s.min, s.max
        );
    }
    drop(fleet);
    Ok(())
}

/// Times `KEYSTROKES` round trips of `f` (after `WARMUP` untimed ones), each after
/// `pause`.
fn measure(what: &str, pause: Duration, f: impl Fn(u8) -> Res<Duration>) -> Res<Stats> {
    let mut v = Vec::with_capacity(KEYSTROKES);
    for i in 0..WARMUP + KEYSTROKES {
        std::thread::sleep(pause);
        let key = b'a' + (i % 26) as u8;
        let d = f(key).map_err(|e| format!("{what}: keystroke {i}: {e}"))?;
        if i >= WARMUP {
            v.push(ms(d));
        }
    }
    Ok(Stats::of(v.into_iter()))
}

/// Reads from `r` (polling `fd`) until `key` arrives or `LIMIT` passes.
fn wait_for_byte(r: &mut impl Read, fd: std::os::fd::BorrowedFd<'_>, key: u8) -> Res<()> {
    let deadline = Instant::now() + LIMIT;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no echo of {:?}", key as char));
        }
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let t = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        if !matches!(poll(&mut fds, t), Ok(n) if n > 0) {
            continue;
        }
        let n = r.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("end of stream".into());
        }
        if buf[..n].contains(&key) {
            return Ok(());
        }
    }
}

struct RawClient {
    sock: UnixStream,
}

fn raw_client(path: &Path) -> Res<RawClient> {
    let sock = UnixStream::connect(path).map_err(|e| e.to_string())?;
    (&sock)
        .write_all(b"{\"version\":1,\"command\":\"console\",\"vm\":\"echo\"}\n")
        .map_err(|e| e.to_string())?;
    let c = RawClient { sock };
    // The answer line, then an echo once the guest takes input (it may still be booting).
    let deadline = Instant::now() + LIMIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    c.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    while !String::from_utf8_lossy(&got).contains("ready?") {
        if Instant::now() > deadline {
            return Err(format!(
                "the guest never echoed: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        (&c.sock).write_all(b"ready?").map_err(|e| e.to_string())?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) {
            if let Ok(n) = (&c.sock).read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    if !got.starts_with(b"{\"version\":1,\"ok\":true,\"mode\":\"rw\"}\n") {
        return Err(format!("answer: {:?}", String::from_utf8_lossy(&got)));
    }
    c.sock.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(c)
}

impl RawClient {
    fn round_trip(&self, key: u8) -> Res<Duration> {
        let t = Instant::now();
        (&self.sock).write_all(&[key]).map_err(|e| e.to_string())?;
        wait_for_byte(&mut &self.sock, self.sock.as_fd(), key)?;
        Ok(t.elapsed())
    }
}

struct CliClient {
    master: File,
    _slave: std::os::fd::OwnedFd,
    child: Child,
}

impl CliClient {
    fn start(sock: &Path) -> Res<CliClient> {
        let pty = nix::pty::openpty(None, None).map_err(|e| e.to_string())?;
        let io = || {
            pty.slave
                .try_clone()
                .map(Stdio::from)
                .map_err(|e| e.to_string())
        };
        let child = Command::new(VMM)
            .arg("console")
            .arg("--control")
            .arg(sock)
            .arg("echo")
            .stdin(io()?)
            .stdout(io()?)
            .stderr(io()?)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut c = CliClient {
            master: File::from(pty.master),
            _slave: pty.slave,
            child,
        };
        // The banner ends with "^]"; then the client is in raw mode.
        let fd = c.master.try_clone().map_err(|e| e.to_string())?;
        wait_for_byte(&mut c.master, fd.as_fd(), b']')?;
        Ok(c)
    }

    fn round_trip(&self, key: u8) -> Res<Duration> {
        let t = Instant::now();
        (&self.master)
            .write_all(&[key])
            .map_err(|e| e.to_string())?;
        wait_for_byte(&mut &self.master, self.master.as_fd(), key)?;
        Ok(t.elapsed())
    }

    fn detach(&mut self) -> Res<()> {
        (&self.master)
            .write_all(&[0x1d])
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + LIMIT;
        loop {
            match self.child.try_wait().map_err(|e| e.to_string())? {
                Some(st) if st.success() => return Ok(()),
                Some(st) => return Err(format!("console exited {st}")),
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    return Err("console did not exit on Ctrl-]".into());
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for CliClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
