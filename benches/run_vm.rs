//! # Start-up, memory and exit-cost benchmark: `cargo bench --bench run_vm`
//!
//! A `harness = false` bench that runs the release `vmm-fleet` binary
//! (`env!("CARGO_BIN_EXE_vmm-fleet")`) as a child process, the way the fleet supervisor
//! does, and prints one table per section with the median and the 90th percentile
//! (nearest rank) of each measure. Every configuration gets one untimed warm-up run; every
//! run's exit code and console output are checked. It needs a readable `/dev/kvm`, and
//! prints a note and exits if there is none. Total time here (nested, emulated KVM):
//! about a minute; on a lab host with hardware KVM it is mostly the section 2 runs.
//!
//! ## 1. Built-in guest under `vmm-fleet run-vm`
//!
//! `kernel: builtin`, `builtin: {then: poweroff}`, 32 MiB, 1 and 4 vCPUs,
//! `console: stdout`; 20 runs each.
//!
//! * **first console byte**: from just before `spawn()` to the moment a reader thread of
//!   the bench gets the first byte from the child's stdout pipe.
//! * **process exit**: from just before `spawn()` until `wait4()` reaps the child (guest
//!   memory unmapped and the KVM VM destroyed, as the process is gone).
//! * **peak RSS**: the child's `VmHWM` (`/proc/<pid>/status`), read while the child is
//!   stopped at its `PTRACE_EVENT_EXIT` stop: the bench attaches with
//!   `PTRACE_SEIZE(PTRACE_O_TRACEEXIT)` right after `spawn()`, so the process exits
//!   normally but waits, with its memory still mapped, until the bench has read the value.
//!   `wait4`'s `ru_maxrss` is *not* used: on Linux `execve` folds the RSS high-water mark
//!   of the pre-exec address space into it, and `std::process::Command` spawns with
//!   `CLONE_VM` (posix_spawn/vfork), so that address space is the bench's own and
//!   `ru_maxrss` would be at least the bench's RSS. If ptrace is refused (seccomp, Yama)
//!   the bench falls back to `ru_maxrss` and marks the row with `*`. The exit stop adds
//!   a few tens of microseconds to "process exit" in sections 1 and 3.
//! * **guest-touched**: the same guest is started in the bench process through the
//!   library (`RunningVm::start`, `Kernel::Builtin`, same command line but
//!   `then=idle heartbeat_ms=60000`, so it stays up and quiet), and once it has written
//!   0x41 to the debug port (every vCPU done) plus 20 ms, the `Rss:` of the guest-memory
//!   mapping is read from `/proc/self/smaps` (the mapping is found by the host address of
//!   each KVM slot, `GuestMem::kvm_regions()[i].userspace_addr`). That counts every
//!   resident guest page, whether the VMM wrote it at boot (ELF, zero page, command line,
//!   page tables, MP table) or the guest did. The idle path loads an IDT and arms the
//!   LAPIC timer, so this is a slight over-estimate of what the `then: poweroff` guest
//!   touches.
//! * **VMM own**: peak RSS minus guest-touched (median minus guest-touched, p90 minus
//!   guest-touched): what the VMM process itself costs.
//!
//! ## 2. Port-I/O exit round trip
//!
//! The built-in guest, 1 vCPU, `builtin: {io_exits: N, then: poweroff}`, `console: off`:
//! its BSP does `N` × `outb 0x80` before powering off. Per exit =
//! (median wall time with `N` = 200,000 − median wall time with `N` = 0) / 200,000; 5 runs
//! per cell (each run is ~8 µs × 200,000 = 1.6 s here), after one warm-up with `N` = 0.
//! The six cells run interleaved, one run of each per round, so that changes in host load
//! hit them alike. Measured twice:
//!
//! * under `vmm-fleet run-vm` (a process per run, wall time as in section 1 without
//!   ptrace), with its seccomp filters (the default) and with `--seccomp off`;
//! * under `examples/bare_loop.rs` (compiled into this bench with `#[path]` and called
//!   in-process; also runnable on its own: `cargo run --release --example bare_loop --
//!   'then=poweroff io_exits=1000000'`): the same guest and boot setup from the library
//!   (`GuestMem`, `load_guest`, `mptable::write`, `vcpu_cpuid`, long-mode registers), but a
//!   plain `kvm-ioctls` loop on the calling thread, no vmm-fleet vCPU loop, bus, devices or
//!   counters. The time of a call covers VM creation to VM teardown.
//!
//! The difference cancels start-up costs, which differ between the two; the ratio
//! vmm-fleet / bare per exit is printed.
//!
//! ## 3. `tiny.elf`: vmm-fleet vs QEMU
//!
//! `vmm_fleet::vm::builtin::TINY_ELF` (prints `tiny guest up`, then resets) is written to
//! a temporary file and run 20 times as `kernel: <file>` (32 MiB, 1 vCPU,
//! `console: stdout`) under `vmm-fleet run-vm` (exit code 3, guest reset) and under
//! `qemu-system-x86_64 -M microvm,isa-serial=on -enable-kvm -cpu host,-arch-capabilities
//! -nodefaults -nographic -no-reboot -serial stdio -kernel tiny.elf` (QEMU's default
//! memory size, 128 MiB; exit code 0). Same three measures as section 1. If
//! `qemu-system-x86_64` is not on `PATH` the QEMU column is skipped with a note (Debian:
//! `apt-get install qemu-system-x86`).
//!
//! ## Targets (printed for reference, compared against the median)
//!
//! First console byte within 3 ms, whole process within 20 ms, peak RSS within 2.5 MB
//! (taken as 2.5 MiB = 2560 KiB), exit round trip within 5% of the bare loop.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmm_fleet::config::DEFAULT_CMDLINE;
use vmm_fleet::vm::builtin::TINY_ELF;
use vmm_fleet::vm::{Kernel, RunningVm, StopLatch, VmParams};

