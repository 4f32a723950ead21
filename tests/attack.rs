//! Attacks on the merged containment, each done for real: what a compromised VM child
//! (arbitrary code as the VM user, in its cgroup, with its fds) or a local user can try
//! against the supervisor, its sibling VMs and the files it writes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::fleet::{Fleet, up_command};
use common::*;

/// KVM present and root (VMs start as another user, in cgroups). Loud when not.
fn may_run(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n*** ATTACK-TEST-SKIPPED: {test}: needs root ***\n");
        return false;
    }
    true
}

fn idle_vm(dir: &Path, name: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: idle\n  heartbeat_ms: 100\n"
        ),
    )
    .unwrap();
}

fn status_ids(pid: u32, key: &str) -> String {
    let v = status_value(pid, key).unwrap_or_else(|| panic!("no {key}: in /proc/{pid}/status"));
    v.split_whitespace().next().unwrap_or_default().to_string()
}

/// The v1 cgroup.procs files of `pid`'s memory, pids and cpu cgroups.
fn cgroup_procs_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrl, path) = (it.next()?, it.next()?, it.next()?);
            ["memory", "pids", "cpu"]
                .contains(&ctrl)
                .then(|| format!("/sys/fs/cgroup/{ctrl}{path}/cgroup.procs"))
        })
        .collect()
}

/// What a compromised VM child can do with one fork: a process of the VM's user in the
/// VM's cgroups that ignores SIGPIPE and never exits by itself. Planted from outside
/// (same cgroups, same uid/gid as `vm_pid`), since the VMM cannot be made to fork.
fn plant_leftover(vm_pid: u32) -> Child {
    let procs = cgroup_procs_of(vm_pid);
    assert!(
        procs.iter().any(|p| p.contains("/memory/")),
        "VM not in a memory cgroup: {procs:?}"
    );
    let joins: String = procs.iter().map(|p| format!("echo $$ > {p} && ")).collect();
    let (uid, gid) = (status_ids(vm_pid, "Uid"), status_ids(vm_pid, "Gid"));
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{joins} exec setpriv --reuid {uid} --regid {gid} --clear-groups \
             sh -c 'trap \"\" PIPE HUP TERM; while :; do sleep 1; done'"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh")
}

fn in_cgroup_of(pid: u32, vm_pid: u32) -> bool {
    let mine = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let vm = std::fs::read_to_string(format!("/proc/{vm_pid}/cgroup")).unwrap_or_default();
    !mine.is_empty() && mine == vm
}

