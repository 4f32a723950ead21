//! Unit tests of the config module: parsing, validation, directory loading.

use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "vmm-fleet-config-test-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn problems_of(r: Result<VmSpec, ConfigError>) -> Vec<Problem> {
    match r {
        Ok(spec) => panic!("expected problems, got {spec:?}"),
        Err(e) => {
            assert!(
                matches!(e, ConfigError::Problems(_)),
                "expected Problems, got {e:?}"
            );
            e.problems().to_vec()
        }
    }
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

const MINIMAL: &str = "name: web-1\nvcpus: 2\nmemory_mib: 256\nkernel: builtin\n";

#[test]
fn minimal_builtin_gets_defaults() {
    let spec = VmSpec::from_yaml(MINIMAL, Path::new("/etc/fleet/web-1.yaml")).expect("valid");
    assert_eq!(spec.name, "web-1");
    assert_eq!(spec.vcpus, 2);
    assert_eq!(spec.memory_mib, 256);
    assert_eq!(spec.kernel, KernelSpec::Builtin);
    assert_eq!(spec.initrd, None);
    assert_eq!(spec.cmdline, DEFAULT_CMDLINE);
    assert_eq!(spec.console, ConsoleSpec::Stdout);
    assert_eq!(spec.builtin, BuiltinSpec::default());
    assert_eq!(spec.restart, RestartSpec::default());
    assert_eq!(spec.restart.policy, RestartPolicy::OnFailure);
    assert_eq!(spec.source, PathBuf::from("/etc/fleet/web-1.yaml"));
}

#[test]
fn full_builtin_file() {
    let dir = TempDir::new("full");
    let text = "\
name: db.primary_1
vcpus: 4
memory_mib: 1024
kernel: builtin
cmdline: \"console=ttyS0 quiet\"
console: logs/db.log
builtin:
  then: crash
  io_exits: 12345
  heartbeat_ms: 250
restart:
  policy: always
  backoff_initial_ms: 50
  backoff_max_ms: 5000
  backoff_multiplier: 1.5
  start_limit_burst: 3
  start_limit_interval_s: 30
  stable_after_s: 20
";
    std::fs::create_dir_all(dir.path().join("logs")).expect("mkdir");
    let file = dir.write("db.yaml", text);
    let spec = VmSpec::load(&file).expect("valid");
    assert_eq!(spec.name, "db.primary_1");
    assert_eq!(spec.vcpus, 4);
    assert_eq!(spec.cmdline, "console=ttyS0 quiet");
    assert_eq!(
        spec.console,
        ConsoleSpec::File(dir.path().join("logs/db.log"))
    );
    assert_eq!(
        spec.builtin,
        BuiltinSpec {
            then: BuiltinThen::Crash,
            io_exits: 12345,
            heartbeat_ms: 250,
            console: BuiltinConsole::Quiet,
        }
    );
    assert_eq!(
        spec.restart,
        RestartSpec {
            policy: RestartPolicy::Always,
            backoff_initial_ms: 50,
            backoff_max_ms: 5000,
            backoff_multiplier: 1.5,
            start_limit_burst: 3,
            start_limit_interval_s: 30,
            stable_after_s: 20,
        }
    );
    assert_eq!(spec.restart.backoff_max(), Duration::from_secs(5));
    assert_eq!(spec.source, file);
}

#[test]
fn full_file_with_kernel_and_initrd_paths() {
    let dir = TempDir::new("paths");
    dir.write("images/bzImage", "not really a kernel");
    dir.write("images/initramfs.cpio.gz", "x");
    let text = "\
name: k1
vcpus: 1
memory_mib: 128
kernel: images/bzImage
initrd: ./images/initramfs.cpio.gz
console: off
restart:
  policy: never
";
    let file = dir.write("k1.yml", text);
    let spec = VmSpec::load(&file).expect("valid");
    assert_eq!(
        spec.kernel,
        KernelSpec::Path(dir.path().join("images/bzImage"))
    );
    assert_eq!(
        spec.initrd,
        Some(dir.path().join("./images/initramfs.cpio.gz"))
    );
    assert_eq!(spec.console, ConsoleSpec::Off);
    assert_eq!(spec.restart.policy, RestartPolicy::Never);
    assert_eq!(spec.base_dir(), dir.path());
}

#[test]
fn builtin_then_and_policy_spellings() {
    for t in BuiltinThen::ALL {
        assert_eq!(BuiltinThen::from_name(t.as_str()), Some(t));
        let text = format!("{MINIMAL}builtin:\n  then: {t}\n");
        let spec = VmSpec::from_yaml(&text, Path::new("a.yaml")).expect("valid");
        assert_eq!(spec.builtin.then, t);
    }
    for p in [
        RestartPolicy::Always,
        RestartPolicy::OnFailure,
        RestartPolicy::Never,
    ] {
        let text = format!("{MINIMAL}restart:\n  policy: {p}\n");
        let spec = VmSpec::from_yaml(&text, Path::new("a.yaml")).expect("valid");
        assert_eq!(spec.restart.policy, p);
    }
    let text = format!("{MINIMAL}restart:\n  policy: on_failure\n");
    let ps = problems_of(VmSpec::from_yaml(&text, Path::new("a.yaml")));
    assert_eq!(keys(&ps), ["restart.policy"], "{ps:?}");
    assert!(ps[0].reason.contains("unknown variant"), "{ps:?}");
}

#[test]
fn builtin_console_echo_needs_the_idle_guest() {
    let text = format!("{MINIMAL}builtin:\n  then: idle\n  console: echo\n");
    let spec = VmSpec::from_yaml(&text, Path::new("a.yaml")).expect("valid");
    assert_eq!(spec.builtin.console, BuiltinConsole::Echo);
    let text = format!("{MINIMAL}builtin:\n  then: idle\n  console: quiet\n");
    let spec = VmSpec::from_yaml(&text, Path::new("a.yaml")).expect("valid");
    assert_eq!(spec.builtin.console, BuiltinConsole::Quiet);
    for then in ["spin", "poweroff", "flood"] {
        let text = format!("{MINIMAL}builtin:\n  then: {then}\n  console: echo\n");
        let ps = problems_of(VmSpec::from_yaml(&text, Path::new("a.yaml")));
        assert_eq!(keys(&ps), ["builtin.console"], "{ps:?}");
        assert!(ps[0].reason.contains("then: idle"), "{ps:?}");
        assert!(ps[0].reason.contains(then), "{ps:?}");
    }
    let text = format!("{MINIMAL}builtin:\n  then: idle\n  console: loud\n");
    let ps = problems_of(VmSpec::from_yaml(&text, Path::new("a.yaml")));
    assert_eq!(keys(&ps), ["builtin.console"], "{ps:?}");
    assert!(ps[0].reason.contains("unknown variant"), "{ps:?}");
}

