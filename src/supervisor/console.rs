//! Console attach and log following for the control socket: the registry of every VM's
//! console watchers ([`Consoles`]) that the output thread's tap feeds, the one writer
//! seat per VM, and the two connection servers [`serve_console`] and [`serve_logs`].
//!
//! - The output thread (`output.rs`) hands every chunk of a VM's console to
//!   [`Consoles::publish`]: each watcher of that VM has a bounded queue
//!   ([`WATCHER_QUEUE_MAX`]); what does not fit is dropped and counted, and the watcher
//!   later sees a `[vmm-fleet: N bytes dropped]` line where the bytes went missing. A
//!   slow or stalled client never slows the output thread, nor the console file.
//! - Watchers are keyed by VM name, not by child: one attached through a restart sees
//!   the new child's output. The event loop tells the registry which child takes the
//!   VM's input ([`Consoles::set_child`]).
//! - [`serve_console`] runs on the connection's thread: one `poll(2)` over the client
//!   socket and the watcher's eventfd, until the client closes. The first attacher gets
//!   the writer seat (`rw`), the others watch (`ro`) until they leave; a writer's
//!   keystrokes go to the child in chunks of at most [`INPUT_CHUNK`] bytes. When it
//!   returns, nothing of the session is left (no thread, no fd, no seat).
//! - [`serve_logs`] sends a console file, then (follow) what is appended to it, across
//!   its rotation to `NAME.console.1`.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{MsgFlags, send};

use super::channel::ChildChannel;
use crate::control::Response;
use crate::protocol::{CONSOLE_CHUNK_MAX, ToChild};

/// Bytes of console output a watcher may have waiting (sent to its client as the
/// socket takes them); beyond this its client is too slow and loses bytes.
pub const WATCHER_QUEUE_MAX: usize = 256 * 1024;

/// Most clients attached to one VM's console at once (each may hold a full queue).
pub const MAX_WATCHERS: usize = 32;

/// Most bytes of console input read (and sent to the child) at once: one
/// [`ToChild::Console`] message.
pub const INPUT_CHUNK: usize = CONSOLE_CHUNK_MAX;

/// How often a followed log file is checked for new bytes (and for its rotation).
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// How long a closing session (the VM removed, the supervisor stopping) keeps trying to
/// hand its client the last output and the reason.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Where a VM's console keystrokes go: its current child (the control channel).
pub trait ConsoleInput: Send + Sync {
    /// Sends one chunk of at most [`INPUT_CHUNK`] bytes; never blocks (a child that does
    /// not take it is an error).
    fn send_input(&self, chunk: &[u8]) -> io::Result<()>;
}

impl ConsoleInput for ChildChannel {
    fn send_input(&self, chunk: &[u8]) -> io::Result<()> {
        self.send(&ToChild::Console(chunk.to_vec()))
    }
}

/// Whether an attached client may type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Holds the VM's writer seat: keystrokes reach the guest.
    ReadWrite,
    /// Watches: keystrokes are discarded.
    ReadOnly,
}

impl Mode {
    /// `rw` or `ro`, as in the answer line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ReadWrite => "rw",
            Mode::ReadOnly => "ro",
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A piece of a watcher's queue: output, or the place where output was lost.
#[derive(Debug)]
enum Piece {
    Data(Vec<u8>),
    Dropped(u64),
}

/// A watcher's bounded queue of output.
#[derive(Debug)]
struct Queue {
    pieces: VecDeque<Piece>,
    /// Data bytes queued (markers not counted: at most one between two data pieces).
    bytes: usize,
    max: usize,
    /// Bytes dropped over the session.
    dropped: u64,
    /// The session is to end, and why (told to the client).
    closed: Option<String>,
}

impl Queue {
    fn new(max: usize) -> Self {
        Queue {
            pieces: VecDeque::new(),
            bytes: 0,
            max,
            dropped: 0,
            closed: None,
        }
    }

