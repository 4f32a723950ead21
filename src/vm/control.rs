//! The `control` thread of a VM child: reads the supervisor's [`ToChild`] packets from
//! the control channel (fd [`crate::protocol::CONTROL_FD`], a SOCK_SEQPACKET socket) and
//! acts on the VM:
//! - `Pause` / `Resume`: the vCPUs parked through the shared run state, KVM's clock read
//!   at the pause and set back at the resume ([`RunControl`]);
//! - `CtrlAltDel`: the i8042 queues Ctrl, Alt, Del and raises IRQ 1 ([`I8042`]);
//! - `Console(bytes)`: into the UART's receive FIFO with its interrupt (IRQ 4). What does
//!   not fit waits in a bounded backlog ([`CONSOLE_BACKLOG`] bytes) fed into the FIFO as
//!   the guest reads it (the thread looks every [`CONSOLE_RETRY`] meanwhile, never
//!   blocking on the guest); past the bound, or when the guest reads nothing for
//!   [`CONSOLE_STALL`], bytes are dropped and counted;
//! - end of file (the supervisor is gone: the kernel closed its end): the VM stops as on
//!   SIGTERM ([`StopCause::SupervisorGone`]). This replaces PR_SET_PDEATHSIG, which
//!   would kill every child when the supervisor re-executes itself.
//!
//! A packet the child cannot read is ignored and logged once per kind of problem; the
//! thread never panics on what arrives. It runs under its own seccomp filter
//! ([`ThreadKind::Control`]), started before the guest runs.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{MsgFlags, SockType, getsockopt, recv, sockopt};

use super::devices::i8042::I8042;
use super::devices::serial::SerialDevice;
use super::kvm_vm::{RunControl, StopCause, StopLatch};
use super::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use super::vcpu::StopReason;
use crate::protocol::{CONSOLE_CHUNK_MAX, ProtocolError, ToChild};

/// Room for the largest packet the protocol allows, plus slack: a longer one is seen
/// (MSG_TRUNC reports its real length) and refused.
pub const PACKET_BUF: usize = CONSOLE_CHUNK_MAX + 64;

/// Console input bytes held for a guest whose receive FIFO is full (a paste longer than
/// the FIFO's 64 bytes); more are dropped.
pub const CONSOLE_BACKLOG: usize = 4 * CONSOLE_CHUNK_MAX;
/// How often the backlog is offered to the FIFO again while bytes wait.
pub const CONSOLE_RETRY: Duration = Duration::from_millis(2);
/// A backlog the guest has taken nothing from for this long is dropped (the guest is not
/// reading its UART).
pub const CONSOLE_STALL: Duration = Duration::from_secs(1);

/// Errors adopting the control channel fd.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The fd is not open, or not a socket.
    #[error("control channel fd {fd}: {source}")]
    Fd {
        /// The fd given.
        fd: RawFd,
        /// Why.
        source: nix::Error,
    },
    /// The fd is a socket of another type.
    #[error("control channel fd {fd}: a {got:?} socket, expected SOCK_SEQPACKET")]
    Type {
        /// The fd given.
        fd: RawFd,
        /// Its type.
        got: SockType,
    },
}

/// Take the inherited control channel at `fd` (normally [`crate::protocol::CONTROL_FD`]):
/// checked to be an open SOCK_SEQPACKET socket, kept out of any exec.
pub fn inherited_channel(fd: RawFd) -> Result<OwnedFd, ChannelError> {
    let err = |source| ChannelError::Fd { fd, source };
    if fd < 0 {
        return Err(err(nix::Error::EBADF));
    }
    // SAFETY: `fd` is not negative; F_SETFD on a raw fd number touches no memory, and a
    // closed fd gives EBADF.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(err)?;
    let got = getsockopt(&borrowed, sockopt::SockType).map_err(err)?;
    if got != SockType::SeqPacket {
        return Err(ChannelError::Type { fd, got });
    }
    // SAFETY: `fd` is open (checked above) and this process was given it to own: nothing
    // else in the child refers to it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// What the control thread acts on.
pub struct Targets {
    /// Pause and resume.
    pub run: Arc<RunControl>,
    /// The keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// The UART.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Where the end of the channel stops the VM.
    pub latch: Arc<StopLatch>,
}

/// Counters of the control thread, readable from other threads.
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Packets acted on.
    pub handled: AtomicU64,
    /// Packets ignored (unreadable).
    pub ignored: AtomicU64,
    /// Console input bytes dropped because the guest's receive FIFO was full.
    pub console_dropped: AtomicU64,
}

