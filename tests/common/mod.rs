//! Helpers shared by the integration tests: KVM presence, temp dirs, running the binary.
#![allow(dead_code)]

pub mod fleet;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// True when /dev/kvm exists. When it does not, say so loudly and leave a marker that
/// .ci/run checks, so a skipped KVM test can never pass unnoticed on a KVM host.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n*** KVM-TEST-SKIPPED: {test}: /dev/kvm does not exist on this machine ***\n");
    let marker = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvm-skipped");
    let _ = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(marker)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{test}\n").as_bytes()));
    false
}

/// Where scratch directories go: under /tmp, not in the checkout, because several
/// tests run processes as another user (`nobody`), who must be able to reach them; a
/// checkout may sit below a directory only its owner can enter (`mktemp -d` is 0700).
fn scratch_root() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join("vmm-fleet-tests");
    let _ = fs::create_dir_all(&root);
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o755));
    root
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = scratch_root().join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The vmm-fleet binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm-fleet")
}

/// The binary under test, copied where another user (`nobody`) may execute it: the
/// checkout may sit below a directory only its owner can enter. Copied by `cp`, so no
/// write fd of this (multi-threaded, forking) process can make an exec fail with
/// ETXTBSY.
pub fn bin_for_others() -> &'static Path {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = scratch_root().join(format!("bin-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("bin dir");
        let dst = dir.join("vmm-fleet");
        let ok = Command::new("cp")
            .arg(bin())
            .arg(&dst)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cp {} {}", bin(), dst.display());
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod bin");
        dst
    })
}

/// Write a VM file for a built-in guest whose console goes to `<dir>/<name>.console`.
pub fn builtin_config(dir: &Path, name: &str, vcpus: u8, then: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\nvcpus: {vcpus}\nmemory_mib: 32\nkernel: builtin\nconsole: {name}.console\nbuiltin:\n  then: {then}\n{extra}"
    );
    fs::write(&path, text).expect("write config");
    path
}

/// Start `vmm-fleet run-vm FILE`.
pub fn spawn_run_vm(config: &Path) -> Child {
    Command::new(bin())
        .arg("run-vm")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-fleet")
}

/// Wait for a child at most `limit`; kill it and panic past that.
pub fn wait_with_limit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm-fleet did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run to completion; (exit code, stderr).
pub fn run_to_end(config: &Path, limit: Duration) -> (Option<i32>, String) {
    let mut child = spawn_run_vm(config);
    let st = wait_with_limit(&mut child, limit);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (st.code(), err)
}

/// Poll `f` until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// The file's text, or "" if it does not exist yet.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// The state letter and every later field of /proc/PID/stat (empty once it is gone).
pub fn stat_fields(pid: u32) -> Vec<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    s.rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// True while process `pid` exists and is not a zombie (PID 1 reaps orphans late here:
/// a zombie still has a /proc entry).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).first().is_some_and(|st| st != "Z")
}

/// CPU time (utime + stime, clock ticks) of process `pid`; None once it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    // Fields 14 and 15 of stat; `stat_fields` starts at field 3.
    let f = stat_fields(pid);
    let field = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(field(11)? + field(12)?)
}

/// The value of `key:` in /proc/PID/status, trimmed; None when absent or gone.
pub fn status_value(pid: u32, key: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()))
}

/// True once process `pid` has a handler for SIGTERM installed (SigCgt bit 15).
pub fn catches_sigterm(pid: u32) -> bool {
    status_value(pid, "SigCgt")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// Send SIGTERM to a child.
pub fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
}

/// A minimal HTTP/1.0 GET of `path` from `addr` (5 s to connect, 10 s to read);
/// (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Value of the series whose line in `text` (a /metrics page) starts with `series`
/// (name plus labels, as printed).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}
