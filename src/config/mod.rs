//! VM configuration: the per-VM YAML schema ([`VmSpec`]), loading one file or a directory,
//! and the optional fleet-wide settings file ([`FleetSettings`], [`load_fleet`]).
//!
//! One YAML file describes one VM; `fleet.yaml` in the same directory (never a VM file)
//! holds fleet-wide settings and per-VM defaults. Parsing and validation live in
//! [`validate`], the settings in `fleet.rs`; this module owns the validated types, the
//! error type and the directory loader. Every problem found is reported with its file
//! and dotted key, not just the first one.
//!
//! This module imports nothing else of the crate.

pub mod files;
mod fleet;
pub mod validate;

pub use fleet::{
    CGROUP_OVERHEAD_MIB_RANGE, CONSOLE_MAX_MIB_RANGE, CONSOLE_RATE_KIB_S_RANGE,
    DEFAULT_CGROUP_OVERHEAD_MIB, DEFAULT_CONSOLE_MAX_MIB, DEFAULT_CONSOLE_RATE_KIB_S,
    DEFAULT_METRICS_ADDRESS, DEFAULT_STARTUP_SETTLE_MS, DEFAULT_STOP_GRACE_S, FleetSettings,
    SETTINGS_FILE, STARTUP_SETTLE_MS_RANGE, STOP_GRACE_S_RANGE, VmUser, load_fleet,
};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default kernel command line when `cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Longest accepted kernel command line, in bytes: Linux takes 2047 plus the NUL; this
/// leaves room for the options the built-in guest is given after it.
pub const MAX_CMDLINE_LEN: usize = 1920;
/// Longest accepted VM name, in characters.
pub const MAX_NAME_LEN: usize = 64;
/// Smallest accepted guest memory size, in MiB.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Largest vCPU count accepted by the config: what an MP table can describe (KVM's own
/// limit is checked at run time).
pub const MAX_VCPUS: u8 = 254;
/// Largest guest memory accepted by the config, in MiB (16 TiB); the host's own memory
/// is checked at run time.
pub const MAX_MEMORY_MIB: u64 = 1 << 24;
/// Accepted range of `builtin.heartbeat_ms`.
pub const HEARTBEAT_MS_RANGE: std::ops::RangeInclusive<u32> = 1..=60_000;

/// A validated VM: the contents of one YAML file, with paths resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// VM name: 1..=64 chars of `[A-Za-z0-9._-]`, starting alphanumeric; unique in a fleet.
    pub name: String,
    /// Number of vCPUs (1..=255).
    pub vcpus: u8,
    /// Guest memory in MiB (>= 4).
    pub memory_mib: u64,
    /// The kernel to boot.
    pub kernel: KernelSpec,
    /// Optional initramfs (absolute path; never set with [`KernelSpec::Builtin`]).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (defaults to [`DEFAULT_CMDLINE`]).
    pub cmdline: String,
    /// Where the guest serial console goes.
    pub console: ConsoleSpec,
    /// Behaviour of the builtin guest (defaults when absent; only meaningful with
    /// [`KernelSpec::Builtin`]).
    pub builtin: BuiltinSpec,
    /// Restart policy used by the fleet supervisor (ignored by `run-vm`).
    pub restart: RestartSpec,
    /// The YAML file this spec was read from, as given to the loader.
    pub source: PathBuf,
    /// CPU time the VM may use, in CPUs (`cpu_quota`: `0.5` is half a core; > 0 and at
    /// most the host's CPU count); `None` (the default) is unlimited. The supervisor applies
    /// it through the VM's cgroup; it is not sent to the child, which has no use for it.
    #[serde(skip)]
    pub cpu_quota: Option<f64>,
}

/// Which kernel a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelSpec {
    /// The small guest program built into the VMM (`kernel: builtin`).
    Builtin,
    /// A bzImage or ELF vmlinux (absolute path, checked to be a readable regular file).
    Path(PathBuf),
}

/// Where the guest serial console output goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleSpec {
    /// The VMM's standard output (default).
    Stdout,
    /// Discarded.
    Off,
    /// Appended to this file (absolute path; its parent directory exists).
    File(PathBuf),
}

/// Behaviour of the builtin guest (`builtin:` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltinSpec {
    /// What the guest does after its I/O exits.
    pub then: BuiltinThen,
    /// How many I/O exits the guest performs first.
    pub io_exits: u64,
    /// Heartbeat period in milliseconds (1..=60000).
    pub heartbeat_ms: u32,
    /// What the guest does with bytes it receives on its UART (`console:`; only with
    /// `then: idle`). Absent on the wire from an older supervisor: quiet.
    #[serde(default)]
    pub console: BuiltinConsole,
}

/// What the builtin guest does with console input (`builtin.console`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinConsole {
    /// Reads nothing: input bytes wait in the UART's FIFO (default).
    #[default]
    Quiet,
    /// Every byte received on the UART is written back (a typed line appears on the
    /// console).
    Echo,
}

impl BuiltinConsole {
    /// The YAML spelling: `"quiet"` or `"echo"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BuiltinConsole::Quiet => "quiet",
            BuiltinConsole::Echo => "echo",
        }
    }
}

