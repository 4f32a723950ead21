//! A cgroup per VM under `vmm-fleet up` (real KVM, built-in guest): the memory limit is
//! enforced by the cgroup's OOM killer on that VM alone, `cpu_quota` holds a spinning
//! guest near its quota, and the cgroups exist while the VMs run and are gone after.
//!
//! Run as root. On cgroup v1 (these build machines) the supervisor uses the test's own
//! cgroups; on v2 each fleet is started in a fresh cgroup of its own below the root, as
//! systemd's `Delegate=yes` would give the service.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::fleet::{Fleet, up_command};
use common::*;

/// The tests of this file one at a time: the CPU measurement must not compete with the
/// OOM test's restart loop on a 2-core host.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tasks a VM may have beyond its vCPUs (`supervisor::cgroup::PIDS_MARGIN`).
const PIDS_MARGIN: u64 = 32;

/// (mount point, mount root, fstype, options) of every cgroup mount.
fn cgroup_mounts() -> Vec<(PathBuf, String, String, Vec<String>)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let fstype = *post.first()?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| {
                (
                    PathBuf::from(pre[4]),
                    pre[3].to_string(),
                    fstype.to_string(),
                    post.get(2)
                        .unwrap_or(&"")
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                )
            })
        })
        .collect()
}

/// Does this host carry the memory controller on cgroup v1?
fn v1() -> bool {
    cgroup_mounts()
        .iter()
        .any(|(_, _, t, o)| t == "cgroup" && o.iter().any(|o| o == "memory"))
}

/// The directory of process `pid`'s cgroup that holds `controller`.
fn cgroup_dir(pid: u32, controller: &str) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = cgroup_mounts();
    let (point, root, path) = if v1() {
        let (point, root, ..) = mounts
            .iter()
            .find(|(_, _, t, o)| t == "cgroup" && o.iter().any(|o| o == controller))?;
        let path = own.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let _ = p.next();
            let cs = p.next()?;
            cs.split(',').any(|c| c == controller).then(|| p.next())?
        })?;
        (point.clone(), root.clone(), path.to_string())
    } else {
        let (point, root, ..) = mounts.iter().find(|(_, _, t, _)| t == "cgroup2")?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        (point.clone(), root.clone(), path.to_string())
    };
    let rel = path.strip_prefix(root.as_str()).unwrap_or(&path);
    Some(point.join(rel.trim_start_matches('/')))
}

/// A cgroup made for one fleet's supervisor on v2 (what `Delegate=yes` gives the
/// service); nothing on v1. Removed on drop.
struct Delegated(Option<PathBuf>);

impl Delegated {
    fn new(tag: &str) -> Delegated {
        if v1() {
            return Delegated(None);
        }
        let mount = cgroup_mounts()
            .into_iter()
            .find(|(_, _, t, _)| t == "cgroup2")
            .expect("a cgroup v2 mount")
            .0;
        let dir = mount.join(format!("vmm-fleet-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("make a cgroup for the fleet (root?)");
        Delegated(Some(dir))
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = wait_until(Duration::from_secs(10), || {
                let _ = std::fs::remove_dir(d.join("supervisor"));
                std::fs::remove_dir(d).is_ok()
            });
        }
    }
}

/// `vmm-fleet up DIR`, in `cg` (v2) or the test's own cgroups (v1).
fn up(dir: &Path, cg: &Delegated) -> Running {
    let mut cmd = up_command(dir);
    if let Some(d) = &cg.0 {
        let procs =
            std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: between fork and exec only open, write and close (async-signal-safe)
        // on a string made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
    Running(Fleet::spawn(cmd))
}

/// A fleet that is stopped with SIGTERM when the test ends, even by a failed assertion,
/// so that it removes its cgroups.
struct Running(Fleet);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.child.try_wait().ok().flatten().is_none() {
            self.0.signal(Signal::SIGTERM);
            let _ = wait_until(Duration::from_secs(30), || {
                self.0.child.try_wait().ok().flatten().is_some()
            });
        }
    }
}

impl std::ops::Deref for Running {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Fleet {
        &mut self.0
    }
}

/// Stop the fleet with SIGTERM and wait for it to exit (not SIGKILL: it must clean up).
fn stop(fleet: &mut Fleet) {
    fleet.signal(Signal::SIGTERM);
    let start = Instant::now();
    while fleet.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fleet did not stop:\n{}",
            fleet.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn settings(dir: &Path, text: &str) {
    std::fs::write(dir.join("fleet.yaml"), text).unwrap();
}

fn vm(dir: &Path, name: &str, text: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!("name: {name}\nkernel: builtin\n{text}"),
    )
    .unwrap();
}

