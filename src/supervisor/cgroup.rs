//! One cgroup per VM child: a memory limit (guest memory + `cgroup_overhead_mib`), a pids
//! limit (vCPUs + [`PIDS_MARGIN`]) and a CPU quota (`cpu_quota`), on cgroup v2 or on the
//! memory / pids / cpu hierarchies of cgroup v1; placing a child in its cgroup before it
//! makes anything of its VM; telling an OOM kill by the cgroup from other deaths; removing the
//! directories again.
//!
//! Layout: under the supervisor's own cgroup of each hierarchy (`/proc/self/cgroup`), a
//! directory `vmm-fleet-<supervisor pid>` per fleet (several fleets may share a host and
//! a cgroup), with one `vm-<vm name>` directory per VM. On v2 the supervisor's own cgroup
//! must be delegated to it (systemd `Delegate=yes`): because of v2's "no internal
//! processes" rule the supervisor first moves itself into the leaf `<own>/supervisor`,
//! then enables the memory, pids and cpu controllers below `<own>`.
//!
//! Plain file writes rather than kata-containers' `cgroups-rs` (0.5.1): that crate pulls
//! in an async D-Bus stack (zbus) and a second `nix` even for its file-system manager,
//! blocks its caller for up to 150 ms in `delete()` (sleeping between retries; we retry
//! on the event loop's timer instead), panics on unexpected `memory.oom_control` text,
//! reports no `oom_kill` count on v2, and has no notion of the v2 leaf move or
//! `memory.oom.group`; what we need is a dozen small files.
//!
//! At reexec the pid stays, so the fleet's directories keep their names: the new
//! program adopts them as they are ([`FleetCgroups::hand_over`], [`FleetCgroups::adopt`])
//! and runs no set-up (no stale-fleet cleanup, no v2 leaf move): nothing of a running
//! VM is touched.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::VmSpec;

/// Tasks (threads) a VM child may have beyond one per vCPU: its main thread, signal and
/// helper threads, with room to spare. The child never forks.
pub const PIDS_MARGIN: u64 = 32;
/// Period of the CPU quota (µs); a quota of `q` CPUs is `q * CPU_PERIOD_US` per period.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts (µs).
const CPU_QUOTA_MIN_US: u64 = 1_000;
/// Delay between attempts to remove a VM's cgroup that was still busy.
const REMOVE_RETRY: Duration = Duration::from_secs(1);
/// Attempts before a busy VM cgroup is left for the fleet's exit.
const REMOVE_ATTEMPTS: u32 = 30;
/// Rounds of SIGKILL for what a gone child left in its cgroup.
const KILL_ROUNDS: u32 = 4;
/// At the fleet's exit, how long to wait for processes a VM child left in its cgroup to
/// die of their SIGKILL before its directory is removed.
const EXIT_KILL_WAIT: Duration = Duration::from_millis(500);
/// The controllers this module sets limits with.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The leaf the supervisor moves itself into on v2.
const V2_LEAF: &str = "supervisor";

/// Why the fleet's cgroups could not be set up or a VM's cgroup not made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No hierarchy offers the memory controller to this process.
    #[error("no cgroup hierarchy with the memory controller (v1 or v2) is mounted here")]
    NoMemoryController,
    /// A cgroup file or directory could not be read, made or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// On v2, the supervisor's cgroup holds other processes, so controllers cannot be
    /// enabled below it.
    #[error(
        "{}: holds processes other than the supervisor, so no controller can be enabled \
         below it (run the service with systemd's Delegate=yes)",
        dir.display()
    )]
    NotDelegated {
        /// The supervisor's cgroup.
        dir: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup version the limits are set through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Version {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// One hierarchy's fleet directory and the controllers used in it.
#[derive(Debug)]
struct Hierarchy {
    /// `<own cgroup>/vmm-fleet-<pid>`.
    fleet_dir: PathBuf,
    /// Of [`CONTROLLERS`], those this hierarchy carries (v1: one; v2: all available).
    controllers: Vec<&'static str>,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.contains(&c)
    }
}

/// A VM's cgroup while its child lives.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct VmCgroup {
    dirs: Vec<PathBuf>,
    /// `memory.oom_control` (v1) or `memory.events` (v2); `None` without a memory
    /// hierarchy.
    oom_file: Option<PathBuf>,
    oom_kills_before: u64,
    memory_limit_mib: u64,
}

/// Directories of a gone child that were still busy, tried again later.
#[derive(Debug)]
struct Leftover {
    dirs: Vec<PathBuf>,
    attempts: u32,
}

/// Where a child goes to enter its VM's cgroup (the `cgroup.procs` file of each
/// hierarchy): the spawner writes the child's pid there ([`Placement::place`]); a
/// process can also move itself between fork and exec ([`Placement::join`]).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    procs: Vec<CString>,
}

