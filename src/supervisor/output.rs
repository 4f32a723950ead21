//! The supervisor's one output thread: every VM child's stdout (its guest console) and
//! stderr (its VMM log) arrive on pipes, and this thread alone writes them to the
//! console and log files, with a size cap, one rotation and a rate limit.
//!
//! - One thread for the whole fleet: `poll(2)` over every child's pipe read ends plus an
//!   eventfd that wakes it when a VM is attached; no thread per VM.
//! - The read ends are non-blocking: a child that floods, stalls or closes its pipes
//!   never blocks this thread, and never the event loop (which only opens files and
//!   hands the pipes over).
//! - Each file (`NAME.console`, `NAME.log`) is capped at `console_max_mib`: a write that
//!   would pass the cap first renames the file to `NAME.console.1` (replacing the older
//!   one) and starts a new file, so a VM holds at most twice the cap per stream.
//! - A token bucket per VM (shared by its console and its log) lets `console_rate_kib_s`
//!   through, with a burst of [`BURST_SECONDS`] of it; bytes beyond are read and dropped,
//!   and counted in the VM's dropped-bytes counter (exported as
//!   `vmm_fleet_console_dropped_bytes_total{vm}`).
//! - Each console chunk that passes the rate limit also goes to the VM's console watchers
//!   ([`Consoles::publish`]: bounded queues, never blocking this thread).
//! - Files are opened `O_NOFOLLOW | O_CLOEXEC | O_APPEND | O_CREAT`, mode 0640, and must be
//!   regular files; the log directory is created mode 0750 and refused when others may
//!   write it (see [`check_log_dir`]).
//! - At reexec the thread hands its pipes over ([`OutputHub::hand_over`]) and stops
//!   without reading them: what the children write meanwhile waits in the pipes (64 KiB
//!   each) and is read by the new program's thread ([`OutputHub::start_adopting`]).

use std::collections::HashMap;
use std::fs::{DirBuilder, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::EventLog;
use super::console::Consoles;
use crate::config::files::{KERNEL_INTERFACE, NotRegular, check_log_dir, open_append_file};
use crate::config::{ConsoleSpec, FleetSettings, VmSpec};

/// Seconds of `console_rate_kib_s` a VM may write at once (its bucket's size): a Linux
/// boot log or a burst of VMM messages passes whole.
pub const BURST_SECONDS: u64 = 16;
/// Bytes read from one pipe per poll round: every VM gets its turn.
const CHUNK: usize = 64 * 1024;
/// Reads per pipe when draining at shutdown.
const FINAL_READS: usize = 16;
/// After a round that read something, wait this long before polling again: the VMM
/// writes its console a byte at a time (one write per UART exit), so without it a busy
/// guest would wake this thread for every byte; with it, a wake reads what a few
/// milliseconds brought (far below a pipe's 64 KiB at any UART rate).
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// A VM's output limits, from the fleet settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Size cap of each file, in bytes.
    pub max_bytes: u64,
    /// Rate limit of the VM's output, in bytes per second.
    pub rate_bytes_per_s: u64,
}

impl Limits {
    /// The limits `settings` give (`console_max_mib`, `console_rate_kib_s`).
    pub fn from_settings(settings: &FleetSettings) -> Self {
        Limits {
            max_bytes: settings.console_max_mib.saturating_mul(1 << 20),
            rate_bytes_per_s: settings.console_rate_kib_s.saturating_mul(1024),
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit and returns it.
/// Every VM costs the supervisor 5 fds (two pipe read ends, two files, the counter
/// table): at the usual soft limit of 1024 a fleet of ~200 VMs, or fewer plus open
/// /metrics connections, saw its restarts fail with EMFILE. The children get a small
/// limit of their own (`vm::jail`), so nothing of this reaches them.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(soft.max(hard))
}

/// Why a VM's output could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The log directory is unsafe or cannot be made.
    #[error("log directory {}: {reason}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A console or log file cannot be opened.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The pipes cannot be made.
    #[error("output pipe: {0}")]
    Pipe(#[source] nix::Error),
    /// The output thread is gone.
    #[error("the output thread is gone")]
    Gone,
}

/// The file names a VM's console and log go to.
pub fn log_files(log_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        log_dir.join(format!("{name}.console")),
        log_dir.join(format!("{name}.log")),
    )
}

/// Where the supervisor writes, the directory must be its own user's or root's: the
/// owner of a directory can put a file of theirs where a console file goes (and read
/// the guest's console from it) or a symlink (and keep the VM from starting). Such a
/// directory is easy to get: the default log directory sits next to the VM directory,
/// so any user can make it first in a sticky /tmp. Checked where files are written
/// (not at `validate`, which root may run for a service that runs as another user).
fn check_owner(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir).map_err(|e| e.to_string())?.uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner == me || owner == 0 {
        return Ok(());
    }
    let name = nix::unistd::User::from_uid(owner.into())
        .ok()
        .flatten()
        .map_or_else(
            || format!("uid {owner}"),
            |u| format!("{} (uid {owner})", u.name),
        );
    Err(format!(
        "is owned by {name}, neither the fleet's user nor root: that user could put a \
         file of theirs where a console file goes and read the guest's console"
    ))
}

