//! Reexec: the supervisor execs its binary file again on the same pid and hands its
//! state to the new program ([`super::handover`]); every VM child keeps running, stays
//! its child, and keeps its counter table, output pipes and control channel.
//!
//! The old program, on the event loop (SIGUSR2 or the `reexec` control command):
//! 1. asks the binary at the path `up` was started from (not /proc/self/exe, which
//!    after a package upgrade names the deleted old file) which handover formats it
//!    reads (`vmm-fleet handover-formats`, bounded in time); refuses with a message if
//!    it cannot run or does not read ours: nothing is touched;
//! 2. lets the spawns under way finish (so no child is half-started), with a deadline;
//! 3. lets the `/metrics` requests in progress finish (new ones wait in the listener's
//!    backlog), takes the output thread's pipes (it stops reading; bytes wait in the pipes), the
//!    exporter's marks and a copy of its listening socket, the cgroups, every VM's
//!    machine and fds, writes the document into a sealed memfd, clears close-on-exec
//!    on exactly the fds it names, blocks the signals it handles (they stay pending
//!    across the exec and reach the new program's handlers), pings systemd's watchdog,
//!    and execs `EXE up ARGS --resume-fd N`;
//! 4. if the exec fails: logs it, restores all of the above and carries on.
//!
//! Signals: only the signal thread ([`SignalThread`]) takes the handled signals; every
//! other thread blocks them. Before the exec that thread is stopped, so a signal that
//! comes then (a `systemctl stop` during an upgrade) stays pending across the exec and
//! reaches the new program; those the thread had already passed on are handed over in
//! the document. (What is left: a signal in the microseconds between the thread's stop
//! and its own blocking of them.)
//!
//! The new program ([`Supervisor::resume`]) rebuilds the supervisor from the document
//! without spawning anything, reaps the children that died during the exec, and carries
//! on. A VM whose part of the document cannot be read is logged and left alone (its
//! child keeps running; its fds stay open). A document it cannot read at all puts it in
//! hold mode ([`hold`]): nothing is killed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use serde::{Deserialize, Serialize};

use super::handover::{self, FdKind, HandoverError, HeldListener};
use super::output::{HeldOutput, HeldStream, HeldVm, Kind, OutputHub};
use super::spawn::Spawner;
use super::{Event, EventLog, FleetSource, Supervisor, Vm, machine};
use crate::config::FleetSettings;
use crate::metrics::counters::SharedTable;
use crate::metrics::exporter::{Exporter, HeldMarks};

/// How long the new binary may take to say which formats it reads.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reexec waits for the spawns under way before it gives up (and is refused).
const SPAWN_WAIT: Duration = Duration::from_secs(30);
/// How long reexec waits for the /metrics requests in progress to be answered.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// The hidden option of `up` that names the handover fd.
pub const RESUME_FLAG: &str = "--resume-fd";

/// The signals the supervisor handles: blocked on every thread but the signal thread,
/// and on all of them over the exec, so that none arriving then is lost or kills the
/// process before the new program's handlers are in place (pending, they are delivered
/// to its signal thread).
const HANDLED: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR2,
];

fn handled_set() -> SigSet {
    let mut s = SigSet::empty();
    for sig in HANDLED {
        s.add(sig);
    }
    s
}

/// Unblock the handled signals on this thread.
pub fn unblock_signals() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled_set()), None);
}

/// The signals `up` handles.
pub const SIGNALS: [i32; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR2,
];

/// The thread that takes every handled signal and sends it to the event loop as
/// [`Event::Signal`]. Every other thread blocks them ([`block_signals`] on the first
/// thread before any other starts; threads inherit it; children do not: the standard
/// library resets a child's mask). So at a reexec, once this thread is stopped
/// ([`SignalThread::stop`]), a signal that comes stays pending across the exec and
/// reaches the new program, instead of a handler of a thread the exec ends.
pub struct SignalThread {
    handle: signal_hook::iterator::Handle,
    done: std::sync::mpsc::Receiver<()>,
}

impl SignalThread {
    /// Install the handlers and start the thread (call with the signals blocked).
    pub fn start(events: std::sync::mpsc::Sender<Event>) -> std::io::Result<SignalThread> {
        let mut signals = signal_hook::iterator::Signals::new(SIGNALS)?;
        let handle = signals.handle();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                unblock_signals();
                for sig in signals.forever() {
                    if events.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
                // Stopped for a reexec: from now on signals wait, pending.
                block_signals();
                let _ = done_tx.send(());
            })?;
        Ok(SignalThread { handle, done })
    }

    /// Stop taking signals (they stay pending); true once the thread has stopped.
    fn stop(&self) -> bool {
        self.handle.close();
        self.done.recv_timeout(Duration::from_secs(1)).is_ok()
    }
}

