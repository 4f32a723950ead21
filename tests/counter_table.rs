//! The counter table as an attack surface, on a real fleet (`vmm-fleet up`, built-in
//! guests, real KVM): from outside the VM child, through /proc/<child>, resize its
//! table (refused: the memfd is sealed) and write garbage over it (the supervisor lives
//! on, /metrics answers, no `_total` series goes down, no VM exports more vCPU rows than
//! it has); then the VM's next start replaces the table, logged once, and the counters
//! keep growing. A table the supervisor cannot make at all is logged, and its VM runs
//! without one.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::fleet::Fleet;
use common::*;

const LIMIT: Duration = Duration::from_secs(30);
const REPLACED: &str = "vm victim: counter table corrupted";

/// GET /metrics; the body of a 200 answer, or why not.
fn try_scrape(addr: SocketAddr) -> Result<String, String> {
    match http_get(addr, "/metrics").map_err(|e| e.to_string())? {
        (200, body) => Ok(body),
        (status, _) => Err(format!("answer: {status}")),
    }
}

fn scrape(addr: SocketAddr) -> String {
    try_scrape(addr).expect("scrape /metrics")
}

/// Every `vmm_fleet_*_total` series: name{labels} -> value.
fn totals(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("vmm_fleet_") && l.contains("_total{"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The vCPU label values `vm`'s series carry.
fn vcpu_rows(text: &str, vm: &str) -> Vec<u32> {
    let tag = format!("vm=\"{vm}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&tag))
        .filter_map(|l| l.split("vcpu=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect()
}

fn io_out(vm: &str, vcpu: u32) -> String {
    format!("vmm_fleet_vcpu_exits_total{{reason=\"io_out\",vcpu=\"{vcpu}\",vm=\"{vm}\"}}")
}

/// Wait until `vm`'s vCPU 0 has counted more port writes than `floor` (the heartbeat).
fn wait_io_out_above(fleet: &Fleet, addr: SocketAddr, vm: &str, floor: f64) -> f64 {
    let mut seen = 0.0;
    assert!(
        wait_until(LIMIT, || {
            seen = totals(&scrape(addr))
                .get(&io_out(vm, 0))
                .copied()
                .unwrap_or(0.0);
            seen > floor
        }),
        "{vm}: io_out stayed at {seen} (not above {floor})\n{}",
        fleet.log()
    );
    seen
}

/// The VM child's counter table, opened read-write from this process: through an fd the
/// child holds, else through its mapping (`/proc/PID/map_files`; the child maps the
/// table and closes its fd). Either link reads `/memfd:vmm-fleet:NAME (deleted)`.
fn open_child_table(pid: u32, vm: &str) -> File {
    let want = format!("/memfd:vmm-fleet:{vm} (deleted)");
    let mut seen = Vec::new();
    for sub in ["fd", "map_files"] {
        let dir = format!("/proc/{pid}/{sub}");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        for e in entries.filter_map(Result::ok) {
            let link = std::fs::read_link(e.path());
            if link.as_ref().is_ok_and(|l| l == Path::new(&want)) {
                return OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(e.path())
                    .unwrap_or_else(|err| panic!("open {}: {err}", e.path().display()));
            }
            seen.push((e.path(), link));
        }
    }
    panic!("nothing of {pid} links to {want}: {seen:?}")
}

/// Random bytes (xorshift) over the whole file: the magic destroyed, the vCPU count
/// header set to 255, and vCPU 0's exit counters set to 0 (lowered).
fn garble(f: &File) {
    let len = f.metadata().expect("stat table").len() as usize;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len);
    bytes[..8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
    bytes[8..16].copy_from_slice(&255u64.to_le_bytes());
    // Header of 8 words, then vCPU 0's row of exit reasons.
    bytes[64..64 + 11 * 8].fill(0);
    f.write_all_at(&bytes, 0).expect("write garbage");
}

fn assert_not_lower(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, when: &str) {
    for (k, v) in before {
        let a = after
            .get(k)
            .unwrap_or_else(|| panic!("{when}: {k} vanished"));
        assert!(a >= v, "{when}: {k} went down: {v} -> {a}");
    }
}

fn vm_file(dir: &Path, name: &str, vcpus: u8) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: {vcpus}\nmemory_mib: 32\nkernel: builtin\n\
             builtin:\n  then: idle\n  heartbeat_ms: 100\n\
             restart:\n  backoff_initial_ms: 0\n  start_limit_burst: 100\n"
        ),
    )
    .expect("write VM file");
}

#[test]
fn a_child_cannot_resize_its_table_and_garbage_in_it_is_contained() {
    if !kvm_available("counter_table::resize_and_garbage") {
        return;
    }
    let dir = scratch("counter-table");
    vm_file(&dir, "victim", 2);
    vm_file(&dir, "bystander", 1);
    let mut fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    assert!(
        fleet.wait_for(LIMIT, |f| f.log().contains("vm victim: running")
            && f.log().contains("vm bystander: running")),
        "{}",
        fleet.log()
    );
    wait_io_out_above(&fleet, addr, "victim", 0.0);
    wait_io_out_above(&fleet, addr, "bystander", 0.0);

    // 1. Resizing from outside: refused both ways, the size unchanged.
    let pid = fleet.pid_of("victim");
    let table = open_child_table(pid, "victim");
    let size = table.metadata().expect("stat").len();
    for len in [0, size + 4096] {
        let err = table
            .set_len(len)
            .expect_err("resizing a sealed table must fail");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EPERM),
            "set_len({len}): {err}"
        );
    }
    assert_eq!(table.metadata().expect("stat").len(), size);

    // 2. Garbage over the whole table while its child runs.
    let before = totals(&scrape(addr));
    assert!(before.len() > 20, "too few series: {before:?}");
    garble(&table);
    for _ in 0..5 {
        let text = scrape(addr);
        assert!(
            fleet.child.try_wait().expect("try_wait").is_none(),
            "the supervisor died:\n{}",
            fleet.log()
        );
        assert_not_lower(&before, &totals(&text), "after the garbage");
        for (vm, vcpus) in [("victim", 2), ("bystander", 1)] {
            let mut rows = vcpu_rows(&text, vm);
            assert!(!rows.is_empty(), "{vm} lost its rows:\n{text}");
            rows.sort_unstable();
            rows.dedup();
            assert!(
                rows.iter().all(|v| *v < vcpus),
                "{vm} has {vcpus} vCPUs and exports {} rows, up to {:?}",
                rows.len(),
                rows.last()
            );
        }
    }
    let garbled = totals(&scrape(addr));
    // The untouched VM keeps counting meanwhile.
    wait_io_out_above(&fleet, addr, "bystander", garbled[&io_out("bystander", 0)]);

    // 3. The VM's next start replaces the table, logged once; counting goes on upward.
    assert_eq!(fleet.count(REPLACED), 0, "{}", fleet.log());
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL the child");
    assert!(
        fleet.wait_for(LIMIT, |f| f.starts("victim").len() == 2),
        "{}",
        fleet.log()
    );
    assert_eq!(fleet.count(REPLACED), 1, "{}", fleet.log());
    let held = totals(&scrape(addr));
    assert_not_lower(&garbled, &held, "after the restart");
    wait_io_out_above(&fleet, addr, "victim", held[&io_out("victim", 0)]);
    let new_pid = fleet.pid_of("victim");
    let fresh = open_child_table(new_pid, "victim");
    assert_eq!(fresh.metadata().expect("stat").len(), size);
    assert!(fresh.set_len(0).is_err());

    // The fresh table is clean: another restart replaces nothing.
    kill(Pid::from_raw(new_pid as i32), Signal::SIGKILL).expect("SIGKILL the child");
    assert!(
        fleet.wait_for(LIMIT, |f| f.starts("victim").len() == 3),
        "{}",
        fleet.log()
    );
    let after = totals(&scrape(addr));
    assert_not_lower(&held, &after, "after the second restart");
    wait_io_out_above(&fleet, addr, "victim", after[&io_out("victim", 0)]);
    assert_eq!(fleet.count(REPLACED), 1, "{}", fleet.log());
    assert!(fleet.child.try_wait().expect("try_wait").is_none());
}

