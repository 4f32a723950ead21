//! Fleet-wide settings (`fleet.yaml`: log directory, metrics address, stop and startup
//! timings, memory overcommit, per-VM `defaults:`) and loading a whole fleet with them.
//!
//! The settings file is checked key by key (not with one serde pass), so that every bad
//! key is reported together, each with its file, dotted key and, when it can be found in
//! the text, its line.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::validate::{self, Defaults};
use super::{ConfigError, Problem, VmSpec};

/// Name of the optional settings file in a fleet directory; never read as a VM file.
pub const SETTINGS_FILE: &str = "fleet.yaml";
/// Default of `metrics_address`.
pub const DEFAULT_METRICS_ADDRESS: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9464,
));
/// Default of `stop_grace_s`.
pub const DEFAULT_STOP_GRACE_S: u64 = 10;
/// Accepted range of `stop_grace_s`.
pub const STOP_GRACE_S_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;
/// Default of `startup_settle_ms`.
pub const DEFAULT_STARTUP_SETTLE_MS: u64 = 500;
/// Accepted range of `startup_settle_ms`.
pub const STARTUP_SETTLE_MS_RANGE: std::ops::RangeInclusive<u64> = 0..=60_000;
/// Default of `console_max_mib`.
pub const DEFAULT_CONSOLE_MAX_MIB: u64 = 16;
/// Accepted range of `console_max_mib`.
pub const CONSOLE_MAX_MIB_RANGE: std::ops::RangeInclusive<u64> = 1..=4096;
/// Default of `console_rate_kib_s`: far above a heartbeat (16 bytes a second) or a
/// kernel's chatter once booted (its boot log passes in the burst of 16 s of the rate),
/// below a guest writing its UART in a loop (30-125 KB/s here, where a port-I/O exit
/// costs ~8 us).
pub const DEFAULT_CONSOLE_RATE_KIB_S: u64 = 16;
/// Accepted range of `console_rate_kib_s`.
pub const CONSOLE_RATE_KIB_S_RANGE: std::ops::RangeInclusive<u64> = 1..=1_048_576;

/// Default of `cgroup_overhead_mib`.
pub const DEFAULT_CGROUP_OVERHEAD_MIB: u64 = 64;
/// Accepted range of `cgroup_overhead_mib`.
pub const CGROUP_OVERHEAD_MIB_RANGE: std::ops::RangeInclusive<u64> = 0..=65_536;

/// Validated fleet-wide settings: the contents of the settings file, or the defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FleetSettings {
    /// Where per-VM console and log files go (`log_dir`; relative paths resolve against
    /// the settings file's directory; default chosen by the caller). It exists or its
    /// parent directory does.
    pub log_dir: PathBuf,
    /// Address of the `/metrics` endpoint (`metrics_address`, default `127.0.0.1:9464`).
    pub metrics_address: SocketAddr,
    /// How long a stopped VM's guest gets to shut down after Ctrl-Alt-Del before the
    /// hard stop (for a child without a control channel: from SIGTERM to SIGKILL)
    /// (`stop_grace_s`, 1..=3600, default 10 s).
    pub stop_grace: Duration,
    /// `memory_overcommit: true` disables the "total memory beyond the host's" check.
    pub memory_overcommit: bool,
    /// A child alive this long counts as running (`startup_settle_ms`, 0..=60000, default
    /// 500 ms).
    pub startup_settle: Duration,
    /// Defaults for every VM (`defaults:`, any VM key but `name`), with invalid entries
    /// left out and relative `kernel`, `initrd` and `console` paths made absolute against
    /// the settings file's directory. `None` when the file has no `defaults:`.
    pub defaults: Option<Mapping>,
    /// The settings file these were read from (as given), `None` for built-in defaults.
    pub source: Option<PathBuf>,
    /// The user every VM child runs as (`vm_user`), resolved when the settings are
    /// loaded. `None`: children keep the supervisor's own user (it is not root, or
    /// `vm_user` names that user). As root the default is `vmm-fleet` when that user
    /// exists, else `nobody`; never root unless `vm_user: root` is written out.
    pub vm_user: Option<VmUser>,
    /// Size cap of each VM's console and log file, in MiB (`console_max_mib`, 1..=4096,
    /// default 16): at the cap the file is renamed to `.1` and a new one started.
    pub console_max_mib: u64,
    /// Rate limit of each VM's console + log output, in KiB/s (`console_rate_kib_s`,
    /// 1..=1048576, default 16); bytes beyond it are dropped and counted.
    pub console_rate_kib_s: u64,
    /// Memory a VM's process may use beyond its guest memory before its cgroup's OOM
    /// killer acts (`cgroup_overhead_mib`, 0..=65536, default 64 MiB): the VMM's own code,
    /// heap, stacks and page tables.
    pub cgroup_overhead_mib: u64,
    /// `seccomp: on|off` (default on): whether every thread of each VM child runs under
    /// its seccomp filter; `off` is for debugging a VMM only.
    pub seccomp: bool,
}