/// Why a reexec was refused or failed (the old program carries on in each case).
#[derive(Debug, thiserror::Error)]
pub enum ReexecError {
    /// This supervisor was not started by `up` with a binary path to exec.
    #[error("reexec is not available here (no binary path)")]
    Unavailable,
    /// The fleet is stopping.
    #[error("the fleet is stopping")]
    Stopping,
    /// The new binary cannot be run or does not read our handover format.
    #[error("new binary {}: {why}; nothing changed", exe.display())]
    Preflight {
        /// The binary.
        exe: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// Spawns under way did not finish in time.
    #[error("{0} spawn(s) under way (waited up to {SPAWN_WAIT:?}); nothing changed, ask again")]
    Busy(usize),
    /// The state could not be written.
    #[error("handing the state over: {0}; nothing changed")]
    Handover(#[from] HandoverError),
    /// The output thread could not hand its pipes over.
    #[error("output thread: {0}; nothing changed")]
    Output(String),
    /// execve failed.
    #[error("exec {}: {source}; the old program carries on", exe.display())]
    Exec {
        /// The binary.
        exe: PathBuf,
        /// errno.
        source: nix::Error,
    },
}

/// What reexec needs beyond the supervisor's own state.
pub struct ReexecContext {
    /// The binary to exec: the path `up` was started from, resolved once at start-up.
    pub exe: PathBuf,
    /// `up`'s arguments (after the program name), without a `--resume-fd`.
    pub args: Vec<OsString>,
    /// The `/metrics` endpoint, whose listener and marks are handed over.
    pub exporter: Option<Exporter>,
    /// The control socket's server, whose listener is handed over.
    pub control: Option<Arc<super::control::ControlServer>>,
    /// The signal thread, stopped just before the exec (restarted if it fails).
    pub signals: Option<SignalThread>,
}

/// `args` without any `--resume-fd N` / `--resume-fd=N`.
pub fn strip_resume(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        let b = a.as_bytes();
        if b == RESUME_FLAG.as_bytes() {
            skip = true;
        } else if !b.starts_with(format!("{RESUME_FLAG}=").as_bytes()) {
            out.push(a);
        }
    }
    out
}

/// Where the fleet's files are, as handed over.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceDoc {
    dir: PathBuf,
    settings: Option<PathBuf>,
    default_log_dir: PathBuf,
    host_memory_mib: Option<u64>,
}

/// One VM as handed over.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmDoc {
    name: String,
    machine: machine::Machine,
    table: Option<TableDoc>,
    /// The supervisor's end of the child's control channel.
    #[serde(default)]
    channel: Option<RawFd>,
    start_unix: Option<f64>,
}

/// A counter table as handed over.
#[derive(Debug, Serialize, Deserialize)]
pub struct TableDoc {
    fd: RawFd,
    age_ns: u64,
    handed_vcpus: usize,
}

/// A pipe as handed over.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamDoc {
    vm: String,
    kind: Kind,
    fd: RawFd,
}

/// The output thread's state as handed over.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OutputDoc {
    vms: Vec<HeldVm>,
    streams: Vec<StreamDoc>,
    dropped: Vec<(String, u64)>,
}

/// The whole document (format 1).
#[derive(Debug, Serialize, Deserialize)]
pub struct Document {
    /// [`handover::FORMAT`].
    pub format: u32,
    /// `vmm-fleet VERSION`.
    pub written_by: String,
    /// The binary exec'd.
    pub exe: PathBuf,
    /// `up`'s arguments (for the log; the exec passes them).
    pub args: Vec<String>,
    source: SourceDoc,
    settings: FleetSettings,
    /// Each a [`VmDoc`], read one at a time: one unreadable VM does not sink the rest.
    vms: Vec<serde_json::Value>,
    strays: Vec<(u32, String)>,
    /// A reload was under way (its loader thread is gone): the new program loads again.
    reload_pending: bool,
    /// Signals taken off the event channel just before the exec, for the new program.
    pending_signals: Vec<i32>,
    tickets: u64,
    cgroups: Option<super::cgroup::HeldCgroups>,
    output: Option<OutputDoc>,
    marks: Option<HeldMarks>,
    /// `/metrics`'s listening socket.
    metrics: Option<HeldListener>,
    /// The control socket's listening socket.
    #[serde(default)]
    control: Option<HeldListener>,
    /// When the supervisor was first started (Unix seconds), kept across reexecs.
    started_unix: Option<f64>,
    /// Reexecs before this one.
    #[serde(default)]
    reexecs: u64,
}

/// A reload's load, as the loader thread sends it.
type LoadResult =
    Box<Result<(FleetSettings, Vec<crate::config::VmSpec>), crate::config::ConfigError>>;

/// What was taken apart for the handover, to put back should the exec fail.
struct Taken {
    output: Option<HeldOutput>,
    /// Fds whose close-on-exec was cleared.
    inherited: Vec<RawFd>,
    /// Copies made for the new program only (closed on failure).
    copies: Vec<OwnedFd>,
}

impl<S: Spawner> Supervisor<S> {
    /// Set what reexec needs (the binary path, `up`'s arguments, the exporter).
    pub fn with_reexec(mut self, ctx: ReexecContext) -> Self {
        self.reexec = Some(ctx);
        self
    }

