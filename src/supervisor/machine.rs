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
        Event::Spawned { pid }
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

    use VmState::{Backoff, Failed, Running, Starting, Stopped, Stopping};

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
                    &["<4>exited: killed by signal 9 (SIGKILL)", "<6>stopped"],
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
                let event = if m.state() == &State::Spawning {
                    if rng.below(4) == 0 {
                        Event::SpawnFailed { error: "x".into() }
                    } else {
                        next_pid += 1;
                        spawned(next_pid)
                    }
                } else {
                    match rng.below(8) {
                        0 => Event::Start,
                        1 | 2 if m.pid().is_some() => Event::Exited {
                            how: exits[rng.below(exits.len() as u64) as usize],
                            oom: None,
                        },
                        3 => reload(specs[rng.below(3) as usize].clone()),
                        4 if rng.below(10) == 0 => Event::Removed,
                        5 if rng.below(20) == 0 => Event::StopAll,
                        _ => Event::Timer,
                    }
                };
                // Time jumps to the deadline sometimes, else a random short step.
                t = match (rng.below(2), m.deadline()) {
                    (0, Some(d)) => t.max((d - t0).as_millis() as u64),
                    _ => t + rng.below(2_000),
                };
                let what = format!("seed {seed} step {step}: {event:?} in {:?}", m.state());
                let old_pid = m.pid();
                halted |= event == Event::StopAll;
                let actions = m.on_event(event, t0 + Duration::from_millis(t));
                for a in &actions {
                    match a {
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
}