/// A process a VM child leaves in its cgroup dies with the VM: it neither survives the
/// VM's death into its successor's cgroup (sharing its limits, keeping its pipes) nor
/// the fleet's exit (an orphan of the VM user with no supervisor).
#[test]
fn what_a_vm_child_forks_dies_with_it() {
    if !may_run("what_a_vm_child_forks_dies_with_it") {
        return;
    }
    let dir = scratch("attack-leftover");
    idle_vm(&dir, "lo");
    let fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("vm lo: running") >= 1),
        "{}",
        fleet.log()
    );
    let vm = fleet.pid_of("lo");
    let mut left = plant_leftover(vm);
    assert!(
        wait_until(Duration::from_secs(10), || in_cgroup_of(left.id(), vm)),
        "planting failed"
    );
    // The VM dies (a crash): what it left in its cgroup must die too.
    kill(Pid::from_raw(vm as i32), Signal::SIGKILL).unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        left.try_wait().unwrap().is_some()
    });
    let _ = left.kill();
    let _ = left.wait();
    assert!(
        gone,
        "a process the VM left in its cgroup outlived it\n{}",
        fleet.log()
    );
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("vm lo: running") >= 2),
        "{}",
        fleet.log()
    );

    // Again, then the fleet exits: nothing of the VM user stays behind.
    let vm = fleet.pid_of("lo");
    let mut left = plant_leftover(vm);
    assert!(wait_until(Duration::from_secs(10), || in_cgroup_of(
        left.id(),
        vm
    )));
    fleet.signal(Signal::SIGTERM);
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("exiting") >= 1),
        "{}",
        fleet.log()
    );
    let gone = wait_until(Duration::from_secs(10), || {
        left.try_wait().unwrap().is_some()
    });
    let _ = left.kill();
    let _ = left.wait();
    assert!(gone, "a leftover outlived the fleet\n{}", fleet.log());
    assert_eq!(fleet.count("not removed"), 0, "{}", fleet.log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A console file in a directory every user may write (a local user could plant a
/// symlink, a FIFO or a file of theirs there between rotations): refused by `validate`
/// and by `up`, naming the file, the field and the directory; nothing is written there.
#[test]
fn a_console_file_in_a_world_writable_directory_is_refused() {
    let dir = scratch("attack-console-dir");
    let (cfg, public) = (dir.join("cfg"), dir.join("public"));
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::create_dir_all(&public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o777)).unwrap();
    let console = public.join("c.console");
    std::fs::write(
        cfg.join("c.yaml"),
        format!(
            "name: c\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nconsole: {}\n",
            console.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&cfg)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("c.yaml: console:") && text.contains("writable by every user"),
        "{text}"
    );
    let out = Command::new(bin())
        .arg("up")
        .arg(&cfg)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .arg("--metrics-address")
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("writable by every user"), "{text}");
    assert!(!console.exists(), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fleet larger than the soft open-files limit it is started with (5 fds per VM; the
/// usual soft limit is 1024, so ~200 VMs): `up` raises the soft limit to the hard one,
/// so every VM starts instead of failing with EMFILE.
#[test]
fn a_fleet_larger_than_the_soft_fd_limit_starts_every_vm() {
    if !kvm_available("a_fleet_larger_than_the_soft_fd_limit_starts_every_vm") {
        return;
    }
    let dir = scratch("attack-nofile");
    const VMS: usize = 14;
    for i in 0..VMS {
        idle_vm(&dir, &format!("n{i}"));
    }
    let mut cmd = up_command(&dir);
    // SAFETY: setrlimit is async-signal-safe and touches only the struct passed.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let lim = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let fleet = Fleet::spawn(cmd);
    let ok = fleet.wait_for(Duration::from_secs(60), |f| {
        f.count(": running") >= VMS || f.count("Too many open files") > 0
    });
    fleet.signal(Signal::SIGTERM);
    assert!(ok, "{}", fleet.log());
    assert_eq!(fleet.count("Too many open files"), 0, "{}", fleet.log());
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("exiting") >= 1),
        "{}",
        fleet.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM directory or a VM file every user may write (any local user could add a VM of
/// their own, or change one, and have the fleet run it): refused by `validate` and
/// `up` with the path and the reason; nothing starts.
#[test]
fn a_world_writable_vm_directory_or_file_is_refused() {
    let dir = scratch("attack-config-dir");
    let cfg = dir.join("cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    let vm = cfg.join("w.yaml");
    std::fs::write(
        &vm,
        "name: w\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nconsole: off\n",
    )
    .unwrap();
    let run = |cmd: &str| {
        let mut c = Command::new(bin());
        c.arg(cmd).arg(&cfg);
        if cmd == "up" {
            c.arg("--log-dir")
                .arg(dir.join("logs"))
                .arg("--metrics-address")
                .arg("127.0.0.1:0");
        }
        let out = c.stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), text)
    };
    assert!(run("validate").0, "{}", run("validate").1);
    let set = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    set(&cfg, 0o777).unwrap();
    for cmd in ["validate", "up"] {
        let (ok, text) = run(cmd);
        assert!(!ok, "{cmd}: {text}");
        let want = format!("{}: is writable by every user (mode 777)", cfg.display());
        assert!(text.contains(&want), "{cmd}: {text}");
        assert!(!text.contains("starting"), "{cmd}: {text}");
    }
    set(&cfg, 0o755).unwrap();
    set(&vm, 0o666).unwrap();
    for cmd in ["validate", "up"] {
        let (ok, text) = run(cmd);
        assert!(!ok, "{cmd}: {text}");
        let want = format!("{}: cannot read: is writable by every user", vm.display());
        assert!(text.contains(&want), "{cmd}: {text}");
        assert!(!text.contains("starting"), "{cmd}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn last_heartbeat(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Three compromised VM children write their stdout and stderr pipes as fast as native
/// code can (not through the emulated UART) for 5 s: the supervisor's output thread
/// keeps a quiet VM's heartbeats flowing, uses little CPU, and writes no more than the
/// rate limit lets through.
#[test]
fn native_speed_floods_on_the_pipes_starve_no_one() {
    if !may_run("native_speed_floods_on_the_pipes_starve_no_one") {
        return;
    }
    let dir = scratch("attack-flood");
    for n in ["q", "f0", "f1", "f2"] {
        idle_vm(&dir, n);
    }
    let fleet = Fleet::up(&dir);
    assert!(
        fleet.wait_for(Duration::from_secs(60), |f| f.count(": running") >= 4),
        "{}",
        fleet.log()
    );
    let logs = dir.join("logs");
    let sup = fleet.child.id();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for n in ["f0", "f1", "f2"] {
        let pid = fleet.pid_of(n);
        for fd in [1, 2] {
            // The child's own pipe write end, as its code would use it.
            let mut pipe = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/fd/{fd}"))
                .unwrap();
            let stop = stop.clone();
            writers.push(std::thread::spawn(move || {
                let buf = vec![b'z'; 65536];
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match std::io::Write::write(&mut pipe, &buf) {
                        Ok(k) => n += k as u64,
                        Err(_) => break,
                    }
                }
                n
            }));
        }
    }
    let q = logs.join("q.console");
    let (beat0, cpu0, t0) = (
        last_heartbeat(&q),
        cpu_ticks(sup).expect("the supervisor's /proc/PID/stat"),
        std::time::Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(5));
    let (beat1, cpu1, secs) = (
        last_heartbeat(&q),
        cpu_ticks(sup).expect("the supervisor's /proc/PID/stat"),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // A writer blocked on a full pipe returns once the output thread reads again.
    let written: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let tick = 100.0; // USER_HZ
    let cpu = (cpu1 - cpu0) as f64 / tick / secs;
    eprintln!(
        "flood: {} MiB written in {secs:.1} s; supervisor CPU {:.1}% of a core; \
         quiet VM heartbeats {beat0} -> {beat1}",
        written >> 20,
        cpu * 100.0
    );
    assert!(
        written > 50 << 20,
        "the flood was too weak to test: {written}"
    );
    assert!(cpu < 0.5, "supervisor used {:.0}% of a core", cpu * 100.0);
    // 100 ms heartbeats: 50 in 5 s; a starved VM would show few or none.
    assert!(
        beat1 >= beat0 + 20,
        "quiet VM heartbeats {beat0} -> {beat1}"
    );
    // 16 KiB/s with a 16 s burst, per VM (console and log together).
    let allowed = 16 * 1024 * (16 + secs.ceil() as u64 + 30);
    for n in ["f0", "f1", "f2"] {
        let size = |f: String| std::fs::metadata(logs.join(f)).map_or(0, |m| m.len());
        let total = size(format!("{n}.console")) + size(format!("{n}.log"));
        assert!(total <= allowed, "{n}: {total} bytes written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A console file on a kernel interface file system (`/proc/sys/...`, a cgroup file):
/// the guest's output would be written into the host kernel's knobs by the supervisor.
/// Refused by `validate` and `up` before anything starts.
#[test]
fn a_console_file_on_proc_or_a_cgroup_file_is_refused() {
    let dir = scratch("attack-console-proc");
    let cfg = dir.join("cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    for console in ["/proc/sys/kernel/core_pattern", "/sys/kernel/mm/ksm/run"] {
        std::fs::write(
            cfg.join("p.yaml"),
            format!("name: p\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nconsole: {console}\n"),
        )
        .unwrap();
        for cmd in ["validate", "up"] {
            let out = Command::new(bin())
                .arg(cmd)
                .arg(&cfg)
                .args(
                    ["--metrics-address", "127.0.0.1:0"]
                        .iter()
                        .filter(|_| cmd == "up"),
                )
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(!out.status.success(), "{cmd} {console}: {text}");
            assert!(
                text.contains("p.yaml: console:") && text.contains("kernel interface"),
                "{cmd} {console}: {text}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A kernel or initrd on a kernel interface file system (`/proc/kcore`, `/proc/*/environ`
/// are "regular files"): opened by the child before it drops privileges, it would put
/// host memory or secrets into the guest. Refused at validate and where the child opens
/// it (a path swapped after validation).
#[test]
fn a_kernel_or_initrd_on_proc_is_refused_at_validate_and_in_the_child() {
    let dir = scratch("attack-initrd-proc");
    std::fs::write(
        dir.join("i.yaml"),
        "name: i\nvcpus: 1\nmemory_mib: 32\nkernel: /proc/self/environ\n\
         initrd: /proc/self/environ\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{text}");
    for key in ["kernel", "initrd"] {
        assert!(
            text.contains(&format!("{key}: /proc/self/environ: is a kernel interface")),
            "{text}"
        );
    }
    for what in ["kernel", "initrd"] {
        let e = match vmm_fleet::vm::boot::ImageFile::open(what, Path::new("/proc/self/environ")) {
            Ok(_) => panic!("/proc/self/environ accepted as a {what}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("kernel interface"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default log directory sits next to the VM directory: in a sticky, world-writable
/// parent (/tmp) any user can make it first, with a console file of their own in it. The
/// root supervisor used to append the guest's console to that user's file; it now
/// refuses the directory (the VM does not start) and writes nothing there.
#[test]
fn a_log_directory_made_first_by_another_user_is_refused() {
    if !may_run("a_log_directory_made_first_by_another_user_is_refused") {
        return;
    }
    let top = scratch("attack-logdir-owner");
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let cfg = top.join("cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    idle_vm(&cfg, "v");
    let logs = top.join("vmm-fleet-logs");
    let planted = logs.join("v.console");
    let st = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!(
            "mkdir {0} && touch {1} && chmod 666 {1}",
            logs.display(),
            planted.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let mut child = Command::new(bin())
        .arg("up")
        .arg(&cfg)
        .arg("--metrics-address")
        .arg("127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take();
    let fleet = Fleet::from_child(child);
    let refused = fleet.wait_for(Duration::from_secs(30), |f| {
        f.count("is owned by nobody") > 0 || f.count("vm v: running") > 0
    });
    fleet.signal(Signal::SIGTERM);
    assert!(refused, "{}", fleet.log());
    assert_eq!(fleet.count("vm v: running"), 0, "{}", fleet.log());
    assert!(
        fleet.log().contains(&format!(
            "vm v: cannot start: log directory {}",
            logs.display()
        )),
        "{}",
        fleet.log()
    );
    assert_eq!(std::fs::metadata(&planted).unwrap().len(), 0);
    assert!(!logs.join("v.log").exists());
    let _ = std::fs::remove_dir_all(&top);
}

/// When the supervisor and its VM children share a user (the packaged unit runs `up` as
/// `vmm-fleet`, and children keep its uid; or any unprivileged `up`), a compromised child
/// must not reach into the supervisor: open its memory (/proc/PID/mem: read and write
/// it, i.e. run code in it), list or open its fds, or ptrace it.
#[test]
fn a_process_of_the_supervisors_user_cannot_reach_into_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n*** ATTACK-TEST-SKIPPED: needs root to run up as another user ***\n");
        return;
    }
    let dir = scratch("attack-same-uid");
    idle_vm(&dir, "s");
    nix::unistd::chown(&dir, Some(65534.into()), Some(65534.into())).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(args);
        c
    };
    let child = as_nobody(&[&bin_for_others().to_string_lossy(), "up"])
        .arg(&dir)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .args(["--metrics-address", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fleet = Fleet::from_child(child);
    let sup = fleet.child.id();
    // Up and looping (its VMs may fail without access to /dev/kvm: irrelevant here).
    assert!(
        fleet.wait_for(Duration::from_secs(30), |f| f.count("vm s: starting") > 0),
        "{}",
        fleet.log()
    );
    let probe = |what: &str| {
        let out = as_nobody(&["sh", "-c", what]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mem = probe(&format!("exec 3</proc/{sup}/mem && echo opened"));
    let fds = probe(&format!("ls /proc/{sup}/fd && echo listed"));
    fleet.signal(Signal::SIGTERM);
    assert!(
        !mem.contains("opened"),
        "the supervisor's memory was opened"
    );
    assert!(
        !fds.contains("listed"),
        "the supervisor's fds were listed: {fds}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The child opens kernel and initrd as root, before it drops to `vm_user`: a path a
/// local user controls (their kernel directory), swapped after `validate` for a symlink
/// to a file only root may read, must not end up in that user's guest. The child refuses
/// any image its VM user could not have read itself, before reading a byte of it.
#[test]
fn an_image_the_vm_user_could_not_read_is_refused_by_the_child() {
    if !may_run("an_image_the_vm_user_could_not_read_is_refused_by_the_child") {
        return;
    }
    let dir = scratch("attack-image-perm");
    let secret = dir.join("root-only.bin");
    std::fs::write(&secret, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.join("users-kernel");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    std::fs::write(
        dir.join("k.yaml"),
        format!(
            "name: k\nvcpus: 1\nmemory_mib: 32\nkernel: {}\nrestart:\n  policy: never\n",
            link.display()
        ),
    )
    .unwrap();
    let fleet = Fleet::up(&dir);
    let log = dir.join("logs/k.log");
    let seen = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("vm k:"))
    });
    fleet.signal(Signal::SIGTERM);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(seen, "{}\n{text}", fleet.log());
    assert!(
        text.contains("kernel") && text.contains("not readable by the VM user"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A console file outside the log directory (`console: /etc/cron.d/x` passes every
/// other rule: root's directory, not writable by others): the root supervisor would
/// write the guest's output there, and cron would run it. Whoever may write a VM file
/// (a group-writable VM directory) must not get that: refused by `validate` and `up`.
#[test]
fn a_console_file_outside_the_log_directory_is_refused() {
    let dir = scratch("attack-console-outside");
    let (cfg, logs, elsewhere) = (dir.join("cfg"), dir.join("logs"), dir.join("etc-cron.d"));
    for d in [&cfg, &logs, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        cfg.join("fleet.yaml"),
        format!("log_dir: {}\n", logs.display()),
    )
    .unwrap();
    let vm = |console: &str| {
        std::fs::write(
            cfg.join("o.yaml"),
            format!("name: o\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nconsole: {console}\n"),
        )
        .unwrap();
    };
    let run = |cmd: &str| {
        let mut c = Command::new(bin());
        c.arg(cmd).arg(&cfg);
        if cmd == "up" {
            c.args(["--metrics-address", "127.0.0.1:0"]);
        }
        let out = c.stdin(Stdio::null()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let sneaky = format!("{}/../etc-cron.d/x", logs.display());
    for console in [elsewhere.join("x").display().to_string(), sneaky] {
        vm(&console);
        for cmd in ["validate", "up"] {
            let (ok, text) = run(cmd);
            assert!(!ok, "{cmd} {console}: {text}");
            assert!(
                text.contains("o.yaml: console:") && text.contains("outside the log directory"),
                "{cmd}: {text}"
            );
        }
        assert!(!elsewhere.join("x").exists());
    }
    // In the log directory, a file of its own is fine.
    vm(&logs.join("o-own.console").display().to_string());
    let (ok, text) = run("validate");
    assert!(ok, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
