//! The control socket and the CLI on it, against real `vmm-fleet up` fleets of built-in
//! guests under KVM: status / stop / start / restart / kill / pause / resume /
//! reset-failed through the CLI binary, the errors a user gets, the peer check, the
//! graceful stop, and a flood of connections.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::fleet::{Fleet, up_command};
use common::*;
use vmm_fleet::control::VmInfo;

fn vm_file(dir: &Path, name: &str, then: &str, restart: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\nbuiltin:\n  then: {then}\n  \
             heartbeat_ms: 100\nrestart:\n{restart}"
        ),
    )
    .unwrap();
}

const FAST: &str = "  backoff_initial_ms: 50\n  backoff_max_ms: 200\n  start_limit_burst: 100\n";

/// A fleet of `dir` listening on `dir/ctl.sock`.
fn up(dir: &Path) -> (Fleet, PathBuf) {
    let sock = dir.join("ctl.sock");
    let mut cmd = up_command(dir);
    cmd.arg("--control").arg(&sock);
    let fleet = Fleet::spawn(cmd);
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count("control socket on")
            == 1),
        "{}",
        fleet.log()
    );
    (fleet, sock)
}

/// `vmm-fleet ARGS --control SOCK` with a deadline.
fn ctl(sock: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .arg("--control")
        .arg(sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_limit(&mut child, Duration::from_secs(30));
    let mut out = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out.stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut out.stderr)
        .unwrap();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command that must succeed: its stdout.
fn ok(sock: &Path, args: &[&str]) -> String {
    let out = ctl(sock, args);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A command that must fail: its stderr (one line).
fn refused(sock: &Path, args: &[&str]) -> String {
    let out = ctl(sock, args);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err.trim_end().to_string()
}

fn status(sock: &Path) -> Vec<VmInfo> {
    serde_json::from_str(&ok(sock, &["status", "--json"])).expect("status --json")
}

fn vm(sock: &Path, name: &str) -> VmInfo {
    let one: Vec<VmInfo> =
        serde_json::from_str(&ok(sock, &["status", "--json", name])).expect("status --json NAME");
    assert_eq!(one.len(), 1);
    one.into_iter().next().unwrap()
}

fn wait_state(sock: &Path, name: &str, state: &str, fleet: &Fleet) -> VmInfo {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(30), || {
        let v = vm(sock, name);
        let hit = v.state == state;
        last = Some(v);
        hit
    });
    assert!(ok, "{name} never {state}: {last:?}\n{}", fleet.log());
    last.unwrap()
}

/// Whether `pid` is gone (or a zombie waiting for PID 1).
fn gone(pid: u32) -> bool {
    !alive(pid) || stat_fields(pid).get(2).is_none_or(|s| s == "Z")
}

/// Heartbeat lines in `name`'s console file.
fn heartbeats(dir: &Path, name: &str) -> usize {
    read(&dir.join("logs").join(format!("{name}.console")))
        .matches("heartbeat")
        .count()
}

/// Send one raw line, read one answer line.
fn raw(sock: &Path, line: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A server that answers before reading (too many connections) may have closed.
    let _ = s.write_all(line);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
fn every_vm_command_through_the_cli_on_a_four_vm_fleet() {
    if !kvm_available("control::every_vm_command") {
        return;
    }
    let dir = scratch("control-cli");
    for n in ["a", "b", "c"] {
        vm_file(&dir, n, "idle", FAST);
    }
    vm_file(
        &dir,
        "e",
        "crash",
        "  backoff_initial_ms: 50\n  backoff_max_ms: 50\n  start_limit_burst: 2\n",
    );
    let (fleet, sock) = up(&dir);
    for n in ["a", "b", "c"] {
        wait_state(&sock, n, "running", &fleet);
    }
    let e = wait_state(&sock, "e", "failed", &fleet);
    assert_eq!((e.pid, e.last_exit_status), (None, Some(4)));

    // status: a table with every column, one row per VM.
    let table = ok(&sock, &["status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    for col in [
        "NAME",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "VCPUS",
        "MEMORY",
        "CONSOLE",
    ] {
        assert!(lines[0].contains(col), "{col}: {table}");
    }
    let a0 = vm(&sock, "a");
    assert!(
        lines[1].starts_with("a ") && lines[1].contains("running"),
        "{table}"
    );
    assert!(lines[1].contains(&a0.pid.unwrap().to_string()), "{table}");
    assert!(
        lines[1].contains("16 MiB") && lines[1].ends_with("a.console"),
        "{table}"
    );
    assert!(
        lines[4].starts_with("e ") && lines[4].contains("failed"),
        "{table}"
    );
    let all = status(&sock);
    assert_eq!(
        all.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "e"]
    );
    assert!(a0.uptime_s.is_some_and(|u| u >= 0.0));
    assert_eq!((a0.vcpus, a0.memory_mib), (1, 16));
    assert_eq!(a0.console_file, dir.join("logs/a.console"));

    // stop: stopped by its user, its child gone.
    let a_pid = a0.pid.unwrap();
    assert_eq!(ok(&sock, &["stop", "a"]).trim(), "vm a: stopping");
    let a = wait_state(&sock, "a", "stopped-by-user", &fleet);
    assert_eq!(a.pid, None);
    assert!(wait_until(Duration::from_secs(10), || gone(a_pid)));
    assert_eq!(
        refused(&sock, &["stop", "a"]),
        "vmm-fleet: vm a is already stopped (stopped-by-user)"
    );
    // It stays down through a SIGHUP and another VM's crash.
    let b_pid = vm(&sock, "b").pid.unwrap();
    fleet.signal(Signal::SIGHUP);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(b_pid as i32), Signal::SIGKILL).unwrap();
    assert!(fleet.wait_for(Duration::from_secs(20), |f| f.count("reload: 0 added") == 1));
    let mut b = vm(&sock, "b");
    assert!(
        wait_until(Duration::from_secs(30), || {
            b = vm(&sock, "b");
            b.state == "running" && b.pid.is_some_and(|p| p != b_pid)
        }),
        "{b:?}\n{}",
        fleet.log()
    );
    assert_eq!(b.restarts, 1);
    assert_eq!(vm(&sock, "a").state, "stopped-by-user");
    assert_eq!(fleet.count("vm a: starting (pid"), 1, "{}", fleet.log());
    // start brings it back.
    ok(&sock, &["start", "a"]);
    let a = wait_state(&sock, "a", "running", &fleet);
    assert_ne!(a.pid, Some(a_pid));
    assert_eq!(
        refused(&sock, &["start", "a"]),
        "vmm-fleet: vm a is already running"
    );

    // restart: a new child.
    let c_pid = vm(&sock, "c").pid.unwrap();
    ok(&sock, &["restart", "c"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let c = vm(&sock, "c");
            c.state == "running" && c.pid.is_some_and(|p| p != c_pid)
        }),
        "{}",
        fleet.log()
    );
    assert!(wait_until(Duration::from_secs(10), || gone(c_pid)));
    assert_eq!(
        vm(&sock, "c").restarts,
        0,
        "a user's restart is not the policy's"
    );

    // kill: at once, no grace; then down until start.
    let c_pid = vm(&sock, "c").pid.unwrap();
    let t = Instant::now();
    ok(&sock, &["kill", "c"]);
    let c = wait_state(&sock, "c", "stopped-by-user", &fleet);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(c.last_exit_status, Some(128 + 9));
    assert!(gone(c_pid));
    assert_eq!(
        refused(&sock, &["kill", "c"]),
        "vmm-fleet: vm c is not running (stopped-by-user)"
    );
    ok(&sock, &["start", "c"]);
    wait_state(&sock, "c", "running", &fleet);

    // pause: the heartbeat stops (same pid), resume: it goes on.
    let b_pid = vm(&sock, "b").pid.unwrap();
    assert_eq!(ok(&sock, &["pause", "b"]).trim(), "vm b: paused");
    // What was on its way is written; then nothing for 10 heartbeat periods.
    let mut before = heartbeats(&dir, "b");
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle
        && wait_until(Duration::from_millis(300), || {
            heartbeats(&dir, "b") != before
        })
    {
        before = heartbeats(&dir, "b");
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(heartbeats(&dir, "b"), before, "heartbeats while paused");
    let paused = vm(&sock, "b");
    assert_eq!((paused.state.as_str(), paused.pid), ("paused", Some(b_pid)));
    assert_eq!(
        refused(&sock, &["pause", "b"]),
        "vmm-fleet: vm b is already paused"
    );
    assert_eq!(ok(&sock, &["resume", "b"]).trim(), "vm b: running");
    assert!(
        wait_until(Duration::from_secs(10), || heartbeats(&dir, "b")
            > before + 2),
        "no heartbeat after resume\n{}",
        fleet.log()
    );
    assert_eq!(vm(&sock, "b").pid, Some(b_pid));
    assert_eq!(
        refused(&sock, &["resume", "b"]),
        "vmm-fleet: vm b is not paused (running)"
    );

    // reset-failed: the failed VM starts again (and, crashing, fails again).
    let starts = fleet.count("vm e: starting (pid");
    assert_eq!(
        refused(&sock, &["start", "e"]),
        "vmm-fleet: vm e has failed (start limit); `reset-failed e` starts it again"
    );
    ok(&sock, &["reset-failed", "e"]);
    assert!(fleet.wait_for(Duration::from_secs(20), |f| {
        f.count("vm e: starting (pid") > starts
    }));
    assert_eq!(
        fleet.count("vm e: start limit reset; starting (asked by a user)"),
        1
    );
    wait_state(&sock, "e", "failed", &fleet);
    assert_eq!(
        refused(&sock, &["reset-failed", "a"]),
        "vmm-fleet: vm a has not failed (running)"
    );

    // Errors: unknown VM, missing socket, another protocol version.
    assert_eq!(refused(&sock, &["stop", "zz"]), "vmm-fleet: unknown VM: zz");
    assert_eq!(
        refused(&sock, &["status", "zz"]),
        "vmm-fleet: unknown VM: zz"
    );
    let missing = dir.join("nothing.sock");
    let err = refused(&missing, &["status"]);
    assert!(
        err.starts_with(&format!(
            "vmm-fleet: no vmm-fleet control socket at {}",
            missing.display()
        )),
        "{err}"
    );
    let answer = raw(&sock, b"{\"version\":99,\"command\":\"status\"}\n");
    assert_eq!(
        answer,
        "{\"version\":1,\"ok\":false,\"error\":\"protocol version 99 is not supported: this \
         vmm-fleet speaks version 1 (update the daemon to match)\"}\n"
    );
    let answer = raw(
        &sock,
        b"{\"version\":1,\"command\":\"status\",\"vm\":\"a\"}\n",
    );
    assert!(
        answer.starts_with("{\"version\":1,\"ok\":true,\"vms\":[{\"name\":\"a\""),
        "{answer}"
    );

    // Every accepted request is logged with the peer's uid and the command.
    assert!(fleet.count("control: uid 0 (pid ") > 20, "{}", fleet.log());
    assert_eq!(fleet.count("): stop a"), 2);
}

#[test]
fn reload_answers_with_what_changed_or_why_not() {
    if !kvm_available("control::reload") {
        return;
    }
    let dir = scratch("control-reload");
    vm_file(&dir, "a", "idle", FAST);
    vm_file(&dir, "b", "idle", FAST);
    let (fleet, sock) = up(&dir);
    wait_state(&sock, "a", "running", &fleet);
    assert_eq!(ok(&sock, &["reload"]).trim(), "reload: nothing changed");
    vm_file(&dir, "n", "idle", FAST);
    std::fs::remove_file(dir.join("b.yaml")).unwrap();
    vm_file(&dir, "a", "idle", "  backoff_initial_ms: 60\n");
    assert_eq!(
        ok(&sock, &["reload"]).trim(),
        "reload: added n; removed b; changed a"
    );
    std::fs::write(dir.join("bad.yaml"), "name: bad\nvcpus: 999\n").unwrap();
    let err = refused(&sock, &["reload"]);
    assert!(
        err.starts_with("vmm-fleet: reload refused, nothing changed: "),
        "{err}"
    );
    assert!(err.contains("bad.yaml"), "{err}");
    wait_state(&sock, "n", "running", &fleet);
    // The fleet's exit takes its socket away.
    let mut fleet = fleet;
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", fleet.log());
    assert!(!sock.exists());
}

#[test]
fn an_outsider_is_refused_and_logged_with_its_uid() {
    if !kvm_available("control::outsider") {
        return;
    }
    let dir = scratch("control-perm");
    vm_file(&dir, "a", "idle", FAST);
    let (fleet, sock) = up(&dir);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    let as_nobody = || {
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(bin_for_others())
            .args(["status", "--control"])
            .arg(&sock)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out.stdout));
        text(&out.stderr)
    };
    // The socket's mode keeps it out at connect().
    let err = as_nobody();
    assert_eq!(
        err.trim(),
        format!(
            "vmm-fleet: permission denied on {} (root, the service's user or its group only)",
            sock.display()
        )
    );
    // With the mode opened up by mistake, the peer check still refuses it, and says who.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = as_nobody();
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f
            .count("control: permission denied to uid 65534 (pid ")
            == 1),
        "{}",
        fleet.log()
    );
    assert_eq!(
        fleet.count("control: uid 65534"),
        0,
        "no request of it was served"
    );
    // root still is.
    assert_eq!(vm(&sock, "a").name, "a");
}

