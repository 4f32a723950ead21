//! The fleet supervisor: one child process per VM, reaped on SIGCHLD, restarted under
//! each VM's policy, stopped cleanly on SIGTERM/SIGINT, reloaded on SIGHUP, and replaced
//! by its own binary on SIGUSR2 or `reexec` with every VM running ([`reexec`]: at the end
//! of a loop round the loop hands its state over and execs).
//!
//! The loop waits on one channel of [`Event`]s, fed by a signal thread (signal-hook), by
//! the worker thread of a reload (whose reading of the directory, whatever it holds,
//! never delays signals and reaping), by the spawner threads ([`pool`]: the fork and
//! exec of thousands of children never delay them either) and by the control socket's
//! connection threads ([`control`]: a request arrives whole and validated and is
//! answered on its own channel, so no client ever blocks the loop), with a timeout set
//! to the next timer (a backoff, a settle time, a stop phase, systemd's watchdog): no
//! polling. Children's output goes to the output thread ([`output`]), never through the
//! loop.
//!
//! Each VM's lifecycle is its state machine's ([`machine`]): the loop only turns OS
//! events (a reaped child with its typed exit, a due timer, a reload's result, a stop,
//! a user's command) into machine events, and the machine's actions into syscalls
//! (spawn, kill, a message on the child's control channel, log). Every
//! handler takes the time as an argument, so the whole loop is tested with a fake
//! spawner and a fake clock (`tests.rs`).

pub mod cgroup;
pub mod channel;
pub mod console;
pub mod control;
pub mod handover;
pub mod machine;
pub mod output;
pub mod policy;
pub mod pool;
pub mod reexec;
pub mod spawn;
mod table;
pub mod watchdog;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR2};

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{ConfigError, FleetSettings, VmSpec, load_fleet};
use crate::control::{Command as WireCommand, ReloadReport, Response as WireResponse, VmInfo};
use crate::metrics::counters::SharedTable;
use crate::metrics::exporter::{FleetMetrics, VmSnapshot};
use machine::{Action, Machine, Timing};
use policy::{ChildExit, VmState};
use spawn::{SpawnRequest, Spawner};

/// Where the supervisor finds its fleet.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Tests: every line goes here (as in a terminal, without the prefix) instead.
    #[cfg(test)]
    captured: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            tty: std::io::stderr().is_terminal(),
            #[cfg(test)]
            captured: None,
        }
    }
}