impl Default for BuiltinSpec {
    fn default() -> Self {
        Self {
            then: BuiltinThen::Poweroff,
            io_exits: 0,
            heartbeat_ms: 1000,
            console: BuiltinConsole::Quiet,
        }
    }
}

/// What the builtin guest does once it has performed its I/O exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinThen {
    /// Power the VM off (clean exit).
    Poweroff,
    /// Reset the VM.
    Reset,
    /// Crash (triple fault / error exit).
    Crash,
    /// Busy-loop forever.
    Spin,
    /// Halt-loop forever.
    Idle,
    /// Write to the UART in a loop, forever (a guest flooding its console).
    Flood,
}

impl BuiltinThen {
    /// Every variant, in declaration order.
    pub const ALL: [BuiltinThen; 6] = [
        BuiltinThen::Poweroff,
        BuiltinThen::Reset,
        BuiltinThen::Crash,
        BuiltinThen::Spin,
        BuiltinThen::Idle,
        BuiltinThen::Flood,
    ];

    /// The YAML spelling: `"poweroff"`, `"reset"`, `"crash"`, `"spin"`, `"idle"` or
    /// `"flood"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BuiltinThen::Poweroff => "poweroff",
            BuiltinThen::Reset => "reset",
            BuiltinThen::Crash => "crash",
            BuiltinThen::Spin => "spin",
            BuiltinThen::Idle => "idle",
            BuiltinThen::Flood => "flood",
        }
    }

    /// Parses the YAML spelling (inverse of [`BuiltinThen::as_str`]).
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for BuiltinThen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When the supervisor restarts a VM whose process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after every exit.
    Always,
    /// Restart only after a failure (default).
    #[default]
    OnFailure,
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// The YAML spelling: `"always"`, `"on-failure"` or `"never"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Restart settings (`restart:` section), used by the fleet supervisor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestartSpec {
    /// When to restart.
    pub policy: RestartPolicy,
    /// First backoff delay, in ms.
    pub backoff_initial_ms: u64,
    /// Largest backoff delay, in ms (>= `backoff_initial_ms`).
    pub backoff_max_ms: u64,
    /// Factor applied to the delay after each restart (finite, >= 1.0).
    pub backoff_multiplier: f64,
    /// At most this many starts within `start_limit_interval_s` (>= 1).
    pub start_limit_burst: u32,
    /// Window of the start limit, in seconds (>= 1).
    pub start_limit_interval_s: u64,
    /// Uptime in seconds after which the backoff resets.
    pub stable_after_s: u64,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::OnFailure,
            backoff_initial_ms: 100,
            backoff_max_ms: 30_000,
            backoff_multiplier: 2.0,
            start_limit_burst: 5,
            start_limit_interval_s: 60,
            stable_after_s: 10,
        }
    }
}

