//! Parsing and validation of one VM file: collects every problem with its file and key.
//!
//! The YAML is first deserialized into raw structs (`deny_unknown_fields`, wide integer
//! types) so that serde only fails on *parse* errors (one per file: unknown key, wrong
//! type, missing key). Value ranges, path checks and cross-field rules are then checked
//! field by field, pushing a [`Problem`] for each, so they are all reported together.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    BuiltinSpec, BuiltinThen, ConsoleSpec, DEFAULT_CMDLINE, HEARTBEAT_MS_RANGE, KernelSpec,
    MAX_CMDLINE_LEN, MAX_NAME_LEN, MAX_VCPUS, MIN_MEMORY_MIB, Problem, RestartPolicy, RestartSpec,
    VmSpec,
};

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    vcpus: i64,
    memory_mib: i64,
    kernel: String,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    console: Option<String>,
    #[serde(default)]
    builtin: Option<RawBuiltin>,
    #[serde(default)]
    restart: Option<RawRestart>,
}

/// The `builtin:` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuiltin {
    #[serde(default)]
    then: Option<BuiltinThen>,
    #[serde(default)]
    io_exits: Option<u64>,
    #[serde(default)]
    heartbeat_ms: Option<i64>,
}

/// The `restart:` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    #[serde(default)]
    policy: Option<RestartPolicy>,
    #[serde(default)]
    backoff_initial_ms: Option<i64>,
    #[serde(default)]
    backoff_max_ms: Option<i64>,
    #[serde(default)]
    backoff_multiplier: Option<f64>,
    #[serde(default)]
    start_limit_burst: Option<i64>,
    #[serde(default)]
    start_limit_interval_s: Option<i64>,
    #[serde(default)]
    stable_after_s: Option<i64>,
}

/// Outcome of checking one file.
#[derive(Debug)]
pub struct Checked {
    /// The spec, when the file parsed and had no problem.
    pub spec: Option<VmSpec>,
    /// The VM name when it parsed and is valid (even if other fields are not), so the
    /// directory loader can still detect duplicate names.
    pub name: Option<String>,
    /// Every problem found in this file.
    pub problems: Vec<Problem>,
}

/// The directory relative paths in `source` resolve against (absolute when possible).
pub fn base_dir(source: &Path) -> PathBuf {
    let parent = match source.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
}

/// Parses and validates `text` as if read from `source`, collecting every problem.
pub fn check(text: &str, source: &Path) -> Checked {
    if matches!(
        serde_yaml::from_str::<serde_yaml::Value>(text),
        Ok(serde_yaml::Value::Null)
    ) {
        return Checked {
            spec: None,
            name: None,
            problems: vec![Problem::new(
                source,
                "",
                "empty file: expected a mapping with at least name, vcpus, memory_mib and kernel",
            )],
        };
    }
    let raw: RawVm = match serde_yaml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            return Checked {
                spec: None,
                name: None,
                problems: vec![parse_problem(&e, source)],
            };
        }
    };
    let mut v = Validator {
        file: source,
        base: base_dir(source),
        problems: Vec::new(),
    };
    let (spec, name) = v.spec(raw);
    let problems = v.problems;
    Checked {
        spec: problems.is_empty().then_some(spec),
        name,
        problems,
    }
}

/// Turns a serde_yaml error into a problem, extracting the dotted key when possible.
fn parse_problem(e: &serde_yaml::Error, file: &Path) -> Problem {
    let full = e.to_string();
    // serde_yaml appends " at line L column C" to its messages; we re-add it ourselves in
    // a uniform form, unless the message carries more positions (libyaml syntax errors).
    let suffix = e
        .location()
        .map(|l| format!(" at line {} column {}", l.line(), l.column()));
    let mut msg = match &suffix {
        Some(sfx) => full.strip_suffix(sfx.as_str()).unwrap_or(&full),
        None => full.as_str(),
    };
    // serde_yaml prefixes messages about nested values with their path (`restart: ...`).
    // Serde's own messages ("invalid type: ...") contain spaces before the colon; paths
    // in this schema never do.
    let mut key = String::new();
    if let Some((path, rest)) = msg.split_once(": ")
        && is_path(path)
    {
        key = path.to_string();
        msg = rest;
    }
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some((field, _)) = msg
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
        {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(field);
            break;
        }
    }
    let mut reason = humanize(msg);
    if let Some(loc) = e.location()
        && !reason.contains(" at line ")
    {
        reason.push_str(&format!(" (line {}, column {})", loc.line(), loc.column()));
    }
    Problem {
        file: file.to_path_buf(),
        key,
        reason,
    }
}

/// Replaces Rust type names in serde messages with words a config author knows.
fn humanize(msg: &str) -> String {
    [
        ("expected struct RawVm", "expected a mapping of VM settings"),
        ("expected struct RawBuiltin", "expected a mapping"),
        ("expected struct RawRestart", "expected a mapping"),
        ("expected i64", "expected an integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected f64", "expected a number"),
    ]
    .iter()
    .fold(msg.to_string(), |m, (from, to)| m.replace(from, to))
}

