//! # Metrics benchmark: `cargo bench --bench metrics`
//!
//! A `harness = false` bench of what the exit counters and the `/metrics` endpoint cost.
//! It needs a readable `/dev/kvm` for sections 1 and 3, and prints a note and skips them
//! if there is none. Total time here (nested KVM, 2 cores): about 2 minutes.
//!
//! ## 1. The cost of counting
//!
//! * The built-in guest, 1 vCPU, `builtin: {then: poweroff, io_exits: N}`, `console: off`,
//!   under `vmm-fleet run-vm` (a process per run, from `spawn()` to `wait()`) and under
//!   `examples/bare_loop.rs` (compiled in with `#[path]`, as in `benches/run_vm.rs`: the
//!   same guest and boot setup, a plain kvm-ioctls loop with no counters, bus or devices;
//!   from the call to its return). N = 1,000,000, 3 runs each, interleaved with one run of
//!   N = 0 each per round; per exit = (median at N − median at N = 0) / N, which cancels the
//!   start-up costs that differ between a process and an in-process call. Overhead =
//!   vmm-fleet per exit / bare per exit − 1; target < 2%. (The vmm-fleet loop does more
//!   than count: it dispatches each exit on its port-I/O bus; the overhead bounds the
//!   counting cost from above.)
//! * `ExitCounters::add` alone: 100,000,000 calls on one thread on a shared-memory table
//!   (`ExitCounters::create_shared`), vCPU and reason through `black_box`; ns per call,
//!   and that as a share of the measured per-exit time.
//!
//! ## 2. Serving /metrics for 100 VMs × 4 vCPUs
//!
//! 100 `VmSnapshot`s, each with its own `ExitCounters::new(4)` whose every exit, KVM
//! statistic and boot time is non-zero, in a `FleetMetrics`.
//!
//! * in-process: a `FleetCollector` in a `prometheus::Registry`; `render(&registry)` timed
//!   200 times after 5 warm-ups (median, p90 nearest rank), and the body size.
//! * over HTTP: `Exporter::start_with("127.0.0.1:0", fleet, log, limits)` (which also
//!   registers the process collector; `page_reuse: 0`, so every request renders); 200 `GET /metrics HTTP/1.0` with a std `TcpStream`, each timed from
//!   `connect` to the end of the response, after 5 warm-ups.
//!
//! ## 3. Supervisor CPU while scraped every second
//!
//! `vmm-fleet up DIR --log-dir DIR/logs --metrics-address 127.0.0.1:0` (own process group)
//! over 100 built-in VMs × 4 vCPUs (`then: idle`, `heartbeat_ms: 60000`, 32 MiB,
//! `console: off`). Once every VM has logged `running` (at most 60 s, else the fleet is
//! stopped and the section is redone with 25 VMs), 2 s of settling, then the supervisor's
//! utime+stime (`/proc/PID/stat`) over 10 s without scrapes (baseline) and over 20 s with
//! a scrape at the start of every second, as % of one core; plus the mean, median and max
//! scrape latency. Then SIGTERM, and the supervisor must exit (else the process group is
//! SIGKILLed); on any failure the group is SIGKILLed.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use prometheus::Registry;
use vmm_fleet::metrics::counters::{ExitCounters, ExitReason, KVM_STATS};
use vmm_fleet::metrics::exporter::{Exporter, FleetCollector, FleetMetrics, VmSnapshot, render};
use vmm_fleet::metrics::http::Limits;
use vmm_fleet::supervisor::STATE_NAMES;

use common::{
    Fleet, MEMORY_MIB, Res, Stats, Table, TempDir, VMM, builtin_yaml, cpu_ticks, host_line,
    kvm_unavailable, ms, ticks_per_s, time_bare, time_run_vm, verdict,
};

const IO_EXITS: u64 = 1_000_000;
const IO_RUNS: usize = 3;
const ADD_CALLS: u64 = 100_000_000;
const RENDER_VMS: usize = 100;
const RENDER_VCPUS: usize = 4;
const RENDERS: usize = 200;
const FLEET_VMS: usize = 100;
const FLEET_VMS_FALLBACK: usize = 25;
const FLEET_VCPUS: usize = 4;
const RUNNING_LIMIT: Duration = Duration::from_secs(60);
const BASELINE_WINDOW: Duration = Duration::from_secs(10);
const SCRAPE_WINDOW: Duration = Duration::from_secs(20);
const TARGET_OVERHEAD_PCT: f64 = 2.0;