/// The kinds of unreadable packet, each logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Garbage {
    Empty,
    Version,
    Kind,
    Payload,
    TooLong,
}

impl Garbage {
    fn of(e: &ProtocolError) -> Self {
        match e {
            ProtocolError::Empty => Garbage::Empty,
            ProtocolError::Version { .. } => Garbage::Version,
            ProtocolError::Kind(_) => Garbage::Kind,
            ProtocolError::Payload { .. } => Garbage::Payload,
        }
    }
}

/// The control thread's state: what it acts on, what it has logged, its counters.
pub struct Controller {
    name: String,
    targets: Targets,
    stats: Arc<ControlStats>,
    logged: Vec<Garbage>,
    dropped_logged: bool,
    log: Box<dyn Write + Send>,
    /// Console input waiting for room in the FIFO, and when the guest last took some.
    backlog: VecDeque<u8>,
    progress: Instant,
}

impl Controller {
    /// A controller for VM `name` logging to `log` (the child's stderr).
    pub fn new(name: &str, targets: Targets, log: Box<dyn Write + Send>) -> Self {
        Controller {
            name: name.to_string(),
            targets,
            stats: Arc::new(ControlStats::default()),
            logged: Vec::new(),
            dropped_logged: false,
            log,
            backlog: VecDeque::new(),
            progress: Instant::now(),
        }
    }

