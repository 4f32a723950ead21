//! The VM child's half of the control channel under real KVM: `vmm-fleet run-vm
//! --control-fd 4` started here with one end of a SOCK_SEQPACKET socketpair at fd 4 (as
//! the supervisor's spawner puts it), its console on a stdout pipe read by a thread that
//! timestamps every chunk, its log on a stderr pipe. Pause/resume (heartbeats stop and
//! come back), the KVM clock held across a pause (through the library API), Ctrl-Alt-Del
//! (a built-in guest powers off; a spinning one ignores it), console input echoed by the
//! echo guest, EOF on the channel, and a flood of garbage packets. Each test prints the
//! latency it measured (`cargo test --test control_child -- --nocapture`).

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use vmm_fleet::protocol::{CONSOLE_CHUNK_MAX, CONTROL_FD, CONTROL_VERSION, ToChild};

const POWEROFF: i32 = 0;
const STOPPED: i32 = 6;
/// Every wait for something the guest or the child does.
const LIMIT: Duration = Duration::from_secs(30);

/// A chunk read from a pipe and when it arrived.
type Chunk = (Instant, Vec<u8>);

/// Everything read from a pipe, each chunk with when it arrived.
#[derive(Clone, Default)]
struct Pipe(Arc<Mutex<Vec<Chunk>>>);

impl Pipe {
    fn reader(mut from: impl Read + Send + 'static) -> Self {
        let pipe = Pipe::default();
        let chunks = pipe.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                chunks
                    .lock()
                    .unwrap()
                    .push((Instant::now(), buf[..n].to_vec()));
            }
        });
        pipe
    }

    fn text(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, b)| b.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// When the text read so far first contained `needle` (the arrival of the chunk that
    /// completed it).
    fn when(&self, needle: &str) -> Option<Instant> {
        let chunks = self.0.lock().unwrap();
        let mut text = Vec::new();
        for (t, b) in chunks.iter() {
            text.extend_from_slice(b);
            if String::from_utf8_lossy(&text).contains(needle) {
                return Some(*t);
            }
        }
        None
    }

    /// The heartbeat lines so far: (arrival, N of `heartbeat N`).
    fn heartbeats(&self) -> Vec<(Instant, u64)> {
        let chunks = self.0.lock().unwrap();
        let mut out = Vec::new();
        let mut line = Vec::new();
        for (t, b) in chunks.iter() {
            for &c in b {
                if c == b'\n' {
                    let l = String::from_utf8_lossy(&line);
                    if let Some(n) = l.strip_prefix("heartbeat ").and_then(|n| n.parse().ok()) {
                        out.push((*t, n));
                    }
                    line.clear();
                } else {
                    line.push(c);
                }
            }
        }
        out
    }
}

/// A `run-vm` child with its control channel.
struct VmChild {
    child: Child,
    /// The supervisor's end (None once closed).
    sup: Option<UnixDatagram>,
    console: Pipe,
    log: Pipe,
}

/// The VM file of a built-in guest with its console on stdout.
fn config(dir: &Path, name: &str, vcpus: u8, builtin: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\nvcpus: {vcpus}\nmemory_mib: 16\nkernel: builtin\nconsole: stdout\nbuiltin:\n{builtin}"
    );
    std::fs::write(&path, text).expect("write config");
    path
}

impl VmChild {
    /// Start `run-vm --control-fd 4 FILE` with the child's end of a fresh socketpair at
    /// fd 4.
    fn start(file: &Path) -> VmChild {
        Self::start_with(file, &[])
    }

