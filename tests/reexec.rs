//! Reexec on real KVM with real processes: `vmm-fleet up` execs its binary again on the
//! same pid (SIGUSR2) and every VM keeps running: same pids, heartbeats uninterrupted,
//! every `_total` series continuing, restart counts kept, /metrics answering throughout;
//! a crash afterwards is restarted by the new program. And the failures: a new binary
//! that cannot run or does not read the format is refused with nothing killed; a new
//! program that cannot read the state holds every VM running.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fleet::{Fleet, up_command, up_command_of};
use common::{alive, builtin_config, http_get, kvm_available, scratch, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(60);

fn vm_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("rx{i}")).collect()
}

/// `n` idle built-in VMs, heartbeat 100 ms, console to LOG_DIR/NAME.console.
fn fleet_dir(name: &str, n: usize) -> PathBuf {
    let dir = scratch(name);
    for vm in vm_names(n) {
        builtin_config(&dir, &vm, 1, "idle", "  heartbeat_ms: 100\n");
        let p = dir.join(format!("{vm}.yaml"));
        let text = fs::read_to_string(&p).unwrap();
        let text = text.replace(&format!("console: {vm}.console\n"), "console: stdout\n");
        fs::write(&p, text.replace("memory_mib: 32", "memory_mib: 16")).unwrap();
    }
    dir
}

fn console(dir: &Path, vm: &str) -> PathBuf {
    dir.join("logs").join(format!("{vm}.console"))
}

fn wait_running(f: &Fleet, names: &[String]) {
    // The last state line of each VM says it runs.
    let last_is_running = |f: &Fleet, n: &str| {
        let prefix = format!("vm {n}: ");
        let lines = f.lines.lock().unwrap();
        lines
            .iter()
            .rev()
            .filter_map(|(_, l)| l.split_once(&prefix).map(|x| x.1))
            .find(|m| {
                m.starts_with("running") || m.starts_with("starting") || m.starts_with("exited")
            })
            .is_some_and(|m| m.starts_with("running"))
    };
    let ok = f.wait_for(LIMIT, |f| names.iter().all(|n| last_is_running(f, n)));
    assert!(ok, "not all running:\n{}", f.log());
}

/// Every `_total` series of a /metrics page.
fn totals(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            name.ends_with("_total")
                .then(|| Some((series.to_string(), v.parse().ok()?)))
                .flatten()
        })
        .collect()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics").expect("scrape");
    assert_eq!(code, 200);
    body
}

/// The heartbeat numbers in a console file: consecutive from 1 means no restart and
/// no gap (the built-in guest counts them).
fn heartbeats(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("heartbeat ")?.trim().parse().ok())
        .collect()
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
}

/// Scrapes /metrics in a loop; the longest time between two answered scrapes.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, usize, usize)>,
}