    /// Console input bytes waiting for the guest.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    fn drop_input(&mut self, n: usize, why: &str) {
        if n == 0 {
            return;
        }
        self.stats
            .console_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
        if !self.dropped_logged {
            self.dropped_logged = true;
            self.line(format_args!(
                "console input: {n} bytes dropped, {why}; later drops are counted, not logged"
            ));
        }
    }

    /// Offer the backlog to the UART's FIFO; drop it if the guest has read nothing for
    /// [`CONSOLE_STALL`] by `now`.
    pub fn feed(&mut self, now: Instant) {
        if self.backlog.is_empty() {
            return;
        }
        let taken = {
            let mut serial = self
                .targets
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            serial.enqueue_input(self.backlog.make_contiguous())
        };
        if taken > 0 {
            self.backlog.drain(..taken);
            self.progress = now;
        } else if now.duration_since(self.progress) >= CONSOLE_STALL {
            let n = self.backlog.len();
            self.backlog.clear();
            self.drop_input(n, "the guest has not read its UART for a second");
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ControlStats> {
        self.stats.clone()
    }

    fn line(&mut self, what: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.log, "vmm-fleet: vm {}: {what}", self.name);
    }

    /// Act on one packet's bytes (`len` is its real length, which may exceed `bytes`).
    pub fn packet(&mut self, bytes: &[u8], len: usize) {
        let decoded = if len > bytes.len() {
            Err(Garbage::TooLong)
        } else {
            ToChild::decode(bytes).map_err(|e| {
                let kind = Garbage::of(&e);
                if !self.logged.contains(&kind) {
                    self.line(format_args!(
                        "control channel: {e}: ignored (further packets like it are not logged)"
                    ));
                    self.logged.push(kind);
                }
                kind
            })
        };
        match decoded {
            Ok(msg) => {
                self.stats.handled.fetch_add(1, Ordering::Relaxed);
                self.handle(msg);
            }
            Err(kind) => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                if kind == Garbage::TooLong && !self.logged.contains(&kind) {
                    self.line(format_args!(
                        "control channel: a packet of {len} bytes, more than {PACKET_BUF}: \
                         ignored (further packets like it are not logged)"
                    ));
                    self.logged.push(kind);
                }
            }
        }
    }

    /// Act on one message.
    pub fn handle(&mut self, msg: ToChild) {
        match msg {
            ToChild::Pause => match self.targets.run.pause() {
                Ok(Some(_)) => self.line(format_args!("paused")),
                Ok(None) => {}
                Err(e) => self.line(format_args!("pause: {e}")),
            },
            ToChild::Resume => match self.targets.run.resume() {
                Ok(Some(_)) => self.line(format_args!("resumed")),
                Ok(None) => {}
                Err(e) => self.line(format_args!("resumed, but the guest's clock: {e}")),
            },
            ToChild::CtrlAltDel => {
                let r = self
                    .targets
                    .i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ctrl_alt_del();
                match r {
                    Ok(()) => self.line(format_args!("ctrl-alt-del sent to the guest")),
                    Err(e) => self.line(format_args!("ctrl-alt-del: {e}")),
                }
            }
            ToChild::Console(bytes) => {
                let now = Instant::now();
                if self.backlog.is_empty() {
                    self.progress = now;
                }
                let room = CONSOLE_BACKLOG - self.backlog.len();
                let kept = bytes.len().min(room);
                self.backlog.extend(&bytes[..kept]);
                self.feed(now);
                self.drop_input(
                    bytes.len() - kept,
                    "the guest's receive FIFO and the backlog are full (it is not reading its UART)",
                );
            }
        }
    }

    /// The channel ended (`why`): stop the VM as SIGTERM does.
    fn end(&mut self, why: std::fmt::Arguments<'_>) {
        self.line(why);
        self.targets.latch.set(StopCause::SupervisorGone);
    }

    /// Read packets from `fd` until the channel ends, acting on each; then stop the VM.
    pub fn serve(mut self, fd: OwnedFd) {
        let mut buf = vec![0u8; PACKET_BUF];
        loop {
            // Console input waits for the guest: look again soon, unless a packet comes.
            while !self.backlog.is_empty() && !readable(&fd, CONSOLE_RETRY) {
                self.feed(Instant::now());
            }
            match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Ok(0) if peer_closed(&fd) => {
                    let dropped = self.stats.console_dropped.load(Ordering::Relaxed);
                    let tail = if dropped > 0 {
                        format!(" ({dropped} console input bytes were dropped in all)")
                    } else {
                        String::new()
                    };
                    self.end(format_args!(
                        "control channel closed: the supervisor is gone; stopping{tail}"
                    ));
                    return;
                }
                Ok(len) => {
                    let n = len.min(buf.len());
                    self.packet(&buf[..n], len);
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    self.end(format_args!(
                        "control channel: {e}: the supervisor cannot be heard; stopping"
                    ));
                    return;
                }
            }
        }
    }
}

/// Whether a packet (or the end) waits on `fd`, waiting at most `d`. An error counts as
/// readable: the `recv` that follows reports it.
fn readable(fd: &OwnedFd, d: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(d.as_millis()).unwrap_or(u16::MAX);
    !matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(0))
}

/// After a zero-length read: whether the peer closed its end (EOF), as opposed to an
/// empty packet (which SOCK_SEQPACKET can carry).
fn peer_closed(fd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        // Cannot tell: take it as the end rather than spin on an ended channel.
        Err(_) => true,
    }
}

