//! `vmm-fleet run-vm` on the built-in guest under real KVM: every `then:` mode with 1 and
//! 4 vCPUs, SIGTERM in every phase, and every kind of bad input.

mod common;

use std::time::Duration;

use common::*;

const POWEROFF: i32 = 0;
const RESET: i32 = 3;
const CRASH: i32 = 4;
const VMM_ERROR: i32 = 5;
const STOPPED: i32 = 6;

fn assert_announced(console: &str, vcpus: u8) {
    for id in 0..vcpus {
        assert!(
            console.lines().any(|l| l == format!("vcpu {id} up")),
            "no `vcpu {id} up` line in:\n{console}"
        );
    }
    assert!(
        console
            .lines()
            .any(|l| l == format!("mptable cpus={vcpus}")),
        "no `mptable cpus={vcpus}` in:\n{console}"
    );
}

fn finite_mode(then: &str, vcpus: u8, want: i32) {
    if !kvm_available("run_vm::finite_mode") {
        return;
    }
    let dir = scratch(&format!("{then}-{vcpus}"));
    let cfg = builtin_config(&dir, "g", vcpus, then, "");
    let (code, err) = run_to_end(&cfg, Duration::from_secs(30));
    let console = read(&dir.join("g.console"));
    assert_eq!(code, Some(want), "stderr: {err}\nconsole:\n{console}");
    assert_announced(&console, vcpus);
    assert!(console.contains(then), "console:\n{console}");
}

#[test]
fn poweroff_1_vcpu() {
    finite_mode("poweroff", 1, POWEROFF);
}
#[test]
fn poweroff_4_vcpus() {
    finite_mode("poweroff", 4, POWEROFF);
}
#[test]
fn reset_1_vcpu() {
    finite_mode("reset", 1, RESET);
}
#[test]
fn reset_4_vcpus() {
    finite_mode("reset", 4, RESET);
}
#[test]
fn crash_1_vcpu() {
    finite_mode("crash", 1, CRASH);
}
#[test]
fn crash_4_vcpus() {
    finite_mode("crash", 4, CRASH);
}

/// Modes that never end: wait for the announcements (and heartbeats), then SIGTERM.
fn endless_mode(then: &str, vcpus: u8) {
    if !kvm_available("run_vm::endless_mode") {
        return;
    }
    let dir = scratch(&format!("{then}-{vcpus}"));
    let cfg = builtin_config(&dir, "g", vcpus, then, "  heartbeat_ms: 50\n");
    let console_path = dir.join("g.console");
    let mut child = spawn_run_vm(&cfg);
    let up = wait_until(Duration::from_secs(20), || {
        read(&console_path).contains(&format!("mptable cpus={vcpus}"))
    });
    if then == "idle" {
        // The heartbeat keeps coming: at least 3 more after the first one we saw.
        let beats = |s: &str| s.lines().filter(|l| l.starts_with("heartbeat ")).count();
        assert!(
            wait_until(Duration::from_secs(20), || beats(&read(&console_path)) >= 1),
            "no heartbeat:\n{}",
            read(&console_path)
        );
        let first = beats(&read(&console_path));
        assert!(
            wait_until(Duration::from_secs(20), || beats(&read(&console_path))
                >= first + 3),
            "heartbeat stopped at {first}"
        );
    } else {
        // Spinning vCPUs make no exits; give them time to be deep in guest mode.
        std::thread::sleep(Duration::from_millis(300));
    }
    sigterm(&child);
    let st = wait_with_limit(&mut child, Duration::from_secs(10));
    let console = read(&console_path);
    assert!(up, "guest never came up:\n{console}");
    assert_announced(&console, vcpus);
    assert_eq!(st.code(), Some(STOPPED), "console:\n{console}");
}

#[test]
fn spin_1_vcpu_stops_on_sigterm() {
    endless_mode("spin", 1);
}
#[test]
fn spin_4_vcpus_stop_on_sigterm() {
    endless_mode("spin", 4);
}
#[test]
fn idle_1_vcpu_heartbeat_then_sigterm() {
    endless_mode("idle", 1);
}
#[test]
fn idle_4_vcpus_heartbeat_then_sigterm() {
    endless_mode("idle", 4);
}

