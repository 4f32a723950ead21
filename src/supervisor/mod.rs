//! The fleet supervisor: one child process per VM, reaped on SIGCHLD, restarted under
//! each VM's policy, stopped cleanly on SIGTERM/SIGINT, reloaded on SIGHUP.
//!
//! The loop waits on one channel of [`Event`]s, fed by a signal thread (signal-hook) and
//! by the worker thread of a reload (whose reading of the directory, whatever it holds,
//! never delays signals and reaping), with a timeout set to the next timer (a backoff,
//! a settle time, a kill deadline, systemd's watchdog): no polling. Children's output
//! goes to the output thread ([`output`]), never through the loop.

pub mod cgroup;
pub mod output;
pub mod policy;
pub mod spawn;
mod table;
pub mod watchdog;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{ConfigError, FleetSettings, VmSpec, load_fleet};
use crate::metrics::counters::SharedTable;
use crate::metrics::exporter::{FleetMetrics, VmSnapshot};
use policy::{ChildExit, Decision, Restarter, VmState};
use spawn::{SpawnRequest, Spawner};

/// Where the supervisor finds its fleet.
#[derive(Debug, Clone)]
pub struct FleetSource {
    /// The directory of VM files.
    pub dir: PathBuf,
    /// An explicit settings file (else `DIR/fleet.yaml` if it exists).
    pub settings: Option<PathBuf>,
    /// The log directory when the settings name none.
    pub default_log_dir: PathBuf,
    /// The host's memory in MiB, for the total-memory check.
    pub host_memory_mib: Option<u64>,
}

impl FleetSource {
    /// Load and validate settings and every VM file.
    pub fn load(&self) -> Result<(FleetSettings, Vec<VmSpec>), ConfigError> {
        load_fleet(
            &self.dir,
            self.settings.as_deref(),
            self.default_log_dir.clone(),
            self.host_memory_mib,
        )
    }
}

/// Writes one line per event: plain in a terminal, with a syslog priority prefix
/// (which journald understands) otherwise.
pub struct EventLog {
    tty: bool,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            tty: std::io::stderr().is_terminal(),
        }
    }
}

impl EventLog {
    /// Log `msg` at syslog priority `prio` (3 error, 4 warning, 6 info).
    pub fn line(&self, prio: u8, msg: &str) {
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            writeln!(err, "vmm-fleet: {msg}")
        } else {
            writeln!(err, "<{prio}>{msg}")
        };
    }

    /// A VM's state change.
    pub fn vm(&self, prio: u8, name: &str, msg: &str) {
        self.line(prio, &format!("vm {name}: {msg}"));
    }
}

/// One VM under supervision.
struct Vm {
    spec: VmSpec,
    restarter: Restarter,
    pid: Option<u32>,
    start_at: Option<Instant>,
    running_at: Option<Instant>,
    kill_at: Option<Instant>,
    /// Stop it and forget it (its file was removed).
    removed: bool,
    /// Its file changed: start this spec once the old child is gone.
    replace_with: Option<VmSpec>,
    last_exit: Option<ChildExit>,
    /// Its exit counters, shared with each child; they outlive the children.
    table: Option<SharedTable>,
    start_unix: Option<f64>,
    /// Restarts of earlier versions of this VM (before its file was edited).
    restarts_base: u64,
}

impl Vm {
    /// The same VM with an edited spec: its counter table and restart count carry over
    /// (the restart for the edit counts as one).
    fn replaced(&mut self, spec: VmSpec) -> Self {
        let mut vm = Self::with_table(spec, self.table.take());
        vm.restarts_base = self.restarts_base + self.restarter.starts();
        vm
    }

    fn restarts(&self) -> u64 {
        self.restarts_base + self.restarter.restarts()
    }

    fn new(spec: VmSpec, log: &EventLog) -> Self {
        let table = table::create(&spec.name, log);
        Self::with_table(spec, table)
    }

    fn with_table(spec: VmSpec, table: Option<SharedTable>) -> Self {
        Vm {
            table,
            start_unix: None,
            restarts_base: 0,
            restarter: Restarter::new(spec.restart),
            spec,
            pid: None,
            start_at: None,
            running_at: None,
            kill_at: None,
            removed: false,
            replace_with: None,
            last_exit: None,
        }
    }
}

