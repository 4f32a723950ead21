//! The process-level jail of a VM child, done in `run-vm` before its guest runs.
//!
//! The supervisor's side (own session, empty environment, only fds 0/1/2, the counter
//! table and the control channel) is in `supervisor::spawn`. Here, in order:
//! 1. SIGHUP is ignored and the supervisor is checked to be the parent still. The child
//!    does not die by PR_SET_PDEATHSIG: that fires when the supervisor *thread* that
//!    forked it exits, and a supervisor that re-executes itself ends every thread. The
//!    control channel (`vm::control`) tells the child its supervisor is gone instead: EOF
//!    on it stops the VM as SIGTERM does;
//! 2. everything the VM needs is opened while the process still has the supervisor's
//!    privileges: the counter table (mapped from its inherited fd), the console file,
//!    the kernel and initrd (regular files only, opened without blocking), `/dev/kvm`;
//! 3. [`lock_down`]: oom_score_adj raised, RLIMIT_CORE 0, a small RLIMIT_NOFILE, then
//!    setgroups/setresgid/setresuid to the VM user, no_new_privs, not dumpable, and the
//!    parent checked once more.
//!
//! glibc's setresuid signals every thread of the process (SIGSETXID), so [`lock_down`]
//! must run while the process has one thread: the caller starts its threads after it.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use nix::sys::prctl;
use nix::sys::resource::Resource;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{Gid, Pid, Uid, getppid};

use super::{RunError, VmParams};
use crate::config::VmSpec;
use crate::metrics::counters::{ExitCounters, TableError};

pub use crate::protocol::COUNTERS_FD;

/// The oom_score_adj every VM child raises itself to: under memory pressure the kernel
/// kills a VM before its supervisor.
pub const OOM_SCORE_ADJ: i32 = 500;

/// The open-file limit of a VM child with `vcpus` vCPUs: a vCPU fd and a KVM statistics
/// fd per vCPU, plus a margin for stdio, the table, the control channel, /dev/kvm, the
/// VM, eventfds (UART and keyboard interrupts), the signal pipe, the console and the
/// kernel images.
pub fn nofile_limit(vcpus: u8) -> u64 {
    64 + 2 * u64::from(vcpus)
}

/// The ids a child drops to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// The uid (real, effective and saved).
    pub uid: u32,
    /// The gid (real, effective and saved).
    pub gid: u32,
    /// The only supplementary group (`kvm`), if any.
    pub kvm_gid: Option<u32>,
}

/// What [`lock_down`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Jail {
    /// Drop to these ids (`None`: keep the current user).
    pub ids: Option<Ids>,
    /// The supervisor that must still be the parent.
    pub supervisor_pid: Option<u32>,
    /// The VM's vCPUs (sizes RLIMIT_NOFILE).
    pub vcpus: u8,
}

/// Errors setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("jail: {what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: nix::Error,
    },
    /// Writing /proc/self/oom_score_adj failed.
    #[error("jail: raising /proc/self/oom_score_adj: {0}")]
    OomScore(std::io::Error),
    /// The supervisor died before we could tie ourselves to it.
    #[error("supervisor {0} is gone")]
    Orphaned(u32),
    /// Another thread runs already: glibc would signal it to change its ids too, and a
    /// thread with a seccomp filter could die of that.
    #[error("jail: {0} threads run before the privilege drop; it must come first")]
    Threads(usize),
    /// The ids after the drop are not the ones asked for.
    #[error("jail: still uid {uid:?} gid {gid:?} after dropping to {want:?}")]
    NotDropped {
        /// (real, effective, saved) uid.
        uid: (u32, u32, u32),
        /// (real, effective, saved) gid.
        gid: (u32, u32, u32),
        /// What was asked.
        want: Ids,
    },
}

/// Why a file opened before the privilege drop is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} {}: not readable by the VM user (uid {uid}; file mode {mode:o}, owner {owner}, \
     group {group}): it is opened before the privilege drop, so it must be a file that user \
     could read itself",
    path.display()
)]
pub struct NotReadable {
    /// `kernel` or `initrd`.
    pub what: &'static str,
    /// The file.
    pub path: std::path::PathBuf,
    /// The VM user.
    pub uid: u32,
    /// The file's permission bits.
    pub mode: u32,
    /// The file's owner.
    pub owner: u32,
    /// The file's group.
    pub group: u32,
}

