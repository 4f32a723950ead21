//! Parsing and validation of one VM file: collects every problem with its file and key.
//!
//! The YAML is first deserialized into raw structs (`deny_unknown_fields`, wide integer
//! types) so that serde only fails on *parse* errors (one per file: unknown key, wrong
//! type, missing key). Value ranges, path checks and cross-field rules are then checked
//! field by field, pushing a [`Problem`] for each, so they are all reported together.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::files::io_reason;
use super::{
    BuiltinConsole, BuiltinSpec, BuiltinThen, ConsoleSpec, DEFAULT_CMDLINE, HEARTBEAT_MS_RANGE,
    KernelSpec, MAX_CMDLINE_LEN, MAX_MEMORY_MIB, MAX_NAME_LEN, MAX_VCPUS, MIN_MEMORY_MIB, Problem,
    RestartPolicy, RestartSpec, VmSpec,
};

/// The file as written, before validation. Every key is optional here so that one struct
/// serves VM files and the fleet-wide `defaults:`; required keys are checked after the
/// defaults are merged in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    vcpus: Option<i64>,
    #[serde(default)]
    memory_mib: Option<i64>,
    #[serde(default)]
    kernel: Option<String>,
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
    #[serde(default)]
    cpu_quota: Option<f64>,
}

/// The `builtin:` section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuiltin {
    #[serde(default)]
    then: Option<BuiltinThen>,
    #[serde(default)]
    io_exits: Option<u64>,
    #[serde(default)]
    heartbeat_ms: Option<i64>,
    #[serde(default)]
    console: Option<BuiltinConsole>,
}

/// The `restart:` section as written.
#[derive(Debug, Clone, Default, Deserialize)]
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
    check_with(text, source, None)
}

/// Like [`check`], with fleet-wide `defaults` filling the keys the file leaves out.
///
/// Top-level keys of the file win over the defaults; the `builtin` and `restart` sections
/// are merged key by key (the file wins per key). A default `initrd` only applies to VMs
/// booting a kernel path and a default `builtin` section only to `kernel: builtin` VMs, so
/// one set of defaults can serve both kinds. Problems are reported against `source`; a
/// problem about a value taken from the defaults says so.
pub fn check_with(text: &str, source: &Path, defaults: Option<&Defaults>) -> Checked {
    // Parsed once with a node bound first: the typed parse below then replays a file
    // known to be small once its aliases are expanded.
    let parsed = match super::files::parse_bounded(text) {
        Ok(v) => v,
        Err(e) => {
            return Checked {
                spec: None,
                name: None,
                problems: vec![parse_problem(&e, source)],
            };
        }
    };
    if parsed.is_null() {
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
    let (raw, from_defaults) = match defaults {
        Some(d) => merge(raw, &d.raw),
        None => (raw, Vec::new()),
    };
    let mut v = Validator {
        file: source,
        base: base_dir(source),
        problems: Vec::new(),
    };
    let (spec, name) = v.spec(raw);
    let mut problems = v.problems;
    if let Some(d) = defaults {
        let origin = match &d.source {
            Some(f) => format!(" (value from the defaults in {})", f.display()),
            None => " (value from the fleet defaults)".to_string(),
        };
        for p in &mut problems {
            if from_defaults.contains(&p.key.as_str()) {
                p.reason.push_str(&origin);
            }
        }
    }
    Checked {
        spec: problems.is_empty().then_some(spec),
        name,
        problems,
    }
}

/// Fleet-wide defaults for every VM (the `defaults:` section of the fleet settings),
/// checked for keys and types, with relative paths already resolved.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    raw: RawVm,
    source: Option<PathBuf>,
}

impl Defaults {
    /// Builds defaults from a `defaults:` mapping as kept in
    /// [`FleetSettings::defaults`](super::FleetSettings::defaults) (relative paths in it
    /// resolve against the current directory, so make them absolute first). `source`
    /// names the settings file in problems.
    pub fn from_mapping(map: &Mapping, source: Option<&Path>) -> Result<Self, Problem> {
        let file = source.unwrap_or(Path::new(""));
        if map.contains_key("name") {
            return Err(Problem::new(file, "defaults.name", NAME_IN_DEFAULTS));
        }
        let raw: RawVm = serde_yaml::from_value(Value::Mapping(map.clone())).map_err(|e| {
            let mut p = parse_problem(&e, file);
            p.key = if p.key.is_empty() {
                "defaults".to_string()
            } else {
                format!("defaults.{}", p.key)
            };
            p
        })?;
        Ok(Self {
            raw,
            source: source.map(Path::to_path_buf),
        })
    }
}

