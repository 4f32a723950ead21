//! The /metrics endpoint of a running fleet: exact exit counts, `promtool check metrics`,
//! a real Prometheus server scraping it, monotonic counters across a crash, and
//! concurrent plus malformed requests.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::fleet::Fleet;
use common::*;

/// A minimal HTTP/1.0 GET; (status, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get(addr, path)
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    body
}

/// Value of the series whose line starts with `series` (name plus labels, as printed).
fn value(text: &str, series: &str) -> Option<f64> {
    metric_value(text, series)
}

fn vm_file(dir: &Path, name: &str, vcpus: u8, builtin: &str, restart: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: {vcpus}\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n{builtin}restart:\n{restart}"
        ),
    )
    .unwrap();
}

const IDLE: &str = "  then: idle\n  heartbeat_ms: 100\n";
const FAST: &str = "  backoff_initial_ms: 0\n  start_limit_burst: 100\n";

fn promtool() -> &'static str {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is missing: the README's test command installs Debian's prometheus package"
    );
    "promtool"
}

#[test]
fn exact_io_out_count_and_promtool_check_metrics() {
    if !kvm_available("metrics::exact_io_out") {
        return;
    }
    let dir = scratch("metrics-exact");
    vm_file(
        &dir,
        "writer",
        1,
        "  then: poweroff\n  io_exits: 1234\n",
        "  policy: never\n",
    );
    vm_file(&dir, "idler", 2, IDLE, FAST);
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    assert!(wait_until(Duration::from_secs(20), || fleet
        .log()
        .contains("vm writer: stopped")));
    // The idler (2 vCPUs) may signal "userspace up" after the writer has stopped: wait
    // for its boot time to be published too, with a deadline.
    let boot_series = "vmm_fleet_vm_boot_seconds{stage=\"userspace_up\",vm=\"idler\"}";
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            text = scrape(addr);
            value(&text, boot_series).is_some()
        }),
        "the idler's boot time never appeared: {text}"
    );
    // Every port write of the guest is an io_out exit: its console bytes, the 1234
    // writes it was told to make, the 0x41 "up" signal and the power-off write.
    let console = std::fs::read(dir.join("logs/writer.console")).unwrap();
    let want = console.len() as f64 + 1234.0 + 2.0;
    assert_eq!(
        value(
            &text,
            "vmm_fleet_vcpu_exits_total{reason=\"io_out\",vcpu=\"0\",vm=\"writer\"}"
        ),
        Some(want),
        "{text}"
    );
    assert_eq!(value(&text, "vmm_fleet_vm_up{vm=\"writer\"}"), Some(0.0));
    assert_eq!(
        value(&text, "vmm_fleet_vm_last_exit_code{vm=\"writer\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "vmm_fleet_vm_state{state=\"stopped\",vm=\"writer\"}"),
        Some(1.0)
    );
    assert!(
        value(
            &text,
            "vmm_fleet_kvm_vcpu_exits_total{vcpu=\"1\",vm=\"idler\"}"
        )
        .is_some()
    );
    assert!(text.contains("process_resident_memory_bytes"));
    let boot = value(&text, boot_series).expect("boot seconds");
    assert!(boot > 0.0 && boot < 10.0);

    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn counters_never_go_down_across_a_crash_and_restart() {
    if !kvm_available("metrics::monotonic") {
        return;
    }
    let dir = scratch("metrics-mono");
    vm_file(&dir, "m", 2, IDLE, FAST);
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    assert!(wait_until(Duration::from_secs(20), || fleet
        .log()
        .contains("vm m: running")));
    // KVM's statistics are published every second: wait until they are, with a deadline.
    let k = "vmm_fleet_kvm_vcpu_exits_total{vcpu=\"0\",vm=\"m\"}";
    let mut before = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            before = scrape(addr);
            value(&before, k).is_some_and(|v| v > 0.0)
        }),
        "KVM statistics never published: {before}"
    );
    let pid = fleet.pid_of("m");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(10), || fleet
        .starts("m")
        .len()
        == 2));
    // The new child's heartbeat counts on top of the old counts: wait for that.
    let mut after = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            after = scrape(addr);
            value(&after, k) > value(&before, k)
        }),
        "exits never grew past {:?} after the restart: {after}",
        value(&before, k)
    );
    let counters = |t: &str| -> Vec<(String, f64)> {
        t.lines()
            .filter(|l| l.starts_with("vmm_fleet_") && l.contains("_total{"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let after_c = counters(&after);
    let mut compared = 0;
    for (k, v) in counters(&before) {
        let a = after_c
            .iter()
            .find(|(ka, _)| *ka == k)
            .map(|(_, va)| *va)
            .unwrap_or_else(|| panic!("{k} vanished after the restart"));
        assert!(a >= v, "{k} went down: {v} -> {a}");
        compared += 1;
    }
    assert!(compared > 20);
    assert_eq!(
        value(&after, "vmm_fleet_vm_restarts_total{vm=\"m\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "vmm_fleet_vm_last_exit_code{vm=\"m\"}"),
        Some(128.0 + 9.0)
    );
}

#[test]
fn concurrent_scrapes_and_malformed_requests() {
    if !kvm_available("metrics::concurrent") {
        return;
    }
    let dir = scratch("metrics-load");
    for n in ["a", "b", "c"] {
        vm_file(&dir, n, 2, IDLE, FAST);
    }
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    assert!(wait_until(Duration::from_secs(20), || fleet
        .log()
        .matches(": running")
        .count()
        == 3));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let scrapers: Vec<_> = (0..20)
        .map(|_| {
            let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match get(addr, "/metrics") {
                        Ok((200, body)) if body.contains("vmm_fleet_vm_up{vm=\"c\"} 1") => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => bad.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let garbage: [&[u8]; 7] = [
        b"\x00\x01\x02\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n", // never finished
        b"GET /../../etc/passwd HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
    ];
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(10) {
        for g in garbage {
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.write_all(g);
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for s in scrapers {
        s.join().unwrap();
    }
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    eprintln!("{ok} scrapes answered, {bad} not, {sent} malformed requests");
    assert_eq!(bad, 0, "every well-formed scrape must be answered");
    assert!(ok > 100);
    assert_eq!(get(addr, "/nope").unwrap().0, 404);
    assert!(scrape(addr).contains("vmm_fleet_vm_up"));
}

#[test]
fn a_real_prometheus_scrapes_the_fleet() {
    if !kvm_available("metrics::prometheus") {
        return;
    }
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "prometheus is missing: the README's test command installs Debian's prometheus package"
    );
    let dir = scratch("metrics-prom");
    vm_file(&dir, "p1", 1, IDLE, FAST);
    vm_file(&dir, "p2", 2, IDLE, FAST);
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vmm-fleet\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let prom_addr = listener.local_addr().unwrap();
    drop(listener);
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let query = |q: &str| -> String {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        get(prom_addr, &format!("/api/v1/query?query={enc}"))
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    // Every VM and vCPU appears.
    let series = "count by (vm, vcpu) (vmm_fleet_vcpu_exits_total)";
    assert!(
        wait_until(Duration::from_secs(60), || {
            let r = query(series);
            r.contains("\"vm\":\"p1\",\"vcpu\":\"0\"") || r.contains("\"vcpu\":\"0\",\"vm\":\"p1\"")
        }),
        "{}",
        query(series)
    );
    let r = query(series);
    for (vm, vcpu) in [("p1", "0"), ("p2", "0"), ("p2", "1")] {
        assert!(
            r.contains(&format!("\"vcpu\":\"{vcpu}\",\"vm\":\"{vm}\""))
                || r.contains(&format!("\"vm\":\"{vm}\",\"vcpu\":\"{vcpu}\"")),
            "{vm}/{vcpu} missing: {r}"
        );
    }
    // The restart counter goes up after a child is killed.
    let pid = fleet.pid_of("p2");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let q = "vmm_fleet_vm_restarts_total{vm=\"p2\"}";
    assert!(
        wait_until(Duration::from_secs(30), || query(q).contains("\"1\"]")),
        "{}",
        query(q)
    );
}
