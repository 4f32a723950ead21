//! One supervised VM's lifecycle as one explicit state machine: a [`State`] enum and one
//! pure transition function, [`Machine::on_event`], that turns an [`Event`] at a given
//! time into [`Action`]s.
//!
//! No syscalls and no clock reads here: the event loop ([`super`]) turns OS events
//! (waitpid, signals, a reload's result, its timeout) into events and the actions into
//! syscalls (fork/exec, kill, log lines). Its only timer is [`Machine::deadline`], which
//! follows from the state, so a timer can never be left armed for a state that is gone.
//! The restart decisions (backoff, start limit) are the policy's ([`Restarter`]).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::policy::{ChildExit, Decision, Restarter, VmState};
use crate::config::VmSpec;
use crate::protocol::ExitCode;

/// The fleet settings a machine's timers come from (they may change at a reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From SIGTERM to SIGKILL when stopping a child (`stop_grace_s`).
    pub stop_grace: Duration,
    /// From a start until the VM counts as running (`startup_settle_ms`).
    pub startup_settle: Duration,
}

/// What happens once a child that is being stopped is gone.
#[derive(Debug, Clone, PartialEq)]
pub enum Then {
    /// It stays down (the fleet is stopping).
    StayDown,
    /// The VM is forgotten (its file was removed).
    Remove,
    /// It starts again with this spec (its file changed).
    Replace(Box<VmSpec>),
}

/// Where one VM stands.
#[derive(Debug, Clone, PartialEq)]
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
        running_at: Instant,
    },
    /// The child runs and its guest is up.
    Running {
        /// The child.
        pid: u32,
    },
    /// The child was sent SIGTERM; SIGKILL follows at `kill_at` (`None` once sent).
    Stopping {
        /// The child.
        pid: u32,
        /// When SIGKILL is due; `None` once sent.
        kill_at: Option<Instant>,
        /// What follows its exit.
        then: Then,
    },
    /// No child; the policy restarts it at `until` (`None`: a delay too long to
    /// represent, i.e. never).
    Backoff {
        /// When the restart is due.
        until: Option<Instant>,
    },
    /// No child and none planned (the policy said stay down, or the fleet stops).
    Stopped,
    /// The start limit was hit: no child until its file is edited.
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
    },
    /// The child asked for by [`Action::Spawn`] could not be started.
    SpawnFailed {
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

/// One VM's state machine.
#[derive(Debug, Clone)]
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
        }
    }

    /// The spec its children run (the one before a pending replacement).
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
            State::Spawning | State::Starting { .. } => VmState::Starting,
            State::Running { .. } => VmState::Running,
            State::Stopping { .. } => VmState::Stopping,
            State::Backoff { .. } => VmState::Backoff,
            State::Failed => VmState::Failed,
        }
    }

    /// The child's pid, while there is one.
    pub fn pid(&self) -> Option<u32> {
        match self.state {
            State::Starting { pid, .. } | State::Running { pid } | State::Stopping { pid, .. } => {
                Some(pid)
            }
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
            State::Stopping { kill_at, .. } => kill_at,
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
            Event::Spawned { pid } => self.on_spawned(pid, now),
            Event::SpawnFailed { error } => self.on_spawn_failed(&error, now),
            Event::Exited { how, oom } => self.on_exited(how, oom, now),
            Event::Timer => self.on_timer(now),
            Event::Reload(spec) => self.on_reload(spec, now),
            Event::Removed => self.on_removed(now),
            Event::StopAll => self.on_stop_all(now),
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

    fn on_spawned(&mut self, pid: u32, now: Instant) -> Vec<Action> {
        if self.state != State::Spawning {
            // Nothing asked for this child: it must not run unsupervised.
            return vec![Action::Signal {
                pid,
                signal: Signal::SIGKILL,
            }];
        }
        self.restarter.started(now);
        self.state = State::Starting {
            pid,
            running_at: now + self.timing.startup_settle,
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
        let mut actions = Vec::new();
        if let Some(oom) = oom {
            actions.push(log(3, oom));
        }
        let prio = if how.is_clean_end() { 6 } else { 4 };
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
        match then {
            Then::StayDown => actions.extend(self.decide(how, now)),
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
                kill_at: Some(t),
                ..
            } if t <= now => {
                if let State::Stopping { kill_at, .. } = &mut self.state {
                    *kill_at = None;
                }
                vec![
                    Action::Signal {
                        pid,
                        signal: Signal::SIGKILL,
                    },
                    log(4, "did not stop within the grace period: SIGKILL"),
                ]
            }
            State::Backoff { until: Some(t) } if t <= now && !self.halted => {
                self.restarts = self.restarts.saturating_add(1);
                self.spawn()
            }
            _ => Vec::new(),
        }
    }

    /// The new spec of an edited VM: its restart count and last exit are kept, its
    /// backoff and start-limit history start afresh.
    fn replace_spec(&mut self, spec: VmSpec) {
        self.restarter = Restarter::new(spec.restart);
        self.spec = spec;
    }

    /// Ask a running child to stop (SIGTERM now, SIGKILL after the grace period); a stop
    /// already under way keeps its SIGKILL deadline and only changes what follows.
    fn stop(&mut self, then: Then, now: Instant) -> Vec<Action> {
        match &mut self.state {
            State::Stopping { then: t, .. } => {
                *t = then;
                Vec::new()
            }
            State::Starting { pid, .. } | State::Running { pid } => {
                let pid = *pid;
                self.restarter.stop_requested();
                self.state = State::Stopping {
                    pid,
                    kill_at: now.checked_add(self.timing.stop_grace),
                    then,
                };
                vec![
                    Action::Signal {
                        pid,
                        signal: Signal::SIGTERM,
                    },
                    log(6, "stopping"),
                ]
            }
            _ => Vec::new(),
        }
    }

    fn on_reload(&mut self, spec: Box<VmSpec>, now: Instant) -> Vec<Action> {
        if self.halted || !self.changed_by(&spec) {
            return Vec::new();
        }
        match self.state {
            State::Starting { .. } | State::Running { .. } | State::Stopping { .. } => {
                self.stop(Then::Replace(spec), now)
            }
            State::Spawning => Vec::new(),
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
            State::Starting { .. } | State::Running { .. } | State::Stopping { .. } => {
                self.stop(Then::Remove, now)
            }
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
                then: Then::Remove, ..
            } => Vec::new(),
            State::Starting { .. } | State::Running { .. } | State::Stopping { .. } => {
                self.stop(Then::StayDown, now)
            }
            State::Backoff { .. } | State::Spawning => {
                self.restarter.stop_requested();
                self.state = State::Stopped;
                Vec::new()
            }
            State::New | State::Stopped | State::Failed => Vec::new(),
        }
    }
}