    /// [`VmChild::start`] with more arguments before FILE.
    fn start_with(file: &Path, args: &[&str]) -> VmChild {
        let (sup, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(bin());
        cmd.arg("run-vm")
            .arg("--control-fd")
            .arg(CONTROL_FD.to_string())
            .args(args)
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only dup2/fcntl, async-signal-safe system calls on
        // fds this process owns.
        unsafe {
            cmd.pre_exec(move || {
                if fd == CONTROL_FD {
                    // Already there: only clear close-on-exec.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn vmm-fleet run-vm");
        drop::<OwnedFd>(theirs);
        let sup = UnixDatagram::from(sup);
        sup.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        let console = Pipe::reader(child.stdout.take().expect("stdout"));
        let log = Pipe::reader(child.stderr.take().expect("stderr"));
        VmChild {
            child,
            sup: Some(sup),
            console,
            log,
        }
    }

    fn send(&self, msg: &ToChild) -> Instant {
        self.send_raw(&msg.encode())
    }

    fn send_raw(&self, packet: &[u8]) -> Instant {
        let t = Instant::now();
        self.sup
            .as_ref()
            .expect("channel open")
            .send(packet)
            .expect("send on the control channel");
        t
    }

    fn wait_console(&self, needle: &str) {
        let ok = wait_until(LIMIT, || self.console.text().contains(needle));
        assert!(ok, "no {needle:?} on the console:\n{}", self.report());
    }

    fn wait_log(&self, needle: &str) {
        let ok = wait_until(LIMIT, || self.log.text().contains(needle));
        assert!(ok, "no {needle:?} in the log:\n{}", self.report());
    }

    fn wait_heartbeats(&self, n: usize) {
        let ok = wait_until(LIMIT, || self.console.heartbeats().len() >= n);
        assert!(ok, "fewer than {n} heartbeats:\n{}", self.report());
    }

    /// Wait for the exit; (code, when it was seen).
    fn exit(&mut self) -> (Option<i32>, Instant) {
        let st = wait_with_limit(&mut self.child, LIMIT);
        (st.code(), Instant::now())
    }

    fn alive(&self) -> bool {
        alive(self.child.id())
    }

    fn report(&self) -> String {
        format!(
            "console:\n{}\nlog:\n{}",
            self.console.text(),
            self.log.text()
        )
    }
}

impl Drop for VmChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `Seccomp:` mode of the `control` thread of process `pid`, if it has one.
fn control_thread_seccomp(pid: u32) -> Option<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|t| t.ok())
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "control")
        })
        .and_then(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| Some(l.strip_prefix("Seccomp:")?.trim().to_string()))
        })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn pause_stops_the_heartbeat_and_resume_restarts_it() {
    if !kvm_available("control_child::pause") {
        return;
    }
    let dir = scratch("ctl-pause");
    let file = config(&dir, "p", 2, "  then: idle\n  heartbeat_ms: 50\n");
    let mut vm = VmChild::start(&file);
    vm.wait_heartbeats(3);
    // The control thread runs under its own seccomp filter (mode 2), as do the others.
    let control = control_thread_seccomp(vm.child.id());
    assert_eq!(control.as_deref(), Some("2"), "{}", vm.report());

    let sent = vm.send(&ToChild::Pause);
    vm.wait_log("paused");
    let parked = vm.log.when("paused").expect("paused");
    let before = vm.console.heartbeats();
    // Twenty heartbeat periods with the vCPUs parked: none may come.
    let quiet = wait_until(Duration::from_secs(1), || {
        vm.console.heartbeats().len() > before.len()
    });
    assert!(!quiet, "a heartbeat while paused:\n{}", vm.report());
    let last = before.last().expect("heartbeats").1;

    let resumed = vm.send(&ToChild::Resume);
    let ok = wait_until(LIMIT, || vm.console.heartbeats().len() >= before.len() + 3);
    assert!(ok, "no heartbeat after resume:\n{}", vm.report());
    let after = vm.console.heartbeats();
    let first = after[before.len()];
    assert_eq!(first.1, last + 1, "the guest's count goes on");
    assert!(vm.alive());
    // Pause and resume again: still works, and a second pause while paused is a no-op.
    vm.send(&ToChild::Pause);
    vm.send(&ToChild::Pause);
    let ok = wait_until(LIMIT, || vm.log.text().matches("paused").count() >= 2);
    assert!(ok, "{}", vm.report());
    vm.send(&ToChild::Resume);
    let n = vm.console.heartbeats().len();
    vm.wait_heartbeats(n + 2);
    assert_eq!(
        vm.log.text().matches("paused").count(),
        2,
        "{}",
        vm.report()
    );

    sigterm(&vm.child);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
    eprintln!(
        "pause: {:.1} ms from the Pause packet to every vCPU parked; resume: {:.1} ms from \
         the Resume packet to the next heartbeat on the console",
        ms(parked - sent),
        ms(first.0 - resumed)
    );
}

