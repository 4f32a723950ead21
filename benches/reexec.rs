//! # Reexec of a large fleet: `cargo bench --bench reexec`
//!
//! Starts `vmm-fleet up DIR` over N VMs (`VMM_FLEET_BENCH_VMS`, default 1000; a list such
//! as `100,1000` runs each; built-in guest, `then: idle`, 1 vCPU, 16 MiB, heartbeat 1 s,
//! `memory_overcommit: true`), waits until every VM heartbeats, then scrapes `/metrics`
//! in a loop on its own thread and sends SIGUSR2 (reexec). Prints:
//!
//! - **handover**: from SIGUSR2 until the new program logs `reexec: resumed from`;
//! - **no scrape answered**: the longest time between two answered scrapes across the
//!   reexec (a scrape waits in the listener's backlog meanwhile), and the scrapes that
//!   failed (refused, reset, timed out after 10 s);
//! - **VMs restarted**: children whose pid changed or that died, and `starting` lines
//!   after the reexec (must be 0);
//! - the size of the handed-over state (from the log).
//!
//! Needs a readable `/dev/kvm` (prints a note and exits without). The supervisor's fd
//! limit must cover about 6 fds per VM (`ulimit -n`).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

use common::{Res, TempDir, VMM, alive, children, contains, kvm_unavailable, ms};

fn main() {
    if let Some(why) = kvm_unavailable() {
        println!("reexec: skipped: {why}");
        return;
    }
    let counts: Vec<usize> = std::env::var("VMM_FLEET_BENCH_VMS")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in counts {
        if let Err(e) = one_run(VMM, n) {
            println!("reexec: {n} VMs: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Res<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            return Err(format!("timed out: {what}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn scrape(addr: SocketAddr) -> bool {
    let go = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(head.ends_with(b" 200"))
    };
    go().unwrap_or(false)
}

fn one_run(bin: &str, n: usize) -> Res<()> {
    let dir = TempDir::new(&format!(
        "vmm-fleet-bench-reexec-{}-{n}",
        std::process::id()
    ))?;
    let dir = dir.path();
    fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut consoles: Vec<PathBuf> = Vec::new();
    for i in 0..n {
        let name = format!("vm{i:04}");
        let text = format!(
            "name: {name}\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\nconsole: stdout\n\
             builtin:\n  then: idle\n  heartbeat_ms: 1000\n"
        );
        let p = dir.join(format!("{name}.yaml"));
        fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        consoles.push(dir.join("logs").join(format!("{name}.console")));
    }
    fs::write(
        dir.join("fleet.yaml"),
        "metrics_address: \"127.0.0.1:0\"\nmemory_overcommit: true\n",
    )
    .map_err(|e| e.to_string())?;
    let log = dir.join("up.log");
    let mut cmd = Command::new(bin);
    cmd.arg("up")
        .arg(dir)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).map_err(|e| e.to_string())?)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("spawn {bin} up: {e}"))?;
    let sup = child.id();
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    let result = (|| {
        let limit = Duration::from_secs(60 + n as u64 / 10);
        until(limit, "every VM heartbeating", || {
            consoles.iter().all(|c| contains(c, b"heartbeat "))
        })?;
        let addr: SocketAddr = read_log()
            .split("metrics on http://")
            .nth(1)
            .and_then(|s| s.split("/metrics").next())
            .and_then(|a| a.parse().ok())
            .ok_or("no metrics address in the log")?;
        let before = children(sup);
        let starts_before = read_log().matches(": starting (pid").count();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let scraper = thread::spawn(move || {
            let (mut last, mut gap, mut ok, mut failed) = (Instant::now(), Duration::ZERO, 0, 0);
            while !s.load(Ordering::Relaxed) {
                if scrape(addr) {
                    gap = gap.max(last.elapsed());
                    last = Instant::now();
                    ok += 1;
                } else {
                    failed += 1;
                }
                thread::sleep(Duration::from_millis(2));
            }
            (gap.max(last.elapsed()), ok, failed)
        });
        thread::sleep(Duration::from_secs(1));
        let t0 = Instant::now();
        kill(Pid::from_raw(sup as i32), Signal::SIGUSR2).map_err(|e| e.to_string())?;
        until(limit, "reexec: resumed", || {
            read_log().contains("reexec: resumed from")
        })?;
        let handover = ms(t0.elapsed());
        // Scrapes for a second more, and the consoles go on.
        let sizes: Vec<u64> = consoles
            .iter()
            .map(|c| fs::metadata(c).map_or(0, |m| m.len()))
            .collect();
        thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let (gap, ok, failed) = scraper.join().map_err(|_| "scraper panicked")?;
        until(Duration::from_secs(30), "every console growing", || {
            consoles
                .iter()
                .zip(&sizes)
                .all(|(c, s)| fs::metadata(c).is_ok_and(|m| m.len() > *s))
        })?;
        let after = children(sup);
        let text = read_log();
        let restarted =
            before.difference(&after).count() + before.iter().filter(|p| !alive(**p)).count();
        let starts = text.matches(": starting (pid").count() - starts_before;
        let bytes = text
            .split("bytes of state")
            .next()
            .and_then(|s| s.rsplit(", ").next())
            .unwrap_or("?")
            .trim()
            .to_string();
        println!(
            "reexec: {n} VMs: handover (SIGUSR2 to `resumed` logged) {handover:.0} ms; \
             longest time with no scrape answered {:.0} ms ({ok} scrapes answered, {failed} \
             failed); VMs restarted {restarted} (starting lines after: {starts}); state \
             {bytes} bytes",
            ms(gap)
        );
        kill(Pid::from_raw(sup as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
        child.wait().map_err(|e| e.to_string())?;
        if restarted > 0 || starts > 0 || failed > 0 {
            return Err(format!(
                "{restarted} VMs restarted, {starts} started, {failed} scrapes failed"
            ));
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = killpg(Pid::from_raw(sup as i32), Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        let log = read_log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        println!(
            "up.log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    result
}
