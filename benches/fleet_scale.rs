//! # Fleet start-up at scale: `cargo bench --bench fleet_scale`
//!
//! Starts `vmm-fleet up DIR` over N VM files (`VMM_FLEET_BENCH_VMS`, default 1000; a list
//! such as `1000,3000` runs each): built-in guest, `then: idle`, 1 vCPU, 16 MiB,
//! `heartbeat_ms: 1000`, console to `DIR/logs/NAME.console`, `memory_overcommit: true`
//! (the guests touch almost none of their memory). Measures, from just before `up` is
//! spawned:
//!
//! - **boot**: until every console holds `vcpu 0 up`;
//! - **all heartbeating**: until every console holds a `heartbeat ` line (issue 9's
//!   target: 1000 VMs within 3 s, 3000 within 10 s on a 2-core host);
//! - the supervisor's and the host's memory once all heartbeat (`VmRSS`, `MemAvailable`
//!   before and after);
//! - **stop**: SIGTERM to the supervisor until it has exited, then that no child is left;
//! - **CPU to heartbeat**: the run time of every thread of the supervisor and of its
//!   children (`/proc/PID/task/TID/schedstat`) once all heartbeat, per VM;
//! - **CPU**: user + system time of the supervisor and every VM child it reaped, from `up`
//!   to the end of the stop (`getrusage(RUSAGE_CHILDREN)`), in total and per VM: what the
//!   start-up costs whatever else runs on the host (the wall times above depend on it).
//!
//! Caution, seen on this project's 2-core test host (kernel 6.18.44-fc, KVM nested): the
//! stop of a 3000-VM run (all children killed together at the end of the grace period,
//! each freeing four JIT-compiled seccomp filters through `system_wq`) once deadlocked the
//! kernel: the worker holding the BPF pack mutex flushed a vmap purge work that could not
//! start because `system_wq`'s active limit was taken by ~2000 `bpf_jit_free` works
//! waiting for that mutex. Every later KVM teardown then hung in D state
//! (`kvm_vm_release`); `dmesg` says "blocked on a mutex likely owned by". Only a reboot
//! clears it.
//!
//! `VMM_FLEET_BENCH_BIN` runs another build of the binary (e.g. the one before a change).
//! Needs a readable `/dev/kvm` (prints a note and exits without). The supervisor's fd
//! limit must cover about 5 fds per VM (`ulimit -n`).

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

use common::{Res, TempDir, VMM, alive, children, contains, kvm_unavailable, ms, status_kib};

const HEARTBEAT_MS: u32 = 1000;
const MEMORY_MIB: u64 = 16;

fn main() {
    if let Some(why) = kvm_unavailable() {
        println!("fleet_scale: skipped: {why}");
        return;
    }
    let counts: Vec<usize> = std::env::var("VMM_FLEET_BENCH_VMS")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let bin = std::env::var("VMM_FLEET_BENCH_BIN").unwrap_or_else(|_| VMM.to_string());
    println!("fleet_scale: binary {bin}");
    for n in counts {
        match one_run(&bin, n) {
            Ok(()) => {}
            Err(e) => {
                println!("fleet_scale: {n} VMs: FAILED: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn mem_available_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Seconds from `t0` until every file holds `needle` (polled), or an error after `limit`.
fn until_all(files: &[PathBuf], needle: &[u8], t0: Instant, limit: Duration) -> Res<f64> {
    let mut left: Vec<&PathBuf> = files.iter().collect();
    loop {
        left.retain(|p| !contains(p, needle));
        if left.is_empty() {
            return Ok(ms(t0.elapsed()) / 1000.0);
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "{} of {} consoles without {:?} after {limit:?}",
                left.len(),
                files.len(),
                String::from_utf8_lossy(needle)
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// User + system seconds of every child of this process waited for so far (and of the
/// children they waited for).
fn children_cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        tv(u.user_time()) + tv(u.system_time())
    })
}

/// Seconds every live thread of process `pid` has run so far.
fn run_time_s(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns as f64 / 1e9)
        .sum()
}

fn one_run(bin: &str, n: usize) -> Res<()> {
    let dir = TempDir::new(&format!("vmm-fleet-bench-scale-{}-{n}", std::process::id()))?;
    let dir = dir.path();
    fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut consoles = Vec::new();
    for i in 0..n {
        let name = format!("vm{i:04}");
        let text = format!(
            "name: {name}\nvcpus: 1\nmemory_mib: {MEMORY_MIB}\nkernel: builtin\nconsole: stdout\n\
             builtin:\n  then: idle\n  heartbeat_ms: {HEARTBEAT_MS}\n"
        );
        let p = dir.join(format!("{name}.yaml"));
        fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        consoles.push(dir.join("logs").join(format!("{name}.console")));
    }
    let p = dir.join("fleet.yaml");
    fs::write(
        &p,
        "metrics_address: \"127.0.0.1:0\"\nmemory_overcommit: true\n",
    )
    .map_err(|e| format!("{}: {e}", p.display()))?;
    let avail_before = mem_available_kib();
    let mut cmd = Command::new(bin);
    cmd.arg("up")
        .arg(dir)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("up.log")).map_err(|e| e.to_string())?)
        .process_group(0);
    let cpu_before = children_cpu_s();
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn {bin} up: {e}"))?;
    let sup = child.id();
    let result = (|| {
        let limit = Duration::from_secs(30 + n as u64 / 20);
        let boot = until_all(&consoles, b"vcpu 0 up\n", t0, limit)?;
        let beat = until_all(&consoles, b"heartbeat ", t0, limit)?;
        let kids = children(sup);
        let cpu_beat = std::iter::once(sup)
            .chain(kids.iter().copied())
            .map(run_time_s)
            .sum::<f64>();
        let sup_rss = status_kib(sup, "VmRSS:").unwrap_or(0);
        let avail_after = mem_available_kib();
        let t_stop = Instant::now();
        kill(Pid::from_raw(sup as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
        let code = child.wait().map_err(|e| e.to_string())?;
        let stop = ms(t_stop.elapsed()) / 1000.0;
        let cpu = children_cpu_s() - cpu_before;
        // Orphans are reaped late by PID 1 here: a zombie counts as gone.
        let left = kids.iter().filter(|p| alive(**p)).count();
        println!(
            "fleet_scale: {n} VMs ({MEMORY_MIB} MiB, heartbeat {HEARTBEAT_MS} ms): all booted \
             {boot:.2} s, all heartbeating {beat:.2} s after up; supervisor RSS {:.1} MiB; \
             host memory used by the fleet {:.2} GiB ({:.1} MiB/VM); stop {stop:.2} s ({code}); \
             {} of {} children left; CPU to heartbeat {:.2} ms/VM, in all {cpu:.2} s \
             ({:.2} ms/VM)",
            sup_rss as f64 / 1024.0,
            avail_before.saturating_sub(avail_after) as f64 / 1024.0 / 1024.0,
            avail_before.saturating_sub(avail_after) as f64 / 1024.0 / n as f64,
            left,
            kids.len(),
            cpu_beat * 1000.0 / n as f64,
            cpu * 1000.0 / n as f64
        );
        if left > 0 {
            return Err(format!("{left} children left after the stop"));
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = killpg(Pid::from_raw(sup as i32), Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        if let Ok(log) = fs::read_to_string(dir.join("up.log")) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            println!(
                "up.log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    result
}
