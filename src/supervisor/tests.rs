//! The whole supervisor (machines, event dispatch, reload, stop, status) driven without
//! KVM or children: a fake spawner, a fake clock (every handler takes `now`), child exits
//! fed in as waitpid would report them, and the event log captured line by line.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::spawn::{Child, SpawnRequest, Spawner};
use super::*;
use crate::protocol::ExitCode;

/// Records what the supervisor asks; pids from 1000 up; fails while `fail` is set.
#[derive(Default)]
struct FakeSpawner {
    next_pid: u32,
    fail: Option<String>,
    spawned: Vec<(String, u64, u32)>,
    signals: Vec<(u32, Signal)>,
    /// Give each child a real control channel; the child's ends, by pid.
    channels: Option<HashMap<u32, std::os::fd::OwnedFd>>,
}

impl FakeSpawner {
    /// Every message child `pid` has been sent so far.
    fn received(&self, pid: u32) -> Vec<crate::protocol::ToChild> {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let fd = &self.channels.as_ref().expect("channels on")[&pid];
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            got.push(crate::protocol::ToChild::decode(&buf[..n]).expect("a valid packet"));
        }
        got
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> std::io::Result<Child> {
        if let Some(e) = &self.fail {
            return Err(std::io::Error::other(e.clone()));
        }
        let pid = 1000 + self.next_pid;
        self.next_pid += 1;
        self.spawned
            .push((req.spec.name.clone(), req.spec.memory_mib, pid));
        let channel = match &mut self.channels {
            Some(ends) => {
                let (ours, theirs) = channel::ChildChannel::pair()?;
                ends.insert(pid, theirs);
                Some(Arc::new(ours))
            }
            None => None,
        };
        Ok(Child { pid, channel })
    }

    fn signal(&mut self, pid: u32, sig: Signal) -> std::io::Result<()> {
        self.signals.push((pid, sig));
        Ok(())
    }
}

fn spec(name: &str, memory_mib: u64) -> VmSpec {
    let text = format!("name: {name}\nvcpus: 1\nmemory_mib: {memory_mib}\nkernel: builtin\n");
    VmSpec::from_yaml(&text, Path::new("/nonexistent/vm.yaml")).unwrap()
}

fn settings() -> FleetSettings {
    let mut s = FleetSettings::defaults("/nonexistent/log".into());
    s.stop_grace = Duration::from_secs(10);
    s.startup_settle = Duration::from_millis(500);
    s
}

struct Harness {
    sup: Supervisor<FakeSpawner>,
    log: Arc<Mutex<Vec<String>>>,
    t0: Instant,
    seen: usize,
}