/// `path` with `.1` appended: where it rotates to.
fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Opens a console or log file for appending: never through a symlink, never anything
/// but a regular file (a FIFO is refused without blocking), mode 0640 when created.
pub fn open_log_file(path: &Path) -> Result<File, OutputError> {
    open_append_file(path).map_err(|e| OutputError::File {
        path: path.to_path_buf(),
        reason: match e {
            NotRegular::Io(io) => io.to_string(),
            NotRegular::Symlink => e.to_string(),
            NotRegular::KernelInterface => KERNEL_INTERFACE.to_string(),
            NotRegular::Directory | NotRegular::Special(_) => "is not a regular file".to_string(),
        },
    })
}

/// One capped file.
struct Sink {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    /// A write error was logged; stay quiet until a write works again.
    failing: bool,
}

impl Sink {
    fn open(path: PathBuf, max: u64) -> Result<Self, OutputError> {
        let file = open_log_file(&path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Sink {
            path,
            file,
            size,
            max,
            failing: false,
        })
    }

    /// Appends `buf` (at most [`CHUNK`] bytes, less than any cap), rotating first when
    /// it would pass the cap.
    fn write(&mut self, buf: &[u8]) -> Result<(), OutputError> {
        if self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.max {
            self.rotate()?;
        }
        let keep = buf
            .len()
            .min(usize::try_from(self.max).unwrap_or(usize::MAX));
        self.file
            .write_all(&buf[..keep])
            .map_err(|e| OutputError::File {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        self.size = self.size.saturating_add(keep as u64);
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), OutputError> {
        match std::fs::rename(&self.path, rotated(&self.path)) {
            // Deleted or moved away by someone else (an admin's cleanup, logrotate):
            // nothing to keep, start the new file; failing here would drop every byte
            // of this VM's output until its next start.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r.map_err(|e| OutputError::File {
                path: self.path.clone(),
                reason: format!("rotating to .1: {e}"),
            })?,
        }
        self.file = open_log_file(&self.path)?;
        self.size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(())
    }
}

/// A token bucket: `rate` bytes per second, at most `cap` saved up.
struct Bucket {
    tokens: f64,
    rate: f64,
    cap: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate_bytes_per_s: u64) -> Self {
        let rate = rate_bytes_per_s as f64;
        let cap = rate * BURST_SECONDS as f64;
        Bucket {
            tokens: cap,
            rate,
            cap,
            last: Instant::now(),
        }
    }

    /// How many of `n` bytes may pass now.
    fn take(&mut self, n: usize, now: Instant) -> usize {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.cap);
        let ok = (n as f64).min(self.tokens.floor()).max(0.0);
        self.tokens -= ok;
        ok as usize
    }
}

/// Which file a pipe feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// The child's stdout: its guest console.
    Console,
    /// The child's stderr: its VMM log.
    Log,
}

/// One VM's files and limits as handed over at reexec.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeldVm {
    /// The VM.
    pub name: String,
    /// Its console file.
    pub console: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its limits.
    pub limits: Limits,
}

/// One pipe read end as handed over at reexec.
#[derive(Debug)]
pub struct HeldStream {
    /// The VM it belongs to.
    pub vm: String,
    /// Which file it feeds.
    pub kind: Kind,
    /// The read end.
    pub pipe: OwnedFd,
}