#[test]
fn a_wire_spec_without_builtin_console_is_quiet() {
    // What a supervisor from before `builtin.console` sends its children.
    let text = "name: w\nvcpus: 1\nmemory_mib: 16\nkernel: builtin\ncmdline: x\nconsole: off\nbuiltin:\n  then: idle\n";
    let spec = VmSpec::from_yaml(text, Path::new("/x/w.yaml")).unwrap();
    let wire = spec.to_wire().unwrap().replace("  console: quiet\n", "");
    assert!(!wire.contains("quiet"), "{wire}");
    assert_eq!(VmSpec::from_wire(&wire).unwrap(), spec);
}

#[test]
fn unknown_top_level_key_is_named() {
    let text = format!("{MINIMAL}memory: 12\n");
    let ps = problems_of(VmSpec::from_yaml(&text, Path::new("/c/a.yaml")));
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0].key, "memory");
    assert_eq!(ps[0].file, PathBuf::from("/c/a.yaml"));
    assert!(ps[0].reason.contains("unknown field `memory`"), "{ps:?}");
    assert!(ps[0].reason.contains("line 5"), "{ps:?}");
}

#[test]
fn unknown_nested_key_is_named() {
    let text = format!("{MINIMAL}restart:\n  polcy: always\n");
    let ps = problems_of(VmSpec::from_yaml(&text, Path::new("a.yaml")));
    assert_eq!(keys(&ps), ["restart.polcy"], "{ps:?}");
    assert!(ps[0].reason.contains("line 6"), "{ps:?}");
    let shown = ps[0].to_string();
    assert!(
        shown.starts_with("a.yaml: restart.polcy: unknown field `polcy`"),
        "{shown}"
    );
}

#[test]
fn missing_and_mistyped_keys_are_named() {
    let ps = problems_of(VmSpec::from_yaml(
        "name: a\nvcpus: 1\nmemory_mib: 64\n",
        Path::new("a.yaml"),
    ));
    assert_eq!(keys(&ps), ["kernel"], "{ps:?}");
    assert!(ps[0].reason.contains("missing field"), "{ps:?}");

    let ps = problems_of(VmSpec::from_yaml(
        "name: a\nvcpus: two\nmemory_mib: 64\nkernel: builtin\n",
        Path::new("a.yaml"),
    ));
    assert_eq!(keys(&ps), ["vcpus"], "{ps:?}");
    assert!(ps[0].reason.contains("invalid type"), "{ps:?}");

    let ps = problems_of(VmSpec::from_yaml(
        &format!("{MINIMAL}builtin:\n  heartbeat_ms: soon\n"),
        Path::new("a.yaml"),
    ));
    assert_eq!(keys(&ps), ["builtin.heartbeat_ms"], "{ps:?}");
}

#[test]
fn empty_and_malformed_files() {
    for text in ["", "- a\n- b\n", "name: [unclosed\n", "just a string"] {
        let ps = problems_of(VmSpec::from_yaml(text, Path::new("a.yaml")));
        assert_eq!(ps.len(), 1, "{text:?}: {ps:?}");
        assert_eq!(ps[0].file, PathBuf::from("a.yaml"));
    }
}

#[test]
fn several_bad_values_all_reported() {
    let text = "\
name: -bad name
vcpus: 0
memory_mib: 2
kernel: builtin
initrd: ./initrd.img
cmdline: \"a\\nb\"
console: /definitely/not/a/dir/console.log
builtin:
  heartbeat_ms: 0
restart:
  backoff_initial_ms: 1000
  backoff_max_ms: 10
  backoff_multiplier: 0.5
  start_limit_burst: 0
  start_limit_interval_s: 0
  stable_after_s: -1
";
    let ps = problems_of(VmSpec::from_yaml(text, Path::new("/c/bad.yaml")));
    let mut ks = keys(&ps);
    ks.sort_unstable();
    assert_eq!(
        ks,
        [
            "builtin.heartbeat_ms",
            "cmdline",
            "console",
            "initrd",
            "memory_mib",
            "name",
            "restart.backoff_max_ms",
            "restart.backoff_multiplier",
            "restart.stable_after_s",
            "restart.start_limit_burst",
            "restart.start_limit_interval_s",
            "vcpus",
        ],
        "{ps:#?}"
    );
    assert!(ps.iter().all(|p| p.file == Path::new("/c/bad.yaml")));
    let err = ConfigError::Problems(ProblemList(ps.clone()));
    assert_eq!(err.to_string().lines().count(), ps.len());
}

#[test]
fn name_rules() {
    let long = "a".repeat(MAX_NAME_LEN);
    let too_long = "a".repeat(MAX_NAME_LEN + 1);
    for (name, ok) in [
        ("a", true),
        ("0vm", true),
        ("web-1.prod_x", true),
        (long.as_str(), true),
        (too_long.as_str(), false),
        ("\"\"", false),
        ("_x", false),
        (".x", false),
        ("a b", false),
        ("é", false),
        ("a/b", false),
    ] {
        let text = format!("name: {name}\nvcpus: 1\nmemory_mib: 4\nkernel: builtin\n");
        let r = VmSpec::from_yaml(&text, Path::new("a.yaml"));
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(e), false) => assert_eq!(keys(e.problems()), ["name"], "{name}: {e}"),
            (r, _) => panic!("{name}: unexpected {r:?}"),
        }
    }
}

