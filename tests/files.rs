//! Files a guest, a child or a local user can get at: console flooding (size cap, one
//! rotation, rate limit with dropped bytes counted), symlinked console paths, unsafe
//! log directories, FIFOs and huge files as VM files or kernels. Real KVM, real
//! processes.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::stat::Mode;

use common::fleet::Fleet;
use common::*;

const MIB: u64 = 1 << 20;

fn vm_file(dir: &Path, name: &str, builtin: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n{builtin}\
             restart:\n  backoff_initial_ms: 100\n"
        ),
    )
    .unwrap();
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// `vmm-fleet ARGS`, killed if it runs past `limit` (so a hang fails the test).
fn run(args: &[&str], limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_with_limit(&mut child, limit);
    (child.wait_with_output().unwrap(), start.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The body of GET /metrics (empty when it cannot be had).
fn scrape(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

fn dropped(addr: SocketAddr, vm: &str) -> Option<u64> {
    let series = format!("vmm_fleet_console_dropped_bytes_total{{vm=\"{vm}\"}} ");
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

fn stop(fleet: &mut Fleet) {
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", fleet.log());
}

#[test]
fn a_flooding_guests_console_stays_within_the_cap_plus_one_rotation() {
    if !kvm_available("files::flood_cap") {
        return;
    }
    let dir = scratch("flood-cap");
    // No rate limit to speak of: the flood reaches the 1 MiB cap quickly.
    std::fs::write(
        dir.join("fleet.yaml"),
        "console_max_mib: 1\nconsole_rate_kib_s: 1048576\n",
    )
    .unwrap();
    vm_file(&dir, "fl", "  then: flood\n");
    let mut fleet = Fleet::up(&dir);
    let console = dir.join("logs/fl.console");
    let old = dir.join("logs/fl.console.1");
    let check = |what: &str| {
        let (a, b) = (size(&console), size(&old));
        assert!(
            a <= MIB && b <= MIB,
            "{what}: console {a} and .1 {b} bytes, cap {MIB}"
        );
    };
    let rotated = wait_until(Duration::from_secs(300), || {
        check("while flooding");
        size(&old) > 0
    });
    assert!(rotated, "no rotation; console {} bytes", size(&console));
    // It keeps writing the new file, and keeps within the cap.
    let after = size(&console);
    assert!(
        wait_until(Duration::from_secs(60), || {
            check("after the rotation");
            size(&console) > after + 4096
        }),
        "the console did not grow after the rotation"
    );
    let text = std::fs::read_to_string(&old).unwrap();
    assert!(text.contains("flood 0123456789"), "{}", &text[..200]);
    stop(&mut fleet);
    check("at the end");
    // Nothing else was written: only the VM files and the log directory's own files.
    let want: Vec<PathBuf> = [
        "fl.yaml",
        "fleet.yaml",
        "logs",
        "logs/fl.console",
        "logs/fl.console.1",
        "logs/fl.log",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(tree(&dir), want);
    let mode = std::fs::metadata(&console).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
}

#[test]
fn output_beyond_the_rate_limit_is_dropped_and_counted() {
    if !kvm_available("files::flood_rate") {
        return;
    }
    let dir = scratch("flood-rate");
    std::fs::write(dir.join("fleet.yaml"), "console_rate_kib_s: 1\n").unwrap();
    vm_file(&dir, "fl", "  then: flood\n");
    // A VM with its own console file (in the log directory: `up` writes nowhere else):
    // the supervisor writes that file too, with the same limits.
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(
        dir.join("own.yaml"),
        "name: own\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nconsole: logs/mine.console\n\
         builtin:\n  then: flood\n",
    )
    .unwrap();
    let mut fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    let start = Instant::now();
    let mut first = 0;
    assert!(
        wait_until(Duration::from_secs(60), || {
            first = dropped(addr, "fl").unwrap_or(0);
            first > 0
        }),
        "no dropped bytes counted\n{}",
        fleet.log()
    );
    assert!(
        wait_until(Duration::from_secs(60), || dropped(addr, "fl")
            .is_some_and(|d| d > first + 10_000)),
        "the dropped-bytes counter did not grow past {first}"
    );
    // What reached the file is within the bucket (16 s of the rate) plus the rate since.
    let allowed = 16 * 1024 + 1024 * (start.elapsed().as_secs() + 2);
    let written = size(&dir.join("logs/fl.console")) + size(&dir.join("logs/fl.log"));
    assert!(
        written <= allowed,
        "{written} bytes written, the limit allows {allowed}"
    );
    assert!(
        wait_until(Duration::from_secs(60), || dropped(addr, "own")
            .is_some_and(|d| d > 10_000)),
        "own: no dropped bytes counted"
    );
    let own = size(&dir.join("logs/mine.console"));
    let allowed = 16 * 1024 + 1024 * (start.elapsed().as_secs() + 2);
    assert!(own > 0 && own <= allowed, "own.console: {own} bytes");
    assert!(!dir.join("logs/own.console").exists());
    // Logged once per run of each VM, not per dropped chunk; a new run logs it again.
    let line = |vm: &str| format!("vm {vm}: output faster than console_rate_kib_s");
    assert_eq!(fleet.count(&line("fl")), 1, "{}", fleet.log());
    assert_eq!(fleet.count(&line("own")), 1, "{}", fleet.log());
    let pid = fleet.pid_of("fl");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(
        fleet.wait_for(Duration::from_secs(60), |f| f.starts("fl").len() == 2
            && f.count(&line("fl")) == 2),
        "{}",
        fleet.log()
    );
    assert_eq!(fleet.count(&line("own")), 1, "{}", fleet.log());
    stop(&mut fleet);
}

#[test]
fn heartbeats_below_the_rate_limit_are_all_kept() {
    if !kvm_available("files::heartbeats") {
        return;
    }
    let dir = scratch("heartbeats");
    vm_file(&dir, "hb", "  then: idle\n  heartbeat_ms: 20\n");
    let mut fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    let console = dir.join("logs/hb.console");
    assert!(
        wait_until(Duration::from_secs(120), || read(&console)
            .contains("heartbeat 100\n")),
        "{}",
        read(&console)
    );
    let text = read(&console);
    let beats: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat ")?.parse().ok())
        .collect();
    let want: Vec<u64> = (1..=beats.len() as u64).collect();
    assert_eq!(beats, want, "every heartbeat, in order");
    assert_eq!(dropped(addr, "hb"), Some(0));
    stop(&mut fleet);
}

#[test]
fn a_symlinked_console_path_is_refused_and_its_target_left_alone() {
    if !kvm_available("files::symlink") {
        return;
    }
    let dir = scratch("symlink");
    let logs = dir.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let target = dir.join("outside.txt");
    std::fs::write(&target, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target, logs.join("vm.console")).unwrap();
    vm_file(&dir, "vm", "  then: idle\n");
    let mut fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("vm vm: cannot start:")
            >= 1),
        "{}",
        fleet.log()
    );
    let log = fleet.log();
    let line = log.lines().find(|l| l.contains("cannot start")).unwrap();
    assert!(
        line.contains("vm.console") && line.contains("symbolic link"),
        "{line}"
    );
    assert_eq!(fleet.starts("vm"), vec![], "no child was started");
    stop(&mut fleet);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(logs.join("vm.console"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_log_directory_others_can_write_is_refused() {
    let dir = scratch("wwlogs");
    let logs = dir.join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(dir.join("fleet.yaml"), "log_dir: logs\n").unwrap();
    vm_file(&dir, "vm", "  then: idle\n");
    let d = dir.to_str().unwrap();
    let (o, _) = run(&["validate", d], Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("fleet.yaml: log_dir:") && err.contains("writable by every user"),
        "{err}"
    );
    let (o, _) = run(
        &["up", d, "--metrics-address", "127.0.0.1:0"],
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nothing started"), "{}", stderr(&o));
    assert_eq!(tree(&logs), Vec::<PathBuf>::new(), "nothing written there");
    // Sticky and ours (like a private /tmp) is fine.
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (o, _) = run(&["validate", d], Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn a_fifo_or_a_huge_file_as_a_vm_file_is_refused_promptly() {
    let dir = scratch("fifo-vm");
    vm_file(&dir, "ok", "  then: idle\n");
    nix::unistd::mkfifo(&dir.join("x.yaml"), Mode::from_bits_truncate(0o644)).unwrap();
    let d = dir.to_str().unwrap();
    let (o, took) = run(&["validate", d], Duration::from_secs(30));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("x.yaml: cannot read: is a FIFO, not a regular file"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    std::fs::remove_file(dir.join("x.yaml")).unwrap();
    let big = dir.join("big.yaml");
    let mut f = std::fs::File::create(&big).unwrap();
    let line = "# padding padding padding padding padding padding padding padding\n";
    for _ in 0..(10 * MIB as usize / line.len() + 1) {
        f.write_all(line.as_bytes()).unwrap();
    }
    drop(f);
    assert!(size(&big) >= 10 * MIB);
    let (o, took) = run(&["validate", d], Duration::from_secs(30));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("big.yaml: cannot read: is ")
            && err.contains("more than the 1048576 bytes (1 MiB)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_fifo_added_to_a_running_fleet_is_refused_at_reload_and_sigterm_still_works() {
    if !kvm_available("files::fifo_reload") {
        return;
    }
    let dir = scratch("fifo-reload");
    std::fs::write(dir.join("fleet.yaml"), "stop_grace_s: 2\n").unwrap();
    vm_file(&dir, "vm", "  then: idle\n");
    let mut fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(60), |f| f.count("vm vm: running") >= 1),
        "{}",
        fleet.log()
    );
    let pid = fleet.pid_of("vm");
    nix::unistd::mkfifo(&dir.join("x.yaml"), Mode::from_bits_truncate(0o644)).unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("reload refused") >= 1
            && f.count("x.yaml: cannot read: is a FIFO") >= 1),
        "{}",
        fleet.log()
    );
    assert_eq!(fleet.pid_of("vm"), pid, "the VM kept running");
    let t = Instant::now();
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", fleet.log());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[test]
fn a_fifo_as_kernel_is_refused_at_validate() {
    let dir = scratch("fifo-kernel");
    nix::unistd::mkfifo(&dir.join("vmlinux"), Mode::from_bits_truncate(0o644)).unwrap();
    std::fs::write(
        dir.join("vm.yaml"),
        "name: vm\nvcpus: 1\nmemory_mib: 64\nkernel: vmlinux\n",
    )
    .unwrap();
    let (o, took) = run(
        &["validate", dir.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vm.yaml: kernel: ") && err.contains("vmlinux: is a FIFO, not a regular file"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn reaping_and_sigterm_go_on_while_a_slow_reload_reads_the_directory() {
    if !kvm_available("files::slow_reload") {
        return;
    }
    let dir = scratch("slow-reload");
    std::fs::write(dir.join("fleet.yaml"), "stop_grace_s: 2\n").unwrap();
    vm_file(&dir, "vm", "  then: idle\n");
    let mut fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(60), |f| f.count("vm vm: running") >= 1),
        "{}",
        fleet.log()
    );
    // 400 files of 9000 YAML nodes each, each under every limit: reading and checking
    // them takes the loader many seconds on these machines (about 15 s, debug build).
    let items = vec!["1"; 9000].join(", ");
    for i in 0..400 {
        std::fs::write(
            dir.join(format!("slow{i:03}.yaml")),
            format!("name: s{i}\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nx: [{items}]\n"),
        )
        .unwrap();
    }
    fleet.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    // While it reads: a child's death is reaped and logged at once...
    let pid = fleet.pid_of("vm");
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count("vm vm: exited") >= 1),
        "{}",
        fleet.log()
    );
    let reaped = t.elapsed();
    // ...and SIGTERM ends the fleet within its stop grace.
    let t = Instant::now();
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(30));
    let stopped = t.elapsed();
    assert_eq!(st.code(), Some(0), "{}", fleet.log());
    let log = fleet.log();
    eprintln!("reaped after {reaped:?}, stopped after {stopped:?}");
    assert!(
        reaped < Duration::from_secs(2),
        "reaped after {reaped:?}\n{log}"
    );
    assert!(
        stopped < Duration::from_secs(4),
        "stopped after {stopped:?}\n{log}"
    );
    assert_eq!(
        fleet.count("reload refused"),
        0,
        "the load had finished already: this test shows nothing\n{log}"
    );
}

#[test]
fn up_refuses_fifos_and_a_huge_file_at_once_and_writes_nothing() {
    let dir = scratch("hostile-up");
    vm_file(&dir, "ok", "  then: idle\n");
    nix::unistd::mkfifo(&dir.join("x.yaml"), Mode::from_bits_truncate(0o644)).unwrap();
    nix::unistd::mkfifo(&dir.join("vmlinux"), Mode::from_bits_truncate(0o644)).unwrap();
    nix::unistd::mkfifo(&dir.join("initrd.img"), Mode::from_bits_truncate(0o644)).unwrap();
    std::fs::write(
        dir.join("k.yaml"),
        "name: k\nvcpus: 1\nmemory_mib: 64\nkernel: vmlinux\ninitrd: initrd.img\n",
    )
    .unwrap();
    let mut f = std::fs::File::create(dir.join("big.yaml")).unwrap();
    let line = "# padding padding padding padding padding padding padding padding\n";
    for _ in 0..(10 * MIB as usize / line.len() + 1) {
        f.write_all(line.as_bytes()).unwrap();
    }
    drop(f);
    let before = tree(&dir);
    let d = dir.to_str().unwrap();
    let logs = dir.join("logs");
    let (o, took) = run(
        &[
            "up",
            d,
            "--log-dir",
            logs.to_str().unwrap(),
            "--metrics-address",
            "127.0.0.1:0",
        ],
        Duration::from_secs(30),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "x.yaml: cannot read: is a FIFO, not a regular file",
        "big.yaml: cannot read: is ",
        "k.yaml: kernel: ",
        "vmlinux: is a FIFO, not a regular file",
        "k.yaml: initrd: ",
        "initrd.img: is a FIFO, not a regular file",
        "nothing started",
    ] {
        assert!(err.contains(want), "no `{want}`:\n{err}");
    }
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Nothing written: no log directory, no file changed or added.
    assert_eq!(tree(&dir), before);
    assert!(!logs.exists());
}