#[test]
fn a_table_that_cannot_be_made_is_logged_and_its_vm_runs_without_one() {
    if !kvm_available("counter_table::creation_fails") {
        return;
    }
    let dir = scratch("counter-table-none");
    vm_file(&dir, "bare", 1);
    // memfd_create fails with EPERM in the supervisor (and in what it runs): a seccomp
    // filter installed between fork and exec, built before the fork.
    let deny: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        [(libc::SYS_memfd_create, vec![])].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().expect("a seccomp arch"),
    )
    .and_then(TryInto::try_into)
    .expect("filter");
    let mut cmd = common::fleet::up_command(&dir);
    // SAFETY: between fork and exec only prctl(2) and seccomp(2) run, on a program made
    // before the fork; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            seccompiler::apply_filter(&deny)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
        });
    }
    let fleet = Fleet::from_child(cmd.spawn().expect("spawn up"));
    let addr = fleet.addr();
    let failed = "vm bare: cannot create its counter table (memfd_create: ";
    assert!(
        fleet.wait_for(LIMIT, |f| f.count(failed) >= 1
            && f.count("vm bare: running") >= 1),
        "{}",
        fleet.log()
    );
    assert!(
        fleet.log().contains("; it runs without exit counters"),
        "{}",
        fleet.log()
    );
    // It runs: its guest beats, /metrics reports it up, with no per-vCPU series.
    let console = dir.join("logs/bare.console");
    assert!(
        wait_until(LIMIT, || read(&console).contains("heartbeat 2")),
        "{}\n{}",
        read(&console),
        fleet.log()
    );
    let text = scrape(addr);
    assert!(text.contains("vmm_fleet_vm_up{vm=\"bare\"} 1"), "{text}");
    assert_eq!(vcpu_rows(&text, "bare"), Vec::<u32>::new(), "{text}");
    // Each start tries again and says so again; a failure never stops a restart.
    let pid = fleet.pid_of("bare");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL the child");
    assert!(
        fleet.wait_for(LIMIT, |f| f.starts("bare").len() == 2
            && f.count(failed) >= 2),
        "{}",
        fleet.log()
    );
    assert!(
        fleet.wait_for(LIMIT, |f| f.count("vm bare: running") >= 2),
        "{}",
        fleet.log()
    );
}