#[test]
fn a_second_fleet_on_the_same_socket_is_refused_a_stale_one_replaced() {
    if !kvm_available("control::second_fleet") {
        return;
    }
    let dir = scratch("control-twice");
    vm_file(&dir, "a", "idle", FAST);
    // A socket file left by a fleet that died: replaced.
    let sock = dir.join("ctl.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let (fleet, sock) = up(&dir);
    wait_state(&sock, "a", "running", &fleet);
    // A second fleet while the first answers: refused, nothing started.
    let other = scratch("control-twice-2");
    vm_file(&other, "x", "idle", FAST);
    let out = Command::new(bin())
        .arg("up")
        .arg(&other)
        .arg("--log-dir")
        .arg(other.join("logs"))
        .args(["--metrics-address", "127.0.0.1:0", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "control socket {}: another vmm-fleet answers there",
            sock.display()
        )) && err.contains("nothing started"),
        "{err}"
    );
    assert!(!read(&other.join("logs/x.console")).contains("heartbeat"));
    assert_eq!(vm(&sock, "a").state, "running");
}

#[test]
fn graceful_stop_powers_a_guest_off_and_hard_stops_one_that_ignores_it() {
    if !kvm_available("control::graceful_stop") {
        return;
    }
    let dir = scratch("control-graceful");
    std::fs::write(dir.join("fleet.yaml"), "stop_grace_s: 2\n").unwrap();
    vm_file(&dir, "g", "idle", FAST);
    vm_file(&dir, "s", "spin", FAST);
    let (fleet, sock) = up(&dir);
    wait_state(&sock, "g", "running", &fleet);
    wait_state(&sock, "s", "running", &fleet);
    // The built-in guest powers itself off on Ctrl-Alt-Del: exit 0.
    ok(&sock, &["stop", "g"]);
    let g = wait_state(&sock, "g", "stopped-by-user", &fleet);
    assert_eq!(
        g.last_exit_status,
        Some(0),
        "not a guest power-off\n{}",
        fleet.log()
    );
    assert_eq!(
        fleet.count("vm g: exited: guest powered off (exit code 0)"),
        1
    );
    assert_eq!(fleet.count("vm g: guest did not shut down"), 0);
    // A spinning guest ignores it: SIGTERM after the 2 s grace, the vCPU shutdown.
    let t = Instant::now();
    ok(&sock, &["stop", "s"]);
    let s = wait_state(&sock, "s", "stopped-by-user", &fleet);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2 + 3 + 3),
        "{took:?}\n{}",
        fleet.log()
    );
    assert_eq!(
        fleet.count("vm s: guest did not shut down within the grace period (2.0 s): SIGTERM"),
        1,
        "{}",
        fleet.log()
    );
    assert_eq!(s.last_exit_status, Some(6), "stopped by its vCPU shutdown");
    assert_eq!(vm(&sock, "s").restarts, 0);
}