fn is_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-[]?".contains(c))
}

struct Validator<'a> {
    file: &'a Path,
    base: PathBuf,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, reason: impl Into<String>) {
        self.problems.push(Problem::new(self.file, key, reason));
    }

    /// Validates every field; the returned spec is only meaningful if no problem was
    /// pushed. Also returns the name when it is valid.
    fn spec(&mut self, raw: RawVm) -> (VmSpec, Option<String>) {
        let name_ok = self.name(&raw.name);
        let vcpus = self.int_range("vcpus", raw.vcpus, 1, i64::from(MAX_VCPUS));
        let memory_mib = self.int_min("memory_mib", raw.memory_mib, MIN_MEMORY_MIB as i64);
        let is_builtin = raw.kernel == "builtin";
        let kernel = self.kernel(&raw.kernel);
        let initrd = self.initrd(raw.initrd.as_deref(), is_builtin);
        let cmdline = self.cmdline(raw.cmdline);
        let console = self.console(raw.console.as_deref());
        let builtin = self.builtin(raw.builtin, is_builtin);
        let restart = self.restart(raw.restart.unwrap_or_default());
        let spec = VmSpec {
            name: raw.name.clone(),
            vcpus: u8::try_from(vcpus).unwrap_or(1),
            memory_mib: u64::try_from(memory_mib).unwrap_or(MIN_MEMORY_MIB),
            kernel: kernel.unwrap_or(KernelSpec::Builtin),
            initrd,
            cmdline,
            console,
            builtin,
            restart,
            source: self.file.to_path_buf(),
        };
        (spec, name_ok.then_some(raw.name))
    }

    fn name(&mut self, name: &str) -> bool {
        let len = name.chars().count();
        let reason = if len == 0 {
            Some("must not be empty".to_string())
        } else if len > MAX_NAME_LEN {
            Some(format!(
                "`{name}` is {len} characters long, at most {MAX_NAME_LEN} allowed"
            ))
        } else if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            Some(format!(
                "`{name}` contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"
            ))
        } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            Some(format!("`{name}` must start with a letter or digit"))
        } else {
            None
        };
        match reason {
            Some(r) => {
                self.problem("name", r);
                false
            }
            None => true,
        }
    }

    /// Checks `lo <= v <= hi`; returns `v` if so, `lo` otherwise.
    fn int_range(&mut self, key: &str, v: i64, lo: i64, hi: i64) -> i64 {
        if (lo..=hi).contains(&v) {
            v
        } else {
            self.problem(key, format!("{v} is out of range, must be {lo}..={hi}"));
            lo
        }
    }

    /// Checks `v >= lo`; returns `v` if so, `lo` otherwise.
    fn int_min(&mut self, key: &str, v: i64, lo: i64) -> i64 {
        if v >= lo {
            v
        } else {
            self.problem(key, format!("{v} is too small, must be >= {lo}"));
            lo
        }
    }

    fn opt_u64_min(&mut self, key: &str, v: Option<i64>, lo: i64, default: u64) -> u64 {
        match v {
            None => default,
            Some(v) => u64::try_from(self.int_min(key, v, lo)).unwrap_or(default),
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Checks that `path` is an existing, readable regular file.
    fn readable_file(&mut self, key: &str, path: &Path) -> bool {
        let why = match fs::metadata(path) {
            Err(e) => Some(io_reason(&e)),
            Ok(m) if m.is_dir() => Some("is a directory, expected a file".to_string()),
            Ok(m) if !m.is_file() => Some("is not a regular file".to_string()),
            Ok(_) => match fs::File::open(path) {
                Ok(_) => None,
                Err(e) => Some(io_reason(&e)),
            },
        };
        match why {
            Some(why) => {
                self.problem(key, format!("{}: {why}", path.display()));
                false
            }
            None => true,
        }
    }

    fn kernel(&mut self, kernel: &str) -> Option<KernelSpec> {
        if kernel == "builtin" {
            return Some(KernelSpec::Builtin);
        }
        if kernel.is_empty() {
            self.problem(
                "kernel",
                "must not be empty; use `builtin` or a path to a bzImage / ELF vmlinux",
            );
            return None;
        }
        let path = self.resolve(kernel);
        self.readable_file("kernel", &path)
            .then_some(KernelSpec::Path(path))
    }

    fn initrd(&mut self, initrd: Option<&str>, is_builtin: bool) -> Option<PathBuf> {
        let initrd = initrd?;
        if is_builtin {
            self.problem("initrd", "not allowed with `kernel: builtin`");
            return None;
        }
        if initrd.is_empty() {
            self.problem("initrd", "must not be empty");
            return None;
        }
        let path = self.resolve(initrd);
        self.readable_file("initrd", &path).then_some(path)
    }

    fn cmdline(&mut self, cmdline: Option<String>) -> String {
        let Some(cmdline) = cmdline else {
            return DEFAULT_CMDLINE.to_string();
        };
        if cmdline.len() > MAX_CMDLINE_LEN {
            self.problem(
                "cmdline",
                format!(
                    "{} bytes long, at most {MAX_CMDLINE_LEN} allowed",
                    cmdline.len()
                ),
            );
        }
        if cmdline.contains(['\0', '\n', '\r']) {
            self.problem("cmdline", "must not contain NUL or newline characters");
        }
        cmdline
    }

    fn console(&mut self, console: Option<&str>) -> ConsoleSpec {
        match console {
            None | Some("stdout") => ConsoleSpec::Stdout,
            Some("off") => ConsoleSpec::Off,
            Some("") => {
                self.problem(
                    "console",
                    "must not be empty; use `stdout`, `off` or a file path",
                );
                ConsoleSpec::Stdout
            }
            Some(p) => {
                let path = self.resolve(p);
                if path.is_dir() {
                    self.problem(
                        "console",
                        format!("{}: is a directory, expected a file", path.display()),
                    );
                } else {
                    match path.parent() {
                        Some(dir) if !dir.is_dir() => {
                            let why = match fs::metadata(dir) {
                                Ok(_) => "is not a directory".to_string(),
                                Err(e) if e.kind() == ErrorKind::NotFound => {
                                    "no such directory".to_string()
                                }
                                Err(e) => io_reason(&e),
                            };
                            self.problem(
                                "console",
                                format!(
                                    "{}: parent directory {}: {why}",
                                    path.display(),
                                    dir.display()
                                ),
                            );
                        }
                        _ => {}
                    }
                }
                ConsoleSpec::File(path)
            }
        }
    }

    fn builtin(&mut self, raw: Option<RawBuiltin>, is_builtin: bool) -> BuiltinSpec {
        let defaults = BuiltinSpec::default();
        let Some(raw) = raw else {
            return defaults;
        };
        if !is_builtin {
            self.problem("builtin", "only allowed with `kernel: builtin`");
        }
        let heartbeat_ms = match raw.heartbeat_ms {
            None => defaults.heartbeat_ms,
            Some(v) => {
                let (lo, hi) = (*HEARTBEAT_MS_RANGE.start(), *HEARTBEAT_MS_RANGE.end());
                let v = self.int_range("builtin.heartbeat_ms", v, i64::from(lo), i64::from(hi));
                u32::try_from(v).unwrap_or(defaults.heartbeat_ms)
            }
        };
        BuiltinSpec {
            then: raw.then.unwrap_or(defaults.then),
            io_exits: raw.io_exits.unwrap_or(defaults.io_exits),
            heartbeat_ms,
        }
    }

    fn restart(&mut self, raw: RawRestart) -> RestartSpec {
        let d = RestartSpec::default();
        let backoff_initial_ms = self.opt_u64_min(
            "restart.backoff_initial_ms",
            raw.backoff_initial_ms,
            0,
            d.backoff_initial_ms,
        );
        let backoff_max_ms = self.opt_u64_min(
            "restart.backoff_max_ms",
            raw.backoff_max_ms,
            0,
            d.backoff_max_ms,
        );
        let max_given = raw.backoff_max_ms.is_some_and(|v| v >= 0);
        let initial_given = raw.backoff_initial_ms.is_some_and(|v| v >= 0);
        if (max_given || initial_given) && backoff_max_ms < backoff_initial_ms {
            self.problem(
                "restart.backoff_max_ms",
                format!(
                    "{backoff_max_ms} is less than restart.backoff_initial_ms ({backoff_initial_ms})"
                ),
            );
        }
        let backoff_multiplier = match raw.backoff_multiplier {
            None => d.backoff_multiplier,
            Some(m) if m.is_finite() && m >= 1.0 => m,
            Some(m) => {
                self.problem(
                    "restart.backoff_multiplier",
                    format!("{m} is invalid, must be a finite number >= 1.0"),
                );
                d.backoff_multiplier
            }
        };
        let start_limit_burst = match raw.start_limit_burst {
            None => d.start_limit_burst,
            Some(v) => {
                let v = self.int_min("restart.start_limit_burst", v, 1);
                u32::try_from(v).unwrap_or_else(|_| {
                    self.problem(
                        "restart.start_limit_burst",
                        format!("{v} is too large, must be <= {}", u32::MAX),
                    );
                    d.start_limit_burst
                })
            }
        };
        let start_limit_interval_s = self.opt_u64_min(
            "restart.start_limit_interval_s",
            raw.start_limit_interval_s,
            1,
            d.start_limit_interval_s,
        );
        let stable_after_s = self.opt_u64_min(
            "restart.stable_after_s",
            raw.stable_after_s,
            0,
            d.stable_after_s,
        );
        RestartSpec {
            policy: raw.policy.unwrap_or(d.policy),
            backoff_initial_ms,
            backoff_max_ms,
            backoff_multiplier,
            start_limit_burst,
            start_limit_interval_s,
            stable_after_s,
        }
    }
}

/// Short reason for an I/O error on a path ("no such file", "permission denied", ...).
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::NotFound => "no such file".to_string(),
        ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}
