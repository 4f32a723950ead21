//! Seccomp filters of VM children under real KVM: every thread of a running child is
//! filtered, the guest still runs and stops cleanly, a child killed by SIGSYS is logged as
//! a seccomp violation and restarted, and `seccomp: off` leaves a child unfiltered.
//!
//! A real violation (a forbidden system call from each filtered thread kind, and the kill
//! pinning) is shown by the unit tests of `src/vm/seccomp.rs`, which install the same
//! filters in forked children: the shipped CLI has no flag to make a VMM misbehave.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::fleet::Fleet;
use common::*;

const FAST: &str = "restart:\n  policy: on-failure\n  backoff_initial_ms: 50\n  backoff_max_ms: 200\n  start_limit_burst: 100\n";

fn idle_vm(dir: &Path, name: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "name: {name}\nvcpus: 2\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: idle\n  heartbeat_ms: 100\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// (thread name, `Seccomp:` value) of every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))?
                .trim()
                .to_string();
            Some((comm.trim().to_string(), mode))
        })
        .collect()
}

/// The threads a running VM child has: main, signals, kvm_stats and one per vCPU, and
/// under a fleet `control` (its supervisor's channel; none for `run-vm` by hand).
fn has_every_thread(threads: &[(String, String)], main: &str) -> bool {
    let control = main.starts_with("vm:");
    ["signals", "kvm_stats", "vcpu_0", "vcpu_1", main]
        .iter()
        .chain(control.then_some(&"control"))
        .all(|n| threads.iter().any(|(t, _)| t == n))
}

fn args_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[test]
fn every_thread_of_a_vm_child_is_filtered_and_sigsys_is_a_logged_crash() {
    if !kvm_available("seccomp::every_thread_filtered") {
        return;
    }
    let dir = scratch("seccomp-fleet");
    idle_vm(&dir, "sc", FAST);
    let mut fleet = Fleet::up(&dir);
    let console = dir.join("logs/sc.console");
    assert!(
        wait_until(Duration::from_secs(20), || read(&console)
            .contains("heartbeat 3")),
        "no heartbeat; console:\n{}\nlog:\n{}",
        read(&console),
        fleet.log()
    );
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.count("vm sc: running") == 1),
        "log:\n{}",
        fleet.log()
    );
    let pid = fleet.pid_of("sc");
    // The guest runs, so every thread passed its filter installation.
    let threads = thread_seccomp(pid);
    assert!(has_every_thread(&threads, "vm:sc"), "{threads:?}");
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "a thread without its filter: {threads:?}"
    );
    assert!(
        !args_of(pid).iter().any(|a| a == "--seccomp"),
        "on by default"
    );

    // SIGSYS (what a violation kills the child with): logged, a crash, restarted.
    kill(Pid::from_raw(pid as i32), Signal::SIGSYS).unwrap();
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f
            .count("vm sc: seccomp violation (killed by SIGSYS)")
            == 1
            && f.starts("sc").len() >= 2),
        "log:\n{}",
        fleet.log()
    );
    assert!(
        fleet
            .log()
            .contains("vm sc: exited: killed by signal 31 (SIGSYS)")
    );
    let new_pid = fleet.pid_of("sc");
    assert_ne!(new_pid, pid);
    // The new child is filtered too, and its guest runs again.
    assert!(
        wait_until(Duration::from_secs(20), || {
            let t = thread_seccomp(new_pid);
            has_every_thread(&t, "vm:sc") && t.iter().all(|(_, m)| m == "2")
        }),
        "{:?}\nlog:\n{}",
        thread_seccomp(new_pid),
        fleet.log()
    );
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count("vm sc: running") >= 2),
        "log:\n{}",
        fleet.log()
    );

    // SIGTERM to the fleet still stops it cleanly: Ctrl-Alt-Del through the filtered
    // control thread, and the guest powers off (the signal path under the filters is
    // run-vm's test below).
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "log:\n{}", fleet.log());
    assert!(
        fleet.wait_for(Duration::from_secs(5), |f| f
            .count("vm sc: exited: guest powered off (exit code 0)")
            == 1),
        "log:\n{}",
        fleet.log()
    );
}

#[test]
fn seccomp_off_in_the_fleet_settings_leaves_the_child_unfiltered() {
    if !kvm_available("seccomp::off") {
        return;
    }
    let dir = scratch("seccomp-off");
    std::fs::write(dir.join("fleet.yaml"), "seccomp: off\n").unwrap();
    idle_vm(&dir, "open", FAST);
    let fleet = Fleet::up(&dir);
    let console = dir.join("logs/open.console");
    assert!(
        wait_until(Duration::from_secs(20), || read(&console)
            .contains("heartbeat 3")),
        "no heartbeat; console:\n{}\nlog:\n{}",
        read(&console),
        fleet.log()
    );
    let pid = fleet.pid_of("open");
    let threads = thread_seccomp(pid);
    assert!(has_every_thread(&threads, "vm:open"), "{threads:?}");
    assert!(threads.iter().all(|(_, m)| m == "0"), "{threads:?}");
    assert!(
        args_of(pid)
            .windows(2)
            .any(|w| w[0] == "--seccomp" && w[1] == "off"),
        "{:?}",
        args_of(pid)
    );
}

#[test]
fn run_vm_is_filtered_unless_told_seccomp_off() {
    if !kvm_available("seccomp::run_vm") {
        return;
    }
    let dir = scratch("seccomp-runvm");
    let cfg = idle_vm(&dir, "solo", "console: solo.console\n");
    for (extra, mode) in [(None, "2"), (Some("off"), "0"), (Some("on"), "2")] {
        let _ = std::fs::remove_file(dir.join("solo.console"));
        let mut cmd = Command::new(bin());
        cmd.arg("run-vm");
        if let Some(v) = extra {
            cmd.arg("--seccomp").arg(v);
        }
        let mut child = cmd
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || read(&dir.join("solo.console"))
                .contains("heartbeat 2")),
            "--seccomp {extra:?}: no heartbeat"
        );
        let threads = thread_seccomp(child.id());
        assert!(has_every_thread(&threads, "vmm-fleet"), "{threads:?}");
        assert!(
            threads.iter().all(|(_, m)| m == mode),
            "--seccomp {extra:?}: {threads:?}"
        );
        sigterm(&child);
        let st = wait_with_limit(&mut child, Duration::from_secs(10));
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert_eq!(st.code(), Some(6), "--seccomp {extra:?}: {err}");
        assert!(err.contains("stopped by signal 15 (exit code 6)"), "{err}");
    }
}