impl Placement {
    /// Move the calling process into the VM's cgroup of every hierarchy. Only `open`,
    /// `write` and `close`: async-signal-safe, for a child between fork and exec. Must
    /// run before the child drops its privileges.
    pub fn join(&self) -> io::Result<()> {
        for path in &self.procs {
            // SAFETY: `path` is a valid NUL-terminated string; the fd is ours and closed
            // below; the buffer is a static byte string.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Move process `pid` (all its threads) into the VM's cgroup of every hierarchy,
    /// from the outside: how the spawner places a VM child, right after it has started
    /// and before it is sent the spec it needs to make its VM (so no VM memory, vCPU or
    /// thread of it ever exists outside the cgroup). The caller needs write access to
    /// the `cgroup.procs` files (the supervisor's user made them).
    pub fn place(&self, pid: u32) -> io::Result<()> {
        let pid = pid.to_string();
        for path in &self.procs {
            let path = Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
            let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
            let mut f = fs::OpenOptions::new().write(true).open(path).map_err(at)?;
            // One write() per pid: the kernel reads cgroup.procs writes whole.
            let n = f.write(pid.as_bytes()).map_err(at)?;
            if n != pid.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("{}: short write of pid {pid}", path.display()),
                ));
            }
        }
        Ok(())
    }
}

/// The fleet's cgroups as handed to the next program at reexec.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct HeldCgroups {
    version: Version,
    /// Each hierarchy's fleet directory and controllers.
    hierarchies: Vec<(PathBuf, Vec<String>)>,
    live: BTreeMap<String, VmCgroup>,
    leftovers: Vec<Vec<PathBuf>>,
}

/// The cgroups of one fleet: set up once at `up`, one per VM child, removed at exit.
#[derive(Debug)]
pub struct FleetCgroups {
    version: Version,
    /// Empty when disabled (no writable hierarchy): VMs then run without limits.
    hierarchies: Vec<Hierarchy>,
    live: BTreeMap<String, VmCgroup>,
    leftovers: Vec<Leftover>,
    retry_at: Option<Instant>,
}

impl FleetCgroups {
    /// No cgroups: every VM runs without limits.
    pub fn disabled() -> Self {
        FleetCgroups {
            version: Version::V1,
            hierarchies: Vec::new(),
            live: BTreeMap::new(),
            leftovers: Vec::new(),
            retry_at: None,
        }
    }

