//! The client side of `vmm-fleet console` and `vmm-fleet logs`: one request line on the
//! control socket, one answer line, then raw bytes. `console` puts the terminal in raw
//! mode (restored on every way out: detach, the supervisor closing, an error, a signal,
//! a panic), copies the terminal to the socket and the socket to the terminal, and
//! detaches on Ctrl-] as `virsh console` does.

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, OutputFlags, SetArg, Termios};

/// The control protocol version this client speaks.
pub const VERSION: u64 = 1;

/// How long the client waits for the supervisor's answer line.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a keystroke may wait for the supervisor to take it.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The detach key: Ctrl-] (as `virsh console`, `telnet`).
pub const ESCAPE: u8 = 0x1d;

/// Longest answer line accepted.
const ANSWER_MAX: usize = 64 * 1024;

/// Why a console or logs client stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to the control socket {}: {source}{hint}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// The supervisor refused the request (its one-line reason).
    #[error("{0}")]
    Refused(String),
    /// The supervisor speaks another protocol version.
    #[error(
        "the supervisor speaks control protocol version {theirs}, this vmm-fleet speaks \
         {VERSION}: use the vmm-fleet binary of the running supervisor"
    )]
    Version {
        /// The supervisor's version.
        theirs: String,
    },
    /// No answer in time.
    #[error("no answer from the supervisor within {} s", ANSWER_TIMEOUT.as_secs())]
    Timeout,
    /// An answer that is not the protocol's.
    #[error("the supervisor's answer is not understood: {0}")]
    BadAnswer(String),
    /// The terminal, the socket or a signal handler failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { context, source }
}

/// Connects to the control socket at `path`.
pub fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| {
        let hint = match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                " (is `vmm-fleet up` running? --control names its socket)"
            }
            io::ErrorKind::PermissionDenied => {
                " (run as root, the service's user or a member of the socket's group)"
            }
            _ => "",
        };
        ClientError::Connect {
            path: path.to_path_buf(),
            source,
            hint,
        }
    })
}

/// Sends the request `{"version":1,"command":COMMAND,"vm":VM, EXTRA...}` and reads the
/// answer line; returns it when it says `ok`.
pub fn request(
    stream: &UnixStream,
    command: &str,
    vm: &str,
    extra: &[(&str, serde_json::Value)],
) -> Result<serde_json::Map<String, serde_json::Value>, ClientError> {
    let mut req = serde_json::Map::new();
    req.insert("version".into(), VERSION.into());
    req.insert("command".into(), command.into());
    req.insert("vm".into(), vm.into());
    for (k, v) in extra {
        req.insert((*k).into(), v.clone());
    }
    let mut line = serde_json::Value::Object(req).to_string();
    line.push('\n');
    stream
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(io_err("setting the socket's timeouts"))?;
    (&*stream)
        .write_all(line.as_bytes())
        .map_err(io_err("sending the request"))?;
    let answer = read_line(stream)?;
    stream
        .set_read_timeout(None)
        .map_err(io_err("setting the socket's timeouts"))?;
    parse_answer(&answer)
}

/// Reads one line, byte by byte: what follows it is the raw stream, not to be buffered
/// away here.
fn read_line(stream: &UnixStream) -> Result<Vec<u8>, ClientError> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match (&*stream).read(&mut b) {
            Ok(0) => {
                return Err(ClientError::BadAnswer(if line.is_empty() {
                    "the connection closed without an answer".into()
                } else {
                    "the connection closed in the middle of the answer".into()
                }));
            }
            Ok(_) if b[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= ANSWER_MAX => {
                return Err(ClientError::BadAnswer("answer line too long".into()));
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout);
            }
            Err(e) => return Err(io_err("reading the answer")(e)),
        }
    }
}