impl Harness {
    fn new(specs: Vec<VmSpec>) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let event_log = EventLog {
            tty: true,
            captured: Some(log.clone()),
        };
        let source = FleetSource {
            dir: "/nonexistent".into(),
            settings: None,
            default_log_dir: "/nonexistent/log".into(),
            host_memory_mib: None,
        };
        let sup = Supervisor::new(source, settings(), specs, FakeSpawner::default(), event_log);
        Harness {
            sup,
            log,
            t0: Instant::now(),
            seen: 0,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// The log lines since the last call.
    fn lines(&mut self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        let new = log[self.seen..].to_vec();
        self.seen = log.len();
        new
    }

    fn start(&mut self, ms: u64) {
        self.sup.start_all(self.at(ms));
    }

    fn exit(&mut self, vm: &str, how: ChildExit, ms: u64) {
        let pid = self.pid(vm).expect("a child to exit");
        self.sup.on_child_exit(pid, how, self.at(ms));
    }

    fn timers(&mut self, ms: u64) {
        self.sup.on_timers(self.at(ms));
    }

    fn reload(&mut self, specs: Vec<VmSpec>, ms: u64) {
        let _ = self.reload_report(specs, ms);
    }

    /// A reload, and what it reports changed (or why it was refused).
    fn reload_report(&mut self, specs: Vec<VmSpec>, ms: u64) -> Result<ReloadReport, String> {
        self.sup
            .apply_reload_at(Ok((settings(), specs)), self.at(ms))
    }

    /// A control request, answered by the loop's handler at once.
    fn ask(&mut self, command: WireCommand, ms: u64) -> WireResponse {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let req = control::ControlRequest {
            command,
            uid: 0,
            reply: tx,
        };
        self.sup.on_control(req, self.at(ms));
        rx.try_recv().expect("an answer at once")
    }

    fn status(&self, vm: &str) -> Option<VmStatus> {
        self.sup.status().into_iter().find(|s| s.name == vm)
    }

    fn pid(&self, vm: &str) -> Option<u32> {
        self.status(vm).and_then(|s| s.pid)
    }

    /// Run every timer up to `ms`, as the event loop's timeouts would.
    fn run_timers_until(&mut self, ms: u64) {
        while let Some(t) = self.sup.next_deadline() {
            if t > self.at(ms) {
                break;
            }
            self.sup.on_timers(t);
        }
    }
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn restart_count_survives_an_edit_of_a_running_vm() {
    // Issue 9's measurement: SIGKILL a VM twice, edit its file, reload: restarts_total
    // went from 2 back to 0. It stays 2, then 3 after one more kill.
    let mut h = Harness::new(vec![spec("a", 16)]);
    h.start(0);
    h.timers(500);
    assert_eq!(
        h.lines(),
        lines(&["vm a: starting (pid 1000)", "vm a: running"])
    );
    h.exit("a", ChildExit::Signal(9), 1000);
    h.timers(1100);
    h.exit("a", ChildExit::Signal(9), 1200);
    h.timers(1400);
    h.timers(1900);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm a: exited: killed by signal 9 (SIGKILL)",
            "vm a: restarting in 0.1 s",
            "vm a: starting (pid 1001)",
            "vm a: exited: killed by signal 9 (SIGKILL)",
            "vm a: restarting in 0.2 s",
            "vm a: starting (pid 1002)",
            "vm a: running",
        ])
    );
    assert_eq!(h.status("a").unwrap().restarts, 2);

    h.reload(vec![spec("a", 32)], 2000);
    assert_eq!(h.sup.spawner.signals, [(1002, Signal::SIGTERM)]);
    h.exit("a", ChildExit::Code(ExitCode::Stopped), 2100);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm a: stopping",
            "reload: 0 added, 0 removed, 1 changed",
            "vm a: exited: stopped cleanly (exit code 6)",
            "vm a: configuration changed; starting again",
            "vm a: starting (pid 1003)",
        ])
    );
    assert_eq!(h.sup.spawner.spawned.last(), Some(&("a".into(), 32, 1003)));
    let st = h.status("a").unwrap();
    assert_eq!(st.restarts, 2);
    assert_eq!(st.last_exit, Some(ChildExit::Code(ExitCode::Stopped)));

    h.exit("a", ChildExit::Signal(9), 2200);
    h.run_timers_until(2300);
    let st = h.status("a").unwrap();
    assert_eq!(st.restarts, 3);
    assert_eq!(st.pid, Some(1004));
    assert_eq!(st.last_exit, Some(ChildExit::Signal(9)));
}

#[test]
fn spawn_failure_is_logged_and_retried_by_the_timer() {
    let mut h = Harness::new(vec![spec("a", 16)]);
    h.sup.spawner.fail = Some("boom".into());
    h.start(0);
    assert_eq!(
        h.lines(),
        lines(&["vm a: cannot start: boom", "vm a: restarting in 0.1 s"])
    );
    assert_eq!(h.status("a").unwrap().state, VmState::Backoff);
    assert_eq!(h.sup.next_deadline(), Some(h.at(100)));
    h.sup.spawner.fail = None;
    h.timers(99);
    assert!(h.lines().is_empty());
    h.timers(100);
    assert_eq!(h.lines(), lines(&["vm a: starting (pid 1000)"]));
    assert_eq!(h.status("a").unwrap().restarts, 1);
}