    /// A copy of `/metrics`' address, if it is bound.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.reexec
            .as_ref()
            .and_then(|c| c.exporter.as_ref())
            .and_then(Exporter::addr)
    }

    /// Ask for a reexec: checks the new binary now (so a control request gets its
    /// answer), then the event loop execs at the end of this round. Returns the line to
    /// answer with.
    pub fn reexec(&mut self) -> Result<String, ReexecError> {
        let exe = self.preflight()?;
        self.reexec_requested = true;
        Ok(format!(
            "reexec: handing the fleet over to {} (handover format {})",
            exe.display(),
            handover::format_to_write()
        ))
    }

    /// Checks that the binary exists and reads our format.
    fn preflight(&self) -> Result<PathBuf, ReexecError> {
        if self.stopping {
            return Err(ReexecError::Stopping);
        }
        let ctx = self.reexec.as_ref().ok_or(ReexecError::Unavailable)?;
        let exe = ctx.exe.clone();
        let fail = |why: String| ReexecError::Preflight {
            exe: exe.clone(),
            why,
        };
        if handover::test_skip_preflight() {
            return Ok(exe);
        }
        let out = run_bounded(&exe, PREFLIGHT_TIMEOUT).map_err(fail)?;
        let formats: handover::Formats = serde_json::from_slice(out.trim_ascii()).map_err(|e| {
            fail(format!(
                "`handover-formats` printed no list of formats ({e})"
            ))
        })?;
        let ours = handover::format_to_write();
        if !formats.reads.contains(&ours) {
            return Err(fail(format!(
                "version {} reads handover formats {:?}, not {ours}",
                formats.version, formats.reads
            )));
        }
        Ok(exe)
    }

    /// The event loop's part: a requested reexec is carried out now. Returns only if it
    /// was refused or failed (logged).
    pub(super) fn reexec_if_requested(&mut self, events: &Receiver<Event>) {
        if !std::mem::take(&mut self.reexec_requested) {
            return;
        }
        if let Err(e) = self.reexec_now(events) {
            self.log.line(3, &format!("reexec refused: {e}"));
        }
    }

    fn reexec_now(&mut self, events: &Receiver<Event>) -> Result<(), ReexecError> {
        let exe = self.preflight()?;
        self.exec_checked(exe, events)
    }

    /// [`Supervisor::reexec_now`] once `exe` has passed the preflight.
    fn exec_checked(&mut self, exe: PathBuf, events: &Receiver<Event>) -> Result<(), ReexecError> {
        self.log.line(
            6,
            &format!("reexec: handing the fleet over to {}", exe.display()),
        );
        let deadline = Instant::now() + SPAWN_WAIT;
        while self.in_flight > 0 && Instant::now() < deadline {
            if let Ok(ev) = events.recv_timeout(Duration::from_millis(50)) {
                self.on_loop_event(ev);
            }
            self.reap();
            if self.stopping {
                return Err(ReexecError::Stopping);
            }
        }
        if self.in_flight > 0 {
            return Err(ReexecError::Busy(self.in_flight));
        }
        // Everything queued so far is handled here; signals that come after are pending
        // across the exec (blocked) or taken off the channel below.
        let old_mask = block_signals();
        // From here signals stay pending (across the exec) instead of being taken.
        if let Some(t) = self.reexec.as_ref().and_then(|c| c.signals.as_ref())
            && !t.stop()
        {
            self.log
                .line(4, "reexec: the signal thread did not stop in time");
        }
        let mut pending_signals = Vec::new();
        // A reload's result taken off the channel: the new program loads again; if the
        // exec does not happen, it is applied here (else the reload stays `Loading` with
        // no loader left, and every later SIGHUP or `reload` is queued behind it forever).
        let mut loaded = None;
        self.take_queued(events, &mut pending_signals, &mut loaded);
        // Control answers already given (the `reexec` request's own) are written out
        // before the exec ends their threads; requests that come meanwhile are told to
        // ask again; a console session still open is cut.
        if let Some(c) = self.reexec.as_ref().and_then(|c| c.control.clone()) {
            let deadline = Instant::now() + DRAIN_LIMIT;
            while c.busy() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
                self.take_queued(events, &mut pending_signals, &mut loaded);
            }
        }
        if self.in_flight > 0 {
            // Something queued asked for a spawn: not now.
            self.carry_on(&old_mask, loaded, pending_signals);
            return Err(ReexecError::Busy(self.in_flight));
        }
        let mut taken = Taken {
            output: None,
            inherited: Vec::new(),
            copies: Vec::new(),
        };
        let result = self.hand_over_and_exec(&exe, pending_signals.clone(), &mut taken);
        // Only a failure comes back here: what was taken off the channel for the new
        // program is this one's again (a SIGTERM of a `systemctl stop` included).
        self.restore(taken);
        self.carry_on(&old_mask, loaded, pending_signals);
        result
    }

    /// A reexec that did not happen: the signal mask back, the signal thread again,
    /// and what was taken off the event channel for the new program (a reload's result,
    /// signals) handled by this one.
    fn carry_on(
        &mut self,
        old_mask: &SigSet,
        loaded: Option<LoadResult>,
        pending_signals: Vec<i32>,
    ) {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(old_mask), None);
        self.restart_signal_thread();
        if let Some(l) = loaded {
            self.on_loaded(*l);
        }
        for s in pending_signals {
            self.on_signal(s);
        }
    }

    /// After a reexec that did not happen: signals are taken again (those that came
    /// meanwhile are pending, and delivered now).
    fn restart_signal_thread(&mut self) {
        let Some(ctx) = self.reexec.as_mut() else {
            return;
        };
        if ctx.signals.is_none() {
            return;
        }
        let Some(tx) = self.events.clone() else {
            return;
        };
        match SignalThread::start(tx) {
            Ok(t) => ctx.signals = Some(t),
            Err(e) => {
                ctx.signals = None;
                self.log
                    .line(2, &format!("cannot restart the signal thread: {e}"));
            }
        }
    }

    /// What is queued on the event channel just before the exec: signals kept for the
    /// new program, a reload's result kept in `loaded` (the new program loads again;
    /// this one applies it if the exec does not happen), control requests told to ask
    /// again, the rest handled.
    fn take_queued(
        &mut self,
        events: &Receiver<Event>,
        signals: &mut Vec<i32>,
        loaded: &mut Option<LoadResult>,
    ) {
        for ev in events.try_iter() {
            match ev {
                Event::Signal(s) => signals.push(s),
                Event::Loaded(l) => {
                    // Still under way for the document (`reload_pending`); a SIGHUP
                    // queued behind it (`LoadingAndAgain`) is kept.
                    if self.reload == super::ReloadState::Idle {
                        self.reload = super::ReloadState::Loading;
                    }
                    *loaded = Some(l);
                }
                Event::Control(req) => {
                    let _ = req.reply.try_send(crate::control::Response::error(
                        "a reexec is under way: ask again in a moment",
                    ));
                }
                other => self.on_loop_event(other),
            }
        }
    }

    fn hand_over_and_exec(
        &mut self,
        exe: &Path,
        pending_signals: Vec<i32>,
        taken: &mut Taken,
    ) -> Result<(), ReexecError> {
        // Scrapes in progress are answered; new ones wait in the backlog for the next
        // program. Before the marks are read, so they hold what was last exported.
        if let Some(e) = self.reexec.as_ref().and_then(|c| c.exporter.as_ref())
            && !e.drain(DRAIN_LIMIT)
        {
            self.log.line(
                4,
                "reexec: a /metrics connection still open after the drain; it is cut",
            );
        }
        let now = Instant::now();
        if let Some(hub) = &self.output {
            taken.output = Some(
                hub.hand_over()
                    .map_err(|e| ReexecError::Output(e.to_string()))?,
            );
        }
        let doc = self.document(now, pending_signals, taken)?;
        let json = serde_json::to_vec(&doc).map_err(HandoverError::Json)?;
        let memfd = handover::write_memfd(&json)?;
        let fd = memfd.as_raw_fd();
        let ctx = self.reexec.as_ref().ok_or(ReexecError::Unavailable)?;
        let mut argv = vec![CString::new("vmm-fleet").unwrap_or_default()];
        for a in ctx
            .args
            .iter()
            .cloned()
            .chain([RESUME_FLAG.into(), fd.to_string().into()])
        {
            argv.push(CString::new(a.as_bytes()).map_err(|_| ReexecError::Exec {
                exe: exe.to_path_buf(),
                source: nix::Error::EINVAL,
            })?);
        }
        let path = CString::new(exe.as_os_str().as_bytes()).map_err(|_| ReexecError::Exec {
            exe: exe.to_path_buf(),
            source: nix::Error::EINVAL,
        })?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        self.log.line(
            6,
            &format!(
                "reexec: {} VM(s), {} bytes of state in fd {fd}",
                self.vms.len(),
                json.len()
            ),
        );
        let err = nix::unistd::execv(&path, &argv)
            .err()
            .unwrap_or(nix::Error::EINVAL);
        drop(memfd);
        Err(ReexecError::Exec {
            exe: exe.to_path_buf(),
            source: err,
        })
    }

    /// The document, with close-on-exec cleared on every fd it names (recorded in
    /// `taken`).
    fn document(
        &mut self,
        now: Instant,
        pending_signals: Vec<i32>,
        taken: &mut Taken,
    ) -> Result<Document, ReexecError> {
        let mut inherit = |fd: std::os::fd::BorrowedFd<'_>| -> Result<RawFd, ReexecError> {
            let raw = handover::inherit(fd).map_err(|source| {
                ReexecError::Handover(HandoverError::Sys {
                    what: "clearing close-on-exec",
                    source,
                })
            })?;
            taken.inherited.push(raw);
            Ok(raw)
        };
        let mut vms = Vec::with_capacity(self.vms.len());
        for (name, vm) in &self.vms {
            let table = match &vm.table {
                Some(t) => Some(TableDoc {
                    fd: inherit(t.fd())?,
                    age_ns: u64::try_from(t.age().as_nanos()).unwrap_or(u64::MAX),
                    handed_vcpus: t.handed_vcpus(),
                }),
                None => None,
            };
            let channel = match &vm.channel {
                Some(c) => Some(inherit(c.as_fd())?),
                None => None,
            };
            let doc = VmDoc {
                name: name.clone(),
                machine: vm.machine.clone(),
                table,
                channel,
                start_unix: vm.start_unix,
            };
            let value =
                handover::at(now, || serde_json::to_value(&doc)).map_err(HandoverError::Json)?;
            vms.push(value);
        }
        let output = match &taken.output {
            Some(held) => {
                let mut streams = Vec::with_capacity(held.streams.len());
                for s in &held.streams {
                    streams.push(StreamDoc {
                        vm: s.vm.clone(),
                        kind: s.kind,
                        fd: inherit(s.pipe.as_fd())?,
                    });
                }
                Some(OutputDoc {
                    vms: held.vms.clone(),
                    streams,
                    dropped: held.dropped.clone(),
                })
            }
            None => None,
        };
        let exporter = self.reexec.as_ref().and_then(|c| c.exporter.as_ref());
        let marks = exporter.map(Exporter::held_marks);
        let mut metrics = None;
        if let Some((fd, wanted)) = exporter.and_then(Exporter::listener) {
            metrics = Some(HeldListener {
                fd: inherit(fd.as_fd())?,
                wanted: wanted.to_string(),
            });
            taken.copies.push(fd);
        }
        let mut copies = Vec::new();
        let control = self.control_listener_for_handover(&mut inherit, &mut copies)?;
        taken.copies.extend(copies);
        let ctx = self.reexec.as_ref().ok_or(ReexecError::Unavailable)?;
        Ok(Document {
            format: handover::format_to_write(),
            written_by: format!("vmm-fleet {}", env!("CARGO_PKG_VERSION")),
            exe: ctx.exe.clone(),
            args: ctx
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            source: SourceDoc {
                dir: self.source.dir.clone(),
                settings: self.source.settings.clone(),
                default_log_dir: self.source.default_log_dir.clone(),
                host_memory_mib: self.source.host_memory_mib,
            },
            settings: self.settings.clone(),
            vms,
            strays: self.strays.iter().map(|(p, n)| (*p, n.clone())).collect(),
            reload_pending: self.reload != super::ReloadState::Idle,
            pending_signals,
            tickets: self.tickets,
            cgroups: self.cgroups.enabled().then(|| self.cgroups.hand_over()),
            output,
            marks,
            metrics,
            control,
            started_unix: self.started_unix,
            reexecs: self.reexecs,
        })
    }

    /// The control socket's listener, if the supervisor has one (see `control.rs`).
    fn control_listener_for_handover(
        &self,
        inherit: &mut impl FnMut(std::os::fd::BorrowedFd<'_>) -> Result<RawFd, ReexecError>,
        taken: &mut Vec<OwnedFd>,
    ) -> Result<Option<HeldListener>, ReexecError> {
        let server = self.reexec.as_ref().and_then(|c| c.control.as_ref());
        let Some((server, fd)) = server.and_then(|s| Some((s, s.listener()?))) else {
            return Ok(None);
        };
        let held = HeldListener {
            fd: inherit(fd.as_fd())?,
            wanted: server.path().display().to_string(),
        };
        taken.push(fd);
        Ok(Some(held))
    }

    /// The program answering control requests.
    pub fn program(&self) -> crate::control::Program {
        crate::control::Program {
            version: env!("CARGO_PKG_VERSION").to_string(),
            reexecs: self.reexecs,
        }
    }

    /// The exec failed: close-on-exec back on, the output thread restarted with its
    /// pipes.
    fn restore(&mut self, taken: Taken) {
        if let Some(e) = self.reexec.as_ref().and_then(|c| c.exporter.as_ref()) {
            e.undrain();
        }
        for fd in taken.inherited {
            // SAFETY: F_SETFD on an fd we still own (every one named was ours).
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        drop(taken.copies);
        if let Some(held) = taken.output {
            // The same console registry: the control socket's clients keep theirs.
            let consoles = self
                .output
                .as_ref()
                .map(|o| o.consoles().clone())
                .unwrap_or_default();
            match OutputHub::start_adopting(held, consoles) {
                Ok(hub) => self.output = Some(Arc::new(hub)),
                Err(e) => self.log.line(
                    3,
                    &format!("reexec failed and the output thread cannot restart: {e}"),
                ),
            }
        }
    }
}

/// Block the handled signals on this thread; returns the mask before.
pub fn block_signals() -> SigSet {
    let mut old = SigSet::empty();
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), Some(&mut old));
    old
}