/// What the event loop waits for, on one channel.
pub enum Event {
    /// A signal, from the signal thread.
    Signal(i32),
    /// A reload's load, finished on its worker thread.
    Loaded(Box<Result<(FleetSettings, Vec<VmSpec>), ConfigError>>),
}

/// Where a reload stands: its load runs off the event loop, so that reading a
/// directory (whatever it holds) never delays signals and reaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReloadState {
    Idle,
    Loading,
    /// Loading, and another SIGHUP came meanwhile: load again once this one is done.
    LoadingAndAgain,
}

/// A snapshot of one VM, for status output and metrics.
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// Child pid, if running.
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u64,
    /// The last exit, if any.
    pub last_exit: Option<ChildExit>,
}

/// The supervisor.
pub struct Supervisor<S: Spawner> {
    source: FleetSource,
    settings: FleetSettings,
    vms: BTreeMap<String, Vm>,
    spawner: S,
    log: EventLog,
    stopping: bool,
    metrics: Option<Arc<FleetMetrics>>,
    last_status: String,
    /// The thread writing every child's console and log (None: not captured).
    output: Option<output::OutputHub>,
    /// A reload's load runs on a worker thread; another SIGHUP meanwhile is queued here.
    reload: ReloadState,
    /// Where loader threads send their result (set by `run`).
    events: Option<Sender<Event>>,
    cgroups: cgroup::FleetCgroups,
    /// Called by a reload whose settings change `metrics_address`.
    on_metrics_address: Option<Box<dyn FnMut(std::net::SocketAddr) + Send>>,
}

/// Every state name, for the exporter.
pub const STATE_NAMES: [&str; 6] = [
    VmState::ALL[0].as_str(),
    VmState::ALL[1].as_str(),
    VmState::ALL[2].as_str(),
    VmState::ALL[3].as_str(),
    VmState::ALL[4].as_str(),
    VmState::ALL[5].as_str(),
];

