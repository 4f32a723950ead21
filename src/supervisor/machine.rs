//! One supervised VM's lifecycle as one explicit state machine: a [`State`] enum and one
//! pure transition function, [`Machine::on_event`], that turns an [`Event`] at a given
//! time into [`Action`]s; user commands ([`Command`]: stop, start, restart, kill, pause,
//! resume, reset-failed) go through [`Machine::on_command`], which answers Ok (with the
//! actions) or a typed [`Refusal`] naming the VM and its state.
//!
//! No syscalls and no clock reads here: the event loop ([`super`]) turns OS events
//! (waitpid, signals, a reload's result, its timeout, a control request) into events and
//! the actions into syscalls (fork/exec, kill, a message on the child's control channel,
//! log lines). Its only timer is [`Machine::deadline`], which follows from the state, so
//! a timer can never be left armed for a state that is gone.
//! The restart decisions (backoff, start limit) are the policy's ([`Restarter`]).
//!
//! A stop the supervisor asks for (user `stop`, SIGTERM to the fleet, a reload that
//! removes or edits the VM) goes through phases ([`StopPhase`]): Ctrl-Alt-Del on the
//! child's control channel and up to `stop_grace_s` for the guest to shut down; then
//! SIGTERM (the child's signal-driven vCPU shutdown) and [`HARD_STOP_WAIT`]; then
//! SIGKILL. A child without a control channel gets SIGTERM at once, and SIGKILL after
//! `stop_grace_s`. Whatever way such a child ends is the requested stop: no restart, no
//! start-limit count.

use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::policy::{ChildExit, Decision, Restarter, VmState};
use crate::config::VmSpec;
use crate::protocol::{ExitCode, ToChild};

/// From SIGTERM (after a guest ignored Ctrl-Alt-Del for the grace period) to SIGKILL:
/// the child's own vCPU shutdown takes milliseconds; this only bounds a stuck one.
pub const HARD_STOP_WAIT: Duration = Duration::from_secs(3);

/// The fleet settings a machine's timers come from (they may change at a reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    /// How long a guest gets to shut down after Ctrl-Alt-Del (or, for a child without a
    /// control channel, from SIGTERM to SIGKILL): `stop_grace_s`.
    pub stop_grace: Duration,
    /// From a start until the VM counts as running (`startup_settle_ms`).
    pub startup_settle: Duration,
}

/// What happens once a child that is being stopped is gone.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Then {
    /// It stays down (the fleet is stopping).
    StayDown,
    /// It stays down until a user starts it (`stop`, `kill`).
    UserStop,
    /// It starts again with the same spec (`restart`).
    Restart,
    /// The VM is forgotten (its file was removed).
    Remove,
    /// It starts again with this spec (its file changed).
    Replace(Box<VmSpec>),
}

/// How far a requested stop has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopPhase {
    /// Ctrl-Alt-Del sent: the guest has until the deadline to shut down.
    Asked,
    /// SIGTERM sent: the child's vCPU shutdown; SIGKILL at the deadline.
    Terminated,
    /// SIGKILL sent: only its exit is awaited.
    Killed,
}

/// Where one VM stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum State {
    /// Not started yet.
    New,
    /// A child was asked of the spawner; its answer ([`Event::Spawned`] or
    /// [`Event::SpawnFailed`]) comes next.
    Spawning,
    /// The child runs; the guest counts as up at `running_at`.
    Starting {
        /// The child.
        pid: u32,
        /// When it counts as running (the settle time after its start).
        #[serde(with = "super::handover::clock")]
        running_at: Instant,
    },
    /// The child runs and its guest is up.
    Running {
        /// The child.
        pid: u32,
    },
    /// The child's vCPUs are parked at a user's `pause`, until `resume`.
    Paused {
        /// The child.
        pid: u32,
    },
    /// The child is being stopped on request (see [`StopPhase`]).
    Stopping {
        /// The child.
        pid: u32,
        /// How far the stop has gone.
        phase: StopPhase,
        /// When the next phase is due; `None` once SIGKILL is sent (or never, for a
        /// deadline past what an Instant holds).
        #[serde(with = "super::handover::clock::option")]
        deadline: Option<Instant>,
        /// What follows its exit.
        then: Then,
    },
    /// No child; the policy restarts it at `until` (`None`: a delay too long to
    /// represent, i.e. never).
    Backoff {
        /// When the restart is due.
        #[serde(with = "super::handover::clock::option")]
        until: Option<Instant>,
    },
    /// No child and none planned (the policy said stay down, or the fleet stops).
    Stopped,
    /// A user stopped it: no child until a user starts it; reloads and other VMs'
    /// events leave it down.
    StoppedByUser,
    /// The start limit was hit: no child until `reset-failed` or an edit of its file.
    Failed,
}

/// What the event loop tells a machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Start the VM (the fleet starts, or the VM was added).
    Start,
    /// The child asked for by [`Action::Spawn`] runs as `pid`.
    Spawned {
        /// Its pid.
        pid: u32,
        /// Whether it has a control channel ([`Action::Send`] can reach it).
        channel: bool,
    },
    /// The child asked for by [`Action::Spawn`] could not be started.
    SpawnFailed {
        /// Why, for the log.
        error: String,
    },
    /// An [`Action::Send`] could not be carried out.
    SendFailed {
        /// Why, for the log.
        error: String,
    },
    /// The child was reaped.
    Exited {
        /// How it ended.
        how: ChildExit,
        /// The cgroup's note that its OOM killer killed it, if so.
        oom: Option<String>,
    },
    /// Time passed: [`Machine::deadline`] may be due.
    Timer,
    /// A reload brought this spec for the VM (changed or not).
    Reload(Box<VmSpec>),
    /// A reload found the VM's file gone.
    Removed,
    /// The fleet stops: stop the child, never start one again.
    StopAll,
}

/// A user's command for one VM (from the control socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Graceful stop; it stays down until `start`.
    Stop,
    /// Start a stopped VM (or one waiting in backoff, at once).
    Start,
    /// Graceful stop, then start again (or start, if it has no child).
    Restart,
    /// SIGKILL, no grace; it stays down until `start`.
    Kill,
    /// Park the vCPUs.
    Pause,
    /// Run the parked vCPUs again.
    Resume,
    /// Clear the start-limit latch of a failed VM and start it.
    ResetFailed,
}

impl Command {
    /// The command's name on the wire and in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Stop => "stop",
            Command::Start => "start",
            Command::Restart => "restart",
            Command::Kill => "kill",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::ResetFailed => "reset-failed",
        }
    }
}

/// Why a command does not apply to a VM in its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nothing to stop.
    AlreadyStopped,
    /// A stop is under way.
    AlreadyStopping,
    /// A child runs (or is being started).
    AlreadyRunning,
    /// Already paused.
    AlreadyPaused,
    /// No child to act on.
    NotRunning,
    /// Not paused.
    NotPaused,
    /// Not failed (reset-failed).
    NotFailed,
    /// Failed: only reset-failed (or an edit) starts it.
    Failed,
    /// The fleet is stopping.
    FleetStopping,
    /// Its file was removed: it is being stopped for good.
    BeingRemoved,
    /// Its child has no control channel (pause and resume need one).
    NoChannel,
}

/// A command refused: the VM, its state, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refusal {
    /// The VM's name.
    pub vm: String,
    /// Its state when the command came.
    pub state: VmState,
    /// Why.
    pub reason: Reason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vm = &self.vm;
        match self.reason {
            Reason::AlreadyStopped => write!(f, "vm {vm} is already stopped ({})", self.state),
            Reason::AlreadyStopping => write!(f, "vm {vm} is already stopping"),
            Reason::AlreadyRunning => write!(f, "vm {vm} is already {}", self.state),
            Reason::AlreadyPaused => write!(f, "vm {vm} is already paused"),
            Reason::NotRunning => write!(f, "vm {vm} is not running ({})", self.state),
            Reason::NotPaused => write!(f, "vm {vm} is not paused ({})", self.state),
            Reason::NotFailed => write!(f, "vm {vm} has not failed ({})", self.state),
            Reason::Failed => write!(
                f,
                "vm {vm} has failed (start limit); `reset-failed {vm}` starts it again"
            ),
            Reason::FleetStopping => write!(f, "vm {vm}: the fleet is stopping"),
            Reason::BeingRemoved => write!(f, "vm {vm} is being removed (its file is gone)"),
            Reason::NoChannel => write!(
                f,
                "vm {vm}: its process has no control channel (started by an older vmm-fleet?)"
            ),
        }
    }
}