/// Run `EXE handover-formats` with a time limit; its stdout.
fn run_bounded(exe: &Path, limit: Duration) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(exe)
        .arg("handover-formats")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear()
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`handover-formats` did not answer within {limit:?}"
                ));
            }
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    };
    let mut out = Vec::new();
    if let Some(o) = child.stdout.take() {
        let _ = o.take(64 * 1024).read_to_end(&mut out);
    }
    if !status.success() {
        return Err(format!("`handover-formats` failed ({status})"));
    }
    Ok(out)
}

/// The exporter's part of a handover.
pub struct ResumedMetrics {
    /// Its listening socket, if it could be adopted.
    pub listener: Option<OwnedFd>,
    /// The address it was asked for.
    pub wanted: Option<std::net::SocketAddr>,
    /// Its marks.
    pub marks: HeldMarks,
}

/// What the new program rebuilt from a document, beyond the supervisor.
pub struct Resumed {
    /// The exporter's listening socket and marks.
    pub metrics: Option<ResumedMetrics>,
    /// The control socket's listener, and the path it is bound to (the old program's:
    /// a reload may have moved the log directory, and with it the default path, since).
    pub control: Option<(OwnedFd, PathBuf)>,
    /// The output thread's state.
    pub output: HeldOutput,
    /// Lines to log once logging is set up.
    pub notes: Vec<String>,
}

