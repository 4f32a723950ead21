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
//! Between its start and exec (`posix_spawn`'s attributes and file actions) the child
//! gets its own session (signals to the supervisor's process group or terminal never
//! reach it), its counter table at fd 3, its control channel ([`super::channel`]) at fd 4
//! and every other fd but 0, 1, 2 closed; it starts with an empty environment. The
//! spawner then writes its pid into its VM's cgroup ([`super::cgroup::Placement::place`])
//! and only then sends it the spec: the child makes nothing of its VM before it has read
//! the spec, so no VM ever runs outside its cgroup. The rest of the jail (user, rlimits,
//! no_new_privs, not dumpable) is done by the child itself once it has opened what its VM
//! needs (`vm::jail`).

use std::ffi::{CStr, CString};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::{Pid, pipe2};

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

/// The real spawner: `posix_spawn` of `/proc/self/exe run-vm`.
///
/// glibc's posix_spawn starts the child with clone(CLONE_VM|CLONE_VFORK): nothing of the
/// supervisor's memory is copied (a fork() copies the page tables of the whole
/// supervisor, tens of MiB with a large fleet, and then takes copy-on-write faults in
/// both processes), and the session, the fds and the signal state are set by the file
/// actions and attributes below, between clone and exec.
#[derive(Clone)]
pub struct ProcessSpawner {
    exe: PathBuf,
}

impl ProcessSpawner {
    /// A spawner that runs `exe` (normally `/proc/self/exe`, resolved once).
    pub fn new(exe: PathBuf) -> Self {
        ProcessSpawner { exe }
    }

