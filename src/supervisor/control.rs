//! The control socket server: a Unix stream socket (mode 0660, group = the service's),
//! one listener thread, one short-lived thread per connection (at most
//! [`MAX_CONNECTIONS`]). Each connection's peer (SO_PEERCRED) must be root, the
//! service's user or a member of the socket's group; its one request line (at most
//! [`MAX_REQUEST_LINE`] bytes, read within [`READ_TIMEOUT`]) is parsed here and handed
//! to the event loop as [`Event::Control`], whose answer goes back as one line. `console`
//! and `logs` connections, once the loop knows the VM, go on to
//! [`console::serve_console`] / [`console::serve_logs`].
//!
//! Nothing a client does (connect and say nothing, send a giant line, open hundreds of
//! connections) reaches the event loop before its line is whole and valid, and the loop
//! never waits on a client: it answers on a channel.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Uid};

use super::Event;
use super::console::{self, Consoles};
use crate::control::{
    Command, MAX_REQUEST_LINE, PERMISSION_DENIED, RequestError, Response, parse_request,
};

/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send its request line (and to take an answer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection waits for the event loop's answer (a reload's load included).
pub const LOOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A request for the event loop, with where its answer goes.
pub struct ControlRequest {
    /// The command.
    pub command: Command,
    /// The peer's uid (for the log).
    pub uid: u32,
    /// Where the loop sends the answer (once; a dropped sender answers "no answer").
    pub reply: SyncSender<Response>,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process answers on the socket.
    #[error(
        "control socket {0}: another vmm-fleet answers there (stop it, or give this one \
         --control PATH)"
    )]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("control socket {0}: the path exists and is not a socket; not replaced")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("control socket {path}: {what}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl ControlError {
    /// A mapper of an `io::Error` while doing `what` with the socket at `path`.
    fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> ControlError + 'a {
        move |source| ControlError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}

/// A line for the supervisor's log: priority, text.
pub type LogFn = Arc<dyn Fn(u8, &str) + Send + Sync>;

/// The running server (its listener thread lives as long as the process).
pub struct ControlServer {
    path: PathBuf,
    /// A copy of the listening socket, handed to the next program at reexec.
    listener: Option<std::os::fd::OwnedFd>,
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Listen on `path` (a stale socket of a dead fleet is replaced; a live one is
    /// refused), mode 0660, group the process's; requests go to the loop on `events`.
    pub fn start(
        path: &Path,
        events: Sender<Event>,
        consoles: Arc<Consoles>,
        log: LogFn,
    ) -> Result<ControlServer, ControlError> {
        let io_err = |what| ControlError::io(path, what);
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            fs::create_dir_all(dir).map_err(io_err("creating its directory"))?;
        }
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(io_err("bind"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))
            .map_err(io_err("chmod 0660"))?;
        Self::serve(path, listener, events, consoles, log)
    }

    /// Serve on `fd`, the listening socket at `path` that the program this one replaced
    /// handed over at reexec (connections made meanwhile wait in its backlog).
    pub fn start_adopting(
        path: &Path,
        fd: std::os::fd::OwnedFd,
        events: Sender<Event>,
        consoles: Arc<Consoles>,
        log: LogFn,
    ) -> Result<ControlServer, ControlError> {
        Self::serve(path, UnixListener::from(fd), events, consoles, log)
    }

    fn serve(
        path: &Path,
        listener: UnixListener,
        events: Sender<Event>,
        consoles: Arc<Consoles>,
        log: LogFn,
    ) -> Result<ControlServer, ControlError> {
        let io_err = |what| ControlError::io(path, what);
        let copy = std::os::fd::AsFd::as_fd(&listener)
            .try_clone_to_owned()
            .ok();
        // The group is the process's unless the directory is setgid; chown only then
        // (the packaged unit's syscall filter refuses chown: it never needs it).
        let egid = nix::unistd::getegid();
        let mut gid = fs::metadata(path).map_err(io_err("stat"))?.gid();
        if gid != egid.as_raw() {
            match nix::unistd::chown(path, None, Some(egid)) {
                Ok(()) => gid = egid.as_raw(),
                Err(e) => log(
                    4,
                    &format!(
                        "control socket {}: chgrp to gid {egid}: {e}",
                        path.display()
                    ),
                ),
            }
        }
        let shared = Arc::new(Shared {
            events,
            consoles,
            log,
            gid,
            uid: nix::unistd::geteuid().as_raw(),
            active: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(io_err("starting its thread"))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener: copy,
            shared,
        })
    }

    /// A copy of the listening socket (close-on-exec), for the next program at reexec.
    pub fn listener(&self) -> Option<std::os::fd::OwnedFd> {
        self.listener.as_ref()?.try_clone().ok()
    }