/// Read the handover from `fd` (left open: on an error, [`hold`] keeps it for a later
/// reexec; on success the caller closes it).
pub fn read_document(fd: RawFd) -> Result<Document, HandoverError> {
    // SAFETY: only borrowed for the read; the fd is the one `--resume-fd` names, which
    // the old program left open for us (a closed fd fails the seal check with EBADF).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let doc = handover::read_memfd(fd)?;
    handover::check_format(&doc)?;
    Ok(serde_json::from_slice(&doc)?)
}

impl<S: Spawner> Supervisor<S> {
    /// The supervisor the old program handed over in `doc`: nothing is spawned; VMs
    /// whose part cannot be read are logged and left alone.
    pub fn resume(doc: Document, spawner: S, log: EventLog) -> (Self, Resumed) {
        let now = Instant::now();
        let mut taken: Vec<RawFd> = Vec::new();
        let mut notes = Vec::new();
        let source = FleetSource {
            dir: doc.source.dir,
            settings: doc.source.settings,
            default_log_dir: doc.source.default_log_dir,
            host_memory_mib: doc.source.host_memory_mib,
        };
        let mut vms = BTreeMap::new();
        for value in doc.vms {
            let hint = value
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("?")
                .to_string();
            let vm: VmDoc = match handover::at(now, || serde_json::from_value(value)) {
                Ok(v) => v,
                Err(e) => {
                    notes.push(format!(
                        "vm {hint}: its handed-over state cannot be read ({e}); left alone: \
                         its child keeps running unsupervised until the fleet stops"
                    ));
                    continue;
                }
            };
            let table = vm.table.and_then(|t| {
                let adopted = handover::adopt_fd(t.fd, FdKind::Memfd, "counter table", &mut taken)
                    .map_err(|e| e.to_string())
                    .and_then(|fd| {
                        SharedTable::adopt(fd, Duration::from_nanos(t.age_ns), t.handed_vcpus)
                            .map_err(|e| e.to_string())
                    });
                adopted
                    .inspect_err(|e| {
                        notes.push(format!("vm {}: counter table not adopted: {e}", vm.name));
                    })
                    .ok()
            });
            let channel = vm.channel.and_then(|fd| {
                handover::adopt_fd(fd, FdKind::Seqpacket, "control channel", &mut taken)
                    .inspect_err(|e| {
                        notes.push(format!("vm {}: control channel not adopted: {e}", vm.name));
                    })
                    .ok()
                    .map(|fd| Arc::new(super::channel::ChildChannel::from_owned(fd)))
            });
            let mut machine = vm.machine;
            machine.set_timing(super::timing(&doc.settings));
            vms.insert(
                vm.name.clone(),
                Vm {
                    machine,
                    table,
                    start_unix: vm.start_unix,
                    pending: None,
                    channel,
                },
            );
        }
        let mut output = HeldOutput {
            dropped: Vec::new(),
            vms: Vec::new(),
            streams: Vec::new(),
        };
        if let Some(o) = doc.output {
            output.vms = o.vms;
            output.dropped = o.dropped;
            for s in o.streams {
                match handover::adopt_fd(s.fd, FdKind::Pipe, "output pipe", &mut taken) {
                    Ok(pipe) => output.streams.push(HeldStream {
                        vm: s.vm,
                        kind: s.kind,
                        pipe,
                    }),
                    Err(e) => notes.push(format!("vm {}: output pipe not adopted: {e}", s.vm)),
                }
            }
        }
        let mut listener = |l: Option<HeldListener>, what: &str| {
            let l = l?;
            let fd = handover::adopt_fd(l.fd, FdKind::Listener, what, &mut taken)
                .inspect_err(|e| notes.push(format!("{what}: not adopted: {e}")))
                .ok();
            Some((fd, l.wanted.parse().ok()))
        };
        let metrics = listener(doc.metrics, "metrics listener");
        let control_path = doc.control.as_ref().map(|l| PathBuf::from(&l.wanted));
        let control = listener(doc.control, "control listener")
            .and_then(|(fd, _)| fd)
            .zip(control_path);
        let (listener, wanted) = metrics.unwrap_or((None, None));
        let metrics = Some(ResumedMetrics {
            listener,
            wanted,
            marks: doc.marks.unwrap_or_default(),
        });
        let cgroups = match doc.cgroups {
            Some(held) => {
                let (cg, n) = super::cgroup::FleetCgroups::adopt(held, now);
                notes.extend(n);
                cg
            }
            None => super::cgroup::FleetCgroups::disabled(),
        };
        let mut sup = Supervisor::empty(source, doc.settings, spawner, log);
        sup.vms = vms;
        sup.cgroups = cgroups;
        sup.tickets = doc.tickets;
        sup.strays = doc.strays.into_iter().collect::<HashMap<_, _>>();
        sup.resumed = Some(super::ResumeState {
            reload: doc.reload_pending,
            signals: doc.pending_signals,
        });
        sup.started_unix = doc.started_unix;
        sup.reexecs = doc.reexecs + 1;
        notes.insert(
            0,
            format!(
                "reexec: resumed from {} (handover format {}): {} VM(s)",
                doc.written_by,
                doc.format,
                sup.vms.len()
            ),
        );
        (
            sup,
            Resumed {
                metrics,
                control,
                output,
                notes,
            },
        )
    }
}