/// A paused VM still stops: Ctrl-Alt-Del waits for the resume (the guest is parked), and
/// SIGTERM or EOF while paused stop it at once.
#[test]
fn a_paused_vm_takes_ctrl_alt_del_at_resume_and_stops_on_sigterm_or_eof() {
    if !kvm_available("control_child::paused_stop") {
        return;
    }
    let dir = scratch("ctl-paused");
    let file = config(&dir, "cad", 1, "  then: idle\n  heartbeat_ms: 50\n");
    let mut vm = VmChild::start(&file);
    vm.wait_heartbeats(1);
    vm.send(&ToChild::Pause);
    vm.wait_log("paused");
    vm.send(&ToChild::CtrlAltDel);
    vm.wait_log("ctrl-alt-del sent");
    let exited = wait_until(Duration::from_millis(500), || !vm.alive());
    assert!(!exited, "a paused guest acted:\n{}", vm.report());
    vm.send(&ToChild::Resume);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(POWEROFF), "{}", vm.report());
    assert!(vm.console.text().contains("ctrl-alt-del: powering off"));

    for how in ["sigterm", "eof"] {
        let file = config(&dir, how, 2, "  then: idle\n  heartbeat_ms: 50\n");
        let mut vm = VmChild::start(&file);
        vm.wait_heartbeats(1);
        vm.send(&ToChild::Pause);
        vm.wait_log("paused");
        if how == "sigterm" {
            sigterm(&vm.child);
        } else {
            vm.sup = None;
        }
        let (code, _) = vm.exit();
        assert_eq!(code, Some(STOPPED), "{how}: {}", vm.report());
    }
}

#[test]
fn ctrl_alt_del_powers_the_builtin_guest_off() {
    if !kvm_available("control_child::ctrl_alt_del") {
        return;
    }
    let dir = scratch("ctl-cad");
    let file = config(&dir, "c", 1, "  then: idle\n  heartbeat_ms: 100\n");
    let mut vm = VmChild::start(&file);
    vm.wait_heartbeats(1);
    let sent = vm.send(&ToChild::CtrlAltDel);
    let (code, ended) = vm.exit();
    assert_eq!(code, Some(POWEROFF), "{}", vm.report());
    assert!(
        wait_until(LIMIT, || vm
            .console
            .text()
            .contains("ctrl-alt-del: powering off\n")),
        "{}",
        vm.report()
    );
    assert!(
        vm.log.text().contains("guest powered off"),
        "{}",
        vm.report()
    );
    let line = vm
        .console
        .when("ctrl-alt-del: powering off\n")
        .expect("line");
    let logged = vm.log.when("guest powered off").expect("log line");
    eprintln!(
        "ctrl-alt-del: {:.1} ms from the packet to the guest's line, {:.1} ms to the child's \
         last log line, {:.1} ms to its exit seen by the parent",
        ms(line - sent),
        ms(logged - sent),
        ms(ended - sent)
    );
}

