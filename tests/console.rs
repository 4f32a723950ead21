//! `vmm-fleet console` and `vmm-fleet logs` end to end: a real fleet (`up`), real KVM
//! guests, the CLI driven through a pseudo-terminal as a user would.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{Termios, tcgetattr};

use common::fleet::{Fleet, up_command};
use common::{bin, kvm_available, read, scratch, wait_until};

const LIMIT: Duration = Duration::from_secs(60);

/// An idle built-in guest that echoes what it reads on its UART, with a heartbeat.
fn echo_vm(dir: &Path, name: &str, heartbeat_ms: u32) {
    let text = format!(
        "name: {name}\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\nbuiltin:\n  then: idle\n  \
         heartbeat_ms: {heartbeat_ms}\n  console: echo\n"
    );
    fs::write(dir.join(format!("{name}.yaml")), text).unwrap();
}

/// `up DIR --control DIR/control.sock`.
fn up(dir: &Path) -> (Fleet, PathBuf) {
    let sock = dir.join("control.sock");
    let mut cmd = up_command(dir);
    cmd.arg("--control").arg(&sock);
    let fleet = Fleet::spawn(cmd);
    assert!(
        wait_until(LIMIT, || UnixStream::connect(&sock).is_ok()),
        "no control socket: {}",
        fleet.log()
    );
    (fleet, sock)
}

fn console_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("logs").join(format!("{name}.console"))
}

/// The terminal settings that matter (Termios itself has no equality).
fn settings(t: &Termios) -> String {
    format!(
        "{:?} {:?} {:?} {:?} {:?}",
        t.input_flags, t.output_flags, t.control_flags, t.local_flags, t.control_chars
    )
}

/// A `vmm-fleet console` process on a pseudo-terminal, and everything it showed.
struct Term {
    master: File,
    slave: OwnedFd,
    child: Child,
    screen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    before: String,
}

