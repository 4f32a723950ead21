//! The control socket's wire format (versioned, line-delimited JSON) and a small client
//! for it: what `vmm-fleet status / stop / start ...` send to a running `vmm-fleet up`,
//! and what scripts can speak without the CLI (the README tables every command).
//!
//! A client sends ONE line, a JSON object `{"version":1,"command":"NAME",...}`, and gets
//! ONE line back: `{"version":1,"ok":true,...}` or `{"version":1,"ok":false,"error":"..."}`.
//! For `console` and `logs` the connection then carries raw bytes. This module imports
//! nothing else of the crate.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod cli;
pub mod console;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The longest request line a server reads (a longer one is refused).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// The longest answer line a client reads (a `status` of thousands of VMs fits).
pub const MAX_RESPONSE_LINE: usize = 64 * 1024 * 1024;

/// The socket's file name in its directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Where the packaged service listens (`RuntimeDirectory=vmm-fleet`).
pub const PACKAGED_SOCKET: &str = "/run/vmm-fleet/control.sock";

/// The environment variable a client (and `up`) reads for the socket's path.
pub const SOCKET_ENV: &str = "VMM_FLEET_CONTROL";

/// A request: the version and the command with its arguments, flattened into one
/// object (`{"version":1,"command":"stop","vm":"web-1"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version the client speaks ([`VERSION`]).
    pub version: u32,
    /// The command and its arguments.
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// A request of this version for `command`.
    pub fn new(command: Command) -> Self {
        Request {
            version: VERSION,
            command,
        }
    }
}

/// Every command, tagged by `"command"`; per-VM ones carry `"vm"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Every VM's state, or one VM's (`"vm"` optional).
    Status {
        /// One VM only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Graceful stop; the VM stays down until `start`.
    Stop {
        /// The VM.
        vm: String,
    },
    /// Start a stopped VM.
    Start {
        /// The VM.
        vm: String,
    },
    /// Graceful stop, then start.
    Restart {
        /// The VM.
        vm: String,
    },
    /// SIGKILL, no grace; the VM stays down until `start`.
    Kill {
        /// The VM.
        vm: String,
    },
    /// Park the VM's vCPUs.
    Pause {
        /// The VM.
        vm: String,
    },
    /// Run them again.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Clear a failed VM's start limit and start it.
    ResetFailed {
        /// The VM.
        vm: String,
    },
    /// Reread the VM directory (as SIGHUP); answers with what changed.
    Reload,
    /// Exec the supervisor's binary again, VMs kept running.
    Reexec,
    /// Attach to the VM's serial console (raw bytes follow the answer).
    Console {
        /// The VM.
        vm: String,
    },
    /// The VM's console file (raw bytes follow the answer).
    Logs {
        /// The VM.
        vm: String,
        /// Keep sending what is appended.
        #[serde(default)]
        follow: bool,
    },
}

impl Command {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status { .. } => "status",
            Command::Stop { .. } => "stop",
            Command::Start { .. } => "start",
            Command::Restart { .. } => "restart",
            Command::Kill { .. } => "kill",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::ResetFailed { .. } => "reset-failed",
            Command::Reload => "reload",
            Command::Reexec => "reexec",
            Command::Console { .. } => "console",
            Command::Logs { .. } => "logs",
        }
    }

    /// The VM it names, if any.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Command::Status { vm } => vm.as_deref(),
            Command::Stop { vm }
            | Command::Start { vm }
            | Command::Restart { vm }
            | Command::Kill { vm }
            | Command::Pause { vm }
            | Command::Resume { vm }
            | Command::ResetFailed { vm }
            | Command::Console { vm }
            | Command::Logs { vm, .. } => Some(vm),
            Command::Reload | Command::Reexec => None,
        }
    }
}

/// One VM in a `status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Its name.
    pub name: String,
    /// `starting`, `running`, `paused`, `stopping`, `backoff`, `stopped`,
    /// `stopped-by-user` or `failed`.
    pub state: String,
    /// Its child's pid, while it has one.
    pub pid: Option<u32>,
    /// Seconds since its child started, while it has one.
    pub uptime_s: Option<f64>,
    /// Restarts by its restart policy (kept across edits of its file).
    pub restarts: u64,
    /// How its last child ended (`"guest powered off (exit code 0)"`), if one did.
    pub last_exit: Option<String>,
    /// The same as a shell's number: the exit status, or 128 + the signal.
    pub last_exit_status: Option<i64>,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The file its serial console is written to.
    pub console_file: PathBuf,
}

/// What a `reload` changed (VM names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// VMs started because their file is new.
    pub added: Vec<String>,
    /// VMs stopped and forgotten because their file is gone.
    pub removed: Vec<String>,
    /// VMs whose file changed (restarted, unless stopped by a user).
    pub changed: Vec<String>,
}