#[test]
fn ctrl_alt_del_sent_before_the_guest_is_up_waits_for_its_keyboard() {
    if !kvm_available("control_child::ctrl_alt_del_early") {
        return;
    }
    let dir = scratch("ctl-cad-early");
    let file = config(&dir, "e", 1, "  then: idle\n  io_exits: 2000\n");
    let mut vm = VmChild::start(&file);
    // At once: the guest is still making its port writes, its keyboard not set up.
    vm.send(&ToChild::CtrlAltDel);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(POWEROFF), "{}", vm.report());
    assert!(
        wait_until(LIMIT, || vm
            .console
            .text()
            .contains("ctrl-alt-del: powering off\n")),
        "{}",
        vm.report()
    );
}

#[test]
fn a_spinning_guest_ignores_ctrl_alt_del_until_sigterm() {
    if !kvm_available("control_child::spin") {
        return;
    }
    let dir = scratch("ctl-spin");
    let file = config(&dir, "s", 1, "  then: spin\n");
    let mut vm = VmChild::start(&file);
    vm.wait_console("mptable cpus=1");
    vm.send(&ToChild::CtrlAltDel);
    vm.wait_log("ctrl-alt-del sent");
    let exited = wait_until(Duration::from_secs(2), || !vm.alive());
    assert!(!exited, "the spinning guest stopped:\n{}", vm.report());
    assert!(
        !vm.console.text().contains("ctrl-alt-del"),
        "{}",
        vm.report()
    );
    sigterm(&vm.child);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
}

/// A paused spinning guest uses no CPU (its vCPU is parked, not spinning in KVM_RUN);
/// resumed, it spins again.
#[test]
fn a_paused_spinning_guest_uses_no_cpu() {
    if !kvm_available("control_child::spin_pause") {
        return;
    }
    let dir = scratch("ctl-spin-pause");
    let file = config(&dir, "sp", 1, "  then: spin\n");
    let mut vm = VmChild::start(&file);
    vm.wait_console("mptable cpus=1");
    let pid = vm.child.id();
    let ticks = || cpu_ticks(pid).expect("cpu ticks");
    let t0 = ticks();
    assert!(wait_until(LIMIT, || ticks() >= t0 + 20), "not spinning");
    vm.send(&ToChild::Pause);
    vm.wait_log("paused");
    let t1 = ticks();
    // Half a second paused: a spinning vCPU would use about 50 ticks of 10 ms.
    let busy = wait_until(Duration::from_millis(500), || ticks() > t1 + 3);
    assert!(!busy, "CPU used while paused: {} ticks", ticks() - t1);
    vm.send(&ToChild::Resume);
    let t2 = ticks();
    assert!(
        wait_until(LIMIT, || ticks() >= t2 + 20),
        "not spinning again"
    );
    sigterm(&vm.child);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
}

#[test]
fn console_input_is_echoed_by_the_echo_guest() {
    if !kvm_available("control_child::echo") {
        return;
    }
    let dir = scratch("ctl-echo");
    let file = config(
        &dir,
        "echo",
        1,
        "  then: idle\n  heartbeat_ms: 1000\n  console: echo\n",
    );
    let mut vm = VmChild::start(&file);
    vm.wait_heartbeats(1);
    let sent = vm.send(&ToChild::Console(b"hello\r".to_vec()));
    vm.wait_console("hello\r\n");
    let echoed = vm.console.when("hello\r\n").expect("echo");
    // Single bytes, as keystrokes come, each echoed before the next is typed.
    let mut rtts = Vec::new();
    for (i, c) in b"abcdefghij".iter().enumerate() {
        let t = vm.send(&ToChild::Console(vec![*c]));
        let want = format!("hello\r\n{}", String::from_utf8_lossy(&b"abcdefghij"[..=i]));
        let ok = wait_until(LIMIT, || vm.console.when(&want).is_some());
        assert!(ok, "no echo of {:?}:\n{}", *c as char, vm.report());
        rtts.push(vm.console.when(&want).expect("echo") - t);
    }
    rtts.sort();
    // A paste ten times the UART's FIFO: every byte echoed, in order.
    let line: String = (0..640u32)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let pasted = vm.send(&ToChild::Console(format!("{line}\r").into_bytes()));
    vm.wait_console(&format!("{line}\r\n"));
    let paste_rtt = vm.console.when(&format!("{line}\r\n")).expect("paste") - pasted;
    sigterm(&vm.child);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
    eprintln!(
        "console round trip: {:.2} ms for `hello\\r` (packet sent to echo read from stdout); \
         single keystrokes: median {:.2} ms, max {:.2} ms; a 641-byte paste: {:.1} ms",
        ms(echoed - sent),
        ms(rtts[rtts.len() / 2]),
        ms(rtts[rtts.len() - 1]),
        ms(paste_rtt)
    );
}