/// A limit file of process `pid`'s cgroup of `controller` (`v1_file` or `v2_file`).
fn limit_file(pid: u32, controller: &str, v1_file: &str, v2_file: &str) -> Option<String> {
    let dir = cgroup_dir(pid, controller)?;
    let file = if v1() { v1_file } else { v2_file };
    std::fs::read_to_string(dir.join(file))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `nr_throttled` of the `cpu.stat` of process `pid`'s cpu cgroup: periods in which the
/// quota stopped it.
fn throttled(pid: u32) -> u64 {
    cgroup_dir(pid, "cpu")
        .and_then(|d| std::fs::read_to_string(d.join("cpu.stat")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("nr_throttled "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn ticks_per_s() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

#[test]
fn an_oom_kill_by_the_memory_limit_restarts_only_that_vm() {
    if !kvm_available("cgroup::oom_kill") {
        return;
    }
    let _serial = serial();
    let dir = scratch("cgroup-oom");
    settings(&dir, "cgroup_overhead_mib: 0\n");
    // 32 MiB of guest memory and a limit of exactly that: the guest writes to every page
    // from its stacks to the end of its memory (0x104000.., 7932 pages), which with the
    // VMM's own memory goes past the limit.
    vm(
        &dir,
        "hog",
        "vcpus: 2\nmemory_mib: 32\ncmdline: \"touch=0x104000:7932\"\nbuiltin:\n  then: idle\n\
         restart:\n  policy: on-failure\n  backoff_initial_ms: 100\n  start_limit_burst: 100\n",
    );
    vm(
        &dir,
        "calm",
        "vcpus: 1\nmemory_mib: 32\nbuiltin:\n  then: idle\n",
    );
    let cg = Delegated::new("oom");
    let mut fleet = up(&dir, &cg);
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.starts("hog").len() >= 2
            && f.count("vm calm: running") >= 1),
        "hog was not restarted:\n{}",
        fleet.log()
    );
    let log = fleet.log();
    assert!(
        log.contains(
            "vm hog: out of memory: killed by its cgroup's OOM killer (memory limit 32 MiB"
        ),
        "{log}"
    );
    assert!(log.contains("vm hog: exited: killed by signal 9"), "{log}");
    let hog = fleet.starts("hog");
    assert_ne!(hog[0].1, hog[1].1, "a new process");
    // Nothing else was touched: the other VM and the supervisor keep their pids.
    assert_eq!(fleet.starts("calm").len(), 1, "{log}");
    assert_eq!(fleet.count("vm calm: exited"), 0, "{log}");
    let calm = fleet.pid_of("calm");
    assert!(alive(calm));
    assert!(alive(fleet.child.id()));
    assert_eq!(
        fleet.count("out of memory"),
        fleet.count("vm hog: out of memory")
    );
    stop(&mut fleet);
}

#[test]
fn cpu_quota_holds_a_spinning_guest_near_its_share() {
    if !kvm_available("cgroup::cpu_quota") {
        return;
    }
    let _serial = serial();
    let dir = scratch("cgroup-cpu");
    let spin = "vcpus: 1\nmemory_mib: 16\nbuiltin:\n  then: spin\n";
    vm(&dir, "limited", &format!("{spin}cpu_quota: 0.2\n"));
    vm(&dir, "free", spin);
    let cg = Delegated::new("cpu");
    let mut fleet = up(&dir, &cg);
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count(": running") >= 2),
        "{}",
        fleet.log()
    );
    let (limited, free) = (fleet.pid_of("limited"), fleet.pid_of("free"));
    // The whole fleet competes with the rest of the host as one group of default weight:
    // give it a large one (as CPUWeight= would for the service), so that what else this
    // shared host runs does not starve the unlimited VM during the measurement.
    let fleet_cpu = cgroup_dir(free, "cpu")
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .expect("the fleet's cpu cgroup");
    let (file, weight) = if v1() {
        ("cpu.shares", "262144")
    } else {
        ("cpu.weight", "10000")
    };
    std::fs::write(fleet_cpu.join(file), weight).expect("set the fleet's CPU weight");
    let ticks = |pid| cpu_ticks(pid).unwrap_or(0);
    let (l0, f0, t0) = (ticks(limited), ticks(free), Instant::now());
    let throttled0 = throttled(limited);
    // Measure over 5 s (a condition on elapsed time, not a fixed sleep before asserting).
    assert!(wait_until(Duration::from_secs(6), || t0.elapsed()
        >= Duration::from_secs(5)));
    let secs = t0.elapsed().as_secs_f64();
    let (l1, f1) = (ticks(limited), ticks(free));
    let throttled = throttled(limited) - throttled0;
    let hz = ticks_per_s();
    let limited_share = (l1 - l0) as f64 / hz / secs;
    let free_share = (f1 - f0) as f64 / hz / secs;
    eprintln!(
        "cpu over {secs:.1} s: cpu_quota 0.2: {limited_share:.3}, unlimited: {free_share:.3}"
    );
    assert!(
        (0.10..=0.35).contains(&limited_share),
        "cpu_quota 0.2 used {limited_share:.3} of a core"
    );
    // The quota is what holds it: the kernel throttled it (in about every 100 ms
    // period), and the same guest without a quota takes much more (most of a core).
    assert!(
        throttled >= 10,
        "the quota throttled it in only {throttled} periods"
    );
    assert!(
        free_share > 0.45 && free_share > 2.0 * limited_share,
        "unlimited spin used only {free_share:.3} of a core (limited: {limited_share:.3})"
    );
    assert!(alive(limited) && alive(free));
    stop(&mut fleet);
}

#[test]
fn each_vm_has_its_cgroup_with_limits_while_it_runs_and_none_after() {
    if !kvm_available("cgroup::limits") {
        return;
    }
    let _serial = serial();
    let dir = scratch("cgroup-limits");
    settings(&dir, "cgroup_overhead_mib: 40\n");
    vm(
        &dir,
        "one",
        "vcpus: 1\nmemory_mib: 24\nbuiltin:\n  then: idle\n",
    );
    vm(
        &dir,
        "two",
        "vcpus: 3\nmemory_mib: 16\nbuiltin:\n  then: idle\n",
    );
    let cg = Delegated::new("limits");
    let mut fleet = up(&dir, &cg);
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.count(": running") >= 2),
        "{}",
        fleet.log()
    );
    assert_eq!(fleet.count("cgroups v"), 1, "{}", fleet.log());
    let sup = fleet.child.id();
    let mut dirs = Vec::new();
    for (name, vcpus, mib) in [("one", 1u64, 24u64), ("two", 3, 16)] {
        let pid = fleet.pid_of(name);
        let mem = cgroup_dir(pid, "memory").expect("memory cgroup");
        let pids = cgroup_dir(pid, "pids").expect("pids cgroup");
        // In a directory of its own, unique to this supervisor.
        assert!(
            mem.ends_with(format!("vmm-fleet-{sup}/vm-{name}")),
            "{}",
            mem.display()
        );
        assert!(
            std::fs::read_to_string(mem.join("cgroup.procs"))
                .unwrap()
                .lines()
                .any(|l| l == pid.to_string())
        );
        let want = ((mib + 40) << 20).to_string();
        assert_eq!(
            limit_file(pid, "memory", "memory.limit_in_bytes", "memory.max").as_deref(),
            Some(want.as_str()),
            "{name}: memory limit = guest memory + cgroup_overhead_mib"
        );
        let want = (vcpus + PIDS_MARGIN).to_string();
        assert_eq!(
            limit_file(pid, "pids", "pids.max", "pids.max").as_deref(),
            Some(want.as_str())
        );
        // No cpu_quota: no CPU limit.
        let cpu = limit_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max").unwrap_or_default();
        assert!(cpu == "-1" || cpu.starts_with("max"), "{cpu}");
        dirs.push(mem);
        dirs.push(pids);
    }
    stop(&mut fleet);
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
        let fleet_dir = d.parent().unwrap();
        assert!(!fleet_dir.exists(), "{} left behind", fleet_dir.display());
    }
}