#[test]
fn sigterm_right_after_start() {
    if !kvm_available("run_vm::sigterm_right_after_start") {
        return;
    }
    let dir = scratch("early-term");
    let cfg = builtin_config(&dir, "g", 4, "idle", "");
    for _ in 0..5 {
        let mut child = spawn_run_vm(&cfg);
        // As soon as the process can take SIGTERM (its handler is the first thing set
        // up), before the VM is built or any vCPU runs.
        assert!(wait_until(Duration::from_secs(5), || catches_sigterm(
            child.id()
        )));
        sigterm(&child);
        let st = wait_with_limit(&mut child, Duration::from_secs(10));
        assert_eq!(st.code(), Some(STOPPED));
    }
}

fn bad_input(name: &str, yaml: &str, want_in_stderr: &str) {
    if !kvm_available("run_vm::bad_input") {
        return;
    }
    let dir = scratch(name);
    let cfg = dir.join("vm.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let (code, err) = run_to_end(&cfg, Duration::from_secs(30));
    assert_eq!(code, Some(VMM_ERROR), "stderr: {err}");
    assert!(
        err.contains(want_in_stderr),
        "stderr lacks {want_in_stderr:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one clear line expected: {err}"
    );
}

#[test]
fn missing_kernel_file() {
    bad_input(
        "nokernel",
        "name: x\nvcpus: 1\nmemory_mib: 32\nkernel: /nonexistent/vmlinux\n",
        "kernel: /nonexistent/vmlinux: no such file",
    );
}

#[test]
fn kernel_neither_bzimage_nor_elf() {
    let dir = scratch("notakernel");
    std::fs::write(dir.join("junk.bin"), vec![0x5a_u8; 8192]).unwrap();
    bad_input(
        "notakernel-run",
        &format!(
            "name: x\nvcpus: 1\nmemory_mib: 32\nkernel: {}\n",
            dir.join("junk.bin").display()
        ),
        "neither a bzImage nor an ELF image",
    );
}

#[test]
fn memory_too_small_for_kernel_plus_initramfs() {
    let dir = scratch("toosmall");
    // A 12 MiB initramfs cannot sit beside the built-in guest in 8 MiB of RAM.
    let initrd = dir.join("big.cpio");
    std::fs::write(&initrd, vec![0u8; 12 << 20]).unwrap();
    // The built-in guest takes no initrd in the schema, so use it as a path kernel.
    let kernel = dir.join("builtin.elf");
    std::fs::write(&kernel, vmm_fleet::vm::builtin::BUILTIN_ELF).unwrap();
    bad_input(
        "toosmall-run",
        &format!(
            "name: x\nvcpus: 1\nmemory_mib: 8\nkernel: {}\ninitrd: {}\n",
            kernel.display(),
            initrd.display()
        ),
        "guest memory too small",
    );
}

#[test]
fn zero_vcpus() {
    bad_input(
        "zerovcpu",
        "name: x\nvcpus: 0\nmemory_mib: 32\nkernel: builtin\n",
        "vcpus: 0 is out of range",
    );
}

#[test]
fn more_vcpus_than_kvm_allows() {
    bad_input(
        "manyvcpu",
        "name: x\nvcpus: 255\nmemory_mib: 32\nkernel: builtin\n",
        "vcpus: 255 is out of range, must be 1..=254",
    );
}

#[test]
fn more_memory_than_the_host_has() {
    bad_input(
        "hugemem",
        "name: x\nvcpus: 1\nmemory_mib: 10000000\nkernel: builtin\n",
        "memory_mib: 10000000 MiB is more than this host has",
    );
}

#[test]
fn unknown_key_is_refused_naming_file_and_key() {
    bad_input(
        "unknownkey",
        "name: x\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\ncpus: 2\n",
        "vm.yaml: cpus: unknown field `cpus`",
    );
}

#[test]
fn no_permission_on_dev_kvm() {
    if !kvm_available("run_vm::no_permission_on_dev_kvm") {
        return;
    }
    // Run as `nobody`, who may not open /dev/kvm here (crw------- root).
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o006 != 0 || !nix::unistd::Uid::effective().is_root() {
        eprintln!("/dev/kvm is world-accessible or we are not root: nobody could open it");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-fleet-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.yaml");
    std::fs::write(
        &cfg,
        "name: x\nvcpus: 1\nmemory_mib: 32\nkernel: builtin\nconsole: off\n",
    )
    .unwrap();
    let bin_copy = dir.join("vmm-fleet");
    std::fs::copy(bin(), &bin_copy).unwrap();
    for p in [&dir, &cfg, &bin_copy] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin_copy)
        .arg("run-vm")
        .arg(&cfg)
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(VMM_ERROR), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