fn main() {
    let started = Instant::now();
    let no_kvm = kvm_unavailable();
    // The directory is removed when `bench` returns.
    let result = TempDir::new(&format!("vmm-fleet-bench-metrics-{}", std::process::id()))
        .and_then(|dir| bench(dir.path(), no_kvm.as_ref()));
    if let Err(e) = result {
        eprintln!("metrics bench failed: {e}");
        std::process::exit(1);
    }
    common::print_total(started);
}

fn bench(dir: &Path, no_kvm: Option<&String>) -> Res<()> {
    println!("metrics bench: {VMM}\n{}; p90 = nearest rank", host_line());
    let per_exit_ns = match no_kvm {
        None => Some(section_counting_cost(dir)?),
        Some(e) => {
            println!("\n1. skipped: cannot open /dev/kvm: {e}");
            None
        }
    };
    section_add(per_exit_ns);
    section_render()?;
    match no_kvm {
        None => section_fleet(dir)?,
        Some(e) => println!("\n3. skipped: cannot open /dev/kvm: {e}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 1

/// Returns the vmm-fleet per-exit time in ns.
fn section_counting_cost(dir: &Path) -> Res<f64> {
    println!(
        "\n1. cost of counting: built-in guest, 1 vCPU, {{then: poweroff, io_exits: N}}, \
         console off; N = {IO_EXITS} (and N = 0 for start-up), {IO_RUNS} runs each, interleaved"
    );
    let yamls = [
        builtin_yaml(dir, "io-0", 1, 0, "off")?,
        builtin_yaml(dir, "io-n", 1, IO_EXITS, "off")?,
    ];
    // Warm-up with the cheap N = 0.
    time_run_vm(&yamls[0])?;
    time_bare(0)?;
    let mut fleet_ms = [Vec::new(), Vec::new()];
    let mut bare_ms = [Vec::new(), Vec::new()];
    for round in 0..IO_RUNS {
        for (i, n) in [0, IO_EXITS].into_iter().enumerate() {
            // Alternate which goes first, so neither always follows the other.
            if round % 2 == 0 {
                fleet_ms[i].push(time_run_vm(&yamls[i])?);
                bare_ms[i].push(time_bare(n)?);
            } else {
                bare_ms[i].push(time_bare(n)?);
                fleet_ms[i].push(time_run_vm(&yamls[i])?);
            }
        }
        println!(
            "  round {}: N={IO_EXITS}: vmm-fleet {:.1} ms, bare {:.1} ms",
            round + 1,
            fleet_ms[1][round],
            bare_ms[1][round]
        );
    }
    let per_exit_ns = |v: &[Vec<f64>; 2]| {
        (Stats::of(v[1].iter().copied()).median - Stats::of(v[0].iter().copied()).median) * 1e6
            / IO_EXITS as f64
    };
    let (pf, pb) = (per_exit_ns(&fleet_ms), per_exit_ns(&bare_ms));
    let mut t = Table::new(&["", "N=0 median", "N=1M median", "N=1M min", "per exit"]);
    for (name, v, p) in [
        ("vmm-fleet run-vm (counts each exit)", &fleet_ms, pf),
        ("bare kvm-ioctls loop (no counters)", &bare_ms, pb),
    ] {
        let s0 = Stats::of(v[0].iter().copied());
        let s1 = Stats::of(v[1].iter().copied());
        t.row(vec![
            name.into(),
            format!("{:.2} ms", s0.median),
            format!("{:.1} ms", s1.median),
            format!("{:.1} ms", s1.min),
            format!("{:.3} us", p / 1e3),
        ]);
    }
    t.print();
    let overhead = (pf / pb - 1.0) * 100.0;
    println!(
        "  overhead vmm-fleet vs bare per exit: {overhead:+.2}% \
         (target < {TARGET_OVERHEAD_PCT}%: {})",
        verdict(overhead < TARGET_OVERHEAD_PCT)
    );
    // The run-to-run noise: each round's N=1M wall time, vmm-fleet against bare.
    let rounds = Stats::of(
        fleet_ms[1]
            .iter()
            .zip(&bare_ms[1])
            .map(|(f, b)| (f / b - 1.0) * 100.0),
    );
    println!(
        "  noise: per-round vmm-fleet/bare wall time at N=1M ranged {:+.2}% .. {:+.2}% \
         (a difference inside that range is not resolved by {IO_RUNS} runs)",
        rounds.min, rounds.max
    );
    Ok(pf)
}

fn section_add(per_exit_ns: Option<f64>) {
    println!(
        "\n   ExitCounters::add alone: {ADD_CALLS} calls, 1 thread, relaxed atomic add on a \
         shared-memory table (create_shared)"
    );
    let (table, _fd) = match ExitCounters::create_shared("bench") {
        Ok(t) => t,
        Err(e) => {
            println!("  skipped: create_shared: {e}");
            return;
        }
    };
    table.set_vcpus(1);
    let t0 = Instant::now();
    for _ in 0..ADD_CALLS {
        table.add(
            std::hint::black_box(0),
            std::hint::black_box(ExitReason::IoOut),
        );
    }
    let ns = t0.elapsed().as_secs_f64() * 1e9 / ADD_CALLS as f64;
    let got = table.get(0, ExitReason::IoOut);
    assert_eq!(got, ADD_CALLS, "every add must land");
    match per_exit_ns {
        Some(p) => println!(
            "  {ns:.2} ns per add = {:.3}% of a {:.3} us port exit",
            ns / p * 100.0,
            p / 1e3
        ),
        None => println!("  {ns:.2} ns per add"),
    }
}

// ---------------------------------------------------------------------------------------
// Section 2

fn filled_fleet() -> Arc<FleetMetrics> {
    let fleet = FleetMetrics::new(&STATE_NAMES);
    let vms = (0..RENDER_VMS)
        .map(|i| {
            let t = ExitCounters::new(RENDER_VCPUS);
            for v in 0..RENDER_VCPUS {
                for (r, reason) in ExitReason::ALL.into_iter().enumerate() {
                    for _ in 0..=(i + v + r) % 7 {
                        t.add(v, reason);
                    }
                }
                for s in 0..KVM_STATS.len() {
                    t.set_kvm_stat(v, s, 1_000_003 * (i + v + s + 1) as u64);
                }
            }
            t.mark_first_console(2_000_000 + i as u64);
            t.mark_userspace_up(5_000_000 + i as u64);
            VmSnapshot {
                name: format!("vm-{i:03}"),
                up: true,
                state: "running",
                restarts: (i % 3) as u64,
                start_time: Some(1.7e9 + i as f64),
                last_exit_code: Some(137),
                memory_bytes: 32 << 20,
                vcpus: RENDER_VCPUS as u64,
                counters: Some(Arc::new(t)),
                console_dropped: None,
            }
        })
        .collect();
    fleet.update(vms);
    fleet
}

fn section_render() -> Res<()> {
    println!(
        "\n2. serving /metrics for {RENDER_VMS} VMs x {RENDER_VCPUS} vCPUs (every counter \
         non-zero), {RENDERS} times each after 5 warm-ups"
    );
    let fleet = filled_fleet();
    let registry = Registry::new();
    registry
        .register(Box::new(
            FleetCollector::new(fleet.clone()).map_err(|e| e.to_string())?,
        ))
        .map_err(|e| e.to_string())?;
    let mut size = 0;
    for _ in 0..5 {
        size = render(&registry).len();
    }
    let mut render_ms = Vec::with_capacity(RENDERS);
    for _ in 0..RENDERS {
        let t0 = Instant::now();
        let body = render(&registry);
        render_ms.push(ms(t0.elapsed()));
        size = body.len();
    }
    let text = String::from_utf8(render(&registry)).map_err(|e| e.to_string())?;
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let probe = "vmm_fleet_vcpu_exits_total{reason=\"other\",vcpu=\"3\",vm=\"vm-099\"}";
    if !text.contains(probe) {
        return Err(format!("rendered text lacks {probe}"));
    }

    // Every request renders (the server's reuse of a fresh page is turned off).
    let exporter = Exporter::start_with(
        "127.0.0.1:0"
            .parse()
            .map_err(|e: std::net::AddrParseError| e.to_string())?,
        fleet,
        Arc::new(|_, msg: &str| eprintln!("{msg}")),
        Limits {
            page_reuse: Duration::ZERO,
            ..Limits::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let addr = exporter.addr().ok_or("the exporter did not bind")?;
    let mut http_size = 0;
    for _ in 0..5 {
        http_size = get_metrics(addr)?.1;
    }
    let mut http_ms = Vec::with_capacity(RENDERS);
    for _ in 0..RENDERS {
        let (d, n) = get_metrics(addr)?;
        http_ms.push(ms(d));
        http_size = n;
    }
    drop(exporter);

    let r = Stats::of(render_ms.into_iter());
    let h = Stats::of(http_ms.into_iter());
    let mut t = Table::new(&["", "median", "p90", "max", "body"]);
    t.row(vec![
        "render(&registry), in-process".into(),
        format!("{:.2} ms", r.median),
        format!("{:.2} ms", r.p90),
        format!("{:.2} ms", r.max),
        format!("{size} B"),
    ]);
    t.row(vec![
        "GET /metrics over HTTP (Exporter)".into(),
        format!("{:.2} ms", h.median),
        format!("{:.2} ms", h.p90),
        format!("{:.2} ms", h.max),
        format!("{http_size} B"),
    ]);
    t.print();
    println!(
        "  {series} series in-process ({:.0} per VM); the HTTP body adds the process_* metrics",
        series as f64 / RENDER_VMS as f64
    );
    Ok(())
}

/// One `GET /metrics HTTP/1.0`: (time from connect to end of response, body bytes).
fn get_metrics(addr: SocketAddr) -> Res<(Duration, usize)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut resp = Vec::with_capacity(256 << 10);
    s.read_to_end(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let d = t0.elapsed();
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP header end in {} bytes", resp.len()))?;
    if !resp.starts_with(b"HTTP/1.1 200") && !resp.starts_with(b"HTTP/1.0 200") {
        return Err(format!(
            "{addr}: {:?}",
            String::from_utf8_lossy(&resp[..head_end])
        ));
    }
    Ok((d, resp.len() - head_end - 4))
}

// ---------------------------------------------------------------------------------------
// Section 3

/// The queries of this bench on a running `vmm-fleet up`.
impl Fleet {
    /// Wait for the `metrics on http://ADDR/metrics` line.
    fn addr(&mut self, limit: Duration) -> Res<SocketAddr> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self.lines.lock().ok().and_then(|v| {
                v.iter().find_map(|(_, l)| {
                    l.split("metrics on http://")
                        .nth(1)?
                        .trim_end_matches("/metrics")
                        .parse()
                        .ok()
                })
            });
            if let Some(a) = found {
                return Ok(a);
            }
            if let Ok(Some(st)) = self.try_exit() {
                return Err(format!("fleet exited ({st}): {}", self.log_tail(20)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no `metrics on` line after {limit:?}: {}",
                    self.log_tail(20)
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Names of VMs that have logged `running`.
    fn running(&self) -> usize {
        let v = self.snapshot();
        v.iter()
            .filter_map(|(_, l)| l.split_once("vm ")?.1.strip_suffix(": running"))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// SIGTERM, wait up to `limit`; then SIGKILL the process group. (Time to exit,
    /// whether processes of the group outlived the supervisor and were SIGKILLed.)
    fn stop(&mut self, limit: Duration) -> Res<(Duration, bool)> {
        let pid = Pid::from_raw(self.pid() as i32);
        let t0 = Instant::now();
        kill(pid, Signal::SIGTERM).map_err(|e| format!("SIGTERM {pid}: {e}"))?;
        while t0.elapsed() < limit {
            if let Ok(Some(_)) = self.try_exit() {
                let took = t0.elapsed();
                // Anything of the group still alive is a leak.
                thread::sleep(Duration::from_millis(100));
                let leftover = killpg(pid, None).is_ok();
                if leftover {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
                return Ok((took, leftover));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
        self.exited = true;
        Err(format!(
            "supervisor still running {limit:?} after SIGTERM (group SIGKILLed)"
        ))
    }
}

fn write_fleet(dir: &Path, vms: usize) -> Res<()> {
    fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
    for i in 0..vms {
        let name = format!("vm-{i:03}");
        let path = dir.join(format!("{name}.yaml"));
        let text = format!(
            "name: {name}\nvcpus: {FLEET_VCPUS}\nmemory_mib: {MEMORY_MIB}\nkernel: builtin\n\
             console: off\n\
             builtin:\n  then: idle\n  heartbeat_ms: 60000\n"
        );
        fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A started fleet with every VM running, or why not.
fn start_fleet(dir: &Path, vms: usize) -> Res<(Fleet, SocketAddr, Duration)> {
    write_fleet(dir, vms)?;
    let t0 = Instant::now();
    let mut fleet = Fleet::up(dir, &["--metrics-address", "127.0.0.1:0"])?;
    let addr = fleet.addr(Duration::from_secs(20))?;
    loop {
        let n = fleet.running();
        if n >= vms {
            return Ok((fleet, addr, t0.elapsed()));
        }
        if let Ok(Some(st)) = fleet.try_exit() {
            return Err(format!("fleet exited ({st}): {}", fleet.log_tail(20)));
        }
        if t0.elapsed() > RUNNING_LIMIT {
            let stop = fleet.stop(Duration::from_secs(30));
            return Err(format!(
                "only {n} of {vms} VMs running after {RUNNING_LIMIT:?} (stopped: {stop:?})"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn section_fleet(dir: &Path) -> Res<()> {
    println!(
        "\n3. supervisor CPU while scraped every second: `vmm-fleet up`, built-in VMs x \
         {FLEET_VCPUS} vCPUs, then: idle, heartbeat_ms: 60000, 32 MiB, console off"
    );
    let (mut fleet, addr, vms, up_in) = match start_fleet(&dir.join("fleet-100"), FLEET_VMS) {
        Ok((f, a, d)) => (f, a, FLEET_VMS, d),
        Err(e) => {
            println!("  {FLEET_VMS} VMs: {e}; falling back to {FLEET_VMS_FALLBACK} VMs");
            let (f, a, d) = start_fleet(&dir.join("fleet-25"), FLEET_VMS_FALLBACK)?;
            (f, a, FLEET_VMS_FALLBACK, d)
        }
    };
    println!(
        "  used {vms} VMs x {FLEET_VCPUS} vCPUs: all running {:.1} s after spawn (pid {}, {addr})",
        up_in.as_secs_f64(),
        fleet.pid()
    );
    let pid = fleet.pid();
    let tps = ticks_per_s()?;
    // Settle: start-up work (and the `running` transitions) out of the window.
    thread::sleep(Duration::from_secs(2));

    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    thread::sleep(BASELINE_WINDOW);
    let base_pct = (cpu_ticks(pid)? - c0) as f64 / tps / t0.elapsed().as_secs_f64() * 100.0;

    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let mut lat_ms = Vec::new();
    let mut body = 0;
    let scrapes = SCRAPE_WINDOW.as_secs();
    for i in 0..scrapes {
        let at = t0 + Duration::from_secs(i);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let (d, n) = get_metrics(addr)?;
        lat_ms.push(ms(d));
        body = n;
    }
    if let Some(d) = (t0 + SCRAPE_WINDOW).checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
    let scraped_pct = (cpu_ticks(pid)? - c0) as f64 / tps / t0.elapsed().as_secs_f64() * 100.0;
    let still = fleet.running();
    let (stop, leftover) = fleet.stop(Duration::from_secs(30))?;

    let mean = lat_ms.iter().sum::<f64>() / lat_ms.len() as f64;
    let l = Stats::of(lat_ms.into_iter());
    let mut t = Table::new(&["", "value"]);
    t.row(vec![
        format!(
            "supervisor CPU, no scrapes ({} s)",
            BASELINE_WINDOW.as_secs()
        ),
        format!("{base_pct:.2}% of a core"),
    ]);
    t.row(vec![
        format!("supervisor CPU, 1 scrape/s ({scrapes} s)"),
        format!("{scraped_pct:.2}% of a core"),
    ]);
    t.row(vec![
        "  difference (the scrapes)".into(),
        format!("{:.2}% of a core", scraped_pct - base_pct),
    ]);
    t.row(vec![
        format!("scrape latency mean ({scrapes} scrapes)"),
        format!("{mean:.2} ms"),
    ]);
    t.row(vec![
        "scrape latency median / p90 / max".into(),
        format!("{:.2} / {:.2} / {:.2} ms", l.median, l.p90, l.max),
    ]);
    t.row(vec!["scrape body".into(), format!("{body} B")]);
    t.row(vec![
        "SIGTERM to supervisor exit".into(),
        format!("{:.0} ms", stop.as_secs_f64() * 1e3),
    ]);
    t.print();
    println!(
        "  CPU ticks are {:.0} ms; {still} VMs had logged running; {}",
        1e3 / tps,
        if leftover {
            "processes of the group OUTLIVED the supervisor (SIGKILLed)"
        } else {
            "no process of the group was left after exit"
        }
    );
    Ok(())
}