#[test]
fn eof_on_the_channel_stops_the_vm_as_sigterm_does() {
    if !kvm_available("control_child::eof") {
        return;
    }
    let dir = scratch("ctl-eof");
    let file = config(&dir, "eof", 2, "  then: idle\n  heartbeat_ms: 100\n");
    let mut vm = VmChild::start(&file);
    vm.wait_heartbeats(1);
    let closed = Instant::now();
    vm.sup = None;
    let (code, ended) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
    let log = vm.log.text();
    assert!(log.contains("control channel closed"), "{log}");
    assert!(
        log.contains("stopped: the supervisor is gone (exit code 6)"),
        "{log}"
    );
    eprintln!(
        "eof: {:.1} ms from closing the supervisor's end to the child's exit",
        ms(ended - closed)
    );
}

/// PR_SET_PDEATHSIG would kill a child when the *thread* that forked it ends (as every
/// thread but one does at a re-exec of the supervisor): the child must outlive it, and
/// learn of its supervisor's end from the channel only.
#[test]
fn a_child_outlives_the_thread_that_forked_it() {
    if !kvm_available("control_child::thread_exit") {
        return;
    }
    let dir = scratch("ctl-thread");
    let file = config(&dir, "t", 1, "  then: idle\n  heartbeat_ms: 50\n");
    let pid = std::process::id().to_string();
    let mut vm = std::thread::spawn(move || {
        let vm = VmChild::start_with(&file, &["--supervisor-pid", &pid]);
        vm.wait_heartbeats(1);
        vm
    })
    .join()
    .expect("spawning thread");
    // The thread that forked the child is gone; the child runs on.
    let n = vm.console.heartbeats().len();
    vm.wait_heartbeats(n + 5);
    assert!(vm.alive(), "{}", vm.report());
    vm.sup = None;
    let (code, _) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
}

#[test]
fn a_flood_of_garbage_packets_is_ignored() {
    if !kvm_available("control_child::garbage") {
        return;
    }
    let dir = scratch("ctl-garbage");
    let file = config(
        &dir,
        "g",
        1,
        "  then: idle\n  heartbeat_ms: 200\n  console: echo\n",
    );
    let mut vm = VmChild::start(&file);
    vm.wait_heartbeats(1);
    // Every kind of unreadable packet, many times over, with some of every size.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fixed: Vec<Vec<u8>> = vec![
        vec![],
        vec![CONTROL_VERSION],
        vec![0, 1],
        vec![CONTROL_VERSION.wrapping_add(1), 1],
        vec![CONTROL_VERSION, 0xee],
        vec![CONTROL_VERSION, ToChild::Pause.encode()[1], 1, 2, 3],
        vec![CONTROL_VERSION, ToChild::Console(vec![1]).encode()[1]],
        vec![0xff; CONSOLE_CHUNK_MAX + 3],
        vec![CONTROL_VERSION; 8000],
    ];
    for i in 0..3000 {
        let p = if i % 2 == 0 {
            fixed[i / 2 % fixed.len()].clone()
        } else {
            // Random bytes, never a valid version first.
            let len = (next() % 64) as usize + 1;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if p[0] == CONTROL_VERSION {
                p[0] = 0;
            }
            p
        };
        vm.send_raw(&p);
    }
    // Still serving: a keystroke after the flood is echoed; still running.
    vm.send(&ToChild::Console(b"after\r".to_vec()));
    vm.wait_console("after\r\n");
    assert!(vm.alive());
    let n = vm.console.heartbeats().len();
    vm.wait_heartbeats(n + 1);
    let log = vm.log.text();
    let ignored = log.lines().filter(|l| l.contains("ignored")).count();
    assert!(
        (1..=5).contains(&ignored),
        "each kind of garbage logged once ({ignored} lines):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    sigterm(&vm.child);
    let (code, _) = vm.exit();
    assert_eq!(code, Some(STOPPED), "{}", vm.report());
}

