//! # Fleet benchmark: `cargo bench --bench fleet`
//!
//! A `harness = false` bench that starts the release `vmm-fleet` binary
//! (`env!("CARGO_BIN_EXE_vmm-fleet")`) as `vmm-fleet up DIR --log-dir DIR/logs` over a
//! temporary directory of 50 VM files: built-in guest, `then: idle`, 1 vCPU, 32 MiB,
//! `heartbeat_ms: 1000`, console to stdout (so to `DIR/logs/NAME.console`),
//! `restart: {policy: always, backoff_initial_ms: 0}`, and a `DIR/fleet.yaml` with
//! `metrics_address: "127.0.0.1:0"` (a free port, so the bench does not collide with
//! anything on the default 9464). The supervisor runs in its own process group (killed
//! as a group if the bench fails); its stderr (the event log) is read by a thread that
//! timestamps every line. It needs a readable `/dev/kvm`, and prints a note and exits if there is none.
//!
//! Per run:
//!
//! 1. **start-up**: from just before `spawn()` of `up` until every VM's console file holds
//!    a complete first line (`vcpu 0 up`); the 50 files are polled every 1 ms. Also
//!    printed: the median VM, and when the last `starting (pid N)` log line arrived (the
//!    supervisor's spawn loop).
//! 2. **memory**, once every VM has logged `running`: the supervisor's `VmRSS`; the median
//!    `VmRSS` over the 50 children; the median guest-memory `Rss:` (the 33554432-byte
//!    mapping in `/proc/PID/smaps`, i.e. the pages the guest or the VMM's loader touched);
//!    and the median of (child `VmRSS` − its guest `Rss`), the VMM's own part. Most of a
//!    child's `VmRSS` is the binary's file pages, shared by all children, so the medians
//!    of `RssAnon` − guest (private memory) and `Pss` (from `smaps_rollup`) are printed
//!    too. When the kernel has merged the guest mapping with an adjacent anonymous one,
//!    the smallest larger anonymous `rw-p` mapping is used and the run says how often.
//! 3. **idle CPU**: utime + stime (`/proc/PID/stat`, clock ticks) of the supervisor and
//!    every child, over 10 s of idle fleet, as % of one core; split supervisor/children,
//!    with the heartbeat lines the guests printed meanwhile (CPU per heartbeat) and the
//!    supervisor's context switches (it should sleep in `recv_timeout`). Also: the same
//!    total from the scheduler's ns run times (`/proc/PID/task/*/schedstat`; utime/stime
//!    are sampled at the tick and noisy at this load), and the whole host's busy share
//!    from `/proc/stat` minus the fleet's, to show other load on the machine.
//! 4. **restart latency**: 20 times, on 20 different VMs: note the console file's size,
//!    SIGKILL the child, and time until a new `vcpu 0 up` line appears past that size
//!    (polled every 0.2 ms); also from the kill to the supervisor's `starting (pid N)` log
//!    line (its reaction, including the fork/exec). Median and p90 (nearest rank). Phases
//!    (medians): the old child's leader thread a zombie; all its other threads gone (its
//!    exit, KVM VM and memory teardown included, is then complete and SIGCHLD sent); the
//!    supervisor's `exited` line; its `starting` line.
//! 5. **stop**: SIGTERM to the supervisor, time until it has exited (polled every 0.2 ms);
//!    then every child pid must be gone and no process may name DIR on its command line.
//!
//! Three runs when the first takes under a minute (else one); the summary prints the
//! median over runs of each measure. Targets (printed for reference): start-up < 1 s,
//! supervisor RSS < 10 MiB, idle CPU < 2% of a core, restart < 50 ms, stop < 500 ms.
//!
//! On nested, software-assisted KVM (see /work/shared/KVM-HERE.md) a halted vCPU costs
//! nothing but every heartbeat interrupt and each of its serial port writes is emulated,
//! so the idle CPU is mostly heartbeats; it scales with 1/heartbeat_ms.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::{
    Fleet, MEMORY_MIB, Res, TempDir, VMM, alive, cpu_ticks, kvm_unavailable, median, ms, pctl,
    rollup_kib, sorted, status_kib, ticks_per_s,
};

const VMS: usize = 50;
const GUEST_BYTES: u64 = MEMORY_MIB << 20;
const HEARTBEAT_MS: u32 = 1000;
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const RESTARTS: usize = 20;
const MAX_RUNS: usize = 3;