    fn argv(&self, req: &SpawnRequest<'_>, table: bool) -> io::Result<Vec<CString>> {
        let mut args: Vec<String> = vec![
            "vmm-fleet".into(),
            "run-vm".into(),
            "--vm".into(),
            req.spec.name.clone(),
            "--supervisor-pid".into(),
            std::process::id().to_string(),
            "--spec-stdin".into(),
            "--wire-version".into(),
            crate::protocol::WIRE_VERSION.to_string(),
        ];
        if table {
            args.extend(["--counters-fd".into(), COUNTERS_FD.to_string()]);
        }
        args.extend(["--control-fd".into(), CONTROL_FD.to_string()]);
        if !req.seccomp {
            args.extend(["--seccomp".into(), "off".into()]);
        }
        if let Some(u) = req.user {
            args.extend([
                "--uid".into(),
                u.uid.to_string(),
                "--gid".into(),
                u.gid.to_string(),
            ]);
            if let Some(k) = u.kvm_gid {
                args.extend(["--kvm-gid".into(), k.to_string()]);
            }
        }
        let mut argv = args
            .into_iter()
            .map(|a| CString::new(a).map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        argv.push(CString::new(req.spec.source.as_os_str().as_bytes()).map_err(io::Error::other)?);
        Ok(argv)
    }
}

/// The lowest fd everything the child gets is copied to before the spawn: above 0..=2
/// and above [`COUNTERS_FD`] and [`CONTROL_FD`], so the moves to fds 0..=4 in the child
/// never clobber a source of a later move.
const SOURCE_MIN_FD: RawFd = 10;

/// A close-on-exec copy of `fd` at or above [`SOURCE_MIN_FD`].
fn lifted(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let copy = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(SOURCE_MIN_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// What the child's fds 0..=4 are, as `posix_spawn` file actions, and every other fd
/// closed (the supervisor's fds are all close-on-exec, but one leaked by whoever started
/// the supervisor may not be). Sources are lifted copies: see [`SOURCE_MIN_FD`].
fn file_actions(
    stdin: &OwnedFd,
    stdout: Option<&OwnedFd>,
    stderr: Option<Option<&OwnedFd>>,
    table: Option<&OwnedFd>,
    control: &OwnedFd,
) -> io::Result<PosixSpawnFileActions> {
    let mut fa = PosixSpawnFileActions::init()?;
    let null = |fa: &mut PosixSpawnFileActions, fd| {
        fa.add_open(fd, "/dev/null", OFlag::O_WRONLY, Mode::empty())
    };
    fa.add_dup2(stdin.as_raw_fd(), 0)?;
    match stdout {
        Some(fd) => fa.add_dup2(fd.as_raw_fd(), 1)?,
        None => null(&mut fa, 1)?,
    }
    match stderr {
        Some(Some(fd)) => fa.add_dup2(fd.as_raw_fd(), 2)?,
        Some(None) => null(&mut fa, 2)?,
        None => {} // inherited
    }
    match table {
        // dup2 leaves the new fd without close-on-exec.
        Some(fd) => fa.add_dup2(fd.as_raw_fd(), COUNTERS_FD)?,
        // Closing a closed fd is not an error for posix_spawn.
        None => fa.add_close(COUNTERS_FD)?,
    }
    fa.add_dup2(control.as_raw_fd(), CONTROL_FD)?;
    // SAFETY: `PosixSpawnFileActions` is `repr(transparent)` over the
    // `posix_spawn_file_actions_t` it initialised, so the pointer is to a live,
    // initialised actions object; the call only appends an action to it.
    let r = unsafe {
        libc::posix_spawn_file_actions_addclosefrom_np(
            (&mut fa as *mut PosixSpawnFileActions).cast::<libc::posix_spawn_file_actions_t>(),
            CONTROL_FD + 1,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(fa)
}

/// Its own session (signals to the supervisor's process group or terminal never reach
/// it), no signal blocked, SIGPIPE back to its default (the Rust runtime ignores it, and
/// an ignored signal stays ignored across exec), as `std::process::Command` does.
fn attributes() -> io::Result<PosixSpawnAttr> {
    let mut attr = PosixSpawnAttr::init()?;
    let setsid = PosixSpawnFlags::from_bits_retain(libc::c_int::from(libc::POSIX_SPAWN_SETSID));
    attr.set_flags(
        setsid | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    attr.set_sigmask(&SigSet::empty())?;
    let mut def = SigSet::empty();
    def.add(Signal::SIGPIPE);
    attr.set_sigdefault(&def)?;
    Ok(attr)
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
        // Everything the child gets, as close-on-exec copies above its fds 0..=4; the
        // supervisor's own table fd stays as it is.
        let table = req.counters.map(lifted).transpose()?;
        let (channel, theirs) = ChildChannel::pair()?;
        let theirs = lifted(theirs.as_fd())?;
        let (stdin, spec_pipe) = pipe2(OFlag::O_CLOEXEC)?;
        let stdin = lifted(stdin.as_fd())?;
        let (stdout, stderr) = match output.as_mut() {
            Some(o) => (
                o.child_stdout().map(|fd| lifted(fd.as_fd())).transpose()?,
                Some(o.child_stderr().map(|fd| lifted(fd.as_fd())).transpose()?),
            ),
            None => (None, None),
        };
        let fa = file_actions(
            &stdin,
            stdout.as_ref(),
            stderr.as_ref().map(Option::as_ref),
            table.as_ref(),
            &theirs,
        )?;
        let argv = self.argv(req, table.is_some())?;
        let env: [&CStr; 0] = [];
        let pid = posix_spawn(self.exe.as_path(), &fa, &attributes()?, &argv, &env)?;
        // Only the child holds these now (the output's own write ends were taken above).
        drop((table, theirs, stdin, stdout, stderr));
        let kill_child = || {
            let _ = kill(pid, Signal::SIGKILL);
        };
        if let Some(cg) = req.cgroup
            && let Err(e) = cg.place(pid.as_raw() as u32)
        {
            // It has not read its spec: it made no VM. Killed, reaped as usual.
            kill_child();
            return Err(io::Error::new(
                e.kind(),
                format!("placing the VM child in its cgroup: {e}"),
            ));
        }
        if let Some(o) = output
            && let Err(e) = o.attach()
        {
            // Its output has nowhere to go: the child gets EPIPE, the VM is stopped.
            kill_child();
            return Err(io::Error::other(e));
        }
        // A few hundred bytes: fits in the pipe, so this does not block. A child that
        // died already just makes this fail; its exit is reaped as usual. The child makes
        // its VM only from this spec: after the cgroup placement above.
        let _ = std::fs::File::from(spec_pipe).write_all(spec.as_bytes());
        Ok(Child {
            pid: pid.as_raw() as u32,
            channel: Some(Arc::new(channel)),
        })
    }

    fn signal(&mut self, pid: u32, sig: Signal) -> io::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        kill(Pid::from_raw(pid), sig).map_err(io::Error::from)
    }
}
