//! `vmm-fleet up` and `validate` with built-in-guest fleets under real KVM.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::fleet::Fleet;
use common::*;

fn vm_file(dir: &Path, name: &str, then: &str, restart: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: {then}\n  heartbeat_ms: 100\nrestart:\n{restart}"
        ),
    )
    .unwrap();
}

/// Processes whose command line mentions `dir` (every VM child names its file there).
fn fleet_processes(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

const FAST: &str = "  backoff_initial_ms: 50\n  backoff_max_ms: 200\n  start_limit_burst: 100\n";

#[test]
fn four_idle_vms_come_up_and_sigterm_stops_everything() {
    if !kvm_available("fleet::four_idle_vms") {
        return;
    }
    let dir = scratch("fleet4");
    for n in ["a", "b", "c", "d"] {
        vm_file(&dir, n, "idle", FAST);
    }
    let mut fleet = Fleet::up(&dir);
    for n in ["a", "b", "c", "d"] {
        let console = dir.join("logs").join(format!("{n}.console"));
        assert!(
            wait_until(Duration::from_secs(20), || read(&console)
                .contains("heartbeat 3")),
            "{n}: no heartbeat; console:\n{}\nlog:\n{}",
            read(&console),
            fleet.log()
        );
        assert!(fleet.wait_for(
            Duration::from_secs(5),
            |f| f.count(&format!("vm {n}: running")) >= 1
        ));
    }
    let pids: Vec<u32> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| fleet.pid_of(n))
        .collect();
    // ps shows which process is which VM.
    for (n, pid) in ["a", "b", "c", "d"].iter().zip(&pids) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            args.windows(2).any(|w| w[0] == "--vm" && w[1] == *n),
            "{args:?}"
        );
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("vm:{n}"));
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .collect();
        assert!(threads.iter().any(|t| t.trim() == "vcpu_0"), "{threads:?}");
    }
    let t = Instant::now();
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "log:\n{}", fleet.log());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "within the grace period"
    );
    assert!(pids.iter().all(|p| !alive(*p)));
    assert!(
        fleet_processes(&dir).is_empty(),
        "{:?}",
        fleet_processes(&dir)
    );
}

#[test]
fn sigkill_to_one_child_restarts_only_that_vm() {
    if !kvm_available("fleet::sigkill_one_child") {
        return;
    }
    let dir = scratch("fleetkill");
    for n in ["a", "b", "c"] {
        vm_file(&dir, n, "idle", FAST);
    }
    let fleet = Fleet::up(&dir);
    assert!(fleet.wait_for(Duration::from_secs(20), |f| f.count(": running") == 3));
    let (a, b, c) = (fleet.pid_of("a"), fleet.pid_of("b"), fleet.pid_of("c"));
    kill(Pid::from_raw(b as i32), Signal::SIGKILL).unwrap();
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.starts("b").len() == 2),
        "{}",
        fleet.log()
    );
    assert!(fleet.log().contains("vm b: exited: killed by signal 9"));
    assert_ne!(fleet.pid_of("b"), b);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fleet.starts("a").len(), 1);
    assert_eq!(fleet.starts("c").len(), 1);
    assert!(alive(a) && alive(c) && alive(fleet.pid_of("b")));
    fleet.signal(Signal::SIGTERM);
}

#[test]
fn crash_loop_backs_off_then_fails_at_the_start_limit() {
    if !kvm_available("fleet::crash_loop") {
        return;
    }
    let dir = scratch("fleetcrash");
    vm_file(
        &dir,
        "crashy",
        "crash",
        "  backoff_initial_ms: 200\n  backoff_multiplier: 2.0\n  backoff_max_ms: 5000\n  start_limit_burst: 4\n  start_limit_interval_s: 60\n",
    );
    let fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("vm crashy: failed")
            == 1),
        "{}",
        fleet.log()
    );
    let starts = fleet.starts("crashy");
    assert_eq!(starts.len(), 4, "{}", fleet.log());
    // Gaps between starts follow the backoff: 200, 400, 800 ms (plus the guest's run).
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    for (gap, want) in gaps.iter().zip([200u64, 400, 800]) {
        assert!(
            *gap >= Duration::from_millis(want) && *gap < Duration::from_millis(want + 1500),
            "gaps {gaps:?}"
        );
    }
    // Failed means left down: no more starts, logged once.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.starts("crashy").len(), 4);
    assert_eq!(fleet.count("vm crashy: failed"), 1);
    assert!(
        fleet_processes(&dir).len() == 1,
        "only the supervisor is left"
    );
    fleet.signal(Signal::SIGTERM);
}