/// A resolved `vm_user`: the ids a VM child drops to before its guest runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmUser {
    /// The user name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// The gid of group `kvm` when the host has one: the child's only supplementary group.
    pub kvm_gid: Option<u32>,
    /// Whether `vm_user` was written out (else it is the default).
    pub explicit: bool,
}

impl VmUser {
    /// Look up `name` in the user database (`None` when there is no such user).
    pub fn lookup(name: &str, explicit: bool) -> Result<Option<VmUser>, String> {
        let user = nix::unistd::User::from_name(name).map_err(|e| e.to_string())?;
        let kvm_gid = nix::unistd::Group::from_name("kvm")
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        Ok(user.map(|u| VmUser {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            kvm_gid,
            explicit,
        }))
    }

    /// The default when `vm_user` is not written: as root, `vmm-fleet` when it exists,
    /// else `nobody`; `None` when this process is not root (children keep its user) or
    /// neither user exists (reported by the loader).
    pub fn default_for_this_process() -> Option<VmUser> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        ["vmm-fleet", "nobody"]
            .into_iter()
            .find_map(|n| VmUser::lookup(n, false).ok().flatten())
    }

    /// A line for the log saying whom VM children run as.
    pub fn describe(user: Option<&VmUser>) -> String {
        match user {
            None => format!(
                "VM children run as this process's user (uid {})",
                nix::unistd::geteuid()
            ),
            Some(u) => format!(
                "VM children run as user {} (uid {}, gid {}{}){}{}",
                u.name,
                u.uid,
                u.gid,
                u.kvm_gid
                    .map_or(", no kvm group on this host".to_string(), |g| format!(
                        ", supplementary group kvm ({g})"
                    )),
                if u.explicit { "" } else { " by default" },
                // nobody is shared with other daemons: any of them may signal the VMs
                // (seccomp only stops the VMs themselves from signalling anyone).
                if u.name == "nobody" {
                    "; every other process running as nobody may signal these VMs: \
                     create the system user vmm-fleet or set vm_user to a user of their own"
                } else {
                    ""
                }
            ),
        }
    }
}

impl FleetSettings {
    /// The settings used when there is no settings file; `default_log_dir` is the caller's
    /// choice (e.g. `/var/log/vmm-fleet` when running as root).
    pub fn defaults(default_log_dir: PathBuf) -> Self {
        Self {
            log_dir: default_log_dir,
            metrics_address: DEFAULT_METRICS_ADDRESS,
            stop_grace: Duration::from_secs(DEFAULT_STOP_GRACE_S),
            memory_overcommit: false,
            startup_settle: Duration::from_millis(DEFAULT_STARTUP_SETTLE_MS),
            defaults: None,
            source: None,
            vm_user: VmUser::default_for_this_process(),
            console_max_mib: DEFAULT_CONSOLE_MAX_MIB,
            console_rate_kib_s: DEFAULT_CONSOLE_RATE_KIB_S,
            cgroup_overhead_mib: DEFAULT_CGROUP_OVERHEAD_MIB,
            seccomp: true,
        }
    }