/// An answer line. `ok:false` always has `error`; the other fields belong to the
/// command that was asked (absent otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The protocol version the server speaks.
    pub version: u32,
    /// Whether the command was carried out.
    pub ok: bool,
    /// Why not (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `status`: the VMs, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<VmInfo>>,
    /// `reload`: what changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
    /// Per-VM commands: the VM's state after the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `console`: `rw` (this client types) or `ro` (it watches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `status` and `reexec`: the program answering (a `reexec` client waits until a
    /// program with more reexecs behind it answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<Program>,
}

/// The supervisor program answering a request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Program {
    /// Its version (`vmm-fleet --version`).
    pub version: String,
    /// Reexecs since the fleet was started (0 for the program `up` started).
    pub reexecs: u64,
}

impl Response {
    /// `{"version":1,"ok":true}`.
    pub fn ok() -> Self {
        Response {
            version: VERSION,
            ok: true,
            error: None,
            vms: None,
            reload: None,
            state: None,
            mode: None,
            program: None,
        }
    }

    /// `{"version":1,"ok":false,"error":MSG}`.
    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Response::ok()
        }
    }

    /// The answer as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"version":{VERSION},"ok":false,"error":"cannot encode the answer: {e}"}}"#)
        });
        s.push('\n');
        s
    }
}

/// Why a request line is refused before its command is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a JSON object with a numeric `version`.
    #[error("bad request: {0}")]
    Malformed(String),
    /// Another protocol version.
    #[error(
        "protocol version {theirs} is not supported: this vmm-fleet speaks version {ours} \
         (update the {side} to match)"
    )]
    Version {
        /// The request's.
        theirs: u64,
        /// [`VERSION`].
        ours: u32,
        /// Which side is older: `client` or `daemon`.
        side: &'static str,
    },
}

/// Parse a request line: its version first (so a newer client's unknown command is
/// reported as a version mismatch), then the command.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u64,
    }
    let v: Versioned = serde_json::from_str(line).map_err(|e| {
        RequestError::Malformed(format!(
            "expected {{\"version\":{VERSION},\"command\":...}}: {e}"
        ))
    })?;
    if v.version != u64::from(VERSION) {
        return Err(RequestError::Version {
            theirs: v.version,
            ours: VERSION,
            side: if v.version > u64::from(VERSION) {
                "daemon"
            } else {
                "client"
            },
        });
    }
    serde_json::from_str(line).map_err(|e| RequestError::Malformed(e.to_string()))
}

/// What a client can run into.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error(
        "no vmm-fleet control socket at {0} (is `vmm-fleet up` running? --control PATH or \
         ${SOCKET_ENV} names another)"
    )]
    Missing(PathBuf),
    /// The socket's permissions, or the daemon's peer check, refused us.
    #[error("permission denied on {0} (root, the service's user or its group only)")]
    PermissionDenied(PathBuf),
    /// No answer in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(PathBuf, Duration),
    /// The daemon speaks another version.
    #[error("{0}")]
    Version(String),
    /// The daemon refused the command.
    #[error("{0}")]
    Refused(String),
    /// Talking to it failed.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Its answer is not one of ours.
    #[error("{0}: unreadable answer: {1}")]
    BadAnswer(PathBuf, String),
}

/// Send `req` on the socket at `path` and read the answer line, all within `timeout`
/// per read or write. Returns the answer and the connection (for `console` and `logs`,
/// whose bytes follow). An `ok:false` answer is an error ([`ClientError::Refused`],
/// [`ClientError::PermissionDenied`] or [`ClientError::Version`]).
pub fn connect(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<(Response, BufReader<UnixStream>), ClientError> {
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::WouldBlock || source.kind() == io::ErrorKind::TimedOut {
            ClientError::Timeout(path.to_path_buf(), timeout)
        } else {
            ClientError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::Missing(path.to_path_buf())
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_path_buf()),
        _ => io_err(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut answer = Vec::new();
    (&mut reader)
        .take(MAX_RESPONSE_LINE as u64)
        .read_until(b'\n', &mut answer)
        .map_err(io_err)?;
    if answer.is_empty() {
        return Err(ClientError::BadAnswer(
            path.to_path_buf(),
            "the connection closed without an answer".into(),
        ));
    }
    // The version first: a newer daemon's answer may not fit this build's fields.
    #[derive(Deserialize)]
    struct Versioned {
        version: u64,
    }
    if let Ok(v) = serde_json::from_slice::<Versioned>(&answer)
        && v.version != u64::from(VERSION)
    {
        return Err(ClientError::Version(format!(
            "the daemon speaks control protocol version {}, this vmm-fleet {VERSION}: use the \
             vmm-fleet binary of the running service",
            v.version
        )));
    }
    let resp: Response = serde_json::from_slice(&answer).map_err(|e| {
        ClientError::BadAnswer(
            path.to_path_buf(),
            format!("{e}: {}", String::from_utf8_lossy(&answer).trim_end()),
        )
    })?;
    if !resp.ok {
        let msg = resp
            .error
            .unwrap_or_else(|| "refused (no reason given)".into());
        return Err(if msg == PERMISSION_DENIED {
            ClientError::PermissionDenied(path.to_path_buf())
        } else if msg.starts_with("protocol version") {
            ClientError::Version(msg)
        } else {
            ClientError::Refused(msg)
        });
    }
    Ok((resp, reader))
}

/// The error text of a peer the daemon does not serve.
pub const PERMISSION_DENIED: &str = "permission denied";

/// [`connect`] for commands whose whole answer is the line.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    connect(path, req, timeout).map(|(r, _)| r)
}

/// The socket a client talks to: `flag`, else `$VMM_FLEET_CONTROL`, else the packaged
/// service's ([`PACKAGED_SOCKET`]).
pub fn client_socket(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(PACKAGED_SOCKET))
}

