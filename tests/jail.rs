//! The jail of each VM child, checked from outside on real processes under real KVM:
//! its user, no_new_privs, fds, environment, session, rlimits, dumpability; a SIGHUP to
//! the supervisor's process group; a FIFO swapped in for a kernel; `vm_user` checks.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

use common::fleet::{Fleet, up_command};
use common::*;

/// True when this test may run: KVM present and root (the jail drops from root to a
/// VM user). Loud when not.
fn may_run(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n*** JAIL-TEST-SKIPPED: {test}: needs root to start VMs as another user ***\n");
        return false;
    }
    true
}

fn nobody() -> User {
    User::from_name("nobody")
        .expect("user database")
        .expect("a `nobody` user")
}

fn idle_vm(dir: &Path, name: &str, vcpus: u8) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nvcpus: {vcpus}\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: idle\n  heartbeat_ms: 100\n"
        ),
    )
    .unwrap();
}

/// Field 6 of /proc/PID/stat: the session id.
fn session_of(pid: u32) -> i64 {
    // Fields after the name start at field 3 (state): the session is index 3.
    stat_fields(pid)[3].parse().unwrap()
}

fn status_line(pid: u32, key: &str) -> String {
    status_value(pid, key).unwrap_or_else(|| panic!("no {key}: in /proc/{pid}/status"))
}

/// Where each open fd of `pid` points (readlink of /proc/PID/fd/N).
fn fds(pid: u32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.to_string_lossy().into_owned()))
        })
        .collect();
    v.sort();
    v
}

/// True when fd `a` of process `pa` and fd `b` of `pb` are the same open file (kcmp(2)).
fn same_file(pa: u32, a: i32, pb: u32, b: i32) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp(2) only compares kernel objects; every argument is a plain integer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pa as libc::c_long,
            pb as libc::c_long,
            KCMP_FILE,
            a as libc::c_long,
            b as libc::c_long,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // A supervisor fd closed since it was listed is no shared file.
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "kcmp: {e}");
    }
    r == 0
}

/// Wait until VM `name` of `fleet` prints heartbeats and is reported running.
fn wait_running(fleet: &Fleet, dir: &Path, name: &str) {
    let console = dir.join("logs").join(format!("{name}.console"));
    assert!(
        wait_until(Duration::from_secs(30), || read(&console)
            .contains("heartbeat 3")),
        "{name}: no heartbeat; console:\n{}\nlog:\n{}\nchild log:\n{}",
        read(&console),
        fleet.log(),
        read(&dir.join("logs").join(format!("{name}.log")))
    );
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f
            .count(&format!("vm {name}: running"))
            >= 1),
        "{}",
        fleet.log()
    );
}