    /// Find this process's cgroups and make the fleet's directories under them (v1 if
    /// the memory controller is on a v1 hierarchy, else v2). Also removes empty fleet
    /// directories left by supervisors that are gone.
    pub fn setup() -> Result<Self, CgroupError> {
        let own = read("/proc/self/cgroup")?;
        let mounts = read("/proc/self/mountinfo")?;
        let own = parse_proc_cgroup(&own);
        let mounts = parse_mountinfo(&mounts);
        let fleet_name = format!("vmm-fleet-{}", std::process::id());
        let v1 = |c: &str| -> Option<PathBuf> {
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == c))?;
            let path = own
                .iter()
                .find(|(cs, _)| cs.iter().any(|x| x == c))
                .map(|(_, p)| p.as_str())?;
            Some(m.dir_of(path))
        };
        let hierarchies = if let Some(mem) = v1("memory") {
            let mut hs = vec![v1_hierarchy(&mem, "memory", &fleet_name)?];
            for c in ["pids", "cpu"] {
                // Optional: without them the memory limit still holds.
                if let Some(dir) = v1(c)
                    && let Ok(h) = v1_hierarchy(&dir, c, &fleet_name)
                {
                    hs.push(h);
                }
            }
            (Version::V1, hs)
        } else {
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup2")
                .ok_or(CgroupError::NoMemoryController)?;
            let path = own
                .iter()
                .find(|(cs, _)| cs.iter().all(String::is_empty))
                .map(|(_, p)| p.as_str())
                .ok_or(CgroupError::NoMemoryController)?;
            (
                Version::V2,
                vec![v2_hierarchy(
                    &m.dir_of(path),
                    &fleet_name,
                    &CONTROLLERS,
                    "memory",
                )?],
            )
        };
        let (version, hierarchies) = hierarchies;
        for h in &hierarchies {
            if let Some(parent) = h.fleet_dir.parent() {
                remove_stale_fleets(parent);
            }
        }
        Ok(FleetCgroups {
            version,
            hierarchies,
            live: BTreeMap::new(),
            leftovers: Vec::new(),
            retry_at: None,
        })
    }

    /// Everything, for the next program at reexec (this one keeps it too, should the
    /// exec fail). Nothing is removed.
    pub fn hand_over(&self) -> HeldCgroups {
        HeldCgroups {
            version: self.version,
            hierarchies: self
                .hierarchies
                .iter()
                .map(|h| {
                    let cs = h.controllers.iter().map(|c| c.to_string()).collect();
                    (h.fleet_dir.clone(), cs)
                })
                .collect(),
            live: self
                .live
                .iter()
                .map(|(n, v)| {
                    let v = VmCgroup {
                        dirs: v.dirs.clone(),
                        oom_file: v.oom_file.clone(),
                        oom_kills_before: v.oom_kills_before,
                        memory_limit_mib: v.memory_limit_mib,
                    };
                    (n.clone(), v)
                })
                .collect(),
            leftovers: self.leftovers.iter().map(|l| l.dirs.clone()).collect(),
        }
    }

    /// The cgroups the program this one replaced (same pid) handed over. A hierarchy
    /// whose fleet directory is not this pid's or is gone is dropped (logged by the
    /// caller through the returned lines); VM cgroups are taken as they are.
    pub fn adopt(held: HeldCgroups, now: Instant) -> (Self, Vec<String>) {
        let mut notes = Vec::new();
        let ours = format!("vmm-fleet-{}", std::process::id());
        let hierarchies = held
            .hierarchies
            .into_iter()
            .filter_map(|(fleet_dir, cs)| {
                let named = fleet_dir.file_name().is_some_and(|n| n == ours.as_str());
                if !named || !fleet_dir.is_dir() {
                    notes.push(format!(
                        "cgroup {} handed over is not this fleet's: not used",
                        fleet_dir.display()
                    ));
                    return None;
                }
                let controllers = CONTROLLERS
                    .into_iter()
                    .filter(|c| cs.iter().any(|x| x == c))
                    .collect();
                Some(Hierarchy {
                    fleet_dir,
                    controllers,
                })
            })
            .collect::<Vec<_>>();
        let leftovers: Vec<Leftover> = held
            .leftovers
            .into_iter()
            .map(|dirs| Leftover { dirs, attempts: 0 })
            .collect();
        let retry_at = (!leftovers.is_empty()).then(|| now + REMOVE_RETRY);
        let cg = FleetCgroups {
            version: held.version,
            hierarchies,
            live: held.live,
            leftovers,
            retry_at,
        };
        (cg, notes)
    }

    /// One line on what is limited and where, for the log.
    pub fn describe(&self) -> String {
        if self.hierarchies.is_empty() {
            return "cgroups: none; VMs run without memory, pids or CPU limits".to_string();
        }
        let controllers: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| self.hierarchies.iter().any(|h| h.has(c)))
            .collect();
        let missing: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| !controllers.contains(c))
            .collect();
        let v = match self.version {
            Version::V1 => "v1",
            Version::V2 => "v2",
        };
        let dirs: Vec<String> = self
            .hierarchies
            .iter()
            .map(|h| h.fleet_dir.display().to_string())
            .collect();
        let mut line = format!(
            "cgroups {v}: a cgroup per VM ({}) under {}",
            controllers.join(", "),
            dirs.join(", ")
        );
        if !missing.is_empty() {
            line.push_str(&format!(
                "; no {} controller: not limited",
                missing.join(", ")
            ));
        }
        line
    }

    /// Is any hierarchy in use?
    pub fn enabled(&self) -> bool {
        !self.hierarchies.is_empty()
    }

    /// Make (or reuse) `spec`'s cgroup with its limits and return where its child goes;
    /// `None` when cgroups are disabled. On an error, what was made stays registered
    /// under the VM's name: call [`FleetCgroups::exited`] as for a child that never ran.
    pub fn prepare(
        &mut self,
        spec: &VmSpec,
        overhead_mib: u64,
    ) -> Result<Option<Placement>, CgroupError> {
        if self.hierarchies.is_empty() {
            return Ok(None);
        }
        let mut vm = VmCgroup {
            dirs: Vec::new(),
            oom_file: None,
            oom_kills_before: 0,
            memory_limit_mib: spec.memory_mib.saturating_add(overhead_mib),
        };
        let mut procs = Vec::new();
        let made = self.make(spec, &mut vm, &mut procs);
        vm.oom_kills_before = oom_kills(vm.oom_file.as_deref());
        self.live.insert(spec.name.clone(), vm);
        made.map(|()| Some(Placement { procs }))
    }

    /// Make `spec`'s directory in every hierarchy and set its limits, recording in `vm`
    /// what was made and in `procs` where the child writes.
    fn make(
        &mut self,
        spec: &VmSpec,
        vm: &mut VmCgroup,
        procs: &mut Vec<CString>,
    ) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            // Prefixed: a VM named like a control file (`tasks`, `cgroup.procs`) must not
            // meet one.
            let dir = h.fleet_dir.join(format!("vm-{}", spec.name));
            // Its own earlier child's directory may still be there, waiting for removal.
            self.leftovers.retain(|l| !l.dirs.contains(&dir));
            make_dir(&dir)?;
            vm.dirs.push(dir.clone());
            set_limits(self.version, h, &dir, spec, vm.memory_limit_mib)?;
            if h.has("memory") {
                vm.oom_file = Some(dir.join(match self.version {
                    Version::V1 => "memory.oom_control",
                    Version::V2 => "memory.events",
                }));
            }
            let p = dir.join("cgroup.procs");
            let c = CString::new(p.as_os_str().as_bytes())
                .map_err(|e| io_err(&p)(io::Error::new(ErrorKind::InvalidInput, e.to_string())))?;
            procs.push(c);
        }
        Ok(())
    }

    /// `name`'s child is gone (reaped, or never started): remove its cgroup (or retry
    /// later), and say whether the cgroup's OOM killer killed it.
    pub fn exited(&mut self, name: &str, now: Instant) -> Option<String> {
        let vm = self.live.remove(name)?;
        let kills = oom_kills(vm.oom_file.as_deref()).saturating_sub(vm.oom_kills_before);
        // What the child left behind (a process it forked, as a compromised VMM may)
        // must not outlive the VM, keep its cgroup or pipes busy, or join its successor.
        // A few rounds: on v1, a process may fork between the read of cgroup.procs and
        // the kill (v2's cgroup.kill has no such gap). A few milliseconds at most, and
        // only when something was left.
        for _ in 0..KILL_ROUNDS {
            if kill_members(self.version, &vm.dirs) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut left = Leftover {
            dirs: vm.dirs,
            attempts: 0,
        };
        if !try_remove(&mut left.dirs) {
            self.leftovers.push(left);
            self.retry_at.get_or_insert(now + REMOVE_RETRY);
        }
        (kills > 0).then(|| {
            format!(
                "out of memory: killed by its cgroup's OOM killer (memory limit {} MiB: \
                 guest memory + cgroup_overhead_mib)",
                vm.memory_limit_mib
            )
        })
    }

    /// When [`FleetCgroups::on_timer`] wants to run next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Retry removing busy VM cgroups once their time has come.
    pub fn on_timer(&mut self, now: Instant) {
        if self.retry_at.is_none_or(|t| t > now) {
            return;
        }
        self.retry_at = None;
        for l in &mut self.leftovers {
            l.attempts += 1;
            kill_members(self.version, &l.dirs);
            try_remove(&mut l.dirs);
        }
        self.leftovers
            .retain(|l| !l.dirs.is_empty() && l.attempts < REMOVE_ATTEMPTS);
        if !self.leftovers.is_empty() {
            self.retry_at = Some(now + REMOVE_RETRY);
        }
    }

    /// Remove every VM cgroup and the fleet's directories (at exit). Returns what could
    /// not be removed.
    pub fn remove_all(&mut self) -> Vec<PathBuf> {
        // Only gone children's cgroups are emptied: `live` ones are not touched (this
        // also runs on drop, and must never kill a running VM).
        let mut left: Vec<PathBuf> = self.leftovers.drain(..).flat_map(|l| l.dirs).collect();
        if kill_members(self.version, &left) > 0 {
            // SIGKILLed processes leave their cgroup within milliseconds; no later retry
            // comes at exit, so wait for them here (bounded).
            let deadline = Instant::now() + EXIT_KILL_WAIT;
            while !try_remove(&mut left) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut dirs: Vec<PathBuf> = std::mem::take(&mut self.live)
            .into_values()
            .flat_map(|v| v.dirs)
            .chain(left)
            .collect();
        dirs.extend(self.hierarchies.drain(..).map(|h| h.fleet_dir));
        self.retry_at = None;
        try_remove(&mut dirs);
        dirs
    }
}

impl Drop for FleetCgroups {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// SIGKILL every process still in the VM cgroups `dirs` (on v2 through `cgroup.kill`
/// when the kernel has it); returns how many were signalled. A pid read from
/// `cgroup.procs` is pinned with a pidfd and signalled only if the cgroup still lists it
/// after the pidfd is open, so a recycled pid of an unrelated process is never hit.
fn kill_members(version: Version, dirs: &[PathBuf]) -> usize {
    let mut n = 0;
    let listed = |p: &Path| -> Vec<i32> {
        fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        if version == Version::V2 {
            let members = listed(&procs).len();
            if members == 0 {
                continue;
            }
            if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                n += members;
                continue;
            }
        }
        let pinned: Vec<(i32, PidFd)> = listed(&procs)
            .into_iter()
            .filter_map(|pid| PidFd::open(pid).map(|fd| (pid, fd)))
            .collect();
        if pinned.is_empty() {
            continue;
        }
        let still = listed(&procs);
        for (pid, fd) in pinned {
            if still.contains(&pid) && fd.kill() {
                n += 1;
            }
        }
    }
    n
}

/// A process pinned by a pidfd: signals reach that process or none.
struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    fn open(pid: i32) -> Option<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        Some(PidFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn kill(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal on an fd we own, no siginfo (null), no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}

/// Remove each directory of `dirs` that can be; keeps the rest. True when none is left.
fn try_remove(dirs: &mut Vec<PathBuf>) -> bool {
    dirs.retain(|d| match fs::remove_dir(d) {
        Ok(()) => false,
        Err(e) => e.kind() != ErrorKind::NotFound,
    });
    dirs.is_empty()
}

fn read(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err(Path::new(path)))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// Write `value` to `dir/file` if the file exists (it depends on kernel options).
fn write_if_present(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    if path.exists() {
        write(&path, value)?;
    }
    Ok(())
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(io_err(dir)(e)),
        _ => Ok(()),
    }
}

/// `<own>/vmm-fleet-<pid>` in the v1 hierarchy of `controller`.
fn v1_hierarchy(
    own: &Path,
    controller: &'static str,
    fleet_name: &str,
) -> Result<Hierarchy, CgroupError> {
    let fleet_dir = own.join(fleet_name);
    make_dir(&fleet_dir)?;
    Ok(Hierarchy {
        fleet_dir,
        controllers: vec![controller],
    })
}

/// On v2: leave `own` for the leaf `own/supervisor` if `own` must have no processes,
/// enable the controllers below `own` and below `own/vmm-fleet-<pid>`.
/// `wanted` are the controllers to enable when available, `required` one that must be.
fn v2_hierarchy(
    own: &Path,
    fleet_name: &str,
    wanted: &[&'static str],
    required: &str,
) -> Result<Hierarchy, CgroupError> {
    let available = fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
    let controllers: Vec<&'static str> = wanted
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    if !controllers.contains(&required) {
        return Err(CgroupError::NoMemoryController);
    }
    let enable: String = controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let subtree = own.join("cgroup.subtree_control");
    match fs::write(&subtree, &enable) {
        Ok(()) => {}
        // "No internal processes": a cgroup with processes cannot enable domain
        // controllers for its children. Move into a leaf, then try again.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = own.join(V2_LEAF);
            make_dir(&leaf)?;
            write(&leaf.join("cgroup.procs"), "0")?;
            fs::write(&subtree, &enable).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    CgroupError::NotDelegated {
                        dir: own.to_path_buf(),
                    }
                } else {
                    io_err(&subtree)(e)
                }
            })?;
        }
        Err(e) => return Err(io_err(&subtree)(e)),
    }
    let fleet_dir = own.join(fleet_name);
    make_dir(&fleet_dir)?;
    write(&fleet_dir.join("cgroup.subtree_control"), &enable)?;
    Ok(Hierarchy {
        fleet_dir,
        controllers,
    })
}