    /// Connections being served now (a reexec waits for them to be answered), not
    /// counting `console` and `logs` sessions past their answer: those last until their
    /// client leaves, and the exec cuts them.
    pub fn busy(&self) -> usize {
        let sessions = self.shared.sessions.load(Ordering::SeqCst);
        self.shared
            .active
            .load(Ordering::SeqCst)
            .saturating_sub(sessions)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the socket file (the fleet exits).
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A socket file at `path` with nobody answering (a fleet that died) is removed; one that
/// answers is another fleet's; anything else is not ours to remove.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Io {
                path: path.to_path_buf(),
                what: "stat",
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| ControlError::Io {
                path: path.to_path_buf(),
                what: "removing the stale socket",
                source,
            })
        }
        Err(source) => Err(ControlError::Io {
            path: path.to_path_buf(),
            what: "checking the existing socket",
            source,
        }),
    }
}

struct Shared {
    events: Sender<Event>,
    consoles: Arc<Consoles>,
    log: LogFn,
    /// The socket's group.
    gid: u32,
    /// The service's user.
    uid: u32,
    active: AtomicUsize,
    /// Of `active`, the `console` / `logs` sessions (answered, open until the client
    /// leaves).
    sessions: AtomicUsize,
}

/// Counts a connection while it is served.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                (shared.log)(4, &format!("control socket: accept: {e}"));
                // E.g. EMFILE: do not spin on it.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            busy(&stream);
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                let _slot = Slot(&s.active);
                serve(stream, &s);
            });
        if let Err(e) = spawned {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            (shared.log)(4, &format!("control socket: cannot start a thread: {e}"));
        }
    }
}

/// Too many connections: one error line, without ever waiting on the client.
fn busy(mut stream: &UnixStream) {
    let _ = stream.set_nonblocking(true);
    let line = Response::error(format!(
        "too many control connections (at most {MAX_CONNECTIONS}); try again"
    ))
    .to_line();
    let _ = stream.write_all(line.as_bytes());
}

/// Whether `uid`/`gid`/pid `pid` may use a socket of group `sock_gid` served by
/// `service_uid`: root, the service's user, or a member of the group (the process's
/// groups from /proc, else the user's from the group database).
fn authorized(uid: u32, gid: u32, pid: i32, service_uid: u32, sock_gid: u32) -> bool {
    if uid == 0 || uid == service_uid || gid == sock_gid {
        return true;
    }
    if let Some(groups) = proc_groups(pid) {
        return groups.contains(&sock_gid);
    }
    // /proc/PID of another user may be hidden (ProtectProc=invisible).
    user_groups(uid).is_some_and(|g| g.contains(&sock_gid))
}

/// The supplementary groups of process `pid` (`Groups:` of /proc/PID/status).
fn proc_groups(pid: i32) -> Option<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The groups of user `uid` in the group database.
fn user_groups(uid: u32) -> Option<Vec<u32>> {
    let user = nix::unistd::User::from_uid(Uid::from_raw(uid)).ok()??;
    let name = std::ffi::CString::new(user.name).ok()?;
    let groups = nix::unistd::getgrouplist(&name, user.gid).ok()?;
    Some(groups.into_iter().map(Gid::as_raw).collect())
}

fn send_line(mut stream: &UnixStream, resp: &Response) {
    let _ = stream.write_all(resp.to_line().as_bytes());
}

/// Read one line of at most [`MAX_REQUEST_LINE`] bytes.
fn read_line(stream: &UnixStream) -> Result<String, String> {
    let mut buf = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_LINE as u64 + 1);
    match reader.read_until(b'\n', &mut buf) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(format!("no request line within {READ_TIMEOUT:?}"));
        }
        Err(e) => return Err(format!("reading the request: {e}")),
    }
    if buf.len() > MAX_REQUEST_LINE {
        return Err(format!(
            "request line longer than {} KiB",
            MAX_REQUEST_LINE / 1024
        ));
    }
    if buf.last() != Some(&b'\n') {
        return Err("the request line ended without a newline".into());
    }
    String::from_utf8(buf).map_err(|_| "the request line is not UTF-8".into())
}

