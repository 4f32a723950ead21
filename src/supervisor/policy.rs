//! The restart policy as a pure state machine: `always` / `on-failure` / `never`,
//! exponential backoff with a cap, and a systemd-style start limit. It decides; the VM's
//! lifecycle, its timers included, is its state machine's ([`super::machine`]).
//!
//! No syscalls and no clock reads: the supervisor passes every [`Instant`] in, so the
//! whole machine is deterministic and tested with tables below. Every method is total:
//! no input sequence panics (exits without a start, double starts, time going backwards).

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::config::{RestartPolicy, RestartSpec};
use crate::protocol::ExitCode;

/// How a child ended, as the supervisor saw it in waitpid: typed by the protocol's
/// [`ExitCode`] where the status is one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChildExit {
    /// The process exited with one of the codes of [`ExitCode`].
    Code(ExitCode),
    /// The process exited with a status that is not one of ours.
    UnknownCode(i32),
    /// The process was killed by this signal number.
    Signal(i32),
}

impl ChildExit {
    /// The exit of a process that ended with status `code` (waitpid's `WEXITSTATUS`).
    pub fn from_status(code: i32) -> Self {
        ExitCode::from_code(code).map_or(ChildExit::UnknownCode(code), ChildExit::Code)
    }

    /// The exit code, if it is one of the codes of [`ExitCode`].
    pub fn exit_code(&self) -> Option<ExitCode> {
        match *self {
            ChildExit::Code(c) => Some(c),
            ChildExit::UnknownCode(_) | ChildExit::Signal(_) => None,
        }
    }

    /// The shell's number for this exit: the status, or 128 + the signal (a metric).
    pub fn status_number(&self) -> i64 {
        match *self {
            ChildExit::Code(c) => i64::from(c.code()),
            ChildExit::UnknownCode(c) => i64::from(c),
            ChildExit::Signal(s) => 128 + i64::from(s),
        }
    }

    /// Whether this exit is a failure: killed by a signal, guest crash, VMM error, or a
    /// code that is not one of ours. Power-off, guest reset and a clean stop are not.
    pub fn is_failure(&self) -> bool {
        match *self {
            ChildExit::Signal(_) | ChildExit::UnknownCode(_) => true,
            ChildExit::Code(c) => match c {
                ExitCode::GuestPoweroff | ExitCode::GuestReset | ExitCode::Stopped => false,
                ExitCode::GuestCrash | ExitCode::VmmError => true,
            },
        }
    }

    /// Whether this is an end the VM meant (the guest powered off, or it stopped cleanly
    /// when asked): logged as information, not as a warning.
    pub fn is_clean_end(&self) -> bool {
        matches!(
            self,
            ChildExit::Code(ExitCode::GuestPoweroff | ExitCode::Stopped)
        )
    }

    /// Whether the child was killed by SIGSYS: its seccomp filter caught a system call
    /// its thread may not make (a failure like any other death by signal).
    pub fn is_seccomp_violation(&self) -> bool {
        *self == ChildExit::Signal(libc::SIGSYS)
    }

    /// A human description for logs, e.g. `"guest crashed (exit code 4)"`,
    /// `"killed by signal 9 (SIGKILL)"`, `"exit code 42"`.
    pub fn describe(&self) -> String {
        match *self {
            ChildExit::Code(code) => {
                let what = match code {
                    ExitCode::GuestPoweroff => "guest powered off",
                    ExitCode::GuestReset => "guest reset",
                    ExitCode::GuestCrash => "guest crashed",
                    ExitCode::VmmError => "VMM error",
                    ExitCode::Stopped => "stopped cleanly",
                };
                format!("{what} (exit code {})", code.code())
            }
            ChildExit::UnknownCode(c) => format!("exit code {c}"),
            ChildExit::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => format!("killed by signal {s} ({})", sig.as_str()),
                Err(_) => format!("killed by signal {s}"),
            },
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The VM's lifecycle state as the supervisor reports it (also a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum VmState {
    /// The child was started; the guest is not known to be up yet.
    Starting,
    /// The guest is up.
    Running,
    /// The child exited and waits for its backoff delay before starting again.
    Backoff,
    /// The supervisor asked the child to stop and waits for it to exit.
    Stopping,
    /// No child and none planned (never started, stopped, or the policy said stay down);
    /// a reload that edits its file starts it.
    Stopped,
    /// The start limit was reached; it stays down until `reset-failed` (or an edit).
    Failed,
    /// The child's vCPUs are parked by a user (`pause`), until `resume`.
    Paused,
    /// A user stopped it (`stop`, `kill`): it stays down, through reloads and other VMs'
    /// events, until a user starts it.
    StoppedByUser,
}

impl VmState {
    /// Every state, in declaration order (for metrics that export one series per state).
    pub const ALL: [VmState; 8] = [
        VmState::Starting,
        VmState::Running,
        VmState::Backoff,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
        VmState::Paused,
        VmState::StoppedByUser,
    ];