#[test]
fn value_ranges() {
    let ok = |text: &str| VmSpec::from_yaml(text, Path::new("a.yaml")).is_ok();
    assert!(ok("name: a\nvcpus: 254\nmemory_mib: 4\nkernel: builtin\n"));
    assert!(!ok("name: a\nvcpus: 255\nmemory_mib: 4\nkernel: builtin\n"));
    assert!(!ok(
        "name: a\nvcpus: 1\nmemory_mib: 99999999999\nkernel: builtin\n"
    ));
    assert!(!ok("name: a\nvcpus: 256\nmemory_mib: 4\nkernel: builtin\n"));
    assert!(!ok("name: a\nvcpus: -1\nmemory_mib: 4\nkernel: builtin\n"));
    assert!(!ok("name: a\nvcpus: 1\nmemory_mib: 3\nkernel: builtin\n"));
    assert!(ok(&format!("{MINIMAL}builtin:\n  heartbeat_ms: 60000\n")));
    assert!(!ok(&format!("{MINIMAL}builtin:\n  heartbeat_ms: 60001\n")));
    assert!(ok(&format!(
        "{MINIMAL}restart:\n  backoff_initial_ms: 7\n  backoff_max_ms: 7\n  backoff_multiplier: 1\n"
    )));
    assert!(!ok(&format!(
        "{MINIMAL}restart:\n  backoff_initial_ms: 40000\n"
    )));
    assert!(!ok(&format!("{MINIMAL}restart:\n  backoff_max_ms: 99\n")));
    assert!(!ok(&format!(
        "{MINIMAL}restart:\n  backoff_multiplier: .nan\n"
    )));
    assert!(!ok(&format!(
        "{MINIMAL}restart:\n  backoff_multiplier: .inf\n"
    )));
    assert!(ok(&format!(
        "{MINIMAL}cmdline: \"{}\"\n",
        "x".repeat(MAX_CMDLINE_LEN)
    )));
    let ps = problems_of(VmSpec::from_yaml(
        &format!(
            "{MINIMAL}cmdline: \"{}\"\n",
            "x".repeat(MAX_CMDLINE_LEN + 1)
        ),
        Path::new("a.yaml"),
    ));
    assert_eq!(keys(&ps), ["cmdline"]);
    assert!(
        ps[0]
            .reason
            .contains(&format!("{} bytes", MAX_CMDLINE_LEN + 1)),
        "{ps:?}"
    );
}

#[test]
fn missing_kernel_file() {
    let dir = TempDir::new("nokernel");
    let file = dir.write(
        "a.yaml",
        "name: a\nvcpus: 1\nmemory_mib: 64\nkernel: /x/bzImage\ninitrd: nope.img\n",
    );
    let ps = problems_of(VmSpec::load(&file));
    assert_eq!(keys(&ps), ["kernel", "initrd"], "{ps:?}");
    assert_eq!(ps[0].reason, "/x/bzImage: no such file");
    assert_eq!(
        ps[0].to_string(),
        format!("{}: kernel: /x/bzImage: no such file", file.display())
    );
    assert_eq!(
        ps[1].reason,
        format!("{}: no such file", dir.path().join("nope.img").display())
    );
}

#[test]
fn kernel_directory_is_refused() {
    let dir = TempDir::new("kdir");
    std::fs::create_dir_all(dir.path().join("kdir")).expect("mkdir");
    let file = dir.write(
        "a.yaml",
        "name: a\nvcpus: 1\nmemory_mib: 64\nkernel: kdir\n",
    );
    let ps = problems_of(VmSpec::load(&file));
    assert_eq!(keys(&ps), ["kernel"]);
    assert!(
        ps[0].reason.ends_with("is a directory, expected a file"),
        "{ps:?}"
    );
}

#[test]
fn builtin_section_needs_builtin_kernel() {
    let dir = TempDir::new("mismatch");
    dir.write("vmlinux", "elf");
    let file = dir.write(
        "a.yaml",
        "name: a\nvcpus: 1\nmemory_mib: 64\nkernel: vmlinux\nbuiltin:\n  then: spin\n",
    );
    let ps = problems_of(VmSpec::load(&file));
    assert_eq!(keys(&ps), ["builtin"], "{ps:?}");
}

#[test]
fn relative_paths_resolve_against_yaml_dir() {
    let dir = TempDir::new("relative");
    dir.write("sub/kernels/bzImage", "k");
    std::fs::create_dir_all(dir.path().join("sub/logs")).expect("mkdir");
    let file = dir.write(
        "sub/vm.yaml",
        "name: a\nvcpus: 1\nmemory_mib: 64\nkernel: kernels/bzImage\nconsole: logs/a.log\n",
    );
    let spec = VmSpec::load(&file).expect("valid");
    assert_eq!(
        spec.kernel,
        KernelSpec::Path(dir.path().join("sub/kernels/bzImage"))
    );
    assert_eq!(
        spec.console,
        ConsoleSpec::File(dir.path().join("sub/logs/a.log"))
    );

    // The same text read as if from another directory does not find the kernel there.
    let other = dir.path().join("elsewhere/vm.yaml");
    let text = std::fs::read_to_string(&file).expect("read");
    let ps = problems_of(VmSpec::from_yaml(&text, &other));
    let mut ks = keys(&ps);
    ks.sort_unstable();
    assert_eq!(ks, ["console", "kernel"], "{ps:?}");
}

#[test]
fn load_of_missing_file_is_io_error() {
    let e = VmSpec::load(Path::new("/nonexistent/vmm-fleet/a.yaml")).expect_err("missing");
    assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with("/nonexistent/vmm-fleet/a.yaml: "),
        "{e}"
    );
}

fn vm(name: &str, mem: u64) -> String {
    format!("name: {name}\nvcpus: 1\nmemory_mib: {mem}\nkernel: builtin\n")
}

#[test]
fn load_dir_sorted_and_filtered() {
    let dir = TempDir::new("dirok");
    dir.write("b.yml", &vm("b", 64));
    dir.write("a.yaml", &vm("a", 64));
    dir.write("c.yaml", &vm("c", 64));
    dir.write("notes.txt", "ignored");
    dir.write(".hidden.yaml", "garbage: [");
    dir.write("sub/d.yaml", "garbage: [");
    let specs = load_dir(dir.path(), None).expect("valid");
    let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(specs[1].source, dir.path().join("b.yml"));
}

#[test]
fn load_dir_duplicate_names_name_both_files() {
    let dir = TempDir::new("dup");
    let first = dir.write("1.yaml", &vm("web", 64));
    let second = dir.write("2.yaml", &vm("web", 64));
    let e = load_dir(dir.path(), None).expect_err("duplicate");
    let ps = e.problems();
    assert_eq!(ps.len(), 1, "{e}");
    assert_eq!(ps[0].file, second);
    assert_eq!(ps[0].key, "name");
    assert!(ps[0].reason.contains(&first.display().to_string()), "{e}");
    assert!(ps[0].reason.contains("`web`"), "{e}");
}

