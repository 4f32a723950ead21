//! A `vmm-fleet up` process under test, with every line it logs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{bin, wait_until};

/// A running supervisor and every line it logged, timestamped.
pub struct Fleet {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

/// `vmm-fleet up DIR --log-dir DIR/logs --metrics-address 127.0.0.1:0`, stdout to
/// /dev/null, stderr piped: for a test to add to (a uid, a pre_exec, ...) before
/// [`Fleet::spawn`].
pub fn up_command(dir: &Path) -> Command {
    up_command_of(Path::new(bin()), dir)
}

/// [`up_command`] with another copy of the binary (e.g. [`super::bin_for_others`]).
pub fn up_command_of(bin: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("up")
        .arg(dir)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .arg("--metrics-address")
        .arg("127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

impl Fleet {
    pub fn up(dir: &Path) -> Fleet {
        Self::up_with_metrics(dir, Some("127.0.0.1:0"))
    }

    /// Spawns `cmd` (normally from [`up_command`]).
    pub fn spawn(mut cmd: Command) -> Fleet {
        Fleet::from_child(cmd.spawn().expect("spawn up"))
    }

    /// `up` with `--metrics-address ADDR`, or with no such flag (the settings decide).
    pub fn up_with_metrics(dir: &Path, metrics_address: Option<&str>) -> Fleet {
        let mut cmd = Command::new(bin());
        cmd.arg("up")
            .arg(dir)
            .arg("--log-dir")
            .arg(dir.join("logs"));
        if let Some(a) = metrics_address {
            cmd.arg("--metrics-address").arg(a);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn up");
        Fleet::from_child(child)
    }

    /// A supervisor started by the caller, its stderr piped.
    pub fn from_child(mut child: Child) -> Fleet {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push((Instant::now(), line));
            }
        });
        Fleet { child, lines }
    }

    pub fn log(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// (time, pid) of every "starting (pid N)" line of `vm`.
    pub fn starts(&self, vm: &str) -> Vec<(Instant, u32)> {
        let prefix = format!("vm {vm}: starting (pid ");
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, l)| {
                let rest = l.split_once(&prefix)?.1;
                Some((*t, rest.trim_end_matches(')').parse().ok()?))
            })
            .collect()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .count()
    }

    pub fn wait_for(&self, limit: Duration, mut f: impl FnMut(&Fleet) -> bool) -> bool {
        wait_until(limit, || f(self))
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// The address `/metrics` is served on, from the supervisor's log.
    pub fn addr(&self) -> SocketAddr {
        let mut found = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                found = self.lines.lock().unwrap().iter().find_map(|(_, l)| {
                    l.split("metrics on http://")
                        .nth(1)?
                        .trim_end_matches("/metrics")
                        .parse()
                        .ok()
                });
                found.is_some()
            }),
            "{}",
            self.log()
        );
        found.unwrap()
    }

    pub fn pid_of(&self, vm: &str) -> u32 {
        self.starts(vm).last().map(|s| s.1).expect("vm started")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