#[test]
fn stop_all_kills_after_the_grace_period_and_cancels_backoffs() {
    let mut h = Harness::new(vec![spec("a", 16), spec("b", 16)]);
    h.start(0);
    h.timers(500);
    h.exit("b", ChildExit::Code(ExitCode::GuestCrash), 600);
    h.lines();
    h.sup.begin_stop(h.at(700));
    assert_eq!(h.lines(), lines(&["vm a: stopping"]));
    assert_eq!(h.status("b").unwrap().state, VmState::Stopped);
    assert!(!h.sup.all_stopped());
    // b's backoff (due at 700) is gone: the next deadline is a's SIGKILL.
    assert_eq!(h.sup.next_deadline(), Some(h.at(10_700)));
    h.run_timers_until(10_699);
    assert!(h.lines().is_empty());
    h.run_timers_until(10_700);
    assert_eq!(
        h.lines(),
        lines(&["vm a: did not stop within the grace period: SIGKILL"])
    );
    assert_eq!(
        h.sup.spawner.signals,
        [(1000, Signal::SIGTERM), (1000, Signal::SIGKILL)]
    );
    h.exit("a", ChildExit::Signal(9), 10_710);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm a: exited: killed by signal 9 (SIGKILL)",
            "vm a: stopped"
        ])
    );
    assert!(h.sup.all_stopped());
    assert_eq!(h.sup.next_deadline(), None);
    assert_eq!(
        h.sup.spawner.spawned.len(),
        2,
        "nothing started after the stop"
    );
}

#[test]
fn reload_adds_removes_changes_and_a_removed_vm_can_come_back() {
    let mut h = Harness::new(vec![spec("keep", 16), spec("gone", 16), spec("edit", 16)]);
    h.start(0);
    h.timers(500);
    h.lines();
    h.reload(
        vec![spec("keep", 16), spec("edit", 32), spec("new", 16)],
        1000,
    );
    assert_eq!(
        h.lines(),
        lines(&[
            "vm edit: stopping",
            "vm gone: stopping",
            "vm new: starting (pid 1003)",
            "reload: 1 added, 1 removed, 1 changed",
        ])
    );
    // `gone` comes back before its child is gone: it starts again once it is.
    h.reload(
        vec![
            spec("keep", 16),
            spec("edit", 32),
            spec("new", 16),
            spec("gone", 16),
        ],
        1100,
    );
    assert_eq!(h.lines(), lines(&["reload: 0 added, 0 removed, 1 changed"]));
    h.exit("gone", ChildExit::Code(ExitCode::Stopped), 1200);
    h.exit("edit", ChildExit::Code(ExitCode::Stopped), 1200);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm gone: exited: stopped cleanly (exit code 6)",
            "vm gone: configuration changed; starting again",
            "vm gone: starting (pid 1004)",
            "vm edit: exited: stopped cleanly (exit code 6)",
            "vm edit: configuration changed; starting again",
            "vm edit: starting (pid 1005)",
        ])
    );
    // Removed for good this time: stopped, then forgotten.
    h.reload(
        vec![spec("keep", 16), spec("edit", 32), spec("new", 16)],
        1300,
    );
    h.exit("gone", ChildExit::Code(ExitCode::Stopped), 1400);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm gone: stopping",
            "reload: 0 added, 1 removed, 0 changed",
            "vm gone: exited: stopped cleanly (exit code 6)",
            "vm gone: removed",
        ])
    );
    assert!(h.status("gone").is_none());
    assert_eq!(h.status("keep").unwrap().pid, Some(1002), "untouched");
    // A refused reload changes nothing.
    h.reload(Vec::new(), 1500);
    assert_eq!(h.lines()[0], "reload refused, nothing changed:");
    assert_eq!(h.sup.status().len(), 3);
}

#[test]
fn reload_during_a_stop_restarts_with_the_last_spec_and_keeps_the_deadline() {
    let mut h = Harness::new(vec![spec("a", 16)]);
    h.start(0);
    h.reload(vec![spec("a", 32)], 100);
    h.reload(vec![spec("a", 48)], 5_000);
    assert_eq!(h.sup.next_deadline(), Some(h.at(10_100)));
    assert_eq!(h.sup.spawner.signals, [(1000, Signal::SIGTERM)]);
    h.run_timers_until(10_100);
    assert_eq!(
        h.sup.spawner.signals,
        [(1000, Signal::SIGTERM), (1000, Signal::SIGKILL)]
    );
    h.exit("a", ChildExit::Signal(9), 10_200);
    assert_eq!(h.sup.spawner.spawned.last(), Some(&("a".into(), 48, 1001)));
    let st = h.status("a").unwrap();
    assert_eq!((st.state, st.restarts), (VmState::Starting, 0));
    // A stale exit (a pid the fleet no longer has) is ignored.
    h.sup
        .on_child_exit(1000, ChildExit::Signal(9), h.at(10_300));
    assert_eq!(h.status("a").unwrap().pid, Some(1001));
}