/// The highest heartbeat number in a console.
fn last_heartbeat(console: &Path) -> u64 {
    read(console)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("heartbeat ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_vm_child_of_a_root_launched_up_is_jailed() {
    if !may_run("jail::a_vm_child_is_jailed") {
        return;
    }
    let dir = scratch("jailed");
    std::fs::write(dir.join("fleet.yaml"), "vm_user: nobody\n").unwrap();
    idle_vm(&dir, "a", 2);
    let fleet = Fleet::up(&dir);
    wait_running(&fleet, &dir, "a");
    assert!(
        fleet.count("VM children run as user nobody (uid 65534") == 1,
        "{}",
        fleet.log()
    );
    let pid = fleet.pid_of("a");
    let sup = fleet.child.id();
    let who = nobody();
    let (uid, gid) = (who.uid.as_raw(), who.gid.as_raw());

    // Its user: real, effective, saved and filesystem ids are all nobody's.
    assert_eq!(
        status_line(pid, "Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(
        status_line(pid, "Gid"),
        format!("{gid}\t{gid}\t{gid}\t{gid}")
    );
    // No supplementary group but kvm (this host has no kvm group: none).
    let kvm = nix::unistd::Group::from_name("kvm").ok().flatten();
    let groups = status_line(pid, "Groups");
    match kvm {
        Some(g) => assert_eq!(groups, g.gid.to_string()),
        None => assert_eq!(groups, ""),
    }
    assert_eq!(status_line(pid, "NoNewPrivs"), "1");
    // Its main thread runs under its seccomp filter (every thread: tests/seccomp.rs).
    assert_eq!(status_line(pid, "Seccomp"), "2");

    // Its fds: stdin (the spec pipe), console and log (pipes to the supervisor's output
    // thread, which writes the files); then only what it made itself (KVM, eventfds, its
    // signal socketpair) and the mapping of its own table. Nothing the supervisor has
    // open (another VM's table, the metrics socket, its log).
    let mine = fds(pid);
    for n in 0..3 {
        assert!(
            mine[n].0 == n as i32 && mine[n].1.starts_with("pipe:"),
            "{mine:?}"
        );
    }
    let supervisors = fds(sup);
    for (n, target) in &mine[3..] {
        let own = target.starts_with("anon_inode:") || target.starts_with("socket:");
        assert!(
            own,
            "fd {n} -> {target}: not one the child makes itself: {mine:?}"
        );
        // The same open file, not the same name: every eventfd reads `anon_inode:[eventfd]`.
        let shared = supervisors
            .iter()
            .find(|(sfd, _)| same_file(pid, *n, sup, *sfd));
        assert!(
            shared.is_none(),
            "fd {n} -> {target} is the supervisor's {shared:?}"
        );
    }

    // An empty environment; its own session.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    assert_eq!(session_of(pid), i64::from(pid));
    assert_ne!(session_of(pid), session_of(sup));

    // rlimits and the OOM score.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"], "{limits}");
    assert_eq!(limit("Max open files"), ["68", "68"], "{limits}"); // 64 + 2 per vCPU
    let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(oom.trim(), "500");

    // Not dumpable: its /proc files belong to root, and a process of the same user
    // cannot read its memory map (as it can for a dumpable process of that user).
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/status"))
            .unwrap()
            .uid(),
        0
    );
    let as_nobody = |cmd: &str, arg: String| {
        Command::new(cmd)
            .arg(arg)
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    let mut control = Command::new("sleep")
        .arg("30")
        .uid(uid)
        .gid(gid)
        .spawn()
        .unwrap();
    let readable = as_nobody("cat", format!("/proc/{}/maps", control.id()));
    let _ = control.kill();
    let _ = control.wait();
    assert!(
        readable.success(),
        "control: nobody reads a dumpable nobody's maps"
    );
    let st = as_nobody("cat", format!("/proc/{pid}/maps"));
    assert!(
        !st.success(),
        "a process of the VM's user read its memory map"
    );

    // And the VM still works: the heartbeat keeps coming.
    let console = dir.join("logs/a.console");
    let seen = last_heartbeat(&console);
    assert!(
        wait_until(Duration::from_secs(20), || last_heartbeat(&console)
            > seen + 2),
        "{}",
        read(&console)
    );
    assert_eq!(fleet.starts("a").len(), 1, "{}", fleet.log());
}

#[test]
fn a_leaked_fd_of_the_launching_process_does_not_reach_a_vm_child() {
    if !may_run("jail::leaked_fd") {
        return;
    }
    let dir = scratch("leak");
    idle_vm(&dir, "l", 1);
    // A pipe without close-on-exec, as a careless launcher (a shell) leaves open.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::empty()).unwrap();
    let leaked = format!("pipe:[{}]", nix::sys::stat::fstat(&r).unwrap().st_ino);
    let fleet = Fleet::up(&dir);
    drop((r, w));
    wait_running(&fleet, &dir, "l");
    let sup: Vec<String> = fds(fleet.child.id()).into_iter().map(|(_, t)| t).collect();
    assert!(
        sup.contains(&leaked),
        "the supervisor did not inherit the leak: {sup:?}"
    );
    let pid = fleet.pid_of("l");
    let child = fds(pid);
    assert!(
        child.iter().all(|(_, t)| *t != leaked),
        "the leaked pipe reached the VM child: {child:?}"
    );
    // No vm_user written, supervisor root: the child runs as the default user, not root.
    let uid = status_line(pid, "Uid");
    assert!(
        uid.split_whitespace().all(|u| u != "0"),
        "a VM child runs as root by default: {uid}"
    );
    assert!(
        fleet.count("VM children run as user ") == 1 && fleet.count(") by default") == 1,
        "{}",
        fleet.log()
    );
}

/// `up` in a process group of its own (the test's stays out of the SIGHUP).
fn up_in_own_group(dir: &Path) -> Fleet {
    let mut cmd = up_command(dir);
    cmd.process_group(0);
    Fleet::spawn(cmd)
}

#[test]
fn sighup_to_the_supervisors_process_group_leaves_every_vm_running() {
    if !may_run("jail::sighup_to_the_group") {
        return;
    }
    let dir = scratch("hupgroup");
    for n in ["h1", "h2"] {
        idle_vm(&dir, n, 1);
    }
    let fleet = up_in_own_group(&dir);
    for n in ["h1", "h2"] {
        wait_running(&fleet, &dir, n);
    }
    let pids: Vec<u32> = ["h1", "h2"].iter().map(|n| fleet.pid_of(n)).collect();
    let sup = fleet.child.id();
    let still_running = |when: &str| {
        for (n, pid) in ["h1", "h2"].iter().zip(&pids) {
            let console = dir.join("logs").join(format!("{n}.console"));
            let seen = last_heartbeat(&console);
            assert!(
                wait_until(Duration::from_secs(20), || last_heartbeat(&console)
                    > seen + 2),
                "{n}: heartbeat stopped after {when}\n{}",
                fleet.log()
            );
            assert!(alive(*pid), "{n}: pid {pid} is gone\n{}", fleet.log());
            assert_eq!(fleet.pid_of(n), *pid, "{}", fleet.log());
            assert_eq!(fleet.starts(n).len(), 1, "{}", fleet.log());
        }
    };
    // What closing the terminal does: every process of the group gets SIGHUP at once.
    kill(Pid::from_raw(-(sup as i32)), Signal::SIGHUP).unwrap();
    assert!(
        fleet.wait_for(Duration::from_secs(10), |f| f.count("reload: ") >= 1),
        "{}",
        fleet.log()
    );
    still_running("SIGHUP to the group");
    // What `systemctl kill -s HUP` does: SIGHUP to every process of the service's cgroup,
    // whatever its session, so to each VM child itself (run-vm ignores it).
    for pid in &pids {
        kill(Pid::from_raw(*pid as i32), Signal::SIGHUP).unwrap();
    }
    still_running("SIGHUP to each child");
    assert!(alive(sup));
    assert_eq!(fleet.count("exited"), 0, "{}", fleet.log());
}

#[test]
fn a_fifo_swapped_in_for_the_kernel_or_initrd_fails_the_child_with_exit_5() {
    if !kvm_available("jail::fifo_kernel") {
        return;
    }
    for what in ["kernel", "initrd"] {
        let dir = scratch(&format!("fifo{what}"));
        let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initrd.img"));
        std::fs::write(&kernel, b"not a kernel, but a regular file").unwrap();
        std::fs::write(&initrd, b"not an initrd, but a regular file").unwrap();
        let file = dir.join("f.yaml");
        std::fs::write(
            &file,
            "name: f\nvcpus: 1\nmemory_mib: 32\nkernel: vmlinux\ninitrd: initrd.img\nconsole: off\n",
        )
        .unwrap();
        // The supervisor validated this spec; then the file becomes a FIFO nobody writes.
        let wire = vmm_fleet::config::VmSpec::load(&file)
            .unwrap()
            .to_wire()
            .unwrap();
        let swapped = if what == "kernel" { &kernel } else { &initrd };
        std::fs::remove_file(swapped).unwrap();
        nix::unistd::mkfifo(swapped, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut child = Command::new(bin())
            .arg("run-vm")
            .arg("--spec-stdin")
            .arg(&file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(wire.as_bytes())
            .unwrap();
        let st = wait_with_limit(&mut child, Duration::from_secs(20));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(st.code(), Some(5), "{what}: {err}");
        assert!(
            err.contains(&format!(
                "{what} {}: is a FIFO, not a regular file",
                swapped.display()
            )),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

fn validate_as(dir: &Path, uid: Option<(u32, u32)>) -> (Option<i32>, String) {
    let mut cmd = match uid {
        Some(_) => Command::new(bin_for_others()),
        None => Command::new(bin()),
    };
    cmd.arg("validate").arg(dir);
    if let Some((u, g)) = uid {
        cmd.uid(u).gid(g);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn vm_user_must_exist_and_be_reachable() {
    let dir = scratch("vmuser");
    std::fs::write(
        dir.join("v.yaml"),
        "name: v\nvcpus: 1\nmemory_mib: 8\nkernel: builtin\n",
    )
    .unwrap();
    let settings = dir.join("fleet.yaml");
    std::fs::write(&settings, "vm_user: no-such-user-here\n").unwrap();
    let (code, out) = validate_as(&dir, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "{}: vm_user: no user `no-such-user-here` on this host",
            settings.display()
        )),
        "{out}"
    );
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let who = nobody();
    let ids = Some((who.uid.as_raw(), who.gid.as_raw()));
    // A supervisor that is not root cannot run its VMs as anyone else...
    std::fs::write(&settings, "vm_user: root\n").unwrap();
    let (code, out) = validate_as(&dir, ids);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("vm_user: `root` (uid 0): the supervisor runs as uid 65534, not root"),
        "{out}"
    );
    // ...but may name itself, and as root `root` must be written out to be used.
    std::fs::write(&settings, "vm_user: nobody\n").unwrap();
    let (code, out) = validate_as(&dir, ids);
    assert_eq!(code, Some(0), "{out}");
    std::fs::write(&settings, "vm_user: root\n").unwrap();
    let (code, out) = validate_as(&dir, None);
    assert_eq!(code, Some(0), "{out}");
}