#[test]
fn load_dir_duplicate_name_in_otherwise_broken_file() {
    let dir = TempDir::new("dup2");
    dir.write("1.yaml", &vm("web", 64));
    dir.write(
        "2.yaml",
        "name: web\nvcpus: 0\nmemory_mib: 64\nkernel: builtin\n",
    );
    let e = load_dir(dir.path(), None).expect_err("broken");
    let mut ks = keys(e.problems());
    ks.sort_unstable();
    assert_eq!(ks, ["name", "vcpus"], "{e}");
}

#[test]
fn load_dir_reports_every_broken_file() {
    let dir = TempDir::new("broken3");
    let a = dir.write(
        "a.yaml",
        "name: a\nvcpus: 1\nmemory_mib: 64\nkernel: builtin\nfoo: 1\n",
    );
    let b = dir.write(
        "b.yaml",
        "name: b\nvcpus: 0\nmemory_mib: 1\nkernel: builtin\n",
    );
    let c = dir.write(
        "c.yaml",
        "name: c\nvcpus: 1\nmemory_mib: 64\nkernel: ./missing\n",
    );
    dir.write("d.yaml", &vm("d", 64));
    let e = load_dir(dir.path(), None).expect_err("broken");
    let ps = e.problems();
    let files: Vec<_> = ps.iter().map(|p| p.file.clone()).collect();
    assert_eq!(files, [a, b.clone(), b, c], "{e}");
    assert_eq!(keys(ps), ["foo", "vcpus", "memory_mib", "kernel"], "{e}");
    assert_eq!(e.to_string().lines().count(), 4, "{e}");
}

#[test]
fn load_dir_unreadable_entry_is_a_problem_for_that_file() {
    let dir = TempDir::new("unreadable");
    dir.write("a.yaml", &vm("a", 64));
    // A directory named like a config file cannot be read as one.
    std::fs::create_dir_all(dir.path().join("b.yaml")).expect("mkdir");
    dir.write(
        "c.yaml",
        "name: c\nvcpus: 0\nmemory_mib: 64\nkernel: builtin\n",
    );
    let e = load_dir(dir.path(), None).expect_err("broken");
    let ps = e.problems();
    assert_eq!(ps.len(), 2, "{e}");
    assert_eq!(ps[0].file, dir.path().join("b.yaml"));
    assert_eq!(ps[0].key, "");
    assert!(ps[0].reason.starts_with("cannot read: "), "{e}");
    assert_eq!(ps[1].file, dir.path().join("c.yaml"));
}

#[test]
fn load_dir_total_memory_check() {
    let dir = TempDir::new("mem");
    dir.write("a.yaml", &vm("a", 512));
    dir.write("b.yaml", &vm("b", 512));
    assert_eq!(load_dir(dir.path(), None).expect("unchecked").len(), 2);
    assert_eq!(load_dir(dir.path(), Some(1024)).expect("fits").len(), 2);
    let e = load_dir(dir.path(), Some(1023)).expect_err("too much");
    let ps = e.problems();
    assert_eq!(ps.len(), 1, "{e}");
    assert_eq!(ps[0].file, dir.path());
    assert_eq!(ps[0].key, "memory_mib");
    assert!(ps[0].reason.contains("1024 MiB"), "{e}");
    assert!(ps[0].reason.contains("1023 MiB"), "{e}");
}