/// Start the `control` thread (filtered from its start when `mode` is on) serving `fd`.
/// Should it panic (a bug), the VM stops with a VMM error rather than run on with no one
/// listening to its supervisor.
pub fn start(
    controller: Controller,
    fd: OwnedFd,
    mode: SeccompMode,
) -> Result<JoinHandle<()>, SeccompError> {
    let latch = controller.targets.latch.clone();
    seccomp::spawn_filtered(ThreadKind::Control, mode, move || {
        let served =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| controller.serve(fd)));
        if served.is_err() {
            latch.set(StopCause::Guest(StopReason::Error(
                "the control thread panicked".into(),
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    //! The controller on a real VM-less set of devices: packets decoded, garbage logged
    //! once per kind, console overflow counted. (The VM side is in tests/control_child.rs.)

    use super::*;
    use crate::protocol::CONTROL_VERSION;
    use crate::vm::vcpu::ExitHandler;
    use std::os::unix::net::UnixDatagram;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);
    impl Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    struct Harness {
        controller: Controller,
        log: Log,
        latch: Arc<StopLatch>,
        serial_irq: EventFd,
        serial: Arc<Mutex<SerialDevice>>,
        i8042: Arc<Mutex<I8042>>,
    }

    /// A controller over real devices and a real (never started) VM's run control.
    fn harness() -> Option<Harness> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let latch = Arc::new(StopLatch::default());
        let exit: Arc<dyn ExitHandler> = latch.clone();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = SerialDevice::new(serial_irq.try_clone().unwrap(), Box::new(std::io::sink()))
            .into_shared();
        let i8042 = Arc::new(Mutex::new(I8042::new(
            exit,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )));
        let log = Log::default();
        let targets = Targets {
            run: RunControl::for_test(vm),
            i8042: i8042.clone(),
            serial: serial.clone(),
            latch: latch.clone(),
        };
        Some(Harness {
            controller: Controller::new("t", targets, Box::new(log.clone())),
            log,
            latch,
            serial_irq,
            serial,
            i8042,
        })
    }

    #[test]
    fn garbage_is_ignored_and_logged_once_per_kind() {
        let Some(mut h) = harness() else { return };
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![CONTROL_VERSION],
            vec![CONTROL_VERSION + 1, 1],
            vec![0, 0, 0],
            vec![CONTROL_VERSION, 200],
            vec![CONTROL_VERSION, 255, 1, 2],
            vec![CONTROL_VERSION, ToChild::Pause.encode()[1], 0],
            vec![CONTROL_VERSION, ToChild::Console(vec![1]).encode()[1]],
        ];
        for _ in 0..50 {
            for g in &garbage {
                h.controller.packet(g, g.len());
            }
            h.controller.packet(&[CONTROL_VERSION; 8], PACKET_BUF + 1);
        }
        let log = h.log.text();
        assert_eq!(log.lines().count(), 5, "one line per kind:\n{log}");
        for word in ["empty", "version", "unknown", "payload", "more than"] {
            assert_eq!(
                log.lines().filter(|l| l.contains(word)).count(),
                1,
                "{word}:\n{log}"
            );
        }
        let stats = h.controller.stats();
        assert_eq!(stats.ignored.load(Ordering::Relaxed), 50 * 9);
        assert_eq!(stats.handled.load(Ordering::Relaxed), 0);
        assert_eq!(h.latch.get(), None, "garbage never stops the VM");
        assert_eq!(h.i8042.lock().unwrap().queued(), 0);
    }

    /// What the guest reads from the UART: every byte while LSR says one is ready.
    fn guest_reads(serial: &Mutex<SerialDevice>) -> Vec<u8> {
        use vm_device::MutDevicePio;
        use vm_device::bus::PioAddress;
        let mut s = serial.lock().unwrap();
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            s.pio_read(PioAddress(0x3f8), 5, &mut b);
            if b[0] & 1 == 0 {
                return got;
            }
            s.pio_read(PioAddress(0x3f8), 0, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn console_input_beyond_the_fifo_waits_in_a_bounded_backlog() {
        let Some(mut h) = harness() else { return };
        let text: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        let p = ToChild::Console(text.clone()).encode();
        h.controller.packet(&p, p.len());
        assert_eq!(h.controller.backlog(), 200 - 64);
        let mut got = guest_reads(&h.serial);
        let start = Instant::now();
        while h.controller.backlog() > 0 {
            h.controller.feed(start);
            got.extend(guest_reads(&h.serial));
        }
        assert_eq!(got, text, "every byte, in order");
        let stats = h.controller.stats();
        assert_eq!(stats.console_dropped.load(Ordering::Relaxed), 0);
        assert_eq!(h.log.text(), "");
        // The guest never enabled the UART's interrupt: none raised.
        assert!(h.serial_irq.read().is_err());

        // A guest that reads nothing: the backlog fills to its bound, the rest is
        // dropped, and after CONSOLE_STALL the backlog goes too.
        let p = ToChild::Console(vec![b'x'; CONSOLE_CHUNK_MAX]).encode();
        for _ in 0..6 {
            h.controller.packet(&p, p.len());
        }
        assert_eq!(h.controller.backlog(), CONSOLE_BACKLOG);
        let dropped = 6 * CONSOLE_CHUNK_MAX - 64 - CONSOLE_BACKLOG;
        assert_eq!(
            stats.console_dropped.load(Ordering::Relaxed),
            dropped as u64
        );
        h.controller.feed(Instant::now());
        assert_eq!(h.controller.backlog(), CONSOLE_BACKLOG, "not stalled yet");
        h.controller.feed(Instant::now() + CONSOLE_STALL);
        assert_eq!(h.controller.backlog(), 0);
        assert_eq!(
            stats.console_dropped.load(Ordering::Relaxed),
            (dropped + CONSOLE_BACKLOG) as u64
        );
        let log = h.log.text();
        assert_eq!(log.lines().count(), 1, "logged once:\n{log}");
        // The first drop: the fifth packet's overflow.
        let first = 5 * CONSOLE_CHUNK_MAX - 64 - CONSOLE_BACKLOG;
        assert!(log.contains(&format!("{first} bytes dropped")), "{log}");
    }

    #[test]
    fn ctrl_alt_del_queues_the_scancodes() {
        let Some(mut h) = harness() else { return };
        let p = ToChild::CtrlAltDel.encode();
        h.controller.packet(&p, p.len());
        assert_eq!(h.i8042.lock().unwrap().queued(), 4);
        for _ in 0..5 {
            h.controller.packet(&p, p.len());
        }
        assert_eq!(h.i8042.lock().unwrap().queued(), 16);
        assert!(h.log.text().contains("buffer full"), "{}", h.log.text());
    }

    #[test]
    fn eof_stops_the_vm_but_an_empty_packet_does_not() {
        let Some(h) = harness() else { return };
        // A SOCK_SEQPACKET pair, as the supervisor makes.
        let (sup, child) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let sup = UnixDatagram::from(sup);
        let latch = h.latch.clone();
        let log = h.log.clone();
        let stats = h.controller.stats();
        let controller = h.controller;
        let thread = std::thread::spawn(move || controller.serve(child));
        sup.send(&[]).unwrap();
        sup.send(&ToChild::Pause.encode()).unwrap();
        sup.send(&ToChild::Resume.encode()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stats.handled.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(stats.handled.load(Ordering::Relaxed), 2, "{}", log.text());
        assert_eq!(stats.ignored.load(Ordering::Relaxed), 1, "{}", log.text());
        assert_eq!(latch.get(), None, "an empty packet is not the end");
        drop(sup);
        thread.join().unwrap();
        assert_eq!(latch.get(), Some(StopCause::SupervisorGone));
        let text = log.text();
        assert!(
            text.contains("paused") && text.contains("resumed"),
            "{text}"
        );
        assert!(text.contains("supervisor is gone"), "{text}");
    }

    #[test]
    fn only_a_seqpacket_socket_is_adopted() {
        assert!(matches!(
            inherited_channel(-1),
            Err(ChannelError::Fd { .. })
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(OwnedFd::from(a));
        let e = inherited_channel(fd).unwrap_err();
        assert!(e.to_string().contains("SOCK_SEQPACKET"), "{e}");
        // SAFETY: our own fd, not adopted above.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
}