fn fmt_delay(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl<S: Spawner> Supervisor<S> {
    /// A supervisor for an already validated fleet.
    pub fn new(
        source: FleetSource,
        settings: FleetSettings,
        specs: Vec<VmSpec>,
        spawner: S,
        log: EventLog,
    ) -> Self {
        let vms = specs
            .into_iter()
            .map(|s| (s.name.clone(), Vm::new(s, &log)))
            .collect();
        Supervisor {
            source,
            settings,
            vms,
            spawner,
            log,
            stopping: false,
            metrics: None,
            last_status: String::new(),
            output: None,
            reload: ReloadState::Idle,
            events: None,
            cgroups: cgroup::FleetCgroups::disabled(),
            on_metrics_address: None,
        }
    }

    /// Capture every child's stdout and stderr through `hub` (size cap, rotation, rate
    /// limit).
    pub fn with_output(mut self, hub: output::OutputHub) -> Self {
        self.output = Some(hub);
        self
    }

    /// Put each VM child in a cgroup of its own (see [`cgroup`]). Without a writable
    /// hierarchy, says so once and runs the VMs without limits.
    pub fn with_cgroups(mut self) -> Self {
        match cgroup::FleetCgroups::setup() {
            Ok(c) => {
                self.log.line(6, &c.describe());
                self.cgroups = c;
            }
            Err(e) => self.log.line(
                4,
                &format!("cgroups: {e}; VMs run without memory, pids or CPU limits"),
            ),
        }
        self
    }

    /// Publish state to `metrics` after every change.
    pub fn with_metrics(mut self, metrics: Arc<FleetMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Call `f` with the new address when a reload changes `metrics_address`.
    pub fn on_metrics_address_change(
        mut self,
        f: impl FnMut(std::net::SocketAddr) + Send + 'static,
    ) -> Self {
        self.on_metrics_address = Some(Box::new(f));
        self
    }

    fn publish(&mut self) {
        if let Some(m) = &self.metrics {
            let snap = self
                .vms
                .iter()
                .map(|(name, vm)| VmSnapshot {
                    name: name.clone(),
                    up: vm.pid.is_some(),
                    state: vm.restarter.state().as_str(),
                    restarts: vm.restarts(),
                    start_time: vm.start_unix,
                    last_exit_code: vm.last_exit.map(|e| match e {
                        ChildExit::Code(c) => i64::from(c),
                        ChildExit::Signal(s) => 128 + i64::from(s),
                    }),
                    memory_bytes: vm.spec.memory_mib << 20,
                    vcpus: u64::from(vm.spec.vcpus),
                    counters: vm.table.as_ref().map(|t| t.counters().clone()),
                    console_dropped: self.output.as_ref().map(|o| o.dropped_counter(name)),
                })
                .collect();
            m.update(snap);
        }
        // systemd's STATUS= line (a no-op without NOTIFY_SOCKET).
        let count = |st: &[VmState]| {
            self.vms
                .values()
                .filter(|v| st.contains(&v.restarter.state()))
                .count()
        };
        let status = format!(
            "{} running, {} restarting, {} failed",
            count(&[VmState::Running, VmState::Starting]),
            count(&[VmState::Backoff]),
            count(&[VmState::Failed])
        );
        if status != self.last_status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }

    /// Every VM's state.
    pub fn status(&self) -> Vec<VmStatus> {
        self.vms
            .iter()
            .map(|(name, vm)| VmStatus {
                name: name.clone(),
                state: vm.restarter.state(),
                pid: vm.pid,
                restarts: vm.restarts(),
                last_exit: vm.last_exit,
            })
            .collect()
    }

    /// Start every VM, then serve signals until a SIGTERM/SIGINT stop completes.
    /// Returns the process exit code.
    ///
    /// `events` carries signals (from a signal thread) and reload results (sent on
    /// `sender` by the loader threads this starts).
    pub fn run(&mut self, events: &Receiver<Event>, sender: &Sender<Event>) -> i32 {
        self.events = Some(sender.clone());
        let now = Instant::now();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            self.start(&name, now);
        }
        self.publish();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // systemd's watchdog (WatchdogSec=) is armed once READY=1 is sent.
        let mut watchdog = watchdog::Watchdog::from_env(Instant::now());
        loop {
            if let Some(w) = watchdog.as_mut() {
                w.ping_if_due(Instant::now());
            }
            let next = watchdog::earliest(self.next_deadline(), watchdog.as_ref());
            let timeout = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match events.recv_timeout(timeout) {
                Ok(Event::Signal(sig)) => self.on_signal(sig),
                Ok(Event::Loaded(loaded)) => self.on_loaded(*loaded),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if !self.stopping {
                        self.log.line(3, "signal thread gone; stopping the fleet");
                        self.begin_stop();
                    }
                    std::thread::sleep(timeout.min(Duration::from_millis(10)));
                }
            }
            self.reap();
            self.on_timers(Instant::now());
            self.publish();
            if self.stopping && self.vms.values().all(|v| v.pid.is_none()) {
                for dir in self.cgroups.remove_all() {
                    self.log
                        .line(4, &format!("cgroup {} not removed", dir.display()));
                }
                self.log.line(6, "every VM stopped; exiting");
                return 0;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.vms
            .values()
            .flat_map(|v| [v.start_at, v.running_at, v.kill_at])
            .flatten()
            .chain(self.cgroups.next_deadline())
            .min()
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGCHLD => {} // reaped right after
            SIGTERM | SIGINT if !self.stopping => {
                self.log
                    .line(6, &format!("signal {sig}: stopping every VM"));
                self.begin_stop();
            }
            SIGHUP => self.begin_reload(),
            _ => {}
        }
    }

    fn request_stop(&mut self, name: &str, now: Instant) {
        let grace = self.settings.stop_grace;
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.start_at = None;
        vm.restarter.stop_requested();
        // A stop already under way keeps its SIGKILL deadline: asking again (another
        // reload, then the fleet's own stop) must not put it off.
        if let (Some(pid), None) = (vm.pid, vm.kill_at) {
            vm.kill_at = Some(now + grace);
            if let Err(e) = self.spawner.signal(pid, Signal::SIGTERM) {
                self.log.vm(4, name, &format!("SIGTERM to pid {pid}: {e}"));
            }
            self.log.vm(6, name, "stopping");
        }
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        let now = Instant::now();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            self.request_stop(&name, now);
        }
    }

    fn start(&mut self, name: &str, now: Instant) {
        if self.stopping {
            return;
        }
        let settle = self.settings.startup_settle;
        let settings_file = self.settings.source.clone();
        let log_dir = self.settings.log_dir.clone();
        let user = self.settings.vm_user.clone();
        let limits = output::Limits::from_settings(&self.settings);
        let seccomp = self.settings.seccomp;
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.start_at = None;
        table::prepare(name, usize::from(vm.spec.vcpus), &mut vm.table, &self.log);
        let cgroup = self
            .cgroups
            .prepare(&vm.spec, self.settings.cgroup_overhead_mib);
        let req = SpawnRequest {
            spec: &vm.spec,
            settings: settings_file.as_deref(),
            log_dir: &log_dir,
            counters: vm.table.as_ref().map(|t| t.fd()),
            user: user.as_ref(),
            output: self.output.as_ref().map(|o| (o, limits)),
            cgroup: cgroup.as_ref().ok().and_then(Option::as_ref),
            seccomp,
        };
        let spawned = match &cgroup {
            Ok(_) => self.spawner.spawn(&req),
            Err(e) => Err(std::io::Error::other(format!("cgroup: {e}"))),
        };
        match spawned {
            Ok(pid) => {
                vm.pid = Some(pid);
                vm.start_unix = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64());
                vm.restarter.started(now);
                vm.running_at = Some(now + settle);
                self.log.vm(6, name, &format!("starting (pid {pid})"));
            }
            Err(e) => {
                self.log.vm(3, name, &format!("cannot start: {e}"));
                self.cgroups.exited(name, now);
                vm.restarter.started(now);
                self.after_exit(name, ChildExit::Code(5), now);
            }
        }
    }

    /// Reap every child that has exited.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.log.line(3, &format!("waitpid: {e}"));
                    return;
                }
                Ok(s) => s,
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, ChildExit::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, ChildExit::Signal(sig as i32)),
                _ => continue,
            };
            let pid = pid.as_raw() as u32;
            let name = self
                .vms
                .iter()
                .find(|(_, v)| v.pid == Some(pid))
                .map(|(n, _)| n.clone());
            if let Some(name) = name {
                self.on_exit(&name, how, Instant::now());
            }
        }
    }

    fn on_exit(&mut self, name: &str, how: ChildExit, now: Instant) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.pid = None;
        vm.kill_at = None;
        vm.running_at = None;
        vm.last_exit = Some(how);
        if let Some(oom) = self.cgroups.exited(name, now) {
            self.log.vm(3, name, &oom);
        }
        let expected = matches!(how, ChildExit::Code(0) | ChildExit::Code(6));
        self.log.vm(
            if expected { 6 } else { 4 },
            name,
            &format!("exited: {}", how.describe()),
        );
        if how.is_seccomp_violation() {
            // A crash like any death by signal (restarted by policy), but say why.
            self.log.vm(3, name, "seccomp violation (killed by SIGSYS)");
        }
        self.after_exit(name, how, now);
    }

    fn after_exit(&mut self, name: &str, how: ChildExit, now: Instant) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.removed {
            self.vms.remove(name);
            self.log.vm(6, name, "removed");
            return;
        }
        if let Some(spec) = vm.replace_with.take() {
            *vm = vm.replaced(spec);
            self.log
                .vm(6, name, "configuration changed; starting again");
            self.start(name, now);
            return;
        }
        match vm.restarter.exited(how, now) {
            Decision::RestartAfter(d) if d.is_zero() => {
                // Started by the timer pass that follows, never from here: a child that
                // cannot even be spawned must not recurse start -> exit -> start.
                vm.start_at = Some(now);
                self.log.vm(6, name, "restarting now");
            }
            Decision::RestartAfter(d) => {
                vm.start_at = Some(now + d);
                self.log
                    .vm(6, name, &format!("restarting in {}", fmt_delay(d)));
            }
            Decision::StayDown => self.log.vm(6, name, "stopped"),
            Decision::Failed => {
                let r = vm.spec.restart;
                self.log.vm(
                    3,
                    name,
                    &format!(
                        "failed: {} starts within {} s (start limit); left down",
                        r.start_limit_burst, r.start_limit_interval_s
                    ),
                );
            }
        }
    }

    fn on_timers(&mut self, now: Instant) {
        self.cgroups.on_timer(now);
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let Some(vm) = self.vms.get_mut(&name) else {
                continue;
            };
            if vm.start_at.is_some_and(|t| t <= now) && vm.pid.is_none() {
                self.start(&name, now);
                continue;
            }
            if vm.running_at.is_some_and(|t| t <= now) {
                vm.running_at = None;
                if vm.pid.is_some() && vm.restarter.state() == VmState::Starting {
                    vm.restarter.running();
                    self.log.vm(6, &name, "running");
                }
            }
            if let (Some(t), Some(pid)) = (vm.kill_at, vm.pid)
                && t <= now
            {
                vm.kill_at = None;
                let _ = self.spawner.signal(pid, Signal::SIGKILL);
                self.log
                    .vm(4, &name, "did not stop within the grace period: SIGKILL");
            }
        }
    }

    /// SIGHUP: load the directory on a worker thread; its result comes back as
    /// [`Event::Loaded`]. A SIGHUP while a load runs queues one more.
    fn begin_reload(&mut self) {
        match self.reload {
            ReloadState::Idle => {}
            ReloadState::Loading | ReloadState::LoadingAndAgain => {
                self.reload = ReloadState::LoadingAndAgain;
                return;
            }
        }
        let Some(tx) = self.events.clone() else {
            self.reload();
            return;
        };
        let source = self.source.clone();
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                let _ = tx.send(Event::Loaded(Box::new(source.load())));
            });
        match spawned {
            Ok(_) => self.reload = ReloadState::Loading,
            Err(e) => self
                .log
                .line(3, &format!("reload refused: cannot start the loader: {e}")),
        }
    }

    fn on_loaded(&mut self, loaded: Result<(FleetSettings, Vec<VmSpec>), ConfigError>) {
        let again = self.reload == ReloadState::LoadingAndAgain;
        self.reload = ReloadState::Idle;
        if self.stopping {
            return;
        }
        self.apply_reload(loaded);
        if again {
            self.begin_reload();
        }
    }

    /// Re-read the directory on this thread and apply it (see [`Supervisor::apply_reload`]).
    pub fn reload(&mut self) {
        let loaded = self.source.load();
        self.apply_reload(loaded);
    }

    /// Apply a loaded directory: start added VMs, stop removed ones, restart changed
    /// ones, leave the rest alone. A bad directory changes nothing.
    pub fn apply_reload(&mut self, loaded: Result<(FleetSettings, Vec<VmSpec>), ConfigError>) {
        let loaded = loaded.and_then(|(settings, specs)| {
            // A fleet may start empty, but a reload that would stop every VM because
            // the directory lost all its files (a bad deploy, an unmounted volume) is
            // refused: `vmm-fleet stop` / `systemctl stop` stop a fleet on purpose.
            if specs.is_empty() && !self.vms.is_empty() {
                return Err(ConfigError::NoConfigs {
                    dir: self.source.dir.clone(),
                });
            }
            Ok((settings, specs))
        });
        let (settings, specs) = match loaded {
            Ok(x) => x,
            Err(e) => {
                self.log.line(3, "reload refused, nothing changed:");
                for line in e.to_string().lines() {
                    self.log.line(3, &format!("  {line}"));
                }
                return;
            }
        };
        if settings.metrics_address != self.settings.metrics_address
            && let Some(f) = &mut self.on_metrics_address
        {
            f(settings.metrics_address);
        }
        self.settings = settings;
        let now = Instant::now();
        let mut new: BTreeMap<String, VmSpec> =
            specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        let (mut added, mut removed, mut changed) = (0, 0, 0);
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            match new.remove(&name) {
                None => {
                    removed += 1;
                    let running = self.vms.get(&name).is_some_and(|v| v.pid.is_some());
                    if running {
                        if let Some(vm) = self.vms.get_mut(&name) {
                            vm.removed = true;
                        }
                        self.request_stop(&name, now);
                    } else {
                        self.vms.remove(&name);
                        self.log.vm(6, &name, "removed");
                    }
                }
                Some(spec) => {
                    let Some(vm) = self.vms.get_mut(&name) else {
                        continue;
                    };
                    if vm.removed {
                        // Removed, and back before its child was gone: start it again
                        // once it is.
                        vm.removed = false;
                        vm.replace_with = Some(spec);
                        changed += 1;
                        continue;
                    }
                    if vm.spec == spec && vm.replace_with.is_none() {
                        continue;
                    }
                    changed += 1;
                    if vm.pid.is_some() {
                        vm.replace_with = Some(spec);
                        vm.removed = false;
                        self.request_stop(&name, now);
                    } else {
                        *vm = vm.replaced(spec);
                        self.log.vm(6, &name, "configuration changed");
                        self.start(&name, now);
                    }
                }
            }
        }
        for (name, spec) in new {
            added += 1;
            self.vms.insert(name.clone(), Vm::new(spec, &self.log));
            self.start(&name, now);
        }
        self.log.line(
            6,
            &format!("reload: {added} added, {removed} removed, {changed} changed"),
        );
    }
}