#[test]
fn load_dir_empty_dir_is_an_error() {
    let dir = TempDir::new("empty");
    dir.write("README.md", "no configs here");
    let e = load_dir(dir.path(), None).expect_err("empty");
    assert!(matches!(e, ConfigError::NoConfigs { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("{}: no *.yaml files", dir.path().display())
    );
}

#[test]
fn load_dir_missing_dir_is_io_error() {
    let e = load_dir(Path::new("/nonexistent/vmm-fleet-dir"), None).expect_err("missing");
    assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
}

#[test]
fn problem_display() {
    let p = Problem::new("/c/a.yaml", "restart.backoff_max_ms", "too small");
    assert_eq!(
        p.to_string(),
        "/c/a.yaml: restart.backoff_max_ms: too small"
    );
    let p = Problem::new("/c/a.yaml", "", "cannot read: denied");
    assert_eq!(p.to_string(), "/c/a.yaml: cannot read: denied");
    let e = ConfigError::Problems(ProblemList(vec![
        Problem::new("a.yaml", "vcpus", "x"),
        Problem::new("b.yaml", "name", "y"),
    ]));
    assert_eq!(e.to_string(), "a.yaml: vcpus: x\nb.yaml: name: y");
}

#[test]
fn a_problem_is_one_line_whatever_its_file_name_or_reason_holds() {
    // A file name with a newline, and a parse error quoting a multi-line value, must
    // not forge a second line in the supervisor's log.
    let p = Problem::new(
        "/c/evil\n<3>vm x: fake.yaml",
        "cmdline",
        "invalid type: string \"a\nb\u{1b}[31m\"",
    );
    let s = p.to_string();
    assert_eq!(s.lines().count(), 1, "{s}");
    assert_eq!(
        s,
        "/c/evil\\n<3>vm x: fake.yaml: cmdline: invalid type: string \"a\\nb\\u{1b}[31m\""
    );
    let dir = TempDir::new("oneline");
    let f = dir.write(
        "v.yaml",
        "name: v\nvcpus: \"1\\n2\\n3\"\nmemory_mib: 16\nkernel: builtin\n",
    );
    let e = VmSpec::load(&f).expect_err("vcpus is a string");
    assert!(
        e.to_string()
            .lines()
            .all(|l| l.starts_with(&f.display().to_string())),
        "{e}"
    );
}

#[test]
fn fixtures_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let specs = load_dir(&root.join("valid"), None).expect("valid fixtures");
    assert_eq!(specs.len(), 2);
    let e = load_dir(&root.join("invalid"), None).expect_err("invalid fixtures");
    assert!(e.problems().len() >= 3, "{e}");
}

// ---- fleet settings (fleet.yaml) and per-VM defaults ----

fn settings_problems(r: Result<FleetSettings, ConfigError>) -> Vec<Problem> {
    match r {
        Ok(s) => panic!("expected problems, got {s:?}"),
        Err(e) => e.problems().to_vec(),
    }
}

fn sorted_keys(problems: &[Problem]) -> Vec<&str> {
    let mut ks = keys(problems);
    ks.sort_unstable();
    ks
}

#[test]
fn settings_absent_gives_defaults() {
    let dir = TempDir::new("nosettings");
    let s = FleetSettings::load(&dir.path().join(SETTINGS_FILE), PathBuf::from("/l"))
        .expect("defaults");
    assert_eq!(s, FleetSettings::defaults(PathBuf::from("/l")));
    assert_eq!(s.log_dir, PathBuf::from("/l"));
    assert_eq!(s.metrics_address, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(s.stop_grace, Duration::from_secs(10));
    assert!(!s.memory_overcommit);
    assert_eq!(s.startup_settle, Duration::from_millis(500));
    assert_eq!(s.defaults, None);
    assert_eq!(s.source, None);

    dir.write("a.yaml", &vm("a", 64));
    let (s, specs) = load_fleet(dir.path(), None, PathBuf::from("/l"), None).expect("valid");
    assert_eq!(s, FleetSettings::defaults(PathBuf::from("/l")));
    assert_eq!(specs.len(), 1);

    // An empty settings file is all defaults too (but it is the source).
    let f = dir.write(SETTINGS_FILE, "# nothing yet\n");
    let s = FleetSettings::load(&f, PathBuf::from("/l")).expect("empty");
    assert_eq!(s.source.as_deref(), Some(f.as_path()));
    assert_eq!(s.stop_grace, Duration::from_secs(10));
}

#[test]
fn full_settings_file() {
    let dir = TempDir::new("fullsettings");
    dir.write("images/bzImage", "k");
    let f = dir.write(
        SETTINGS_FILE,
        "\
log_dir: logs
metrics_address: 0.0.0.0:9100
stop_grace_s: 3600
memory_overcommit: true
startup_settle_ms: 0
defaults:
  vcpus: 2
  memory_mib: 128
  kernel: images/bzImage
  cmdline: console=ttyS0
  console: off
  builtin: { then: idle, io_exits: 0, heartbeat_ms: 1000 }
  restart:
    policy: always
    backoff_max_ms: 7000
",
    );
    let s = FleetSettings::load(&f, PathBuf::from("/unused")).expect("valid");
    assert_eq!(s.log_dir, dir.path().join("logs"));
    assert_eq!(s.metrics_address, "0.0.0.0:9100".parse().unwrap());
    assert_eq!(s.stop_grace, Duration::from_secs(3600));
    assert!(s.memory_overcommit);
    assert_eq!(s.startup_settle, Duration::ZERO);
    assert_eq!(s.source.as_deref(), Some(f.as_path()));
    let d = s.defaults.as_ref().expect("defaults");
    let kernel = dir.path().join("images/bzImage");
    assert_eq!(d.get("kernel").and_then(|v| v.as_str()), kernel.to_str());
    assert_eq!(d.get("vcpus").and_then(|v| v.as_i64()), Some(2));
    assert_eq!(d.get("console").and_then(|v| v.as_str()), Some("off"));

    // An absolute log_dir is kept; a missing one is fine when its parent exists.
    let f = dir.write("b/fleet.yaml", "log_dir: /tmp/vmm-fleet-test-no-such-dir\n");
    let s = FleetSettings::load(&f, PathBuf::new()).expect("valid");
    assert_eq!(s.log_dir, PathBuf::from("/tmp/vmm-fleet-test-no-such-dir"));
}

#[test]
fn settings_unknown_key() {
    let dir = TempDir::new("settingsunknown");
    let f = dir.write(SETTINGS_FILE, "stop_grace_s: 5\nlog_dri: /tmp\n");
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert_eq!(keys(&ps), ["log_dri"], "{ps:?}");
    assert_eq!(ps[0].file, f);
    assert!(ps[0].reason.contains("unknown field `log_dri`"), "{ps:?}");
    assert!(ps[0].reason.contains("`log_dir`"), "{ps:?}");
    assert!(ps[0].reason.ends_with("(line 2)"), "{ps:?}");
}

#[test]
fn settings_bad_values_all_reported() {
    let dir = TempDir::new("settingsbad");
    let f = dir.write(
        SETTINGS_FILE,
        "\
log_dir: /definitely/not/a/dir/logs
metrics_address: localhost:9464
stop_grace_s: 0
memory_overcommit: yes
startup_settle_ms: 60001
defaults:
  name: x
  vcpus: two
  memory_mib: 64
  kernal: builtin
  restart:
    polcy: always
    backoff_max_ms: 10
  builtin: 3
",
    );
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert_eq!(
        sorted_keys(&ps),
        [
            "defaults.builtin",
            "defaults.kernal",
            "defaults.name",
            "defaults.restart.polcy",
            "defaults.vcpus",
            "log_dir",
            "memory_overcommit",
            "metrics_address",
            "startup_settle_ms",
            "stop_grace_s",
        ],
        "{ps:#?}"
    );
    assert!(ps.iter().all(|p| p.file == f), "{ps:#?}");
    let find = |k: &str| ps.iter().find(|p| p.key == k).expect(k).reason.clone();
    assert_eq!(
        find("stop_grace_s"),
        "0 is out of range, must be 1..=3600 (line 3)"
    );
    assert!(find("metrics_address").contains("`localhost:9464`"));
    assert!(find("memory_overcommit").contains("expected a boolean"));
    assert!(find("log_dir").contains("/definitely/not/a/dir"));
    assert!(find("defaults.vcpus").contains("expected an integer"));
    assert!(find("defaults.vcpus").ends_with("(line 8)"));
    assert!(find("defaults.restart.polcy").contains("unknown field `polcy`"));
    assert!(find("defaults.restart.polcy").ends_with("(line 12)"));
    assert!(find("defaults.builtin").contains("expected a mapping"));
    let shown = ConfigError::Problems(ProblemList(ps.clone())).to_string();
    assert_eq!(shown.lines().count(), ps.len());
}

#[test]
fn settings_not_a_mapping_or_unreadable() {
    let dir = TempDir::new("settingsshape");
    let f = dir.write(SETTINGS_FILE, "- a\n");
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert_eq!(keys(&ps), [""], "{ps:?}");
    let f = dir.write("b.yaml", "log_dir: [unclosed\n");
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert_eq!(ps.len(), 1, "{ps:?}");
    std::fs::create_dir_all(dir.path().join("d/fleet.yaml")).expect("mkdir");
    let ps = settings_problems(FleetSettings::load(
        &dir.path().join("d/fleet.yaml"),
        PathBuf::new(),
    ));
    assert!(ps[0].reason.starts_with("cannot read"), "{ps:?}");
}

#[test]
fn settings_file_is_not_a_vm_file() {
    let dir = TempDir::new("skipfleet");
    dir.write(SETTINGS_FILE, "stop_grace_s: 5\n");
    dir.write("a.yaml", &vm("a", 64));
    let files = config_files(dir.path()).expect("list");
    assert_eq!(files, [dir.path().join("a.yaml")]);
    assert_eq!(load_dir(dir.path(), None).expect("valid").len(), 1);
    let (s, specs) = load_fleet(dir.path(), None, PathBuf::new(), None).expect("valid");
    assert_eq!(s.stop_grace, Duration::from_secs(5));
    assert_eq!(specs.len(), 1);

    // A directory holding only the settings file is an empty fleet (what a fresh
    // package install has: the example VM ships disabled), settings still read.
    let only = TempDir::new("onlyfleet");
    only.write(SETTINGS_FILE, "stop_grace_s: 5\n");
    let (s, specs) = load_fleet(only.path(), None, PathBuf::new(), None).expect("empty fleet");
    assert!(specs.is_empty());
    assert_eq!(s.stop_grace, Duration::from_secs(5));
    // ... but its settings are still checked.
    only.write(SETTINGS_FILE, "stop_grace_s: 0\n");
    load_fleet(only.path(), None, PathBuf::new(), None).expect_err("bad settings");
}

#[test]
fn defaults_are_merged_into_vms() {
    let dir = TempDir::new("merge");
    dir.write(
        SETTINGS_FILE,
        "\
defaults:
  memory_mib: 96
  kernel: builtin
  builtin: { then: idle, heartbeat_ms: 250 }
  restart:
    policy: never
    backoff_max_ms: 7000
",
    );
    dir.write(
        "a.yaml",
        "name: a\nvcpus: 1\nrestart:\n  policy: always\nbuiltin:\n  then: spin\n",
    );
    dir.write("b.yaml", "name: b\nvcpus: 2\nmemory_mib: 32\n");
    let (_, specs) = load_fleet(dir.path(), None, PathBuf::new(), None).expect("valid");
    let (a, b) = (&specs[0], &specs[1]);
    assert_eq!(a.memory_mib, 96);
    assert_eq!(a.kernel, KernelSpec::Builtin);
    assert_eq!(a.restart.policy, RestartPolicy::Always);
    assert_eq!(a.restart.backoff_max_ms, 7000);
    assert_eq!(
        a.restart.backoff_initial_ms,
        RestartSpec::default().backoff_initial_ms
    );
    assert_eq!(a.builtin.then, BuiltinThen::Spin);
    assert_eq!(a.builtin.heartbeat_ms, 250);
    assert_eq!(b.memory_mib, 32);
    assert_eq!(b.restart.policy, RestartPolicy::Never);
    assert_eq!(b.builtin.then, BuiltinThen::Idle);

    // The same through FleetSettings::load_vm (what `run-vm --settings` does).
    let s = FleetSettings::load(&dir.path().join(SETTINGS_FILE), PathBuf::new()).expect("ok");
    assert_eq!(&s.load_vm(&dir.path().join("a.yaml")).expect("valid"), a);
}

#[test]
fn default_paths_resolve_against_settings_dir() {
    let dir = TempDir::new("defpaths");
    dir.write("etc/kernels/bzImage", "k");
    dir.write("etc/initrd.img", "i");
    dir.write("vms/own/bzImage", "k2");
    std::fs::create_dir_all(dir.path().join("etc/consoles")).expect("mkdir");
    let settings = dir.write(
        "etc/settings.yaml",
        "defaults:\n  vcpus: 1\n  memory_mib: 64\n  kernel: kernels/bzImage\n  \
         initrd: ./initrd.img\n  console: consoles/all.log\n",
    );
    dir.write("vms/a.yaml", "name: a\n");
    dir.write("vms/b.yaml", "name: b\nkernel: own/bzImage\n");
    dir.write("vms/c.yaml", "name: c\nkernel: builtin\n");
    let vms = dir.path().join("vms");
    let (_, specs) = load_fleet(&vms, Some(&settings), PathBuf::new(), None).expect("valid");
    let etc = dir.path().join("etc");
    assert_eq!(
        specs[0].kernel,
        KernelSpec::Path(etc.join("kernels/bzImage"))
    );
    assert_eq!(specs[0].initrd, Some(etc.join("./initrd.img")));
    assert_eq!(
        specs[0].console,
        ConsoleSpec::File(etc.join("consoles/all.log"))
    );
    // The VM file's own paths still resolve against the VM file's directory.
    assert_eq!(specs[1].kernel, KernelSpec::Path(vms.join("own/bzImage")));
    // A default initrd does not apply to builtin-kernel VMs.
    assert_eq!(specs[2].kernel, KernelSpec::Builtin);
    assert_eq!(specs[2].initrd, None);
}

#[test]
fn builtin_defaults_skip_kernel_path_vms() {
    let dir = TempDir::new("defbuiltin");
    dir.write("bzImage", "k");
    dir.write(
        SETTINGS_FILE,
        "defaults:\n  vcpus: 1\n  memory_mib: 64\n  builtin:\n    then: crash\n",
    );
    dir.write("a.yaml", "name: a\nkernel: bzImage\n");
    dir.write("b.yaml", "name: b\nkernel: builtin\n");
    let (_, specs) = load_fleet(dir.path(), None, PathBuf::new(), None).expect("valid");
    assert_eq!(specs[0].builtin, BuiltinSpec::default());
    assert_eq!(specs[1].builtin.then, BuiltinThen::Crash);
}

#[test]
fn explicit_settings_path_replaces_dir_settings() {
    let dir = TempDir::new("explicit");
    dir.write(SETTINGS_FILE, "stop_grace_s: 0\n");
    dir.write("a.yaml", &vm("a", 64));
    let other = dir.write("other/s.yaml", "stop_grace_s: 7\n");
    let (s, _) = load_fleet(dir.path(), Some(&other), PathBuf::new(), None).expect("valid");
    assert_eq!(s.stop_grace, Duration::from_secs(7));
    assert_eq!(s.source.as_deref(), Some(other.as_path()));

    // An explicit settings file must exist.
    let missing = dir.path().join("nope.yaml");
    let e = load_fleet(dir.path(), Some(&missing), PathBuf::new(), None).expect_err("missing");
    assert_eq!(e.problems().len(), 1, "{e}");
    assert_eq!(e.problems()[0].file, missing);
    assert!(e.problems()[0].reason.contains("no such file"), "{e}");
}

#[test]
fn memory_overcommit_disables_memory_check() {
    let dir = TempDir::new("overcommit");
    dir.write("a.yaml", &vm("a", 512));
    dir.write("b.yaml", &vm("b", 512));
    let e = load_fleet(dir.path(), None, PathBuf::new(), Some(1000)).expect_err("too much");
    assert_eq!(keys(e.problems()), ["memory_mib"], "{e}");
    assert_eq!(e.problems()[0].file, dir.path());
    assert!(e.problems()[0].reason.contains("memory_overcommit"), "{e}");
    assert!(load_fleet(dir.path(), None, PathBuf::new(), None).is_ok());

    dir.write(SETTINGS_FILE, "memory_overcommit: true\n");
    let (s, specs) = load_fleet(dir.path(), None, PathBuf::new(), Some(1000)).expect("allowed");
    assert!(s.memory_overcommit);
    assert_eq!(specs.len(), 2);

    dir.write(SETTINGS_FILE, "memory_overcommit: false\n");
    assert!(load_fleet(dir.path(), None, PathBuf::new(), Some(1000)).is_err());
}

#[test]
fn load_fleet_reports_settings_and_vm_problems_together() {
    let dir = TempDir::new("together");
    let settings = dir.write(
        SETTINGS_FILE,
        "stop_grace_s: 0\nmetrics_address: nowhere\ndefaults:\n  vcpus: 0\n",
    );
    let a = dir.write("a.yaml", "name: a\nmemory_mib: 64\nkernel: builtin\n");
    let b = dir.write(
        "b.yaml",
        "name: b\nvcpus: 1\nmemory_mib: 1\nkernel: builtin\n",
    );
    let c = dir.write("c.yaml", &format!("{}bogus: 1\n", vm("c", 64)));
    let e = load_fleet(dir.path(), None, PathBuf::new(), None).expect_err("broken");
    let ps = e.problems();
    let got: Vec<(&Path, &str)> = ps
        .iter()
        .map(|p| (p.file.as_path(), p.key.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (settings.as_path(), "stop_grace_s"),
            (settings.as_path(), "metrics_address"),
            (a.as_path(), "vcpus"),
            (b.as_path(), "memory_mib"),
            (c.as_path(), "bogus"),
        ],
        "{e}"
    );
    // A bad value taken from the defaults says where it came from.
    assert!(
        ps[2]
            .reason
            .contains(&format!("defaults in {}", settings.display())),
        "{e}"
    );
    // Parse errors in VM files keep their line numbers when defaults apply.
    assert!(ps[4].reason.contains("line 5"), "{e}");
    assert_eq!(e.to_string().lines().count(), 5);
}

#[test]
fn every_missing_key_is_reported() {
    let ps = problems_of(VmSpec::from_yaml("name: a\n", Path::new("a.yaml")));
    assert_eq!(keys(&ps), ["vcpus", "memory_mib", "kernel"], "{ps:?}");
    assert!(ps.iter().all(|p| p.reason.starts_with("missing field")));

    // With defaults, only what neither gives is missing.
    let dir = TempDir::new("missing");
    dir.write(SETTINGS_FILE, "defaults:\n  vcpus: 1\n");
    dir.write("a.yaml", "name: a\nkernel: builtin\n");
    let e = load_fleet(dir.path(), None, PathBuf::new(), None).expect_err("missing");
    assert_eq!(keys(e.problems()), ["memory_mib"], "{e}");
}

#[test]
fn find_line_follows_block_nesting() {
    let text = "a: 1\nb:\n  # c: no\n  c: 2\n  d:\n    e: 3\nc: 4\ne: 5\n";
    assert_eq!(validate::find_line(text, &["a"]), Some(1));
    assert_eq!(validate::find_line(text, &["b", "c"]), Some(4));
    assert_eq!(validate::find_line(text, &["b", "d", "e"]), Some(6));
    assert_eq!(validate::find_line(text, &["c"]), Some(7));
    assert_eq!(validate::find_line(text, &["b", "e"]), Some(6));
    assert_eq!(validate::find_line(text, &["a", "x"]), None);
    assert_eq!(validate::find_line(text, &["x"]), None);
}

#[test]
fn fleet_fixtures_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let (s, specs) =
        load_fleet(&root.join("fleet"), None, PathBuf::from("/l"), None).expect("valid");
    assert_eq!(s.stop_grace, Duration::from_secs(20));
    assert_eq!(specs.len(), 2);
    assert!(specs.iter().all(|v| v.restart.backoff_max_ms == 10_000));
    let e = load_fleet(&root.join("fleet-invalid"), None, PathBuf::from("/l"), None)
        .expect_err("invalid");
    assert!(e.problems().len() >= 3, "{e}");
}

#[test]
fn a_spec_survives_the_wire_to_a_child_unchanged() {
    let text = "name: w\nvcpus: 3\nmemory_mib: 64\nkernel: builtin\ncmdline: \"a=b c\"\nconsole: off\nbuiltin:\n  then: idle\n  io_exits: 7\n  heartbeat_ms: 250\n  console: echo\nrestart:\n  policy: never\n  backoff_multiplier: 1.7\n  backoff_initial_ms: 3\n";
    let spec = VmSpec::from_yaml(text, Path::new("/x/w.yaml")).unwrap();
    let wire = spec.to_wire().unwrap();
    assert_eq!(VmSpec::from_wire(&wire).unwrap(), spec);
    assert!(VmSpec::from_wire("name: [").is_err());
}

#[test]
fn console_limits_are_read_and_checked() {
    let dir = TempDir::new("consolelimits");
    let f = dir.write(
        SETTINGS_FILE,
        "console_max_mib: 2\nconsole_rate_kib_s: 64\n",
    );
    let s = FleetSettings::load(&f, PathBuf::new()).expect("valid");
    assert_eq!((s.console_max_mib, s.console_rate_kib_s), (2, 64));
    let d = FleetSettings::defaults(PathBuf::new());
    assert_eq!((d.console_max_mib, d.console_rate_kib_s), (16, 16));
    let f = dir.write(
        "bad/fleet.yaml",
        "console_max_mib: 0\nconsole_rate_kib_s: -1\n",
    );
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert_eq!(
        keys(&ps),
        ["console_max_mib", "console_rate_kib_s"],
        "{ps:?}"
    );
    assert!(ps[0].reason.contains("must be 1..=4096"), "{ps:?}");
}

#[test]
fn alias_bombs_are_refused_with_one_line_naming_the_file() {
    let dir = TempDir::new("aliasbomb");
    let mut text = String::from("name: a\nvcpus: 1\nmemory_mib: 64\nkernel: builtin\n");
    text.push_str("x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n");
    for i in 1..8 {
        let p = format!("*x{}", i - 1);
        text.push_str(&format!("x{i}: &x{i} [{}]\n", vec![p; 10].join(", ")));
    }
    let file = dir.write("a.yaml", &text);
    let ps = problems_of(VmSpec::load(&file));
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0].file, file);
    assert!(
        ps[0].reason.contains("more than 10000 YAML nodes"),
        "{ps:?}"
    );
    let f = dir.write("s/fleet.yaml", &text.replace("name: a\n", ""));
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert!(
        ps[0].reason.contains("more than 10000 YAML nodes"),
        "{ps:?}"
    );
}