/// What the output thread hands to the next program at reexec.
#[derive(Debug, Default)]
pub struct HeldOutput {
    /// Every VM with a pipe open.
    pub vms: Vec<HeldVm>,
    /// Every pipe.
    pub streams: Vec<HeldStream>,
    /// Every VM's dropped-bytes counter.
    pub dropped: Vec<(String, u64)>,
}

/// A VM's files and limits, while one of its children still has a pipe open.
struct VmOut {
    console: Sink,
    log: Sink,
    bucket: Bucket,
    dropped: Arc<AtomicU64>,
    /// Pipes still open.
    pipes: usize,
    /// Dropping was announced.
    dropping: bool,
}

/// One pipe read end.
struct Stream {
    vm: String,
    kind: Kind,
    pipe: File,
}

/// A VM's files and pipes, handed to the thread.
struct Attach {
    name: String,
    console: Sink,
    log: Sink,
    pipes: [File; 2],
    limits: Limits,
    dropped: Arc<AtomicU64>,
}

enum Cmd {
    Attach(Box<Attach>),
    Stop,
    /// Hand everything over (reexec) and stop without reading the pipes.
    HandOver(Sender<HeldOutput>),
}

/// The handle of the output thread.
pub struct OutputHub {
    tx: Sender<Cmd>,
    /// Write end of the wake-up pipe (non-blocking: a full pipe already means "wake").
    wake: File,
    thread: Option<JoinHandle<()>>,
    dropped: Mutex<HashMap<String, Arc<AtomicU64>>>,
    consoles: Arc<Consoles>,
}

impl OutputHub {
    /// Starts the output thread.
    pub fn start() -> io::Result<Self> {
        Self::start_adopting(HeldOutput::default(), Arc::new(Consoles::default()))
    }

    /// Starts the output thread with what the program this one replaced handed over
    /// (reexec): its files are opened again (appending), its pipes read from here on.
    /// A VM whose files cannot be opened is logged; its pipes are still read (and what
    /// comes through them counted as dropped), so its child never blocks on a full pipe.
    ///
    /// `consoles` is the registry of console watchers the thread feeds: the same one
    /// across a failed exec, so the control socket's attached clients keep theirs.
    pub fn start_adopting(held: HeldOutput, consoles: Arc<Consoles>) -> io::Result<Self> {
        let flags = OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let (their_wake, wake) = nix::unistd::pipe2(flags).map_err(io::Error::from)?;
        let (their_wake, wake) = (File::from(their_wake), File::from(wake));
        let dropped: HashMap<String, Arc<AtomicU64>> = held
            .dropped
            .iter()
            .map(|(n, v)| (n.clone(), Arc::new(AtomicU64::new(*v))))
            .collect();
        let mut worker = Worker::new(their_wake, channel().1, consoles.clone());
        worker.adopt(held, &dropped);
        let (tx, rx) = channel();
        worker.rx = rx;
        let thread = std::thread::Builder::new()
            .name("output".into())
            .spawn(move || worker.run())?;
        Ok(OutputHub {
            tx,
            wake,
            thread: Some(thread),
            dropped: Mutex::new(dropped),
            consoles,
        })
    }

    /// The console watchers this thread feeds (for the control socket's `console`, and
    /// for the event loop, which tells it each VM's current child).
    pub fn consoles(&self) -> &Arc<Consoles> {
        &self.consoles
    }

    /// Stops the thread without reading the pipes any further and gives back every
    /// pipe, file name, limit and counter (for reexec). Afterwards the hub takes no
    /// new VM ([`OutputError::Gone`]).
    pub fn hand_over(&self) -> Result<HeldOutput, OutputError> {
        let (tx, rx) = channel();
        self.send(Cmd::HandOver(tx))?;
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .map_err(|_| OutputError::Gone)
    }