    /// Queues what fits of `data`, counts the rest; true when the reader should be woken
    /// (something queued, or the first loss after data).
    fn push(&mut self, data: &[u8]) -> bool {
        let keep = data.len().min(self.max.saturating_sub(self.bytes));
        if keep > 0 {
            match self.pieces.back_mut() {
                Some(Piece::Data(d)) => d.extend_from_slice(&data[..keep]),
                _ => self.pieces.push_back(Piece::Data(data[..keep].to_vec())),
            }
            self.bytes += keep;
        }
        let lost = (data.len() - keep) as u64;
        if lost == 0 {
            return keep > 0;
        }
        self.dropped += lost;
        match self.pieces.back_mut() {
            Some(Piece::Dropped(n)) => {
                *n += lost;
                keep > 0
            }
            _ => {
                self.pieces.push_back(Piece::Dropped(lost));
                true
            }
        }
    }

    /// Everything queued, as the bytes the client gets, markers included.
    fn take(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for piece in self.pieces.drain(..) {
            match piece {
                Piece::Data(d) => out.extend_from_slice(&d),
                Piece::Dropped(n) => out.extend_from_slice(&notice(&format!("{n} bytes dropped"))),
            }
        }
        self.bytes = 0;
        out
    }
}

/// A line the supervisor adds to a console stream, on a line of its own.
fn notice(msg: &str) -> Vec<u8> {
    format!("\r\n[vmm-fleet: {msg}]\r\n").into_bytes()
}

/// One attached client's end of the registry.
struct Watcher {
    id: u64,
    queue: Mutex<Queue>,
    /// Signalled when the queue gets something (non-blocking, close-on-exec).
    wake: EventFd,
}

impl Watcher {
    fn push(&self, data: &[u8]) {
        if lock(&self.queue).push(data) {
            self.kick();
        }
    }

    fn close(&self, why: &str) {
        lock(&self.queue).closed = Some(why.to_string());
        self.kick();
    }

    fn kick(&self) {
        // A full counter (2^64 - 2 wakes unread) already means "wake".
        let _ = self.wake.write(1);
    }

    fn clear_wake(&self) {
        let _ = self.wake.read();
    }

    /// The output queued so far, and the reason if the session is to end.
    fn take(&self) -> (Vec<u8>, Option<String>) {
        let mut q = lock(&self.queue);
        (q.take(), q.closed.clone())
    }

    fn dropped(&self) -> u64 {
        lock(&self.queue).dropped
    }
}

/// One VM's console: the child taking its input, its watchers, its writer.
#[derive(Default)]
struct Entry {
    child: Option<Arc<dyn ConsoleInput>>,
    watchers: Vec<Arc<Watcher>>,
    /// The watcher holding the writer seat.
    writer: Option<u64>,
}

impl Entry {
    fn unused(&self) -> bool {
        self.child.is_none() && self.watchers.is_empty()
    }
}

/// Every VM's console state; shared by the event loop (children), the output thread
/// (output) and the control socket's connection threads (watchers).
pub struct Consoles {
    vms: Mutex<HashMap<String, Entry>>,
    /// Watchers attached over all VMs: the output thread's tap skips the lock at 0.
    watching: AtomicUsize,
    next_id: AtomicU64,
    queue_max: usize,
    /// Set by [`Consoles::close_all`]: no new session starts.
    closed: Mutex<Option<String>>,
}

impl Default for Consoles {
    fn default() -> Self {
        Self::with_queue_max(WATCHER_QUEUE_MAX)
    }
}

impl Consoles {
    /// A registry whose watchers queue at most `queue_max` bytes each.
    pub fn with_queue_max(queue_max: usize) -> Self {
        Consoles {
            vms: Mutex::new(HashMap::new()),
            watching: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            queue_max,
            closed: Mutex::new(None),
        }
    }

    /// VM `name`'s current child, which takes its console input (None: it has none).
    pub fn set_child(&self, name: &str, child: Option<Arc<dyn ConsoleInput>>) {
        let mut vms = lock(&self.vms);
        match child {
            Some(c) => vms.entry(name.to_string()).or_default().child = Some(c),
            None => {
                if let Some(e) = vms.get_mut(name) {
                    e.child = None;
                    if e.unused() {
                        vms.remove(name);
                    }
                }
            }
        }
    }

    /// [`Consoles::set_child`] with a child's control channel.
    pub fn set_channel(&self, name: &str, channel: Option<&Arc<ChildChannel>>) {
        self.set_child(name, channel.map(|c| c.clone() as Arc<dyn ConsoleInput>));
    }

