//! The supervisor's state as handed to a new program at reexec: a versioned JSON
//! document in a sealed memfd that the new program inherits (`up ... --resume-fd N`),
//! with the fds it names inherited beside it.
//!
//! What it holds: the fleet's source and settings, the command line `up` was started
//! with, every VM's state machine (spec, state, restart count, last exit, the restart
//! policy's history; every `Instant` as a signed offset from the moment of writing,
//! since an `Instant` means nothing to another program), its counter table (memfd,
//! age), its control channel, its output pipes' read ends (the bytes in them are read by
//! the new program), the exporter's high-water marks, the fleet's cgroups, and the
//! listening sockets of `/metrics` and the control socket (connections queue in their
//! backlog while the exec runs).
//!
//! Versioning: [`FORMAT`] is what this program writes, [`FORMATS_READ`] what it reads;
//! `vmm-fleet handover-formats` prints both so that an old program asks a new binary
//! before it execs it. A program that finds a format it cannot read runs in *hold*
//! mode ([`super::reexec::hold`]): it kills nothing, keeps every inherited fd open, and
//! waits.
//!
//! The document comes from the same trusted program (same pid, same user), but is still
//! checked: its size is bounded, the memfd must be sealed, and every fd it names must be
//! open, above stdio, named once, and of the kind expected ([`FdKind`]).

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The handover format this program writes.
pub const FORMAT: u32 = 1;
/// The handover formats this program reads.
pub const FORMATS_READ: [u32; 1] = [1];
/// The largest document read (1000 VMs take about 5 MiB).
pub const MAX_BYTES: u64 = 256 << 20;
/// Test hook: the format number to write instead of [`FORMAT`] (to see a handover the
/// new binary cannot read being refused); with a `!` after it (`999!`), the check of the
/// new binary is skipped too, to see what a new program does with a state it cannot
/// read (hold mode).
pub const TEST_FORMAT_ENV: &str = "VMM_FLEET_TEST_HANDOVER_FORMAT";

/// Why a handover could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// The document is larger than [`MAX_BYTES`].
    #[error("handover of {0} bytes is larger than {MAX_BYTES}")]
    TooLarge(u64),
    /// The memfd lacks its seals.
    #[error("handover fd is not a sealed memfd")]
    NotSealed,
    /// The document is not valid JSON of the format it claims.
    #[error("handover document: {0}")]
    Json(#[from] serde_json::Error),
    /// A format this program cannot read.
    #[error("handover format {found} is not one this program reads ({FORMATS_READ:?})")]
    UnknownFormat {
        /// The format found.
        found: u32,
    },
    /// An fd named in the document is missing or of the wrong kind.
    #[error("fd {fd} ({what}): {why}")]
    BadFd {
        /// The fd.
        fd: RawFd,
        /// What it should be.
        what: String,
        /// What is wrong.
        why: String,
    },
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |source| HandoverError::Sys { what, source }
}

/// Only the format number: read first, so that an unknown format is told apart from a
/// broken document.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    /// The format of the whole document.
    pub format: u32,
    /// Who wrote it (`vmm-fleet VERSION`).
    #[serde(default)]
    pub written_by: String,
}

/// A listening socket as handed over: its fd and the address it was asked for.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldListener {
    /// The inherited fd.
    pub fd: RawFd,
    /// The address asked for (`127.0.0.1:0` when any port would do).
    pub wanted: String,
}

/// What `vmm-fleet handover-formats` prints (one JSON line).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Formats {
    /// The program's version.
    pub version: String,
    /// The formats it reads.
    pub reads: Vec<u32>,
    /// The format it writes.
    pub writes: u32,
}

impl Formats {
    /// This program's.
    pub fn ours() -> Self {
        Formats {
            version: env!("CARGO_PKG_VERSION").to_string(),
            reads: FORMATS_READ.to_vec(),
            writes: FORMAT,
        }
    }
}

