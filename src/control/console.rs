//! The client side of `vmm-fleet console` and `vmm-fleet logs`: one request line on the
//! control socket, one answer line, then raw bytes. `console` puts the terminal in raw
//! mode (restored on every way out: detach, the supervisor closing, an error, a signal,
//! a panic), copies the terminal to the socket and the socket to the terminal, and
//! detaches on Ctrl-] as `virsh console` does.

use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, OutputFlags, SetArg, Termios};

use super::{ClientError, Command, Request, connect};

/// How long the client waits for the supervisor's answer line.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a keystroke may wait for the supervisor to take it.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The detach key: Ctrl-] (as `virsh console`, `telnet`).
pub const ESCAPE: u8 = 0x1d;

/// Why a console or logs client stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The control socket, or the supervisor's answer.
    #[error(transparent)]
    Control(#[from] ClientError),
    /// A console answer without its mode.
    #[error("the supervisor's console answer has no mode (rw or ro)")]
    NoMode,
    /// The terminal, the socket or a signal handler failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ConsoleError {
    move |source| ConsoleError::Io { context, source }
}

/// Sends `command`, reads the answer; returns it with the connection (no timeouts left
/// on it) and the raw bytes that came with the answer line.
fn open(
    socket: &Path,
    command: Command,
) -> Result<(super::Response, UnixStream, Vec<u8>), ConsoleError> {
    let (resp, reader): (_, BufReader<UnixStream>) =
        connect(socket, &Request::new(command), ANSWER_TIMEOUT)?;
    let early = reader.buffer().to_vec();
    let stream = reader.into_inner();
    stream
        .set_read_timeout(None)
        .map_err(io_err("setting the socket's timeouts"))?;
    Ok((resp, stream, early))
}

/// Writes `bytes` to `out` and flushes; a reader gone away is `Ok(false)`.
fn show(out: &mut dyn Write, bytes: &[u8]) -> Result<bool, ConsoleError> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(io_err("writing the output")(e)),
    }
}

/// `vmm-fleet logs`: VM `vm`'s console file to `out`, then (with `follow`) what the VM
/// prints, until the supervisor closes the connection or the process is ended. A
/// reader that goes away (`| head`) ends it quietly.
pub fn logs(
    socket: &Path,
    vm: &str,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), ConsoleError> {
    let command = Command::Logs {
        vm: vm.to_string(),
        follow,
    };
    let (_, stream, early) = open(socket, command)?;
    if !show(out, &early)? {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match (&stream).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading the log")(e)),
        };
        if !show(out, &buf[..n])? {
            return Ok(());
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
pub fn console(socket: &Path, vm: &str) -> Result<ConsoleEnd, ConsoleError> {
    let command = Command::Console { vm: vm.to_string() };
    let (resp, stream, early) = open(socket, command)?;
    let mode = match resp.mode.as_deref() {
        Some("rw") => "read-write",
        Some("ro") => "read-only: another client holds the console, keystrokes are discarded",
        _ => return Err(ConsoleError::NoMode),
    };
    stream
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(io_err("setting the socket's timeouts"))?;
    let caught = Caught::register().map_err(io_err("catching signals"))?;
    eprintln!("Connected to {vm} ({mode}); escape character is ^]");
    let end = {
        let _raw = RawMode::enter().map_err(io_err("putting the terminal in raw mode"))?;
        show(&mut io::stdout().lock(), &early)?;
        copy_loop(&stream, &caught)
    };
    if io::stdin().is_terminal() {
        // The prompt starts on a line of its own.
        eprintln!();
    }
    end
}

/// The session: stdin to the socket (up to Ctrl-]), the socket to stdout.
fn copy_loop(stream: &UnixStream, caught: &Caught) -> Result<ConsoleEnd, ConsoleError> {
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
                    if !show(&mut io::stdout().lock(), &buf[..n])? {
                        return Err(io_err("writing to the terminal")(
                            io::ErrorKind::BrokenPipe.into(),
                        ));
                    }
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