    /// Output of VM `name`'s console, for its watchers (called by the output thread;
    /// never blocks on a watcher).
    pub fn publish(&self, name: &str, data: &[u8]) {
        if data.is_empty() || self.watching.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(e) = lock(&self.vms).get(name) {
            for w in &e.watchers {
                w.push(data);
            }
        }
    }

    /// VM `name` left the fleet: its sessions end (told why).
    pub fn remove(&self, name: &str) {
        if let Some(e) = lock(&self.vms).get_mut(name) {
            e.child = None;
            for w in &e.watchers {
                w.close(&format!("{name} was removed from the fleet"));
            }
        }
    }

    /// The supervisor is stopping: every session ends (told `why`), none starts.
    pub fn close_all(&self, why: &str) {
        *lock(&self.closed) = Some(why.to_string());
        for e in lock(&self.vms).values_mut() {
            e.child = None;
            for w in &e.watchers {
                w.close(why);
            }
        }
    }

    /// How many clients watch VM `name`.
    pub fn watchers(&self, name: &str) -> usize {
        lock(&self.vms).get(name).map_or(0, |e| e.watchers.len())
    }

    /// Whether a client holds VM `name`'s writer seat.
    pub fn has_writer(&self, name: &str) -> bool {
        lock(&self.vms)
            .get(name)
            .is_some_and(|e| e.writer.is_some())
    }

    fn child(&self, name: &str) -> Option<Arc<dyn ConsoleInput>> {
        lock(&self.vms).get(name).and_then(|e| e.child.clone())
    }

    /// A new watcher of VM `name`, with the writer seat if it is free.
    fn attach(&self, name: &str) -> Result<Attachment<'_>, String> {
        if let Some(why) = lock(&self.closed).clone() {
            return Err(why);
        }
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| format!("cannot attach: eventfd: {e}"))?;
        let watcher = Arc::new(Watcher {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: Mutex::new(Queue::new(self.queue_max)),
            wake,
        });
        let mut vms = lock(&self.vms);
        let e = vms.entry(name.to_string()).or_default();
        if e.watchers.len() >= MAX_WATCHERS {
            return Err(format!(
                "{MAX_WATCHERS} clients are attached to the console of {name} already"
            ));
        }
        let mode = if e.writer.is_none() {
            e.writer = Some(watcher.id);
            Mode::ReadWrite
        } else {
            Mode::ReadOnly
        };
        e.watchers.push(watcher.clone());
        self.watching.fetch_add(1, Ordering::Relaxed);
        Ok(Attachment {
            consoles: self,
            name: name.to_string(),
            watcher,
            mode,
        })
    }

    fn detach(&self, name: &str, id: u64) {
        let mut vms = lock(&self.vms);
        let Some(e) = vms.get_mut(name) else {
            return;
        };
        let before = e.watchers.len();
        e.watchers.retain(|w| w.id != id);
        if e.watchers.len() < before {
            self.watching.fetch_sub(1, Ordering::Relaxed);
        }
        if e.writer == Some(id) {
            e.writer = None;
        }
        if e.unused() {
            vms.remove(name);
        }
    }
}

/// A watcher in the registry: detached (its seat freed) when dropped.
struct Attachment<'a> {
    consoles: &'a Consoles,
    name: String,
    watcher: Arc<Watcher>,
    mode: Mode,
}

impl Drop for Attachment<'_> {
    fn drop(&mut self) {
        self.consoles.detach(&self.name, self.watcher.id);
    }
}

/// How a console session went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEnd {
    /// The client's seat.
    pub mode: Mode,
    /// Bytes of output the client was too slow for.
    pub dropped: u64,
}