/// The socket `up` listens on: `flag`, else `$RUNTIME_DIRECTORY/control.sock` (systemd's
/// `RuntimeDirectory=`; the first of its paths), else `LOG_DIR/control.sock`.
pub fn server_socket(flag: Option<PathBuf>, log_dir: &Path) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(dirs) = std::env::var_os("RUNTIME_DIRECTORY")
        && let Some(first) = dirs.to_string_lossy().split(':').find(|d| !d.is_empty())
    {
        return Path::new(first).join(SOCKET_NAME);
    }
    log_dir.join(SOCKET_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_in_the_documented_shape() {
        let r = Request::new(Command::ResetFailed { vm: "web-1".into() });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"command":"reset-failed","vm":"web-1"}"#
        );
        assert_eq!(parse_request(&line).unwrap(), r);
        let s = serde_json::to_string(&Request::new(Command::Status { vm: None })).unwrap();
        assert_eq!(s, r#"{"version":1,"command":"status"}"#);
        assert_eq!(
            parse_request(r#"{"version":1,"command":"logs","vm":"a"}"#).unwrap(),
            Request::new(Command::Logs {
                vm: "a".into(),
                follow: false
            })
        );
        assert_eq!(
            parse_request(r#"{"command":"reload","version":1}"#).unwrap(),
            Request::new(Command::Reload)
        );
    }

    #[test]
    fn bad_lines_and_other_versions_are_named() {
        let e = parse_request(r#"{"version":99,"command":"fly"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "protocol version 99 is not supported: this vmm-fleet speaks version 1 \
             (update the daemon to match)"
        );
        let e = parse_request(r#"{"version":0,"command":"status"}"#).unwrap_err();
        assert!(e.to_string().contains("update the client"), "{e}");
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"version":"1"}"#,
            r#"{"version":1}"#,
            r#"{"version":1,"command":"fly"}"#,
            r#"{"version":1,"command":"stop"}"#,
            r#"{"version":1,"command":"stop","vm":"a","force":true}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(matches!(e, RequestError::Malformed(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn answers_omit_what_the_command_did_not_ask() {
        assert_eq!(Response::ok().to_line(), "{\"version\":1,\"ok\":true}\n");
        assert_eq!(
            Response::error("vm a is already stopped").to_line(),
            "{\"version\":1,\"ok\":false,\"error\":\"vm a is already stopped\"}\n"
        );
    }

    /// A one-connection daemon at a fresh path that reads the request line and answers
    /// `answer` (none: it never answers).
    fn fake_daemon(name: &str, answer: Option<&'static str>) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmm-fleet-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            match answer {
                Some(a) => (&s).write_all(a.as_bytes()).unwrap(),
                None => std::thread::sleep(Duration::from_secs(5)),
            }
        });
        path
    }

    #[test]
    fn a_daemon_of_another_version_or_silent_is_a_clear_error_never_a_hang() {
        let status = Request::new(Command::Status { vm: None });
        let p = fake_daemon("v2", Some("{\"version\":2,\"ok\":true,\"vms\":7}\n"));
        let e = request(&p, &status, Duration::from_secs(5)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the daemon speaks control protocol version 2, this vmm-fleet 1: use the \
             vmm-fleet binary of the running service"
        );
        let p = fake_daemon("silent", None);
        let t = std::time::Instant::now();
        let e = request(&p, &status, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout(..)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        let p = fake_daemon(
            "denied",
            Some("{\"version\":1,\"ok\":false,\"error\":\"permission denied\"}\n"),
        );
        let e = request(&p, &status, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ClientError::PermissionDenied(_)), "{e}");
        let e = request(
            Path::new("/nonexistent/x.sock"),
            &status,
            Duration::from_secs(1),
        );
        assert!(matches!(e, Err(ClientError::Missing(_))));
    }
}