#[test]
fn cpu_quota_is_a_number_of_cpus_up_to_the_hosts() {
    let host = validate::host_cpus();
    let spec = |q: &str| {
        VmSpec::from_yaml(
            &format!("{MINIMAL}cpu_quota: {q}\n"),
            Path::new("/x/w.yaml"),
        )
    };
    assert_eq!(
        VmSpec::from_yaml(MINIMAL, Path::new("/x/w.yaml"))
            .unwrap()
            .cpu_quota,
        None
    );
    assert_eq!(spec("0.5").unwrap().cpu_quota, Some(0.5));
    assert_eq!(spec("1").unwrap().cpu_quota, Some(1.0));
    assert_eq!(
        spec(&host.to_string()).unwrap().cpu_quota,
        Some(host as f64)
    );
    for bad in ["0", "-0.5", &format!("{}.5", host), ".nan", ".inf"] {
        let ps = problems_of(spec(bad));
        assert_eq!(keys(&ps), ["cpu_quota"], "{bad}: {ps:?}");
        assert_eq!(ps[0].file, Path::new("/x/w.yaml"));
        assert!(ps[0].reason.contains("this host's CPU count"), "{ps:?}");
    }
    let ps = problems_of(spec("half"));
    assert_eq!(keys(&ps), ["cpu_quota"], "{ps:?}");

    // The supervisor applies it; the child is not told.
    let s = spec("0.5").unwrap();
    let wire = s.to_wire().unwrap();
    assert!(!wire.contains("cpu_quota"), "{wire}");
    assert_eq!(VmSpec::from_wire(&wire).unwrap().cpu_quota, None);
}