#[test]
fn restart_policies_on_clean_poweroff_and_on_crash() {
    if !kvm_available("fleet::restart_policies") {
        return;
    }
    let dir = scratch("fleetpolicy");
    for policy in ["always", "on-failure", "never"] {
        for then in ["poweroff", "crash"] {
            vm_file(
                &dir,
                &format!("{policy}-{then}"),
                then,
                &format!("  policy: {policy}\n{FAST}"),
            );
        }
    }
    let fleet = Fleet::up(&dir);
    let n = |vm: &str| fleet.starts(vm).len();
    // The restarting ones reach 3 starts (backoff 0); by then the others have started
    // and ended once.
    assert!(
        wait_until(Duration::from_secs(30), || {
            n("always-poweroff") >= 3 && n("always-crash") >= 3 && n("on-failure-crash") >= 3
        }),
        "{}",
        fleet.log()
    );
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| {
            f.log().contains("vm on-failure-poweroff: stopped")
                && f.log().contains("vm never-crash: stopped")
        }),
        "{}",
        fleet.log()
    );
    let log = fleet.log();
    assert!(n("always-poweroff") >= 3, "{log}");
    assert!(n("always-crash") >= 3, "{log}");
    assert!(n("on-failure-crash") >= 3, "{log}");
    assert_eq!(n("on-failure-poweroff"), 1, "{log}");
    assert_eq!(n("never-poweroff"), 1, "{log}");
    assert_eq!(n("never-crash"), 1, "{log}");
    assert!(log.contains("vm on-failure-poweroff: stopped"));
    assert!(log.contains("vm never-crash: stopped"));
    fleet.signal(Signal::SIGTERM);
}

#[test]
fn sigkill_to_the_supervisor_takes_every_vm_down() {
    if !kvm_available("fleet::sigkill_supervisor") {
        return;
    }
    let dir = scratch("fleetorphan");
    for n in ["a", "b", "c"] {
        vm_file(&dir, n, "idle", FAST);
    }
    let mut fleet = Fleet::up(&dir);
    assert!(fleet.wait_for(Duration::from_secs(20), |f| f.count(": running") == 3));
    let pids: Vec<u32> = ["a", "b", "c"].iter().map(|n| fleet.pid_of(n)).collect();
    fleet.signal(Signal::SIGKILL);
    let _ = fleet.child.wait();
    assert!(
        wait_until(Duration::from_secs(1), || pids.iter().all(|p| !alive(*p))),
        "children outlived the supervisor: {:?}",
        pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
}

#[test]
fn sighup_applies_added_removed_and_edited_files_only() {
    if !kvm_available("fleet::sighup") {
        return;
    }
    let dir = scratch("fleethup");
    for n in ["keep", "gone", "edit"] {
        vm_file(&dir, n, "idle", FAST);
    }
    let fleet = Fleet::up(&dir);
    assert!(fleet.wait_for(Duration::from_secs(20), |f| f.count(": running") == 3));
    let (keep, gone, edit) = (
        fleet.pid_of("keep"),
        fleet.pid_of("gone"),
        fleet.pid_of("edit"),
    );

    // A bad reload changes nothing.
    std::fs::write(dir.join("broken.yaml"), "name: broken\nvcpus: 0\n").unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(fleet.wait_for(Duration::from_secs(5), |f| f.count("reload refused") == 1));
    std::fs::remove_file(dir.join("broken.yaml")).unwrap();
    assert!(alive(keep) && alive(gone) && alive(edit));

    vm_file(&dir, "new", "idle", FAST);
    std::fs::remove_file(dir.join("gone.yaml")).unwrap();
    vm_file(&dir, "edit", "idle", "  backoff_initial_ms: 70\n");
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.starts("new").len() == 1
            && f.starts("edit").len() == 2
            && f.count("vm gone: removed") == 1),
        "{}",
        fleet.log()
    );
    assert!(
        fleet
            .log()
            .contains("reload: 1 added, 1 removed, 1 changed")
    );
    assert!(wait_until(Duration::from_secs(5), || !alive(gone) && !alive(edit)));
    assert_eq!(fleet.starts("keep").len(), 1);
    assert!(alive(keep), "untouched VM keeps its pid");
    assert!(alive(fleet.pid_of("edit")) && alive(fleet.pid_of("new")));
    fleet.signal(Signal::SIGTERM);
}