/// The format to write: [`FORMAT`], unless the test hook [`TEST_FORMAT_ENV`] says
/// otherwise.
pub fn format_to_write() -> u32 {
    std::env::var(TEST_FORMAT_ENV)
        .ok()
        .and_then(|v| v.trim_end_matches('!').parse().ok())
        .unwrap_or(FORMAT)
}

/// Test hook ([`TEST_FORMAT_ENV`] ending in `!`): skip asking the new binary.
pub fn test_skip_preflight() -> bool {
    std::env::var(TEST_FORMAT_ENV).is_ok_and(|v| v.ends_with('!'))
}

/// Write `doc` into a new sealed memfd (not close-on-exec: the new program inherits it).
pub fn write_memfd(doc: &[u8]) -> Result<OwnedFd, HandoverError> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create("vmm-fleet-handover", MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| sys("memfd_create")(e.into()))?;
    let mut f = File::from(fd);
    f.write_all(doc).map_err(sys("write handover"))?;
    f.rewind().map_err(sys("seek handover"))?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&f, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| sys("F_ADD_SEALS")(e.into()))?;
    Ok(f.into())
}

/// Read the document from an inherited handover memfd (checked: sealed, bounded); the
/// fd stays open.
pub fn read_memfd(fd: BorrowedFd<'_>) -> Result<Vec<u8>, HandoverError> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|_| HandoverError::NotSealed)?;
    let need = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
    if !SealFlag::from_bits_truncate(seals).contains(need) {
        return Err(HandoverError::NotSealed);
    }
    let mut f = File::from(fd.try_clone_to_owned().map_err(sys("dup handover"))?);
    let len = f.metadata().map_err(sys("stat handover"))?.len();
    if len > MAX_BYTES {
        return Err(HandoverError::TooLarge(len));
    }
    f.rewind().map_err(sys("seek handover"))?;
    let mut buf = Vec::with_capacity(len as usize);
    f.take(MAX_BYTES)
        .read_to_end(&mut buf)
        .map_err(sys("read handover"))?;
    Ok(buf)
}

/// The format number of `doc`, checked against [`FORMATS_READ`].
pub fn check_format(doc: &[u8]) -> Result<Envelope, HandoverError> {
    let env: Envelope = serde_json::from_slice(doc)?;
    if !FORMATS_READ.contains(&env.format) {
        return Err(HandoverError::UnknownFormat { found: env.format });
    }
    Ok(env)
}

/// Take `fd` (a number from the document) as an owned fd. Checked: not stdio, not taken
/// twice (`taken`), open, of `kind`; made close-on-exec again.
pub fn adopt_fd(
    fd: RawFd,
    kind: FdKind,
    what: &str,
    taken: &mut Vec<RawFd>,
) -> Result<OwnedFd, HandoverError> {
    let bad = |why: String| HandoverError::BadFd {
        fd,
        what: what.to_string(),
        why,
    };
    if fd <= 2 {
        return Err(bad("is stdio".into()));
    }
    if taken.contains(&fd) {
        return Err(bad("named twice".into()));
    }
    // SAFETY: F_GETFD only reads the fd's flags; a closed fd fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!("not open: {}", io::Error::last_os_error())));
    }
    // SAFETY: the fd is open, inherited from the program that wrote the document, and
    // named once in it (checked above): nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    taken.push(fd);
    if let Err(why) = kind.check(owned.as_fd()) {
        // Not ours to close: it may be something else the old program left open.
        std::mem::forget(owned);
        return Err(bad(why));
    }
    set_cloexec(owned.as_fd(), true).map_err(|e| bad(e.to_string()))?;
    Ok(owned)
}

/// What an inherited fd must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A sealed memfd (counter table).
    Memfd,
    /// A pipe (a child's stdout or stderr read end).
    Pipe,
    /// A listening stream socket.
    Listener,
    /// A SOCK_SEQPACKET socket (a child's control channel).
    Seqpacket,
}

