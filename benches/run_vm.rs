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
//! The four cells run interleaved, one run of each per round, so that changes in host load
//! hit them alike. Measured twice:
//!
//! * under `vmm-fleet run-vm` (a process per run, wall time as in section 1 without
//!   ptrace);
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

#[path = "../examples/bare_loop.rs"]
#[allow(dead_code)] // the example's `main`
mod bare_loop;

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmm_fleet::config::DEFAULT_CMDLINE;
use vmm_fleet::vm::builtin::TINY_ELF;
use vmm_fleet::vm::{Kernel, RunningVm, StopLatch, VmParams};

const VMM: &str = env!("CARGO_BIN_EXE_vmm-fleet");
const QEMU: &str = "qemu-system-x86_64";
const RUNS: usize = 20;
const IO_RUNS: usize = 5;
const IO_EXITS: u64 = 200_000;
const MEMORY_MIB: u64 = 32;

const TARGET_FIRST_BYTE_MS: f64 = 3.0;
const TARGET_EXIT_MS: f64 = 20.0;
const TARGET_RSS_KIB: f64 = 2560.0;
const TARGET_EXIT_RATIO: f64 = 1.05;

type Res<T> = Result<T, String>;

/// One child process run.
struct Sample {
    first_byte: Option<Duration>,
    exit: Duration,
    peak_rss_kib: u64,
    /// `peak_rss_kib` is VmHWM at the exit stop (false: `ru_maxrss` fallback).
    hwm: bool,
    /// Exit code, or None if a signal killed it.
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// What a run must produce to count.
struct Expect {
    code: i32,
    stdout_has: &'static str,
}

fn main() {
    let started = Instant::now();
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("run_vm bench skipped: cannot open /dev/kvm: {e}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-fleet-bench-{}", std::process::id()));
    let result = fs::create_dir_all(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|()| bench(&dir));
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        eprintln!("run_vm bench failed: {e}");
        std::process::exit(1);
    }
    println!(
        "\ntotal bench wall time: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn bench(dir: &Path) -> Res<()> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "run_vm bench: {VMM}\nhost kernel {}, {} CPUs; medians and p90 (nearest rank); \
         `*` = ru_maxrss fallback (ptrace refused)",
        kernel.trim(),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    section_builtin(dir)?;
    section_io_exits(dir)?;
    section_tiny(dir)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 1

fn builtin_yaml(dir: &Path, name: &str, vcpus: u8, io_exits: u64, console: &str) -> Res<PathBuf> {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\nvcpus: {vcpus}\nmemory_mib: {MEMORY_MIB}\nkernel: builtin\n\
         console: {console}\nbuiltin:\n  then: poweroff\n  io_exits: {io_exits}\n"
    );
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

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
    Ok(rss_of_mappings(&smaps?, &addrs))
}