    /// Load `path` if it exists (Ok(defaults) if it does not), reporting every problem.
    ///
    /// A path that exists but cannot be read (a directory, no permission) is a problem.
    pub fn load(path: &Path, default_log_dir: PathBuf) -> Result<Self, ConfigError> {
        let loaded = read_settings(path, false, default_log_dir);
        if loaded.problems.is_empty() {
            Ok(loaded.settings)
        } else {
            Err(ConfigError::from_problems(loaded.problems))
        }
    }

    /// Parses and validates one VM file with these settings' `defaults` applied (see
    /// [`validate::check_with`] for the merge rules).
    pub fn load_vm(&self, path: &Path) -> Result<VmSpec, ConfigError> {
        let text = super::read_checked(path)?;
        self.vm_from_yaml(&text, path)
    }

    /// Like [`FleetSettings::load_vm`] for YAML text read as if from `path`.
    pub fn vm_from_yaml(&self, text: &str, path: &Path) -> Result<VmSpec, ConfigError> {
        let defaults = self
            .typed_defaults()
            .map_err(|p| ConfigError::from_problems(vec![p]))?;
        let checked = validate::check_with(text, path, defaults.as_ref());
        match checked.spec {
            Some(spec) if checked.problems.is_empty() => Ok(spec),
            _ => Err(ConfigError::from_problems(checked.problems)),
        }
    }

    fn typed_defaults(&self) -> Result<Option<Defaults>, Problem> {
        self.defaults
            .as_ref()
            .map(|m| Defaults::from_mapping(m, self.source.as_deref()))
            .transpose()
    }
}

/// Everything `up`/`validate` need: settings (DIR/fleet.yaml or `settings_path`) + every VM, all problems from both reported together.
///
/// A directory without VM files is an empty fleet, not an error.
/// `settings_path`, when given, must exist (a missing explicit file is a problem) and
/// replaces `DIR/fleet.yaml`, which is then ignored. VM files are those of
/// [`config_files`](super::config_files); each gets the settings' `defaults`. Cross-file
/// checks as in [`load_dir`](super::load_dir); the total-memory check runs only when
/// `host_memory_mib` is `Some` and `memory_overcommit` is false.
pub fn load_fleet(
    dir: &Path,
    settings_path: Option<&Path>,
    default_log_dir: PathBuf,
    host_memory_mib: Option<u64>,
) -> Result<(FleetSettings, Vec<VmSpec>), ConfigError> {
    // No VM file is a valid, empty fleet (a fresh install: the example ships disabled).
    let files = super::config_files(dir)?;
    let loaded = match settings_path {
        Some(p) => read_settings(p, true, default_log_dir),
        None => read_settings(&dir.join(SETTINGS_FILE), false, default_log_dir),
    };
    let mut problems = loaded.problems;
    let defaults = match loaded.settings.typed_defaults() {
        Ok(d) => d,
        Err(p) => {
            problems.push(p);
            None
        }
    };
    let log_dir = &loaded.settings.log_dir;
    if let Err(why) = super::files::check_log_dir(log_dir) {
        let file = loaded.settings.source.as_deref().unwrap_or(dir);
        let why = format!("{}: {why}", log_dir.display());
        problems.push(Problem::new(file, "log_dir", why));
    }
    let specs = super::load_vms(files, defaults.as_ref(), &mut problems);
    for spec in &specs {
        if let super::ConsoleSpec::File(path) = &spec.console
            && !inside(path, log_dir)
        {
            problems.push(Problem::new(
                &spec.source,
                "console",
                format!(
                    "{}: outside the log directory {}: under `up` the supervisor writes a \
                     guest's console only there (a file elsewhere, e.g. in /etc/cron.d, \
                     would hand the guest whatever reads it); use `console: stdout` \
                     (LOG_DIR/NAME.console) or a file in the log directory",
                    path.display(),
                    log_dir.display()
                ),
            ));
        }
    }
    if let Some(avail) = host_memory_mib
        && !loaded.settings.memory_overcommit
        && !loaded.overcommit_invalid
    {
        let hint = "; set `memory_overcommit: true` in the fleet settings to allow it";
        super::check_total_memory(dir, &specs, avail, hint, &mut problems);
    }
    if problems.is_empty() {
        Ok((loaded.settings, specs))
    } else {
        Err(ConfigError::from_problems(problems))
    }
}