#[test]
fn run_vm_refuses_a_control_fd_that_is_not_a_seqpacket_socket() {
    let dir = scratch("ctl-badfd");
    let file = config(&dir, "b", 1, "  then: poweroff\n");
    let out = Command::new(bin())
        .arg("run-vm")
        .arg("--control-fd")
        .arg("9")
        .arg(&file)
        .output()
        .expect("run-vm");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("control channel fd 9"), "{err}");
    let _ = std::io::stderr().flush();
}

/// The KVM clock across a pause, through the library API: it stands still while paused
/// (set back at the resume) and runs with wall time otherwise.
#[test]
fn the_kvm_clock_does_not_jump_over_a_pause() {
    if !kvm_available("control_child::clock") {
        return;
    }
    use vmm_fleet::vm::{Kernel, RunningVm, StopLatch, VmParams};
    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);
    impl Write for Console {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let console = Console::default();
    let params = VmParams {
        vcpus: 2,
        memory_mib: 16,
        kernel: Kernel::Builtin,
        initrd: None,
        cmdline: "then=idle heartbeat_ms=50".into(),
        console: Box::new(console.clone()),
        extra_regions: Vec::new(),
        mmio_devices: Vec::new(),
        counters: None,
        started: None,
        control: None,
        name: "clock".into(),
    };
    let mut vm = RunningVm::start(params, Arc::new(StopLatch::default())).expect("start");
    let beats = || {
        String::from_utf8_lossy(&console.0.lock().unwrap())
            .matches("heartbeat ")
            .count()
    };
    assert!(wait_until(LIMIT, || beats() >= 2), "no heartbeat");

    let at_pause = vm.pause().expect("pause").expect("was running");
    let paused_at = Instant::now();
    assert_eq!(vm.pause().expect("pause again"), None, "paused already");
    let n = beats();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(beats(), n, "no heartbeat while paused");
    let held = vm.clock_ns().expect("clock");
    let restored = vm.resume().expect("resume").expect("was paused");
    let after = vm.clock_ns().expect("clock");
    let paused_for = paused_at.elapsed();
    assert_eq!(restored, at_pause);
    // While paused KVM's clock ran on (the kernel's), but the resume set it back.
    assert!(
        held >= at_pause + 400_000_000,
        "the clock runs while paused: {held} vs {at_pause}"
    );
    let jump = after.saturating_sub(at_pause);
    assert!(after >= at_pause, "{after} < {at_pause}");
    assert!(
        jump < 100_000_000,
        "the guest's clock jumped {jump} ns over a pause of {paused_for:?}"
    );
    assert!(
        wait_until(LIMIT, || beats() >= n + 2),
        "no heartbeat after resume"
    );
    // Unpaused, it keeps time.
    let t0 = (vm.clock_ns().expect("clock"), Instant::now());
    std::thread::sleep(Duration::from_millis(300));
    let t1 = (vm.clock_ns().expect("clock"), Instant::now());
    let wall = (t1.1 - t0.1).as_nanos() as u64;
    assert!(
        t1.0 - t0.0 >= wall * 9 / 10,
        "clock ran {} ns in {wall} ns of wall time",
        t1.0 - t0.0
    );
    vm.shutdown().expect("shutdown");
    eprintln!(
        "kvm clock: {jump} ns ahead of its value at the pause right after a resume, over a \
         pause of {paused_for:?}"
    );
}