/// An answer line: its version checked first, then `ok`.
fn parse_answer(line: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ClientError> {
    let text = String::from_utf8_lossy(line);
    let shown = || text.chars().take(200).collect::<String>();
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(line)
    else {
        return Err(ClientError::BadAnswer(shown()));
    };
    match map.get("version") {
        Some(v) if v.as_u64() == Some(VERSION) => {}
        Some(v) => {
            return Err(ClientError::Version {
                theirs: v.to_string(),
            });
        }
        None => return Err(ClientError::BadAnswer(shown())),
    }
    match map.get("ok").and_then(serde_json::Value::as_bool) {
        Some(true) => Ok(map),
        Some(false) => Err(ClientError::Refused(
            map.get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("refused, without a reason")
                .to_string(),
        )),
        None => Err(ClientError::BadAnswer(shown())),
    }
}

/// `vmm-fleet logs`: VM `vm`'s console file to `out`, then (with `follow`) what the VM
/// prints, until the supervisor closes the connection or the process is ended. A
/// reader that goes away (`| head`) ends it quietly.
pub fn logs(socket: &Path, vm: &str, follow: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    let stream = connect(socket)?;
    request(&stream, "logs", vm, &[("follow", follow.into())])?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match (&stream).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading the log")(e)),
        };
        match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(io_err("writing the log")(e)),
        }
    }
}

/// How a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The user pressed Ctrl-].
    Detached,
    /// The supervisor closed the connection (the VM was removed, the fleet stopped).
    Closed,
    /// A signal (SIGTERM, SIGHUP, SIGINT, SIGQUIT) ended the client.
    Signal(i32),
}

/// The terminal's settings, put back when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw input (no echo, no line editing, no signals from keys: Ctrl-C goes to the
    /// guest), when stdin is a terminal. Output processing stays on, so that a guest
    /// printing bare line feeds (the built-in guest) is not shown as a staircase.
    fn enter() -> io::Result<Option<RawMode>> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        raw.output_flags |= OutputFlags::OPOST | OutputFlags::ONLCR;
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// Signals that end the client, caught into a self-pipe for the poll loop (and
/// unregistered when dropped).
struct Caught {
    ids: Vec<signal_hook::SigId>,
    pipe: UnixStream,
    last: Arc<AtomicUsize>,
}

impl Caught {
    const SIGNALS: [i32; 4] = [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
    ];

    fn register() -> io::Result<Caught> {
        let (pipe, wake) = UnixStream::pair()?;
        pipe.set_nonblocking(true)?;
        let last = Arc::new(AtomicUsize::new(0));
        let mut caught = Caught {
            ids: Vec::new(),
            pipe,
            last: last.clone(),
        };
        for sig in Self::SIGNALS {
            // The flag first: it is set when the poll loop wakes.
            let n = usize::try_from(sig).unwrap_or(0);
            caught
                .ids
                .push(signal_hook::flag::register_usize(sig, last.clone(), n)?);
            caught.ids.push(signal_hook::low_level::pipe::register(
                sig,
                wake.try_clone()?,
            )?);
        }
        Ok(caught)
    }

    fn signal(&self) -> Option<i32> {
        let mut sink = [0u8; 16];
        while matches!((&self.pipe).read(&mut sink), Ok(n) if n > 0) {}
        match self.last.load(Ordering::SeqCst) {
            0 => None,
            n => i32::try_from(n).ok(),
        }
    }
}