/// Hold mode: the handed-over state cannot be read (`why`). Nothing is killed: every
/// inherited fd stays open (so no child sees its control channel close), children are
/// reaped and logged, SIGUSR2 execs the binary again with the same state (a fixed or
/// newer binary may read it), SIGTERM/SIGINT stop every child (SIGTERM, then SIGKILL
/// after `grace`) and exit. Returns the exit code.
pub fn hold(fd: RawFd, why: &str, exe: &Path, args: &[OsString], log: &EventLog) -> i32 {
    use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM, SIGUSR2};
    use signal_hook::iterator::Signals;
    log.line(
        2,
        &format!(
            "reexec: the handed-over state cannot be read ({why}); HOLD MODE: every VM \
             keeps running unsupervised (no restarts, no /metrics, no control); \
             `kill -USR2 {}` after installing a binary that reads it, or stop the service \
             to stop the VMs",
            std::process::id()
        ),
    );
    let mut signals = match Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGUSR2]) {
        Ok(s) => s,
        Err(e) => {
            log.line(3, &format!("hold: cannot catch signals: {e}"));
            // Still nothing killed: sleep until killed.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    };
    unblock_signals();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
        "HOLD: handed-over state unreadable; VMs run unsupervised",
    )]);
    for sig in signals.forever() {
        match sig {
            SIGCHLD => reap_logged(log),
            SIGUSR2 => {
                let mut argv = vec![CString::new("vmm-fleet").unwrap_or_default()];
                argv.extend(
                    args.iter()
                        .cloned()
                        .chain([RESUME_FLAG.into(), fd.to_string().into()])
                        .filter_map(|a| CString::new(a.as_bytes()).ok()),
                );
                let Ok(path) = CString::new(exe.as_os_str().as_bytes()) else {
                    continue;
                };
                block_signals();
                let e = nix::unistd::execv(&path, &argv).err();
                unblock_signals();
                log.line(3, &format!("hold: exec {}: {e:?}", exe.display()));
            }
            _ => return stop_children(log),
        }
    }
    0
}