/// Checks that `ids` could have read `file` (opened as the supervisor's user, before the
/// drop) by its permission bits. Else a path a local user controls (a kernel in their
/// directory, swapped for a symlink to /etc/shadow after `validate`) would put data only
/// root may read into that user's guest.
pub fn check_readable_by(
    ids: Ids,
    what: &'static str,
    path: &std::path::Path,
    file: &std::fs::File,
) -> Result<(), NotReadable> {
    use std::os::unix::fs::MetadataExt;
    let err = |mode, owner, group| NotReadable {
        what,
        path: path.to_path_buf(),
        uid: ids.uid,
        mode,
        owner,
        group,
    };
    let meta = file.metadata().map_err(|_| err(0, 0, 0))?;
    let (mode, owner, group) = (meta.mode() & 0o7777, meta.uid(), meta.gid());
    let ok = if owner == ids.uid {
        mode & 0o400 != 0
    } else if group == ids.gid || Some(group) == ids.kvm_gid {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    };
    if ok {
        Ok(())
    } else {
        Err(err(mode, owner, group))
    }
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

/// Ignore SIGHUP: closing the terminal `up` runs on, or `systemctl kill -s HUP`, must
/// never stop a VM (the supervisor reloads on it; the VM carries on).
pub fn ignore_sighup() -> Result<(), JailError> {
    // SAFETY: SIG_IGN installs no handler code; nothing else in this process relies on
    // a SIGHUP disposition.
    unsafe { signal(Signal::SIGHUP, SigHandler::SigIgn) }
        .map(|_| ())
        .map_err(sys("ignoring SIGHUP"))
}

/// Name the process (and its threads) after the VM, as `vm:NAME`, for `ps` and `top`.
pub fn name_process(vm: &str) {
    let short: String = format!("vm:{vm}").chars().take(15).collect();
    if let Ok(c) = std::ffi::CString::new(short) {
        let _ = prctl::set_name(&c);
    }
}

/// Fail if the supervisor is gone already (this process was re-parented). Once the VM
/// runs, its end is seen on the control channel instead.
pub fn check_parent(supervisor_pid: u32) -> Result<(), JailError> {
    if getppid() != Pid::from_raw(supervisor_pid as i32) {
        return Err(JailError::Orphaned(supervisor_pid));
    }
    Ok(())
}

/// Map the counter table the supervisor passed as fd `fd` (normally [`COUNTERS_FD`]).
pub fn inherited_table(fd: RawFd) -> Result<ExitCounters, TableError> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let not_open = |e: nix::Error| TableError::Sys {
        what: "counter table fd",
        source: e.into(),
    };
    if fd < 0 {
        return Err(not_open(nix::Error::EBADF));
    }
    // Take ownership only of an fd that is open; keep it out of any exec.
    // SAFETY: `fd` is not -1; F_SETFD on a raw fd number touches no memory, and a
    // closed fd gives EBADF.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(not_open)?;
    // SAFETY: `fd` is open (checked above) and this process was given it to own: nothing
    // else in the child refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    ExitCounters::open_shared_fd(owned)
}

/// A VM with everything it needs opened, ready to start once privileges are dropped.
pub struct OpenedVm {
    /// `/dev/kvm`.
    pub kvm: Kvm,
    /// The VM, with its console, kernel and initrd open.
    pub params: VmParams,
}

impl OpenedVm {
    /// Open what the VM `spec` describes needs: console file, kernel, initrd, /dev/kvm.
    pub fn open(
        spec: &VmSpec,
        counters: Option<Arc<ExitCounters>>,
        started: Instant,
    ) -> Result<Self, RunError> {
        let mut params = VmParams::from_spec(spec)?;
        params.counters = counters;
        params.started = Some(started);
        let kvm = Kvm::new().map_err(RunError::NoKvm)?;
        Ok(OpenedVm { kvm, params })
    }
}

/// Raise oom_score_adj to [`OOM_SCORE_ADJ`] (never lower it).
fn raise_oom_score() -> Result<(), JailError> {
    const PATH: &str = "/proc/self/oom_score_adj";
    let now: i32 = std::fs::read_to_string(PATH)
        .map_err(JailError::OomScore)?
        .trim()
        .parse()
        .unwrap_or(i32::MIN);
    if now >= OOM_SCORE_ADJ {
        return Ok(());
    }
    std::fs::write(PATH, OOM_SCORE_ADJ.to_string()).map_err(JailError::OomScore)
}

fn set_rlimit(resource: Resource, value: u64) -> Result<(), JailError> {
    nix::sys::resource::setrlimit(resource, value, value).map_err(sys("setrlimit"))
}

/// Drop to `ids`: supplementary groups first (kvm only), then gid, then uid (after
/// which the process could no longer change its groups).
fn drop_to(ids: Ids) -> Result<(), JailError> {
    let groups: Vec<Gid> = ids.kvm_gid.map(Gid::from_raw).into_iter().collect();
    nix::unistd::setgroups(&groups).map_err(sys("setgroups"))?;
    let gid = Gid::from_raw(ids.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(sys("setresgid"))?;
    let uid = Uid::from_raw(ids.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(sys("setresuid"))?;
    let u = nix::unistd::getresuid().map_err(sys("getresuid"))?;
    let g = nix::unistd::getresgid().map_err(sys("getresgid"))?;
    let uid = (u.real.as_raw(), u.effective.as_raw(), u.saved.as_raw());
    let gid = (g.real.as_raw(), g.effective.as_raw(), g.saved.as_raw());
    if uid != (ids.uid, ids.uid, ids.uid) || gid != (ids.gid, ids.gid, ids.gid) {
        return Err(JailError::NotDropped {
            uid,
            gid,
            want: ids,
        });
    }
    Ok(())
}

/// Lock the process down (see the module doc). Call it from the main thread while it
/// is the only thread, after everything the VM needs is open.
pub fn lock_down(jail: &Jail) -> Result<(), JailError> {
    // Before the drop: once not dumpable, /proc/self belongs to root.
    raise_oom_score()?;
    set_rlimit(Resource::RLIMIT_CORE, 0)?;
    set_rlimit(Resource::RLIMIT_NOFILE, nofile_limit(jail.vcpus))?;
    if let Some(ids) = jail.ids {
        let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
        if threads > 1 {
            return Err(JailError::Threads(threads));
        }
        drop_to(ids)?;
    }
    prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))?;
    // No ptrace or process_vm_readv by a process of the same user, no core file with
    // guest RAM in it.
    prctl::set_dumpable(false).map_err(sys("PR_SET_DUMPABLE"))?;
    // The supervisor may have died while the VM was being opened.
    if let Some(pid) = jail.supervisor_pid {
        check_parent(pid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_limit_leaves_room_for_every_vcpu() {
        assert_eq!(nofile_limit(1), 66);
        assert_eq!(nofile_limit(255), 574);
    }
}