impl Drop for Caught {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// `vmm-fleet console`: attaches to VM `vm`'s console through the control socket at
/// `socket` until Ctrl-], the supervisor closing, or a signal.
pub fn console(socket: &Path, vm: &str) -> Result<ConsoleEnd, ClientError> {
    let stream = connect(socket)?;
    let answer = request(&stream, "console", vm, &[])?;
    let mode = match answer.get("mode").and_then(serde_json::Value::as_str) {
        Some("rw") => "read-write",
        Some("ro") => "read-only: another client holds the console, keystrokes are discarded",
        _ => {
            return Err(ClientError::BadAnswer(
                "a console answer without a mode".into(),
            ));
        }
    };
    stream
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(io_err("setting the socket's timeouts"))?;
    let caught = Caught::register().map_err(io_err("catching signals"))?;
    eprintln!("Connected to {vm} ({mode}); escape character is ^]");
    let end = {
        let _raw = RawMode::enter().map_err(io_err("putting the terminal in raw mode"))?;
        copy_loop(&stream, &caught)
    };
    if io::stdin().is_terminal() {
        // The prompt starts on a line of its own.
        eprintln!();
    }
    end
}

/// The session: stdin to the socket (up to Ctrl-]), the socket to stdout.
fn copy_loop(stream: &UnixStream, caught: &Caught) -> Result<ConsoleEnd, ClientError> {
    let stdin = io::stdin();
    let mut stdin_open = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ev = PollFlags::POLLIN;
        let mut fds = vec![
            PollFd::new(stream.as_fd(), ev),
            PollFd::new(caught.pipe.as_fd(), ev),
        ];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), ev));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(io_err("waiting for input")(e.into())),
        }
        let fired = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let (sock, sig, keys) = (
            fired(&fds[0]),
            fired(&fds[1]),
            fds.get(2).is_some_and(fired),
        );
        drop(fds);
        if sig && let Some(s) = caught.signal() {
            return Ok(ConsoleEnd::Signal(s));
        }
        if sock {
            match (&*stream).read(&mut buf) {
                Ok(0) => return Ok(ConsoleEnd::Closed),
                Ok(n) => {
                    let mut out = io::stdout().lock();
                    out.write_all(&buf[..n])
                        .and_then(|()| out.flush())
                        .map_err(io_err("writing to the terminal"))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(ConsoleEnd::Closed);
                }
                Err(e) => return Err(io_err("reading the console")(e)),
            }
        }
        if keys {
            let n = match nix::unistd::read(
                stdin.as_fd(),
                &mut buf[..crate::protocol::CONSOLE_CHUNK_MAX],
            ) {
                Ok(n) => n,
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(e) => return Err(io_err("reading the terminal")(e.into())),
            };
            if n == 0 {
                // Input ended (not a terminal): keep showing the console.
                stdin_open = false;
                continue;
            }
            let (keys, detach) = match buf[..n].iter().position(|&b| b == ESCAPE) {
                Some(i) => (&buf[..i], true),
                None => (&buf[..n], false),
            };
            if !keys.is_empty() {
                match (&*stream).write_all(keys) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                        return Ok(ConsoleEnd::Closed);
                    }
                    Err(e) => return Err(io_err("sending keystrokes")(e)),
                }
            }
            if detach {
                return Ok(ConsoleEnd::Detached);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_version_first() {
        let ok = parse_answer(br#"{"version":1,"ok":true,"mode":"rw"}"#).unwrap();
        assert_eq!(ok["mode"], "rw");
        let e = parse_answer(br#"{"version":1,"ok":false,"error":"unknown VM \"x\""}"#);
        assert_eq!(e.unwrap_err().to_string(), "unknown VM \"x\"");
        let e = parse_answer(br#"{"version":2,"ok":false,"error":"version 1 unknown"}"#);
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("version 2") && msg.contains("speaks 1"),
            "{msg}"
        );
        assert!(matches!(
            parse_answer(b"HTTP/1.1 400 Bad Request"),
            Err(ClientError::BadAnswer(_))
        ));
        assert!(matches!(
            parse_answer(br#"{"ok":true}"#),
            Err(ClientError::BadAnswer(_))
        ));
    }

    #[test]
    fn a_silent_server_is_a_timeout_and_a_missing_socket_names_itself() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(matches!(read_line(&ours), Err(ClientError::Timeout)));
        let e = connect(Path::new("/nonexistent/vmm-fleet.sock")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/vmm-fleet.sock"), "{msg}");
        assert!(msg.contains("is `vmm-fleet up` running"), "{msg}");
    }
}
