//! Helpers shared by the `harness = false` benches (`run_vm`, `fleet`, `metrics`), each of
//! which includes this file with `mod common;`. Not every bench uses every item.
#![allow(dead_code)]

#[path = "../../examples/bare_loop.rs"]
#[allow(dead_code)] // the example's `main`
mod bare_loop;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, SysconfVar, sysconf};
use vmm_fleet::config::DEFAULT_CMDLINE;

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm-fleet");
/// Guest RAM of every VM the benches start (as in `examples/bare_loop.rs`).
pub const MEMORY_MIB: u64 = 32;

pub type Res<T> = Result<T, String>;

// ---------------------------------------------------------------------------------------
// Set-up and wrap-up

/// Why `/dev/kvm` cannot be opened for reading and writing, or None if it can.
pub fn kvm_unavailable() -> Option<String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| e.to_string())
}

/// `host kernel K, N CPUs` for a bench's header.
pub fn host_line() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "host kernel {}, {} CPUs",
        kernel.trim(),
        thread::available_parallelism().map_or(0, |n| n.get())
    )
}

pub fn print_total(started: Instant) {
    println!(
        "\ntotal bench wall time: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A fresh, empty temporary directory, removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `$TMPDIR/NAME`, emptied first if it exists.
    pub fn new(name: &str) -> Res<TempDir> {
        let dir = TempDir(std::env::temp_dir().join(name));
        let _ = fs::remove_dir_all(&dir.0);
        fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// The built-in guest under `vmm-fleet run-vm` and under the bare loop

/// `DIR/NAME.yaml` for the built-in guest: `then: poweroff` after `io_exits` port writes.
pub fn builtin_yaml(
    dir: &Path,
    name: &str,
    vcpus: u8,
    io_exits: u64,
    console: &str,
) -> Res<PathBuf> {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\nvcpus: {vcpus}\nmemory_mib: {MEMORY_MIB}\nkernel: builtin\n\
         console: {console}\nbuiltin:\n  then: poweroff\n  io_exits: {io_exits}\n"
    );
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Wall time (ms) of one `vmm-fleet run-vm YAML`, spawn to reap; it must exit with 0.
pub fn time_run_vm(yaml: &Path) -> Res<f64> {
    time_run_vm_with(yaml, &[])
}

/// [`time_run_vm`] with extra `run-vm` arguments (e.g. `--seccomp off`).
pub fn time_run_vm_with(yaml: &Path, args: &[&str]) -> Res<f64> {
    let mut cmd = Command::new(VMM);
    cmd.arg("run-vm").args(args).arg(yaml);
    let s = run_checked(
        &mut cmd,
        false,
        &Expect {
            code: 0,
            stdout_has: "",
        },
    )?;
    Ok(ms(s.exit))
}

/// Wall time (ms) of one in-process bare-loop run of the built-in guest with
/// `then=poweroff io_exits=N` (the command line run-vm builds for `builtin_yaml`), from
/// the call to its return; it must see `n` port exits and the guest's `poweroff`.
pub fn time_bare(n: u64) -> Res<f64> {
    let cmdline = format!("{DEFAULT_CMDLINE} then=poweroff io_exits={n} heartbeat_ms=1000");
    let t0 = Instant::now();
    let r = bare_loop::run(&cmdline).map_err(|e| format!("bare loop: {e}"))?;
    let wall = t0.elapsed();
    if r.io_exits < n || !String::from_utf8_lossy(&r.console).contains("poweroff") {
        return Err(format!(
            "bare loop {cmdline:?}: {} port-I/O exits, console {:?}",
            r.io_exits,
            String::from_utf8_lossy(&r.console)
        ));
    }
    Ok(ms(wall))
}

// ---------------------------------------------------------------------------------------
// Running and measuring a child

/// One child process run.
pub struct Sample {
    pub first_byte: Option<Duration>,
    pub exit: Duration,
    pub peak_rss_kib: u64,
    /// `peak_rss_kib` is VmHWM at the exit stop (false: `ru_maxrss` fallback).
    pub hwm: bool,
    /// Exit code, or None if a signal killed it.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What a run must produce to count.
pub struct Expect {
    pub code: i32,
    pub stdout_has: &'static str,
}

/// One run that must meet `expect`.
pub fn run_checked(cmd: &mut Command, trace: bool, expect: &Expect) -> Res<Sample> {
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
pub fn run_once(cmd: &mut Command, trace: bool) -> std::io::Result<Sample> {
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
                    hwm = status_kib(child.id(), "VmHWM:").ok();
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

// ---------------------------------------------------------------------------------------
// `vmm-fleet up`

/// A running `vmm-fleet up DIR --log-dir DIR/logs` in its own process group, with its
/// event log (stderr), every line stamped with its arrival time.
pub struct Fleet {
    pub child: Child,
    /// Just before `spawn()`.
    pub spawned_at: Instant,
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Child pids seen (SIGKILLed on drop if still alive).
    pub seen_pids: Vec<u32>,
    pub exited: bool,
}

impl Fleet {
    /// Start `vmm-fleet up DIR --log-dir DIR/logs EXTRA...`.
    pub fn up(dir: &Path, extra: &[&str]) -> Res<Fleet> {
        let mut cmd = Command::new(VMM);
        cmd.arg("up")
            .arg(dir)
            .arg("--log-dir")
            .arg(dir.join("logs"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let spawned_at = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("spawn {VMM} up: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let err = child.stderr.take().ok_or("no stderr pipe")?;
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let now = Instant::now();
                if let Ok(mut v) = l.lock() {
                    v.push((now, line));
                }
            }
        });
        Ok(Fleet {
            child,
            spawned_at,
            lines,
            seen_pids: Vec::new(),
            exited: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn snapshot(&self) -> Vec<(Instant, String)> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The last `n` lines of the event log.
    pub fn log_tail(&self, n: usize) -> String {
        let v = self.snapshot();
        let skip = v.len().saturating_sub(n);
        v[skip..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Some(status) once the supervisor has exited (and is reaped).
    pub fn try_exit(&mut self) -> Res<Option<ExitStatus>> {
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exited = true;
                Ok(Some(st))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("try_wait on the supervisor: {e}")),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        if !self.exited {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            // Stragglers of the group, if any.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        // Children die with the supervisor (PR_SET_PDEATHSIG) and share its process
        // group; this is a last resort for any that did not.
        for pid in &self.seen_pids {
            if alive(*pid) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// /proc readers

/// A live (non-zombie) process.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The number after `key` in the `key: value` file `path` (kB for memory keys).
fn proc_number(path: &str, key: &str) -> Res<u64> {
    let s = fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{path}: no {key}"))
}

/// The number after `key` in /proc/PID/status (kB for memory keys).
pub fn status_kib(pid: u32, key: &str) -> Res<u64> {
    proc_number(&format!("/proc/{pid}/status"), key)
}

/// The number after `key` in /proc/PID/smaps_rollup (kB).
pub fn rollup_kib(pid: u32, key: &str) -> Res<u64> {
    proc_number(&format!("/proc/{pid}/smaps_rollup"), key)
}

/// utime + stime of every thread of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Res<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let rest = s
        .rsplit_once(") ")
        .map(|x| x.1)
        .ok_or_else(|| format!("/proc/{pid}/stat: bad format"))?;
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Res<u64> {
        f.get(i - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {i}"))
    };
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_s() -> Res<f64> {
    Ok(sysconf(SysconfVar::CLK_TCK)
        .map_err(|e| format!("sysconf(CLK_TCK): {e}"))?
        .ok_or("CLK_TCK unknown")? as f64)
}

/// One mapping of /proc/PID/smaps.
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Private, read-write, no file (inode 0) and no name such as `[stack]`.
    pub anon_rw: bool,
    /// Its `Rss:` in KiB.
    pub rss_kib: u64,
}

/// The mappings of an smaps text, with their `Rss:`.
pub fn smaps_mappings(smaps: &str) -> Res<Vec<Mapping>> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            let perms = words.next().unwrap_or("");
            let inode = words.nth(2).unwrap_or("");
            let anon_rw = perms == "rw-p" && inode == "0" && words.next().is_none();
            maps.push(Mapping {
                start,
                end,
                anon_rw,
                rss_kib: 0,
            });
            continue;
        }
        if let (Some(v), Some(last)) = (line.strip_prefix("Rss:"), maps.last_mut()) {
            last.rss_kib = v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .ok_or("bad Rss: line")?;
        }
    }
    Ok(maps)
}

// ---------------------------------------------------------------------------------------
// Statistics and tables

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// Nearest-rank percentile of a sorted slice: the smallest value with at least `p`% of
/// the samples at or below it (NaN if empty).
pub fn pctl(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Sorts `v`; the middle value, or the mean of the two middle ones (NaN if empty).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median, nearest-rank p90, min and max (all NaN if there are no samples).
pub struct Stats {
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(v: impl Iterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = v.collect();
        let median = median(&mut v);
        Stats {
            median,
            p90: pctl(&v, 90),
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// `met` or `MISSED`.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// A left-aligned first column and right-aligned others.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    pub fn print(&self) {
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

/// Whether file `p` holds `needle` (false if it cannot be read).
pub fn contains(p: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
}

/// Pids of the live children of `pid` (every thread's `/proc/PID/task/TID/children`).
pub fn children(pid: u32) -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}