#[test]
fn cpu_quota_in_defaults_and_a_vm_file_wins() {
    let dir = TempDir::new("cpuquota");
    dir.write(SETTINGS_FILE, "defaults:\n  cpu_quota: 0.25\n");
    dir.write("a.yaml", &vm("a", 32));
    dir.write("b.yaml", &format!("{}cpu_quota: 0.5\n", vm("b", 32)));
    let (_, specs) = load_fleet(dir.path(), None, PathBuf::new(), None).expect("valid");
    assert_eq!(specs[0].cpu_quota, Some(0.25));
    assert_eq!(specs[1].cpu_quota, Some(0.5));

    dir.write(SETTINGS_FILE, "defaults:\n  cpu_quota: 0\n");
    let e = load_fleet(dir.path(), None, PathBuf::new(), None).expect_err("invalid");
    let a = e
        .problems()
        .iter()
        .find(|p| p.file.ends_with("a.yaml"))
        .expect("a.yaml's problem");
    assert_eq!(a.key, "cpu_quota");
    assert!(a.reason.contains("value from the defaults"), "{a:?}");
}

#[test]
fn cgroup_overhead_mib_setting() {
    let dir = TempDir::new("overhead");
    let d = FleetSettings::defaults(PathBuf::new());
    assert_eq!(d.cgroup_overhead_mib, DEFAULT_CGROUP_OVERHEAD_MIB);
    assert_eq!(d.cgroup_overhead_mib, 64);
    let f = dir.write(SETTINGS_FILE, "cgroup_overhead_mib: 0\n");
    let s = FleetSettings::load(&f, PathBuf::new()).expect("valid");
    assert_eq!(s.cgroup_overhead_mib, 0);
    for bad in ["-1", "65537", "lots"] {
        let f = dir.write(
            SETTINGS_FILE,
            &format!("stop_grace_s: 5\ncgroup_overhead_mib: {bad}\n"),
        );
        let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
        assert_eq!(keys(&ps), ["cgroup_overhead_mib"], "{bad}: {ps:?}");
        assert!(ps[0].reason.ends_with("(line 2)"), "{ps:?}");
    }
}