/// Write `spec`'s limits into `dir`, a VM cgroup of hierarchy `h`.
fn set_limits(
    version: Version,
    h: &Hierarchy,
    dir: &Path,
    spec: &VmSpec,
    memory_limit_mib: u64,
) -> Result<(), CgroupError> {
    let bytes = (memory_limit_mib << 20).to_string();
    let pids = (u64::from(spec.vcpus) + PIDS_MARGIN).to_string();
    let quota = spec.cpu_quota.map(|q| {
        let us = (q * CPU_PERIOD_US as f64).round() as u64;
        us.max(CPU_QUOTA_MIN_US).to_string()
    });
    match version {
        Version::V1 => {
            if h.has("memory") {
                // memsw (memory + swap) must stay >= the memory limit at every step.
                write_if_present(dir, "memory.memsw.limit_in_bytes", "-1")?;
                write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                write_if_present(dir, "memory.memsw.limit_in_bytes", &bytes)?;
                // Inherited from the parent: make sure the OOM killer acts.
                write_if_present(dir, "memory.oom_control", "0")?;
            }
            if h.has("pids") {
                write(&dir.join("pids.max"), &pids)?;
            }
            if h.has("cpu") {
                write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &dir.join("cpu.cfs_quota_us"),
                    quota.as_deref().unwrap_or("-1"),
                )?;
            }
        }
        Version::V2 => {
            if h.has("memory") {
                write(&dir.join("memory.max"), &bytes)?;
                write_if_present(dir, "memory.swap.max", "0")?;
                write_if_present(dir, "memory.oom.group", "1")?;
            }
            if h.has("pids") {
                write(&dir.join("pids.max"), &pids)?;
            }
            if h.has("cpu") {
                let q = quota.as_deref().unwrap_or("max");
                write(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
            }
        }
    }
    Ok(())
}