impl EventLog {
    /// Log `msg` at syslog priority `prio` (3 error, 4 warning, 6 info).
    pub fn line(&self, prio: u8, msg: &str) {
        #[cfg(test)]
        if let Some(c) = &self.captured {
            c.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(msg.to_string());
            return;
        }
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

/// One VM under supervision: its state machine, and what outlives its children.
struct Vm {
    machine: Machine,
    /// Its exit counters, shared with each child; they outlive the children (and edits).
    table: Option<SharedTable>,
    start_unix: Option<f64>,
    /// The ticket of the spawn asked of the spawner threads and not answered yet.
    pending: Option<u64>,
    /// The current child's control channel (None: no child, or one without a channel).
    channel: Option<Arc<channel::ChildChannel>>,
}

impl Vm {
    fn new(spec: VmSpec, timing: Timing, log: &EventLog) -> Self {
        let table = table::create(&spec.name, log);
        Vm {
            machine: Machine::new(spec, timing),
            table,
            start_unix: None,
            pending: None,
            channel: None,
        }
    }
}

fn timing(settings: &FleetSettings) -> Timing {
    Timing {
        stop_grace: settings.stop_grace,
        startup_settle: settings.startup_settle,
    }
}

/// What the event loop waits for, on one channel.
pub enum Event {
    /// A signal, from the signal thread.
    Signal(i32),
    /// A reload's load, finished on its worker thread.
    Loaded(Box<Result<(FleetSettings, Vec<VmSpec>), ConfigError>>),
    /// A spawner thread's answer ([`pool`]).
    Spawned(Box<pool::Done>),
    /// A request from the control socket ([`control`]), answered on its channel.
    Control(Box<control::ControlRequest>),
}

/// Most events the loop takes in one round before it reaps, runs timers and publishes.
const EVENT_BATCH: usize = 256;

/// While spawns are under way, the most often the loop publishes.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

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
    output: Option<Arc<output::OutputHub>>,
    /// A reload's load runs on a worker thread; another SIGHUP meanwhile is queued here.
    reload: ReloadState,
    /// Where loader threads send their result (set by `run`).
    events: Option<Sender<Event>>,
    cgroups: cgroup::FleetCgroups,
    /// Called by a reload whose settings change `metrics_address`.
    on_metrics_address: Option<Box<dyn FnMut(std::net::SocketAddr) + Send>>,
    /// The spawner threads (None: spawns run on the loop, as the tests' fake clock wants).
    pool: Option<pool::Pool>,
    /// Spawn tickets handed out so far.
    tickets: u64,
    /// Spawns asked of the threads and not answered yet.
    in_flight: usize,
    /// Children nobody wants any more (their answer came late), killed, not reaped yet.
    strays: HashMap<u32, String>,
    /// Exits of children whose spawn answer has not been read yet.
    parked: HashMap<u32, ChildExit>,
    /// `reload` requests answered when the load under way is applied.
    reload_waiters: Vec<SyncSender<WireResponse>>,
    /// `reload` requests that came during a load: answered after the next one.
    reload_waiters_next: Vec<SyncSender<WireResponse>>,
    /// What reexec needs (None: reexec is refused).
    reexec: Option<reexec::ReexecContext>,
    /// A reexec was asked for and checked: the loop execs at the end of this round.
    reexec_requested: bool,
    /// Set when this supervisor was handed over by a reexec (see [`reexec`]).
    resumed: Option<ResumeState>,
    /// When the fleet was first started (Unix seconds), across reexecs.
    started_unix: Option<f64>,
    /// Reexecs since `up` started the fleet.
    reexecs: u64,
}

/// What a resumed supervisor does first.
#[derive(Debug)]
struct ResumeState {
    /// A reload was under way in the old program: load again.
    reload: bool,
    /// Signals the old program had taken off its channel and not handled.
    signals: Vec<i32>,
}

/// Every state name, for the exporter.
pub const STATE_NAMES: [&str; 8] = [
    VmState::ALL[0].as_str(),
    VmState::ALL[1].as_str(),
    VmState::ALL[2].as_str(),
    VmState::ALL[3].as_str(),
    VmState::ALL[4].as_str(),
    VmState::ALL[5].as_str(),
    VmState::ALL[6].as_str(),
    VmState::ALL[7].as_str(),
];

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
            .map(|s| (s.name.clone(), Vm::new(s, timing(&settings), &log)))
            .collect();
        let mut sup = Self::empty(source, settings, spawner, log);
        sup.vms = vms;
        sup.started_unix = unix_now();
        sup
    }

    /// A supervisor without VMs.
    fn empty(source: FleetSource, settings: FleetSettings, spawner: S, log: EventLog) -> Self {
        Supervisor {
            source,
            settings,
            vms: BTreeMap::new(),
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
            pool: None,
            tickets: 0,
            in_flight: 0,
            strays: HashMap::new(),
            parked: HashMap::new(),
            reload_waiters: Vec::new(),
            reload_waiters_next: Vec::new(),
            reexec: None,
            reexec_requested: false,
            resumed: None,
            started_unix: None,
            reexecs: 0,
        }
    }

    /// Capture every child's stdout and stderr through `hub` (size cap, rotation, rate
    /// limit).
    pub fn with_output(mut self, hub: output::OutputHub) -> Self {
        self.output = Some(Arc::new(hub));
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
                    up: vm.machine.pid().is_some(),
                    state: vm.machine.vm_state().as_str(),
                    restarts: vm.machine.restarts(),
                    start_time: vm.start_unix,
                    last_exit_code: vm.machine.last_exit().map(|e| e.status_number()),
                    memory_bytes: vm.machine.spec().memory_mib << 20,
                    vcpus: u64::from(vm.machine.spec().vcpus),
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
                .filter(|v| st.contains(&v.machine.vm_state()))
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

    /// The fleet settings in force.
    pub fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    /// Every VM's state.
    pub fn status(&self) -> Vec<VmStatus> {
        self.vms
            .iter()
            .map(|(name, vm)| VmStatus {
                name: name.clone(),
                state: vm.machine.vm_state(),
                pid: vm.machine.pid(),
                restarts: vm.machine.restarts(),
                last_exit: vm.machine.last_exit(),
            })
            .collect()
    }

    /// Start every VM, then serve signals until a SIGTERM/SIGINT stop completes.
    /// Returns the process exit code.
    ///
    /// `events` carries signals (from a signal thread) and reload results (sent on
    /// `sender` by the loader threads this starts).
    ///
    /// A supervisor handed over by a reexec ([`Supervisor::resume`]) starts nothing: it
    /// reaps the children that died during the exec and carries on.
    pub fn run(&mut self, events: &Receiver<Event>, sender: &Sender<Event>) -> i32 {
        self.events = Some(sender.clone());
        // Children this program did not spawn (handed over at a reexec) take console
        // input too.
        if let Some(o) = &self.output {
            for (name, vm) in &self.vms {
                o.consoles().set_channel(name, vm.channel.as_ref());
            }
        }
        match self.resumed.take() {
            None => self.start_all(Instant::now()),
            Some(r) => {
                self.reap();
                for sig in r.signals {
                    self.on_signal(sig);
                }
                if r.reload {
                    self.begin_reload();
                }
            }
        }
        self.publish();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // systemd's watchdog (WatchdogSec=) is armed once READY=1 is sent.
        let mut watchdog = watchdog::Watchdog::from_env(Instant::now());
        let mut published = Instant::now();
        loop {
            if let Some(w) = watchdog.as_mut() {
                w.ping_if_due(Instant::now());
            }
            let next = watchdog::earliest(self.next_deadline(), watchdog.as_ref());
            let timeout = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match events.recv_timeout(timeout) {
                Ok(event) => {
                    self.on_loop_event(event);
                    // What else is queued (a burst of spawn answers at start-up) goes in
                    // the same round: one reap and one publish for the batch, not one
                    // per event (a publish walks every VM).
                    for event in events.try_iter().take(EVENT_BATCH) {
                        self.on_loop_event(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if !self.stopping {
                        self.log.line(3, "signal thread gone; stopping the fleet");
                        self.begin_stop(Instant::now());
                    }
                    std::thread::sleep(timeout.min(Duration::from_millis(10)));
                }
            }
            self.reap();
            self.on_timers(Instant::now());
            // While spawns are under way (thousands at start-up, answered one by one),
            // at most one publish (a walk over every VM) per PUBLISH_EVERY; the last
            // answer publishes for sure.
            if self.in_flight == 0 || published.elapsed() >= PUBLISH_EVERY {
                self.publish();
                published = Instant::now();
            }
            // Returns only if the reexec was refused or failed (logged).
            self.reexec_if_requested(events);
            if self.all_stopped() {
                for dir in self.cgroups.remove_all() {
                    self.log
                        .line(4, &format!("cgroup {} not removed", dir.display()));
                }
                self.log.line(6, "every VM stopped; exiting");
                return 0;
            }
        }
    }

    fn on_loop_event(&mut self, event: Event) {
        match event {
            Event::Signal(sig) => self.on_signal(sig),
            Event::Loaded(loaded) => self.on_loaded(*loaded),
            Event::Spawned(done) => self.on_spawn_done(*done, Instant::now()),
            Event::Control(req) => self.on_control(*req, Instant::now()),
        }
    }

    /// The fleet is stopping and no child is left.
    fn all_stopped(&self) -> bool {
        self.stopping
            && self.in_flight == 0
            && self.strays.is_empty()
            && self.vms.values().all(|v| v.machine.pid().is_none())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.vms
            .values()
            .filter_map(|v| v.machine.deadline())
            .chain(self.cgroups.next_deadline())
            .min()
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGCHLD => {} // reaped right after
            SIGTERM | SIGINT if !self.stopping => {
                self.log
                    .line(6, &format!("signal {sig}: stopping every VM"));
                self.begin_stop(Instant::now());
            }
            SIGHUP => self.begin_reload(),
            SIGUSR2 => {
                if let Err(e) = self.reexec() {
                    self.log.line(3, &format!("reexec refused: {e}"));
                }
            }
            _ => {}
        }
    }

    /// Feed `event` to VM `name`'s machine and carry out what it asks, feeding back the
    /// outcome of a spawn.
    fn dispatch(&mut self, name: &str, event: machine::Event, now: Instant) {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let Some(vm) = self.vms.get_mut(name) else {
                return;
            };
            let actions = vm.machine.on_event(event, now);
            next = self.carry_out(name, actions, now);
        }
    }

    /// Carry out VM `name`'s machine's `actions`; returns what the machine must hear
    /// next (a spawn's outcome, a failed send), if anything.
    fn carry_out(
        &mut self,
        name: &str,
        actions: Vec<Action>,
        now: Instant,
    ) -> Option<machine::Event> {
        let mut next = None;
        for action in actions {
            match action {
                Action::Log { prio, msg } => self.log.vm(prio, name, &msg),
                Action::Signal { pid, signal } => {
                    if let Err(e) = self.spawner.signal(pid, signal) {
                        self.log
                            .vm(4, name, &format!("{} to pid {pid}: {e}", signal.as_str()));
                    }
                }
                Action::Send(msg) => {
                    if next.is_some() {
                        continue; // an earlier send failed: the machine hears of it first
                    }
                    let channel = self.vms.get(name).and_then(|v| v.channel.clone());
                    let sent = match channel {
                        Some(c) => c.send(&msg),
                        None => Err(std::io::Error::other("no control channel")),
                    };
                    if let Err(e) = sent {
                        next = Some(machine::Event::SendFailed {
                            error: format!("{}: {e}", to_child_name(&msg)),
                        });
                    }
                }
                Action::Spawn => next = self.spawn(name, now),
                Action::Forget => {
                    self.vms.remove(name);
                    if let Some(o) = &self.output {
                        o.consoles().remove(name);
                    }
                }
            }
        }
        next
    }

    fn dispatch_all(&mut self, event: &machine::Event, now: Instant) {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            self.dispatch(&name, event.clone(), now);
        }
    }

    fn start_all(&mut self, now: Instant) {
        self.dispatch_all(&machine::Event::Start, now);
    }

    fn begin_stop(&mut self, now: Instant) {
        self.stopping = true;
        if let Some(p) = &self.pool {
            p.cancel_queued();
        }
        self.dispatch_all(&machine::Event::StopAll, now);
    }

    /// Start a child for VM `name` (its machine asked for one): counter table and cgroup
    /// prepared, then the spawner, on a spawner thread if there are any (the answer
    /// comes as [`Event::Spawned`]: returns None) or here (returns the outcome, for the
    /// machine).
    fn spawn(&mut self, name: &str, now: Instant) -> Option<machine::Event> {
        let settings_file = self.settings.source.clone();
        let log_dir = self.settings.log_dir.clone();
        let user = self.settings.vm_user.clone();
        let limits = output::Limits::from_settings(&self.settings);
        let seccomp = self.settings.seccomp;
        let Some(vm) = self.vms.get_mut(name) else {
            return Some(machine::Event::SpawnFailed {
                error: "unknown VM".into(),
            });
        };
        let spec = vm.machine.spec();
        table::prepare(name, usize::from(spec.vcpus), &mut vm.table, &self.log);
        let cgroup = self
            .cgroups
            .prepare(spec, self.settings.cgroup_overhead_mib);
        let spawned = match (&cgroup, &self.pool) {
            (Err(e), _) => Err(std::io::Error::other(format!("cgroup: {e}"))),
            (Ok(placement), Some(pool)) => {
                let counters = vm
                    .table
                    .as_ref()
                    .map(|t| t.fd().try_clone_to_owned())
                    .transpose();
                match counters {
                    Ok(counters) => {
                        self.tickets += 1;
                        let job = pool::Job {
                            ticket: self.tickets,
                            spec: spec.clone(),
                            settings: settings_file,
                            log_dir,
                            counters,
                            user,
                            output: self.output.clone().map(|o| (o, limits)),
                            cgroup: placement.clone(),
                            seccomp,
                        };
                        match pool.submit(job) {
                            Ok(()) => {
                                vm.pending = Some(self.tickets);
                                self.in_flight += 1;
                                return None;
                            }
                            Err(_) => Err(std::io::Error::other("the spawner threads are gone")),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            (Ok(placement), None) => {
                let req = SpawnRequest {
                    spec,
                    settings: settings_file.as_deref(),
                    log_dir: &log_dir,
                    counters: vm.table.as_ref().map(|t| t.fd()),
                    user: user.as_ref(),
                    output: self.output.as_ref().map(|o| (&**o, limits)),
                    cgroup: placement.as_ref(),
                    seccomp,
                };
                self.spawner.spawn(&req)
            }
        };
        Some(match spawned {
            Ok(child) => {
                vm.start_unix = unix_now();
                let channel = child.channel.is_some();
                vm.channel = child.channel;
                if let Some(o) = &self.output {
                    o.consoles().set_channel(name, vm.channel.as_ref());
                }
                machine::Event::Spawned {
                    pid: child.pid,
                    channel,
                }
            }
            Err(e) => {
                self.cgroups.exited(name, now);
                machine::Event::SpawnFailed {
                    error: e.to_string(),
                }
            }
        })
    }

    /// A spawner thread's answer. The VM may have moved on meanwhile (stopped, removed,
    /// edited): a child nobody wants any more is killed (and reaped as a stray); an
    /// edited VM gets a child with its new spec.
    fn on_spawn_done(&mut self, done: pool::Done, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let name = done.name;
        let ours = self
            .vms
            .get(&name)
            .is_some_and(|v| v.pending == Some(done.ticket));
        if ours && let Some(vm) = self.vms.get_mut(&name) {
            vm.pending = None;
        }
        let waiting = ours
            && self
                .vms
                .get(&name)
                .is_some_and(|v| *v.machine.state() == machine::State::Spawning);
        match done.result {
            Ok(child)
                if waiting
                    && self
                        .vms
                        .get(&name)
                        .is_some_and(|v| *v.machine.spec() == done.spec) =>
            {
                let pid = child.pid;
                let channel = child.channel.is_some();
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.start_unix = unix_now();
                    vm.channel = child.channel;
                    if let Some(o) = &self.output {
                        o.consoles().set_channel(&name, vm.channel.as_ref());
                    }
                }
                self.dispatch(&name, machine::Event::Spawned { pid, channel }, now);
                if let Some(how) = self.parked.remove(&pid) {
                    self.on_child_exit(pid, how, now);
                }
            }
            Ok(child) => {
                self.stray(&name, child.pid, now);
                if waiting {
                    // Edited while its spawn ran: start it again with the new spec.
                    if let Some(event) = self.spawn(&name, now) {
                        self.dispatch(&name, event, now);
                    }
                }
            }
            Err(e) if waiting => {
                self.cgroups.exited(&name, now);
                let error = e.to_string();
                self.dispatch(&name, machine::Event::SpawnFailed { error }, now);
            }
            Err(_) => {
                if ours {
                    self.cgroups.exited(&name, now);
                }
            }
        }
        if self.in_flight == 0 {
            self.parked.clear();
        }
    }

    /// Child `pid` of VM `name` came too late to be wanted: kill it (unless it is gone
    /// already) and wait for its exit.
    fn stray(&mut self, name: &str, pid: u32, now: Instant) {
        if self.parked.remove(&pid).is_some() {
            self.stray_gone(name, now);
            return;
        }
        if let Err(e) = self.spawner.signal(pid, nix::sys::signal::Signal::SIGKILL) {
            self.log.vm(4, name, &format!("SIGKILL to pid {pid}: {e}"));
        }
        self.strays.insert(pid, name.to_string());
    }

    /// A stray child of VM `name` is gone: its cgroup goes too, unless the VM has
    /// another child (or one on the way) by now.
    fn stray_gone(&mut self, name: &str, now: Instant) {
        let busy = self
            .vms
            .get(name)
            .is_some_and(|v| v.pending.is_some() || v.machine.pid().is_some());
        if !busy {
            self.cgroups.exited(name, now);
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
                WaitStatus::Exited(pid, code) => (pid, ChildExit::from_status(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, ChildExit::Signal(sig as i32)),
                _ => continue,
            };
            self.on_child_exit(pid.as_raw() as u32, how, Instant::now());
        }
    }

    /// Child `pid` was reaped: its cgroup goes (with a note if its OOM killer struck),
    /// and its VM's machine hears of it.
    fn on_child_exit(&mut self, pid: u32, how: ChildExit, now: Instant) {
        let name = self
            .vms
            .iter()
            .find(|(_, v)| v.machine.pid() == Some(pid))
            .map(|(n, _)| n.clone());
        if let Some(name) = name {
            if let Some(vm) = self.vms.get_mut(&name) {
                vm.channel = None;
            }
            if let Some(o) = &self.output {
                o.consoles().set_channel(&name, None);
            }
            let oom = self.cgroups.exited(&name, now);
            self.dispatch(&name, machine::Event::Exited { how, oom }, now);
        } else if let Some(name) = self.strays.remove(&pid) {
            self.stray_gone(&name, now);
        } else if self.in_flight > 0 {
            // Its spawner thread's answer is still on its way.
            self.parked.insert(pid, how);
        }
    }

    fn on_timers(&mut self, now: Instant) {
        self.cgroups.on_timer(now);
        let due: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.machine.deadline().is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.dispatch(&name, machine::Event::Timer, now);
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
            let loaded = self.source.load();
            self.on_loaded(loaded);
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
        let waiters = std::mem::take(&mut self.reload_waiters);
        let outcome = if self.stopping {
            Err("the fleet is stopping".to_string())
        } else {
            self.apply_reload_at(loaded, Instant::now())
        };
        let resp = match outcome {
            Ok(report) => WireResponse {
                reload: Some(report),
                ..WireResponse::ok()
            },
            Err(e) => WireResponse::error(format!("reload refused, nothing changed: {e}")),
        };
        for w in waiters {
            let _ = w.try_send(resp.clone());
        }
        self.reload_waiters = std::mem::take(&mut self.reload_waiters_next);
        if self.stopping {
            for w in std::mem::take(&mut self.reload_waiters) {
                let _ = w.try_send(WireResponse::error("the fleet is stopping"));
            }
        } else if again {
            self.begin_reload();
        }
    }

    /// A `reload` request: answered once a load that starts after it is applied.
    fn request_reload(&mut self, reply: SyncSender<WireResponse>) {
        match self.reload {
            ReloadState::Idle => self.reload_waiters.push(reply),
            ReloadState::Loading | ReloadState::LoadingAndAgain => {
                self.reload_waiters_next.push(reply)
            }
        }
        self.begin_reload();
    }

    /// Re-read the directory on this thread and apply it (see [`Supervisor::apply_reload`]).
    pub fn reload(&mut self) {
        let loaded = self.source.load();
        self.apply_reload(loaded);
    }

    /// Apply a loaded directory: start added VMs, stop removed ones, restart changed
    /// ones, leave the rest alone. A bad directory changes nothing.
    pub fn apply_reload(&mut self, loaded: Result<(FleetSettings, Vec<VmSpec>), ConfigError>) {
        let _ = self.apply_reload_at(loaded, Instant::now());
    }

    /// [`Supervisor::apply_reload`] at `now`: what changed, or why nothing did (one line).
    fn apply_reload_at(
        &mut self,
        loaded: Result<(FleetSettings, Vec<VmSpec>), ConfigError>,
        now: Instant,
    ) -> Result<ReloadReport, String> {
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
                let text = e.to_string();
                for line in text.lines() {
                    self.log.line(3, &format!("  {line}"));
                }
                return Err(text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "));
            }
        };
        if settings.metrics_address != self.settings.metrics_address
            && let Some(f) = &mut self.on_metrics_address
        {
            f(settings.metrics_address);
        }
        self.settings = settings;
        let timing = timing(&self.settings);
        for vm in self.vms.values_mut() {
            vm.machine.set_timing(timing);
        }
        let mut new: BTreeMap<String, VmSpec> =
            specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut report = ReloadReport::default();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let event = match new.remove(&name) {
                None => {
                    report.removed.push(name.clone());
                    machine::Event::Removed
                }
                Some(spec) => {
                    if !self
                        .vms
                        .get(&name)
                        .is_some_and(|v| v.machine.changed_by(&spec))
                    {
                        continue;
                    }
                    report.changed.push(name.clone());
                    machine::Event::Reload(Box::new(spec))
                }
            };
            self.dispatch(&name, event, now);
        }
        for (name, spec) in new {
            report.added.push(name.clone());
            self.vms
                .insert(name.clone(), Vm::new(spec, timing, &self.log));
            self.dispatch(&name, machine::Event::Start, now);
        }
        self.log.line(
            6,
            &format!(
                "reload: {} added, {} removed, {} changed",
                report.added.len(),
                report.removed.len(),
                report.changed.len()
            ),
        );
        Ok(report)
    }

    /// One VM's status as the control socket reports it.
    fn vm_info(&self, name: &str, vm: &Vm, now_unix: Option<f64>) -> VmInfo {
        let m = &vm.machine;
        let pid = m.pid();
        let uptime_s = match (pid, vm.start_unix, now_unix) {
            (Some(_), Some(start), Some(now)) => Some((now - start).max(0.0)),
            _ => None,
        };
        VmInfo {
            name: name.to_string(),
            state: m.vm_state().as_str().to_string(),
            pid,
            uptime_s,
            restarts: m.restarts(),
            last_exit: m.last_exit().map(|e| e.describe()),
            last_exit_status: m.last_exit().map(|e| e.status_number()),
            vcpus: m.spec().vcpus,
            memory_mib: m.spec().memory_mib,
            // Where the output thread writes it (`OutputHub::prepare`): the spec's own
            // file if it names one, else LOG_DIR/NAME.console.
            console_file: match &m.spec().console {
                crate::config::ConsoleSpec::File(path) => path.clone(),
                _ => output::log_files(&self.settings.log_dir, name).0,
            },
        }
    }

    /// A control request: answered now (a reload: once its load is applied).
    fn on_control(&mut self, req: control::ControlRequest, now: Instant) {
        let reply = req.reply;
        let resp = match req.command {
            WireCommand::Reload if self.stopping => WireResponse::error("the fleet is stopping"),
            WireCommand::Reload => return self.request_reload(reply),
            WireCommand::Reexec => match self.reexec() {
                Ok(msg) => {
                    self.log.line(6, &msg);
                    WireResponse {
                        program: Some(self.program()),
                        ..WireResponse::ok()
                    }
                }
                Err(e) => {
                    self.log.line(3, &format!("reexec refused: {e}"));
                    WireResponse::error(format!("reexec refused: {e}"))
                }
            },
            WireCommand::Status { vm: None } => {
                let now_unix = unix_now();
                WireResponse {
                    vms: Some(
                        self.vms
                            .iter()
                            .map(|(n, v)| self.vm_info(n, v, now_unix))
                            .collect(),
                    ),
                    program: Some(self.program()),
                    ..WireResponse::ok()
                }
            }
            WireCommand::Status { vm: Some(name) }
            | WireCommand::Console { vm: name }
            | WireCommand::Logs { vm: name, .. } => match self.vms.get(&name) {
                Some(v) => WireResponse {
                    vms: Some(vec![self.vm_info(&name, v, unix_now())]),
                    ..WireResponse::ok()
                },
                None => unknown_vm(&name),
            },
            WireCommand::Stop { vm } => self.vm_command(&vm, machine::Command::Stop, now),
            WireCommand::Start { vm } => self.vm_command(&vm, machine::Command::Start, now),
            WireCommand::Restart { vm } => self.vm_command(&vm, machine::Command::Restart, now),
            WireCommand::Kill { vm } => self.vm_command(&vm, machine::Command::Kill, now),
            WireCommand::Pause { vm } => self.vm_command(&vm, machine::Command::Pause, now),
            WireCommand::Resume { vm } => self.vm_command(&vm, machine::Command::Resume, now),
            WireCommand::ResetFailed { vm } => {
                self.vm_command(&vm, machine::Command::ResetFailed, now)
            }
        };
        let _ = reply.try_send(resp);
    }

    /// A user's command for VM `name`, carried out; the answer names its state after.
    fn vm_command(&mut self, name: &str, cmd: machine::Command, now: Instant) -> WireResponse {
        let Some(vm) = self.vms.get_mut(name) else {
            return unknown_vm(name);
        };
        match vm.machine.on_command(cmd, now) {
            Err(refusal) => WireResponse::error(refusal.to_string()),
            Ok(actions) => {
                if let Some(next) = self.carry_out(name, actions, now) {
                    self.dispatch(name, next, now);
                }
                WireResponse {
                    state: self
                        .vms
                        .get(name)
                        .map(|v| v.machine.vm_state().as_str().to_string()),
                    ..WireResponse::ok()
                }
            }
        }
    }
}

impl<S: Spawner + Clone + Send + 'static> Supervisor<S> {
    /// Spawn on `threads` spawner threads ([`pool`]) instead of the event loop; their
    /// answers come on `events`, the channel [`Supervisor::run`] reads. If no thread can
    /// be started, says so and spawns on the loop.
    pub fn with_spawn_threads(mut self, threads: usize, events: &Sender<Event>) -> Self {
        match pool::Pool::start(&self.spawner, threads, events) {
            Ok(p) => self.pool = Some(p),
            Err(e) => self.log.line(
                4,
                &format!("cannot start the spawner threads: {e}; spawning on the event loop"),
            ),
        }
        self
    }
}

fn unix_now() -> Option<f64> {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// A message to a child, named for the log.
fn to_child_name(msg: &crate::protocol::ToChild) -> &'static str {
    use crate::protocol::ToChild;
    match msg {
        ToChild::Pause => "pause",
        ToChild::Resume => "resume",
        ToChild::CtrlAltDel => "Ctrl-Alt-Del",
        ToChild::Console(_) => "console input",
    }
}

fn unknown_vm(name: &str) -> WireResponse {
    WireResponse::error(format!("unknown VM: {name}"))
}