impl FdKind {
    fn check(self, fd: BorrowedFd<'_>) -> Result<(), String> {
        use nix::sys::socket::{getsockopt, sockopt};
        use nix::sys::stat::{SFlag, fstat};
        let st = fstat(fd).map_err(|e| format!("fstat: {e}"))?;
        let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        match self {
            FdKind::Memfd => {
                (fmt == SFlag::S_IFREG).then_some(()).ok_or("not a memfd")?;
            }
            FdKind::Pipe => {
                (fmt == SFlag::S_IFIFO).then_some(()).ok_or("not a pipe")?;
            }
            FdKind::Listener | FdKind::Seqpacket => {
                (fmt == SFlag::S_IFSOCK)
                    .then_some(())
                    .ok_or("not a socket")?;
                let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| e.to_string())?;
                let want = if self == FdKind::Listener {
                    nix::sys::socket::SockType::Stream
                } else {
                    nix::sys::socket::SockType::SeqPacket
                };
                if ty != want {
                    return Err(format!("socket of type {ty:?}, not {want:?}"));
                }
                if self == FdKind::Listener
                    && !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| e.to_string())?
                {
                    return Err("not listening".into());
                }
            }
        }
        Ok(())
    }
}

/// Set or clear `fd`'s close-on-exec flag.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(io::Error::from)
}

/// The raw number of `fd` with close-on-exec cleared, for the document.
pub fn inherit(fd: BorrowedFd<'_>) -> io::Result<RawFd> {
    set_cloexec(fd, false)?;
    Ok(fd.as_raw_fd())
}