    /// The counter of bytes dropped from `name`'s output (one per VM name, for the life
    /// of the supervisor: it never goes down, across restarts and edits).
    pub fn dropped_counter(&self, name: &str) -> Arc<AtomicU64> {
        let mut map = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// Checks (and makes, mode 0750) the log directory, opens `name`'s console and log
    /// files there and makes the two pipes; the child gets the write ends
    /// ([`Prepared::child_stdout`], [`Prepared::child_stderr`]), then
    /// [`Prepared::attach`] hands the rest to the thread.
    ///
    /// A VM whose spec names a console file (`console: FILE`) gets that file instead of
    /// `NAME.console`, written by this thread with the same cap and rate limit; its child
    /// is then told to write its console to stdout ([`Prepared::child_spec`]).
    pub fn prepare(
        &self,
        log_dir: &Path,
        spec: &VmSpec,
        limits: Limits,
    ) -> Result<Prepared<'_>, OutputError> {
        let name = spec.name.as_str();
        let dir_err = |reason: String| OutputError::Dir {
            path: log_dir.to_path_buf(),
            reason,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(log_dir)
            .map_err(|e| dir_err(e.to_string()))?;
        check_log_dir(log_dir).map_err(dir_err)?;
        check_owner(log_dir).map_err(dir_err)?;
        let (mut console, log) = log_files(log_dir, name);
        let mut child_spec = None;
        if let ConsoleSpec::File(path) = &spec.console {
            // Checked at validate too; checked again here, where it is written.
            if let Some(dir) = path.parent() {
                check_log_dir(dir)
                    .and_then(|()| check_owner(dir))
                    .map_err(|reason| OutputError::Dir {
                        path: dir.to_path_buf(),
                        reason,
                    })?;
            }
            console = path.clone();
            let mut s = spec.clone();
            s.console = ConsoleSpec::Stdout;
            child_spec = Some(s);
        }
        let console = Sink::open(console, limits.max_bytes)?;
        let log = Sink::open(log, limits.max_bytes)?;
        let flags = OFlag::O_CLOEXEC;
        let (out_r, out_w) = nix::unistd::pipe2(flags).map_err(OutputError::Pipe)?;
        let (err_r, err_w) = nix::unistd::pipe2(flags).map_err(OutputError::Pipe)?;
        for r in [&out_r, &err_r] {
            nix::fcntl::fcntl(r.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(OutputError::Pipe)?;
        }
        Ok(Prepared {
            hub: self,
            attach: Box::new(Attach {
                name: name.to_string(),
                console,
                log,
                pipes: [File::from(out_r), File::from(err_r)],
                limits,
                dropped: self.dropped_counter(name),
            }),
            stdout: Some(out_w),
            stderr: Some(err_w),
            child_spec,
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), OutputError> {
        self.tx.send(cmd).map_err(|_| OutputError::Gone)?;
        match (&self.wake).write(&[1]) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(OutputError::Gone),
            _ => Ok(()),
        }
    }
}

impl Drop for OutputHub {
    /// Stops the thread after it has read what the pipes hold now.
    fn drop(&mut self) {
        let _ = self.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One VM's output, set up and waiting for its child to be spawned.
pub struct Prepared<'a> {
    hub: &'a OutputHub,
    attach: Box<Attach>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    child_spec: Option<VmSpec>,
}

impl Prepared<'_> {
    /// The spec to hand the child when it differs from the VM's (its console file is
    /// written by this thread, so the child writes its console to stdout).
    pub fn child_spec(&self) -> Option<&VmSpec> {
        self.child_spec.as_ref()
    }

    /// The write end the child gets as its stdout (once).
    pub fn child_stdout(&mut self) -> Option<OwnedFd> {
        self.stdout.take()
    }

    /// The write end the child gets as its stderr (once).
    pub fn child_stderr(&mut self) -> Option<OwnedFd> {
        self.stderr.take()
    }

    /// Hands the files and read ends to the output thread (the write ends left here are
    /// closed: only the child holds them).
    pub fn attach(self) -> Result<(), OutputError> {
        self.hub.send(Cmd::Attach(self.attach))
    }
}

/// A sink that discards (for a handed-over VM whose files cannot be opened again); no
/// cap, so it is never rotated.
fn null_sink() -> Result<Sink, OutputError> {
    let path = PathBuf::from("/dev/null");
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| OutputError::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(Sink {
        path,
        file,
        size: 0,
        max: u64::MAX,
        failing: false,
    })
}

/// The thread's state.
struct Worker {
    /// Read end of the wake-up pipe.
    wake: File,
    rx: Receiver<Cmd>,
    vms: HashMap<String, VmOut>,
    streams: Vec<Stream>,
    log: EventLog,
    buf: Vec<u8>,
    consoles: Arc<Consoles>,
}

impl Worker {
    fn new(wake: File, rx: Receiver<Cmd>, consoles: Arc<Consoles>) -> Self {
        Worker {
            wake,
            rx,
            vms: HashMap::new(),
            streams: Vec::new(),
            log: EventLog::default(),
            buf: vec![0; CHUNK],
            consoles,
        }
    }

    fn run(mut self) {
        loop {
            let ready = match self.wait() {
                Ok(r) => r,
                Err(e) => {
                    self.log.line(3, &format!("output thread: poll: {e}"));
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let (wake, ready) = ready;
            let busy = !ready.is_empty();
            // Highest index first, so that closing a stream keeps the others' indices.
            for i in ready.into_iter().rev() {
                if !self.read_once(i) {
                    self.close(i);
                }
            }
            if wake && !self.commands() {
                self.drain();
                return;
            }
            if busy {
                std::thread::sleep(LINGER);
            }
        }
    }

    /// Polls; returns whether the wake fd fired and the indices of readable streams.
    fn wait(&self) -> Result<(bool, Vec<usize>), Errno> {
        let ev = PollFlags::POLLIN;
        let mut fds = Vec::with_capacity(self.streams.len() + 1);
        fds.push(PollFd::new(self.wake.as_fd(), ev));
        fds.extend(self.streams.iter().map(|s| PollFd::new(s.pipe.as_fd(), ev)));
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        let fired = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let wake = fired(&fds[0]);
        let ready = fds[1..]
            .iter()
            .enumerate()
            .filter(|(_, f)| fired(f))
            .map(|(i, _)| i)
            .collect();
        Ok((wake, ready))
    }

    /// Takes every queued command; false on Stop.
    fn commands(&mut self) -> bool {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        loop {
            match self.rx.try_recv() {
                Ok(Cmd::Attach(a)) => self.attach(*a),
                Ok(Cmd::Stop) | Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                Ok(Cmd::HandOver(reply)) => {
                    let _ = reply.send(self.hand_over());
                    // Stopped: nothing read any more, nothing drained.
                    self.streams.clear();
                    self.vms.clear();
                    return false;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Everything, for the next program (the pipes are moved out).
    fn hand_over(&mut self) -> HeldOutput {
        let vms = self
            .vms
            .iter()
            .map(|(name, vm)| HeldVm {
                name: name.clone(),
                console: vm.console.path.clone(),
                log: vm.log.path.clone(),
                limits: Limits {
                    max_bytes: vm.console.max,
                    rate_bytes_per_s: vm.bucket.rate as u64,
                },
            })
            .collect();
        let dropped = self
            .vms
            .iter()
            .map(|(n, vm)| (n.clone(), vm.dropped.load(Ordering::Relaxed)))
            .collect();
        let streams = self
            .streams
            .drain(..)
            .map(|s| HeldStream {
                vm: s.vm,
                kind: s.kind,
                pipe: s.pipe.into(),
            })
            .collect();
        HeldOutput {
            vms,
            streams,
            dropped,
        }
    }

    /// Take over what another program's thread handed over.
    fn adopt(&mut self, held: HeldOutput, dropped: &HashMap<String, Arc<AtomicU64>>) {
        for vm in held.vms {
            let files = Sink::open(vm.console.clone(), vm.limits.max_bytes)
                .and_then(|c| Ok((c, Sink::open(vm.log.clone(), vm.limits.max_bytes)?)));
            let (console, log) = match files {
                Ok(f) => f,
                Err(e) => {
                    self.log
                        .vm(3, &vm.name, &format!("output after reexec: {e}"));
                    // Its pipes are still read (and dropped): a child must never block.
                    match (null_sink(), null_sink()) {
                        (Ok(c), Ok(l)) => (c, l),
                        _ => continue,
                    }
                }
            };
            let pipes = held.streams.iter().filter(|s| s.vm == vm.name).count();
            self.vms.insert(
                vm.name.clone(),
                VmOut {
                    console,
                    log,
                    bucket: Bucket::new(vm.limits.rate_bytes_per_s),
                    dropped: dropped.get(&vm.name).cloned().unwrap_or_default(),
                    pipes,
                    dropping: false,
                },
            );
        }
        for s in held.streams {
            if !self.vms.contains_key(&s.vm) {
                continue;
            }
            self.streams.push(Stream {
                vm: s.vm,
                kind: s.kind,
                pipe: File::from(s.pipe),
            });
        }
    }

    fn attach(&mut self, a: Attach) {
        let Attach {
            name,
            console,
            log,
            pipes: [out, err],
            limits,
            dropped,
        } = a;
        match self.vms.get_mut(&name) {
            // A restarted VM while its old child's pipe is still open: it writes to the
            // files just opened (the log directory or limits may have changed).
            Some(vm) => {
                vm.console = console;
                vm.log = log;
                if vm.bucket.rate != limits.rate_bytes_per_s as f64 {
                    vm.bucket = Bucket::new(limits.rate_bytes_per_s);
                }
                vm.dropped = dropped;
                vm.pipes += 2;
                // Dropping is logged once per run of the VM, this new one included.
                vm.dropping = false;
            }
            None => {
                let vm = VmOut {
                    console,
                    log,
                    bucket: Bucket::new(limits.rate_bytes_per_s),
                    dropped,
                    pipes: 2,
                    dropping: false,
                };
                self.vms.insert(name.clone(), vm);
            }
        }
        self.streams.push(Stream {
            vm: name.clone(),
            kind: Kind::Console,
            pipe: out,
        });
        self.streams.push(Stream {
            vm: name,
            kind: Kind::Log,
            pipe: err,
        });
    }

    /// Reads once from stream `i` and writes what the limit lets through; false when the
    /// pipe is finished (end of file or an error).
    fn read_once(&mut self, i: usize) -> bool {
        // Borrowed field by field: the stream's VM name is looked up as it is, not
        // copied for every chunk read.
        let Worker {
            streams,
            vms,
            log,
            buf,
            consoles,
            ..
        } = self;
        let Some(s) = streams.get_mut(i) else {
            return false;
        };
        let n = match s.pipe.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return true;
            }
            Err(_) => return false,
        };
        let (name, kind) = (s.vm.as_str(), s.kind);
        let Some(vm) = vms.get_mut(name) else {
            return false;
        };
        let ok = vm.bucket.take(n, Instant::now());
        if ok < n {
            vm.dropped.fetch_add((n - ok) as u64, Ordering::Relaxed);
            if !vm.dropping {
                vm.dropping = true;
                log.vm(
                    4,
                    name,
                    "output faster than console_rate_kib_s: dropping the excess \
                     (counted in vmm_fleet_console_dropped_bytes_total)",
                );
            }
        }
        if ok > 0 {
            if let Kind::Console = kind {
                consoles.publish(name, &buf[..ok]);
            }
            let sink = match kind {
                Kind::Console => &mut vm.console,
                Kind::Log => &mut vm.log,
            };
            match sink.write(&buf[..ok]) {
                Ok(()) => sink.failing = false,
                Err(e) => {
                    vm.dropped.fetch_add(ok as u64, Ordering::Relaxed);
                    if !sink.failing {
                        sink.failing = true;
                        log.vm(3, name, &format!("output dropped: {e}"));
                    }
                }
            }
        }
        true
    }

    fn close(&mut self, i: usize) {
        if i >= self.streams.len() {
            return;
        }
        let s = self.streams.swap_remove(i);
        if let Some(vm) = self.vms.get_mut(&s.vm) {
            vm.pipes = vm.pipes.saturating_sub(1);
            if vm.pipes == 0 {
                self.vms.remove(&s.vm);
            }
        }
    }

    /// At shutdown: read what the pipes hold now, then stop.
    fn drain(&mut self) {
        for i in (0..self.streams.len()).rev() {
            for _ in 0..FINAL_READS {
                let before = self.streams.len();
                if !self.read_once(i) {
                    self.close(i);
                    break;
                }
                if self.streams.len() != before || self.pipe_empty(i) {
                    break;
                }
            }
        }
    }

    fn pipe_empty(&self, i: usize) -> bool {
        let Some(s) = self.streams.get(i) else {
            return true;
        };
        let mut fds = [PollFd::new(s.pipe.as_fd(), PollFlags::POLLIN)];
        !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("vmm-fleet-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_bucket_lets_its_burst_then_its_rate_through() {
        let mut b = Bucket::new(1000);
        let t0 = b.last;
        assert_eq!(b.take(10_000, t0), 10_000);
        assert_eq!(b.take(10_000, t0), 6000, "16 s of burst in all");
        assert_eq!(b.take(5000, t0), 0);
        assert_eq!(b.take(5000, t0 + Duration::from_millis(500)), 500);
        assert_eq!(
            b.take(100_000, t0 + Duration::from_secs(60)),
            16_000,
            "capped"
        );
    }

    #[test]
    fn a_sink_rotates_once_at_its_cap() {
        let d = scratch("rotate");
        let path = d.join("vm.console");
        let mut s = Sink::open(path.clone(), 1000).unwrap();
        for _ in 0..25 {
            s.write(&[b'x'; 300]).unwrap();
            let (a, b) = (
                std::fs::metadata(&path).unwrap().len(),
                std::fs::metadata(rotated(&path)).map_or(0, |m| m.len()),
            );
            assert!(a <= 1000 && b <= 1000, "{a} {b}");
        }
        assert_eq!(std::fs::metadata(rotated(&path)).unwrap().len(), 900);
        assert!(!d.join("vm.console.1.1").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_file_deleted_under_a_sink_is_started_again_at_the_cap() {
        let d = scratch("deleted");
        let path = d.join("vm.console");
        let mut s = Sink::open(path.clone(), 1000).unwrap();
        s.write(&[b'x'; 600]).unwrap();
        std::fs::remove_file(&path).unwrap();
        s.write(&[b'y'; 600]).unwrap();
        s.write(&[b'z'; 10]).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [&[b'y'; 600][..], &[b'z'; 10]].concat()
        );
        assert!(!rotated(&path).exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn kernel_interface_files_are_refused_before_any_write() {
        // Opened for appending and closed unwritten, even without the check.
        let e = open_log_file(Path::new("/proc/sys/kernel/core_pattern"));
        match e {
            Err(e) => assert!(
                e.to_string().contains("kernel interface")
                    || e.to_string().contains("ermission denied"),
                "{e}"
            ),
            Ok(_) => panic!("a console file on /proc/sys was accepted"),
        }
        let e = open_log_file(Path::new("/sys/kernel/mm/transparent_hugepage/enabled"));
        if let Err(e) = e {
            assert!(!e.to_string().contains("regular"), "{e}");
        } else {
            panic!("a console file on /sys was accepted");
        }
        let d = scratch("plain");
        assert!(open_log_file(&d.join("ok.console")).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn symlinks_and_fifos_are_refused_without_blocking() {
        let d = scratch("refuse");
        let target = d.join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, d.join("link")).unwrap();
        let e = open_log_file(&d.join("link")).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        // No reader: a blocking open for writing would hang here.
        assert!(open_log_file(&d.join("fifo")).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn handed_over_pipes_lose_no_byte_and_counters_carry_on() {
        let d = scratch("handover");
        let hub = OutputHub::start().unwrap();
        let mut spec = crate::config::VmSpec::from_yaml(
            "name: h\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\n",
            &d.join("h.yaml"),
        )
        .unwrap();
        spec.console = ConsoleSpec::Stdout;
        let limits = Limits {
            max_bytes: 1 << 20,
            rate_bytes_per_s: 1 << 20,
        };
        let mut p = hub.prepare(&d.join("logs"), &spec, limits).unwrap();
        let mut out = File::from(p.child_stdout().unwrap());
        let mut err = File::from(p.child_stderr().unwrap());
        p.attach().unwrap();
        hub.dropped_counter("h").store(7, Ordering::Relaxed);
        let console = d.join("logs/h.console");
        out.write_all(b"before ").unwrap();
        let seen = |want: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if std::fs::read_to_string(&console).unwrap_or_default() == want {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        };
        assert!(seen("before "));
        let held = hub.hand_over().unwrap();
        assert_eq!(held.streams.len(), 2);
        assert_eq!(held.vms[0].console, console);
        assert_eq!(held.dropped, vec![("h".to_string(), 7)]);
        // Nobody reads now: the bytes wait in the pipe.
        out.write_all(b"during ").unwrap();
        err.write_all(b"log line\n").unwrap();
        assert!(hub.hand_over().is_err(), "the old thread is gone");
        let next = OutputHub::start_adopting(held, Arc::new(Consoles::default())).unwrap();
        out.write_all(b"after").unwrap();
        assert!(seen("before during after"));
        assert_eq!(next.dropped_counter("h").load(Ordering::Relaxed), 7);
        drop((out, err));
        drop(next);
        assert_eq!(
            std::fs::read_to_string(d.join("logs/h.log")).unwrap(),
            "log line\n"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_flooding_pipe_is_cut_to_the_rate_and_counted() {
        let d = scratch("hub");
        let hub = OutputHub::start().unwrap();
        let mut spec = crate::config::VmSpec::from_yaml(
            "name: v\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\n",
            &d.join("v.yaml"),
        )
        .unwrap();
        spec.console = ConsoleSpec::Stdout;
        let limits = Limits {
            max_bytes: 1 << 20,
            rate_bytes_per_s: 1024,
        };
        let mut p = hub.prepare(&d.join("logs"), &spec, limits).unwrap();
        let mut out = File::from(p.child_stdout().unwrap());
        drop(p.child_stderr());
        p.attach().unwrap();
        for _ in 0..64 {
            out.write_all(&[b'y'; 4096]).unwrap();
        }
        // 256 KiB written, 16 KiB of burst let through.
        drop(out);
        let counter = hub.dropped_counter("v");
        let deadline = Instant::now() + Duration::from_secs(20);
        let file = d.join("logs/v.console");
        let seen = || counter.load(Ordering::Relaxed) + std::fs::metadata(&file).unwrap().len();
        while seen() < 64 * 4096 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(hub);
        let written = std::fs::metadata(d.join("logs/v.console")).unwrap().len();
        let dropped = counter.load(Ordering::Relaxed);
        assert!((16384..=16384 + 1024 * 21).contains(&written), "{written}");
        assert_eq!(written + dropped, 64 * 4096);
        let mode = std::fs::metadata(d.join("logs")).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o750
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn console_watchers_see_the_output_and_a_stalled_one_slows_nothing() {
        use std::os::unix::net::UnixStream;
        let d = scratch("tap");
        let hub = OutputHub::start().unwrap();
        let mut spec = crate::config::VmSpec::from_yaml(
            "name: t\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\n",
            &d.join("t.yaml"),
        )
        .unwrap();
        spec.console = ConsoleSpec::Stdout;
        let limits = Limits {
            max_bytes: 64 << 20,
            rate_bytes_per_s: 1 << 30,
        };
        let attach = |name: &'static str| {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let consoles = hub.consoles().clone();
            let t = std::thread::spawn(move || {
                super::super::console::serve_console(theirs, name, &consoles)
            });
            (ours, t)
        };
        // One client reads (the writer: attached first), one never does.
        let consoles = hub.consoles().clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (reader, reader_thread) = attach("t");
        while !consoles.has_writer("t") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (stalled, stalled_thread) = attach("t");
        while consoles.watchers("t") < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut p = hub.prepare(&d.join("logs"), &spec, limits).unwrap();
        let mut out = File::from(p.child_stdout().unwrap());
        drop(p.child_stderr());
        p.attach().unwrap();
        let reading = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = (&reader).read_to_end(&mut all);
            all
        });
        // 8 MiB: far more than the stalled client's queue and socket buffer.
        let total = 8usize << 20;
        for _ in 0..total / 65536 {
            out.write_all(&[b'z'; 65536]).unwrap();
        }
        let file = d.join("logs/t.console");
        let size = || std::fs::metadata(&file).map_or(0, |m| m.len());
        while size() < total as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(size(), total as u64, "the file got every byte");
        // The reader has had time to catch up; the last line reaches it.
        out.write_all(b"END").unwrap();
        while size() < total as u64 + 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        consoles.close_all("test over");
        let seen = reading.join().unwrap();
        assert!(String::from_utf8_lossy(&seen[seen.len().saturating_sub(200)..]).contains("END"));
        let fast = reader_thread.join().unwrap().unwrap();
        drop(stalled);
        let slow = stalled_thread.join().unwrap().unwrap();
        assert!(slow.dropped > 0, "the stalled watcher lost bytes");
        assert_eq!(fast.mode, super::super::console::Mode::ReadWrite);
        drop(out);
        drop(hub);
        let _ = std::fs::remove_dir_all(&d);
    }
}