const NAME_IN_DEFAULTS: &str = "not allowed in defaults: every VM file names its own VM";

/// Fills the keys `vm` leaves out from `d`; returns the merged file and the dotted keys
/// taken from the defaults.
fn merge(mut vm: RawVm, d: &RawVm) -> (RawVm, Vec<&'static str>) {
    fn take<T: Clone>(
        slot: &mut Option<T>,
        default: &Option<T>,
        key: &'static str,
        from: &mut Vec<&'static str>,
    ) {
        if slot.is_none() && default.is_some() {
            slot.clone_from(default);
            from.push(key);
        }
    }
    let mut from = Vec::new();
    let f = &mut from;
    take(&mut vm.vcpus, &d.vcpus, "vcpus", f);
    take(&mut vm.memory_mib, &d.memory_mib, "memory_mib", f);
    take(&mut vm.kernel, &d.kernel, "kernel", f);
    take(&mut vm.cmdline, &d.cmdline, "cmdline", f);
    take(&mut vm.console, &d.console, "console", f);
    take(&mut vm.cpu_quota, &d.cpu_quota, "cpu_quota", f);
    let is_builtin = vm.kernel.as_deref().map(|k| k == "builtin");
    if is_builtin == Some(false) {
        take(&mut vm.initrd, &d.initrd, "initrd", f);
    }
    if let (Some(true), Some(db)) = (is_builtin, &d.builtin) {
        let b = vm.builtin.get_or_insert_with(RawBuiltin::default);
        take(&mut b.then, &db.then, "builtin.then", f);
        take(&mut b.io_exits, &db.io_exits, "builtin.io_exits", f);
        take(
            &mut b.heartbeat_ms,
            &db.heartbeat_ms,
            "builtin.heartbeat_ms",
            f,
        );
        take(&mut b.console, &db.console, "builtin.console", f);
    }
    if let Some(dr) = &d.restart {
        let r = vm.restart.get_or_insert_with(RawRestart::default);
        take(&mut r.policy, &dr.policy, "restart.policy", f);
        take(
            &mut r.backoff_initial_ms,
            &dr.backoff_initial_ms,
            "restart.backoff_initial_ms",
            f,
        );
        take(
            &mut r.backoff_max_ms,
            &dr.backoff_max_ms,
            "restart.backoff_max_ms",
            f,
        );
        take(
            &mut r.backoff_multiplier,
            &dr.backoff_multiplier,
            "restart.backoff_multiplier",
            f,
        );
        take(
            &mut r.start_limit_burst,
            &dr.start_limit_burst,
            "restart.start_limit_burst",
            f,
        );
        take(
            &mut r.start_limit_interval_s,
            &dr.start_limit_interval_s,
            "restart.start_limit_interval_s",
            f,
        );
        take(
            &mut r.stable_after_s,
            &dr.stable_after_s,
            "restart.stable_after_s",
            f,
        );
    }
    (vm, from)
}

/// Keys accepted in `defaults:` (every VM key but `name`).
const DEFAULT_KEYS: [&str; 9] = [
    "vcpus",
    "memory_mib",
    "kernel",
    "initrd",
    "cmdline",
    "console",
    "builtin",
    "restart",
    "cpu_quota",
];

