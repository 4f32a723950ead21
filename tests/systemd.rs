//! `vmm-fleet up` as vmm-fleet.service runs it: sd_notify READY=1 and the watchdog
//! (`WATCHDOG=1` every half `WATCHDOG_USEC`), an empty VM directory (the packaged
//! default: the example VM ships disabled), and the reload guard that keeps a fleet
//! running when its directory loses every VM file.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::fleet::Fleet;
use common::*;

/// systemd's side of `NotifyAccess=`: every datagram the supervisor sends, timestamped.
struct NotifySocket {
    msgs: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = msgs.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                m.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket { msgs }
    }

    /// How many datagrams hold the line `line`.
    fn count(&self, line: &str) -> usize {
        self.msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .count()
    }

    fn all(&self) -> Vec<String> {
        self.msgs
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }
}

/// `vmm-fleet up DIR` with `env` added to its environment (and nothing of systemd's
/// inherited from the test's), logging to DIR/../NAME-logs, metrics on a free port.
fn up_with_env(dir: &Path, env: &[(&str, &str)]) -> Fleet {
    let mut cmd = Command::new(bin());
    cmd.arg("up")
        .arg(dir)
        .arg("--log-dir")
        .arg(dir.with_extension("logs"))
        .args(["--metrics-address", "127.0.0.1:0"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn up");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            l.lock().unwrap().push((Instant::now(), line));
        }
    });
    Fleet { child, lines }
}

/// GET /metrics over HTTP/1.0; (status, body).
fn scrape(fleet: &Fleet) -> (u16, String) {
    http_get(fleet.addr(), "/metrics").expect("GET /metrics")
}

/// SIGTERM, then the exit code within `limit`.
fn stop(mut fleet: Fleet, limit: Duration) -> Option<i32> {
    fleet.signal(Signal::SIGTERM);
    wait_with_limit(&mut fleet.child, limit).code()
}

#[test]
fn an_empty_vm_directory_is_a_running_fleet_of_none() {
    // No KVM needed: no VM is started.
    let dir = scratch("sd-empty");
    let vms = dir.join("vms.d");
    std::fs::create_dir(&vms).unwrap();
    let sock = dir.join("notify.sock");
    let notify = NotifySocket::bind(&sock);
    let fleet = up_with_env(&vms, &[("NOTIFY_SOCKET", sock.to_str().unwrap())]);
    assert!(
        wait_until(Duration::from_secs(20), || notify.count("READY=1") == 1),
        "no READY=1: {:?}\n{}",
        notify.all(),
        fleet.log()
    );
    let (status, body) = scrape(&fleet);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE "), "{body}");
    assert!(
        notify
            .all()
            .iter()
            .any(|m| m.contains("STATUS=0 running, 0 restarting, 0 failed")),
        "{:?}",
        notify.all()
    );
    // `validate` agrees: zero VMs, all valid.
    let out = Command::new(bin())
        .arg("validate")
        .arg(&vms)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 VM(s)"));
    assert_eq!(stop(fleet, Duration::from_secs(10)), Some(0));
}

#[test]
fn watchdog_pings_keep_arriving_at_half_the_interval() {
    let dir = scratch("sd-watchdog");
    let vms = dir.join("vms.d");
    std::fs::create_dir(&vms).unwrap();
    let sock = dir.join("notify.sock");
    let notify = NotifySocket::bind(&sock);
    let spawned = Instant::now();
    // WATCHDOG_PID unset: the pings are for whoever reads WATCHDOG_USEC.
    let fleet = up_with_env(
        &vms,
        &[
            ("NOTIFY_SOCKET", sock.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || notify.count("WATCHDOG=1") >= 3),
        "fewer than 3 WATCHDOG=1 within 30 s: {:?}\n{}",
        notify.all(),
        fleet.log()
    );
    // Armed once ready: the first ping comes after READY=1.
    let msgs = notify.all();
    let at = |line: &str| msgs.iter().position(|m| m.lines().any(|l| l == line));
    let ready = at("READY=1").expect("READY=1");
    let first = at("WATCHDOG=1").expect("WATCHDOG=1");
    assert!(ready < first, "{msgs:?}");
    // Every half interval (0.5 s), not in a spin: at most one ping per 0.5 s since spawn.
    let elapsed = spawned.elapsed().as_secs_f64();
    let pings = notify.count("WATCHDOG=1");
    assert!(
        (pings as f64) <= elapsed / 0.5 + 1.0,
        "{pings} pings in {elapsed:.2} s"
    );
    // And they go on: three more.
    assert!(
        wait_until(Duration::from_secs(30), || notify.count("WATCHDOG=1")
            >= pings + 3),
        "pings stopped at {pings}: {:?}",
        notify.all()
    );
    assert_eq!(stop(fleet, Duration::from_secs(10)), Some(0));
}

#[test]
fn watchdog_pid_naming_this_process_is_honoured() {
    // WATCHDOG_PID as systemd sets it: the supervisor's own pid. The pid is not known
    // before the spawn, so go through `sh -c 'exec ...'`, which keeps its pid.
    let dir = scratch("sd-watchdog-pid");
    let vms = dir.join("vms.d");
    std::fs::create_dir(&vms).unwrap();
    let sock = dir.join("notify.sock");
    let notify = NotifySocket::bind(&sock);
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" up "$1" --log-dir "$2" --metrics-address 127.0.0.1:0"#)
        .arg(bin())
        .arg(&vms)
        .arg(dir.join("logs"))
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ok = wait_until(Duration::from_secs(30), || notify.count("WATCHDOG=1") >= 3);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    let st = wait_with_limit(&mut child, Duration::from_secs(10));
    assert!(
        ok,
        "fewer than 3 WATCHDOG=1 within 30 s: {:?}",
        notify.all()
    );
    assert_eq!(st.code(), Some(0));
}

#[test]
fn reload_into_an_empty_directory_is_refused_and_the_vm_keeps_running() {
    if !kvm_available("systemd::reload_empty") {
        return;
    }
    let dir = scratch("sd-reload-empty");
    let vms = dir.join("vms.d");
    std::fs::create_dir(&vms).unwrap();
    let fleet = up_with_env(&vms, &[]);
    let addr = fleet.addr(); // up and serving, with no VM
    assert_eq!(fleet.count(": starting (pid "), 0, "{}", fleet.log());
    // From empty, a reload that brings a VM file starts it.
    // Console to LOG_DIR/late.console: under `up` a console file must be in the log dir.
    std::fs::write(
        vms.join("late.yaml"),
        "name: late\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: idle\n",
    )
    .unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count("vm late: running")
            == 1),
        "{}",
        fleet.log()
    );
    let pid = fleet.pid_of("late");
    // Every VM file gone (say, an unmounted volume): refused, nothing stops.
    std::fs::remove_file(vms.join("late.yaml")).unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.count("reload refused") == 1),
        "{}",
        fleet.log()
    );
    assert!(fleet.log().contains("no *.yaml files"), "{}", fleet.log());
    assert!(alive(pid), "{}", fleet.log());
    assert_eq!(fleet.pid_of("late"), pid);
    assert_eq!(fleet.count("vm late: stopping"), 0, "{}", fleet.log());
    assert!(TcpStream::connect(addr).is_ok());
    assert_eq!(stop(fleet, Duration::from_secs(15)), Some(0));
}