#[test]
fn start_limit_marks_failed_and_an_edit_brings_it_back() {
    let mut s = spec("a", 16);
    s.restart.start_limit_burst = 3;
    let mut h = Harness::new(vec![s]);
    h.start(0);
    for i in 0..3 {
        h.exit("a", ChildExit::Code(ExitCode::GuestCrash), 10 + i * 1000);
        h.run_timers_until(900 + i * 1000);
    }
    let log = h.lines();
    assert_eq!(
        log.last().map(String::as_str),
        Some("vm a: failed: 3 starts within 60 s (start limit); left down")
    );
    let st = h.status("a").unwrap();
    assert_eq!((st.state, st.restarts, st.pid), (VmState::Failed, 2, None));
    assert_eq!(h.sup.next_deadline(), None);
    h.reload(vec![spec("a", 32)], 5_000);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm a: configuration changed",
            "vm a: starting (pid 1003)",
            "reload: 0 added, 0 removed, 1 changed",
        ])
    );
    assert_eq!(h.status("a").unwrap().restarts, 2);
}

#[test]
fn typed_exits_reach_the_log_and_the_status() {
    let mut h = Harness::new(vec![spec("a", 16)]);
    h.start(0);
    h.lines();
    h.exit("a", ChildExit::Signal(libc::SIGSYS), 10);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm a: exited: killed by signal 31 (SIGSYS)",
            "vm a: seccomp violation (killed by SIGSYS)",
            "vm a: restarting in 0.1 s",
        ])
    );
    assert_eq!(
        h.status("a").unwrap().last_exit,
        Some(ChildExit::Signal(libc::SIGSYS))
    );
    h.run_timers_until(110);
    h.lines();
    // What waitpid reports as status 42: not one of the protocol's codes.
    h.exit("a", ChildExit::from_status(42), 120);
    assert_eq!(
        h.lines(),
        lines(&["vm a: exited: exit code 42", "vm a: restarting in 0.2 s"])
    );
    assert_eq!(
        h.status("a").unwrap().last_exit,
        Some(ChildExit::UnknownCode(42))
    );
    h.run_timers_until(320);
    h.exit("a", ChildExit::from_status(0), 330);
    assert_eq!(
        h.lines(),
        lines(&[
            "vm a: starting (pid 1002)",
            "vm a: exited: guest powered off (exit code 0)",
            "vm a: stopped",
        ])
    );
    assert_eq!(h.status("a").unwrap().state, VmState::Stopped);
}

/// A spawner for the spawner threads: clones share their record; a spawn of VM `slow`
/// blocks until the test opens the gate.
#[derive(Clone, Default)]
struct SlowSpawner {
    next_pid: Arc<Mutex<u32>>,
    signals: Arc<Mutex<Vec<(u32, Signal)>>>,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// A spawn of `slow` is under way (blocked at the gate).
    entered: Arc<std::sync::atomic::AtomicBool>,
}