#[test]
fn without_a_writable_hierarchy_up_says_so_once_and_still_starts_the_vms() {
    if !kvm_available("cgroup::unwritable") {
        return;
    }
    let _serial = serial();
    // An unprivileged supervisor may not make cgroups here (and is not delegated one).
    let dir = scratch("cgroup-none");
    vm(
        &dir,
        "a",
        "vcpus: 1\nmemory_mib: 16\nbuiltin:\n  then: idle\n",
    );
    vm(
        &dir,
        "b",
        "vcpus: 1\nmemory_mib: 16\nbuiltin:\n  then: idle\n",
    );
    let nobody = 65534;
    nix::unistd::chown(&dir, Some(nobody.into()), Some(nobody.into())).unwrap();
    let mut cmd = common::fleet::up_command_of(bin_for_others(), &dir);
    cmd.uid(nobody).gid(nobody);
    let mut fleet = Running(Fleet::spawn(cmd));
    // Each VM is started (and, without /dev/kvm access, fails and is restarted): the
    // cgroup message still comes once, not per VM or per start.
    assert!(
        fleet.wait_for(Duration::from_secs(20), |f| f.starts("a").len() >= 2
            && f.starts("b").len() >= 2),
        "{}",
        fleet.log()
    );
    let log = fleet.log();
    assert_eq!(
        fleet.count("VMs run without memory, pids or CPU limits"),
        1,
        "{log}"
    );
    // (Lines naming the scratch directory, `.../cgroup-none-PID/...`, aside.)
    let scratch_name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let cgroup_lines = log
        .lines()
        .filter(|l| l.contains("cgroup") && !l.contains(&scratch_name))
        .count();
    assert_eq!(cgroup_lines, 1, "{log}");
    stop(&mut fleet);
}