impl RestartSpec {
    /// `backoff_initial_ms` as a [`Duration`].
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.backoff_initial_ms)
    }

    /// `backoff_max_ms` as a [`Duration`].
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }

    /// `start_limit_interval_s` as a [`Duration`].
    pub fn start_limit_interval(&self) -> Duration {
        Duration::from_secs(self.start_limit_interval_s)
    }

    /// `stable_after_s` as a [`Duration`].
    pub fn stable_after(&self) -> Duration {
        Duration::from_secs(self.stable_after_s)
    }
}

/// One problem in one file: which file, which key, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The YAML file (or the directory, for fleet-wide problems such as total memory).
    pub file: PathBuf,
    /// Dotted key like `restart.backoff_max_ms`, or `""` for the whole file.
    pub key: String,
    /// Human-readable reason.
    pub reason: String,
}

impl Problem {
    /// Builds a problem.
    pub fn new(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Text from a file or a path name, shown on one line: control characters (a newline
/// in a file name or in a YAML value quoted by a parse error) are escaped, so one
/// problem is one log line and a file cannot forge lines of the supervisor's log.
struct OneLine<'a>(&'a str);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Problem {
    /// `{file}: {key}: {reason}`, or `{file}: {reason}` when the key is empty, on one
    /// line whatever the file name or the reason hold.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.to_string_lossy();
        if self.key.is_empty() {
            write!(f, "{}: {}", OneLine(&file), OneLine(&self.reason))
        } else {
            write!(
                f,
                "{}: {}: {}",
                OneLine(&file),
                OneLine(&self.key),
                OneLine(&self.reason)
            )
        }
    }
}

/// A list of problems displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemList(pub Vec<Problem>);

impl fmt::Display for ProblemList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration was read but is invalid; every problem found, one per line.
    #[error("{0}")]
    Problems(ProblemList),
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The directory holds no `*.yaml` / `*.yml` file.
    #[error("{}: no *.yaml files", dir.display())]
    NoConfigs {
        /// The directory.
        dir: PathBuf,
    },
}

impl ConfigError {
    /// The problems carried by [`ConfigError::Problems`] (empty for other variants).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Problems(list) => &list.0,
            _ => &[],
        }
    }

    fn from_problems(problems: Vec<Problem>) -> Self {
        ConfigError::Problems(ProblemList(problems))
    }
}

impl VmSpec {
    /// The validated spec as text, for handing to a VM child exactly as validated.
    pub fn to_wire(&self) -> Result<String, ConfigError> {
        serde_yaml::to_string(self).map_err(|e| {
            ConfigError::from_problems(vec![Problem::new(&self.source, "", e.to_string())])
        })
    }

    /// A spec from [`VmSpec::to_wire`] text (no validation: it was validated by the sender).
    pub fn from_wire(text: &str) -> Result<VmSpec, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| {
            ConfigError::from_problems(vec![Problem::new(
                "<spec from supervisor>",
                "",
                e.to_string(),
            )])
        })
    }

    /// Parses and validates one file; returns every problem found in it (not just the first).
    pub fn load(path: &Path) -> Result<VmSpec, ConfigError> {
        let text = read_checked(path)?;
        Self::from_yaml(&text, path)
    }

    /// Parses and validates YAML text as if read from `path` (relative paths in it resolve
    /// against `path`'s directory).
    pub fn from_yaml(text: &str, path: &Path) -> Result<VmSpec, ConfigError> {
        let checked = validate::check(text, path);
        match checked.spec {
            Some(spec) if checked.problems.is_empty() => Ok(spec),
            _ => Err(ConfigError::from_problems(checked.problems)),
        }
    }

    /// The directory relative paths of this spec were resolved against.
    pub fn base_dir(&self) -> PathBuf {
        validate::base_dir(&self.source)
    }
}