/// The `oom_kill` count of `memory.oom_control` (v1) or `memory.events` (v2); 0 when
/// there is none or it is unreadable.
fn oom_kills(file: Option<&Path>) -> u64 {
    file.and_then(|f| fs::read_to_string(f).ok())
        .and_then(|text| parse_oom_kills(&text))
        .unwrap_or(0)
}

fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Remove `vmm-fleet-<pid>` directories under `parent` whose supervisor is gone (a killed
/// supervisor cannot clean up). `rmdir` never removes a cgroup with processes in it.
fn remove_stale_fleets(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vmm-fleet-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        if let Ok(vms) = fs::read_dir(&dir) {
            for vm in vms.flatten() {
                if vm.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(vm.path());
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// `/proc/self/cgroup` as (controllers, path) pairs; v2's line has one empty controller.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.split(',').map(str::to_string).collect();
            Some((controllers, parts.next()?.to_string()))
        })
        .collect()
}

/// A cgroup file system mount.
#[derive(Debug, PartialEq)]
struct Mount {
    /// The cgroup path mounted (`/` unless a cgroup namespace or bind mount).
    root: String,
    point: PathBuf,
    /// `cgroup` (v1) or `cgroup2`.
    fstype: String,
    /// Super-block options: a v1 mount's controllers.
    options: Vec<String>,
}

impl Mount {
    /// The directory of cgroup `path` (as in `/proc/self/cgroup`) under this mount.
    fn dir_of(&self, path: &str) -> PathBuf {
        let rel = path.strip_prefix(self.root.as_str()).unwrap_or(path);
        self.point.join(rel.trim_start_matches('/'))
    }
}

/// The cgroup mounts of `/proc/self/mountinfo`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            let fstype = post.next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let _source = post.next()?;
            let options = post.next().unwrap_or("").split(',').map(str::to_string);
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: PathBuf::from(unescape(pre.get(4)?)),
                fstype: fstype.to_string(),
                options: options.collect(),
            })
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_lines() {
        let own = parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n0::/system.slice/x\n");
        assert_eq!(own[0], (vec!["memory".to_string()], "/a/b".to_string()));
        assert_eq!(own[1].0, vec!["cpu".to_string(), "cpuacct".to_string()]);
        assert_eq!(own[2], (vec![String::new()], "/system.slice/x".to_string()));
    }

    #[test]
    fn mountinfo_cgroup_mounts() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    32 31 0:29 /ns /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct\n\
                    41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].options, vec!["rw", "memory"]);
        assert_eq!(m[0].dir_of("/a/b"), Path::new("/sys/fs/cgroup/memory/a/b"));
        assert_eq!(m[0].dir_of("/"), Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(
            m[1].dir_of("/ns/x"),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/x")
        );
        assert!(m[1].options.iter().any(|o| o == "cpu"));
        assert_eq!(m[2].fstype, "cgroup2");
        assert_eq!(m[2].point, Path::new("/sys/fs/cgroup/uni fied"));
    }

    #[test]
    fn oom_kill_counts() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\n"), None);
        assert_eq!(oom_kills(Some(Path::new("/nonexistent/memory.events"))), 0);
        assert_eq!(oom_kills(None), 0);
    }

    /// The v2 steps on this host's real unified hierarchy, with the one controller it
    /// has there (hugetlb; memory, pids and cpu are on v1 here): a supervisor in a cgroup
    /// of its own moves into the leaf, enables the controller below, and a child placed
    /// with [`Placement::join`] lands in its VM cgroup. Needs root and a cgroup2 mount
    /// offering hugetlb; says so and passes without.
    #[test]
    fn v2_leaf_move_and_placement_on_a_real_unified_hierarchy() {
        let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
        let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") else {
            eprintln!("no cgroup2 mount: v2 test not run");
            return;
        };
        let root = m.point.clone();
        let has = |f: &str| {
            fs::read_to_string(root.join(f))
                .unwrap_or_default()
                .split_whitespace()
                .any(|c| c == "hugetlb")
        };
        if !nix::unistd::geteuid().is_root() || !has("cgroup.controllers") {
            eprintln!("not root, or no hugetlb on cgroup2: v2 test not run");
            return;
        }
        // The root cgroup may have processes and still enable controllers. Left enabled
        // (harmless): turning it off again would race with another run of this test.
        if !has("cgroup.subtree_control") {
            fs::write(root.join("cgroup.subtree_control"), "+hugetlb").unwrap();
        }
        // What Delegate=yes gives the service: a cgroup holding only the supervisor.
        let own = root.join(format!("vmm-fleet-unit-{}", std::process::id()));
        make_dir(&own).unwrap();
        let join = Placement {
            procs: vec![CString::new(own.join("cgroup.procs").as_os_str().as_bytes()).unwrap()],
        };
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "supervisor::cgroup::tests::v2_supervisor_half",
            "--nocapture",
        ])
        .env("VMM_FLEET_V2_OWN", &own);
        // SAFETY: Placement::join is async-signal-safe (open, write, close).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || join.join());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let _ = fs::remove_dir(own.join(V2_LEAF));
        let _ = fs::remove_dir(&own);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("V2-HALF-DONE"), "{text}");
        assert!(!own.exists());
    }

    /// The supervisor's half of the test above, in a process of its own (it moves
    /// itself); does nothing when run on its own.
    #[test]
    fn v2_supervisor_half() {
        let Some(own) = std::env::var_os("VMM_FLEET_V2_OWN").map(PathBuf::from) else {
            return;
        };
        let own_rel = |pid: &str| {
            fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                .unwrap()
        };
        assert!(own.ends_with(own_rel("self").trim_start_matches('/')));
        let h = v2_hierarchy(&own, "vmm-fleet-t", &["hugetlb"], "hugetlb").unwrap();
        // Out of `own`, into its leaf; the controller enabled below `own` and the fleet.
        assert!(
            own_rel("self").ends_with("/supervisor"),
            "{}",
            own_rel("self")
        );
        let enabled = |d: &Path| fs::read_to_string(d.join("cgroup.subtree_control")).unwrap();
        assert!(enabled(&own).contains("hugetlb"));
        assert!(enabled(&h.fleet_dir).contains("hugetlb"));
        // A child placed in a VM cgroup between fork and exec.
        let vm = h.fleet_dir.join("vm-x");
        make_dir(&vm).unwrap();
        assert!(vm.join("hugetlb.2MB.max").exists());
        let mut child = sleep_in(&vm, 30);
        let rel = own_rel(&child.id().to_string());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(rel.ends_with("/vmm-fleet-t/vm-x"), "{rel}");
        let mut dirs = vec![vm, h.fleet_dir];
        assert!(try_remove(&mut dirs), "{dirs:?}");
        println!("V2-HALF-DONE");
    }

    /// `place` writes the pid to every hierarchy's `cgroup.procs` and names the file it
    /// could not write.
    #[test]
    fn place_writes_the_pid_to_every_hierarchy_and_names_a_missing_file() {
        let base =
            std::env::temp_dir().join(format!("vmm-fleet-cgroup-place-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let dirs = [base.join("memory"), base.join("pids")];
        let procs: Vec<PathBuf> = dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        for (d, p) in dirs.iter().zip(&procs) {
            fs::create_dir_all(d).unwrap();
            fs::write(p, "").unwrap();
        }
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let placement = Placement {
            procs: procs.iter().map(|p| c(p)).collect(),
        };
        placement.place(4242).unwrap();
        for p in &procs {
            assert_eq!(fs::read_to_string(p).unwrap(), "4242");
        }
        let missing = base.join("cpu").join("cgroup.procs");
        let broken = Placement {
            procs: vec![c(&procs[0]), c(&missing)],
        };
        let e = broken.place(7).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
        let _ = fs::remove_dir_all(&base);
    }

    /// `sleep secs`, placed in cgroup `dir` by itself between fork and exec.
    fn sleep_in(dir: &Path, secs: u32) -> std::process::Child {
        let p = Placement {
            procs: vec![CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap()],
        };
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg(secs.to_string());
        // SAFETY: Placement::join is async-signal-safe (open, write, close).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || p.join());
        }
        cmd.spawn().unwrap()
    }

    fn spec(yaml: &str) -> VmSpec {
        VmSpec::from_yaml(
            &format!("name: a\nkernel: builtin\n{yaml}"),
            Path::new("/x/a.yaml"),
        )
        .unwrap()
    }

    /// A fleet whose "hierarchies" are plain directories: the values written, checked
    /// without a cgroup file system (files absent there are created by the writes).
    fn fake(
        tag: &str,
        version: Version,
        controllers: &[Vec<&'static str>],
    ) -> (FleetCgroups, PathBuf) {
        let base = std::env::temp_dir().join(format!(
            "vmm-fleet-cgroup-unit-{}-{tag}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&base);
        let hierarchies = controllers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let fleet_dir = base.join(i.to_string());
                fs::create_dir_all(&fleet_dir).unwrap();
                Hierarchy {
                    fleet_dir,
                    controllers: c.clone(),
                }
            })
            .collect();
        let mut c = FleetCgroups::disabled();
        c.version = version;
        c.hierarchies = hierarchies;
        (c, base)
    }

    #[test]
    fn limits_written_on_v1_and_v2() {
        let get = |p: PathBuf| fs::read_to_string(p).unwrap();
        let (mut c, base) = fake(
            "v1",
            Version::V1,
            &[vec!["memory"], vec!["pids"], vec!["cpu"]],
        );
        let p = c
            .prepare(&spec("vcpus: 3\nmemory_mib: 48\ncpu_quota: 0.5\n"), 16)
            .unwrap()
            .unwrap();
        assert_eq!(
            get(base.join("0/vm-a/memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        // Written only where the kernel has them.
        assert!(!base.join("0/vm-a/memory.oom_control").exists());
        assert_eq!(get(base.join("1/vm-a/pids.max")), "35");
        assert_eq!(get(base.join("2/vm-a/cpu.cfs_quota_us")), "50000");
        assert_eq!(get(base.join("2/vm-a/cpu.cfs_period_us")), "100000");
        assert!(!base.join("0/vm-a/memory.memsw.limit_in_bytes").exists());
        assert!(!base.join("0/vm-a/memory.swap.max").exists());
        assert_eq!(p.procs.len(), 3);
        assert!(
            p.procs[1]
                .to_str()
                .unwrap()
                .ends_with("/1/vm-a/cgroup.procs")
        );
        fs::remove_dir_all(&base).unwrap();

        let (mut c, base) = fake("v2", Version::V2, &[vec!["memory", "pids", "cpu"]]);
        c.prepare(&spec("vcpus: 1\nmemory_mib: 8\n"), 0).unwrap();
        assert_eq!(
            get(base.join("0/vm-a/memory.max")),
            (8u64 << 20).to_string()
        );
        assert_eq!(get(base.join("0/vm-a/pids.max")), "33");
        assert_eq!(get(base.join("0/vm-a/cpu.max")), "max 100000");
        // A tiny quota is raised to the kernel's 1 ms minimum.
        c.prepare(&spec("vcpus: 1\nmemory_mib: 8\ncpu_quota: 0.001\n"), 0)
            .unwrap();
        assert_eq!(get(base.join("0/vm-a/cpu.max")), "1000 100000");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_failed_prepare_leaves_nothing_unaccounted() {
        let (mut c, base) = fake("failed", Version::V1, &[vec!["memory"], vec!["pids"]]);
        // The second hierarchy is gone: the first one's directory was made already.
        fs::remove_dir(base.join("1")).unwrap();
        assert!(c.prepare(&spec("vcpus: 1\nmemory_mib: 8\n"), 0).is_err());
        assert!(base.join("0/vm-a").is_dir());
        // Files in a plain directory keep it from being removed, like a busy cgroup.
        assert!(c.exited("a", Instant::now()).is_none());
        assert_eq!(c.leftovers.len(), 1);
        assert!(c.next_deadline().is_some());
        fs::remove_dir_all(base.join("0/vm-a")).unwrap();
        c.on_timer(Instant::now() + REMOVE_RETRY);
        assert!(c.leftovers.is_empty() && c.next_deadline().is_none());
        assert!(c.remove_all().is_empty());
        assert!(!base.join("0").exists());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn members_are_killed_when_their_vm_is_gone_never_while_it_runs() {
        let (mut c, base) = fake("members", Version::V1, &[vec!["memory"]]);
        c.prepare(&spec("vcpus: 1\nmemory_mib: 8\n"), 0).unwrap();
        let mut member = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        // A plain file stands for the cgroup's member list.
        let procs = base.join("0/vm-a/cgroup.procs");
        fs::write(&procs, format!("{}\n", member.id())).unwrap();
        // Dropped (as on a panic) while the VM runs: its processes are left alone.
        let live = std::mem::take(&mut c.live);
        let mut other = FleetCgroups::disabled();
        other.live = live;
        drop(other);
        assert!(member.try_wait().unwrap().is_none(), "a live VM was killed");
        c.prepare(&spec("vcpus: 1\nmemory_mib: 8\n"), 0).unwrap();
        fs::write(&procs, format!("{}\n", member.id())).unwrap();
        c.exited("a", Instant::now());
        let status = member.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn members_of_a_real_v2_cgroup_are_killed_through_cgroup_kill() {
        let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
        let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") else {
            eprintln!("no cgroup2 mount: v2 kill test not run");
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: v2 kill test not run");
            return;
        }
        let dir = m
            .point
            .join(format!("vmm-fleet-kill-unit-{}", std::process::id()));
        make_dir(&dir).unwrap();
        let mut child = sleep_in(&dir, 60);
        assert_eq!(kill_members(Version::V2, std::slice::from_ref(&dir)), 1);
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        let mut dirs = vec![dir];
        let deadline = Instant::now() + Duration::from_secs(5);
        while !try_remove(&mut dirs) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(dirs.is_empty(), "{dirs:?}");
    }

    #[test]
    fn disabled_cgroups_place_nothing() {
        let mut c = FleetCgroups::disabled();
        assert!(!c.enabled());
        let spec = VmSpec::from_yaml(
            "name: a\nvcpus: 1\nmemory_mib: 8\nkernel: builtin\n",
            Path::new("/x/a.yaml"),
        )
        .unwrap();
        assert!(c.prepare(&spec, 64).unwrap().is_none());
        assert!(c.exited("a", Instant::now()).is_none());
        assert!(c.remove_all().is_empty());
    }
}