#[test]
fn restarts_total_counts_on_across_an_edit_of_a_running_vm() {
    if !kvm_available("counter_table::restarts_across_an_edit") {
        return;
    }
    let dir = scratch("counter-table-edit");
    vm_file(&dir, "ed", 1);
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    let restarts = |fleet: &Fleet| {
        totals(&scrape(addr))
            .get("vmm_fleet_vm_restarts_total{vm=\"ed\"}")
            .copied()
            .unwrap_or_else(|| panic!("no restarts_total for ed\n{}", fleet.log()))
    };
    let running = |fleet: &Fleet, n: usize| {
        assert!(
            fleet.wait_for(LIMIT, |f| f.starts("ed").len() == n
                && f.count("vm ed: running") >= n),
            "{}",
            fleet.log()
        );
    };
    running(&fleet, 1);
    for n in 2..=3 {
        kill(Pid::from_raw(fleet.pid_of("ed") as i32), Signal::SIGKILL).expect("SIGKILL");
        running(&fleet, n);
    }
    assert_eq!(restarts(&fleet), 2.0, "{}", fleet.log());
    // An edit of the running VM: it starts again with the new spec, which is not a
    // restart by its policy (systemd's NRestarts does not count a `systemctl restart`
    // either): the count stays 2, as issue 9 asks...
    let file = dir.join("ed.yaml");
    let text = std::fs::read_to_string(&file).expect("read VM file");
    std::fs::write(
        &file,
        text.replace("heartbeat_ms: 100", "heartbeat_ms: 200"),
    )
    .expect("edit VM file");
    fleet.signal(Signal::SIGHUP);
    running(&fleet, 4);
    assert_eq!(restarts(&fleet), 2.0, "{}", fleet.log());
    // ...and the restarts after it count on from there, each one seen at once.
    for n in 5..=6 {
        kill(Pid::from_raw(fleet.pid_of("ed") as i32), Signal::SIGKILL).expect("SIGKILL");
        running(&fleet, n);
        assert_eq!(restarts(&fleet), (n - 2) as f64, "{}", fleet.log());
    }
}