fn serve(stream: UnixStream, shared: &Shared) {
    let cred = match getsockopt(&stream, PeerCredentials) {
        Ok(c) => c,
        Err(e) => {
            (shared.log)(
                4,
                &format!("control: cannot read the peer's credentials: {e}"),
            );
            send_line(&stream, &Response::error(PERMISSION_DENIED));
            return;
        }
    };
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    if !authorized(uid, gid, pid, shared.uid, shared.gid) {
        (shared.log)(
            4,
            &format!(
                "control: permission denied to uid {uid} (pid {pid}): not root, the service's \
                 user or in group {}",
                shared.gid
            ),
        );
        send_line(&stream, &Response::error(PERMISSION_DENIED));
        return;
    }
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let line = match read_line(&stream) {
        Ok(l) => l,
        Err(e) => {
            (shared.log)(4, &format!("control: uid {uid} (pid {pid}): {e}"));
            send_line(&stream, &Response::error(e));
            return;
        }
    };
    let req = match parse_request(line.trim_end()) {
        Ok(r) => r,
        Err(e) => {
            let prio = if matches!(e, RequestError::Version { .. }) {
                4
            } else {
                6
            };
            (shared.log)(prio, &format!("control: uid {uid} (pid {pid}): {e}"));
            send_line(&stream, &Response::error(e.to_string()));
            return;
        }
    };
    let cmd = req.command;
    let what = match cmd.vm() {
        Some(vm) => format!("{} {vm}", cmd.name()),
        None => cmd.name().to_string(),
    };
    (shared.log)(6, &format!("control: uid {uid} (pid {pid}): {what}"));
    let resp = ask_loop(shared, cmd.clone(), uid);
    let _session = matches!(
        (&cmd, resp.ok),
        (Command::Console { .. } | Command::Logs { .. }, true)
    )
    .then(|| {
        shared.sessions.fetch_add(1, Ordering::SeqCst);
        Slot(&shared.sessions)
    });
    match (&cmd, resp.ok) {
        (Command::Console { vm }, true) => {
            let _ = stream.set_read_timeout(None);
            let _ = console::serve_console(stream, vm, &shared.consoles);
        }
        (Command::Logs { follow, .. }, true) => {
            let _ = stream.set_read_timeout(None);
            let file = resp
                .vms
                .as_ref()
                .and_then(|v| v.first())
                .map(|v| v.console_file.clone());
            match file {
                Some(f) => {
                    let _ = console::serve_logs(stream, &f, *follow);
                }
                None => send_line(&stream, &Response::error("no console file known")),
            }
        }
        _ => send_line(&stream, &resp),
    }
}

/// Hand `cmd` to the event loop and wait (bounded) for its answer.
fn ask_loop(shared: &Shared, command: Command, uid: u32) -> Response {
    let (tx, rx) = mpsc::sync_channel(1);
    let req = ControlRequest {
        command,
        uid,
        reply: tx,
    };
    if shared.events.send(Event::Control(Box::new(req))).is_err() {
        return Response::error("the supervisor is shutting down");
    }
    match rx.recv_timeout(LOOP_TIMEOUT) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Response::error(format!(
            "the supervisor did not answer within {LOOP_TIMEOUT:?}"
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Response::error("the supervisor dropped the request (it is shutting down)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_allowed_by_uid_gid_or_group_membership() {
        assert!(authorized(0, 0, 1, 1000, 1000), "root");
        assert!(authorized(1000, 5, 1, 1000, 1000), "the service's user");
        assert!(authorized(7, 1000, 1, 1000, 1000), "primary group");
        let me = std::process::id() as i32;
        let mine = proc_groups(me).unwrap();
        if let Some(&g) = mine.first() {
            assert!(authorized(4242, 4242, me, 1000, g), "a supplementary group");
        }
        assert!(!authorized(65534, 65534, me, 1000, 999_999), "outsider");
    }

    #[test]
    fn an_open_console_session_does_not_hold_a_reexec_back() {
        // A reexec waits (up to DRAIN_LIMIT, with the event loop stalled) until busy()
        // is 0, so that answers already given are written out. A console or `logs -f`
        // client stays connected until it leaves: counted there, every reexec with one
        // attached waited the whole limit.
        use crate::control::Request;
        let dir = std::env::temp_dir().join(format!("vmm-fleet-ctl-busy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (tx, rx) = mpsc::channel();
        let consoles = Arc::new(Consoles::default());
        let server =
            ControlServer::start(&path, tx, consoles.clone(), Arc::new(|_, _| {})).unwrap();
        // The event loop: every request is answered ok.
        std::thread::spawn(move || {
            for ev in rx {
                if let Event::Control(req) = ev {
                    let _ = req.reply.send(Response::ok());
                }
            }
        });
        let mut client = UnixStream::connect(&path).unwrap();
        let line =
            serde_json::to_string(&Request::new(Command::Console { vm: "a".into() })).unwrap();
        client.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(&client).read_line(&mut answer).unwrap();
        assert!(answer.contains("\"ok\":true"), "{answer}");
        assert_eq!(consoles.watchers("a"), 1, "attached");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.busy() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            server.busy(),
            0,
            "an attached console is not a request in flight"
        );
        assert_eq!(consoles.watchers("a"), 1, "and it is still attached");
        drop(client);
        server.remove();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_refused_a_file_kept() {
        let dir = std::env::temp_dir().join(format!("vmm-fleet-ctl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let live = UnixListener::bind(&path).unwrap();
        assert!(matches!(remove_stale(&path), Err(ControlError::InUse(_))));
        drop(live);
        remove_stale(&path).unwrap();
        assert!(!path.exists());
        fs::write(&path, "x").unwrap();
        assert!(matches!(
            remove_stale(&path),
            Err(ControlError::NotASocket(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