/// Reads a VM or settings file with the checks of [`files::read_config`]; a refusal is
/// one problem naming the file.
fn read_checked(path: &Path) -> Result<String, ConfigError> {
    if let Err(source) = path.symlink_metadata() {
        return Err(ConfigError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    files::read_config(path).map_err(|why| {
        ConfigError::from_problems(vec![Problem::new(path, "", format!("cannot read: {why}"))])
    })
}

/// Is `path` a VM config file by name (`*.yaml` / `*.yml`, not hidden, not
/// [`SETTINGS_FILE`])?
fn is_config_name(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.') || n == SETTINGS_FILE);
    let ext_ok = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    );
    ext_ok && !hidden
}

/// Lists the VM config files of `dir` (`*.yaml` / `*.yml`, hidden files and
/// [`SETTINGS_FILE`] skipped, not recursive), sorted by file name.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let io_err = |source| ConfigError::Io {
        path: dir.to_path_buf(),
        source,
    };
    files::check_config_dir(dir).map_err(|why| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why,
        ))
    })?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        if is_config_name(&path) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Loads every `*.yaml` / `*.yml` in `dir` (sorted by file name; not recursive; hidden
/// files and [`SETTINGS_FILE`] skipped), without fleet settings or defaults.
///
/// Reports every problem in every file (an unreadable file is a problem for that file),
/// plus cross-file ones: duplicate VM names (naming both files) and, only when
/// `check_host_memory` is `Some(avail_mib)`, a total `memory_mib` beyond it.
pub fn load_dir(dir: &Path, check_host_memory: Option<u64>) -> Result<Vec<VmSpec>, ConfigError> {
    let files = config_files(dir)?;
    if files.is_empty() {
        return Err(ConfigError::NoConfigs {
            dir: dir.to_path_buf(),
        });
    }
    let mut problems = Vec::new();
    let specs = load_vms(files, None, &mut problems);
    if let Some(avail) = check_host_memory {
        check_total_memory(dir, &specs, avail, "", &mut problems);
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(ConfigError::from_problems(problems))
    }
}

/// Checks every VM file of `files` (with `defaults` applied) and their names' uniqueness,
/// pushing every problem; returns the valid specs.
fn load_vms(
    files: Vec<PathBuf>,
    defaults: Option<&validate::Defaults>,
    problems: &mut Vec<Problem>,
) -> Vec<VmSpec> {
    let mut specs = Vec::new();
    // (name, file) of every file whose name was valid, for the duplicate check.
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for file in files {
        let text = match files::read_config(&file) {
            Ok(t) => t,
            Err(why) => {
                problems.push(Problem::new(&file, "", format!("cannot read: {why}")));
                continue;
            }
        };
        let checked = validate::check_with(&text, &file, defaults);
        problems.extend(checked.problems);
        if let Some(name) = checked.name {
            if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
                problems.push(Problem::new(
                    &file,
                    "name",
                    format!(
                        "duplicate VM name `{name}`, also used by {}",
                        first.display()
                    ),
                ));
            } else {
                names.push((name, file.clone()));
            }
        }
        if let Some(spec) = checked.spec {
            specs.push(spec);
        }
    }
    specs
}

/// Pushes a problem against `dir` when the VMs' total `memory_mib` exceeds `avail` MiB.
/// `hint` is appended to the reason.
fn check_total_memory(
    dir: &Path,
    specs: &[VmSpec],
    avail: u64,
    hint: &str,
    problems: &mut Vec<Problem>,
) {
    let total: u64 = specs
        .iter()
        .fold(0u64, |acc, s| acc.saturating_add(s.memory_mib));
    if total > avail {
        problems.push(Problem::new(
            dir,
            "memory_mib",
            format!(
                "total memory_mib of all VMs is {total} MiB, more than the {avail} MiB available on the host{hint}"
            ),
        ));
    }
}

#[cfg(test)]
mod tests;