/// Is `path` lexically inside `dir` (no `..` anywhere, both made absolute)? The log
/// directory is the fleet's own (not writable by others), so no one else can put a
/// symlink on the way.
fn inside(path: &Path, dir: &Path) -> bool {
    use std::path::Component;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (path, dir) = (abs(path), abs(dir));
    let no_dots = |p: &Path| !p.components().any(|c| c == Component::ParentDir);
    no_dots(&path) && no_dots(&dir) && path.starts_with(&dir) && path != dir
}

/// The settings file as written: each key is deserialized on its own, so all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    log_dir: Option<String>,
    #[serde(default)]
    metrics_address: Option<String>,
    #[serde(default)]
    stop_grace_s: Option<i64>,
    #[serde(default)]
    memory_overcommit: Option<bool>,
    #[serde(default)]
    startup_settle_ms: Option<i64>,
    #[serde(default)]
    defaults: Option<Value>,
    #[serde(default)]
    vm_user: Option<String>,
    #[serde(default)]
    console_max_mib: Option<i64>,
    #[serde(default)]
    console_rate_kib_s: Option<i64>,
    #[serde(default)]
    cgroup_overhead_mib: Option<i64>,
    seccomp: Option<Value>,
}

/// Outcome of reading a settings file.
struct Loaded {
    /// The settings; fields with problems keep their defaults.
    settings: FleetSettings,
    /// `memory_overcommit` was given but is invalid (so the memory check is skipped).
    overcommit_invalid: bool,
    problems: Vec<Problem>,
}

/// Reads and checks the settings file `path`; a missing file gives the defaults unless
/// `must_exist`.
fn read_settings(path: &Path, must_exist: bool, default_log_dir: PathBuf) -> Loaded {
    let mut loaded = Loaded {
        settings: FleetSettings::defaults(default_log_dir),
        overcommit_invalid: false,
        problems: Vec::new(),
    };
    let absent = matches!(path.symlink_metadata(), Err(e) if e.kind() == ErrorKind::NotFound);
    if must_exist || !absent {
        match super::files::read_config(path) {
            Ok(text) => {
                loaded.settings.source = Some(path.to_path_buf());
                parse_settings(&text, path, &mut loaded);
            }
            Err(why) => loaded
                .problems
                .push(Problem::new(path, "", format!("cannot read: {why}"))),
        }
    }
    if loaded.settings.vm_user.is_none() && nix::unistd::geteuid().is_root() {
        loaded.problems.push(Problem::new(
            path,
            "vm_user",
            "not set, and this host has neither a `vmm-fleet` nor a `nobody` user: name \
             the unprivileged user VM children run as (`vm_user: root` keeps root)",
        ));
    }
    loaded
}