    /// A short lower-case name, for logs and metrics labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Backoff => "backoff",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Paused => "paused",
            VmState::StoppedByUser => "stopped-by-user",
        }
    }

    /// Whether a child process is (believed to be) alive in this state.
    pub fn has_child(&self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Stopping | VmState::Paused
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the supervisor must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start the child again after `delay` (may be zero).
    RestartAfter(Duration),
    /// Leave it down: the policy says no restart (e.g. clean power-off under on-failure,
    /// anything under never, or a stop the supervisor asked for).
    StayDown,
    /// The start limit is reached: mark it failed, log once, never restart on its own.
    Failed,
}

/// The restart state machine of one VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Restarter {
    spec: RestartSpec,
    state: VmState,
    /// Failures since the last stable run (saturating).
    consecutive_failures: u32,
    /// Start times within the start-limit interval (at most `start_limit_burst` kept).
    #[serde(with = "super::handover::clock::deque")]
    recent_starts: VecDeque<Instant>,
    /// The last start, for the uptime of the run that just ended.
    #[serde(with = "super::handover::clock::option")]
    last_start: Option<Instant>,
    /// The supervisor stops this child on purpose: its next exit is not restarted.
    stop_requested: bool,
    /// Latched by the start limit; only [`Restarter::reset`] clears it.
    failed: bool,
    /// Every start ever recorded (not cleared by reset: it feeds a counter).
    total_starts: u64,
}

impl Restarter {
    /// A machine for `spec`: state [`VmState::Stopped`], nothing recorded.
    pub fn new(spec: RestartSpec) -> Self {
        Self {
            spec,
            state: VmState::Stopped,
            consecutive_failures: 0,
            recent_starts: VecDeque::new(),
            last_start: None,
            stop_requested: false,
            failed: false,
            total_starts: 0,
        }
    }

    /// The restart settings in use.
    pub fn spec(&self) -> &RestartSpec {
        &self.spec
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Starts after the first one, over the whole life of this machine (not cleared by
    /// [`Restarter::reset`], so it can feed a Prometheus counter, which only goes up).
    pub fn starts(&self) -> u64 {
        self.total_starts
    }

    /// Starts after the first one (feeds a restarts counter; never goes down).
    pub fn restarts(&self) -> u64 {
        self.total_starts.saturating_sub(1)
    }

    /// Failures since the last stable run (what the next backoff delay is based on).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// The child was started at `now`. Records the start (for the start limit and for
    /// uptime) and clears any earlier stop request. State -> Starting.
    ///
    /// Does not clear the start-limit latch: after a [`Decision::Failed`], the supervisor
    /// must call [`Restarter::reset`] before starting the VM again, or its next exit is
    /// reported as `Failed` once more.
    pub fn started(&mut self, now: Instant) {
        self.prune(now);
        self.recent_starts.push_back(now);
        let burst = usize::try_from(self.spec.start_limit_burst.max(1)).unwrap_or(usize::MAX);
        while self.recent_starts.len() > burst {
            self.recent_starts.pop_front();
        }
        self.last_start = Some(now);
        self.total_starts = self.total_starts.saturating_add(1);
        self.stop_requested = false;
        self.state = VmState::Starting;
    }

    /// The child's guest is up (e.g. first console output or a fixed settle time):
    /// Starting -> Running. No effect in any other state.
    pub fn running(&mut self) {
        if self.state == VmState::Starting {
            self.state = VmState::Running;
        }
    }

    /// The supervisor is stopping this VM on purpose (SIGTERM to the fleet, VM removed,
    /// or file changed): the next exit is not a failure and is not restarted.
    ///
    /// With a child alive (Starting, Running, Stopping) the state becomes Stopping. In
    /// Backoff there is no child: the pending restart is cancelled and the state becomes
    /// Stopped. Stopped and Failed do not change.
    pub fn stop_requested(&mut self) {
        match self.state {
            VmState::Starting | VmState::Running | VmState::Stopping | VmState::Paused => {
                self.stop_requested = true;
                self.state = VmState::Stopping;
            }
            VmState::Backoff => {
                self.state = VmState::Stopped;
            }
            VmState::Stopped | VmState::Failed | VmState::StoppedByUser => {}
        }
    }

    /// The child exited at `now`. Returns what to do and updates the state: Backoff for
    /// [`Decision::RestartAfter`], Stopped for [`Decision::StayDown`], Failed for
    /// [`Decision::Failed`].
    pub fn exited(&mut self, how: ChildExit, now: Instant) -> Decision {
        let stop = std::mem::take(&mut self.stop_requested);
        if self.failed {
            self.state = VmState::Failed;
            return Decision::Failed;
        }
        if stop {
            self.state = VmState::Stopped;
            return Decision::StayDown;
        }

        let uptime = self
            .last_start
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if uptime >= self.spec.stable_after() {
            self.consecutive_failures = 0;
        }

        let failure = how.is_failure();
        if failure {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
        let restart = match self.spec.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failure || how == ChildExit::Code(ExitCode::GuestReset),
            RestartPolicy::Always => true,
        };
        if !restart {
            self.state = VmState::Stopped;
            return Decision::StayDown;
        }

        self.prune(now);
        let interval = self.spec.start_limit_interval();
        let recent = self
            .recent_starts
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) <= interval)
            .count();
        if u64::try_from(recent).unwrap_or(u64::MAX) >= u64::from(self.spec.start_limit_burst) {
            self.failed = true;
            self.state = VmState::Failed;
            return Decision::Failed;
        }

        let delay = if failure {
            backoff_delay(&self.spec, self.consecutive_failures)
        } else {
            Duration::ZERO
        };
        self.state = VmState::Backoff;
        Decision::RestartAfter(delay)
    }

