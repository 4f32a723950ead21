//! Starting and signalling VM child processes, behind a small trait so the event loop
//! can be driven by a fake in tests; the supervisor's half of each child's jail.
//!
//! A child is this same binary re-executed as `run-vm --vm NAME --supervisor-pid PID
//! --spec-stdin --counters-fd 3 --control-fd 4 [--uid U --gid G [--kvm-gid K]] FILE`, so `ps` shows
//! which process runs which VM. It gets the spec exactly as the supervisor validated it
//! on stdin (an edit to FILE takes effect only through a reload). Its stdout (the
//! console) and stderr (its log) are pipes read by the supervisor's output thread
//! ([`super::output`]), which writes `LOG_DIR/NAME.console` and `.log`.
//!
//! Between fork and exec (`ChildSetup`) the child gets its own session (signals to the
//! supervisor's process group or terminal never reach it), its counter table at fd 3,
//! its control channel ([`super::channel`]) at fd 4 and every other inherited fd but 0,
//! 1, 2 closed at exec; it starts with an empty
//! environment. The rest of the jail (user, rlimits, no_new_privs, not dumpable) is done
//! by the child itself once it has opened what its VM needs (`vm::jail`).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use std::sync::Arc;

use super::cgroup::Placement;
use super::channel::ChildChannel;
use super::output::{Limits, OutputHub};
use crate::config::{VmSpec, VmUser};
use crate::protocol::{CONTROL_FD, COUNTERS_FD};

/// What a spawner needs to start one VM.
pub struct SpawnRequest<'a> {
    /// The VM.
    pub spec: &'a VmSpec,
    /// The fleet settings file the child must apply too (defaults), if any.
    pub settings: Option<&'a Path>,
    /// Where the console and log files go.
    pub log_dir: &'a Path,
    /// The VM's shared counter table, inherited by the child.
    pub counters: Option<BorrowedFd<'a>>,
    /// The user the child drops to (`None`: it keeps the supervisor's).
    pub user: Option<&'a VmUser>,
    /// The output thread that takes the child's stdout and stderr, with the VM's limits
    /// (None: stdout discarded, stderr inherited).
    pub output: Option<(&'a OutputHub, Limits)>,
    /// The VM's cgroup, joined by the child before it runs anything (`None`: no limits).
    pub cgroup: Option<&'a Placement>,
    /// Fleet setting `seccomp`: false passes `--seccomp off` to the child.
    pub seccomp: bool,
}

/// A child just started.
#[derive(Debug, Clone)]
pub struct Child {
    /// Its pid.
    pub pid: u32,
    /// The supervisor's end of its control channel (None: a spawner without one).
    pub channel: Option<Arc<ChildChannel>>,
}

/// Starts and signals VM children.
pub trait Spawner {
    /// Start the child.
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<Child>;
    /// Send `sig` to child `pid`.
    fn signal(&mut self, pid: u32, sig: Signal) -> io::Result<()>;
}

/// The real spawner: fork + exec of `/proc/self/exe run-vm`.
#[derive(Clone)]
pub struct ProcessSpawner {
    exe: PathBuf,
}

impl ProcessSpawner {
    /// A spawner that runs `exe` (normally `/proc/self/exe`, resolved once).
    pub fn new(exe: PathBuf) -> Self {
        ProcessSpawner { exe }
    }

    fn command(&self, req: &SpawnRequest<'_>, setup: &ChildSetup) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg0("vmm-fleet")
            .arg("run-vm")
            .arg("--vm")
            .arg(&req.spec.name)
            .arg("--supervisor-pid")
            .arg(std::process::id().to_string())
            .arg("--spec-stdin");
        if setup.table.is_some() {
            cmd.arg("--counters-fd").arg(COUNTERS_FD.to_string());
        }
        if setup.control.is_some() {
            cmd.arg("--control-fd").arg(CONTROL_FD.to_string());
        }
        if !req.seccomp {
            cmd.arg("--seccomp").arg("off");
        }
        if let Some(u) = req.user {
            cmd.arg("--uid")
                .arg(u.uid.to_string())
                .arg("--gid")
                .arg(u.gid.to_string());
            if let Some(k) = u.kvm_gid {
                cmd.arg("--kvm-gid").arg(k.to_string());
            }
        }
        cmd.arg(&req.spec.source).env_clear();
        cmd
    }
}

/// The lowest fd the table and the channel are copied to before the fork: above 0..=2
/// (which the child's stdio setup overwrites) and above [`COUNTERS_FD`] and
/// [`CONTROL_FD`], so the moves to fds 3 and 4 never clobber anything the child keeps.
const TABLE_COPY_MIN_FD: RawFd = 10;

