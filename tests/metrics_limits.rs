//! The /metrics endpoint under attack, on a real fleet (real KVM, built-in guests): idle
//! connections, a header flood, clients that never read, fd exhaustion (EMFILE), a port
//! that is taken at start, and a `metrics_address` changed at SIGHUP.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::fleet::Fleet;
use common::*;

/// The tests that load the machine (floods, thousands of connections, a timed stop) run
/// one at a time, so that one's load does not skew another's timing.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A minimal HTTP/1.0 GET; (status, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get(addr, path)
}

/// True when a scrape of `addr` is answered with the fleet's metrics.
fn scrape_ok(addr: SocketAddr) -> bool {
    matches!(get(addr, "/metrics"), Ok((200, b)) if b.contains("vmm_fleet_vm_up{vm=\"a\"} 1"))
}

/// A field of /proc/PID/status (the number before any unit).
fn status_field(pid: u32, key: &str) -> u64 {
    status_value(pid, key)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}: in /proc/{pid}/status"))
}

/// A fleet directory with `fleet.yaml` = `settings` and one idle VM `a` with a heartbeat.
fn fleet_dir(name: &str, settings: &str) -> PathBuf {
    let dir = scratch(name);
    std::fs::write(dir.join("fleet.yaml"), settings).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "name: a\nvcpus: 2\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: idle\n  heartbeat_ms: 100\n",
    )
    .unwrap();
    dir
}

/// Wait until VM `a` runs and its guest beats.
fn wait_running(fleet: &Fleet, dir: &Path) {
    let console = dir.join("logs/a.console");
    assert!(
        wait_until(Duration::from_secs(30), || read(&console)
            .contains("heartbeat 2")
            && fleet.count("vm a: running") >= 1),
        "VM a did not come up; console:\n{}\nlog:\n{}",
        read(&console),
        fleet.log()
    );
}

/// Raise this process's RLIMIT_NOFILE soft limit to at least `want` (or the hard limit).
fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
    }
    assert!(
        r.rlim_cur >= want,
        "RLIMIT_NOFILE hard limit {} < {want}",
        r.rlim_max
    );
}

/// Another process's RLIMIT_NOFILE: set it to `new` if given; returns the old value.
fn prlimit_nofile(pid: u32, new: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let newp = new.as_ref().map_or(std::ptr::null(), |n| n as *const _);
    // SAFETY: prlimit(2) with a valid (or null) new limit and a valid old-limit struct.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, newp, &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// Server-side sockets of `port` in ESTABLISHED state with bytes waiting to be sent.
fn stuck_server_sockets(port: u16) -> usize {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 4
                && f[1].ends_with(&format!(":{port:04X}"))
                && f[3] == "01"
                && f[4]
                    .split(':')
                    .next()
                    .and_then(|tx| u64::from_str_radix(tx, 16).ok())
                    .is_some_and(|tx| tx > 0)
        })
        .count()
}

#[test]
fn two_thousand_idle_connections_neither_starve_a_scrape_nor_add_threads() {
    if !kvm_available("metrics_limits::idle_connections") {
        return;
    }
    let _serial = heavy();
    raise_nofile(4096);
    let dir = fleet_dir("limits-idle", "");
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    wait_running(&fleet, &dir);
    let pid = fleet.child.id();
    let threads_before = status_field(pid, "Threads");
    let mut idle = Vec::with_capacity(2000);
    let mut max_threads = threads_before;
    for i in 0..2000 {
        idle.push(TcpStream::connect(addr).expect("connect"));
        if i % 100 == 0 {
            max_threads = max_threads.max(status_field(pid, "Threads"));
        }
    }
    max_threads = max_threads.max(status_field(pid, "Threads"));
    let t = Instant::now();
    let (status, body) = get(addr, "/metrics").expect("scrape with 2000 idle connections");
    let latency = t.elapsed();
    max_threads = max_threads.max(status_field(pid, "Threads"));
    eprintln!(
        "FIGURE idle: 2000 idle connections: scrape answered in {:.1} ms; supervisor threads {threads_before} before, at most {max_threads} during",
        latency.as_secs_f64() * 1e3
    );
    assert_eq!(status, 200);
    assert!(body.contains("vmm_fleet_vm_up{vm=\"a\"} 1"), "{body}");
    assert!(latency < Duration::from_secs(1), "scrape took {latency:?}");
    assert!(max_threads < 20, "supervisor had {max_threads} threads");
    // One thread serves every connection.
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert_eq!(
        names.iter().filter(|n| *n == "metrics").count(),
        1,
        "{names:?}"
    );
    drop(idle);
}