fn reap_logged(log: &EventLog) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        match s {
            WaitStatus::StillAlive => return,
            WaitStatus::Exited(pid, c) => log.line(4, &format!("hold: child {pid} exited ({c})")),
            WaitStatus::Signaled(pid, sig, _) => {
                log.line(4, &format!("hold: child {pid} killed by {sig}"))
            }
            _ => {}
        }
    }
}

/// SIGTERM every child of this process, SIGKILL what is left after 30 s.
fn stop_children(log: &EventLog) -> i32 {
    let me = std::process::id().to_string();
    let children = || -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    let after = s.rsplit_once(')').map_or("", |x| x.1);
                    let f: Vec<&str> = after.split_whitespace().collect();
                    f.get(1) == Some(&me.as_str()) && f.first() != Some(&"Z")
                })
            })
            .collect()
    };
    let send = |sig| {
        for pid in children() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    };
    log.line(6, "hold: stopping every VM");
    send(Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !children().is_empty() && Instant::now() < deadline {
        reap_logged(log);
        std::thread::sleep(Duration::from_millis(50));
    }
    send(Signal::SIGKILL);
    reap_logged(log);
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmSpec;
    use crate::protocol::ExitCode;
    use machine::{Event as M, Machine, State, Timing};
    use std::path::Path as P;

    fn spec(name: &str) -> VmSpec {
        let text = format!("name: {name}\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\n");
        VmSpec::from_yaml(&text, P::new("/nonexistent/vm.yaml")).unwrap()
    }

    /// A machine driven through `events` from `t0`, one second apart, then through the
    /// user's `commands`.
    fn driven_with(events: Vec<M>, commands: &[machine::Command], t0: Instant) -> Machine {
        let timing = Timing {
            stop_grace: Duration::from_secs(10),
            startup_settle: Duration::from_millis(500),
        };
        let mut m = Machine::new(spec("m"), timing);
        let n = events.len();
        for (i, e) in events.into_iter().enumerate() {
            m.on_event(e, t0 + Duration::from_secs(i as u64));
        }
        for (i, c) in commands.iter().enumerate() {
            let _ = m.on_command(*c, t0 + Duration::from_secs((n + i) as u64));
        }
        m
    }

    fn driven(events: Vec<M>, t0: Instant) -> Machine {
        driven_with(events, &[], t0)
    }

    #[test]
    fn every_machine_state_travels_and_its_deadlines_keep_their_distance() {
        let t0 = Instant::now();
        let crash = || M::Exited {
            how: super::super::policy::ChildExit::Code(ExitCode::GuestCrash),
            oom: None,
        };
        let cases: Vec<(&str, Vec<M>)> = vec![
            ("new", vec![]),
            (
                "starting",
                vec![
                    M::Start,
                    M::Spawned {
                        pid: 7,
                        channel: true,
                    },
                ],
            ),
            (
                "running",
                vec![
                    M::Start,
                    M::Spawned {
                        pid: 7,
                        channel: true,
                    },
                    M::Timer,
                ],
            ),
            (
                "backoff after two crashes",
                vec![
                    M::Start,
                    M::Spawned {
                        pid: 7,
                        channel: true,
                    },
                    crash(),
                    M::Timer,
                    M::Spawned {
                        pid: 8,
                        channel: true,
                    },
                    crash(),
                ],
            ),
            (
                "stopping for a replacement",
                vec![
                    M::Start,
                    M::Spawned {
                        pid: 7,
                        channel: true,
                    },
                    M::Timer,
                    M::Reload(Box::new(spec("m2"))),
                ],
            ),
            (
                "stopping, fleet stop",
                vec![
                    M::Start,
                    M::Spawned {
                        pid: 7,
                        channel: true,
                    },
                    M::Timer,
                    M::StopAll,
                ],
            ),
        ];
        let running = || {
            vec![
                M::Start,
                M::Spawned {
                    pid: 7,
                    channel: true,
                },
                M::Timer,
            ]
        };
        use machine::Command as C;
        let mut machines: Vec<(&str, Machine)> = cases
            .into_iter()
            .map(|(what, events)| (what, driven(events, t0)))
            .collect();
        machines.push(("paused", driven_with(running(), &[C::Pause], t0)));
        machines.push((
            "stopping, Ctrl-Alt-Del asked",
            driven_with(running(), &[C::Stop], t0),
        ));
        let mut stopped = driven_with(running(), &[C::Stop], t0);
        stopped.on_event(
            M::Exited {
                how: super::super::policy::ChildExit::Code(ExitCode::GuestPoweroff),
                oom: None,
            },
            t0 + Duration::from_secs(9),
        );
        machines.push(("stopped by the user", stopped));
        let later = t0 + Duration::from_secs(3600);
        for (what, m) in machines {
            let now = t0 + Duration::from_secs(30);
            let json = handover::at(now, || serde_json::to_string(&m)).unwrap();
            // Read an hour later: every deadline as far from the reading as it was from
            // the writing.
            let back: Machine = handover::at(later, || serde_json::from_str(&json)).unwrap();
            let shift = |t: Option<Instant>| {
                t.map(|t| {
                    if t >= now {
                        later + (t - now)
                    } else {
                        later - (now - t)
                    }
                })
            };
            assert_eq!(back.deadline(), shift(m.deadline()), "{what}: {json}");
            assert_eq!(back.restarts(), m.restarts(), "{what}");
            assert_eq!(back.last_exit(), m.last_exit(), "{what}");
            assert_eq!(back.pid(), m.pid(), "{what}");
            assert_eq!(back.vm_state(), m.vm_state(), "{what}");
            assert_eq!(back.spec(), m.spec(), "{what}");
            // The state itself, read at the moment of writing: identical.
            let same: Machine = handover::at(now, || serde_json::from_str(&json)).unwrap();
            assert_eq!(same.state(), m.state(), "{what}");
            let expect = match what {
                "paused" => matches!(same.state(), State::Paused { pid: 7 }),
                "stopped by the user" => *same.state() == State::StoppedByUser,
                w if w.starts_with("stopping") => {
                    matches!(same.state(), State::Stopping { pid: 7, .. })
                }
                _ => true,
            };
            assert!(expect, "{what}: {:?}", same.state());
        }
    }

    #[test]
    fn the_control_listener_is_served_at_the_path_it_is_bound_to() {
        // The old program bound LOG_DIR/control.sock at `up`; a reload then moved
        // log_dir. The new program must serve (and at exit remove) the socket where it
        // is, not the default its settings give now: ControlServer::start_adopting at
        // the new default fails its stat, the listener is dropped, and the fleet runs
        // on without a control socket.
        use std::os::fd::IntoRawFd;
        let dir = std::env::temp_dir().join(format!("vmm-fleet-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bound = dir.join("old-logs-control.sock");
        let _ = std::fs::remove_file(&bound);
        let fd = std::os::unix::net::UnixListener::bind(&bound)
            .unwrap()
            .into_raw_fd();
        let moved = dir.join("new-logs");
        let doc = Document {
            format: handover::FORMAT,
            written_by: "test".into(),
            exe: "/nonexistent/vmm-fleet".into(),
            args: Vec::new(),
            source: SourceDoc {
                dir: "/nonexistent".into(),
                settings: None,
                default_log_dir: moved.clone(),
                host_memory_mib: None,
            },
            settings: FleetSettings::defaults(moved.clone()),
            vms: Vec::new(),
            strays: Vec::new(),
            reload_pending: false,
            pending_signals: Vec::new(),
            tickets: 0,
            cgroups: None,
            output: None,
            marks: None,
            metrics: None,
            control: Some(HeldListener {
                fd,
                wanted: bound.display().to_string(),
            }),
            started_unix: None,
            reexecs: 0,
        };
        let spawner = super::super::spawn::ProcessSpawner::new("/nonexistent".into());
        let (sup, resumed) = Supervisor::resume(doc, spawner, EventLog::default());
        let (listener, path) = resumed.control.expect("the control listener adopted");
        assert_eq!(listener.as_raw_fd(), fd);
        assert_eq!(path, bound);
        assert_ne!(
            crate::control::server_socket(None, &sup.settings().log_dir),
            bound,
            "the settings' default moved"
        );
        let (tx, _rx) = std::sync::mpsc::channel();
        let server = super::super::control::ControlServer::start_adopting(
            &path,
            listener,
            tx,
            Arc::new(super::super::console::Consoles::default()),
            Arc::new(|_, _| {}),
        )
        .expect("served where it is bound");
        assert_eq!(server.path(), bound);
        server.remove();
        assert!(!bound.exists(), "removed at exit: the socket file itself");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_exec_gives_back_the_signals_and_the_reload_it_took_off_the_channel() {
        // Just before the exec, what is queued is taken off the event channel for the new
        // program: signals (into the document) and a finished reload's result (dropped:
        // the new program loads again). When the exec fails the old program carries on,
        // and must have them back: a SIGTERM (`systemctl stop` during an upgrade) was
        // lost, and the reload stayed `Loading` with no loader thread left, so every
        // later SIGHUP and `vmm-fleet reload` queued behind it and none ever ran.
        let log_dir = std::path::PathBuf::from("/nonexistent/log");
        let source = FleetSource {
            dir: "/nonexistent".into(),
            settings: None,
            default_log_dir: log_dir.clone(),
            host_memory_mib: None,
        };
        let spawner = super::super::spawn::ProcessSpawner::new("/nonexistent".into());
        let settings = FleetSettings::defaults(log_dir.clone());
        let mut sup = Supervisor::new(
            source,
            settings.clone(),
            Vec::new(),
            spawner,
            EventLog::default(),
        )
        .with_reexec(ReexecContext {
            exe: "/nonexistent/vmm-fleet".into(),
            args: Vec::new(),
            exporter: None,
            control: None,
            signals: None,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        sup.events = Some(tx.clone());
        // A reload under way, a reload request waiting for it; its result and a SIGTERM
        // are queued when the reexec begins.
        sup.reload = super::super::ReloadState::Loading;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        sup.reload_waiters.push(reply);
        tx.send(Event::Loaded(Box::new(Ok((settings, Vec::new())))))
            .unwrap();
        tx.send(Event::Signal(libc::SIGTERM)).unwrap();
        let r = sup.exec_checked("/nonexistent/vmm-fleet".into(), &rx);
        assert!(matches!(r, Err(ReexecError::Exec { .. })), "{r:?}");
        assert_eq!(
            sup.reload,
            super::super::ReloadState::Idle,
            "the load applied"
        );
        let a = answer.try_recv().expect("the reload request answered");
        assert!(a.ok, "{a:?}");
        assert!(
            sup.stopping,
            "the SIGTERM taken for the new program is handled"
        );
    }

    #[test]
    fn a_previous_resume_fd_is_not_passed_on() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            strip_resume(a(&["up", "d", "--resume-fd", "7", "--x", "--resume-fd=9"])),
            a(&["up", "d", "--x"])
        );
    }
}
