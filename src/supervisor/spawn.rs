//! Starting and signalling VM child processes, behind a small trait so the event loop
//! can be driven by a fake in tests.
//!
//! A child is this same binary re-executed as `run-vm --vm NAME --supervisor-pid PID
//! --spec-stdin --counters /proc/self/fd/N FILE`, so `ps` shows which process runs which
//! VM. It gets the spec exactly as the supervisor validated it on stdin (an edit to FILE
//! takes effect only through a reload), and its counter table as inherited fd N. Its
//! stdout (the console) and stderr (its log) go to `LOG_DIR/NAME.console` and `.log`.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::VmSpec;

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
}

/// Starts and signals VM children.
pub trait Spawner {
    /// Start the child; returns its pid.
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<u32>;
    /// Send `sig` to child `pid`.
    fn signal(&mut self, pid: u32, sig: Signal) -> io::Result<()>;
}

/// The real spawner: fork + exec of `/proc/self/exe run-vm`.
pub struct ProcessSpawner {
    exe: PathBuf,
}

impl ProcessSpawner {
    /// A spawner that runs `exe` (normally `/proc/self/exe`, resolved once).
    pub fn new(exe: PathBuf) -> Self {
        ProcessSpawner { exe }
    }

    /// The file names a VM's console and log go to.
    pub fn log_files(log_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            log_dir.join(format!("{name}.console")),
            log_dir.join(format!("{name}.log")),
        )
    }
}

impl Spawner for ProcessSpawner {
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<u32> {
        fs::create_dir_all(req.log_dir)?;
        let (console, log) = Self::log_files(req.log_dir, &req.spec.name);
        let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p);
        let spec = req
            .spec
            .to_wire()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg0("vmm-fleet")
            .arg("run-vm")
            .arg("--vm")
            .arg(&req.spec.name)
            .arg("--supervisor-pid")
            .arg(std::process::id().to_string())
            .arg("--spec-stdin");
        if let Some(fd) = req.counters {
            cmd.arg("--counters")
                .arg(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        }
        cmd.arg(&req.spec.source)
            .stdin(Stdio::piped())
            .stdout(open(&console)?)
            .stderr(open(&log)?);
        // Only this VM's table crosses the exec: its fd loses close-on-exec just for
        // this spawn (children are spawned from the supervisor's one loop thread).
        let child = match req.counters {
            Some(fd) => {
                set_cloexec(fd, false)?;
                let r = cmd.spawn();
                set_cloexec(fd, true)?;
                r?
            }
            None => cmd.spawn()?,
        };
        let pid = child.id();
        if let Some(mut stdin) = child.stdin {
            // A few hundred bytes: fits in the pipe, so this does not block. A child that
            // died already just makes this fail; its exit is reaped as usual.
            let _ = stdin.write_all(spec.as_bytes());
        }
        Ok(pid)
    }

    fn signal(&mut self, pid: u32, sig: Signal) -> io::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        kill(Pid::from_raw(pid), sig).map_err(io::Error::from)
    }
}

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;

fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    Ok(())
}