const TARGET_STARTUP_MS: f64 = 1000.0;
const TARGET_SUP_RSS_KIB: f64 = 10.0 * 1024.0;
const TARGET_CPU_PCT: f64 = 2.0;
const TARGET_RESTART_MS: f64 = 50.0;
const TARGET_STOP_MS: f64 = 500.0;

/// Every measure of one run.
#[derive(Debug, Clone, Default)]
struct RunResult {
    startup_all_ms: f64,
    startup_median_ms: f64,
    first_spawn_logged_ms: f64,
    last_spawn_logged_ms: f64,
    sup_rss_kib: f64,
    child_rss_kib: f64,
    guest_rss_kib: f64,
    vmm_own_kib: f64,
    /// Anonymous (private) part of a child's RSS, and that minus the guest's pages.
    child_anon_kib: f64,
    vmm_own_anon_kib: f64,
    /// A child's proportional set size: shared pages (the binary) split over their users.
    child_pss_kib: f64,
    sup_threads: f64,
    child_threads: f64,
    /// Children whose guest mapping was merged with a neighbour (see `guest_rss_kib`).
    guest_merged: usize,
    cpu_pct: f64,
    /// The same from the scheduler's nanosecond run times (/proc/PID/task/*/schedstat).
    cpu_sched_pct: f64,
    cpu_sched_sup_pct: f64,
    /// Whole-host CPU busy during the idle window (/proc/stat), % of all cores, and the
    /// part of it not used by the fleet: other load on the machine.
    host_busy_pct: f64,
    host_other_pct: f64,
    /// Host busy % (all cores) during the restart section.
    host_busy_restart_pct: f64,
    cpu_sup_pct: f64,
    cpu_children_pct: f64,
    heartbeats_per_s: f64,
    cpu_us_per_heartbeat: f64,
    sup_ctxt_per_s: f64,
    restart_median_ms: f64,
    restart_p90_ms: f64,
    restart_max_ms: f64,
    respawn_median_ms: f64,
    respawn_p90_ms: f64,
    /// SIGKILL -> the old child is a zombie or gone (its exit, KVM VM teardown included).
    dead_median_ms: f64,
    /// SIGKILL -> every thread but the (zombie) leader is gone: the exit is complete, KVM
    /// VM and guest memory torn down, and SIGCHLD sent.
    threads_gone_median_ms: f64,
    /// SIGKILL -> the supervisor's `exited` line.
    reaped_median_ms: f64,
    stop_ms: f64,
    stop_exit_code: Option<i32>,
    wall_s: f64,
}

fn main() {
    let started = Instant::now();
    if let Some(e) = kvm_unavailable() {
        println!("fleet bench skipped: cannot open /dev/kvm: {e}");
        return;
    }
    println!(
        "fleet bench: {VMS} VMs (built-in guest, then: idle, 1 vCPU, {MEMORY_MIB} MiB, \
         heartbeat_ms: {HEARTBEAT_MS}, restart: always, backoff 0 ms)\nbinary: {VMM}\n"
    );
    let mut runs: Vec<RunResult> = Vec::new();
    while runs.len() < MAX_RUNS {
        let n = runs.len() + 1;
        println!("=== run {n} ===");
        match one_run(n) {
            Ok(r) => {
                print_run(&r);
                let first_wall = r.wall_s;
                runs.push(r);
                // Three runs only if they fit in about three minutes.
                if n == 1 && first_wall * MAX_RUNS as f64 > 180.0 {
                    println!("(run took {first_wall:.1} s: one run only)");
                    break;
                }
            }
            Err(e) => {
                eprintln!("fleet bench failed in run {n}: {e}");
                std::process::exit(1);
            }
        }
    }
    print_summary(&runs);
    common::print_total(started);
}

