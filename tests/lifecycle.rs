//! A VM's lifecycle across crashes and edits of its file, under real KVM: what the
//! per-VM state machine keeps (restart count, last exit) is what `/metrics` shows.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::fleet::Fleet;
use common::*;

/// Value of the series whose line starts with `series` (name plus labels, as printed).
fn value(addr: SocketAddr, series: &str) -> Option<f64> {
    let (status, text) = http_get(addr, "/metrics").ok()?;
    if status != 200 {
        return None;
    }
    metric_value(&text, series)
}

fn vm_file(dir: &Path, memory_mib: u64) {
    std::fs::write(
        dir.join("r.yaml"),
        format!(
            "name: r\nvcpus: 1\nmemory_mib: {memory_mib}\nkernel: builtin\nbuiltin:\n  then: idle\n  heartbeat_ms: 100\nrestart:\n  backoff_initial_ms: 0\n  start_limit_burst: 100\n"
        ),
    )
    .unwrap();
}

const LIMIT: Duration = Duration::from_secs(30);
const RESTARTS: &str = "vmm_fleet_vm_restarts_total{vm=\"r\"}";
const LAST_EXIT: &str = "vmm_fleet_vm_last_exit_code{vm=\"r\"}";

/// SIGKILL the VM's current child and wait for its next child to run.
fn kill_and_wait(fleet: &Fleet, starts_after: usize) {
    let pid = fleet.pid_of("r");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(
        fleet.wait_for(LIMIT, |f| f.starts("r").len() == starts_after
            && f.count("vm r: running") == starts_after),
        "{}",
        fleet.log()
    );
}

#[test]
fn restarts_total_is_kept_across_an_edit_and_reload() {
    if !kvm_available("lifecycle::restarts_across_edit") {
        return;
    }
    let dir = scratch("lifecycle-edit");
    vm_file(&dir, 32);
    let fleet = Fleet::up(&dir);
    let addr = fleet.addr();
    assert!(
        fleet.wait_for(LIMIT, |f| f.count("vm r: running") == 1),
        "{}",
        fleet.log()
    );
    kill_and_wait(&fleet, 2);
    kill_and_wait(&fleet, 3);
    assert!(
        wait_until(LIMIT, || value(addr, RESTARTS) == Some(2.0)),
        "{:?}",
        value(addr, RESTARTS)
    );
    assert_eq!(value(addr, LAST_EXIT), Some(128.0 + 9.0));

    // Edit its file and reload: the VM is stopped and started with the new spec; the
    // counter was reset to 0 here before the state machine.
    vm_file(&dir, 48);
    fleet.signal(Signal::SIGHUP);
    assert!(
        fleet.wait_for(LIMIT, |f| f
            .count("vm r: configuration changed; starting again")
            == 1
            && f.count("vm r: running") == 4),
        "{}",
        fleet.log()
    );
    // The edit's stop is graceful: Ctrl-Alt-Del, and the built-in guest powers off.
    assert!(
        wait_until(LIMIT, || value(addr, LAST_EXIT) == Some(0.0)),
        "the edit's stop (a guest power-off) is the last exit: {:?}",
        value(addr, LAST_EXIT)
    );
    assert_eq!(value(addr, RESTARTS), Some(2.0), "{}", fleet.log());

    // One more crash: 3.
    kill_and_wait(&fleet, 5);
    assert!(
        wait_until(LIMIT, || value(addr, RESTARTS) == Some(3.0)),
        "{:?}\n{}",
        value(addr, RESTARTS),
        fleet.log()
    );
    fleet.signal(Signal::SIGTERM);
    assert!(
        fleet.wait_for(LIMIT, |f| f.count("every VM stopped; exiting") == 1),
        "{}",
        fleet.log()
    );
}