impl SlowSpawner {
    fn open_gate(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

impl Spawner for SlowSpawner {
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> std::io::Result<Child> {
        if req.spec.name == "slow" {
            self.entered
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
        }
        let mut next = self.next_pid.lock().unwrap();
        *next += 1;
        Ok(Child {
            pid: 2000 + *next,
            channel: None,
        })
    }

    fn signal(&mut self, pid: u32, sig: Signal) -> std::io::Result<()> {
        self.signals.lock().unwrap().push((pid, sig));
        Ok(())
    }
}

/// A supervisor spawning on `threads` spawner threads, its event channel and its log.
fn threaded(
    specs: Vec<VmSpec>,
    spawner: &SlowSpawner,
    threads: usize,
) -> (
    Supervisor<SlowSpawner>,
    Receiver<Event>,
    Arc<Mutex<Vec<String>>>,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let event_log = EventLog {
        tty: true,
        captured: Some(log.clone()),
    };
    let source = FleetSource {
        dir: "/nonexistent".into(),
        settings: None,
        default_log_dir: "/nonexistent/log".into(),
        host_memory_mib: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let sup = Supervisor::new(source, settings(), specs, spawner.clone(), event_log)
        .with_spawn_threads(threads, &tx);
    assert!(sup.pool.is_some());
    (sup, rx, log)
}

/// The next spawner thread's answer (a generous deadline: a loaded host).
fn next_done(rx: &Receiver<Event>) -> pool::Done {
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Event::Spawned(done)) => *done,
        Ok(_) => panic!("an event other than a spawn answer"),
        Err(e) => panic!("no spawn answer: {e}"),
    }
}

#[test]
fn exits_and_a_stop_are_handled_while_a_spawn_is_pending() {
    let spawner = SlowSpawner::default();
    let (mut sup, rx, log) = threaded(vec![spec("a", 16), spec("slow", 16)], &spawner, 2);
    let t0 = Instant::now();
    sup.start_all(t0);
    // Nothing answered on the loop: both are asked of the threads.
    assert_eq!(sup.in_flight, 2);
    let done = next_done(&rx);
    assert_eq!(done.name, "a");
    sup.on_spawn_done(done, t0);
    let a = sup.status().into_iter().find(|s| s.name == "a").unwrap();
    let a_pid = a.pid.expect("a runs");
    // `slow` is still being spawned (its thread blocks); `a` crashes meanwhile.
    let slow = sup.status().into_iter().find(|s| s.name == "slow").unwrap();
    assert_eq!((slow.state, slow.pid), (VmState::Starting, None));
    sup.on_child_exit(a_pid, ChildExit::Signal(9), t0 + Duration::from_millis(10));
    let a = sup.status().into_iter().find(|s| s.name == "a").unwrap();
    assert_eq!(a.state, VmState::Backoff);
    assert_eq!(a.last_exit, Some(ChildExit::Signal(9)));
    // A stop, while `slow`'s spawn is under way: handled now, not after the spawn.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !spawner.entered.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "slow's spawn never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    sup.begin_stop(t0 + Duration::from_millis(20));
    assert!(
        sup.status().iter().all(|s| s.state == VmState::Stopped),
        "{:?}",
        sup.status()
    );
    assert!(!sup.all_stopped(), "a spawn is still pending");
    // The late child is killed as soon as its pid is known, and waited for.
    spawner.open_gate();
    let done = next_done(&rx);
    assert_eq!(done.name, "slow");
    let slow_pid = done.result.as_ref().expect("a pid").pid;
    sup.on_spawn_done(done, t0 + Duration::from_millis(30));
    assert!(
        spawner
            .signals
            .lock()
            .unwrap()
            .contains(&(slow_pid, Signal::SIGKILL))
    );
    assert_eq!(sup.status().iter().filter(|s| s.pid.is_some()).count(), 0);
    assert!(!sup.all_stopped(), "the late child is not reaped yet");
    sup.on_child_exit(
        slow_pid,
        ChildExit::Signal(9),
        t0 + Duration::from_millis(40),
    );
    assert!(sup.all_stopped());
    let log = log.lock().unwrap();
    assert!(log.iter().any(|l| l.starts_with("vm a: exited")), "{log:?}");
}

#[test]
fn an_exit_reaped_before_its_spawn_answer_is_kept_for_it() {
    let spawner = SlowSpawner::default();
    let (mut sup, rx, log) = threaded(vec![spec("a", 16)], &spawner, 1);
    let t0 = Instant::now();
    sup.start_all(t0);
    let done = next_done(&rx);
    let pid = done.result.as_ref().expect("a pid").pid;
    // waitpid saw the child die before the loop read the thread's answer.
    sup.on_child_exit(pid, ChildExit::Signal(9), t0);
    sup.on_spawn_done(done, t0);
    let a = sup.status().into_iter().find(|s| s.name == "a").unwrap();
    assert_eq!((a.state, a.pid), (VmState::Backoff, None));
    assert_eq!(a.last_exit, Some(ChildExit::Signal(9)));
    assert!(sup.parked.is_empty());
    let log = log.lock().unwrap();
    assert!(
        log.contains(&format!("vm a: starting (pid {pid})")),
        "{log:?}"
    );
}

#[test]
fn an_edit_during_a_spawn_starts_the_new_spec() {
    let spawner = SlowSpawner::default();
    let (mut sup, rx, _log) = threaded(vec![spec("a", 16)], &spawner, 1);
    let t0 = Instant::now();
    sup.start_all(t0);
    let _ = sup.apply_reload_at(Ok((settings(), vec![spec("a", 32)])), t0);
    // The first child has the old spec: killed, and a second one asked for.
    let done = next_done(&rx);
    let old = done.result.as_ref().expect("a pid").pid;
    sup.on_spawn_done(done, t0);
    assert!(
        spawner
            .signals
            .lock()
            .unwrap()
            .contains(&(old, Signal::SIGKILL))
    );
    let done = next_done(&rx);
    assert_eq!(done.spec.memory_mib, 32);
    let new = done.result.as_ref().expect("a pid").pid;
    sup.on_spawn_done(done, t0);
    assert_eq!(sup.status()[0].pid, Some(new));
    sup.on_child_exit(old, ChildExit::Signal(9), t0);
    assert!(sup.strays.is_empty());
    assert_eq!(sup.status()[0].pid, Some(new));
}

fn stop(vm: &str) -> WireCommand {
    WireCommand::Stop { vm: vm.into() }
}

fn start(vm: &str) -> WireCommand {
    WireCommand::Start { vm: vm.into() }
}

#[test]
fn a_user_stop_holds_through_another_vms_crash_and_a_reload() {
    use crate::protocol::ToChild;
    let mut h = Harness::new(vec![spec("a", 16), spec("b", 16)]);
    h.sup.spawner.channels = Some(HashMap::new());
    h.start(0);
    h.timers(500);
    let a = h.pid("a").unwrap();
    let r = h.ask(stop("a"), 1000);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.state.as_deref(), Some("stopping"));
    assert_eq!(h.sup.spawner.received(a), [ToChild::CtrlAltDel]);
    assert!(
        h.sup.spawner.signals.is_empty(),
        "no signal while the guest has its grace"
    );
    // The guest powers off (its answer to Ctrl-Alt-Del): stopped, by its user.
    h.exit("a", ChildExit::Code(ExitCode::GuestPoweroff), 1500);
    assert_eq!(h.status("a").unwrap().state, VmState::StoppedByUser);
    // b crashes and is restarted; a stays down.
    h.exit("b", ChildExit::Signal(9), 2000);
    h.run_timers_until(3000);
    assert_eq!(h.status("b").unwrap().state, VmState::Running);
    assert_eq!(h.status("a").unwrap().pid, None);
    // A reload that edits a: it takes the new spec and stays down.
    let report = h.reload_report(vec![spec("a", 32), spec("b", 16)], 3100);
    assert_eq!(
        report,
        Ok(ReloadReport {
            added: vec![],
            removed: vec![],
            changed: vec!["a".into()],
        })
    );
    assert_eq!(h.status("a").unwrap().state, VmState::StoppedByUser);
    let r = h.ask(stop("a"), 3200);
    assert_eq!(
        r.error.as_deref(),
        Some("vm a is already stopped (stopped-by-user)")
    );
    let r = h.ask(start("a"), 3300);
    assert_eq!(r.state.as_deref(), Some("starting"));
    assert_eq!(h.sup.spawner.spawned.last().unwrap().1, 32, "the new spec");
    let r = h.ask(start("a"), 3400);
    assert_eq!(r.error.as_deref(), Some("vm a is already starting"));
    let r = h.ask(start("nope"), 3500);
    assert_eq!(r.error.as_deref(), Some("unknown VM: nope"));
    // The status answer has every field for each VM.
    let r = h.ask(WireCommand::Status { vm: None }, 3600);
    let vms = r.vms.unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].name, "a");
    assert_eq!(vms[0].state, "starting");
    assert_eq!(vms[0].pid, h.pid("a"));
    assert_eq!(vms[0].memory_mib, 32);
    assert_eq!(vms[0].console_file, Path::new("/nonexistent/log/a.console"));
    assert_eq!(vms[1].restarts, 1);
    assert_eq!(vms[1].last_exit_status, Some(137));
}