/// What a machine asks the event loop to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a child for [`Machine::spec`] now and answer with [`Event::Spawned`] or
    /// [`Event::SpawnFailed`].
    Spawn,
    /// Send `signal` to the child `pid`.
    Signal {
        /// The child.
        pid: u32,
        /// The signal.
        signal: Signal,
    },
    /// Send this message on the current child's control channel; on failure answer
    /// with [`Event::SendFailed`].
    Send(ToChild),
    /// Log `msg` about this VM at syslog priority `prio`.
    Log {
        /// 3 error, 4 warning, 6 info.
        prio: u8,
        /// The line, without the `vm NAME: ` prefix.
        msg: String,
    },
    /// Forget the VM (after its removal).
    Forget,
}

fn log(prio: u8, msg: impl Into<String>) -> Action {
    Action::Log {
        prio,
        msg: msg.into(),
    }
}

fn fmt_delay(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// One VM's state machine (serialized whole at reexec, see [`super::handover`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    spec: VmSpec,
    state: State,
    /// Backoff and start limit (reset when the spec changes).
    restarter: Restarter,
    /// Restarts by the policy over the VM's life, across edits of its file (a counter).
    restarts: u64,
    last_exit: Option<ChildExit>,
    timing: Timing,
    /// The fleet stops: nothing is started again.
    halted: bool,
    /// The current child has a control channel.
    channel: bool,
}

impl Machine {
    /// A machine for `spec`, in [`State::New`].
    pub fn new(spec: VmSpec, timing: Timing) -> Self {
        Machine {
            restarter: Restarter::new(spec.restart),
            spec,
            state: State::New,
            restarts: 0,
            last_exit: None,
            timing,
            halted: false,
            channel: false,
        }
    }

    /// The spec its children run (the one before a pending replacement; for a VM stopped
    /// by its user, the one it will run when started).
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state as reported in status and metrics.
    pub fn vm_state(&self) -> VmState {
        match self.state {
            State::New | State::Stopped => VmState::Stopped,
            State::StoppedByUser => VmState::StoppedByUser,
            State::Spawning | State::Starting { .. } => VmState::Starting,
            State::Running { .. } => VmState::Running,
            State::Paused { .. } => VmState::Paused,
            State::Stopping { .. } => VmState::Stopping,
            State::Backoff { .. } => VmState::Backoff,
            State::Failed => VmState::Failed,
        }
    }