/// Checks the `defaults:` mapping of the settings file `file` (whose text is `text`, for
/// line numbers) key by key, so that every bad key is reported. Returns the mapping
/// without its bad or null entries, with relative `kernel`, `initrd` and `console` paths
/// resolved against the settings file's directory, and the problems (keys `defaults.*`).
pub(super) fn check_defaults(map: &Mapping, file: &Path, text: &str) -> (Mapping, Vec<Problem>) {
    let base = base_dir(file);
    let mut problems = Vec::new();
    let mut problem = |key: &str, reason: String| {
        let segments: Vec<&str> = key.split('.').collect();
        problems.push(Problem::new(file, key, with_line(reason, text, &segments)));
    };
    let mut out = Mapping::new();
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            problem(
                "defaults",
                format!("keys must be strings, found {}", describe(k)),
            );
            continue;
        };
        let key = format!("defaults.{k}");
        if k == "name" {
            problem(&key, NAME_IN_DEFAULTS.to_string());
            continue;
        }
        if !DEFAULT_KEYS.contains(&k) {
            let expected = DEFAULT_KEYS.map(|k| format!("`{k}`")).join(", ");
            problem(
                &key,
                format!("unknown field `{k}`, expected one of {expected}"),
            );
            continue;
        }
        if v.is_null() {
            continue;
        }
        if matches!(k, "builtin" | "restart")
            && let Value::Mapping(section) = v
        {
            let mut kept = Mapping::new();
            for (sk, sv) in section {
                let Some(sk) = sk.as_str() else {
                    problem(
                        &key,
                        format!("keys must be strings, found {}", describe(sk)),
                    );
                    continue;
                };
                let inner = Value::Mapping(Mapping::from_iter([(sk.into(), sv.clone())]));
                match type_error(k, &inner) {
                    Some(reason) => problem(&format!("{key}.{sk}"), reason),
                    None if sv.is_null() => {}
                    None => {
                        kept.insert(sk.into(), sv.clone());
                    }
                }
            }
            out.insert(k.into(), Value::Mapping(kept));
            continue;
        }
        if let Some(reason) = type_error(k, v) {
            problem(&key, reason);
            continue;
        }
        let v = match (k, v.as_str()) {
            ("kernel", Some(s)) if s != "builtin" && !s.is_empty() => absolute(&base, s),
            ("initrd", Some(s)) if !s.is_empty() => absolute(&base, s),
            ("console", Some(s)) if !matches!(s, "stdout" | "off" | "") => absolute(&base, s),
            _ => Ok(v.clone()),
        };
        match v {
            Ok(v) => {
                out.insert(k.into(), v);
            }
            Err(reason) => problem(&key, reason),
        }
    }
    (out, problems)
}

/// Why `{key: value}` does not deserialize as part of a VM file, if it does not.
fn type_error(key: &str, value: &Value) -> Option<String> {
    let one = Value::Mapping(Mapping::from_iter([(key.into(), value.clone())]));
    serde_yaml::from_value::<RawVm>(one)
        .err()
        .map(|e| humanize(&e.to_string()))
}

/// `rel` resolved against `base`, as a YAML string.
fn absolute(base: &Path, rel: &str) -> Result<Value, String> {
    let p = Path::new(rel);
    if p.is_absolute() {
        return Ok(rel.into());
    }
    let joined = base.join(p);
    match joined.to_str() {
        Some(s) => Ok(s.into()),
        None => Err(format!(
            "{}: the settings file's directory is not valid UTF-8; give an absolute path",
            joined.display()
        )),
    }
}

/// A short description of a YAML value's kind, for messages.
pub(super) fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// `reason` with ` (line N)` appended when the block-style key path `keys` is found in
/// `text` (and `reason` carries no position yet).
pub(super) fn with_line(mut reason: String, text: &str, keys: &[&str]) -> String {
    if keys.iter().all(|k| !k.is_empty())
        && !(reason.contains("(line ") || reason.contains(" at line "))
        && let Some(line) = find_line(text, keys)
    {
        reason.push_str(&format!(" (line {line})"));
    }
    reason
}

/// The 1-based line of the key path `keys` (like `["defaults", "restart", "policy"]`) in
/// block-style YAML `text`: each key found at the start of a line, nested ones indented
/// deeper than their parent and before the parent's block ends. `None` if not found.
pub(super) fn find_line(text: &str, keys: &[&str]) -> Option<usize> {
    let mut want = 0;
    let mut parent_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let in_block = match parent_indent {
            None => indent == 0,
            Some(p) if indent <= p => return None,
            Some(_) => true,
        };
        let is_key = trimmed
            .strip_prefix(*keys.get(want)?)
            .is_some_and(|rest| rest.trim_start().starts_with(':'));
        if in_block && is_key {
            want += 1;
            if want == keys.len() {
                return Some(i + 1);
            }
            parent_indent = Some(indent);
        }
    }
    None
}