#[test]
fn pause_resume_and_a_graceful_stop_reach_the_child_on_its_channel() {
    use crate::protocol::ToChild;
    let mut h = Harness::new(vec![spec("a", 16)]);
    h.sup.spawner.channels = Some(HashMap::new());
    h.start(0);
    h.timers(500);
    let a = h.pid("a").unwrap();
    let pause = || WireCommand::Pause { vm: "a".into() };
    assert_eq!(h.ask(pause(), 600).state.as_deref(), Some("paused"));
    assert_eq!(
        h.ask(pause(), 700).error.as_deref(),
        Some("vm a is already paused")
    );
    let r = h.ask(WireCommand::Resume { vm: "a".into() }, 800);
    assert_eq!(r.state.as_deref(), Some("running"));
    assert_eq!(h.sup.spawner.received(a), [ToChild::Pause, ToChild::Resume]);
    // SIGTERM to the fleet: Ctrl-Alt-Del, then SIGTERM after the grace, then SIGKILL.
    h.sup.begin_stop(h.at(1000));
    assert_eq!(h.sup.spawner.received(a), [ToChild::CtrlAltDel]);
    h.run_timers_until(1000 + 10_000);
    assert_eq!(h.sup.spawner.signals, [(a, Signal::SIGTERM)]);
    h.run_timers_until(1000 + 10_000 + 3_000);
    assert_eq!(
        h.sup.spawner.signals,
        [(a, Signal::SIGTERM), (a, Signal::SIGKILL)]
    );
    h.exit("a", ChildExit::Signal(9), 14_100);
    assert!(h.sup.all_stopped());
    assert_eq!(
        h.ask(start("a"), 14_200).error.as_deref(),
        Some("vm a: the fleet is stopping")
    );
}