#[test]
fn validate_lists_every_problem_in_every_file() {
    let dir = scratch("validate");
    std::fs::write(
        dir.join("a.yaml"),
        "name: a\nvcpus: 0\nmemory_mib: 1\nkernel: builtin\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.yaml"),
        "name: a\nvcpus: 1\nmemory_mib: 32\nkernel: /no/such/kernel\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("c.yaml"),
        "name: c\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nbogus: 1\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in [
        "a.yaml: vcpus: 0 is out of range",
        "a.yaml: memory_mib: 1 is out of range",
        "b.yaml: kernel: /no/such/kernel: no such file",
        "b.yaml: name: duplicate VM name `a`",
        "c.yaml: bogus: unknown field `bogus`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // `up` on the same directory starts nothing.
    let out = Command::new(bin()).arg("up").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing started"));

    let good = scratch("validate-good");
    vm_file(&good, "ok", "idle", FAST);
    let out = Command::new(bin())
        .arg("validate")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn sd_notify_ready_and_status_when_notify_socket_is_set() {
    if !kvm_available("fleet::sd_notify") {
        return;
    }
    let dir = scratch("fleetnotify");
    for n in ["a", "b"] {
        vm_file(&dir, n, "idle", FAST);
    }
    let sock_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(bin())
        .arg("up")
        .arg(&dir)
        .args(["--metrics-address", "127.0.0.1:0", "--log-dir"])
        .arg(dir.join("logs"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut msgs = Vec::new();
    let mut buf = [0u8; 512];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20)
        && !(msgs.iter().any(|m: &String| m.contains("STATUS=2 running"))
            && msgs.iter().any(|m| m.contains("READY=1")))
    {
        if let Ok(n) = sock.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let st = wait_with_limit(&mut child, Duration::from_secs(15));
    assert_eq!(st.code(), Some(0));
    assert!(msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("STATUS=2 running, 0 restarting, 0 failed")),
        "{msgs:?}"
    );
}

#[test]
fn a_restart_uses_the_validated_spec_not_an_unreloaded_edit() {
    if !kvm_available("fleet::unreloaded_edit") {
        return;
    }
    let dir = scratch("fleetedit");
    vm_file(&dir, "e", "idle", FAST);
    vm_file(&dir, "other", "idle", FAST);
    let fleet = Fleet::up(&dir);
    assert!(fleet.wait_for(Duration::from_secs(20), |f| f.count("vm e: running") == 1));
    // Edited to crash, but no SIGHUP: the next start must still be the idle guest.
    vm_file(&dir, "e", "crash", FAST);
    let pid = fleet.pid_of("e");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(fleet.wait_for(Duration::from_secs(10), |f| f.count("vm e: running") == 2));
    let console = dir.join("logs/e.console");
    assert!(wait_until(Duration::from_secs(10), || read(&console)
        .matches("heartbeat 2")
        .count()
        >= 2));
    assert!(!read(&console).contains("crash"), "{}", read(&console));
    // Removed and put back before a reload finished stopping it: it runs again.
    std::fs::remove_file(dir.join("e.yaml")).unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(fleet.wait_for(Duration::from_secs(10), |f| f.count("vm e: stopping") == 1));
    vm_file(&dir, "e", "idle", FAST);
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.starts("e").len() == 3),
        "{}",
        fleet.log()
    );
    assert!(alive(fleet.pid_of("e")));
}

#[test]
fn sigterm_during_a_large_start_up_ends_the_fleet_and_leaves_no_child() {
    // Spawns run on spawner threads: a SIGTERM while many are queued or under way is
    // handled at once; children whose spawn answer comes after it are killed and reaped.
    if !kvm_available("fleet::sigterm_during_a_large_start_up") {
        return;
    }
    let dir = scratch("fleet60");
    for i in 0..60 {
        vm_file(&dir, &format!("vm{i:02}"), "idle", FAST);
    }
    let mut fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count("starting (pid") >= 1),
        "no VM started; log:\n{}",
        fleet.log()
    );
    let t = Instant::now();
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(20));
    let took = t.elapsed();
    assert_eq!(st.code(), Some(0), "log:\n{}", fleet.log());
    let log = fleet.log();
    let started = log.matches("starting (pid").count();
    assert!(
        took < Duration::from_secs(10),
        "stop took {took:?} ({started} of 60 started); log:\n{log}"
    );
    // Every child it ever started is gone (a zombie awaiting PID 1 counts as gone).
    let pids: Vec<u32> = log
        .match_indices("starting (pid ")
        .filter_map(|(i, m)| {
            let rest = &log[i + m.len()..];
            rest[..rest.find(')')?].parse().ok()
        })
        .collect();
    assert_eq!(pids.len(), started);
    eprintln!("stopped in {took:?} with {started} of 60 started");
    assert!(
        wait_until(Duration::from_secs(10), || pids.iter().all(|p| !alive(*p))
            && fleet_processes(&dir).is_empty()),
        "left: {:?}",
        fleet_processes(&dir)
    );
}