/// Writes all of `buf` to a blocking socket (no SIGPIPE: a closed peer is an error).
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match send(stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The answer line `{"version":1,"ok":true}`, with `mode` for a console.
fn ok_line(mode: Option<Mode>) -> String {
    let mut r = Response::ok();
    r.mode = mode.map(|m| m.as_str().to_string());
    r.to_line()
}

/// The answer line `{"version":1,"ok":false,"error":ERROR}`.
fn error_line(error: &str) -> String {
    Response::error(error).to_line()
}

/// Serves a `console` request for VM `vm` on `stream` (its request line already read,
/// the VM known to exist) until the client closes it or the registry closes the
/// session: writes the answer line (`"mode":"rw"` or `"ro"`), then the VM's console
/// output to the client and, from the writer, keystrokes to the VM's child.
pub fn serve_console(stream: UnixStream, vm: &str, consoles: &Consoles) -> io::Result<SessionEnd> {
    let att = match consoles.attach(vm) {
        Ok(a) => a,
        Err(why) => {
            send_all(&stream, error_line(&why).as_bytes())?;
            return Err(io::Error::other(why));
        }
    };
    let mode = att.mode;
    send_all(&stream, ok_line(Some(mode)).as_bytes())?;
    let mut session = Session {
        stream: &stream,
        att: &att,
        out: Vec::new(),
        sent: 0,
        told: None,
    };
    let r = session.run();
    let end = SessionEnd {
        mode,
        dropped: att.watcher.dropped(),
    };
    r.map(|()| end)
}

/// One console connection's state.
struct Session<'a> {
    stream: &'a UnixStream,
    att: &'a Attachment<'a>,
    /// Bytes for the client; `out[sent..]` not written yet.
    out: Vec<u8>,
    sent: usize,
    /// What the client was last told about its input going nowhere (told once, until
    /// input works again or goes nowhere for another reason).
    told: Option<String>,
}

impl Session<'_> {
    fn run(&mut self) -> io::Result<()> {
        self.stream.set_nonblocking(true)?;
        let mut closing: Option<std::time::Instant> = None;
        let mut buf = [0u8; INPUT_CHUNK];
        loop {
            if self.sent == self.out.len() {
                let (more, closed) = self.att.watcher.take();
                self.out = more;
                self.sent = 0;
                if let Some(why) = closed {
                    if closing.is_none() {
                        self.out.extend_from_slice(&notice(&why));
                        closing = Some(std::time::Instant::now() + CLOSE_LINGER);
                    } else if self.out.is_empty() {
                        return Ok(());
                    }
                }
            }
            let pending = self.sent < self.out.len();
            let timeout = match closing {
                None => PollTimeout::NONE,
                Some(t) => {
                    let left = t.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
            };
            let (sock, woke) = self.wait(pending, timeout)?;
            if woke {
                self.att.watcher.clear_wake();
            }
            if pending && sock.contains(PollFlags::POLLOUT) && !self.write_some()? {
                return Ok(());
            }
            if sock.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                match (&*self.stream).read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => self.input(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Polls the socket (for input, and for room when output is pending) and, when no
    /// output is pending, the watcher's eventfd.
    fn wait(&self, pending: bool, timeout: PollTimeout) -> io::Result<(PollFlags, bool)> {
        let mut sock = PollFlags::POLLIN;
        if pending {
            sock |= PollFlags::POLLOUT;
        }
        let mut fds = vec![PollFd::new(self.stream.as_fd(), sock)];
        if !pending {
            fds.push(PollFd::new(
                self.att.watcher.wake.as_fd(),
                PollFlags::POLLIN,
            ));
        }
        loop {
            match poll(&mut fds, timeout) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => break,
            }
        }
        let sock = fds[0].revents().unwrap_or(PollFlags::empty());
        let woke = fds
            .get(1)
            .and_then(PollFd::revents)
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        Ok((sock, woke))
    }

    /// Writes what the socket takes now; false when the client is gone.
    fn write_some(&mut self) -> io::Result<bool> {
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        match send(self.stream.as_raw_fd(), &self.out[self.sent..], flags) {
            Ok(n) => self.sent += n,
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }

    /// Keystrokes from the client: to the child from the writer, nowhere from a watcher;
    /// the client is told once when they go nowhere.
    fn input(&mut self, data: &[u8]) {
        let name = self.att.name.as_str();
        let result = match self.att.mode {
            Mode::ReadOnly => Err(
                "read-only: another client holds the console, keystrokes are discarded".to_string(),
            ),
            Mode::ReadWrite => match self.att.consoles.child(name) {
                None => Err(format!("{name} is not running: keystrokes dropped")),
                Some(c) => c
                    .send_input(data)
                    .map_err(|e| format!("keystrokes to {name} dropped: {e}")),
            },
        };
        match result {
            Ok(()) => self.told = None,
            Err(msg) => {
                if self.told.as_ref() != Some(&msg) {
                    self.out.extend_from_slice(&notice(&msg));
                    self.told = Some(msg);
                }
            }
        }
    }
}

/// Opens a console file for reading: never through a symlink, only a regular file.
fn open_console_file(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("is not a regular file"));
    }
    Ok(file)
}

/// A console file being followed: the open file and which one it is.
struct Tail<'a> {
    path: &'a Path,
    file: Option<(File, (u64, u64))>,
}