fn parse_settings(text: &str, file: &Path, loaded: &mut Loaded) {
    let mut problems = Vec::new();
    let mut problem = |key: &str, reason: String| {
        let segments: Vec<&str> = key.split('.').collect();
        problems.push(Problem::new(
            file,
            key,
            validate::with_line(reason, text, &segments),
        ));
    };
    let map = match super::files::parse_bounded(text) {
        Err(e) => {
            loaded.problems.push(validate::parse_problem(&e, file));
            return;
        }
        Ok(Value::Null) => return,
        Ok(Value::Mapping(m)) => m,
        Ok(other) => {
            problem(
                "",
                format!(
                    "expected a mapping of fleet settings, found {}",
                    validate::describe(&other)
                ),
            );
            loaded.problems.append(&mut problems);
            return;
        }
    };

    let raw = collect_raw(&map, &mut problem, &mut loaded.overcommit_invalid);
    let s = &mut loaded.settings;
    let base = validate::base_dir(file);
    apply_ranges(&raw, s, &mut problem);
    if let Some(dir) = raw.log_dir {
        if dir.is_empty() {
            problem("log_dir", "must not be empty".to_string());
        } else {
            let path = base.join(&dir);
            match creatable_dir(&path) {
                Ok(()) => s.log_dir = path,
                Err(why) => problem("log_dir", format!("{}: {why}", path.display())),
            }
        }
    }
    if let Some(addr) = raw.metrics_address {
        match addr.parse::<SocketAddr>() {
            Ok(a) => s.metrics_address = a,
            Err(_) => problem(
                "metrics_address",
                format!(
                    "`{addr}` is not an IP address and port like 127.0.0.1:9464 \
                     (quote IPv6 ones: \"[::1]:9464\")"
                ),
            ),
        }
    }
    if let Some(b) = raw.memory_overcommit {
        s.memory_overcommit = b;
    }
    if let Some(name) = raw.vm_user {
        match resolve_vm_user(&name) {
            Ok(u) => s.vm_user = u,
            Err(why) => problem("vm_user", why),
        }
    }
    if let Some(v) = raw.seccomp {
        match on_off(&v) {
            Some(on) => s.seccomp = on,
            None => problem(
                "seccomp",
                match &v {
                    Value::String(s) => format!("expected on or off, found `{s}`"),
                    other => format!("expected on or off, found {}", validate::describe(other)),
                },
            ),
        }
    }
    match raw.defaults {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            let (kept, mut bad) = validate::check_defaults(&m, file, text);
            problems.append(&mut bad);
            s.defaults = Some(kept);
        }
        Some(other) => problem(
            "defaults",
            format!(
                "expected a mapping of VM settings, found {}",
                validate::describe(&other)
            ),
        ),
    }
    // Report in the file's order of keys.
    let position = |p: &Problem| {
        let top = p.key.split('.').next().unwrap_or("");
        map.keys().position(|k| k.as_str() == Some(top))
    };
    problems.sort_by_key(position);
    loaded.problems.append(&mut problems);
}

/// The settings of `map`, deserialized key by key so that every bad key is reported
/// (through `problem`); `overcommit_invalid` is set when `memory_overcommit` is bad.
fn collect_raw(
    map: &Mapping,
    problem: &mut impl FnMut(&str, String),
    overcommit_invalid: &mut bool,
) -> RawSettings {
    let mut raw = RawSettings::default();
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            problem(
                "",
                format!("keys must be strings, found {}", validate::describe(k)),
            );
            continue;
        };
        let one = Value::Mapping(Mapping::from_iter([(k.clone(), v.clone())]));
        match serde_yaml::from_value::<RawSettings>(one) {
            Err(e) => {
                if key == "memory_overcommit" {
                    *overcommit_invalid = true;
                }
                problem(key, validate::humanize(&e.to_string()));
            }
            Ok(r) => raw = raw.or(r),
        }
    }
    raw
}