thread_local! {
    /// The moment every `Instant` of the document is an offset from (see [`clock`]).
    static BASE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Run `f` (a serialization or deserialization of the document) with `now` as the
/// moment its `Instant`s are measured from.
pub fn at<R>(now: Instant, f: impl FnOnce() -> R) -> R {
    let before = BASE.with(|b| b.replace(Some(now)));
    let r = f();
    BASE.with(|b| b.set(before));
    r
}

/// Serde for `Instant`s as signed nanoseconds from the moment given to [`at`]: a
/// deadline 3 s ahead is written `3000000000`, a start 2 s ago `-2000000000`. Outside
/// [`at`], (de)serializing an `Instant` is an error, never a silent wrong value.
pub mod clock {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::BASE;

    fn base<E: std::fmt::Display>(err: impl Fn(&str) -> E) -> Result<Instant, E> {
        BASE.with(|b| b.get())
            .ok_or_else(|| err("an Instant outside handover::at"))
    }

    fn offset(t: Instant, now: Instant) -> i64 {
        if t >= now {
            i64::try_from(t.duration_since(now).as_nanos()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from(now.duration_since(t).as_nanos()).unwrap_or(i64::MAX)
        }
    }

    /// `now + ns` (saturating at `now` when it cannot be represented).
    fn from_offset(ns: i64, now: Instant) -> Instant {
        let d = Duration::from_nanos(ns.unsigned_abs());
        if ns >= 0 {
            now.checked_add(d)
        } else {
            now.checked_sub(d)
        }
        .unwrap_or(now)
    }

    /// For `Instant` fields.
    pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
        let now = base(|m| serde::ser::Error::custom(m))?;
        offset(*t, now).serialize(s)
    }

    /// For `Instant` fields.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        let now = base(|m| serde::de::Error::custom(m))?;
        Ok(from_offset(i64::deserialize(d)?, now))
    }

    /// For `Option<Instant>` fields.
    pub mod option {
        use super::*;

        /// Serialize.
        pub fn serialize<S: Serializer>(t: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
            let now = base(|m| serde::ser::Error::custom(m))?;
            t.map(|t| offset(t, now)).serialize(s)
        }

        /// Deserialize.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
            let now = base(|m| serde::de::Error::custom(m))?;
            Ok(Option::<i64>::deserialize(d)?.map(|ns| from_offset(ns, now)))
        }
    }

    /// For `VecDeque<Instant>` fields.
    pub mod deque {
        use super::*;

        /// Serialize.
        pub fn serialize<S: Serializer>(t: &VecDeque<Instant>, s: S) -> Result<S::Ok, S::Error> {
            let now = base(|m| serde::ser::Error::custom(m))?;
            let v: Vec<i64> = t.iter().map(|t| offset(*t, now)).collect();
            v.serialize(s)
        }

        /// Deserialize.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<Instant>, D::Error> {
            let now = base(|m| serde::de::Error::custom(m))?;
            Ok(Vec::<i64>::deserialize(d)?
                .into_iter()
                .map(|ns| from_offset(ns, now))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(with = "clock")]
        a: Instant,
        #[serde(with = "clock::option")]
        b: Option<Instant>,
    }

    #[test]
    fn instants_travel_as_offsets_from_the_moment_of_writing() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let t = T {
            a: t0 + Duration::from_secs(3),
            b: Some(t0 - Duration::from_secs(2)),
        };
        let json = at(t0, || serde_json::to_string(&t)).unwrap();
        assert_eq!(json, r#"{"a":3000000000,"b":-2000000000}"#);
        // Read 10 s later: the deadline is still 3 s after the moment of reading.
        let t1 = t0 + Duration::from_secs(10);
        let back: T = at(t1, || serde_json::from_str(&json)).unwrap();
        assert_eq!(back.a, t1 + Duration::from_secs(3));
        assert_eq!(back.b, Some(t1 - Duration::from_secs(2)));
        // Outside `at`: an error, not a wrong value.
        assert!(serde_json::to_string(&t).is_err());
        assert!(serde_json::from_str::<T>(&json).is_err());
    }

    #[test]
    fn a_memfd_round_trips_sealed_and_refuses_writes() {
        let fd = write_memfd(br#"{"format":1}"#).unwrap();
        // The new program inherits it: not close-on-exec.
        assert!(!cloexec(fd.as_fd()));
        let mut f = File::from(fd.try_clone().unwrap());
        assert!(f.write_all(b"x").is_err(), "sealed against writes");
        let doc = read_memfd(fd.as_fd()).unwrap();
        assert_eq!(check_format(&doc).unwrap().format, 1);
    }

    #[test]
    fn unknown_formats_unsealed_fds_and_bad_fds_are_refused() {
        match check_format(br#"{"format":999,"vms":[]}"#) {
            Err(HandoverError::UnknownFormat { found: 999 }) => {}
            other => panic!("{other:?}"),
        }
        assert!(check_format(b"not json").is_err());
        // A plain file is not a sealed memfd.
        let plain = tempfile_fd();
        assert!(matches!(
            read_memfd(plain.as_fd()),
            Err(HandoverError::NotSealed)
        ));
        let mut taken = Vec::new();
        // Stdio, a closed fd, a pipe taken as a socket.
        assert!(adopt_fd(1, FdKind::Pipe, "x", &mut taken).is_err());
        assert!(adopt_fd(999_999, FdKind::Pipe, "x", &mut taken).is_err());
        let (r, w) = nix::unistd::pipe().unwrap();
        let (r, w) = (r.into_raw_fd_keep(), w.into_raw_fd_keep());
        let e = adopt_fd(r, FdKind::Listener, "x", &mut taken).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let mut taken = Vec::new();
        let p = adopt_fd(w, FdKind::Pipe, "x", &mut taken).unwrap();
        assert!(cloexec(p.as_fd()), "adopted fds are close-on-exec again");
        assert!(adopt_fd(w, FdKind::Pipe, "x", &mut taken).is_err(), "twice");
        drop(p);
        // SAFETY: `r` was forgotten by the failed adoption above; it is ours to close.
        unsafe { libc::close(r) };
    }

    fn cloexec(fd: BorrowedFd<'_>) -> bool {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
        FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
    }

    trait KeepRaw {
        fn into_raw_fd_keep(self) -> RawFd;
    }
    impl KeepRaw for OwnedFd {
        fn into_raw_fd_keep(self) -> RawFd {
            std::os::fd::IntoRawFd::into_raw_fd(self)
        }
    }

    fn tempfile_fd() -> OwnedFd {
        let p = std::env::temp_dir().join(format!("vmm-fleet-handover-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f.into()
    }
}