impl Tail<'_> {
    fn open(&mut self) -> io::Result<()> {
        let file = open_console_file(self.path)?;
        let m = file.metadata()?;
        self.file = Some((file, (m.dev(), m.ino())));
        Ok(())
    }

    /// Sends what the file has past where it was read, following a rotation (the rest of
    /// the old file, then the new one from its start) and a truncation (from the start).
    fn catch_up(&mut self, stream: &UnixStream) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..4 {
            let Some((file, id)) = &mut self.file else {
                return match self.open() {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                    Ok(()) => continue,
                };
            };
            copy_to_end(file, stream, &mut buf)?;
            let now = match std::fs::symlink_metadata(self.path) {
                Ok(m) => m,
                // Renamed away and not made again yet: keep the old one.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if (now.dev(), now.ino()) == *id {
                let pos = file.stream_position()?;
                if now.len() < pos {
                    file.seek(SeekFrom::Start(0))?;
                    continue;
                }
                return Ok(());
            }
            // Rotated: the old file is final now (renamed before the new one was made).
            copy_to_end(file, stream, &mut buf)?;
            self.file = None;
        }
        Ok(())
    }
}

fn copy_to_end(file: &mut File, stream: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match file.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => send_all(stream, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Serves a `logs` request on `stream` (its request line already read): writes the
/// answer line, then the console file at `path`; with `follow`, then what is appended
/// to it (checked every [`FOLLOW_POLL`]; across its rotation), until the client closes
/// the connection. Without `follow`, a missing file is an error answer; with it, the
/// file is waited for.
pub fn serve_logs(stream: UnixStream, path: &Path, follow: bool) -> io::Result<()> {
    // Blocking writes, as slow as the client reads (a timeout left by the request's
    // reading would cut a client that pauses, as `less` does).
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(None)?;
    let mut tail = Tail { path, file: None };
    match tail.open() {
        Ok(()) => {}
        Err(e) if follow && e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            let msg = format!("{}: {e}", path.display());
            send_all(&stream, error_line(&msg).as_bytes())?;
            return Err(io::Error::new(e.kind(), msg));
        }
    }
    send_all(&stream, ok_line(None).as_bytes())?;
    tail.catch_up(&stream)?;
    if !follow {
        return Ok(());
    }
    let timeout = PollTimeout::try_from(FOLLOW_POLL).unwrap_or(PollTimeout::MAX);
    let mut sink = [0u8; 256];
    loop {
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Err(Errno::EINTR) | Ok(0) => {}
            Err(e) => return Err(e.into()),
            Ok(_) => match (&stream).read(&mut sink) {
                // The client closed: done. What it sends is ignored.
                Ok(0) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            },
        }
        match tail.catch_up(&stream) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(());
            }
            r => r?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    /// A child that records what it is sent (or refuses it).
    #[derive(Default)]
    struct FakeChild {
        got: Mutex<Vec<u8>>,
        chunks: AtomicUsize,
        refuse: bool,
    }

    impl ConsoleInput for FakeChild {
        fn send_input(&self, chunk: &[u8]) -> io::Result<()> {
            assert!(chunk.len() <= INPUT_CHUNK);
            if self.refuse {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            lock(&self.got).extend_from_slice(chunk);
            self.chunks.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        f()
    }

    /// A client connected to `serve_console` on its own thread.
    struct Client {
        sock: UnixStream,
        server: std::thread::JoinHandle<io::Result<SessionEnd>>,
        got: Vec<u8>,
    }

    impl Client {
        fn attach(consoles: &Arc<Consoles>, vm: &str) -> Client {
            let (sock, theirs) = UnixStream::pair().unwrap();
            let (c, name) = (consoles.clone(), vm.to_string());
            let server = std::thread::spawn(move || serve_console(theirs, &name, &c));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            Client {
                sock,
                server,
                got: Vec::new(),
            }
        }

        /// Reads until `needle` has arrived (panics after 20 s).
        fn expect(&mut self, needle: &str) {
            let mut buf = [0u8; 4096];
            let found = wait_until(|| {
                if let Ok(n) = (&self.sock).read(&mut buf) {
                    self.got.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&self.got).contains(needle)
            });
            let text = String::from_utf8_lossy(&self.got);
            let tail = &text[text.floor_char_boundary(text.len().saturating_sub(300))..];
            assert!(found, "{needle:?} not in ...{tail:?}");
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.got).into_owned()
        }

        fn send(&self, data: &[u8]) {
            (&self.sock).write_all(data).unwrap();
        }

        fn close(self) -> io::Result<SessionEnd> {
            drop(self.sock);
            self.server.join().unwrap()
        }
    }

    #[test]
    fn a_queue_keeps_its_bound_and_marks_where_bytes_were_lost() {
        let mut q = Queue::new(10);
        assert!(q.push(b"0123456"));
        assert!(q.push(b"789abc"), "the first loss wakes the reader");
        assert!(!q.push(b"def"), "a loss after a loss does not");
        assert_eq!(q.bytes, 10);
        assert_eq!(q.dropped, 6);
        assert_eq!(q.take(), b"0123456789\r\n[vmm-fleet: 6 bytes dropped]\r\n");
        assert_eq!(q.bytes, 0);
        assert!(q.push(b"xyz"));
        assert_eq!(q.take(), b"xyz");
        assert_eq!(q.dropped, 6, "counted over the session");
    }

    #[test]
    fn one_writer_at_a_time_and_the_seat_is_free_once_it_leaves() {
        let c = Consoles::default();
        let a = c.attach("vm").unwrap();
        let b = c.attach("vm").unwrap();
        assert_eq!((a.mode, b.mode), (Mode::ReadWrite, Mode::ReadOnly));
        assert_eq!(c.attach("other").unwrap().mode, Mode::ReadWrite, "per VM");
        drop(a);
        assert!(!c.has_writer("vm"));
        assert_eq!(b.mode, Mode::ReadOnly, "a watcher is not promoted");
        let d = c.attach("vm").unwrap();
        assert_eq!(d.mode, Mode::ReadWrite);
        assert_eq!(c.attach("vm").unwrap().mode, Mode::ReadOnly);
        assert_eq!(c.watchers("vm"), 2);
        let more: Vec<_> = (2..MAX_WATCHERS).map(|_| c.attach("vm").unwrap()).collect();
        let refused = c.attach("vm").err().unwrap();
        assert!(refused.contains("32 clients are attached"), "{refused}");
        drop(more);
        drop((b, d));
        assert_eq!(c.watchers("vm"), 0);
        assert!(lock(&c.vms).is_empty(), "nothing left behind");
        assert_eq!(c.watching.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_writer_types_into_the_child_and_a_watcher_does_not() {
        let c = Arc::new(Consoles::default());
        let child = Arc::new(FakeChild::default());
        c.set_child("vm", Some(child.clone()));
        let mut w = Client::attach(&c, "vm");
        w.expect("\"mode\":\"rw\"}\n");
        assert!(w.text().starts_with("{\"version\":1,\"ok\":true,"));
        let mut r = Client::attach(&c, "vm");
        r.expect("\"mode\":\"ro\"}\n");
        assert!(wait_until(|| c.watchers("vm") == 2));
        c.publish("vm", b"heartbeat 1\n");
        w.expect("heartbeat 1");
        r.expect("heartbeat 1");
        r.send(b"from the watcher");
        r.expect("read-only");
        w.send(b"hello\r");
        let big = vec![b'k'; 3000];
        w.send(&big);
        assert!(wait_until(|| lock(&child.got).len() == 6 + 3000));
        assert_eq!(&lock(&child.got)[..6], b"hello\r", "only the writer's keys");
        assert!(
            child.chunks.load(Ordering::Relaxed) >= 3,
            "chunks of at most 1 KiB"
        );
        let end = w.close().unwrap();
        assert_eq!(end.mode, Mode::ReadWrite);
        assert!(
            !c.has_writer("vm"),
            "the seat is freed when the writer leaves"
        );
        let mut again = Client::attach(&c, "vm");
        again.expect("\"mode\":\"rw\"");
        assert_eq!(r.close().unwrap().mode, Mode::ReadOnly);
        again.close().unwrap();
        c.set_child("vm", None);
        assert!(lock(&c.vms).is_empty());
    }

    #[test]
    fn keystrokes_reach_a_child_channel_as_console_packets() {
        let c = Arc::new(Consoles::default());
        let (ours, theirs) = ChildChannel::pair().unwrap();
        let ours = Arc::new(ours);
        c.set_channel("vm", Some(&ours));
        let mut w = Client::attach(&c, "vm");
        w.expect("\"rw\"");
        w.send(&[b'y'; 1500]);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 1500 {
            let n =
                nix::sys::socket::recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            match ToChild::decode(&buf[..n]).unwrap() {
                ToChild::Console(b) => {
                    assert!(b.len() <= CONSOLE_CHUNK_MAX);
                    got.extend_from_slice(&b);
                }
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(got, vec![b'y'; 1500]);
        // The child is gone: the writer is told, nothing blocks.
        drop(theirs);
        w.send(b"z");
        w.expect("keystrokes to vm dropped");
        w.close().unwrap();
    }

    #[test]
    fn input_without_a_child_is_dropped_and_told_once() {
        let c = Arc::new(Consoles::default());
        let mut w = Client::attach(&c, "vm");
        w.expect("\"rw\"");
        w.send(b"a");
        w.expect("vm is not running: keystrokes dropped");
        w.send(b"b");
        w.send(b"c");
        c.publish("vm", b"marker");
        w.expect("marker");
        assert_eq!(w.text().matches("not running").count(), 1, "{}", w.text());
        // A child that does not take input.
        let refusing = Arc::new(FakeChild {
            refuse: true,
            ..FakeChild::default()
        });
        c.set_child("vm", Some(refusing));
        w.send(b"d");
        w.expect("keystrokes to vm dropped");
        w.close().unwrap();
    }

    #[test]
    fn a_watcher_stays_through_a_restart_and_types_into_the_new_child() {
        let c = Arc::new(Consoles::default());
        let (old, new) = (
            Arc::new(FakeChild::default()),
            Arc::new(FakeChild::default()),
        );
        c.set_child("vm", Some(old.clone()));
        let mut w = Client::attach(&c, "vm");
        w.expect("\"rw\"");
        c.publish("vm", b"first run\n");
        w.expect("first run");
        c.set_child("vm", None);
        c.set_child("vm", Some(new.clone()));
        c.publish("vm", b"second run\n");
        w.expect("second run");
        w.send(b"x");
        assert!(wait_until(|| lock(&new.got).as_slice() == b"x"));
        assert!(lock(&old.got).is_empty());
        w.close().unwrap();
    }

    #[test]
    fn a_stalled_watcher_loses_bytes_and_never_blocks_the_publisher() {
        let c = Arc::new(Consoles::with_queue_max(64 * 1024));
        let mut stalled = Client::attach(&c, "vm");
        stalled.expect("\"rw\"");
        let mut fast = Client::attach(&c, "vm");
        fast.expect("\"ro\"");
        // 16 MiB published while `stalled` reads nothing: far more than its queue and
        // both socket buffers.
        let chunk = vec![b'x'; 64 * 1024];
        let start = Instant::now();
        let mut slowest = Duration::ZERO;
        for _ in 0..256 {
            let t = Instant::now();
            c.publish("vm", &chunk);
            slowest = slowest.max(t.elapsed());
            // The fast one keeps up (its reads are what this loop waits on).
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = (&fast.sock).read(&mut buf) {
                if n < buf.len() {
                    break;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(
            slowest < Duration::from_millis(500),
            "a publish took {slowest:?}"
        );
        // Once it reads again, it gets what was queued, where its bytes went missing,
        // and what comes next.
        stalled.expect(" bytes dropped]\r\n");
        c.publish("vm", b"THE END");
        stalled.expect("THE END");
        let text = stalled.text();
        let end = stalled.close().unwrap();
        assert!(end.dropped > 8 << 20, "{}", end.dropped);
        assert!(text.len() < 4 << 20, "{}", text.len());
        // The marker tells the count.
        let told: u64 = text
            .split("[vmm-fleet: ")
            .skip(1)
            .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(told, end.dropped);
        fast.close().unwrap();
    }

    #[test]
    fn a_removed_vm_ends_its_sessions_and_a_closed_registry_takes_none() {
        let c = Arc::new(Consoles::default());
        let mut w = Client::attach(&c, "vm");
        w.expect("\"rw\"");
        c.remove("vm");
        w.expect("vm was removed from the fleet");
        // The server ends the session on its own: the client sees end of file.
        w.sock
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        (&w.sock).read_to_end(&mut rest).unwrap();
        w.server.join().unwrap().unwrap();
        assert_eq!(c.watchers("vm"), 0);
        c.close_all("the fleet is stopping");
        let mut late = Client::attach(&c, "vm");
        late.expect("\"ok\":false,\"error\":\"the fleet is stopping\"");
        assert!(late.close().is_err());
    }

    #[test]
    fn logs_sends_the_file_then_follows_it_across_a_rotation() {
        let d = std::env::temp_dir().join(format!("vmm-fleet-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("vm.console");
        let append = |p: &Path, s: &str| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap();
            f.write_all(s.as_bytes()).unwrap();
        };
        append(&path, "line 1\n");
        // Without follow: the file, then the end.
        let (mut sock, theirs) = UnixStream::pair().unwrap();
        serve_logs(theirs, &path, false).unwrap();
        let mut all = String::new();
        sock.read_to_string(&mut all).unwrap();
        assert_eq!(all, "{\"version\":1,\"ok\":true}\nline 1\n");
        // Follow.
        let (sock, theirs) = UnixStream::pair().unwrap();
        let p = path.clone();
        let server = std::thread::spawn(move || serve_logs(theirs, &p, true));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut got = Vec::new();
        let mut read_until = |needle: &str| {
            let mut buf = [0u8; 4096];
            let ok = wait_until(|| {
                if let Ok(n) = (&sock).read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&got).contains(needle)
            });
            assert!(ok, "{needle:?} not in {:?}", String::from_utf8_lossy(&got));
            String::from_utf8_lossy(&got).into_owned()
        };
        read_until("line 1\n");
        append(&path, "line 2\n");
        read_until("line 2\n");
        // Rotation as the output thread does it: the last bytes of the old file, the
        // rename, then a new file.
        append(&path, "line 3\n");
        std::fs::rename(&path, d.join("vm.console.1")).unwrap();
        append(&path, "line 4\n");
        let text = read_until("line 4\n");
        assert_eq!(
            text,
            "{\"version\":1,\"ok\":true}\nline 1\nline 2\nline 3\nline 4\n"
        );
        drop(sock);
        server.join().unwrap().unwrap();
        // Followed before it exists (a VM not started yet): shown once it appears.
        let later = d.join("later.console");
        let (sock, theirs) = UnixStream::pair().unwrap();
        let p = later.clone();
        let server = std::thread::spawn(move || serve_logs(theirs, &p, true));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        append(&later, "first words\n");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        assert!(wait_until(|| {
            if let Ok(n) = (&sock).read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got.ends_with(b"first words\n")
        }));
        assert!(got.starts_with(b"{\"version\":1,\"ok\":true}\n"));
        drop(sock);
        server.join().unwrap().unwrap();
        // A missing file without follow: one error line naming it.
        let (mut sock, theirs) = UnixStream::pair().unwrap();
        assert!(serve_logs(theirs, &d.join("none.console"), false).is_err());
        let mut all = String::new();
        sock.read_to_string(&mut all).unwrap();
        assert!(all.starts_with("{\"version\":1,\"ok\":false,\"error\":\""));
        assert!(all.contains("none.console"), "{all}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