impl Term {
    fn console(sock: &Path, vm: &str) -> Term {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = settings(&tcgetattr(pty.slave.as_fd()).unwrap());
        let io = || Stdio::from(pty.slave.try_clone().unwrap());
        let child = Command::new(bin())
            .arg("console")
            .arg("--control")
            .arg(sock)
            .arg(vm)
            .stdin(io())
            .stdout(io())
            .stderr(io())
            .spawn()
            .expect("spawn console");
        let master = File::from(pty.master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, st) = (master.try_clone().unwrap(), screen.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(m.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut fds, PollTimeout::from(50u8)), Ok(n) if n > 0) {
                    continue;
                }
                match (&m).read(&mut buf) {
                    Ok(n) if n > 0 => s.lock().unwrap().extend_from_slice(&buf[..n]),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Term {
            master,
            slave: pty.slave,
            child,
            screen,
            stop,
            reader: Some(reader),
            before,
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        assert!(
            wait_until(LIMIT, || self.screen().contains(needle)),
            "{needle:?} never shown; screen: {:?}",
            tail(&self.screen())
        );
    }

    fn type_keys(&self, keys: &[u8]) {
        (&self.master).write_all(keys).unwrap();
    }

    /// Ctrl-]; the exit status.
    fn detach(&mut self) -> std::process::ExitStatus {
        self.type_keys(&[0x1d]);
        common::wait_with_limit(&mut self.child, LIMIT)
    }

    /// The terminal's settings are what they were before the client ran.
    fn assert_restored(&self) {
        let now = settings(&tcgetattr(self.slave.as_fd()).unwrap());
        assert_eq!(now, self.before, "terminal settings not restored");
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn tail(s: &str) -> &str {
    &s[s.floor_char_boundary(s.len().saturating_sub(600))..]
}

/// How many fds and threads process `pid` has.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: String| fs::read_dir(d).map_or(0, |r| r.count());
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

#[test]
fn console_shows_the_guest_types_into_it_detaches_and_a_second_attach_only_watches() {
    if !kvm_available(
        "console_shows_the_guest_types_into_it_detaches_and_a_second_attach_only_watches",
    ) {
        return;
    }
    let dir = scratch("console-attach");
    echo_vm(&dir, "echo", 300);
    let (fleet, sock) = up(&dir);
    let file = console_file(&dir, "echo");
    assert!(
        wait_until(LIMIT, || read(&file).contains("heartbeat 2")),
        "no heartbeat: {}",
        fleet.log()
    );
    let sup = fleet.child.id();
    // What the supervisor holds with no console attached (waited for: the control
    // thread that answered the probes above may still be finishing).
    let idle = fds_and_threads(sup);
    let mut rw = Term::console(&sock, "echo");
    rw.wait_for("Connected to echo (read-write); escape character is ^]");
    // The heartbeat, live.
    let shown = rw.screen().matches("heartbeat").count();
    assert!(wait_until(LIMIT, || rw
        .screen()
        .matches("heartbeat")
        .count()
        > shown + 1));
    // A second client watches: read-only.
    let mut ro = Term::console(&sock, "echo");
    ro.wait_for("Connected to echo (read-only");
    ro.wait_for("heartbeat");
    // Its keystrokes do not reach the guest (nothing echoes them) ...
    ro.type_keys(b"ro-secret-keys\r");
    ro.wait_for("read-only: another client holds the console");
    // ... the writer's do: the echoing guest sends them back, to both screens and the file.
    rw.type_keys(b"hello-from-rw\r");
    rw.wait_for("hello-from-rw");
    ro.wait_for("hello-from-rw");
    assert!(wait_until(LIMIT, || read(&file).contains("hello-from-rw")));
    assert!(!rw.screen().contains("ro-secret"), "{}", tail(&rw.screen()));
    assert!(!ro.screen().contains("ro-secret"), "{}", tail(&ro.screen()));
    assert!(!read(&file).contains("ro-secret"));
    // The VM crashes and is restarted: the attached clients stay, see the new child's
    // output, and the writer types into the new child.
    let old = fleet.pid_of("echo");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(LIMIT, || fleet.starts("echo").len() >= 2),
        "{}",
        fleet.log()
    );
    // Both attached after the first child's "heartbeat 1": this one is the new child's.
    rw.wait_for("heartbeat 1\r");
    ro.wait_for("heartbeat 1\r");
    rw.type_keys(b"after-restart\r");
    rw.wait_for("after-restart");
    ro.wait_for("after-restart");
    // Ctrl-] detaches: exit 0, the terminal as it was.
    let st = rw.detach();
    assert_eq!(st.code(), Some(0), "{}", tail(&rw.screen()));
    rw.assert_restored();
    // The seat is free: the next attach writes.
    let mut next = Term::console(&sock, "echo");
    next.wait_for("Connected to echo (read-write)");
    next.type_keys(b"second-writer\r");
    ro.wait_for("second-writer");
    assert_eq!(next.detach().code(), Some(0));
    next.assert_restored();
    assert_eq!(ro.detach().code(), Some(0));
    ro.assert_restored();
    // SIGTERM to an attached client: it ends (128 + 15), the terminal put back.
    let mut killed = Term::console(&sock, "echo");
    killed.wait_for("Connected to echo (read-write)");
    killed.wait_for("heartbeat");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = common::wait_with_limit(&mut killed.child, LIMIT);
    assert_eq!(st.code(), Some(128 + 15));
    killed.assert_restored();
    drop(killed);
    // Stdin not a terminal: what it holds is typed, its end keeps the console shown.
    let mut piped = Command::new(bin())
        .args(["console", "--control"])
        .arg(&sock)
        .arg("echo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = piped.stdin.take().unwrap();
    input.write_all(b"from-a-pipe\r").unwrap();
    drop(input);
    let mut out = piped.stdout.take().unwrap();
    let shown = Arc::new(Mutex::new(String::new()));
    let sh = shown.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sh.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    assert!(wait_until(LIMIT, || shown
        .lock()
        .unwrap()
        .contains("from-a-pipe")));
    let beats = shown.lock().unwrap().matches("heartbeat").count();
    assert!(
        wait_until(LIMIT, || shown.lock().unwrap().matches("heartbeat").count()
            > beats),
        "the console stopped at the end of stdin"
    );
    assert!(piped.try_wait().unwrap().is_none());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(piped.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        common::wait_with_limit(&mut piped, LIMIT).code(),
        Some(128 + 15)
    );
    // Nothing left behind in the supervisor: no fd, no thread.
    assert!(
        wait_until(LIMIT, || {
            let (fds, threads) = fds_and_threads(sup);
            fds <= idle.0 && threads <= idle.1
        }),
        "supervisor had {idle:?} (fds, threads) before, {:?} after",
        fds_and_threads(sup)
    );
    // An unknown VM: one line, exit 1, no hang.
    let out = Command::new(bin())
        .args(["console", "--control"])
        .arg(&sock)
        .arg("nope")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope") && err.lines().count() == 1, "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_watcher_that_never_reads_does_not_stop_the_console_file() {
    if !kvm_available("a_watcher_that_never_reads_does_not_stop_the_console_file") {
        return;
    }
    let dir = scratch("console-stalled");
    // A guest flooding its UART, let through at 1 MiB/s, and a heartbeating one.
    fs::write(dir.join("fleet.yaml"), "console_rate_kib_s: 1024\n").unwrap();
    let flood = "name: flood\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\nbuiltin:\n  then: flood\n";
    fs::write(dir.join("flood.yaml"), flood).unwrap();
    echo_vm(&dir, "beat", 200);
    let (fleet, sock) = up(&dir);
    let (flood_file, beat_file) = (console_file(&dir, "flood"), console_file(&dir, "beat"));
    let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
    assert!(
        wait_until(LIMIT, || size(&flood_file) > 0
            && read(&beat_file).contains("heartbeat 1")),
        "{}",
        fleet.log()
    );
    // Two clients attach and never read.
    let mut stalled = Vec::new();
    for vm in ["flood", "beat"] {
        let s = UnixStream::connect(&sock).unwrap();
        (&s).write_all(
            format!("{{\"version\":1,\"command\":\"console\",\"vm\":\"{vm}\"}}\n").as_bytes(),
        )
        .unwrap();
        stalled.push(s);
    }
    let at_attach = size(&flood_file);
    // The file keeps growing far past what the stalled client's queue and socket hold
    // (256 KiB + the socket buffers), and the other VM's heartbeat keeps coming.
    let beats = |t: &str| t.matches("heartbeat").count();
    let beats_then = beats(&read(&beat_file));
    assert!(
        wait_until(Duration::from_secs(120), || size(&flood_file)
            > at_attach + (2 << 20)),
        "the flood's console file stopped at {} (attached at {at_attach})",
        size(&flood_file)
    );
    assert!(wait_until(LIMIT, || beats(&read(&beat_file)) > beats_then + 3));
    // When the stalled client reads at last, it is told what it lost.
    let s = &stalled[0];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let told = wait_until(LIMIT, || {
        if let Ok(n) = (&*s).read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).contains(" bytes dropped]")
    });
    assert!(told, "no drop marker in {} bytes read", got.len());
    assert!(
        String::from_utf8_lossy(&got).starts_with("{\"version\":1,\"ok\":true,\"mode\":\"rw\"}\n")
    );
    drop(stalled);
    drop(fleet);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn logs_prints_the_console_file_and_follows_it() {
    if !kvm_available("logs_prints_the_console_file_and_follows_it") {
        return;
    }
    let dir = scratch("console-logs");
    echo_vm(&dir, "beat", 200);
    let (fleet, sock) = up(&dir);
    let file = console_file(&dir, "beat");
    assert!(
        wait_until(LIMIT, || read(&file).contains("heartbeat 3\n")),
        "{}",
        fleet.log()
    );
    // `logs`: the file as it is (it grows meanwhile: what was there is a prefix).
    let before = read(&file);
    let out = Command::new(bin())
        .args(["logs", "--control"])
        .arg(&sock)
        .arg("beat")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.starts_with(&before), "{printed:?} vs {before:?}");
    assert!(read(&file).starts_with(&printed));
    // `logs -f`: then the new heartbeats, as they come.
    let last = before.matches("heartbeat").count();
    let mut follow = Command::new(bin())
        .args(["logs", "-f", "--control"])
        .arg(&sock)
        .arg("beat")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let want = format!("heartbeat {}\n", last + 5);
    assert!(
        wait_until(LIMIT, || seen.lock().unwrap().contains(&want)),
        "logs -f did not show {want:?}: {:?}",
        tail(&seen.lock().unwrap())
    );
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f ended by itself"
    );
    let _ = follow.kill();
    let _ = follow.wait();
    // A VM that does not exist: one line, exit 1.
    let out = Command::new(bin())
        .args(["logs", "--control"])
        .arg(&sock)
        .arg("nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_socket_is_one_clear_line() {
    let dir = scratch("console-nosock");
    let sock = dir.join("nothing.sock");
    for args in [&["console"][..], &["logs", "-f"][..]] {
        let start = Instant::now();
        let out = Command::new(bin())
            .args(args)
            .arg("--control")
            .arg(&sock)
            .arg("vm")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(start.elapsed() < LIMIT);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&sock.display().to_string()), "{err}");
    }
    let _ = fs::remove_dir_all(&dir);
}