#[test]
fn a_ten_second_header_flood_does_not_grow_the_supervisor() {
    if !kvm_available("metrics_limits::header_flood") {
        return;
    }
    let _serial = heavy();
    let dir = fleet_dir("limits-flood", "");
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    wait_running(&fleet, &dir);
    assert!(scrape_ok(addr));
    let pid = fleet.child.id();
    let rss0 = status_field(pid, "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(rss0));
    let sampler = {
        let (stop, max_rss) = (stop.clone(), max_rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                max_rss.fetch_max(status_field(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let chunk = vec![b'a'; 64 << 10];
    let (mut sent, mut connections) = (0u64, 0u32);
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        connections += 1;
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        if s.write_all(b"GET /metrics HTTP/1.1\r\nX: ").is_err() {
            continue;
        }
        // Header bytes, never a newline, until the server gives up on this connection.
        while Instant::now() < end {
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(_) => break,
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let grown_kib = max_rss.load(Ordering::Relaxed).saturating_sub(rss0);
    eprintln!(
        "FIGURE flood: 10 s header flood, {} MiB sent over {connections} connection(s): supervisor RSS {rss0} KiB before, grew by at most {grown_kib} KiB",
        sent >> 20
    );
    assert!(sent > 8192, "the flood did not flow ({sent} bytes)");
    assert!(grown_kib < 10 << 10, "RSS grew by {grown_kib} KiB");
    assert!(
        wait_until(Duration::from_secs(5), || scrape_ok(addr)),
        "no scrape after the flood\n{}",
        fleet.log()
    );
}

#[test]
fn sixty_four_clients_that_never_read_do_not_delay_sigterm() {
    if !kvm_available("metrics_limits::non_readers") {
        return;
    }
    let _serial = heavy();
    let dir = fleet_dir("limits-noread", "stop_grace_s: 1\n");
    let mut fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    wait_running(&fleet, &dir);
    // Each client pipelines 100 scrapes (half a megabyte of responses or more) with a
    // tiny receive buffer, and never reads: the server is left writing to all of them.
    let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
    let clients: Vec<socket2::Socket> = (0..64)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&addr.into()).unwrap();
            (&s).write_all(requests.as_bytes()).unwrap();
            s
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || stuck_server_sockets(
            addr.port()
        ) >= 64),
        "only {} server sockets are stuck writing",
        stuck_server_sockets(addr.port())
    );
    // Past the point where they count as stalled, a scrape gets a slot again.
    assert!(
        wait_until(Duration::from_secs(15), || scrape_ok(addr)),
        "64 stuck clients starve the endpoint\n{}",
        fleet.log()
    );
    let t = Instant::now();
    fleet.signal(Signal::SIGTERM);
    let st = wait_with_limit(&mut fleet.child, Duration::from_secs(30));
    let exited_at = Instant::now();
    let took = exited_at - t;
    eprintln!(
        "FIGURE noread: SIGTERM with 64 non-reading clients: fleet ended in {:.2} s (stop_grace_s 1)",
        took.as_secs_f64()
    );
    let timed: String = fleet
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|(at, l)| {
            let ms = at.saturating_duration_since(t).as_millis() as i128
                - t.saturating_duration_since(*at).as_millis() as i128;
            format!("{ms:>7} ms {l}\n")
        })
        .collect();
    assert!(st.success(), "{st:?}\n{timed}");
    // Whatever the VMs take to die, the supervisor's own exit never waits for a client.
    let stopped_at = fleet
        .lines
        .lock()
        .unwrap()
        .iter()
        .find(|(_, l)| l.contains("every VM stopped; exiting"))
        .map(|(at, _)| *at)
        .expect("no 'every VM stopped' line");
    let exit_after = exited_at.saturating_duration_since(stopped_at);
    assert!(
        exit_after < Duration::from_secs(1),
        "exit came {exit_after:?} after the last VM stopped\n{timed}"
    );
    assert!(
        took <= Duration::from_secs(2),
        "the fleet took {took:?} to stop (log, ms from SIGTERM):\n{timed}"
    );
    drop(clients);
}

#[test]
fn the_listener_survives_emfile() {
    if !kvm_available("metrics_limits::emfile") {
        return;
    }
    let _serial = heavy();
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test lowers another process's RLIMIT_NOFILE: run it as root"
    );
    let dir = fleet_dir("limits-emfile", "");
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    wait_running(&fleet, &dir);
    let pid = fleet.child.id();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let old = prlimit_nofile(pid, None);
    prlimit_nofile(
        pid,
        Some(libc::rlimit {
            rlim_cur: open_fds + 2,
            rlim_max: old.rlim_max,
        }),
    );
    let conns: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let emfile = wait_until(Duration::from_secs(10), || {
        fleet.log().contains("accept failed: Too many open files")
    });
    prlimit_nofile(pid, Some(old));
    assert!(emfile, "accept never hit EMFILE\n{}", fleet.log());
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || scrape_ok(addr)),
        "the listener did not survive EMFILE\n{}",
        fleet.log()
    );
    eprintln!(
        "FIGURE emfile: scrape answered {:.0} ms after the limit was restored; {} accept-failure line(s) logged",
        t.elapsed().as_secs_f64() * 1e3,
        fleet.count("accept failed")
    );
    // Rate-limited: not one line per failed accept.
    assert!(fleet.count("accept failed") <= 2, "{}", fleet.log());
    drop(conns);
}

