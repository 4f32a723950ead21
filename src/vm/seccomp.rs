//! The seccomp-BPF filters of the `run-vm` process: one allow-list per thread kind (main,
//! vCPU, and each helper thread), built at run time with rust-vmm's `seccompiler` and
//! installed by each thread on itself before the guest runs.
//!
//! Assume the guest takes over its VMM (Firecracker's threat model): a filtered thread can
//! only make the system calls its kind needs once the guest runs. Everything else (a new
//! socket, `execve`, opening a file, `ptrace`, ...) kills the whole process with SIGSYS
//! ([`SeccompAction::KillProcess`]), which the supervisor logs as a seccomp violation.
//!
//! Signals are pinned to the process itself: every VM child of a fleet runs under one uid,
//! so without the pin a compromised VMM could `kill -9` its supervisor or a sibling.
//! `kill` is allowed only with pid == our own pid and `tgkill` only with tgid == our own
//! pid (what `pthread_kill`, hence the vCPU kick, uses); `tkill`, `pidfd_send_signal`
//! and the `rt_*sigqueueinfo` calls are never allowed.
//!
//! Order (see [`apply`]): a thread's filter covers the thread and every thread it creates
//! afterwards, so each thread installs its own at its start, and the thread that starts
//! the VM (the process's main thread in `run-vm`) installs its own last, once every other
//! thread exists and has its filter, just before it releases the vCPUs at the start
//! barrier. Privileges are dropped (setresuid and friends, which glibc broadcasts to every
//! thread with a signal) before any of this, while the main thread is still alone.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::mpsc;
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of threads of a VM child, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The process's main thread: builds the VM, waits for a stop, shuts the VM down.
    Main,
    /// A vCPU thread (`vcpu_N`): runs `KVM_RUN` and the devices the guest touches.
    Vcpu,
    /// The signal-hook thread (`signals`) of `run-vm`: turns SIGTERM/SIGINT into a stop.
    Signals,
    /// The `kvm_stats` thread: copies KVM's binary statistics into the counter table.
    KvmStats,
    /// The `control` thread: reads the supervisor's control channel, pauses and resumes
    /// the vCPUs (KVM's clock), feeds the i8042 and the UART (irqfd writes).
    Control,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Signals,
        ThreadKind::KvmStats,
        ThreadKind::Control,
    ];

    /// The kind's name as in messages (the thread name for helper threads).
    pub const fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Signals => "signals",
            ThreadKind::KvmStats => "kvm_stats",
            ThreadKind::Control => "control",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the filters are installed (fleet setting `seccomp`, `run-vm --seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Every thread runs under its filter (the default).
    #[default]
    On,
    /// No filter (for debugging a VMM).
    Off,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built (a bug in the rules, or an unsupported architecture).
    #[error("seccomp filter of the {kind} thread: {source}")]
    Build {
        /// Whose filter.
        kind: ThreadKind,
        /// seccompiler's reason.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {kind} thread: {source}")]
    Apply {
        /// Whose filter.
        kind: ThreadKind,
        /// seccompiler's reason (errno of prctl or seccomp).
        source: seccompiler::Error,
    },
    /// A filtered helper thread could not be started.
    #[error("cannot start the {kind} thread: {source}")]
    Spawn {
        /// Which thread.
        kind: ThreadKind,
        /// Why.
        source: std::io::Error,
    },
    /// A filtered helper thread ended before saying whether its filter is in place.
    #[error("the {0} thread ended before installing its seccomp filter")]
    Vanished(ThreadKind),
}

// KVM ioctl request numbers (kvm-ioctls keeps its own private).
mod kvm {
    #![allow(missing_docs)]
    use kvm_bindings::{KVMIO, kvm_clock_data, kvm_mp_state, kvm_regs, kvm_sregs};
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
}

/// The ioctls of the control thread: KVM's clock, read at a pause and set at the resume.
fn control_ioctls() -> [u64; 2] {
    [kvm::KVM_GET_CLOCK(), kvm::KVM_SET_CLOCK()].map(u64::from)
}

/// The ioctls a vCPU thread makes: its start registers (set on the thread, before the
/// barrier) and `KVM_RUN`.
fn vcpu_ioctls() -> [u64; 5] {
    [
        kvm::KVM_RUN(),
        kvm::KVM_SET_REGS(),
        kvm::KVM_GET_SREGS(),
        kvm::KVM_SET_SREGS(),
        kvm::KVM_SET_MP_STATE(),
    ]
    .map(u64::from)
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Arguments are 0..=5 here, the only thing `new` checks.
    SeccompCondition::new(arg, len, op, value).expect("seccomp argument index 0..=5")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    // Every rule here has at least one condition, the only thing `new` checks.
    SeccompRule::new(conditions).expect("seccomp rule with conditions")
}

/// Argument `arg` (32 bits) equals `value`.
fn eq32(arg: u8, value: u64) -> SeccompRule {
    rule(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )])
}

/// Protection argument `arg` has no PROT_EXEC: no new executable memory once filtered.
fn no_exec(arg: u8) -> SeccompRule {
    rule(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )])
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for s in syscalls {
        rules.insert(*s, Vec::new());
    }
}

/// What every thread of the child may do: memory, futexes, signal return and masks,
/// writing (logs, console), closing, the clock, its own ids, exiting; and signals to its
/// own process only.
fn common_rules(pid: u32) -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_futex,
            // Spin-waits (signal-hook's registry yields while a handler runs elsewhere).
            libc::SYS_sched_yield,
            // The kernel's restart of a wait with a timeout a signal handler interrupted.
            libc::SYS_restart_syscall,
            // std's HashMap keys, drawn once per thread on first use.
            libc::SYS_getrandom,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_clock_gettime,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    r.insert(libc::SYS_mmap, vec![no_exec(2)]);
    r.insert(libc::SYS_mprotect, vec![no_exec(2)]);
    // Rust's std checks an fd is open before it closes it (debug builds).
    r.insert(libc::SYS_fcntl, vec![eq32(1, libc::F_GETFD as u64)]);
    // Signals reach this process only: the vCPU kick and abort() use tgkill(getpid(), ..).
    let pid = u64::from(pid);
    r.insert(libc::SYS_kill, vec![eq32(0, pid)]);
    r.insert(libc::SYS_tgkill, vec![eq32(0, pid)]);
    r
}

/// The send of signal-hook's handler: one byte with MSG_DONTWAIT on its connected socket
/// (no address: without `socket`/`connect` there is nowhere else to send to). A process
/// signal (SIGTERM/SIGINT) runs that handler on any thread that does not block it.
fn signal_handler_rules(r: &mut Rules) {
    r.insert(
        libc::SYS_sendto,
        vec![rule(vec![
            cond(
                3,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::MSG_DONTWAIT as u64,
            ),
            cond(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0),
        ])],
    );
}

/// The allow-list of `kind` for process `pid` (the pid `kill`/`tgkill` are pinned to).
pub fn rules(kind: ThreadKind, pid: u32) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut r = common_rules(pid);
    match kind {
        ThreadKind::Main => {
            signal_handler_rules(&mut r);
        }
        ThreadKind::Vcpu => {
            r.insert(
                libc::SYS_ioctl,
                vcpu_ioctls().into_iter().map(|n| eq32(1, n)).collect(),
            );
        }
        ThreadKind::Signals => {
            signal_handler_rules(&mut r);
            // Blocking reads of signal-hook's self-pipe (a socket pair).
            allow(&mut r, &[libc::SYS_recvfrom]);
        }
        ThreadKind::KvmStats => {
            signal_handler_rules(&mut r);
            // Reads of the vCPUs' binary statistics fds.
            allow(&mut r, &[libc::SYS_pread64]);
        }
        ThreadKind::Control => {
            signal_handler_rules(&mut r);
            r.insert(
                libc::SYS_ioctl,
                control_ioctls().into_iter().map(|n| eq32(1, n)).collect(),
            );
            // One packet at a time from the control channel: recv(fd, buf, len,
            // MSG_TRUNC), no address (glibc's recv is recvfrom with a null address).
            r.insert(
                libc::SYS_recvfrom,
                vec![rule(vec![
                    cond(
                        3,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        libc::MSG_TRUNC as u64,
                    ),
                    cond(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0),
                ])],
            );
            // After an empty read: has the peer closed (POLLHUP)? No timeout.
            allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll]);
        }
    }
    r
}

/// The compiled filter of `kind` for process `pid`: the allow-list; anything else kills
/// the process.
pub fn filter(kind: ThreadKind, pid: u32) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter = SeccompFilter::new(
        rules(kind, pid),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Build the filter of `kind` for this process and install it on the calling thread
/// (and so on every thread it creates from now on). Sets no_new_privs too (the kernel
/// requires it of an unprivileged filter).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind, std::process::id())?;
    seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Apply { kind, source })
}

/// [`apply`] when `mode` is on; nothing when off.
pub fn apply_if(mode: SeccompMode, kind: ThreadKind) -> Result<(), SeccompError> {
    match mode {
        SeccompMode::On => apply(kind),
        SeccompMode::Off => Ok(()),
    }
}

/// Start helper thread `kind` (named after it): it installs its filter first (when `mode`
/// is on), then runs `body`. Returns once the filter is in place, so the caller can start
/// the guest knowing this thread is filtered; an error if it could not be.
pub fn spawn_filtered<F>(
    kind: ThreadKind,
    mode: SeccompMode,
    body: F,
) -> Result<JoinHandle<()>, SeccompError>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel::<Result<(), SeccompError>>(1);
    let handle = std::thread::Builder::new()
        .name(kind.as_str().into())
        .spawn(move || {
            let installed = apply_if(mode, kind);
            let ok = installed.is_ok();
            let _ = tx.send(installed);
            if ok {
                body();
            }
        })
        .map_err(|source| SeccompError::Spawn { kind, source })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(SeccompError::Vanished(kind))
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each filter installed for real in a forked copy of this test process: the child
    //! makes system calls under it and the parent reads how it ended. After its filter is
    //! in place the child only makes raw system calls (no allocation, no printing).

    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    use std::os::fd::AsRawFd;
    use std::process::{Child, Command};

    /// Exit code of a child whose filter could not be installed.
    const NO_FILTER: i32 = 100;

    /// Fork; the child installs `kind`'s filter and exits with `body`'s result.
    fn in_filtered_child(kind: ThreadKind, body: impl FnOnce() -> i32) -> WaitStatus {
        // SAFETY: the child is a copy of this process with one thread; it builds its
        // filter (glibc's malloc is usable after fork), then only makes raw system calls
        // and leaves with _exit, running no destructors or atexit handlers.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: setrlimit with a valid struct: a death by SIGSYS leaves no core.
                unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
                let code = match apply(kind) {
                    Ok(()) => body(),
                    Err(_) => NO_FILTER,
                };
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    fn killed_by(st: WaitStatus, sig: Signal) -> bool {
        matches!(st, WaitStatus::Signaled(_, s, _) if s == sig)
    }

    fn exited_ok(st: WaitStatus) -> bool {
        matches!(st, WaitStatus::Exited(_, 0))
    }

    /// 0 if every check holds, else 1 + the index of the first that does not.
    fn check(results: &[bool]) -> i32 {
        match results.iter().position(|ok| !ok) {
            None => 0,
            Some(i) => 1 + i as i32,
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// A system call made in a filtered child, by name.
    type Call = (&'static str, Box<dyn Fn() -> i64>);

    fn call(name: &'static str, f: impl Fn() -> i64 + 'static) -> Call {
        (name, Box::new(f))
    }

    /// System calls no thread of a VM child may make.
    fn forbidden() -> Vec<Call> {
        vec![
            call("socket", || {
                // SAFETY: no pointers.
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) }
            }),
            call("execve", || {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                // SAFETY: NUL-terminated path, null-terminated argv and envp on the stack.
                unsafe {
                    libc::syscall(
                        libc::SYS_execve,
                        path.as_ptr(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                    )
                }
            }),
            call("openat /etc/passwd", || {
                // SAFETY: a NUL-terminated path.
                unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/etc/passwd".as_ptr(),
                        libc::O_RDONLY,
                    )
                }
            }),
            call("mmap PROT_EXEC", || {
                // SAFETY: a new anonymous mapping; nothing existing is touched.
                unsafe {
                    libc::syscall(
                        libc::SYS_mmap,
                        0usize,
                        4096usize,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                }
            }),
            call("ptrace", || {
                // SAFETY: no pointers.
                unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) }
            }),
            call("ioctl TIOCGWINSZ", || {
                let mut ws = libc::winsize {
                    ws_row: 0,
                    ws_col: 0,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: a valid winsize for the kernel to fill.
                unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::TIOCGWINSZ, &mut ws) }
            }),
            // getpid is allowed, but not through the 32-bit ABI (another syscall table).
            #[cfg(target_arch = "x86_64")]
            call("getpid by int 0x80", || {
                let mut nr: i64 = 20; // __NR_getpid of i386
                // SAFETY: the i386 getpid takes no arguments and touches no memory.
                unsafe { std::arch::asm!("int 0x80", inout("rax") nr) };
                nr
            }),
            call("sendto with an address", || {
                // SAFETY: an all-zero sockaddr_un is a valid value.
                let addr = unsafe { std::mem::zeroed::<libc::sockaddr_un>() };
                // SAFETY: a one-byte buffer and an address of the given size.
                unsafe {
                    libc::syscall(
                        libc::SYS_sendto,
                        -1,
                        c"x".as_ptr(),
                        1usize,
                        libc::MSG_DONTWAIT,
                        &addr,
                        std::mem::size_of::<libc::sockaddr_un>(),
                    )
                }
            }),
        ]
    }

    #[test]
    fn every_kind_builds_a_filter() {
        for kind in ThreadKind::ALL {
            let prog = filter(kind, std::process::id()).expect("filter");
            assert!(!prog.is_empty(), "{kind}");
        }
    }

    #[test]
    fn a_forbidden_syscall_kills_the_process_with_sigsys_in_every_kind() {
        for kind in ThreadKind::ALL {
            for (what, f) in forbidden() {
                let st = in_filtered_child(kind, || {
                    f();
                    0
                });
                assert!(
                    killed_by(st, Signal::SIGSYS),
                    "{kind} thread, {what}: {st:?}"
                );
            }
        }
    }

    #[test]
    fn allowed_syscalls_still_work_in_every_kind() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let (s1, s2) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let stat = std::fs::File::open("/proc/self/stat").expect("stat");
        let (wfd, s1, s2, stat) = (
            w.as_raw_fd(),
            s1.as_raw_fd(),
            s2.as_raw_fd(),
            stat.as_raw_fd(),
        );
        for kind in ThreadKind::ALL {
            let st = in_filtered_child(kind, || {
                let mut b = [0u8; 8];
                // SAFETY: raw system calls on fds this process owns, with valid buffers, a
                // fresh anonymous mapping and its own unmapping.
                unsafe {
                    let page = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    let mut ok = vec![
                        libc::write(wfd, c"x".as_ptr().cast(), 1) == 1,
                        libc::getpid() > 0,
                        page != libc::MAP_FAILED,
                        libc::munmap(page, 4096) == 0,
                        libc::syscall(libc::SYS_gettid) > 0,
                    ];
                    match kind {
                        // KVM_RUN passes the filter (and fails on a bad fd).
                        ThreadKind::Vcpu => ok.push(
                            libc::ioctl(-1, kvm::KVM_RUN() as _) == -1 && errno() == libc::EBADF,
                        ),
                        // signal-hook's handler: one byte, MSG_DONTWAIT, no address.
                        _ => ok
                            .push(libc::send(s1, c"x".as_ptr().cast(), 1, libc::MSG_DONTWAIT) == 1),
                    }
                    match kind {
                        ThreadKind::Signals => ok.push(
                            libc::recv(s2, b.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) >= 1,
                        ),
                        ThreadKind::KvmStats => {
                            ok.push(libc::pread(stat, b.as_mut_ptr().cast(), 8, 0) == 8)
                        }
                        ThreadKind::Control => {
                            // The byte sent above, read as the control thread reads packets.
                            ok.push(libc::recv(s2, b.as_mut_ptr().cast(), 8, libc::MSG_TRUNC) >= 1);
                            // KVM's clock ioctls pass the filter (and fail on a bad fd).
                            for nr in control_ioctls() {
                                ok.push(libc::ioctl(-1, nr as _) == -1 && errno() == libc::EBADF);
                            }
                            let mut pfd = libc::pollfd {
                                fd: s2,
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            ok.push(libc::poll(&mut pfd, 1, 0) >= 0);
                        }
                        _ => {}
                    }
                    check(&ok)
                }
            });
            assert!(exited_ok(st), "{kind} thread: {st:?}");
        }
        drop(w);
        let mut got = [0u8; 8];
        assert_eq!(
            nix::unistd::read(&r, &mut got).expect("read"),
            ThreadKind::ALL.len()
        );
    }

    #[test]
    fn each_kind_keeps_to_its_own_syscalls() {
        let stat = std::fs::File::open("/proc/self/stat").expect("stat");
        let (s1, _s2) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (stat, s1) = (stat.as_raw_fd(), s1.as_raw_fd());
        let pread = move || {
            let mut b = [0u8; 8];
            // SAFETY: an owned fd and a valid 8-byte buffer.
            unsafe { libc::pread(stat, b.as_mut_ptr().cast(), 8, 0) as i64 }
        };
        let recv = move || {
            let mut b = [0u8; 8];
            // SAFETY: an owned fd and a valid 8-byte buffer.
            unsafe { libc::recv(s1, b.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) as i64 }
        };
        let send = move || {
            // SAFETY: an owned fd and a valid 1-byte buffer.
            unsafe { libc::send(s1, c"x".as_ptr().cast(), 1, libc::MSG_DONTWAIT) as i64 }
        };
        // SAFETY: KVM_RUN on no fd at all.
        let kvm_run = || unsafe { i64::from(libc::ioctl(-1, kvm::KVM_RUN() as _)) };
        // SAFETY: KVM_SET_CLOCK on no fd at all (the kernel reads nothing).
        let set_clock = || unsafe { i64::from(libc::ioctl(-1, kvm::KVM_SET_CLOCK() as _)) };
        // SAFETY: KVM_SET_REGS on no fd at all (the kernel reads nothing).
        let set_regs = || unsafe { i64::from(libc::ioctl(-1, kvm::KVM_SET_REGS() as _)) };
        let cases: [(ThreadKind, &str, &dyn Fn() -> i64); 13] = [
            (ThreadKind::Main, "pread64", &pread),
            (ThreadKind::Main, "recvfrom", &recv),
            (ThreadKind::Main, "ioctl KVM_RUN", &kvm_run),
            (ThreadKind::Main, "ioctl KVM_SET_CLOCK", &set_clock),
            (ThreadKind::Vcpu, "sendto", &send),
            (ThreadKind::Vcpu, "pread64", &pread),
            (ThreadKind::Vcpu, "ioctl KVM_SET_CLOCK", &set_clock),
            (ThreadKind::Signals, "pread64", &pread),
            (ThreadKind::KvmStats, "recvfrom", &recv),
            (ThreadKind::Control, "ioctl KVM_RUN", &kvm_run),
            (ThreadKind::Control, "ioctl KVM_SET_REGS", &set_regs),
            (ThreadKind::Control, "pread64", &pread),
            // recvfrom only as the control thread reads: MSG_TRUNC, no other flags.
            (ThreadKind::Control, "recvfrom MSG_DONTWAIT", &recv),
        ];
        for (kind, what, f) in cases {
            let st = in_filtered_child(kind, || {
                f();
                0
            });
            assert!(
                killed_by(st, Signal::SIGSYS),
                "{kind} thread, {what}: {st:?}"
            );
        }
    }

    /// A process of the same uid that a VM child must not be able to signal.
    struct Sibling(Child);

    impl Sibling {
        fn start() -> Self {
            Sibling(Command::new("sleep").arg("60").spawn().expect("sleep"))
        }
        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
        fn alive(&mut self) -> bool {
            self.0.try_wait().expect("try_wait").is_none()
        }
    }

    impl Drop for Sibling {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A system call whose arguments are all integers (no memory of ours is read).
    fn sys(nr: i64, a: i64, b: i64, c: i64) -> i64 {
        // SAFETY: integer arguments only; the calls made with it here are signal calls
        // the filter must stop, or signal 0 (a check) to this process.
        unsafe { libc::syscall(nr, a, b, c, 0) }
    }

    /// Signals a compromised VMM would send to its supervisor or a sibling VMM.
    fn signal_attacks(supervisor: i32, sibling: i32, pidfd: i32) -> Vec<Call> {
        use libc::{SIGKILL, SYS_kill, SYS_pidfd_send_signal, SYS_tgkill, SYS_tkill};
        let (sup, sib, kill9) = (
            i64::from(supervisor),
            i64::from(sibling),
            i64::from(SIGKILL),
        );
        vec![
            call("kill(supervisor, SIGKILL)", move || {
                sys(SYS_kill, sup, kill9, 0)
            }),
            call("kill(sibling, SIGKILL)", move || {
                sys(SYS_kill, sib, kill9, 0)
            }),
            // Signal 0 where a slip would reach many processes.
            call("kill(0, 0): own process group", || sys(SYS_kill, 0, 0, 0)),
            call("kill(-1, 0): every process", || sys(SYS_kill, -1, 0, 0)),
            call("tgkill(supervisor, supervisor, SIGKILL)", move || {
                sys(SYS_tgkill, sup, sup, kill9)
            }),
            call("tgkill(sibling, sibling, SIGKILL)", move || {
                sys(SYS_tgkill, sib, sib, kill9)
            }),
            call("tkill(sibling, SIGKILL)", move || {
                sys(SYS_tkill, sib, kill9, 0)
            }),
            call("tkill(own thread, 0)", || {
                sys(SYS_tkill, sys(libc::SYS_gettid, 0, 0, 0), 0, 0)
            }),
            // A null siginfo.
            call("pidfd_send_signal(sibling, SIGKILL)", move || {
                sys(SYS_pidfd_send_signal, i64::from(pidfd), kill9, 0)
            }),
            call("rt_sigqueueinfo(sibling, SIGKILL)", move || {
                // SAFETY: an all-zero siginfo_t is a valid value.
                let mut info = unsafe { std::mem::zeroed::<libc::siginfo_t>() };
                info.si_signo = SIGKILL;
                info.si_code = libc::SI_QUEUE;
                // SAFETY: a siginfo_t on the stack for the kernel to read.
                unsafe { libc::syscall(libc::SYS_rt_sigqueueinfo, sib, kill9, &info) }
            }),
        ]
    }

    #[test]
    fn signals_reach_only_the_process_itself() {
        let mut sibling = Sibling::start();
        // SAFETY: pidfd_open of a live child of ours; each fork inherits the fd.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, sibling.pid(), 0) } as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        // The forked child's parent, this test process, stands for the supervisor (its
        // pid is read here: getppid is on no allow-list and would end the child early).
        let attacks = signal_attacks(std::process::id() as i32, sibling.pid(), pidfd);
        for kind in ThreadKind::ALL {
            for (what, attack) in &attacks {
                let st = in_filtered_child(kind, || {
                    attack();
                    0
                });
                assert!(
                    killed_by(st, Signal::SIGSYS),
                    "{kind} thread, {what}: {st:?}"
                );
                assert!(sibling.alive(), "{kind} thread, {what}: the sibling died");
            }
            // Signals to itself still pass: signal 0 checks only.
            let st = in_filtered_child(kind, || {
                // SAFETY: signal 0 to this process and this thread.
                unsafe {
                    let (pid, tid) = (libc::getpid(), libc::syscall(libc::SYS_gettid));
                    check(&[
                        libc::syscall(libc::SYS_kill, pid, 0) == 0,
                        libc::syscall(libc::SYS_tgkill, pid, tid, 0) == 0,
                    ])
                }
            });
            assert!(exited_ok(st), "{kind} thread, signal 0 to itself: {st:?}");
        }
        // SAFETY: our own pidfd, closed once.
        unsafe { libc::close(pidfd) };
        assert!(sibling.alive());
    }

    #[test]
    fn pthread_kill_to_itself_passes_the_filter_of_every_kind() {
        // pthread_kill is tgkill(getpid(), tid, sig), as the vCPU kick: SIGUSR1 (default
        // action: terminate) arriving proves the call passed the filter.
        for kind in ThreadKind::ALL {
            let st = in_filtered_child(kind, || {
                // SAFETY: a signal to this very thread.
                unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR1) };
                NO_FILTER + 1
            });
            assert!(killed_by(st, Signal::SIGUSR1), "{kind} thread: {st:?}");
        }
    }
}