/// The queries of this bench on a running `vmm-fleet up`.
impl Fleet {
    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .map(|v| v.iter().filter(|(_, l)| l.contains(needle)).count())
            .unwrap_or(0)
    }

    /// Arrival times of the lines containing `needle`.
    fn times(&self, needle: &str) -> Vec<Instant> {
        self.lines
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(_, l)| l.contains(needle))
                    .map(|(t, _)| *t)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (time, pid) of every `vm NAME: starting (pid N)` line, in order.
    fn starts(&self, name: &str) -> Vec<(Instant, u32)> {
        let prefix = format!("vm {name}: starting (pid ");
        self.lines
            .lock()
            .map(|v| {
                v.iter()
                    .filter_map(|(t, l)| {
                        let rest = l.split_once(&prefix)?.1;
                        Some((*t, rest.trim_end_matches(')').parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The current pid of every VM, from the log.
    fn pids(&mut self, names: &[String]) -> Res<BTreeMap<String, u32>> {
        let mut m = BTreeMap::new();
        for n in names {
            let pid = self
                .starts(n)
                .last()
                .map(|s| s.1)
                .ok_or_else(|| format!("vm {n}: no `starting (pid N)` line"))?;
            if !self.seen_pids.contains(&pid) {
                self.seen_pids.push(pid);
            }
            m.insert(n.clone(), pid);
        }
        Ok(m)
    }

    /// Some(exit code) once the supervisor has exited (None code: killed by a signal).
    fn exit_code(&mut self) -> Res<Option<Option<i32>>> {
        Ok(self.try_exit()?.map(|st| st.code()))
    }

    fn ensure_alive(&mut self) -> Res<()> {
        match self.exit_code()? {
            None => Ok(()),
            Some(code) => Err(format!(
                "the supervisor exited early (code {code:?}); log tail:\n{}",
                self.log_tail(30)
            )),
        }
    }
}

fn vm_name(i: usize) -> String {
    format!("vm{i:02}")
}

fn write_fleet(dir: &Path) -> Res<Vec<String>> {
    let names: Vec<String> = (0..VMS).map(vm_name).collect();
    for n in &names {
        let text = format!(
            "name: {n}\nvcpus: 1\nmemory_mib: {MEMORY_MIB}\nkernel: builtin\nconsole: stdout\n\
             builtin:\n  then: idle\n  heartbeat_ms: {HEARTBEAT_MS}\n\
             restart:\n  policy: always\n  backoff_initial_ms: 0\n  backoff_max_ms: 1000\n  \
             start_limit_burst: 100\n"
        );
        let p = dir.join(format!("{n}.yaml"));
        fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // A free port for /metrics, so that the bench runs beside anything on the default.
    let p = dir.join("fleet.yaml");
    fs::write(&p, "metrics_address: \"127.0.0.1:0\"\n")
        .map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(names)
}

fn one_run(run: usize) -> Res<RunResult> {
    let t_run = Instant::now();
    let dir = TempDir::new(&format!(
        "vmm-fleet-bench-fleet-{}-{run}",
        std::process::id()
    ))?;
    let dir = dir.path();
    fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let names = write_fleet(dir)?;
    let consoles: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.join("logs").join(format!("{n}.console")))
        .collect();
    let mut r = RunResult::default();

    // 1. Start-up.
    let mut fleet = Fleet::up(dir, &[])?;
    let t0 = fleet.spawned_at;
    let mut first_line: Vec<Option<Duration>> = vec![None; VMS];
    let limit = Duration::from_secs(30);
    while first_line.iter().any(Option::is_none) {
        for (i, c) in consoles.iter().enumerate() {
            if first_line[i].is_none() && has_line(c) {
                first_line[i] = Some(t0.elapsed());
            }
        }
        if t0.elapsed() > limit {
            let missing: Vec<&str> = names
                .iter()
                .zip(&first_line)
                .filter(|(_, t)| t.is_none())
                .map(|(n, _)| n.as_str())
                .collect();
            return Err(format!(
                "after {limit:?}, no console line from {} VM(s): {missing:?}; log tail:\n{}",
                missing.len(),
                fleet.log_tail(30)
            ));
        }
        fleet.ensure_alive()?;
        thread::sleep(Duration::from_millis(1));
    }
    let mut firsts: Vec<f64> = first_line.iter().flatten().copied().map(ms).collect();
    r.startup_all_ms = max(&firsts);
    r.startup_median_ms = median(&mut firsts);
    let spawn_logged: Vec<f64> = names
        .iter()
        .filter_map(|n| fleet.starts(n).first().map(|s| ms(s.0 - t0)))
        .collect();
    r.first_spawn_logged_ms = spawn_logged.iter().copied().fold(f64::INFINITY, f64::min);
    r.last_spawn_logged_ms = max(&spawn_logged);

    // 2. Memory, once every VM counts as running.
    if !wait_until(Duration::from_secs(10), || fleet.count(": running") >= VMS) {
        return Err(format!(
            "only {} of {VMS} VMs logged `running`; log tail:\n{}",
            fleet.count(": running"),
            fleet.log_tail(30)
        ));
    }
    fleet.ensure_alive()?;
    let sup = fleet.pid();
    let pids = fleet.pids(&names)?;
    let mut kids = proc_children(sup);
    kids.sort_unstable();
    let mut logged: Vec<u32> = pids.values().copied().collect();
    logged.sort_unstable();
    if kids != logged {
        return Err(format!(
            "children of {sup} {kids:?} differ from the logged pids {logged:?}"
        ));
    }
    r.sup_rss_kib = status_kib(sup, "VmRSS:")? as f64;
    r.sup_threads = status_kib(sup, "Threads:")? as f64;
    let (mut rss, mut guest, mut own, mut threads) = (vec![], vec![], vec![], vec![]);
    let (mut anon, mut own_anon, mut pss) = (vec![], vec![], vec![]);
    let mut merged = 0;
    for (n, &pid) in &pids {
        let vm_rss = status_kib(pid, "VmRSS:")?;
        let (g, m) = guest_rss_kib(pid).map_err(|e| format!("vm {n} (pid {pid}): {e}"))?;
        merged += usize::from(m);
        rss.push(vm_rss as f64);
        guest.push(g as f64);
        own.push(vm_rss.saturating_sub(g) as f64);
        let a = status_kib(pid, "RssAnon:")?;
        anon.push(a as f64);
        own_anon.push(a.saturating_sub(g) as f64);
        pss.push(rollup_kib(pid, "Pss:")? as f64);
        threads.push(status_kib(pid, "Threads:")? as f64);
    }
    r.child_rss_kib = median(&mut rss);
    r.guest_rss_kib = median(&mut guest);
    r.vmm_own_kib = median(&mut own);
    r.child_anon_kib = median(&mut anon);
    r.vmm_own_anon_kib = median(&mut own_anon);
    r.child_pss_kib = median(&mut pss);
    r.child_threads = median(&mut threads);
    r.guest_merged = merged;

    // 3. Idle CPU.
    let tck = ticks_per_s()?;
    thread::sleep(Duration::from_millis(500));
    let all: Vec<u32> = pids.values().copied().collect();
    let hb0 = count_heartbeats(&consoles);
    let sup0 = cpu_ticks(sup)?;
    let kids0 = all.iter().map(|p| cpu_ticks(*p)).sum::<Res<u64>>()?;
    let ctxt0 = ctxt_switches(sup)?;
    let sup_ns0 = cpu_ns(sup)?;
    let kids_ns0 = all.iter().map(|p| cpu_ns(*p)).sum::<Res<u64>>()?;
    let host0 = host_cpu()?;
    let w0 = Instant::now();
    thread::sleep(IDLE_WINDOW);
    let sup1 = cpu_ticks(sup)?;
    let kids1 = all.iter().map(|p| cpu_ticks(*p)).sum::<Res<u64>>()?;
    let ctxt1 = ctxt_switches(sup)?;
    let sup_ns1 = cpu_ns(sup)?;
    let kids_ns1 = all.iter().map(|p| cpu_ns(*p)).sum::<Res<u64>>()?;
    let host1 = host_cpu()?;
    let window = w0.elapsed().as_secs_f64();
    let hb1 = count_heartbeats(&consoles);
    fleet.ensure_alive()?;
    let now_pids = fleet.pids(&names)?;
    if now_pids != pids {
        return Err("a VM restarted during the idle window".into());
    }
    let pct = |ticks: u64| ticks as f64 / tck / window * 100.0;
    r.cpu_sup_pct = pct(sup1 - sup0);
    r.cpu_children_pct = pct(kids1 - kids0);
    r.cpu_pct = r.cpu_sup_pct + r.cpu_children_pct;
    let kids_ns = kids_ns1.saturating_sub(kids_ns0) as f64;
    let sup_ns = sup_ns1.saturating_sub(sup_ns0) as f64;
    r.cpu_sched_pct = (kids_ns + sup_ns) / 1e9 / window * 100.0;
    r.cpu_sched_sup_pct = sup_ns / 1e9 / window * 100.0;
    r.host_busy_pct = busy_pct(host0, host1);
    let cores = host_cores() as f64;
    r.host_other_pct = (r.host_busy_pct - r.cpu_sched_pct / cores).max(0.0);
    let hbs = hb1.saturating_sub(hb0) as f64;
    r.heartbeats_per_s = hbs / window;
    r.cpu_us_per_heartbeat = if hbs > 0.0 {
        kids_ns / 1e3 / hbs
    } else {
        f64::NAN
    };
    r.sup_ctxt_per_s = (ctxt1 - ctxt0) as f64 / window;

    // 4. Restart latency.
    let (mut restart, mut respawn, mut dead, mut reaped) = (vec![], vec![], vec![], vec![]);
    let mut gone = vec![];
    let host_r0 = host_cpu()?;
    for k in 0..RESTARTS {
        let name = &names[(k * 2) % VMS];
        let console = &consoles[(k * 2) % VMS];
        let old_pid = pids_of(&mut fleet, name)?;
        let starts_before = fleet.starts(name).len();
        let exits_before = fleet.times(&format!("vm {name}: exited")).len();
        let mut dead_at = None;
        let mut gone_at = None;
        let size = fs::metadata(console)
            .map_err(|e| format!("{}: {e}", console.display()))?
            .len();
        let t = Instant::now();
        kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL)
            .map_err(|e| format!("SIGKILL to vm {name} (pid {old_pid}): {e}"))?;
        let limit = Duration::from_secs(10);
        loop {
            if dead_at.is_none() && !alive(old_pid) {
                dead_at = Some(t.elapsed());
            }
            if gone_at.is_none() && task_count(old_pid) <= 1 && !alive(old_pid) {
                gone_at = Some(t.elapsed());
            }
            if new_boot_line(console, size) {
                restart.push(ms(t.elapsed()));
                break;
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "vm {name}: no new `vcpu 0 up` line {limit:?} after SIGKILL; log tail:\n{}",
                    fleet.log_tail(20)
                ));
            }
            thread::sleep(Duration::from_micros(200));
        }
        // The supervisor's `starting` line may reach the pipe a little later.
        if !wait_until(Duration::from_secs(5), || {
            fleet.starts(name).len() > starts_before
        }) {
            return Err(format!(
                "vm {name}: console shows a new boot but no new `starting` line; log tail:\n{}",
                fleet.log_tail(20)
            ));
        }
        let (ts, new_pid) = *fleet.starts(name).last().ok_or("no start")?;
        if new_pid == old_pid {
            return Err(format!("vm {name}: same pid {new_pid} after SIGKILL"));
        }
        respawn.push(ms(ts.saturating_duration_since(t)));
        if let Some(d) = dead_at {
            dead.push(ms(d));
        }
        if let Some(d) = gone_at {
            gone.push(ms(d));
        }
        if let Some(te) = fleet.times(&format!("vm {name}: exited")).get(exits_before) {
            reaped.push(ms(te.saturating_duration_since(t)));
        }
        fleet.pids(&names)?;
        thread::sleep(Duration::from_millis(50));
    }
    fleet.ensure_alive()?;
    let restart_sorted = sorted(&restart);
    r.restart_median_ms = pctl(&restart_sorted, 50);
    r.restart_p90_ms = pctl(&restart_sorted, 90);
    r.restart_max_ms = max(&restart);
    let respawn_sorted = sorted(&respawn);
    r.respawn_median_ms = pctl(&respawn_sorted, 50);
    r.respawn_p90_ms = pctl(&respawn_sorted, 90);
    r.dead_median_ms = median(&mut dead);
    r.reaped_median_ms = median(&mut reaped);
    r.threads_gone_median_ms = median(&mut gone);
    let host_r1 = host_cpu()?;
    r.host_busy_restart_pct = busy_pct(host_r0, host_r1);

    // 5. Stop: every VM up and running again first.
    if !wait_until(Duration::from_secs(10), || {
        fleet.count(": running") >= VMS + RESTARTS
    }) {
        return Err(format!(
            "restarted VMs did not all reach `running`; log tail:\n{}",
            fleet.log_tail(30)
        ));
    }
    let final_pids: Vec<u32> = fleet.pids(&names)?.values().copied().collect();
    let t = Instant::now();
    kill(Pid::from_raw(sup as i32), Signal::SIGTERM).map_err(|e| format!("SIGTERM: {e}"))?;
    let limit = Duration::from_secs(20);
    let code = loop {
        if let Some(code) = fleet.exit_code()? {
            break code;
        }
        if t.elapsed() > limit {
            return Err(format!(
                "the supervisor did not exit {limit:?} after SIGTERM; log tail:\n{}",
                fleet.log_tail(30)
            ));
        }
        thread::sleep(Duration::from_micros(200));
    };
    r.stop_ms = ms(t.elapsed());
    r.stop_exit_code = code;
    let left: Vec<u32> = final_pids.iter().copied().filter(|p| alive(*p)).collect();
    if !left.is_empty() {
        return Err(format!(
            "children still alive after the supervisor exited: {left:?}"
        ));
    }
    let stray = processes_naming(dir);
    if !stray.is_empty() {
        return Err(format!("processes naming the fleet dir remain: {stray:?}"));
    }
    if code != Some(0) {
        return Err(format!(
            "supervisor exit code {code:?} after SIGTERM; log tail:\n{}",
            fleet.log_tail(30)
        ));
    }
    drop(fleet);
    r.wall_s = t_run.elapsed().as_secs_f64();
    Ok(r)
}

fn pids_of(fleet: &mut Fleet, name: &str) -> Res<u32> {
    let pid = fleet
        .starts(name)
        .last()
        .map(|s| s.1)
        .ok_or_else(|| format!("vm {name}: never started"))?;
    if !alive(pid) {
        return Err(format!("vm {name}: pid {pid} is not alive"));
    }
    if !fleet.seen_pids.contains(&pid) {
        fleet.seen_pids.push(pid);
    }
    Ok(pid)
}

/// The file holds at least one complete line.
fn has_line(p: &Path) -> bool {
    match fs::metadata(p) {
        Ok(m) if m.len() > 0 => fs::read(p).is_ok_and(|b| b.contains(&b'\n')),
        _ => false,
    }
}

/// A `vcpu 0 up` line was appended past `offset`.
fn new_boot_line(p: &Path, offset: u64) -> bool {
    let Ok(mut f) = fs::File::open(p) else {
        return false;
    };
    match f.metadata() {
        Ok(m) if m.len() > offset => {}
        _ => return false,
    }
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_end(&mut buf).is_err() {
        return false;
    }
    buf.windows(10).any(|w| w == b"vcpu 0 up\n")
}

fn count_heartbeats(consoles: &[PathBuf]) -> u64 {
    consoles
        .iter()
        .map(|c| {
            fs::read(c)
                .map(|b| b.windows(10).filter(|w| w == b"heartbeat ").count() as u64)
                .unwrap_or(0)
        })
        .sum()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Live processes whose command line mentions `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(rd) = fs::read_dir("/proc") else {
        return vec![];
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// Children of every thread of `pid`.
fn proc_children(pid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    rd.filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Context switches of every thread of `pid`.
fn ctxt_switches(pid: u32) -> Res<u64> {
    let rd =
        fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    let mut total = 0;
    for t in rd.flatten() {
        let Ok(s) = fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for l in s.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// Entries in /proc/PID/task (0 once the process is reaped).
fn task_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |rd| rd.count())
}

/// (busy, total) jiffies of the host from the `cpu` line of /proc/stat.
fn host_cpu() -> Res<(u64, u64)> {
    let s = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let line = s.lines().next().ok_or("/proc/stat: empty")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are within user).
    if v.len() < 8 {
        return Err("/proc/stat: short cpu line".into());
    }
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok((busy, busy + v[3] + v[4]))
}

fn busy_pct(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return f64::NAN;
    }
    b.0.saturating_sub(a.0) as f64 / total as f64 * 100.0
}

fn host_cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Time on CPU of every thread of `pid`, in ns (first field of each task's schedstat).
fn cpu_ns(pid: u32) -> Res<u64> {
    let rd =
        fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    let mut total = 0;
    for t in rd.flatten() {
        let p = t.path().join("schedstat");
        let s = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        total += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{}: bad format", p.display()))?;
    }
    Ok(total)
}

/// `Rss:` (KiB) of the guest memory mapping in /proc/PID/smaps: the anonymous mapping of
/// exactly the guest's size; `merged` is true when there is none and the smallest
/// anonymous `rw-p` mapping larger than that is taken instead (the kernel merged the
/// guest memory with an adjacent anonymous mapping, e.g. a thread stack), which
/// over-counts the guest by that neighbour's resident pages.
fn guest_rss_kib(pid: u32) -> Res<(u64, bool)> {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let maps = common::smaps_mappings(&s)?;
    let exact: Vec<u64> = maps
        .iter()
        .filter(|m| m.end - m.start == GUEST_BYTES)
        .map(|m| m.rss_kib)
        .collect();
    match exact.as_slice() {
        [one] => return Ok((*one, false)),
        [] => {}
        many => return Err(format!("{} mappings of {GUEST_BYTES} bytes", many.len())),
    }
    maps.iter()
        .filter(|m| m.anon_rw && m.end - m.start > GUEST_BYTES)
        .min_by_key(|m| m.end - m.start)
        .map(|m| (m.rss_kib, true))
        .ok_or_else(|| format!("no anonymous mapping of {GUEST_BYTES} bytes or more in smaps"))
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

fn print_run(r: &RunResult) {
    println!(
        "1. start-up: all {VMS} first console lines {:.1} ms (median VM {:.1} ms; \
         `starting` lines logged from {:.1} to {:.1} ms)",
        r.startup_all_ms, r.startup_median_ms, r.first_spawn_logged_ms, r.last_spawn_logged_ms
    );
    println!(
        "2. memory: supervisor VmRSS {:.0} KiB ({} threads); per child VmRSS {:.0} KiB = guest \
         {:.0} KiB + VMM own {:.0} KiB ({} threads); child RssAnon {:.0} KiB (VMM own anon \
         {:.0} KiB), Pss {:.0} KiB{}",
        r.sup_rss_kib,
        r.sup_threads,
        r.child_rss_kib,
        r.guest_rss_kib,
        r.vmm_own_kib,
        r.child_threads,
        r.child_anon_kib,
        r.vmm_own_anon_kib,
        r.child_pss_kib,
        if r.guest_merged > 0 {
            format!(
                "; {} child(ren) had the guest mapping merged with a neighbour",
                r.guest_merged
            )
        } else {
            String::new()
        }
    );
    println!(
        "3. idle CPU: {:.2}% of a core (supervisor {:.2}%, children {:.2}%; schedstat total \
         {:.2}%, supervisor {:.3}%); {:.1} heartbeats/s, {:.0} µs CPU per heartbeat \
         (schedstat); supervisor {:.1} context \
         switches/s; host busy {:.0}% of {} cores, {:.0}% not the fleet",
        r.cpu_pct,
        r.cpu_sup_pct,
        r.cpu_children_pct,
        r.cpu_sched_pct,
        r.cpu_sched_sup_pct,
        r.heartbeats_per_s,
        r.cpu_us_per_heartbeat,
        r.sup_ctxt_per_s,
        r.host_busy_pct,
        host_cores(),
        r.host_other_pct
    );
    println!(
        "4. restart: SIGKILL -> new first console line median {:.1} ms, p90 {:.1} ms, max \
         {:.1} ms; phases (medians from SIGKILL): old leader thread dead {:.1} ms, all \
         threads gone {:.1} ms, `exited` logged {:.1} ms, `starting` logged {:.1} ms (p90 \
         {:.1} ms); host busy {:.0}%",
        r.restart_median_ms,
        r.restart_p90_ms,
        r.restart_max_ms,
        r.dead_median_ms,
        r.threads_gone_median_ms,
        r.reaped_median_ms,
        r.respawn_median_ms,
        r.respawn_p90_ms,
        r.host_busy_restart_pct
    );
    println!(
        "5. stop: SIGTERM -> supervisor exit {:.1} ms (exit code {:?}), no child left",
        r.stop_ms, r.stop_exit_code
    );
    println!("   (run wall time {:.1} s)\n", r.wall_s);
}

fn print_summary(runs: &[RunResult]) {
    let tck = ticks_per_s().unwrap_or(100.0);
    let med = |f: fn(&RunResult) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        median(&mut v)
    };
    println!("=== summary: median over {} run(s) ===", runs.len());
    println!(
        "{:<48} {:>12} {:>14} {:>7}",
        "measure", "value", "target", ""
    );
    let row = |name: &str, v: f64, unit: &str, target: Option<(f64, &str)>| match target {
        Some((t, tu)) => println!(
            "{name:<48} {:>12} {:>14} {:>7}",
            format!("{v:.1} {unit}"),
            format!("< {t} {tu}"),
            verdict(v < t)
        ),
        None => println!("{name:<48} {:>12}", format!("{v:.1} {unit}")),
    };
    let startup = med(|r| r.startup_all_ms);
    row(
        "1. start-up, all first console lines",
        startup,
        "ms",
        Some((TARGET_STARTUP_MS, "ms")),
    );
    row(
        "   start-up, median VM",
        med(|r| r.startup_median_ms),
        "ms",
        None,
    );
    row(
        "   first `starting` line logged",
        med(|r| r.first_spawn_logged_ms),
        "ms",
        None,
    );
    row(
        "   last `starting` line logged",
        med(|r| r.last_spawn_logged_ms),
        "ms",
        None,
    );
    let sup_rss = med(|r| r.sup_rss_kib);
    row(
        "2. supervisor VmRSS",
        sup_rss / 1024.0,
        "MiB",
        Some((TARGET_SUP_RSS_KIB / 1024.0, "MiB")),
    );
    row(
        "   per child VmRSS (median)",
        med(|r| r.child_rss_kib),
        "KiB",
        None,
    );
    row(
        "   per child guest memory Rss (median)",
        med(|r| r.guest_rss_kib),
        "KiB",
        None,
    );
    row(
        "   per child VMM own (VmRSS - guest, median)",
        med(|r| r.vmm_own_kib),
        "KiB",
        None,
    );
    row(
        "   per child VMM own anon (RssAnon - guest)",
        med(|r| r.vmm_own_anon_kib),
        "KiB",
        None,
    );
    row(
        "   per child Pss (binary shared over 50)",
        med(|r| r.child_pss_kib),
        "KiB",
        None,
    );
    row(
        &format!("3. idle CPU (utime+stime), heartbeat_ms {HEARTBEAT_MS}"),
        med(|r| r.cpu_pct),
        "%",
        Some((TARGET_CPU_PCT, "%")),
    );
    row("   of which supervisor", med(|r| r.cpu_sup_pct), "%", None);
    row(
        "   of which children",
        med(|r| r.cpu_children_pct),
        "%",
        None,
    );
    row(
        "   the same from schedstat (ns run times)",
        med(|r| r.cpu_sched_pct),
        "%",
        Some((TARGET_CPU_PCT, "%")),
    );
    row(
        "   of which supervisor (schedstat)",
        med(|r| r.cpu_sched_sup_pct),
        "%",
        None,
    );
    row(
        "   host CPU busy, not the fleet (all cores)",
        med(|r| r.host_other_pct),
        "%",
        None,
    );
    row(
        "   CPU per guest heartbeat (schedstat)",
        med(|r| r.cpu_us_per_heartbeat),
        "µs",
        None,
    );
    row(
        "   supervisor context switches",
        med(|r| r.sup_ctxt_per_s),
        "/s",
        None,
    );
    row(
        "4. restart: SIGKILL -> new console line, median",
        med(|r| r.restart_median_ms),
        "ms",
        Some((TARGET_RESTART_MS, "ms")),
    );
    row(
        "   restart p90",
        med(|r| r.restart_p90_ms),
        "ms",
        Some((TARGET_RESTART_MS, "ms")),
    );
    row(
        "   SIGKILL -> old child's leader thread dead",
        med(|r| r.dead_median_ms),
        "ms",
        None,
    );
    row(
        "   SIGKILL -> all old child's threads gone",
        med(|r| r.threads_gone_median_ms),
        "ms",
        None,
    );
    row(
        "   host CPU busy during restarts (all cores)",
        med(|r| r.host_busy_restart_pct),
        "%",
        None,
    );
    row(
        "   SIGKILL -> `exited` logged, median",
        med(|r| r.reaped_median_ms),
        "ms",
        None,
    );
    row(
        "   SIGKILL -> `starting` logged, median",
        med(|r| r.respawn_median_ms),
        "ms",
        None,
    );
    row(
        "5. stop: SIGTERM -> supervisor exit",
        med(|r| r.stop_ms),
        "ms",
        Some((TARGET_STOP_MS, "ms")),
    );
    println!(
        "\nNote: nested, software-assisted KVM here (/work/shared/KVM-HERE.md): halted vCPUs \
         cost nothing, but each heartbeat interrupt and its serial output are emulated, so \
         the idle CPU above is measured with heartbeat_ms: {HEARTBEAT_MS} and scales with \
         the heartbeat rate. utime+stime are sampled at the {tck} Hz tick, so with other \
         load on the host they are noisy; the schedstat row (ns run times) is the steadier \
         figure."
    );
}