#[test]
fn a_taken_port_does_not_stop_the_fleet_and_is_bound_once_free() {
    if !kvm_available("metrics_limits::bind_retry") {
        return;
    }
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let dir = fleet_dir("limits-bind", "");
    let fleet = Fleet::up_with_metrics(&dir, Some(&addr.to_string()));
    wait_running(&fleet, &dir);
    assert!(
        fleet.log().contains(&format!("cannot listen on {addr}")),
        "{}",
        fleet.log()
    );
    drop(holder);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(45), || scrape_ok(addr)),
        "never bound {addr}\n{}",
        fleet.log()
    );
    eprintln!(
        "FIGURE bind: {addr} served {:.1} s after it was freed",
        t.elapsed().as_secs_f64()
    );
    assert!(
        fleet
            .log()
            .contains(&format!("metrics on http://{addr}/metrics (after")),
        "{}",
        fleet.log()
    );
}

/// Two addresses on loopback that were free a moment ago.
fn two_free_addrs() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn a_changed_metrics_address_moves_the_endpoint_at_sighup() {
    if !kvm_available("metrics_limits::address_reload") {
        return;
    }
    let (old, new) = two_free_addrs();
    let dir = fleet_dir("limits-move", &format!("metrics_address: {old}\n"));
    let fleet = Fleet::up_with_metrics(&dir, None);
    wait_running(&fleet, &dir);
    assert!(
        wait_until(Duration::from_secs(10), || scrape_ok(old)),
        "{}",
        fleet.log()
    );
    let pid = fleet.pid_of("a");
    std::fs::write(dir.join("fleet.yaml"), format!("metrics_address: {new}\n")).unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || scrape_ok(new)),
        "{new} not served after SIGHUP\n{}",
        fleet.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || refused(old)),
        "{old} still served"
    );
    assert!(
        fleet
            .log()
            .contains(&format!("metrics_address changed to {new}: moving")),
        "{}",
        fleet.log()
    );
    assert_eq!(fleet.pid_of("a"), pid, "the VM was restarted");
}

#[test]
fn a_changed_metrics_address_is_refused_when_the_command_line_sets_it() {
    if !kvm_available("metrics_limits::address_refused") {
        return;
    }
    let (old, new) = two_free_addrs();
    let dir = fleet_dir("limits-refuse", &format!("metrics_address: {old}\n"));
    let fleet = Fleet::up(&dir); // --metrics-address 127.0.0.1:0 overrides the file
    let addr = fleet.addr();
    wait_running(&fleet, &dir);
    std::fs::write(dir.join("fleet.yaml"), format!("metrics_address: {new}\n")).unwrap();
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.count("reload:") >= 1),
        "{}",
        fleet.log()
    );
    let log = fleet.log();
    assert!(
        log.contains(&format!(
            "metrics_address changed to {new} in the settings: refused"
        )) && log.contains("--metrics-address 127.0.0.1:0"),
        "{log}"
    );
    assert!(scrape_ok(addr));
    assert!(refused(new));
}

#[test]
fn an_address_not_up_yet_does_not_stop_the_fleet_and_is_bound_once_up() {
    if !kvm_available("metrics_limits::address_not_up") {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs the fleet in a network namespace of its own: run it as root"
    );
    // As at boot before the network is up: the fleet runs in a network namespace of its
    // own where the address it is told to serve on (TEST-NET-1) is not configured yet, so
    // binding fails (EADDRNOTAVAIL) until the address is added there.
    let dir = fleet_dir("limits-notup", "");
    let addr: SocketAddr = "192.0.2.1:9464".parse().unwrap();
    // (Loopback is brought up first: in a namespace whose every link is down, Linux lets
    // any address be bound.)
    let child = std::process::Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(bin())
        .arg("up")
        .arg(&dir)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .arg("--metrics-address")
        .arg(addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare --net vmm-fleet up");
    let fleet = Fleet::from_child(child);
    wait_running(&fleet, &dir);
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f
            .count(&format!("cannot listen on {addr}"))
            >= 1),
        "{}",
        fleet.log()
    );
    let pid = fleet.child.id();
    let st = std::process::Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ip",
            "addr",
            "add",
            "192.0.2.1/32",
            "dev",
            "lo",
        ])
        .status()
        .expect("nsenter ip addr add");
    assert!(st.success(), "ip addr add: {st:?}");
    assert!(
        fleet.wait_for(Duration::from_secs(45), |f| f
            .count(&format!("metrics on http://{addr}/metrics (after"))
            == 1),
        "{}",
        fleet.log()
    );
    // A scrape from inside that namespace (a thread of this test joins it).
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("open its netns");
    let served = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) of this thread into the network namespace behind an open fd.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        scrape_ok(addr)
    })
    .join()
    .expect("scrape thread");
    assert!(
        served,
        "no scrape on {addr} in the fleet's namespace\n{}",
        fleet.log()
    );
    assert_eq!(fleet.count("vm a: exited"), 0, "{}", fleet.log());
}