/// Turns a serde_yaml error into a problem, extracting the dotted key when possible.
pub(super) fn parse_problem(e: &serde_yaml::Error, file: &Path) -> Problem {
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
pub(super) fn humanize(msg: &str) -> String {
    [
        ("expected struct RawVm", "expected a mapping of VM settings"),
        ("expected struct RawBuiltin", "expected a mapping"),
        ("expected struct RawRestart", "expected a mapping"),
        (
            "expected struct RawSettings",
            "expected a mapping of fleet settings",
        ),
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
        let name = self.required("name", raw.name);
        let name_ok = name.as_deref().is_some_and(|n| self.name(n));
        let vcpus = self
            .required("vcpus", raw.vcpus)
            .map(|v| self.int_range("vcpus", v, 1, i64::from(MAX_VCPUS)));
        let memory_mib = self.required("memory_mib", raw.memory_mib).map(|v| {
            self.int_range(
                "memory_mib",
                v,
                MIN_MEMORY_MIB as i64,
                MAX_MEMORY_MIB as i64,
            )
        });
        let raw_kernel = self.required("kernel", raw.kernel);
        let is_builtin = raw_kernel.as_deref() == Some("builtin");
        let kernel = raw_kernel.and_then(|k| self.kernel(&k));
        let initrd = self.initrd(raw.initrd.as_deref(), is_builtin);
        let cmdline = self.cmdline(raw.cmdline);
        let console = self.console(raw.console.as_deref());
        let builtin = self.builtin(raw.builtin, is_builtin);
        let restart = self.restart(raw.restart.unwrap_or_default());
        let cpu_quota = raw.cpu_quota.and_then(|q| self.cpu_quota(q));
        let name = name.unwrap_or_default();
        let spec = VmSpec {
            name: name.clone(),
            vcpus: vcpus.and_then(|v| u8::try_from(v).ok()).unwrap_or(1),
            memory_mib: memory_mib
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(MIN_MEMORY_MIB),
            kernel: kernel.unwrap_or(KernelSpec::Builtin),
            initrd,
            cmdline,
            console,
            builtin,
            restart,
            source: self.file.to_path_buf(),
            cpu_quota,
        };
        (spec, name_ok.then_some(name))
    }

    /// Reports `key` as missing when `v` is `None`.
    fn required<T>(&mut self, key: &str, v: Option<T>) -> Option<T> {
        if v.is_none() {
            self.problem(key, format!("missing field `{key}`"));
        }
        v
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

    /// Checks that `path` is an existing, readable regular file (opened without
    /// blocking, then checked with fstat: a FIFO is refused, never waited on).
    fn readable_file(&mut self, key: &str, path: &Path) -> bool {
        match super::files::open_regular(path) {
            Err(why) => {
                self.problem(key, format!("{}: {why}", path.display()));
                false
            }
            Ok(_) => true,
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
                        // The log directory's rule, for the directory of a console file
                        // too: another user must not plant a symlink, a FIFO or a file
                        // of theirs where the supervisor writes the guest's console.
                        Some(dir) => {
                            // O_DIRECTORY: swapped for a FIFO since the check above,
                            // it fails instead of waiting for a writer.
                            let on_kernel_fs = fs::OpenOptions::new()
                                .read(true)
                                .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
                                .open(dir)
                                .is_ok_and(super::files::is_kernel_interface);
                            let why = if on_kernel_fs {
                                Err(super::files::KERNEL_INTERFACE.to_string())
                            } else {
                                super::files::check_log_dir(dir)
                            };
                            if let Err(why) = why {
                                self.problem(
                                    "console",
                                    format!(
                                        "{}: directory {}: {why}",
                                        path.display(),
                                        dir.display()
                                    ),
                                );
                            }
                        }
                        None => {}
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
        let then = raw.then.unwrap_or(defaults.then);
        let console = raw.console.unwrap_or(defaults.console);
        if console == BuiltinConsole::Echo && then != BuiltinThen::Idle {
            self.problem(
                "builtin.console",
                format!(
                    "`echo` needs `then: idle` (the guest reads its UART from interrupts, \
                     which only the idle guest takes), not `then: {then}`"
                ),
            );
        }
        BuiltinSpec {
            then,
            io_exits: raw.io_exits.unwrap_or(defaults.io_exits),
            heartbeat_ms,
            console,
        }
    }

    /// `cpu_quota`: a number of CPUs, > 0 and at most the host's CPU count.
    fn cpu_quota(&mut self, q: f64) -> Option<f64> {
        let host = host_cpus();
        if q.is_finite() && q > 0.0 && q <= host as f64 {
            Some(q)
        } else {
            self.problem(
                "cpu_quota",
                format!(
                    "{q} is out of range, must be a number of CPUs > 0 and at most {host} \
                     (this host's CPU count); e.g. 0.5 for half a core"
                ),
            );
            None
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

/// The host's online CPU count (at least 1).
pub fn host_cpus() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    }
}