impl RawSettings {
    /// Each key of `self`, else of `other`.
    fn or(self, other: RawSettings) -> RawSettings {
        RawSettings {
            log_dir: self.log_dir.or(other.log_dir),
            metrics_address: self.metrics_address.or(other.metrics_address),
            stop_grace_s: self.stop_grace_s.or(other.stop_grace_s),
            memory_overcommit: self.memory_overcommit.or(other.memory_overcommit),
            startup_settle_ms: self.startup_settle_ms.or(other.startup_settle_ms),
            defaults: self.defaults.or(other.defaults),
            vm_user: self.vm_user.or(other.vm_user),
            console_max_mib: self.console_max_mib.or(other.console_max_mib),
            console_rate_kib_s: self.console_rate_kib_s.or(other.console_rate_kib_s),
            cgroup_overhead_mib: self.cgroup_overhead_mib.or(other.cgroup_overhead_mib),
            seccomp: self.seccomp.or(other.seccomp),
        }
    }
}

/// The numeric settings of `raw` that must lie in a range, into `s`; one out of range
/// is reported through `problem` and keeps its default.
fn apply_ranges(raw: &RawSettings, s: &mut FleetSettings, problem: &mut impl FnMut(&str, String)) {
    let mut range = |key: &str, v: i64, r: &std::ops::RangeInclusive<u64>| -> Option<u64> {
        match u64::try_from(v) {
            Ok(v) if r.contains(&v) => Some(v),
            _ => {
                problem(
                    key,
                    format!("{v} is out of range, must be {}..={}", r.start(), r.end()),
                );
                None
            }
        }
    };
    if let Some(v) = raw
        .stop_grace_s
        .and_then(|v| range("stop_grace_s", v, &STOP_GRACE_S_RANGE))
    {
        s.stop_grace = Duration::from_secs(v);
    }
    if let Some(v) = raw
        .startup_settle_ms
        .and_then(|v| range("startup_settle_ms", v, &STARTUP_SETTLE_MS_RANGE))
    {
        s.startup_settle = Duration::from_millis(v);
    }
    if let Some(v) = raw
        .console_max_mib
        .and_then(|v| range("console_max_mib", v, &CONSOLE_MAX_MIB_RANGE))
    {
        s.console_max_mib = v;
    }
    if let Some(v) = raw
        .console_rate_kib_s
        .and_then(|v| range("console_rate_kib_s", v, &CONSOLE_RATE_KIB_S_RANGE))
    {
        s.console_rate_kib_s = v;
    }
    if let Some(v) = raw
        .cgroup_overhead_mib
        .and_then(|v| range("cgroup_overhead_mib", v, &CGROUP_OVERHEAD_MIB_RANGE))
    {
        s.cgroup_overhead_mib = v;
    }
}

/// Resolve a written `vm_user`: an existing user; when this process is not root, only
/// its own user (it cannot switch to another), which resolves to `None` (nothing to drop).
fn resolve_vm_user(name: &str) -> Result<Option<VmUser>, String> {
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    let user = VmUser::lookup(name, true)
        .map_err(|e| format!("cannot look up user `{name}`: {e}"))?
        .ok_or_else(|| format!("no user `{name}` on this host"))?;
    let me = nix::unistd::geteuid();
    if me.is_root() {
        return Ok(Some(user));
    }
    if user.uid == me.as_raw() {
        return Ok(None);
    }
    Err(format!(
        "`{name}` (uid {}): the supervisor runs as uid {me}, not root, so VM children can \
         only run as its own user; remove vm_user or run the supervisor as root",
        user.uid
    ))
}

/// `on`/`off` (YAML 1.2 reads them as strings), or a boolean.
fn on_off(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "on" => Some(true),
        Value::String(s) if s == "off" => Some(false),
        _ => None,
    }
}

/// Can `dir` be used as a log directory: it is one, or its parent is one?
fn creatable_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err("exists and is not a directory".to_string()),
        Err(e) if e.kind() == ErrorKind::NotFound => match dir.parent() {
            Some(parent) if parent.is_dir() => Ok(()),
            Some(parent) => Err(format!(
                "does not exist, and neither does its parent directory {}",
                parent.display()
            )),
            None => Err("does not exist".to_string()),
        },
        Err(e) => Err(e.to_string()),
    }
}