#[test]
fn settings_seccomp_on_off() {
    let dir = TempDir::new("settingsseccomp");
    let defaults = FleetSettings::defaults(PathBuf::from("/l"));
    assert!(defaults.seccomp, "seccomp is on by default");
    for (text, on) in [
        ("seccomp: off\n", false),
        ("seccomp: on\n", true),
        ("seccomp: false\n", false),
        ("seccomp: true\n", true),
        ("stop_grace_s: 5\n", true),
    ] {
        let f = dir.write(SETTINGS_FILE, text);
        let s = FleetSettings::load(&f, PathBuf::new()).expect(text);
        assert_eq!(s.seccomp, on, "{text}");
    }
    let f = dir.write(SETTINGS_FILE, "stop_grace_s: 5\nseccomp: maybe\n");
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert_eq!(keys(&ps), ["seccomp"], "{ps:?}");
    assert_eq!(ps[0].reason, "expected on or off, found `maybe` (line 2)");
    let f = dir.write(SETTINGS_FILE, "seccomp: 1\n");
    let ps = settings_problems(FleetSettings::load(&f, PathBuf::new()));
    assert!(ps[0].reason.contains("found a number"), "{ps:?}");
}

#[test]
fn the_vm_user_line_warns_when_vms_share_nobody_with_other_daemons() {
    let user = |name: &str| VmUser {
        name: name.to_string(),
        uid: 65534,
        gid: 65534,
        kvm_gid: None,
        explicit: false,
    };
    let nobody = VmUser::describe(Some(&user("nobody")));
    assert!(nobody.contains("by default"), "{nobody}");
    assert!(
        nobody.contains("every other process running as nobody"),
        "{nobody}"
    );
    let own = VmUser::describe(Some(&user("vmm-fleet")));
    assert!(!own.contains("every other process"), "{own}");
}