    /// The child's pid, while there is one.
    pub fn pid(&self) -> Option<u32> {
        match self.state {
            State::Starting { pid, .. }
            | State::Running { pid }
            | State::Paused { pid }
            | State::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Restarts by the policy so far (kept across edits of the VM's file).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// How the last child ended (kept across edits of the VM's file).
    pub fn last_exit(&self) -> Option<ChildExit> {
        self.last_exit
    }

    /// Use `timing` for the timers armed from now on.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
    }

    /// When the machine wants an [`Event::Timer`].
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Starting { running_at, .. } => Some(running_at),
            State::Stopping { deadline, .. } => deadline,
            State::Backoff { until } if !self.halted => until,
            _ => None,
        }
    }

    /// Whether a reload bringing `spec` changes anything for this VM: a spec other than
    /// the one it runs (or will run once its child is gone), or a VM being removed.
    pub fn changed_by(&self, spec: &VmSpec) -> bool {
        match &self.state {
            State::Stopping {
                then: Then::Remove, ..
            } => true,
            State::Stopping {
                then: Then::Replace(next),
                ..
            } => **next != *spec,
            _ => self.spec != *spec,
        }
    }

    /// The transition function: what `event` at `now` does to the state, and what the
    /// event loop must do about it.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::Start => self.on_start(),
            Event::Spawned { pid, channel } => self.on_spawned(pid, channel, now),
            Event::SpawnFailed { error } => self.on_spawn_failed(&error, now),
            Event::SendFailed { error } => self.on_send_failed(&error, now),
            Event::Exited { how, oom } => self.on_exited(how, oom, now),
            Event::Timer => self.on_timer(now),
            Event::Reload(spec) => self.on_reload(spec, now),
            Event::Removed => self.on_removed(now),
            Event::StopAll => self.on_stop_all(now),
        }
    }

    /// A user's command: the actions to carry out, or why it does not apply now (then
    /// nothing changed).
    pub fn on_command(&mut self, cmd: Command, now: Instant) -> Result<Vec<Action>, Refusal> {
        let refuse = |m: &Self, reason| Refusal {
            vm: m.spec.name.clone(),
            state: m.vm_state(),
            reason,
        };
        if self.halted {
            return Err(refuse(self, Reason::FleetStopping));
        }
        if let State::Stopping {
            then: Then::Remove, ..
        } = self.state
        {
            return Err(refuse(self, Reason::BeingRemoved));
        }
        let user = |a: Vec<Action>, what: &str| {
            let mut v = vec![log(6, format!("{what} (asked by a user)"))];
            v.extend(a);
            v
        };
        match (cmd, &self.state) {
            (Command::Stop, State::Stopping { then, .. }) => match then {
                Then::UserStop => Err(refuse(self, Reason::AlreadyStopping)),
                _ => {
                    self.make_user_stop();
                    Ok(vec![log(6, "stays stopped once down (asked by a user)")])
                }
            },
            (Command::Stop | Command::Kill, State::Spawning) => {
                // Cancelled: its child, when the spawner answers, is killed unseen.
                self.state = State::StoppedByUser;
                Ok(vec![log(6, "stopped before its start (asked by a user)")])
            }
            (
                Command::Stop,
                State::Starting { .. } | State::Running { .. } | State::Paused { .. },
            ) => Ok(self.stop(Then::UserStop, now)),
            (Command::Stop, State::Backoff { .. }) => {
                self.restarter.stop_requested();
                self.state = State::StoppedByUser;
                Ok(vec![log(6, "stopped (asked by a user)")])
            }
            (Command::Stop, State::New | State::Stopped | State::StoppedByUser | State::Failed) => {
                Err(refuse(self, Reason::AlreadyStopped))
            }
            (Command::Start | Command::Restart, State::Failed) => Err(refuse(self, Reason::Failed)),
            (
                Command::Start,
                State::Starting { .. } | State::Running { .. } | State::Paused { .. },
            )
            | (Command::Start | Command::Restart, State::Spawning) => {
                Err(refuse(self, Reason::AlreadyRunning))
            }
            (Command::Start | Command::Restart, State::Stopping { then, .. }) => {
                // Started again once the child is gone (an edit's stop does that anyway,
                // with its new spec).
                if matches!(then, Then::Replace(_)) {
                    return Ok(Vec::new());
                }
                Ok(self.stop(Then::Restart, now))
            }
            (
                Command::Start | Command::Restart,
                State::New | State::Stopped | State::StoppedByUser | State::Backoff { .. },
            ) => Ok(user(self.spawn(), "starting")),
            (
                Command::Restart,
                State::Starting { .. } | State::Running { .. } | State::Paused { .. },
            ) => Ok(self.stop(Then::Restart, now)),
            (Command::Kill, _) => match self.pid() {
                Some(pid) => {
                    self.make_user_stop();
                    Ok(self.kill(pid))
                }
                None => Err(refuse(self, Reason::NotRunning)),
            },
            (Command::Pause, State::Starting { pid, .. } | State::Running { pid }) => {
                if !self.channel {
                    return Err(refuse(self, Reason::NoChannel));
                }
                self.state = State::Paused { pid: *pid };
                Ok(vec![Action::Send(ToChild::Pause), log(6, "paused")])
            }
            (Command::Pause, State::Paused { .. }) => Err(refuse(self, Reason::AlreadyPaused)),
            (Command::Pause, _) => Err(refuse(self, Reason::NotRunning)),
            (Command::Resume, State::Paused { pid }) => {
                self.state = State::Running { pid: *pid };
                Ok(vec![Action::Send(ToChild::Resume), log(6, "resumed")])
            }
            (Command::Resume, _) => Err(refuse(self, Reason::NotPaused)),
            (Command::ResetFailed, State::Failed) => {
                self.restarter.reset();
                Ok(user(self.spawn(), "start limit reset; starting"))
            }
            (Command::ResetFailed, _) => Err(refuse(self, Reason::NotFailed)),
        }
    }

    fn spawn(&mut self) -> Vec<Action> {
        if self.halted {
            self.state = State::Stopped;
            return Vec::new();
        }
        self.state = State::Spawning;
        vec![Action::Spawn]
    }

    fn on_start(&mut self) -> Vec<Action> {
        match self.state {
            State::New | State::Stopped => self.spawn(),
            _ => Vec::new(),
        }
    }

    fn on_spawned(&mut self, pid: u32, channel: bool, now: Instant) -> Vec<Action> {
        if self.state != State::Spawning {
            // Nothing asked for this child: it must not run unsupervised.
            return vec![Action::Signal {
                pid,
                signal: Signal::SIGKILL,
            }];
        }
        self.restarter.started(now);
        self.channel = channel;
        self.state = State::Starting {
            pid,
            // Total even for a settle time past what an Instant holds (then: at once).
            running_at: now.checked_add(self.timing.startup_settle).unwrap_or(now),
        };
        vec![log(6, format!("starting (pid {pid})"))]
    }

    fn on_spawn_failed(&mut self, error: &str, now: Instant) -> Vec<Action> {
        if self.state != State::Spawning {
            return Vec::new();
        }
        // A start that failed counts as a start that ended in a VMM error (for the start
        // limit and the backoff alike).
        self.restarter.started(now);
        let mut actions = vec![log(3, format!("cannot start: {error}"))];
        actions.extend(self.decide(ChildExit::Code(ExitCode::VmmError), now));
        actions
    }

    /// A message could not reach the child: a graceful stop goes on with the hard stop;
    /// a pause that did not arrive leaves it running.
    fn on_send_failed(&mut self, error: &str, now: Instant) -> Vec<Action> {
        match self.state {
            State::Stopping {
                pid,
                phase: StopPhase::Asked,
                ..
            } => {
                let mut a = vec![log(
                    4,
                    format!("cannot ask the guest to shut down: {error}"),
                )];
                a.extend(self.terminate(pid, now.checked_add(HARD_STOP_WAIT)));
                a
            }
            State::Paused { pid } => {
                self.state = State::Running { pid };
                vec![log(4, format!("cannot pause: {error}; still running"))]
            }
            // The only message a running machine sends is the Resume that made it
            // running: it did not arrive, so the child's vCPUs are still parked.
            State::Running { pid } => {
                self.state = State::Paused { pid };
                vec![log(4, format!("cannot resume: {error}; still paused"))]
            }
            _ => vec![log(4, format!("control channel: {error}"))],
        }
    }

    /// The policy's verdict on an exit, as a state and a log line.
    fn decide(&mut self, how: ChildExit, now: Instant) -> Vec<Action> {
        match self.restarter.exited(how, now) {
            Decision::RestartAfter(d) => {
                // Even "now" goes through Backoff and the timer pass: a child that cannot
                // be spawned at all must not recurse start -> exit -> start.
                self.state = State::Backoff {
                    until: now.checked_add(d),
                };
                if d.is_zero() {
                    vec![log(6, "restarting now")]
                } else {
                    vec![log(6, format!("restarting in {}", fmt_delay(d)))]
                }
            }
            Decision::StayDown => {
                self.state = State::Stopped;
                vec![log(6, "stopped")]
            }
            Decision::Failed => {
                self.state = State::Failed;
                let r = self.restarter.spec();
                vec![log(
                    3,
                    format!(
                        "failed: {} starts within {} s (start limit); left down",
                        r.start_limit_burst, r.start_limit_interval_s
                    ),
                )]
            }
        }
    }

    fn on_exited(&mut self, how: ChildExit, oom: Option<String>, now: Instant) -> Vec<Action> {
        if self.pid().is_none() {
            return Vec::new();
        }
        self.last_exit = Some(how);
        self.channel = false;
        let mut actions = Vec::new();
        if let Some(oom) = oom {
            actions.push(log(3, oom));
        }
        let asked = matches!(self.state, State::Stopping { .. });
        // The stop it was asked for ends however it comes (power-off after Ctrl-Alt-Del,
        // a reset from `reboot=k`, exit 6 after SIGTERM, SIGKILL): logged as information.
        let prio = if how.is_clean_end() || asked { 6 } else { 4 };
        actions.push(log(prio, format!("exited: {}", how.describe())));
        if how.is_seccomp_violation() {
            // A crash like any death by signal (restarted by policy), but say why.
            actions.push(log(3, "seccomp violation (killed by SIGSYS)"));
        }
        let then = match std::mem::replace(&mut self.state, State::Stopped) {
            State::Stopping { then, .. } => then,
            _ => {
                actions.extend(self.decide(how, now));
                return actions;
            }
        };
        // A requested stop: no restart by policy, no start-limit count.
        match then {
            Then::StayDown => actions.extend(self.decide(how, now)),
            Then::UserStop => {
                let _ = self.restarter.exited(how, now);
                self.state = State::StoppedByUser;
                actions.push(log(6, "stopped (by a user; `start` brings it back)"));
            }
            Then::Restart => {
                let _ = self.restarter.exited(how, now);
                actions.push(log(6, "starting again (asked by a user)"));
                actions.extend(self.spawn());
            }
            Then::Remove => {
                actions.push(log(6, "removed"));
                actions.push(Action::Forget);
            }
            Then::Replace(spec) => {
                self.replace_spec(*spec);
                actions.push(log(6, "configuration changed; starting again"));
                actions.extend(self.spawn());
            }
        }
        actions
    }

    fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Starting { pid, running_at } if running_at <= now => {
                self.restarter.running();
                self.state = State::Running { pid };
                vec![log(6, "running")]
            }
            State::Stopping {
                pid,
                phase,
                deadline: Some(t),
                ..
            } if t <= now => match phase {
                StopPhase::Asked => {
                    let mut a = vec![log(
                        4,
                        format!(
                            "guest did not shut down within the grace period ({}): SIGTERM",
                            fmt_delay(self.timing.stop_grace)
                        ),
                    )];
                    a.extend(self.terminate(pid, now.checked_add(HARD_STOP_WAIT)));
                    a
                }
                StopPhase::Terminated | StopPhase::Killed => {
                    let mut a = self.kill(pid);
                    a.push(log(4, "did not stop within the grace period: SIGKILL"));
                    a
                }
            },
            State::Backoff { until: Some(t) } if t <= now && !self.halted => {
                self.restarts = self.restarts.saturating_add(1);
                self.spawn()
            }
            _ => Vec::new(),
        }
    }

    /// SIGTERM to the child (its vCPU shutdown); SIGKILL at `deadline`.
    fn terminate(&mut self, pid: u32, deadline: Option<Instant>) -> Vec<Action> {
        if let State::Stopping {
            phase, deadline: d, ..
        } = &mut self.state
        {
            *phase = StopPhase::Terminated;
            *d = deadline;
        }
        vec![Action::Signal {
            pid,
            signal: Signal::SIGTERM,
        }]
    }

    /// SIGKILL to the child; what follows its exit stays as it was (a user's `kill`
    /// outside a stop: it stays down until `start`).
    fn kill(&mut self, pid: u32) -> Vec<Action> {
        match &mut self.state {
            State::Stopping {
                phase, deadline, ..
            } => {
                *phase = StopPhase::Killed;
                *deadline = None;
            }
            _ => {
                self.restarter.stop_requested();
                self.state = State::Stopping {
                    pid,
                    phase: StopPhase::Killed,
                    deadline: None,
                    then: Then::UserStop,
                };
            }
        }
        vec![Action::Signal {
            pid,
            signal: Signal::SIGKILL,
        }]
    }

    /// A stop under way ends stopped by the user; an edit it was for is kept as the spec
    /// the VM starts with later.
    fn make_user_stop(&mut self) {
        let old = match &mut self.state {
            State::Stopping { then, .. } => std::mem::replace(then, Then::UserStop),
            _ => return,
        };
        if let Then::Replace(spec) = old {
            self.replace_spec(*spec);
        }
    }

    /// The new spec of an edited VM: its restart count and last exit are kept, its
    /// backoff and start-limit history start afresh.
    fn replace_spec(&mut self, spec: VmSpec) {
        self.restarter = Restarter::new(spec.restart);
        self.spec = spec;
    }

    /// Ask a running child to stop: Ctrl-Alt-Del if it has a control channel (SIGTERM
    /// after the grace period), else SIGTERM at once (SIGKILL after the grace period).
    /// A stop already under way keeps its phase and deadline and only changes what
    /// follows.
    fn stop(&mut self, then: Then, now: Instant) -> Vec<Action> {
        match &mut self.state {
            State::Stopping { then: t, .. } => {
                *t = then;
                Vec::new()
            }
            State::Starting { pid, .. } | State::Running { pid } | State::Paused { pid } => {
                let pid = *pid;
                let paused = matches!(self.state, State::Paused { .. });
                self.restarter.stop_requested();
                let deadline = now.checked_add(self.timing.stop_grace);
                self.state = State::Stopping {
                    pid,
                    phase: StopPhase::Asked,
                    deadline,
                    then,
                };
                if !self.channel {
                    let mut a = self.terminate(pid, deadline);
                    a.push(log(6, "stopping"));
                    return a;
                }
                let mut a = Vec::new();
                if paused {
                    // A parked guest cannot see the keystrokes.
                    a.push(Action::Send(ToChild::Resume));
                }
                a.push(Action::Send(ToChild::CtrlAltDel));
                a.push(log(6, "stopping (Ctrl-Alt-Del sent to the guest)"));
                a
            }
            _ => Vec::new(),
        }
    }

    fn on_reload(&mut self, spec: Box<VmSpec>, now: Instant) -> Vec<Action> {
        if self.halted || !self.changed_by(&spec) {
            return Vec::new();
        }
        match self.state {
            State::Stopping {
                then: Then::UserStop,
                ..
            }
            | State::StoppedByUser => {
                // It stays down; it will start with the new spec.
                self.replace_spec(*spec);
                vec![log(6, "configuration changed; stays stopped until `start`")]
            }
            State::Starting { .. }
            | State::Running { .. }
            | State::Paused { .. }
            | State::Stopping { .. } => self.stop(Then::Replace(spec), now),
            State::Spawning => {
                // Asked for, not started yet (a spawner off the event loop): it starts
                // with the new spec.
                self.replace_spec(*spec);
                vec![log(6, "configuration changed")]
            }
            State::New | State::Backoff { .. } | State::Stopped | State::Failed => {
                self.replace_spec(*spec);
                let mut actions = vec![log(6, "configuration changed")];
                actions.extend(self.spawn());
                actions
            }
        }
    }

    fn on_removed(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Starting { .. }
            | State::Running { .. }
            | State::Paused { .. }
            | State::Stopping { .. } => self.stop(Then::Remove, now),
            _ => {
                self.state = State::Stopped;
                vec![log(6, "removed"), Action::Forget]
            }
        }
    }

    fn on_stop_all(&mut self, now: Instant) -> Vec<Action> {
        self.halted = true;
        match &self.state {
            State::Stopping {
                then: Then::Remove | Then::UserStop,
                ..
            } => Vec::new(),
            State::Starting { .. }
            | State::Running { .. }
            | State::Paused { .. }
            | State::Stopping { .. } => self.stop(Then::StayDown, now),
            State::Backoff { .. } | State::Spawning => {
                self.restarter.stop_requested();
                self.state = State::Stopped;
                Vec::new()
            }
            State::New | State::Stopped | State::StoppedByUser | State::Failed => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Tables of (time, event) -> (actions, state), with a fake clock: `t0 + ms`.

    use super::*;
    use crate::config::RestartPolicy;
    use std::path::Path;

    const GRACE_MS: u64 = 10_000;
    const SETTLE_MS: u64 = 500;

    fn spec(name: &str, memory_mib: u64) -> VmSpec {
        let text = format!("name: {name}\nvcpus: 1\nmemory_mib: {memory_mib}\nkernel: builtin\n");
        VmSpec::from_yaml(&text, Path::new("/nonexistent/vm.yaml")).unwrap()
    }

    fn machine(spec: VmSpec) -> Machine {
        Machine::new(
            spec,
            Timing {
                stop_grace: Duration::from_millis(GRACE_MS),
                startup_settle: Duration::from_millis(SETTLE_MS),
            },
        )
    }

    /// Actions in a short text form: `spawn`, `TERM 7`, `KILL 7`, `forget`, or the
    /// log line as `<prio>text`.
    fn show(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Spawn => "spawn".to_string(),
                Action::Signal { pid, signal } => {
                    format!("{} {pid}", signal.as_str().trim_start_matches("SIG"))
                }
                Action::Log { prio, msg } => format!("<{prio}>{msg}"),
                Action::Forget => "forget".to_string(),
                Action::Send(m) => format!("send {m:?}"),
            })
            .collect()
    }

    fn code(c: ExitCode) -> Event {
        Event::Exited {
            how: ChildExit::Code(c),
            oom: None,
        }
    }

    fn signal(s: i32) -> Event {
        Event::Exited {
            how: ChildExit::Signal(s),
            oom: None,
        }
    }

    fn spawned(pid: u32) -> Event {
        Event::Spawned {
            pid,
            channel: false,
        }
    }

    /// A child with a control channel.
    fn spawned_ch(pid: u32) -> Event {
        Event::Spawned { pid, channel: true }
    }

    /// Play user command `cmd` at `t0 + at`: its actions, or its refusal as `!message`.
    fn command(m: &mut Machine, t0: Instant, at: u64, cmd: Command) -> Vec<String> {
        match m.on_command(cmd, t0 + Duration::from_millis(at)) {
            Ok(a) => show(&a),
            Err(e) => vec![format!("!{e}")],
        }
    }

    fn reload(s: VmSpec) -> Event {
        Event::Reload(Box::new(s))
    }

    type Step<'a> = (u64, Event, &'a [&'a str], VmState);

    /// Play `steps` on `m` from `t0`: each at `t0 + ms`, its actions and state checked.
    fn play(m: &mut Machine, t0: Instant, steps: &[Step<'_>]) {
        for (i, (at, event, want, state)) in steps.iter().enumerate() {
            let got = show(&m.on_event(event.clone(), t0 + Duration::from_millis(*at)));
            assert_eq!(got, *want, "step {i}: {event:?} at {at} ms");
            assert_eq!(m.vm_state(), *state, "step {i}: {event:?} at {at} ms");
        }
    }

    use VmState::{Backoff, Failed, Paused, Running, Starting, Stopped, StoppedByUser, Stopping};

    #[test]
    fn starts_settles_and_runs() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        assert_eq!(m.deadline(), None);
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (499, Event::Timer, &[], Starting),
                (500, Event::Timer, &["<6>running"], Running),
                (501, Event::Timer, &[], Running),
                (600, Event::Start, &[], Running),
            ],
        );
        assert_eq!(m.pid(), Some(7));
        assert_eq!(m.deadline(), None);
    }

    #[test]
    fn an_edited_running_vm_keeps_its_restart_count_and_last_exit() {
        // The bug of issue 9: restarts_total went from 2 back to 0 at an edit.
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        let edited = spec("a", 32);
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (500, Event::Timer, &["<6>running"], Running),
                (
                    1000,
                    signal(9),
                    &[
                        "<4>exited: killed by signal 9 (SIGKILL)",
                        "<6>restarting in 0.1 s",
                    ],
                    Backoff,
                ),
                (1100, Event::Timer, &["spawn"], Starting),
                (1100, spawned(8), &["<6>starting (pid 8)"], Starting),
                (
                    1200,
                    signal(9),
                    &[
                        "<4>exited: killed by signal 9 (SIGKILL)",
                        "<6>restarting in 0.2 s",
                    ],
                    Backoff,
                ),
                (1400, Event::Timer, &["spawn"], Starting),
                (1400, spawned(9), &["<6>starting (pid 9)"], Starting),
                (1900, Event::Timer, &["<6>running"], Running),
            ],
        );
        assert_eq!(m.restarts(), 2);
        assert!(!m.changed_by(&spec("a", 16)));
        assert!(m.changed_by(&edited));
        play(
            &mut m,
            t0,
            &[
                (
                    2000,
                    reload(edited.clone()),
                    &["TERM 9", "<6>stopping"],
                    Stopping,
                ),
                (
                    2100,
                    code(ExitCode::Stopped),
                    &[
                        "<6>exited: stopped cleanly (exit code 6)",
                        "<6>configuration changed; starting again",
                        "spawn",
                    ],
                    Starting,
                ),
                (2100, spawned(10), &["<6>starting (pid 10)"], Starting),
            ],
        );
        assert_eq!(m.spec(), &edited);
        assert_eq!(
            m.restarts(),
            2,
            "an edit is not a restart and resets nothing"
        );
        assert_eq!(m.last_exit(), Some(ChildExit::Code(ExitCode::Stopped)));
        // The backoff starts afresh for the new spec (100 ms again, not 400 ms).
        play(
            &mut m,
            t0,
            &[
                (
                    2200,
                    code(ExitCode::GuestCrash),
                    &[
                        "<4>exited: guest crashed (exit code 4)",
                        "<6>restarting in 0.1 s",
                    ],
                    Backoff,
                ),
                (2300, Event::Timer, &["spawn"], Starting),
            ],
        );
        assert_eq!(m.restarts(), 3);
        assert_eq!(m.last_exit(), Some(ChildExit::Code(ExitCode::GuestCrash)));
    }

    #[test]
    fn an_edit_in_backoff_starts_the_new_spec_at_once_and_keeps_the_count() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (
                    10,
                    signal(11),
                    &[
                        "<4>exited: killed by signal 11 (SIGSEGV)",
                        "<6>restarting in 0.1 s",
                    ],
                    Backoff,
                ),
                (110, Event::Timer, &["spawn"], Starting),
                (110, spawned(8), &["<6>starting (pid 8)"], Starting),
                (
                    120,
                    signal(11),
                    &[
                        "<4>exited: killed by signal 11 (SIGSEGV)",
                        "<6>restarting in 0.2 s",
                    ],
                    Backoff,
                ),
                (
                    130,
                    reload(spec("a", 32)),
                    &["<6>configuration changed", "spawn"],
                    Starting,
                ),
            ],
        );
        assert_eq!(m.restarts(), 1);
        assert_eq!(m.last_exit(), Some(ChildExit::Signal(11)));
    }

    #[test]
    fn reload_during_a_stop_keeps_the_kill_deadline_and_takes_the_latest_spec() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        let (b, c) = (spec("a", 32), spec("a", 48));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (100, reload(b.clone()), &["TERM 7", "<6>stopping"], Stopping),
            ],
        );
        let kill_at = m.deadline();
        assert_eq!(kill_at, Some(t0 + Duration::from_millis(100 + GRACE_MS)));
        assert!(!m.changed_by(&b), "the pending spec is what it will run");
        assert!(m.changed_by(&c));
        play(
            &mut m,
            t0,
            &[
                (5000, reload(b), &[], Stopping),
                (6000, reload(c.clone()), &[], Stopping),
                (6000, Event::Removed, &[], Stopping),
                (7000, reload(c.clone()), &[], Stopping),
            ],
        );
        assert_eq!(m.deadline(), kill_at, "asking again never puts SIGKILL off");
        play(
            &mut m,
            t0,
            &[(
                8000,
                code(ExitCode::Stopped),
                &[
                    "<6>exited: stopped cleanly (exit code 6)",
                    "<6>configuration changed; starting again",
                    "spawn",
                ],
                Starting,
            )],
        );
        assert_eq!(m.spec(), &c);
    }

    #[test]
    fn grace_period_expiry_sends_sigkill_once() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (500, Event::Timer, &["<6>running"], Running),
                (1000, Event::StopAll, &["TERM 7", "<6>stopping"], Stopping),
                (1000 + GRACE_MS - 1, Event::Timer, &[], Stopping),
                (
                    1000 + GRACE_MS,
                    Event::Timer,
                    &["KILL 7", "<4>did not stop within the grace period: SIGKILL"],
                    Stopping,
                ),
                (1000 + GRACE_MS + 1, Event::Timer, &[], Stopping),
                (1000 + GRACE_MS + 2, Event::StopAll, &[], Stopping),
                (
                    1000 + GRACE_MS + 3,
                    signal(9),
                    &["<6>exited: killed by signal 9 (SIGKILL)", "<6>stopped"],
                    Stopped,
                ),
                (1000 + GRACE_MS + 4, Event::Start, &[], Stopped),
            ],
        );
        assert_eq!(m.deadline(), None);
        assert_eq!(m.pid(), None);
    }

    #[test]
    fn spawn_failure_backs_off_like_a_vmm_error() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        let failed = || Event::SpawnFailed {
            error: "no such file".into(),
        };
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (
                    0,
                    failed(),
                    &["<3>cannot start: no such file", "<6>restarting in 0.1 s"],
                    Backoff,
                ),
                (99, Event::Timer, &[], Backoff),
                (100, Event::Timer, &["spawn"], Starting),
                (
                    100,
                    failed(),
                    &["<3>cannot start: no such file", "<6>restarting in 0.2 s"],
                    Backoff,
                ),
                (300, Event::Timer, &["spawn"], Starting),
                (300, spawned(7), &["<6>starting (pid 7)"], Starting),
            ],
        );
        assert_eq!(m.last_exit(), None, "no child ever exited");
        assert_eq!(m.restarts(), 2);
        // Under `never`, a failed spawn stays down.
        let mut s = spec("b", 16);
        s.restart.policy = RestartPolicy::Never;
        let mut m = machine(s);
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (
                    0,
                    failed(),
                    &["<3>cannot start: no such file", "<6>stopped"],
                    Stopped,
                ),
            ],
        );
        // An answer nobody asked for: the child is killed, the state does not change.
        assert_eq!(show(&m.on_event(spawned(9), t0)), ["KILL 9"]);
        assert_eq!(show(&m.on_event(failed(), t0)), Vec::<String>::new());
        assert_eq!(m.vm_state(), Stopped);
    }

    #[test]
    fn crash_loop_backoff_timings_then_start_limit_then_edit_clears_it() {
        let t0 = Instant::now();
        let mut s = spec("a", 16);
        s.restart.start_limit_burst = 5;
        let mut m = machine(s);
        assert_eq!(show(&m.on_event(Event::Start, t0)), ["spawn"]);
        let mut t = 0;
        let mut delays = Vec::new();
        for pid in 1..=5 {
            let at = t0 + Duration::from_millis(t);
            m.on_event(spawned(pid), at);
            t += 10;
            let got = show(&m.on_event(signal(9), t0 + Duration::from_millis(t)));
            assert_eq!(got[0], "<4>exited: killed by signal 9 (SIGKILL)");
            if pid == 5 {
                assert_eq!(
                    got[1..],
                    ["<3>failed: 5 starts within 60 s (start limit); left down"]
                );
                break;
            }
            let until = m.deadline().expect("a backoff deadline");
            let d = until - (t0 + Duration::from_millis(t));
            delays.push(d.as_millis());
            assert_eq!(got[1], format!("<6>restarting in {}", fmt_delay(d)));
            // Not a moment early.
            assert!(show(&m.on_event(Event::Timer, until - Duration::from_millis(1))).is_empty());
            t = (until - t0).as_millis() as u64;
            assert_eq!(show(&m.on_event(Event::Timer, until)), ["spawn"]);
        }
        assert_eq!(delays, [100, 200, 400, 800]);
        assert_eq!(m.vm_state(), Failed);
        assert_eq!(m.restarts(), 4);
        assert_eq!(m.deadline(), None);
        let later = t0 + Duration::from_secs(3600);
        assert!(show(&m.on_event(Event::Timer, later)).is_empty());
        assert!(show(&m.on_event(Event::Start, later)).is_empty());
        // The same file again changes nothing; an edited one starts afresh.
        assert!(show(&m.on_event(reload(m.spec().clone()), later)).is_empty());
        assert_eq!(m.vm_state(), Failed);
        assert_eq!(
            show(&m.on_event(reload(spec("a", 32)), later)),
            ["<6>configuration changed", "spawn"]
        );
        m.on_event(spawned(6), later);
        assert_eq!(
            show(&m.on_event(signal(9), later)),
            [
                "<4>exited: killed by signal 9 (SIGKILL)",
                "<6>restarting in 0.1 s"
            ]
        );
        assert_eq!(m.restarts(), 4);
    }

    #[test]
    fn a_huge_backoff_neither_overflows_nor_fires_early() {
        let t0 = Instant::now();
        let mut s = spec("a", 16);
        s.restart.backoff_initial_ms = u64::MAX;
        s.restart.backoff_max_ms = u64::MAX;
        let mut m = machine(s);
        m.on_event(Event::Start, t0);
        m.on_event(spawned(7), t0);
        m.on_event(signal(9), t0);
        let later = t0 + Duration::from_secs(1_000_000);
        // ~584 million years away, or past what an Instant holds (then: never).
        assert!(m.deadline().is_none_or(|t| t > later));
        assert_eq!(m.vm_state(), Backoff);
        assert!(show(&m.on_event(Event::Timer, later)).is_empty());
        // An edit still brings it back at once.
        assert_eq!(
            show(&m.on_event(reload(spec("a", 32)), later)),
            ["<6>configuration changed", "spawn"]
        );
    }

    #[test]
    fn a_removed_vm_is_stopped_then_forgotten_unless_re_added() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (10, Event::Removed, &["TERM 7", "<6>stopping"], Stopping),
                (
                    20,
                    code(ExitCode::Stopped),
                    &[
                        "<6>exited: stopped cleanly (exit code 6)",
                        "<6>removed",
                        "forget",
                    ],
                    Stopped,
                ),
            ],
        );
        // Removed, then back (same file) before its child is gone: it starts again.
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (10, Event::Removed, &["TERM 7", "<6>stopping"], Stopping),
                (15, reload(spec("a", 16)), &[], Stopping),
                (
                    20,
                    code(ExitCode::Stopped),
                    &[
                        "<6>exited: stopped cleanly (exit code 6)",
                        "<6>configuration changed; starting again",
                        "spawn",
                    ],
                    Starting,
                ),
            ],
        );
        // Removed with no child (in backoff): forgotten at once.
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (
                    10,
                    signal(9),
                    &[
                        "<4>exited: killed by signal 9 (SIGKILL)",
                        "<6>restarting in 0.1 s",
                    ],
                    Backoff,
                ),
                (20, Event::Removed, &["<6>removed", "forget"], Stopped),
            ],
        );
    }

    #[test]
    fn stop_all_in_backoff_cancels_the_restart_for_good() {
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (
                    10,
                    signal(9),
                    &[
                        "<4>exited: killed by signal 9 (SIGKILL)",
                        "<6>restarting in 0.1 s",
                    ],
                    Backoff,
                ),
                (50, Event::StopAll, &[], Stopped),
                (110, Event::Timer, &[], Stopped),
                (120, Event::Start, &[], Stopped),
                (130, reload(spec("a", 32)), &[], Stopped),
            ],
        );
        assert_eq!(m.deadline(), None);
        // A stop-all during an edit's stop: the edit is dropped, it stays down.
        let mut m = machine(spec("a", 16));
        play(
            &mut m,
            t0,
            &[
                (0, Event::Start, &["spawn"], Starting),
                (0, spawned(7), &["<6>starting (pid 7)"], Starting),
                (
                    10,
                    reload(spec("a", 32)),
                    &["TERM 7", "<6>stopping"],
                    Stopping,
                ),
                (20, Event::StopAll, &[], Stopping),
                (
                    30,
                    code(ExitCode::Stopped),
                    &["<6>exited: stopped cleanly (exit code 6)", "<6>stopped"],
                    Stopped,
                ),
            ],
        );
    }

    /// Policy, exit, cgroup OOM note, log lines, state after.
    type ExitRow<'a> = (
        RestartPolicy,
        ChildExit,
        Option<&'a str>,
        &'a [&'a str],
        VmState,
    );

    #[test]
    fn events_while_a_spawn_is_pending() {
        // The spawner's answer may come later than the next event (a spawner off the
        // loop): an edit applies to the pending start, a removal or a stop cancels it.
        let t0 = Instant::now();
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        assert_eq!(
            show(&m.on_event(reload(spec("a", 32)), t0)),
            ["<6>configuration changed"]
        );
        assert_eq!(m.spec(), &spec("a", 32));
        assert_eq!(show(&m.on_event(spawned(7), t0)), ["<6>starting (pid 7)"]);
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        assert_eq!(show(&m.on_event(Event::StopAll, t0)), Vec::<String>::new());
        assert_eq!(show(&m.on_event(spawned(7), t0)), ["KILL 7"]);
        assert_eq!(m.vm_state(), Stopped);
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        assert_eq!(
            show(&m.on_event(Event::Removed, t0)),
            ["<6>removed", "forget"]
        );
    }

    #[test]
    fn exits_are_typed_and_logged_by_kind() {
        let t0 = Instant::now();
        let seccomp = [
            "<4>exited: killed by signal 31 (SIGSYS)",
            "<3>seccomp violation (killed by SIGSYS)",
            "<6>restarting in 0.1 s",
        ];
        let oom = [
            "<3>out of memory: killed by its cgroup's OOM killer",
            "<4>exited: killed by signal 9 (SIGKILL)",
            "<6>restarting in 0.1 s",
        ];
        #[rustfmt::skip]
        let table: &[ExitRow<'_>] = &[
            (RestartPolicy::OnFailure, ChildExit::Code(ExitCode::GuestPoweroff), None,
                &["<6>exited: guest powered off (exit code 0)", "<6>stopped"], Stopped),
            (RestartPolicy::OnFailure, ChildExit::Code(ExitCode::GuestReset), None,
                &["<4>exited: guest reset (exit code 3)", "<6>restarting now"], Backoff),
            (RestartPolicy::OnFailure, ChildExit::Code(ExitCode::VmmError), None,
                &["<4>exited: VMM error (exit code 5)", "<6>restarting in 0.1 s"], Backoff),
            (RestartPolicy::Always, ChildExit::Code(ExitCode::Stopped), None,
                &["<6>exited: stopped cleanly (exit code 6)", "<6>restarting now"], Backoff),
            (RestartPolicy::OnFailure, ChildExit::UnknownCode(42), None,
                &["<4>exited: exit code 42", "<6>restarting in 0.1 s"], Backoff),
            (RestartPolicy::Never, ChildExit::UnknownCode(1), None,
                &["<4>exited: exit code 1", "<6>stopped"], Stopped),
            (RestartPolicy::OnFailure, ChildExit::Signal(libc::SIGSYS), None, &seccomp, Backoff),
            (RestartPolicy::OnFailure, ChildExit::Signal(9),
                Some("out of memory: killed by its cgroup's OOM killer"), &oom, Backoff),
        ];
        for (policy, how, oom, want, state) in table {
            let mut s = spec("a", 16);
            s.restart.policy = *policy;
            let mut m = machine(s);
            m.on_event(Event::Start, t0);
            m.on_event(spawned(7), t0);
            let ev = Event::Exited {
                how: *how,
                oom: oom.map(str::to_string),
            };
            assert_eq!(show(&m.on_event(ev, t0)), *want, "{policy} {how:?}");
            assert_eq!(m.vm_state(), *state, "{policy} {how:?}");
            assert_eq!(m.last_exit(), Some(*how));
            // A restart "now" still goes through the timer pass, never straight to spawn.
            if *state == Backoff {
                assert!(m.deadline().is_some());
            }
        }
        // An exit without a child (a stale pid) changes nothing.
        let mut m = machine(spec("a", 16));
        assert!(show(&m.on_event(signal(9), t0)).is_empty());
        assert_eq!(m.vm_state(), Stopped);
    }

    /// A tiny deterministic generator (no dependency needed for a random walk).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn random_walks_keep_the_invariants() {
        let specs = [spec("a", 16), spec("a", 32), spec("a", 48)];
        let exits = [
            ChildExit::Code(ExitCode::GuestPoweroff),
            ChildExit::Code(ExitCode::GuestReset),
            ChildExit::Code(ExitCode::GuestCrash),
            ChildExit::Code(ExitCode::VmmError),
            ChildExit::Code(ExitCode::Stopped),
            ChildExit::UnknownCode(1),
            ChildExit::Signal(9),
            ChildExit::Signal(libc::SIGSYS),
        ];
        let t0 = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200 {
            let mut rng = Lcg(seed);
            let mut s = specs[0].clone();
            s.restart.policy = [
                RestartPolicy::Always,
                RestartPolicy::OnFailure,
                RestartPolicy::Never,
            ][rng.below(3) as usize];
            s.restart.start_limit_burst = 1 + rng.below(6) as u32;
            let mut m = machine(s);
            let (mut t, mut next_pid, mut restarts) = (0u64, 1u32, 0u64);
            let (mut halted, mut forgotten) = (false, false);
            for step in 0..300 {
                let commands = [
                    Command::Stop,
                    Command::Start,
                    Command::Restart,
                    Command::Kill,
                    Command::Pause,
                    Command::Resume,
                    Command::ResetFailed,
                ];
                let input: Result<Event, Command> = if m.state() == &State::Spawning {
                    match rng.below(8) {
                        0 => Ok(Event::SpawnFailed { error: "x".into() }),
                        1 => Err(commands[rng.below(7) as usize]),
                        _ => {
                            next_pid += 1;
                            Ok(Event::Spawned {
                                pid: next_pid,
                                channel: rng.below(4) != 0,
                            })
                        }
                    }
                } else {
                    match rng.below(12) {
                        0 => Ok(Event::Start),
                        1 | 2 if m.pid().is_some() => Ok(Event::Exited {
                            how: exits[rng.below(exits.len() as u64) as usize],
                            oom: None,
                        }),
                        3 => Ok(reload(specs[rng.below(3) as usize].clone())),
                        4 if rng.below(10) == 0 => Ok(Event::Removed),
                        5 if rng.below(20) == 0 => Ok(Event::StopAll),
                        6 if rng.below(4) == 0 => Ok(Event::SendFailed { error: "x".into() }),
                        8..=11 => Err(commands[rng.below(7) as usize]),
                        _ => Ok(Event::Timer),
                    }
                };
                // Time jumps to the deadline sometimes, else a random short step.
                t = match (rng.below(2), m.deadline()) {
                    (0, Some(d)) => t.max((d - t0).as_millis() as u64),
                    _ => t + rng.below(2_000),
                };
                let what = format!("seed {seed} step {step}: {input:?} in {:?}", m.state());
                let old_pid = m.pid();
                halted |= input == Ok(Event::StopAll);
                let now = t0 + Duration::from_millis(t);
                let actions = match input {
                    Ok(event) => m.on_event(event, now),
                    Err(cmd) => {
                        let before = m.state().clone();
                        match m.on_command(cmd, now) {
                            Ok(a) => a,
                            Err(refusal) => {
                                assert_eq!(m.state(), &before, "{what}: a refusal changed it");
                                assert!(refusal.to_string().starts_with("vm a"), "{what}");
                                Vec::new()
                            }
                        }
                    }
                };
                for a in &actions {
                    match a {
                        Action::Send(_) => {
                            assert!(m.pid().is_some(), "{what}: a send without a child");
                        }
                        Action::Spawn => {
                            assert!(!halted, "{what}: a spawn after stop-all");
                            assert_eq!(m.state(), &State::Spawning, "{what}");
                        }
                        Action::Signal { pid, .. } => {
                            assert!(
                                old_pid == Some(*pid) || *pid == next_pid,
                                "{what}: signal to a pid it does not own"
                            );
                        }
                        Action::Forget => forgotten = true,
                        Action::Log { .. } => {}
                    }
                }
                seen.insert(m.vm_state());
                assert!(m.restarts() >= restarts, "{what}: restarts went down");
                restarts = m.restarts();
                if m.deadline().is_some() {
                    assert!(
                        matches!(
                            m.state(),
                            State::Starting { .. } | State::Stopping { .. } | State::Backoff { .. }
                        ),
                        "{what}: a timer in {:?}",
                        m.state()
                    );
                }
                if m.pid().is_some() {
                    assert!(m.vm_state().has_child(), "{what}");
                }
                if forgotten {
                    assert_eq!(m.pid(), None, "{what}: forgotten with a child");
                    break;
                }
            }
        }
        assert_eq!(seen.len(), VmState::ALL.len(), "states reached: {seen:?}");
    }

    /// A running VM with a control channel, child pid 7, at t0 + 500 ms.
    fn running_with_channel(t0: Instant) -> Machine {
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        m.on_event(spawned_ch(7), t0);
        m.on_event(Event::Timer, t0 + Duration::from_millis(SETTLE_MS));
        assert_eq!(m.vm_state(), Running);
        m
    }

    const CAD: &str = "send CtrlAltDel";
    const ASKED: &str = "<6>stopping (Ctrl-Alt-Del sent to the guest)";

    #[test]
    fn a_graceful_stop_asks_the_guest_then_terms_then_kills() {
        let t0 = Instant::now();
        // The guest ignores Ctrl-Alt-Del: SIGTERM after the grace, SIGKILL 3 s later.
        let mut m = running_with_channel(t0);
        assert_eq!(command(&mut m, t0, 1000, Command::Stop), [CAD, ASKED]);
        assert_eq!(m.vm_state(), Stopping);
        assert_eq!(
            m.deadline(),
            Some(t0 + Duration::from_millis(1000 + GRACE_MS))
        );
        let term_at = 1000 + GRACE_MS;
        let kill_at = term_at + HARD_STOP_WAIT.as_millis() as u64;
        play(
            &mut m,
            t0,
            &[
                (term_at - 1, Event::Timer, &[], Stopping),
                (
                    term_at,
                    Event::Timer,
                    &[
                        "<4>guest did not shut down within the grace period (10.0 s): SIGTERM",
                        "TERM 7",
                    ],
                    Stopping,
                ),
                (kill_at - 1, Event::Timer, &[], Stopping),
                (
                    kill_at,
                    Event::Timer,
                    &["KILL 7", "<4>did not stop within the grace period: SIGKILL"],
                    Stopping,
                ),
                (kill_at + 1, Event::Timer, &[], Stopping),
                (
                    kill_at + 10,
                    signal(9),
                    &[
                        "<6>exited: killed by signal 9 (SIGKILL)",
                        "<6>stopped (by a user; `start` brings it back)",
                    ],
                    StoppedByUser,
                ),
            ],
        );
        assert_eq!(m.deadline(), None);
        assert_eq!(m.restarts(), 0);
        // Every way a child being stopped can end is the requested stop: never restarted,
        // whatever the policy (always) says about that exit.
        for how in [
            ChildExit::Code(ExitCode::GuestPoweroff),
            ChildExit::Code(ExitCode::GuestReset),
            ChildExit::Code(ExitCode::GuestCrash),
            ChildExit::Code(ExitCode::Stopped),
            ChildExit::Signal(6),
        ] {
            let mut m = running_with_channel(t0);
            m.on_command(Command::Stop, t0 + Duration::from_millis(1000))
                .unwrap();
            let ev = Event::Exited { how, oom: None };
            let got = show(&m.on_event(ev, t0 + Duration::from_millis(1100)));
            assert_eq!(
                got.last().unwrap(),
                "<6>stopped (by a user; `start` brings it back)"
            );
            assert_eq!((m.vm_state(), m.restarts()), (StoppedByUser, 0), "{how:?}");
            assert_eq!(m.last_exit(), Some(how));
        }
        // The fleet's stop goes the same way, and so does a reload's edit.
        let mut m = running_with_channel(t0);
        assert_eq!(show(&m.on_event(Event::StopAll, t0)), [CAD, ASKED]);
        let mut m = running_with_channel(t0);
        assert_eq!(show(&m.on_event(reload(spec("a", 32)), t0)), [CAD, ASKED]);
        let done = show(&m.on_event(code(ExitCode::GuestPoweroff), t0));
        assert_eq!(done.last().unwrap(), "spawn");
        // A child without a channel: SIGTERM at once, SIGKILL after the grace.
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        m.on_event(spawned(7), t0);
        assert_eq!(
            command(&mut m, t0, 1000, Command::Stop),
            ["TERM 7", "<6>stopping"]
        );
        assert_eq!(
            m.deadline(),
            Some(t0 + Duration::from_millis(1000 + GRACE_MS))
        );
    }

    #[test]
    fn a_failed_send_goes_on_with_the_hard_stop() {
        let t0 = Instant::now();
        let mut m = running_with_channel(t0);
        command(&mut m, t0, 1000, Command::Stop);
        play(
            &mut m,
            t0,
            &[(
                1001,
                Event::SendFailed {
                    error: "broken pipe".into(),
                },
                &[
                    "<4>cannot ask the guest to shut down: broken pipe",
                    "TERM 7",
                ],
                Stopping,
            )],
        );
        assert_eq!(
            m.deadline(),
            Some(t0 + Duration::from_millis(1001) + HARD_STOP_WAIT)
        );
        // A pause that could not be sent leaves it running.
        let mut m = running_with_channel(t0);
        assert_eq!(
            command(&mut m, t0, 1000, Command::Pause),
            ["send Pause", "<6>paused"]
        );
        let got = show(&m.on_event(
            Event::SendFailed {
                error: "gone".into(),
            },
            t0,
        ));
        assert_eq!(got, ["<4>cannot pause: gone; still running"]);
        assert_eq!(m.vm_state(), Running);
        // A resume that could not be sent leaves it paused (and `resume` may be tried
        // again), instead of a machine that says running over parked vCPUs.
        let mut m = running_with_channel(t0);
        command(&mut m, t0, 1000, Command::Pause);
        assert_eq!(
            command(&mut m, t0, 1001, Command::Resume),
            ["send Resume", "<6>resumed"]
        );
        let got = show(&m.on_event(
            Event::SendFailed {
                error: "full".into(),
            },
            t0,
        ));
        assert_eq!(got, ["<4>cannot resume: full; still paused"]);
        assert_eq!(m.vm_state(), Paused);
        assert_eq!(
            command(&mut m, t0, 1002, Command::Resume),
            ["send Resume", "<6>resumed"]
        );
    }

    #[test]
    fn a_user_stop_survives_reloads_until_start() {
        let t0 = Instant::now();
        let mut m = running_with_channel(t0);
        command(&mut m, t0, 1000, Command::Stop);
        // An edit during the stop: it takes the new spec and still stays down.
        play(
            &mut m,
            t0,
            &[
                (
                    1100,
                    reload(spec("a", 32)),
                    &["<6>configuration changed; stays stopped until `start`"],
                    Stopping,
                ),
                (
                    1200,
                    code(ExitCode::GuestPoweroff),
                    &[
                        "<6>exited: guest powered off (exit code 0)",
                        "<6>stopped (by a user; `start` brings it back)",
                    ],
                    StoppedByUser,
                ),
                (1300, reload(spec("a", 32)), &[], StoppedByUser),
                (
                    1400,
                    reload(spec("a", 48)),
                    &["<6>configuration changed; stays stopped until `start`"],
                    StoppedByUser,
                ),
                (1500, Event::Start, &[], StoppedByUser),
                (1600, Event::Timer, &[], StoppedByUser),
            ],
        );
        assert_eq!(m.spec(), &spec("a", 48));
        assert_eq!(
            command(&mut m, t0, 1700, Command::Stop),
            ["!vm a is already stopped (stopped-by-user)"]
        );
        assert_eq!(
            command(&mut m, t0, 1800, Command::Start),
            ["<6>starting (asked by a user)", "spawn"]
        );
        play(
            &mut m,
            t0,
            &[(1800, spawned_ch(8), &["<6>starting (pid 8)"], Starting)],
        );
        // Removed while stopped by its user: forgotten at once.
        let mut m = running_with_channel(t0);
        command(&mut m, t0, 1000, Command::Kill);
        m.on_event(signal(9), t0 + Duration::from_millis(1010));
        play(
            &mut m,
            t0,
            &[(1100, Event::Removed, &["<6>removed", "forget"], Stopped)],
        );
    }

    #[test]
    fn kill_restart_and_start_in_backoff() {
        let t0 = Instant::now();
        let mut m = running_with_channel(t0);
        play(
            &mut m,
            t0,
            &[
                (
                    1000,
                    code(ExitCode::GuestCrash),
                    &[
                        "<4>exited: guest crashed (exit code 4)",
                        "<6>restarting in 0.1 s",
                    ],
                    Backoff,
                ),
                (1100, Event::Timer, &["spawn"], Starting),
                (1100, spawned_ch(8), &["<6>starting (pid 8)"], Starting),
            ],
        );
        assert_eq!(m.restarts(), 1);
        // kill: SIGKILL now, no grace; then it stays down, not restarted, not counted.
        assert_eq!(command(&mut m, t0, 1200, Command::Kill), ["KILL 8"]);
        assert_eq!(m.deadline(), None);
        assert_eq!(
            command(&mut m, t0, 1201, Command::Stop),
            ["!vm a is already stopping"]
        );
        play(
            &mut m,
            t0,
            &[(
                1210,
                signal(9),
                &[
                    "<6>exited: killed by signal 9 (SIGKILL)",
                    "<6>stopped (by a user; `start` brings it back)",
                ],
                StoppedByUser,
            )],
        );
        assert_eq!(m.restarts(), 1);
        // restart of a stopped VM starts it; of a running one stops it first.
        assert_eq!(
            command(&mut m, t0, 1300, Command::Restart),
            ["<6>starting (asked by a user)", "spawn"]
        );
        m.on_event(spawned_ch(9), t0 + Duration::from_millis(1300));
        assert_eq!(command(&mut m, t0, 1400, Command::Restart), [CAD, ASKED]);
        play(
            &mut m,
            t0,
            &[
                (
                    1500,
                    code(ExitCode::GuestPoweroff),
                    &[
                        "<6>exited: guest powered off (exit code 0)",
                        "<6>starting again (asked by a user)",
                        "spawn",
                    ],
                    Starting,
                ),
                (1500, spawned_ch(10), &["<6>starting (pid 10)"], Starting),
            ],
        );
        assert_eq!(m.restarts(), 1, "a user's restart is not the policy's");
        // start in backoff: at once.
        m.on_event(signal(11), t0 + Duration::from_millis(1600));
        assert_eq!(m.vm_state(), Backoff);
        assert_eq!(
            command(&mut m, t0, 1601, Command::Start),
            ["<6>starting (asked by a user)", "spawn"]
        );
        // stop in backoff: the restart is cancelled.
        let mut m = running_with_channel(t0);
        m.on_event(signal(11), t0 + Duration::from_millis(1000));
        assert_eq!(
            command(&mut m, t0, 1001, Command::Stop),
            ["<6>stopped (asked by a user)"]
        );
        assert_eq!((m.vm_state(), m.deadline()), (StoppedByUser, None));
    }

    #[test]
    fn a_user_stop_or_kill_during_an_edits_stop_keeps_the_edit_and_stays_down() {
        let t0 = Instant::now();
        for cmd in [Command::Stop, Command::Kill] {
            let mut m = running_with_channel(t0);
            assert_eq!(show(&m.on_event(reload(spec("a", 32)), t0)), [CAD, ASKED]);
            // start/restart while an edit's stop runs: it restarts anyway.
            assert_eq!(command(&mut m, t0, 0, Command::Start), Vec::<String>::new());
            command(&mut m, t0, 0, cmd);
            assert_eq!(m.spec(), &spec("a", 32), "{cmd:?}");
            let got = show(&m.on_event(signal(9), t0));
            assert_eq!(
                got.last().unwrap(),
                "<6>stopped (by a user; `start` brings it back)",
                "{cmd:?}"
            );
            assert_eq!(m.vm_state(), StoppedByUser);
            assert!(!m.changed_by(&spec("a", 32)));
        }
    }

    #[test]
    fn pause_and_resume() {
        let t0 = Instant::now();
        let mut m = running_with_channel(t0);
        play_commands(
            &mut m,
            t0,
            &[
                (Command::Resume, &["!vm a is not paused (running)"], Running),
                (Command::Pause, &["send Pause", "<6>paused"], Paused),
                (Command::Pause, &["!vm a is already paused"], Paused),
                (Command::Start, &["!vm a is already paused"], Paused),
                (Command::Resume, &["send Resume", "<6>resumed"], Running),
                (Command::Pause, &["send Pause", "<6>paused"], Paused),
                // Stopping a paused guest resumes it first, or it cannot see Ctrl-Alt-Del.
                (Command::Stop, &["send Resume", CAD, ASKED], Stopping),
                (
                    Command::Pause,
                    &["!vm a is not running (stopping)"],
                    Stopping,
                ),
            ],
        );
        assert_eq!(m.pid(), Some(7));
        // A paused child that dies is restarted by its policy like any other.
        let mut m = running_with_channel(t0);
        m.on_command(Command::Pause, t0).unwrap();
        assert_eq!(m.deadline(), None);
        let got = show(&m.on_event(signal(9), t0));
        assert_eq!(got.last().unwrap(), "<6>restarting in 0.1 s");
        // Without a control channel there is nothing to pause with.
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        m.on_event(spawned(7), t0);
        assert_eq!(
            command(&mut m, t0, 0, Command::Pause),
            ["!vm a: its process has no control channel (started by an older vmm-fleet?)"]
        );
    }

    /// Play user commands on `m`, each at `t0`: actions (or `!refusal`), state after.
    fn play_commands(m: &mut Machine, t0: Instant, steps: &[(Command, &[&str], VmState)]) {
        for (i, (cmd, want, state)) in steps.iter().enumerate() {
            assert_eq!(command(m, t0, 0, *cmd), *want, "step {i}: {cmd:?}");
            assert_eq!(m.vm_state(), *state, "step {i}: {cmd:?}");
        }
    }

    #[test]
    fn reset_failed_clears_the_start_limit_and_starts_it() {
        let t0 = Instant::now();
        let mut s = spec("a", 16);
        s.restart.start_limit_burst = 2;
        let mut m = machine(s);
        m.on_event(Event::Start, t0);
        m.on_event(spawned_ch(7), t0);
        m.on_event(signal(9), t0);
        m.on_event(Event::Timer, t0 + Duration::from_millis(100));
        m.on_event(spawned_ch(8), t0 + Duration::from_millis(100));
        m.on_event(signal(9), t0 + Duration::from_millis(150));
        assert_eq!(m.vm_state(), Failed);
        play_commands(
            &mut m,
            t0,
            &[
                (
                    Command::Start,
                    &["!vm a has failed (start limit); `reset-failed a` starts it again"],
                    Failed,
                ),
                (
                    Command::Stop,
                    &["!vm a is already stopped (failed)"],
                    Failed,
                ),
                (Command::Kill, &["!vm a is not running (failed)"], Failed),
                (
                    Command::ResetFailed,
                    &["<6>start limit reset; starting (asked by a user)", "spawn"],
                    Starting,
                ),
                (
                    Command::ResetFailed,
                    &["!vm a has not failed (starting)"],
                    Starting,
                ),
            ],
        );
        // A fresh history: the next crash is restarted, not failed at once.
        m.on_event(spawned_ch(9), t0 + Duration::from_millis(200));
        let got = show(&m.on_event(signal(9), t0 + Duration::from_millis(250)));
        assert_eq!(got.last().unwrap(), "<6>restarting in 0.1 s");
    }

    #[test]
    fn commands_while_the_fleet_stops_or_the_vm_is_removed_are_refused() {
        let t0 = Instant::now();
        let mut m = running_with_channel(t0);
        m.on_event(Event::Removed, t0);
        for cmd in [Command::Stop, Command::Start, Command::Kill, Command::Pause] {
            assert_eq!(
                command(&mut m, t0, 0, cmd),
                ["!vm a is being removed (its file is gone)"]
            );
        }
        let mut m = running_with_channel(t0);
        m.on_event(Event::StopAll, t0);
        m.on_event(code(ExitCode::Stopped), t0);
        assert_eq!(
            command(&mut m, t0, 0, Command::Start),
            ["!vm a: the fleet is stopping"]
        );
        assert_eq!(m.vm_state(), Stopped);
        // A stop during a spawn cancels it: the late child is killed unseen.
        let mut m = machine(spec("a", 16));
        m.on_event(Event::Start, t0);
        assert_eq!(
            command(&mut m, t0, 0, Command::Stop),
            ["<6>stopped before its start (asked by a user)"]
        );
        assert_eq!(show(&m.on_event(spawned_ch(7), t0)), ["KILL 7"]);
        assert_eq!(m.vm_state(), StoppedByUser);
    }
}