impl Scraper {
    fn start(addr: std::net::SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut last, mut gap, mut ok, mut failed) = (Instant::now(), Duration::ZERO, 0, 0);
            while !s.load(Ordering::Relaxed) {
                match http_get(addr, "/metrics") {
                    Ok((200, _)) => {
                        gap = gap.max(last.elapsed());
                        last = Instant::now();
                        ok += 1;
                    }
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (gap.max(last.elapsed()), ok, failed)
        });
        Scraper { stop, thread }
    }

    fn finish(self) -> (Duration, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn reexec_keeps_every_vm_running_and_every_counter_counting() {
    if !kvm_available("reexec_keeps_every_vm_running_and_every_counter_counting") {
        return;
    }
    let dir = fleet_dir("reexec-five", 5);
    let names = vm_names(5);
    let f = Fleet::spawn(up_command(&dir));
    let sup = f.child.id();
    wait_running(&f, &names);
    let addr = f.addr();
    // Two crashes of rx0 first: its restart count is 2.
    for round in 1..=2 {
        let pid = f.pid_of("rx0");
        sigkill(pid);
        assert!(
            f.wait_for(LIMIT, |f| f.starts("rx0").len() == round + 1),
            "{}",
            f.log()
        );
    }
    wait_running(&f, &names);
    let pids: Vec<u32> = names.iter().map(|n| f.pid_of(n)).collect();
    let starts_before = f.count(": starting (pid");
    let cgroups = |pids: &[u32]| -> Vec<String> {
        pids.iter()
            .map(|p| common::read(Path::new(&format!("/proc/{p}/cgroup"))))
            .collect()
    };
    let cgroups_before = cgroups(&pids);
    // Some heartbeats in every console, and a scrape to compare with.
    assert!(wait_until(LIMIT, || names.iter().all(|n| heartbeats(
        &common::read(&console(&dir, n))
    )
    .len()
        >= 3)));
    let before = totals(&scrape(addr));
    assert_eq!(
        before.get(r#"vmm_fleet_vm_restarts_total{vm="rx0"}"#),
        Some(&2.0),
        "{before:?}"
    );
    let sizes: Vec<u64> = names
        .iter()
        .map(|n| fs::metadata(console(&dir, n)).unwrap().len())
        .collect();

    let scraper = Scraper::start(addr);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("reexec: resumed from") == 1),
        "{}",
        f.log()
    );
    let resumed_in = t0.elapsed();
    // Scrapes right after: the listener was handed over.
    assert!(wait_until(LIMIT, || f.count("listener handed over") == 1));
    std::thread::sleep(Duration::from_millis(500));
    let (gap, ok, failed) = scraper.finish();
    eprintln!(
        "reexec of 5 VMs: resumed logged after {resumed_in:?}; /metrics: longest gap \
         between answered scrapes {gap:?} ({ok} answered, {failed} failed)"
    );
    assert!(gap < Duration::from_secs(3), "/metrics gap {gap:?}");
    assert_eq!(failed, 0, "a scrape was refused or cut during the reexec");

    // Same supervisor pid, same VM pids, all alive, nothing started, nothing exited.
    assert_eq!(f.child.id(), sup);
    assert!(alive(sup));
    for (n, pid) in names.iter().zip(&pids) {
        assert!(alive(*pid), "vm {n} pid {pid} gone:\n{}", f.log());
        assert_eq!(f.pid_of(n), *pid);
    }
    assert_eq!(f.count(": starting (pid"), starts_before, "{}", f.log());
    // Each VM is still in its cgroup, under the fleet's directory (named after the pid,
    // which stayed): adopted, not cleaned up.
    assert_eq!(cgroups(&pids), cgroups_before);
    if f.log().contains("cgroups v1: a cgroup per VM") {
        let rel = cgroups_before[0]
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|x| x.1.to_string()))
            .expect("a memory cgroup");
        assert!(rel.ends_with(&format!("vmm-fleet-{sup}/vm-rx0")), "{rel}");
        let dir = Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
        let listed = common::read(&dir.join("cgroup.procs"));
        assert!(
            listed.lines().any(|l| l == pids[0].to_string()),
            "{}: {listed}",
            dir.display()
        );
    }
    assert!(!f.log().contains("reexec refused"), "{}", f.log());
    // Heartbeats go on in every console: more of them, consecutive, one boot each.
    for (n, size) in names.iter().zip(&sizes) {
        let path = console(&dir, n);
        assert!(
            wait_until(LIMIT, || fs::metadata(&path).unwrap().len() > size + 100),
            "vm {n}: console stopped growing"
        );
        let text = common::read(&path);
        let beats = heartbeats(&text);
        let boots = text.matches("vcpu 0 up").count();
        if n != "rx0" {
            assert_eq!(boots, 1, "vm {n} restarted:\n{text}");
            assert!(
                beats.windows(2).all(|w| w[1] == w[0] + 1),
                "vm {n}: heartbeats not consecutive: {beats:?}"
            );
        }
    }
    // Every `_total` series continues: none went down.
    let after = totals(&scrape(addr));
    for (series, v) in &before {
        let a = after.get(series).copied();
        assert!(
            a.is_some_and(|a| a >= *v),
            "{series}: {v} before the reexec, {a:?} after"
        );
    }
    let io = |m: &BTreeMap<String, f64>| {
        m.get(r#"vmm_fleet_vcpu_exits_total{reason="io_out",vcpu="0",vm="rx3"}"#)
            .copied()
    };
    assert!(
        io(&after) > io(&before),
        "{:?} {:?}",
        io(&before),
        io(&after)
    );
    assert_eq!(
        after.get(r#"vmm_fleet_vm_restarts_total{vm="rx0"}"#),
        Some(&2.0)
    );

    // A crash after the reexec is restarted by the new program.
    let old = f.pid_of("rx1");
    sigkill(old);
    assert!(
        f.wait_for(LIMIT, |f| f.starts("rx1").len() == 2),
        "{}",
        f.log()
    );
    wait_running(&f, &names);
    assert_ne!(f.pid_of("rx1"), old);
    let page = scrape(addr);
    assert_eq!(
        common::metric_value(&page, r#"vmm_fleet_vm_restarts_total{vm="rx1"}"#),
        Some(1.0)
    );
    assert_eq!(
        common::metric_value(&page, r#"vmm_fleet_vm_restarts_total{vm="rx0"}"#),
        Some(2.0)
    );
    // And a second reexec (the resumed program hands over again).
    f.signal(Signal::SIGUSR2);
    assert!(f.wait_for(LIMIT, |f| f.count("reexec: resumed from") == 2));
    for n in &names {
        assert!(alive(f.pid_of(n)));
    }
    // The fleet stops as usual: every VM stopped cleanly.
    common::sigterm(&f.child);
    assert!(f.wait_for(LIMIT, |f| f.count("every VM stopped; exiting") == 1));
    let _ = fs::remove_dir_all(&dir);
}

/// `vmm-fleet ARGS --control DIR/logs/control.sock` (the socket `up` makes beside its
/// log directory).
fn ctl(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::bin())
        .args(args)
        .arg("--control")
        .arg(dir.join("logs").join("control.sock"))
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap()
}

#[test]
fn the_reexec_control_command_waits_for_the_new_program() {
    if !kvm_available("the_reexec_control_command_waits_for_the_new_program") {
        return;
    }
    let dir = fleet_dir("reexec-ctl", 2);
    let names = vm_names(2);
    let mut cmd = up_command(&dir);
    cmd.env_remove("RUNTIME_DIRECTORY");
    let f = Fleet::spawn(cmd);
    let sup = f.child.id();
    wait_running(&f, &names);
    let pids: Vec<u32> = names.iter().map(|n| f.pid_of(n)).collect();
    for round in 1..=2 {
        let out = ctl(&dir, &["reexec"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            f.log()
        );
        // It returned once the new program answered: already resumed.
        assert_eq!(f.count("reexec: resumed from"), round, "{}", f.log());
        assert!(
            text.contains("runs the fleet now") && text.contains("2 VM(s)"),
            "{text}"
        );
        for (n, pid) in names.iter().zip(&pids) {
            assert!(child_of(*pid, sup), "vm {n}:\n{}", f.log());
        }
    }
    // The new program serves every command: status shows the same pids.
    let out = ctl(&dir, &["status", "--json"]);
    let status = String::from_utf8_lossy(&out.stdout);
    for pid in &pids {
        assert!(status.contains(&format!("\"pid\":{pid}")), "{status}");
    }
    // The handed-over control channel works: a graceful stop reaches the guest as
    // Ctrl-Alt-Del and it powers itself off (exit 0), instead of the SIGTERM after the
    // grace period that a child without a channel gets.
    let out = ctl(&dir, &["stop", "rx0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        f.wait_for(LIMIT, |f| f
            .count("vm rx0: exited: guest powered off (exit code 0)")
            == 1),
        "{}",
        f.log()
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Alive and still the supervisor's child.
fn child_of(pid: u32, sup: u32) -> bool {
    alive(pid) && common::stat_fields(pid).get(1) == Some(&sup.to_string())
}

#[test]
fn a_new_binary_that_cannot_run_or_read_the_state_is_refused_and_nothing_stops() {
    if !kvm_available("a_new_binary_that_cannot_run_or_read_the_state_is_refused_and_nothing_stops")
    {
        return;
    }
    let dir = fleet_dir("reexec-refused", 2);
    let names = vm_names(2);
    // The fleet runs from a copy of the binary, which the test then breaks.
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("vmm-fleet");
    assert!(
        std::process::Command::new("cp")
            .arg(common::bin())
            .arg(&bin)
            .status()
            .unwrap()
            .success()
    );
    let mut cmd = up_command_of(&bin, &dir);
    cmd.env(vmm_fleet::supervisor::handover::TEST_FORMAT_ENV, "1");
    let f = Fleet::spawn(cmd);
    let sup = f.child.id();
    wait_running(&f, &names);
    let pids: Vec<u32> = names.iter().map(|n| f.pid_of(n)).collect();

    // 1. Not executable any more (an upgrade gone wrong).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o644)).unwrap();
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("reexec refused") == 1),
        "{}",
        f.log()
    );
    assert!(f.log().contains("cannot run it"), "{}", f.log());
    // 2. A binary that answers, but not with our format.
    let script = bin_dir.join("script");
    fs::write(
        &script,
        "#!/bin/sh\necho '{\"version\":\"9.0.0\",\"reads\":[7],\"writes\":7}'\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    // Replaced as a package manager does: a rename over the running binary.
    fs::rename(&script, &bin).unwrap();
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("reexec refused") == 2),
        "{}",
        f.log()
    );
    assert!(
        f.log()
            .contains("version 9.0.0 reads handover formats [7], not 1"),
        "{}",
        f.log()
    );
    // The control command says so too, and fails (a package then falls back).
    let out = ctl(&dir, &["reexec"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reexec refused") && err.contains("reads handover formats [7], not 1"),
        "{err}"
    );
    // Nothing was killed, nothing handed over, the old program carries on.
    assert!(alive(sup));
    for (n, pid) in names.iter().zip(&pids) {
        assert!(child_of(*pid, sup), "vm {n} pid {pid} gone:\n{}", f.log());
    }
    assert_eq!(f.count("reexec: resumed"), 0);
    assert_eq!(f.count(": exited"), 0, "{}", f.log());
    // It still supervises: a crash is restarted (by the old program: the spawner runs
    // the path it was started from, so put the real binary back first).
    let copy = bin_dir.join("copy");
    assert!(
        std::process::Command::new("cp")
            .arg(common::bin())
            .arg(&copy)
            .status()
            .unwrap()
            .success()
    );
    fs::rename(&copy, &bin).unwrap();
    sigkill(pids[0]);
    assert!(
        f.wait_for(LIMIT, |f| f.starts("rx0").len() == 2),
        "{}",
        f.log()
    );
    assert!(child_of(pids[1], sup));
    // With the binary back, the reexec goes through.
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("reexec: resumed from") == 1),
        "{}",
        f.log()
    );
    assert!(child_of(pids[1], sup));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_state_the_new_program_cannot_read_holds_every_vm_running() {
    if !kvm_available("a_state_the_new_program_cannot_read_holds_every_vm_running") {
        return;
    }
    let dir = fleet_dir("reexec-hold", 2);
    let names = vm_names(2);
    let mut cmd = up_command(&dir);
    // Writes format 999 and skips asking the new binary: the new program (the same
    // binary) reads only format 1.
    cmd.env(vmm_fleet::supervisor::handover::TEST_FORMAT_ENV, "999!");
    let f = Fleet::spawn(cmd);
    let sup = f.child.id();
    wait_running(&f, &names);
    let pids: Vec<u32> = names.iter().map(|n| f.pid_of(n)).collect();
    let sizes: Vec<u64> = names
        .iter()
        .map(|n| fs::metadata(console(&dir, n)).map_or(0, |m| m.len()))
        .collect();
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("HOLD MODE") == 1),
        "{}",
        f.log()
    );
    assert!(f.log().contains("format 999"), "{}", f.log());
    // Every VM keeps running under the same supervisor pid. Its output is no longer
    // read (no supervisor thread runs): the console files stop, the guests do not.
    std::thread::sleep(Duration::from_millis(500));
    for (n, pid) in names.iter().zip(&pids) {
        assert!(child_of(*pid, sup), "vm {n} pid {pid} gone:\n{}", f.log());
        let cpu0 = common::cpu_ticks(*pid).unwrap();
        assert!(
            wait_until(LIMIT, || common::cpu_ticks(*pid).is_some_and(|c| c > cpu0)),
            "vm {n} does not run"
        );
    }
    let _ = sizes;
    // Stopping the service stops the VMs (SIGTERM to each, as a fleet stop does).
    common::sigterm(&f.child);
    for pid in &pids {
        assert!(
            wait_until(LIMIT, || !alive(*pid)),
            "pid {pid} still runs:\n{}",
            f.log()
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_child_of_another_wire_version_refuses_to_start_and_says_why() {
    let dir = scratch("reexec-wire");
    let file = builtin_config(&dir, "w", 1, "idle", "");
    let out = std::process::Command::new(common::bin())
        .args(["run-vm", "--wire-version", "99"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("wire version 99")
            && err.contains(&format!("speaks {}", vmm_fleet::protocol::WIRE_VERSION)),
        "{err}"
    );
    // What the formats command says (the old program's question before a reexec).
    let out = std::process::Command::new(common::bin())
        .arg("handover-formats")
        .output()
        .unwrap();
    let f: vmm_fleet::supervisor::handover::Formats = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f, vmm_fleet::supervisor::handover::Formats::ours());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_exec_leaves_the_old_program_running_with_its_output_and_metrics() {
    if !kvm_available("a_failed_exec_leaves_the_old_program_running_with_its_output_and_metrics") {
        return;
    }
    let dir = fleet_dir("reexec-execfail", 2);
    let names = vm_names(2);
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("vmm-fleet");
    let cp = |to: &Path| {
        assert!(
            std::process::Command::new("cp")
                .arg(common::bin())
                .arg(to)
                .status()
                .unwrap()
                .success()
        )
    };
    cp(&bin);
    let mut cmd = up_command_of(&bin, &dir);
    // Format 1, and the new binary is not asked first: the exec itself fails.
    cmd.env(vmm_fleet::supervisor::handover::TEST_FORMAT_ENV, "1!");
    let f = Fleet::spawn(cmd);
    let sup = f.child.id();
    wait_running(&f, &names);
    let addr = f.addr();
    let pids: Vec<u32> = names.iter().map(|n| f.pid_of(n)).collect();
    fs::remove_file(&bin).unwrap();
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("reexec refused: exec") == 1),
        "{}",
        f.log()
    );
    // Everything taken apart for the handover is back: output read, /metrics served,
    // the VMs supervised.
    for (n, pid) in names.iter().zip(&pids) {
        assert!(child_of(*pid, sup), "vm {n}:\n{}", f.log());
        let path = console(&dir, n);
        let size = fs::metadata(&path).unwrap().len();
        assert!(
            wait_until(LIMIT, || fs::metadata(&path).unwrap().len() > size + 50),
            "vm {n}: console stopped growing after the failed exec"
        );
    }
    assert!(common::metric_value(&scrape(addr), r#"vmm_fleet_vm_up{vm="rx0"}"#) == Some(1.0));
    cp(&bin);
    sigkill(pids[0]);
    assert!(
        f.wait_for(LIMIT, |f| f.starts("rx0").len() == 2),
        "{}",
        f.log()
    );
    f.signal(Signal::SIGUSR2);
    assert!(
        f.wait_for(LIMIT, |f| f.count("reexec: resumed from") == 1),
        "{}",
        f.log()
    );
    assert!(child_of(pids[1], sup));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_sigterm_right_behind_the_reexec_still_stops_the_fleet() {
    if !kvm_available("a_sigterm_right_behind_the_reexec_still_stops_the_fleet") {
        return;
    }
    let dir = fleet_dir("reexec-term", 2);
    let names = vm_names(2);
    let mut f = Fleet::spawn(up_command(&dir));
    wait_running(&f, &names);
    let pids: Vec<u32> = names.iter().map(|n| f.pid_of(n)).collect();
    // Taken by the old program, pending over the exec, or taken by the new one: never
    // lost.
    f.signal(Signal::SIGUSR2);
    f.signal(Signal::SIGTERM);
    let status = common::wait_with_limit(&mut f.child, LIMIT);
    assert!(status.success(), "{status:?}\n{}", f.log());
    assert!(
        f.wait_for(LIMIT, |f| f.count("every VM stopped; exiting") == 1),
        "{}",
        f.log()
    );
    for pid in pids {
        assert!(wait_until(LIMIT, || !alive(pid)), "pid {pid} still runs");
    }
    let _ = fs::remove_dir_all(&dir);
}