/// Sum of `Rss:` over the smaps mappings that contain one of `addrs`.
fn rss_of_mappings(smaps: &str, addrs: &[u64]) -> u64 {
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            inside = addrs.iter().any(|&x| a <= x && x < b);
        } else if inside && let Some(rest) = line.strip_prefix("Rss:") {
            kib += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

// ---------------------------------------------------------------------------------------
// Section 2

fn section_io_exits(dir: &Path) -> Res<()> {
    println!(
        "\n2. port-I/O exit round trip: built-in guest, 1 vCPU, builtin: {{io_exits: N, then: \
         poweroff}}, console off; N = 0 and N = {IO_EXITS}, {IO_RUNS} runs per cell, interleaved"
    );
    // The cells run interleaved, one run of each per round, so that a change in host
    // load (other builds on this machine) hits all four alike.
    let yamls = [
        builtin_yaml(dir, "io-0", 1, 0, "off")?,
        builtin_yaml(dir, &format!("io-{IO_EXITS}"), 1, IO_EXITS, "off")?,
    ];
    // The bare loop gets the command line run-vm builds for those YAML files.
    let cmdlines = [0, IO_EXITS]
        .map(|n| format!("{DEFAULT_CMDLINE} then=poweroff io_exits={n} heartbeat_ms=1000"));
    let fleet_once = |yaml: &Path| -> Res<f64> {
        let mut cmd = Command::new(VMM);
        cmd.arg("run-vm").arg(yaml);
        let s = run_checked(
            &mut cmd,
            false,
            &Expect {
                code: 0,
                stdout_has: "",
            },
        )?;
        Ok(ms(s.exit))
    };
    let bare_once = |cmdline: &str, n: u64| -> Res<f64> {
        let t0 = Instant::now();
        let r = bare_loop::run(cmdline).map_err(|e| format!("bare loop: {e}"))?;
        let wall = t0.elapsed();
        if r.io_exits < n || !String::from_utf8_lossy(&r.console).contains("poweroff") {
            return Err(format!(
                "bare loop {cmdline:?}: {} port-I/O exits, console {:?}",
                r.io_exits,
                String::from_utf8_lossy(&r.console)
            ));
        }
        Ok(ms(wall))
    };
    // Warm-up, with the cheap N = 0.
    fleet_once(&yamls[0])?;
    bare_once(&cmdlines[0], 0)?;
    let mut fleet_ms = [Vec::new(), Vec::new()];
    let mut bare_ms = [Vec::new(), Vec::new()];
    for _ in 0..IO_RUNS {
        for (i, n) in [0, IO_EXITS].into_iter().enumerate() {
            fleet_ms[i].push(fleet_once(&yamls[i])?);
            bare_ms[i].push(bare_once(&cmdlines[i], n)?);
        }
    }
    let fleet = fleet_ms.map(|v| Stats::of(v.into_iter()));
    let bare = bare_ms.map(|v| Stats::of(v.into_iter()));
    let per_exit = |s: &[Stats]| (s[1].median - s[0].median) * 1e3 / IO_EXITS as f64;
    let (pf, pb) = (per_exit(&fleet), per_exit(&bare));
    let mut t = Table::new(&[
        "",
        "N=0 median",
        "N=0 p90",
        &format!("N={IO_EXITS} median"),
        &format!("N={IO_EXITS} p90"),
        "per exit",
    ]);
    for (name, s, p) in [
        ("vmm-fleet run-vm (process)", &fleet, pf),
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

/// One run that must meet `expect`.
fn run_checked(cmd: &mut Command, trace: bool, expect: &Expect) -> Res<Sample> {
    let desc = format!("{cmd:?}");
    let s = run_once(cmd, trace).map_err(|e| format!("{desc}: {e}"))?;
    let text = String::from_utf8_lossy(&s.stdout);
    if s.code != Some(expect.code) || !text.contains(expect.stdout_has) {
        return Err(format!(
            "{desc}: exit code {:?} (expected {}), stdout {:?}, stderr {:?}",
            s.code,
            expect.code,
            text,
            String::from_utf8_lossy(&s.stderr)
        ));
    }
    Ok(s)
}

/// Spawn `cmd` with stdout and stderr piped, time its first stdout byte and its exit,
/// and (with `trace`) read its peak RSS at the ptrace exit stop.
fn run_once(cmd: &mut Command, trace: bool) -> std::io::Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
    let traced = trace && seize_for_exit(pid);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut first = [0u8; 1];
        let mut buf = Vec::new();
        let at = match stdout.read(&mut first) {
            Ok(1) => {
                let at = Instant::now();
                buf.push(first[0]);
                Some(at)
            }
            _ => None,
        };
        let _ = stdout.read_to_end(&mut buf);
        (at, buf)
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut hwm = None;
    let (status, rusage) = loop {
        let (status, rusage) = wait4(pid)?;
        if traced && libc::WIFSTOPPED(status) {
            let event = status >> 16;
            let sig = if event == 0 {
                // A signal-delivery stop: hand the signal on.
                libc::WSTOPSIG(status)
            } else {
                if event == libc::PTRACE_EVENT_EXIT {
                    hwm = vm_hwm_kib(pid);
                }
                0
            };
            ptrace_cont(pid, sig);
            continue;
        }
        break (status, rusage);
    };
    let exit = t0.elapsed();
    // `wait4` reaped it; `child` must not wait again (dropping a Child does not wait).
    drop(child);
    let (first_at, stdout) = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok(Sample {
        first_byte: first_at.map(|at| at.saturating_duration_since(t0)),
        exit,
        peak_rss_kib: hwm.unwrap_or(rusage.ru_maxrss.max(0) as u64),
        hwm: hwm.is_some(),
        code,
        stdout,
        stderr,
    })
}

/// `wait4(pid, .., 0, ..)`, retried on EINTR: (status, rusage).
fn wait4(pid: libc::pid_t) -> std::io::Result<(libc::c_int, libc::rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is a plain C struct of integers; all zeroes is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `rusage` are valid for writes for the whole call; `pid` is
        // our own child that nothing else reaps, so it cannot refer to another process.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Attach to our child `pid` so that it stops at exit (`PTRACE_EVENT_EXIT`) with its
/// memory still mapped. False if the kernel refuses.
fn seize_for_exit(pid: libc::pid_t) -> bool {
    // SAFETY: PTRACE_SEIZE reads no memory of ours: `addr` is unused and `data` is the
    // option bits passed by value. `pid` is our unreaped child.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            libc::PTRACE_O_TRACEEXIT as libc::c_ulong,
        )
    };
    r == 0
}

/// Resume a stopped tracee, delivering `sig` (0: none).
fn ptrace_cont(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: PTRACE_CONT reads no memory of ours: `addr` is unused and `data` is the
    // signal number passed by value. `pid` is our stopped, unreaped tracee.
    unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            sig as libc::c_ulong,
        );
    }
}

/// `VmHWM` of `pid` in KiB.
fn vm_hwm_kib(pid: libc::pid_t) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Statistics and tables

struct Stats {
    median: f64,
    p90: f64,
}

impl Stats {
    fn of(v: impl Iterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = v.collect();
        if v.is_empty() {
            return Stats {
                median: f64::NAN,
                p90: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        // Nearest rank: the smallest value with at least 90% of the samples at or below it.
        let p90 = v[(n * 9).div_ceil(10).max(1) - 1];
        Stats { median, p90 }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: f64) -> String {
    format!("{:.2} MiB", kib / 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
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

/// A left-aligned first column and right-aligned others.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    fn print(&self) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let mut line = String::from(" ");
            for (c, w) in width.iter().enumerate() {
                let cell = r.get(c).map_or("", String::as_str);
                let _ = if c == 0 {
                    write!(line, " {cell:<w$}")
                } else {
                    write!(line, "  {cell:>w$}")
                };
            }
            println!("{}", line.trim_end());
        }
    }
}