    /// Whether the policy wants the child started again (the state is Backoff). The
    /// delay's timer is the caller's (the VM's state machine keeps the deadline).
    pub fn due(&self) -> bool {
        self.state == VmState::Backoff
    }

    /// Reset after an edit or manual restart: failure count, start history, stop request
    /// and the start-limit latch cleared, state Stopped. [`Restarter::restarts`] is kept.
    pub fn reset(&mut self) {
        self.consecutive_failures = 0;
        self.recent_starts.clear();
        self.last_start = None;
        self.stop_requested = false;
        self.failed = false;
        self.state = VmState::Stopped;
    }

    /// Drop start times older than the start-limit interval before `now`.
    fn prune(&mut self, now: Instant) {
        let interval = self.spec.start_limit_interval();
        self.recent_starts
            .retain(|&t| now.saturating_duration_since(t) <= interval);
    }
}

/// `backoff_initial * multiplier^(failures - 1)`, capped at `backoff_max`, rounded to
/// whole milliseconds. Total: huge counts, an infinite or NaN multiplier give the cap or
/// the initial delay, never a panic.
pub fn backoff_delay(spec: &RestartSpec, failures: u32) -> Duration {
    let max_ms = spec.backoff_max_ms;
    let initial_ms = spec.backoff_initial_ms.min(max_ms);
    let exp = i32::try_from(failures.saturating_sub(1)).unwrap_or(i32::MAX);
    let ms = spec.backoff_initial_ms as f64 * spec.backoff_multiplier.powi(exp);
    if ms.is_nan() {
        return Duration::from_millis(initial_ms);
    }
    if ms >= max_ms as f64 {
        return Duration::from_millis(max_ms);
    }
    // 0 <= ms < max_ms here except for a negative multiplier; `as` saturates at 0.
    Duration::from_millis((ms.round() as u64).min(max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: RestartPolicy) -> RestartSpec {
        RestartSpec {
            policy,
            ..RestartSpec::default()
        }
    }

    /// What waitpid reports for a child that exited with status `c`.
    fn code(c: i32) -> ChildExit {
        ChildExit::from_status(c)
    }

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    const R0: Decision = Decision::RestartAfter(Duration::ZERO);
    const R100: Decision = Decision::RestartAfter(Duration::from_millis(100));

    #[test]
    fn every_policy_times_every_exit() {
        use ChildExit::Signal;
        let c = code;
        use RestartPolicy::{Always, Never, OnFailure};
        use VmState::{Backoff, Stopped};
        let down = Decision::StayDown;
        #[rustfmt::skip]
        let table: &[(RestartPolicy, ChildExit, Decision, VmState)] = &[
            (Never,     c(0),   down.clone(), Stopped),
            (Never,     c(3),   down.clone(), Stopped),
            (Never,     c(4),   down.clone(), Stopped),
            (Never,     c(5),   down.clone(), Stopped),
            (Never,     c(6),   down.clone(), Stopped),
            (Never,     c(42),  down.clone(), Stopped),
            (Never,     Signal(9), down.clone(), Stopped),
            (OnFailure, c(0),   down.clone(), Stopped),
            (OnFailure, c(3),   R0,           Backoff),
            (OnFailure, c(4),   R100,         Backoff),
            (OnFailure, c(5),   R100,         Backoff),
            (OnFailure, c(6),   down.clone(), Stopped),
            (OnFailure, c(42),  R100,         Backoff),
            (OnFailure, Signal(9), R100,         Backoff),
            (OnFailure, Signal(31), R100,        Backoff),
            (Always,    c(0),   R0,           Backoff),
            (Always,    c(3),   R0,           Backoff),
            (Always,    c(4),   R100,         Backoff),
            (Always,    c(5),   R100,         Backoff),
            (Always,    c(6),   R0,           Backoff),
            (Always,    c(42),  R100,         Backoff),
            (Always,    Signal(9), R100,         Backoff),
        ];
        let t0 = Instant::now();
        for (policy, how, want, want_state) in table {
            let mut r = Restarter::new(spec(*policy));
            r.started(t0);
            r.running();
            assert_eq!(r.state(), VmState::Running);
            let got = r.exited(*how, t0 + ms(1000));
            assert_eq!(&got, want, "{policy} {how:?}");
            assert_eq!(r.state(), *want_state, "{policy} {how:?}");
            assert_eq!(r.due(), *want_state == Backoff, "{policy} {how:?}");
        }
    }

    #[test]
    fn failure_classification() {
        for (how, failure) in [
            (code(0), false),
            (code(3), false),
            (code(6), false),
            (code(4), true),
            (code(5), true),
            (code(1), true),
            (code(-1), true),
            (ChildExit::Signal(9), true),
            (ChildExit::Signal(15), true),
            (ChildExit::Signal(libc::SIGSYS), true),
        ] {
            assert_eq!(how.is_failure(), failure, "{how:?}");
            assert_eq!(
                how.is_seccomp_violation(),
                how == ChildExit::Signal(libc::SIGSYS),
                "{how:?}"
            );
        }
    }

    #[test]
    fn describe() {
        for (how, text) in [
            (code(0), "guest powered off (exit code 0)"),
            (code(3), "guest reset (exit code 3)"),
            (code(4), "guest crashed (exit code 4)"),
            (code(5), "VMM error (exit code 5)"),
            (code(6), "stopped cleanly (exit code 6)"),
            (code(42), "exit code 42"),
            (ChildExit::Signal(9), "killed by signal 9 (SIGKILL)"),
            (ChildExit::Signal(11), "killed by signal 11 (SIGSEGV)"),
            (ChildExit::Signal(999), "killed by signal 999"),
            (ChildExit::Signal(-3), "killed by signal -3"),
        ] {
            assert_eq!(how.describe(), text);
            assert_eq!(how.to_string(), text);
        }
    }

    #[test]
    fn state_names() {
        let names: Vec<&str> = VmState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "starting",
                "running",
                "backoff",
                "stopping",
                "stopped",
                "failed",
                "paused",
                "stopped-by-user"
            ]
        );
        assert_eq!(VmState::Backoff.to_string(), "backoff");
    }

    #[test]
    fn stop_requested_means_stay_down_even_under_always() {
        let t0 = Instant::now();
        for how in [
            code(0),
            code(4),
            code(6),
            ChildExit::Signal(9),
            ChildExit::Signal(15),
        ] {
            let mut r = Restarter::new(spec(RestartPolicy::Always));
            r.started(t0);
            r.running();
            r.stop_requested();
            assert_eq!(r.state(), VmState::Stopping);
            r.running(); // no effect while stopping
            assert_eq!(r.state(), VmState::Stopping);
            assert_eq!(r.exited(how, t0 + ms(5)), Decision::StayDown, "{how:?}");
            assert_eq!(r.state(), VmState::Stopped);
            assert_eq!(r.consecutive_failures(), 0);
            // The request is consumed: the next run restarts as usual.
            r.started(t0 + ms(10));
            let want = if how.is_failure() { R100 } else { R0 };
            assert_eq!(r.exited(how, t0 + ms(20)), want, "{how:?}");
        }
    }

    #[test]
    fn stop_request_cleared_by_new_start() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::Always));
        r.started(t0);
        r.stop_requested();
        r.started(t0 + ms(1));
        assert_eq!(r.state(), VmState::Starting);
        assert_eq!(r.exited(code(0), t0 + ms(2)), R0);
    }

    #[test]
    fn stop_during_backoff_cancels_restart() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::OnFailure));
        r.started(t0);
        assert_eq!(r.exited(code(4), t0), R100);
        assert!(r.due());
        r.stop_requested();
        assert_eq!(r.state(), VmState::Stopped);
        assert!(!r.due());
        // Stop while already stopped: nothing changes, no stale request.
        r.stop_requested();
        assert_eq!(r.state(), VmState::Stopped);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut s = spec(RestartPolicy::OnFailure);
        s.backoff_max_ms = 1_000;
        s.start_limit_burst = 1_000;
        let t0 = Instant::now();
        let mut r = Restarter::new(s);
        let mut t = t0;
        let mut got = Vec::new();
        for _ in 0..7 {
            r.started(t);
            t += ms(50); // short runs, never stable
            match r.exited(ChildExit::Signal(11), t) {
                Decision::RestartAfter(d) => got.push(d.as_millis()),
                other => panic!("{other:?}"),
            }
            assert!(r.due());
        }
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(r.consecutive_failures(), 7);
    }

    #[test]
    fn backoff_formula_is_total() {
        let mut s = spec(RestartPolicy::OnFailure);
        assert_eq!(backoff_delay(&s, 0), ms(100));
        assert_eq!(backoff_delay(&s, 1), ms(100));
        assert_eq!(backoff_delay(&s, 9), ms(25_600));
        assert_eq!(backoff_delay(&s, 10), ms(30_000));
        assert_eq!(backoff_delay(&s, u32::MAX), ms(30_000));
        s.backoff_multiplier = 1.5;
        assert_eq!(backoff_delay(&s, 2), ms(150));
        assert_eq!(backoff_delay(&s, 4), ms(338)); // 337.5 rounded
        s.backoff_multiplier = f64::INFINITY;
        assert_eq!(backoff_delay(&s, 1), ms(100));
        assert_eq!(backoff_delay(&s, 2), ms(30_000));
        s.backoff_multiplier = f64::NAN;
        assert_eq!(backoff_delay(&s, 5), ms(100));
        s.backoff_multiplier = -3.0;
        assert_eq!(backoff_delay(&s, 2), ms(0));
        assert_eq!(backoff_delay(&s, 3), ms(900));
        s.backoff_multiplier = 2.0;
        s.backoff_initial_ms = 0;
        assert_eq!(backoff_delay(&s, u32::MAX), ms(0));
        s.backoff_multiplier = f64::INFINITY;
        assert_eq!(backoff_delay(&s, 3), ms(0)); // 0 * inf = NaN -> initial
        s.backoff_initial_ms = u64::MAX;
        s.backoff_max_ms = u64::MAX;
        s.backoff_multiplier = 2.0;
        assert_eq!(backoff_delay(&s, u32::MAX), ms(u64::MAX));
        s.backoff_initial_ms = 500;
        s.backoff_max_ms = 100; // initial above max: capped
        assert_eq!(backoff_delay(&s, 1), ms(100));
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let mut s = spec(RestartPolicy::Always);
        s.start_limit_burst = u32::MAX;
        s.start_limit_interval_s = u64::MAX;
        s.backoff_max_ms = u64::MAX;
        s.stable_after_s = u64::MAX;
        let mut r = Restarter::new(s);
        r.consecutive_failures = u32::MAX - 1;
        let t0 = Instant::now();
        for i in 0..3 {
            r.started(t0);
            assert_eq!(
                r.exited(ChildExit::Signal(9), t0),
                Decision::RestartAfter(ms(u64::MAX)),
                "{i}"
            );
            assert_eq!(r.consecutive_failures(), u32::MAX);
        }
    }

    #[test]
    fn stable_run_resets_backoff() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::OnFailure));
        let crash = code(4);
        r.started(t0);
        assert_eq!(r.exited(crash, t0 + ms(10)), R100);
        r.started(t0 + ms(200));
        assert_eq!(
            r.exited(crash, t0 + ms(300)),
            Decision::RestartAfter(ms(200))
        );
        r.started(t0 + ms(600));
        // Ran exactly stable_after (10 s): the count restarts from 1.
        assert_eq!(r.exited(crash, t0 + ms(10_600)), R100);
        assert_eq!(r.consecutive_failures(), 1);
        r.started(t0 + ms(10_800));
        // Just short of stable: grows again.
        assert_eq!(
            r.exited(crash, t0 + ms(20_799)),
            Decision::RestartAfter(ms(200))
        );
    }

    #[test]
    fn non_failure_restarts_do_not_grow_backoff() {
        let t0 = Instant::now();
        let mut s = spec(RestartPolicy::Always);
        s.start_limit_burst = 100;
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(4), t0 + ms(1)), R100);
        for (i, how) in [code(3), code(0), code(6)].into_iter().enumerate() {
            let t = t0 + ms(10 * (i as u64 + 1));
            r.started(t);
            assert_eq!(r.exited(how, t + ms(1)), R0, "{how:?}");
            assert_eq!(r.consecutive_failures(), 1);
        }
        r.started(t0 + ms(100));
        assert_eq!(
            r.exited(code(4), t0 + ms(101)),
            Decision::RestartAfter(ms(200))
        );
        // A stable clean run still resets the count.
        r.started(t0 + ms(1_000));
        assert_eq!(r.exited(code(3), t0 + ms(11_000)), R0);
        assert_eq!(r.consecutive_failures(), 0);
        r.started(t0 + ms(11_001));
        assert_eq!(r.exited(code(4), t0 + ms(11_002)), R100);
    }

    #[test]
    fn crash_loop_hits_the_start_limit_and_stays_failed() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::Always)); // burst 5 in 60 s
        let mut t = t0;
        for n in 1..=5 {
            r.started(t);
            t += ms(1_000);
            let d = r.exited(code(4), t);
            if n < 5 {
                assert!(matches!(d, Decision::RestartAfter(_)), "start {n}: {d:?}");
                assert_eq!(r.state(), VmState::Backoff);
            } else {
                assert_eq!(d, Decision::Failed, "start {n}");
                assert_eq!(r.state(), VmState::Failed);
            }
        }
        assert!(!r.due());
        assert_eq!(r.restarts(), 4);
        // Failed sticks: stop requests, running(), even an (erroneous) start and exit.
        r.stop_requested();
        r.running();
        assert_eq!(r.state(), VmState::Failed);
        assert_eq!(r.exited(code(0), t + ms(1)), Decision::Failed);
        r.started(t + ms(100_000));
        assert_eq!(r.exited(code(3), t + ms(200_000)), Decision::Failed);
        assert_eq!(r.state(), VmState::Failed);
        // reset() clears it.
        r.reset();
        assert_eq!(r.state(), VmState::Stopped);
        r.started(t + ms(300_000));
        assert_eq!(r.exited(code(4), t + ms(300_001)), R100);
    }

    #[test]
    fn start_limit_counts_clean_restarts_too() {
        let t0 = Instant::now();
        let mut s = spec(RestartPolicy::Always);
        s.start_limit_burst = 2;
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(0), t0 + ms(1)), R0);
        r.started(t0 + ms(2));
        assert_eq!(r.exited(code(0), t0 + ms(3)), Decision::Failed);
    }

    #[test]
    fn starts_outside_the_interval_are_not_counted() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::OnFailure)); // burst 5 in 60 s
        // Four quick crashes, then one every 20 s: the window never holds 5 starts
        // once the early ones age out.
        let mut t = t0;
        for _ in 0..4 {
            r.started(t);
            t += ms(10);
            assert!(matches!(r.exited(code(4), t), Decision::RestartAfter(_)));
        }
        // 61 s later the four old starts are out of the window.
        t = t0 + ms(61_000);
        for i in 0..20 {
            r.started(t);
            t += ms(5_000);
            let d = r.exited(code(4), t);
            assert!(matches!(d, Decision::RestartAfter(_)), "{i}: {d:?}");
            t += ms(15_000);
            assert!(r.recent_starts.len() <= 5);
        }
        // Exactly at the interval boundary the oldest start still counts (inclusive).
        let mut s = spec(RestartPolicy::OnFailure);
        s.start_limit_burst = 2;
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(4), t0 + ms(1)), R100);
        r.started(t0 + ms(30_000));
        assert_eq!(r.exited(code(4), t0 + ms(60_000)), Decision::Failed);
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(4), t0 + ms(1)), R100);
        r.started(t0 + ms(30_000));
        assert!(matches!(
            r.exited(code(4), t0 + ms(60_001)),
            Decision::RestartAfter(_)
        ));
    }

    #[test]
    fn long_single_run_is_not_counted() {
        // The current start itself ages out after a run longer than the interval.
        let t0 = Instant::now();
        let mut s = spec(RestartPolicy::Always);
        s.start_limit_burst = 1;
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(0), t0 + ms(60_001)), R0);
        r.started(t0 + ms(60_002));
        assert_eq!(r.exited(code(0), t0 + ms(60_003)), Decision::Failed);
    }

    #[test]
    fn reset_clears_history_but_keeps_restart_counter() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::OnFailure));
        for i in 0..3 {
            r.started(t0 + ms(i));
            r.exited(ChildExit::Signal(9), t0 + ms(i));
        }
        assert_eq!(r.consecutive_failures(), 3);
        assert_eq!(r.restarts(), 2);
        r.reset();
        assert_eq!(r.state(), VmState::Stopped);
        assert_eq!(r.consecutive_failures(), 0);
        assert!(r.recent_starts.is_empty());
        assert_eq!(r.restarts(), 2);
        assert!(!r.due());
        r.started(t0 + ms(10));
        assert_eq!(r.restarts(), 3);
        assert_eq!(r.exited(ChildExit::Signal(9), t0 + ms(11)), R100);
    }

    #[test]
    fn restarts_counts_starts_after_the_first() {
        let t0 = Instant::now();
        let mut r = Restarter::new(spec(RestartPolicy::Always));
        assert_eq!(r.restarts(), 0);
        r.started(t0);
        assert_eq!(r.restarts(), 0);
        r.started(t0 + ms(1));
        assert_eq!(r.restarts(), 1);
        r.started(t0 + ms(2));
        assert_eq!(r.restarts(), 2);
    }

    #[test]
    fn new_is_stopped_and_not_due() {
        let r = Restarter::new(RestartSpec::default());
        assert_eq!(r.state(), VmState::Stopped);
        assert_eq!(r.restarts(), 0);
        assert_eq!(r.consecutive_failures(), 0);
        assert!(!r.due());
    }

    #[test]
    fn odd_sequences_do_not_panic() {
        let t0 = Instant::now() + ms(100_000);
        let exits = [
            code(0),
            code(3),
            code(4),
            code(i32::MIN),
            ChildExit::Signal(9),
            ChildExit::Signal(i32::MAX),
        ];
        for policy in [
            RestartPolicy::Always,
            RestartPolicy::OnFailure,
            RestartPolicy::Never,
        ] {
            let mut s = spec(policy);
            s.start_limit_burst = 0; // invalid, but must not panic
            s.backoff_multiplier = f64::NAN;
            let mut r = Restarter::new(s);
            // Exit without a start.
            let _ = r.exited(code(4), t0);
            let _ = r.exited(code(4), t0);
            r.reset();
            let mut r = Restarter::new(spec(policy));
            // Started twice, exit with time going backwards, running when not starting.
            r.running();
            r.started(t0);
            r.started(t0 + ms(5));
            for (i, how) in exits.into_iter().enumerate() {
                let back = t0.checked_sub(ms(1_000 * i as u64)).unwrap_or(t0);
                let _ = r.exited(how, back);
                let _ = r.due();
                r.started(t0 + ms(50_000));
                r.stop_requested();
                r.stop_requested();
                let _ = r.exited(how, back);
                r.running();
                r.started(back);
            }
            assert!(r.recent_starts.len() <= 5);
        }
    }

    #[test]
    fn zero_burst_fails_on_first_restart() {
        let t0 = Instant::now();
        let mut s = spec(RestartPolicy::Always);
        s.start_limit_burst = 0;
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(0), t0), Decision::Failed);
        // ... but a stay-down exit is not a restart and is not limited.
        let mut s = spec(RestartPolicy::OnFailure);
        s.start_limit_burst = 0;
        let mut r = Restarter::new(s);
        r.started(t0);
        assert_eq!(r.exited(code(0), t0), Decision::StayDown);
    }
}