#[test]
fn a_child_whose_channel_is_gone_is_hard_stopped_at_once() {
    let mut h = Harness::new(vec![spec("a", 16)]);
    h.sup.spawner.channels = Some(HashMap::new());
    h.start(0);
    let a = h.pid("a").unwrap();
    // The child closed its end (it died, or never read it).
    h.sup.spawner.channels.as_mut().unwrap().remove(&a);
    h.lines();
    let r = h.ask(stop("a"), 100);
    assert!(r.ok);
    assert_eq!(h.sup.spawner.signals, [(a, Signal::SIGTERM)]);
    let log = h.lines();
    assert!(
        log.iter()
            .any(|l| l.starts_with("vm a: cannot ask the guest to shut down: Ctrl-Alt-Del:")),
        "{log:?}"
    );
}

#[test]
fn reset_failed_and_reload_through_the_control_handler() {
    let mut s = spec("a", 16);
    s.restart.start_limit_burst = 2;
    let mut h = Harness::new(vec![s]);
    h.start(0);
    h.exit("a", ChildExit::Code(ExitCode::GuestCrash), 10);
    h.run_timers_until(200);
    h.exit("a", ChildExit::Code(ExitCode::GuestCrash), 210);
    assert_eq!(h.status("a").unwrap().state, VmState::Failed);
    let r = h.ask(start("a"), 300);
    assert_eq!(
        r.error.as_deref(),
        Some("vm a has failed (start limit); `reset-failed a` starts it again")
    );
    let r = h.ask(WireCommand::ResetFailed { vm: "a".into() }, 400);
    assert_eq!(r.state.as_deref(), Some("starting"));
    assert_eq!(h.pid("a"), Some(1002));
    // `reload` with no loader thread (as here) loads at once: /nonexistent is refused,
    // and the answer says why; nothing changed.
    let r = h.ask(WireCommand::Reload, 500);
    let e = r.error.unwrap();
    assert!(e.starts_with("reload refused, nothing changed: "), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    assert_eq!(h.pid("a"), Some(1002));
    // A supervisor made without `with_reexec` (no binary to exec) refuses it.
    let r = h.ask(WireCommand::Reexec, 600);
    assert_eq!(
        r.error.as_deref(),
        Some("reexec refused: reexec is not available here (no binary path)")
    );
}

#[test]
fn status_and_logs_name_the_console_file_a_vm_spec_gives() {
    // `console: FILE` is what the output thread writes (OutputHub::prepare); `logs NAME`
    // reads the file the answer names, so it must be that one, not LOG_DIR/NAME.console.
    let mut own = spec("b", 16);
    own.console = crate::config::ConsoleSpec::File("/nonexistent/log/sub/b.txt".into());
    let mut h = Harness::new(vec![spec("a", 16), own]);
    h.start(0);
    let file = |h: &mut Harness, cmd| h.ask(cmd, 100).vms.unwrap()[0].console_file.clone();
    let logs = |vm: &str| WireCommand::Logs {
        vm: vm.into(),
        follow: false,
    };
    assert_eq!(
        file(&mut h, logs("a")),
        Path::new("/nonexistent/log/a.console")
    );
    assert_eq!(
        file(&mut h, logs("b")),
        Path::new("/nonexistent/log/sub/b.txt")
    );
    let status = WireCommand::Status {
        vm: Some("b".into()),
    };
    assert_eq!(
        file(&mut h, status),
        Path::new("/nonexistent/log/sub/b.txt")
    );
}