use common::{
    Expect, MEMORY_MIB, Res, Sample, Stats, Table, TempDir, VMM, builtin_yaml, host_line,
    kvm_unavailable, ms, run_checked, time_bare, time_run_vm, time_run_vm_with, verdict,
};

const QEMU: &str = "qemu-system-x86_64";
const RUNS: usize = 20;
const IO_RUNS: usize = 5;
const IO_EXITS: u64 = 200_000;

const TARGET_FIRST_BYTE_MS: f64 = 3.0;
const TARGET_EXIT_MS: f64 = 20.0;
const TARGET_RSS_KIB: f64 = 2560.0;
const TARGET_EXIT_RATIO: f64 = 1.05;

fn main() {
    let started = Instant::now();
    if let Some(e) = kvm_unavailable() {
        println!("run_vm bench skipped: cannot open /dev/kvm: {e}");
        return;
    }
    // The directory is removed when `bench` returns.
    let result = TempDir::new(&format!("vmm-fleet-bench-{}", std::process::id()))
        .and_then(|dir| bench(dir.path()));
    if let Err(e) = result {
        eprintln!("run_vm bench failed: {e}");
        std::process::exit(1);
    }
    common::print_total(started);
}

fn bench(dir: &Path) -> Res<()> {
    println!(
        "run_vm bench: {VMM}\n{}; medians and p90 (nearest rank); \
         `*` = ru_maxrss fallback (ptrace refused)",
        host_line()
    );
    section_builtin(dir)?;
    section_io_exits(dir)?;
    section_tiny(dir)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 1

fn section_builtin(dir: &Path) -> Res<()> {
    println!(
        "\n1. built-in guest under `vmm-fleet run-vm` (kernel: builtin, then: poweroff, \
         {MEMORY_MIB} MiB, console: stdout into a pipe), {RUNS} runs each"
    );
    let mut t = Table::new(&["", "median", "p90", "target"]);
    for vcpus in [1u8, 4] {
        let yaml = builtin_yaml(dir, &format!("builtin-{vcpus}"), vcpus, 0, "stdout")?;
        let samples = sample_many(
            || {
                let mut c = Command::new(VMM);
                c.arg("run-vm").arg(&yaml);
                c
            },
            RUNS,
            true,
            &Expect {
                code: 0,
                stdout_has: "poweroff",
            },
        )?;
        let touched = guest_touched_kib(vcpus)?;
        let p = format!("{vcpus} vCPU{}", if vcpus > 1 { "s" } else { "" });
        add_process_rows(&mut t, &p, &samples);
        let peak = Stats::of(samples.iter().map(|s| s.peak_rss_kib as f64));
        t.row(vec![
            format!("{p}  guest-touched (in-process smaps)"),
            mib(touched as f64),
            String::new(),
            String::new(),
        ]);
        t.row(vec![
            format!("{p}  VMM own = peak RSS - guest-touched"),
            mib(peak.median - touched as f64),
            mib(peak.p90 - touched as f64),
            String::new(),
        ]);
    }
    t.print();
    Ok(())
}

/// Start the built-in guest in this process, wait until every vCPU is done, and return
/// the resident size of its guest memory in KiB (from /proc/self/smaps).
fn guest_touched_kib(vcpus: u8) -> Res<u64> {
    let params = VmParams {
        vcpus,
        memory_mib: MEMORY_MIB,
        kernel: Kernel::Builtin,
        initrd: None,
        cmdline: format!("{DEFAULT_CMDLINE} then=idle io_exits=0 heartbeat_ms=60000"),
        console: Box::new(std::io::sink()),
        extra_regions: Vec::new(),
        mmio_devices: Vec::new(),
        counters: None,
        started: None,
        control: None,
        name: "builtin".into(),
    };
    let mut vm = RunningVm::start(params, Arc::new(StopLatch::default()))
        .map_err(|e| format!("in-process VM: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.debug_port().boot_complete().is_none() {
        if Instant::now() > deadline {
            let _ = vm.shutdown();
            return Err("in-process VM: guest not done after 10 s".into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(20));
    let addrs: Vec<u64> = vm
        .memory()
        .kvm_regions()
        .iter()
        .map(|r| r.userspace_addr)
        .collect();
    let smaps = fs::read_to_string("/proc/self/smaps").map_err(|e| format!("smaps: {e}"));
    vm.shutdown().map_err(|e| format!("in-process VM: {e}"))?;
    rss_of_mappings(&smaps?, &addrs).map_err(|e| format!("smaps: {e}"))
}

/// Sum of `Rss:` over the smaps mappings that contain one of `addrs`.
fn rss_of_mappings(smaps: &str, addrs: &[u64]) -> Res<u64> {
    Ok(common::smaps_mappings(smaps)?
        .iter()
        .filter(|m| addrs.iter().any(|&x| m.start <= x && x < m.end))
        .map(|m| m.rss_kib)
        .sum())
}

// ---------------------------------------------------------------------------------------
// Section 2

fn section_io_exits(dir: &Path) -> Res<()> {
    println!(
        "\n2. port-I/O exit round trip: built-in guest, 1 vCPU, builtin: {{io_exits: N, then: \
         poweroff}}, console off; N = 0 and N = {IO_EXITS}, {IO_RUNS} runs per cell, interleaved"
    );
    // The cells run interleaved, one run of each per round, so that a change in host
    // load (other builds on this machine) hits all six alike.
    let yamls = [
        builtin_yaml(dir, "io-0", 1, 0, "off")?,
        builtin_yaml(dir, &format!("io-{IO_EXITS}"), 1, IO_EXITS, "off")?,
    ];
    // Warm-up, with the cheap N = 0.
    time_run_vm(&yamls[0])?;
    time_bare(0)?;
    let mut fleet_ms = [Vec::new(), Vec::new()];
    let mut open_ms = [Vec::new(), Vec::new()];
    let mut bare_ms = [Vec::new(), Vec::new()];
    for _ in 0..IO_RUNS {
        for (i, n) in [0, IO_EXITS].into_iter().enumerate() {
            fleet_ms[i].push(time_run_vm(&yamls[i])?);
            open_ms[i].push(time_run_vm_with(&yamls[i], &["--seccomp", "off"])?);
            bare_ms[i].push(time_bare(n)?);
        }
    }
    let fleet = fleet_ms.map(|v| Stats::of(v.into_iter()));
    let open = open_ms.map(|v| Stats::of(v.into_iter()));
    let bare = bare_ms.map(|v| Stats::of(v.into_iter()));
    let per_exit = |s: &[Stats]| (s[1].median - s[0].median) * 1e3 / IO_EXITS as f64;
    let (pf, po, pb) = (per_exit(&fleet), per_exit(&open), per_exit(&bare));
    let mut t = Table::new(&[
        "",
        "N=0 median",
        "N=0 p90",
        &format!("N={IO_EXITS} median"),
        &format!("N={IO_EXITS} p90"),
        "per exit",
    ]);
    for (name, s, p) in [
        ("vmm-fleet run-vm (process, seccomp on)", &fleet, pf),
        ("vmm-fleet run-vm --seccomp off", &open, po),
        ("bare kvm-ioctls loop (in-process)", &bare, pb),
    ] {
        t.row(vec![
            name.into(),
            format!("{:.2} ms", s[0].median),
            format!("{:.2} ms", s[0].p90),
            format!("{:.1} ms", s[1].median),
            format!("{:.1} ms", s[1].p90),
            format!("{p:.3} us"),
        ]);
    }
    t.print();
    let ratio = pf / pb;
    println!(
        "  ratio vmm-fleet / bare per exit: {ratio:.3} (target <= {TARGET_EXIT_RATIO:.2}: {})",
        verdict(ratio <= TARGET_EXIT_RATIO)
    );
    println!("  ratio seccomp on / off per exit: {:.3}", pf / po);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 3

fn section_tiny(dir: &Path) -> Res<()> {
    let elf = dir.join("tiny.elf");
    fs::write(&elf, TINY_ELF).map_err(|e| format!("{}: {e}", elf.display()))?;
    let yaml = dir.join("tiny.yaml");
    fs::write(
        &yaml,
        format!(
            "name: tiny\nvcpus: 1\nmemory_mib: {MEMORY_MIB}\nkernel: {}\nconsole: stdout\n",
            elf.display()
        ),
    )
    .map_err(|e| format!("{}: {e}", yaml.display()))?;
    let qemu_args: Vec<String> = [
        "-M",
        "microvm,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([elf.display().to_string()])
    .collect();
    println!(
        "\n3. tiny.elf ({} bytes): `vmm-fleet run-vm` ({MEMORY_MIB} MiB, 1 vCPU) vs \
         `{QEMU} {}`, {RUNS} runs each",
        TINY_ELF.len(),
        qemu_args.join(" ")
    );
    let tiny = Expect {
        code: 3,
        stdout_has: "tiny guest up",
    };
    let fleet = sample_many(
        || {
            let mut c = Command::new(VMM);
            c.arg("run-vm").arg(&yaml);
            c
        },
        RUNS,
        true,
        &tiny,
    )?;
    let qemu = match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            println!("  {}", v.lines().next().unwrap_or("").trim());
            Some(sample_many(
                || {
                    let mut c = Command::new(QEMU);
                    c.args(&qemu_args);
                    c
                },
                RUNS,
                true,
                &Expect { code: 0, ..tiny },
            )?)
        }
        Ok(o) => {
            println!(
                "  note: `{QEMU} --version` failed ({}); QEMU column skipped",
                o.status
            );
            None
        }
        Err(e) => {
            println!(
                "  note: {QEMU} not found ({e}); QEMU column skipped \
                 (Debian: apt-get install qemu-system-x86)"
            );
            None
        }
    };
    let mut header = vec!["", "vmm-fleet median", "vmm-fleet p90"];
    if qemu.is_some() {
        header.extend(["qemu median", "qemu p90"]);
    }
    header.push("target");
    let mut t = Table::new(&header);
    let cols = |f: &dyn Fn(&[Sample]) -> (String, String)| {
        let mut v = Vec::new();
        for s in std::iter::once(&fleet).chain(qemu.as_ref()) {
            let (m, p) = f(s);
            v.push(m);
            v.push(p);
        }
        v
    };
    let mut row = |name: &str, f: &dyn Fn(&[Sample]) -> (String, String), target: String| {
        let mut r = vec![name.to_string()];
        r.extend(cols(f));
        r.push(target);
        t.row(r);
    };
    row(
        "first console byte",
        &|s| first_byte_stats(s),
        target_ms(
            Stats::of(fleet.iter().filter_map(|s| s.first_byte.map(ms))).median,
            TARGET_FIRST_BYTE_MS,
        ),
    );
    row(
        "process exit",
        &|s| {
            let st = Stats::of(s.iter().map(|s| ms(s.exit)));
            (format!("{:.2} ms", st.median), format!("{:.2} ms", st.p90))
        },
        target_ms(
            Stats::of(fleet.iter().map(|s| ms(s.exit))).median,
            TARGET_EXIT_MS,
        ),
    );
    row(
        "peak RSS",
        &|s| {
            let st = Stats::of(s.iter().map(|s| s.peak_rss_kib as f64));
            let mark = rss_mark(s);
            (
                format!("{}{mark}", mib(st.median)),
                format!("{}{mark}", mib(st.p90)),
            )
        },
        target_rss(Stats::of(fleet.iter().map(|s| s.peak_rss_kib as f64)).median),
    );
    t.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Running and measuring a child

/// `n` measured runs after one warm-up; every run must meet `expect`.
fn sample_many(
    make: impl Fn() -> Command,
    n: usize,
    trace: bool,
    expect: &Expect,
) -> Res<Vec<Sample>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..=n {
        let s = run_checked(&mut make(), trace, expect)?;
        if i > 0 {
            out.push(s);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Statistics and tables

fn mib(kib: f64) -> String {
    format!("{:.2} MiB", kib / 1024.0)
}

fn target_ms(median: f64, target: f64) -> String {
    format!("<= {target} ms: {}", verdict(median <= target))
}

fn target_rss(median_kib: f64) -> String {
    format!("<= 2.5 MB: {}", verdict(median_kib <= TARGET_RSS_KIB))
}

fn rss_mark(s: &[Sample]) -> &'static str {
    if s.iter().all(|s| s.hwm) { "" } else { "*" }
}

fn first_byte_stats(s: &[Sample]) -> (String, String) {
    let missing = s.iter().filter(|s| s.first_byte.is_none()).count();
    let st = Stats::of(s.iter().filter_map(|s| s.first_byte.map(ms)));
    let note = if missing > 0 {
        format!(" ({missing} runs without output)")
    } else {
        String::new()
    };
    (
        format!("{:.2} ms{note}", st.median),
        format!("{:.2} ms", st.p90),
    )
}

/// The three process rows of section 1: first byte, exit, peak RSS.
fn add_process_rows(t: &mut Table, prefix: &str, s: &[Sample]) {
    let (fm, fp) = first_byte_stats(s);
    let first = Stats::of(s.iter().filter_map(|s| s.first_byte.map(ms)));
    t.row(vec![
        format!("{prefix}  first console byte"),
        fm,
        fp,
        target_ms(first.median, TARGET_FIRST_BYTE_MS),
    ]);
    let exit = Stats::of(s.iter().map(|s| ms(s.exit)));
    t.row(vec![
        format!("{prefix}  process exit"),
        format!("{:.2} ms", exit.median),
        format!("{:.2} ms", exit.p90),
        target_ms(exit.median, TARGET_EXIT_MS),
    ]);
    let rss = Stats::of(s.iter().map(|s| s.peak_rss_kib as f64));
    let mark = rss_mark(s);
    t.row(vec![
        format!("{prefix}  peak RSS (VmHWM at exit)"),
        format!("{}{mark}", mib(rss.median)),
        format!("{}{mark}", mib(rss.p90)),
        target_rss(rss.median),
    ]);
}
