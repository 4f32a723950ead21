//! The control commands of the `vmm-fleet` CLI (`status`, `stop`, `start`, ...): one
//! request each on the control socket, the answer printed (a table, JSON, or the VM's
//! state), any error as one line on stderr and a non-zero exit status.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{ClientError, Command, ReloadReport, Request, VmInfo, client_socket, request};

/// How long a command waits for the daemon (its answer comes at once).
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// How long `reload` waits (the daemon reads and validates the whole directory first).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(75);

fn fail(e: &ClientError) -> ExitCode {
    eprintln!("vmm-fleet: {e}");
    ExitCode::FAILURE
}

/// `vmm-fleet status [--json] [NAME]`.
pub fn status(control: Option<PathBuf>, name: Option<String>, json: bool) -> ExitCode {
    let path = client_socket(control);
    let resp = match request(&path, &Request::new(Command::Status { vm: name }), TIMEOUT) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let vms = resp.vms.unwrap_or_default();
    if json {
        match serde_json::to_string(&vms) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("vmm-fleet: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", table(&vms));
    }
    ExitCode::SUCCESS
}

/// A per-VM command (`stop NAME`, ...): prints `vm NAME: STATE` (its state after).
pub fn vm(control: Option<PathBuf>, cmd: Command) -> ExitCode {
    let path = client_socket(control);
    let name = cmd.vm().unwrap_or_default().to_string();
    match request(&path, &Request::new(cmd), TIMEOUT) {
        Ok(r) => {
            println!("vm {name}: {}", r.state.as_deref().unwrap_or("ok"));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `vmm-fleet reload`: prints what changed.
pub fn reload(control: Option<PathBuf>) -> ExitCode {
    let path = client_socket(control);
    match request(&path, &Request::new(Command::Reload), RELOAD_TIMEOUT) {
        Ok(r) => {
            println!("{}", describe_reload(&r.reload.unwrap_or_default()));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// How long `reexec` waits for the new program to answer.
pub const REEXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// `vmm-fleet reexec`: asks for the reexec (refused with a message if the new binary
/// cannot take over), then waits until the new program answers `status` (a program
/// with more reexecs behind it than the one that said yes). Exit status 0 only then: a
/// package's script falls back to a restart otherwise.
pub fn reexec(control: Option<PathBuf>) -> ExitCode {
    let path = client_socket(control);
    let old = match request(&path, &Request::new(Command::Reexec), RELOAD_TIMEOUT) {
        Ok(r) => r.program.unwrap_or_default(),
        Err(e) => return fail(&e),
    };
    let deadline = std::time::Instant::now() + REEXEC_TIMEOUT;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        match request(&path, &Request::new(Command::Status { vm: None }), TIMEOUT) {
            Ok(r) => {
                if let Some(p) = r.program.filter(|p| p.reexecs > old.reexecs) {
                    let n = r.vms.map_or(0, |v| v.len());
                    println!(
                        "reexec: done: vmm-fleet {} runs the fleet now (was {}); {n} VM(s)",
                        p.version, old.version
                    );
                    return ExitCode::SUCCESS;
                }
            }
            Err(e) => last = Some(e.to_string()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "vmm-fleet: reexec: the new program did not answer within {}s{}; see the fleet's log",
        REEXEC_TIMEOUT.as_secs(),
        last.map(|e| format!(" (last: {e})")).unwrap_or_default()
    );
    ExitCode::FAILURE
}

/// `reload: added a, b; removed c; changed d` (or `reload: nothing changed`).
pub fn describe_reload(r: &ReloadReport) -> String {
    let parts: Vec<String> = [
        ("added", &r.added),
        ("removed", &r.removed),
        ("changed", &r.changed),
    ]
    .iter()
    .filter(|(_, names)| !names.is_empty())
    .map(|(what, names)| format!("{what} {}", names.join(", ")))
    .collect();
    if parts.is_empty() {
        "reload: nothing changed".into()
    } else {
        format!("reload: {}", parts.join("; "))
    }
}

/// `3d04h`, `2h05m`, `4m07s`, `12s`.
pub fn fmt_uptime(s: f64) -> String {
    let s = s.max(0.0) as u64;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// The status table: a header, then one row per VM, columns aligned.
pub fn table(vms: &[VmInfo]) -> String {
    let header = [
        "NAME",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "VCPUS",
        "MEMORY",
        "CONSOLE",
    ];
    let dash = || "-".to_string();
    let rows: Vec<[String; 9]> = vms
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.state.clone(),
                v.pid.map_or_else(dash, |p| p.to_string()),
                v.uptime_s.map_or_else(dash, fmt_uptime),
                v.restarts.to_string(),
                v.last_exit.clone().unwrap_or_else(dash),
                v.vcpus.to_string(),
                format!("{} MiB", v.memory_mib),
                v.console_file.display().to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let last = cells.len() - 1;
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i == last {
                let _ = writeln!(out, "{c}");
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
    };
    line(&header.map(String::from));
    for r in &rows {
        line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_and_reload_reports_read_well() {
        assert_eq!(fmt_uptime(12.7), "12s");
        assert_eq!(fmt_uptime(247.0), "4m07s");
        assert_eq!(fmt_uptime(7500.0), "2h05m");
        assert_eq!(fmt_uptime(3.0 * 86_400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(
            describe_reload(&ReloadReport::default()),
            "reload: nothing changed"
        );
        let r = ReloadReport {
            added: vec!["a".into(), "b".into()],
            removed: vec![],
            changed: vec!["d".into()],
        };
        assert_eq!(describe_reload(&r), "reload: added a, b; changed d");
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let vm = |name: &str, pid| VmInfo {
            name: name.into(),
            state: "running".into(),
            pid,
            uptime_s: pid.map(|_| 65.0),
            restarts: 2,
            last_exit: None,
            last_exit_status: None,
            vcpus: 1,
            memory_mib: 16,
            console_file: PathBuf::from(format!("/logs/{name}.console")),
        };
        let t = table(&[vm("a", Some(1234)), vm("long-name", None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAME       STATE    PID   UPTIME"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("a          running  1234  1m05s "),
            "{t}"
        );
        assert!(lines[2].contains("long-name  running  -     -"), "{t}");
        assert!(lines[2].ends_with("/logs/long-name.console"), "{t}");
    }
}