#[test]
fn a_flood_of_connections_never_stalls_the_fleet() {
    if !kvm_available("control::flood") {
        return;
    }
    let dir = scratch("control-flood");
    vm_file(&dir, "a", "idle", FAST);
    let (fleet, sock) = up(&dir);
    let a = wait_state(&sock, "a", "running", &fleet);
    // 200 connections that say nothing, and one that sends a 1 MiB line.
    let idle: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    assert!(idle.len() >= 64, "{} connections", idle.len());
    let mut giant = UnixStream::connect(&sock).unwrap();
    giant
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = giant.write_all(&vec![b'x'; 1 << 20]);
    // Over the limit, a client is told so at once rather than left hanging.
    let t = Instant::now();
    let busy = raw(&sock, b"{\"version\":1,\"command\":\"status\"}\n");
    assert_eq!(
        busy,
        "{\"version\":1,\"ok\":false,\"error\":\"too many control connections (at most 64); \
         try again\"}\n"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Meanwhile the fleet supervises: a killed VM is restarted at once.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid.unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.count("vm a: starting (pid")
            == 2),
        "{}",
        fleet.log()
    );
    drop(idle);
    drop(giant);
    // Once they are gone (or timed out), status answers again.
    assert!(wait_until(Duration::from_secs(15), || {
        ctl(&sock, &["status"]).status.success()
    }));
    assert!(fleet.count("request line longer than 64 KiB") <= 1);
}

#[test]
fn a_giant_request_line_is_refused_with_a_reason() {
    if !kvm_available("control::giant_line") {
        return;
    }
    let dir = scratch("control-giant");
    vm_file(&dir, "a", "idle", FAST);
    let (fleet, sock) = up(&dir);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server stops reading past 64 KiB: our write may fail once it closes.
    let _ = s.write_all(&vec![b' '; 200 * 1024]);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert_eq!(
        answer,
        "{\"version\":1,\"ok\":false,\"error\":\"request line longer than 64 KiB\"}\n"
    );
    assert_eq!(vm(&sock, "a").name, "a");
    drop(fleet);
}