/// What a child does between fork and exec. Only async-signal-safe calls (raw system
/// calls, no allocation, no locks): the supervisor has other threads.
#[derive(Debug, Clone, Copy)]
struct ChildSetup {
    /// The counter table's fd in the supervisor (>= [`TABLE_COPY_MIN_FD`]).
    table: Option<RawFd>,
    /// The child's end of its control channel (>= [`TABLE_COPY_MIN_FD`]).
    control: Option<RawFd>,
}

impl ChildSetup {
    fn apply(&self) -> io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: setsid, dup2 and fcntl are async-signal-safe system calls on fds of
        // this (single-threaded, just forked) process; they touch no memory of ours.
        unsafe {
            check(libc::setsid())?;
            if let Some(fd) = self.table {
                // dup2 leaves the new fd without close-on-exec.
                check(libc::dup2(fd, COUNTERS_FD))?;
            }
            if let Some(fd) = self.control {
                check(libc::dup2(fd, CONTROL_FD))?;
            }
        }
        close_from_at_exec(CONTROL_FD + 1)
    }
}

/// Mark every fd from `first` up close-on-exec (close_range(CLOSE_RANGE_CLOEXEC), Linux
/// 5.11+; a loop over the fd limit before that). Marking rather than closing keeps the
/// pipe std uses to report a failed exec working.
fn close_from_at_exec(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let top = lim.rlim_cur.min(1 << 20) as RawFd;
    for fd in first..top {
        // SAFETY: F_SETFD on a closed fd just fails with EBADF; no memory is touched.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

impl Spawner for ProcessSpawner {
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<Child> {
        // Files checked and opened, pipes made, before anything starts.
        let mut output = req
            .output
            .map(|(hub, limits)| hub.prepare(req.log_dir, req.spec, limits))
            .transpose()
            .map_err(io::Error::other)?;
        let spec = output
            .as_ref()
            .and_then(|o| o.child_spec())
            .unwrap_or(req.spec)
            .to_wire()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        // A close-on-exec copy of the table above the child's stdio; the child moves it
        // to fd 3. The supervisor's own fd stays close-on-exec throughout.
        let table: Option<OwnedFd> = req
            .counters
            .map(|fd| {
                let copy = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(TABLE_COPY_MIN_FD))?;
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                Ok::<_, nix::Error>(unsafe { OwnedFd::from_raw_fd(copy) })
            })
            .transpose()?;
        let (channel, theirs) = ChildChannel::pair()?;
        // Above the child's fds 0..=4 too, for the same reason as the table.
        let theirs = {
            let copy = fcntl(&theirs, FcntlArg::F_DUPFD_CLOEXEC(TABLE_COPY_MIN_FD))?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(copy) }
        };
        let setup = ChildSetup {
            table: table.as_ref().map(|fd| fd.as_raw_fd()),
            control: Some(theirs.as_raw_fd()),
        };
        let mut cmd = self.command(req, &setup);
        cmd.stdin(Stdio::piped());
        match output.as_mut() {
            Some(o) => {
                let (out, err) = (o.child_stdout(), o.child_stderr());
                cmd.stdout(out.map_or_else(Stdio::null, Stdio::from))
                    .stderr(err.map_or_else(Stdio::null, Stdio::from));
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
            }
        }
        if let Some(cg) = req.cgroup {
            // Prepared here, before the fork: the child only opens and writes.
            let cg = cg.clone();
            // SAFETY: `Placement::join` only calls open, write and close (async-signal-
            // safe) and allocates nothing. It runs first, with the supervisor's
            // privileges (the child drops them only after exec).
            unsafe { cmd.pre_exec(move || cg.join()) };
        }
        // SAFETY: the closure makes only async-signal-safe calls (see ChildSetup).
        unsafe { cmd.pre_exec(move || setup.apply()) };
        let child = cmd.spawn()?;
        drop(table);
        drop(theirs);
        // The Command held the pipes' write ends: dropped with it, only the child has them.
        drop(cmd);
        let pid = child.id();
        if let Some(o) = output
            && let Err(e) = o.attach()
        {
            // Its output has nowhere to go: the child gets EPIPE, the VM is stopped.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(io::Error::other(e));
        }
        if let Some(mut stdin) = child.stdin {
            // A few hundred bytes: fits in the pipe, so this does not block. A child that
            // died already just makes this fail; its exit is reaped as usual.
            let _ = stdin.write_all(spec.as_bytes());
        }
        Ok(Child {
            pid,
            channel: Some(Arc::new(channel)),
        })
    }

    fn signal(&mut self, pid: u32, sig: Signal) -> io::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        kill(Pid::from_raw(pid), sig).map_err(io::Error::from)
    }
}
