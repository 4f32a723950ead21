//! vCPU exit counters: the list of exit reasons and a table of atomic counters
//! indexed `[vcpu][reason]`, bumped with one relaxed atomic add per exit; the sealed
//! memfd that shares a table between the supervisor and a VM child, and the checks the
//! supervisor runs on what a (possibly compromised) child left in it.
//!
//! The memfd is sealed against shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL`) before any child sees it, so nobody holding the fd can make the
//! supervisor's mapping fault (SIGBUS). Its contents stay writable by the child and are
//! untrusted: the exporter clamps them, and [`SharedTable::check`] finds tables a child
//! corrupted so the supervisor can replace them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Why a vCPU left `KVM_RUN`, as counted per vCPU.
#[repr(usize)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Port I/O read (`in`).
    IoIn,
    /// Port I/O write (`out`).
    IoOut,
    /// MMIO read of an address with no memory behind it.
    MmioRead,
    /// MMIO write, including writes to read-only memory slots.
    MmioWrite,
    /// `hlt` handled by the VMM (only without an in-kernel LAPIC).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// VM entry failed.
    FailEntry,
    /// KVM internal error, such as an emulation failure.
    InternalError,
    /// A system event (shutdown, reset, crash) reported by KVM.
    SystemEvent,
    /// `KVM_RUN` returned early: a signal or `immediate_exit`.
    Interrupted,
    /// Any other exit reason.
    Other,
}

impl ExitReason {
    /// Number of reasons; the width of one vCPU's row.
    pub const COUNT: usize = 11;

    /// Every reason, in table order.
    pub const ALL: [ExitReason; Self::COUNT] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::FailEntry,
        ExitReason::InternalError,
        ExitReason::SystemEvent,
        ExitReason::Interrupted,
        ExitReason::Other,
    ];

    /// The label value used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::InternalError => "internal_error",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Other => "other",
        }
    }
}

/// The kernel's own per-vCPU KVM statistics that are exported, by their names in KVM's
/// binary stats (`KVM_GET_STATS_FD`).
pub const KVM_STATS: [&str; 7] = [
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "signal_exits",
    "halt_wait_ns",
];

/// Most vCPUs a shared table has rows for.
pub const MAX_VCPUS: usize = 256;

// Header words of a table.
const H_MAGIC: usize = 0;
const H_VCPUS: usize = 1;
const H_FIRST_CONSOLE_NS: usize = 2;
const H_USERSPACE_UP_NS: usize = 3;
const HEADER_WORDS: usize = 8;
const MAGIC: u64 = 0x766d_6d66_6c74_0001; // "vmmflt" v1

/// Errors creating or opening a shared table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// errno.
        source: std::io::Error,
    },
    /// The file is not a counter table.
    #[error("not a vmm-fleet counter table")]
    BadTable,
    /// The memfd lacks the seals that keep its size fixed.
    #[error("counter table is not sealed against resizing (seals {0:#x})")]
    NotSealed(i32),
}

/// The seals every shared table carries: its size can never change, and no seal can be
/// added or removed afterwards.
fn required_seals() -> nix::fcntl::SealFlag {
    use nix::fcntl::SealFlag;
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL
}

/// What [`SharedTable::check`] found wrong in a table a child wrote to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The magic word was overwritten.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The header claims more vCPUs than any child of this VM was given.
    #[error("header says {header} vCPUs, the VM has at most {limit}")]
    TooManyVcpus {
        /// The header's value.
        header: u64,
        /// The most vCPUs a child of this VM ran with.
        limit: usize,
    },
    /// A row past every vCPU this VM ever had holds counts.
    #[error("counts in row {0}, past the VM's vCPUs")]
    RowPastVcpus(usize),
    /// A counter larger than the table's age in nanoseconds (more than one event per ns).
    #[error("counter {value} in row {vcpu} exceeds the table's age ({limit} ns)")]
    Implausible {
        /// The row.
        vcpu: usize,
        /// The value read.
        value: u64,
        /// The table's age in ns.
        limit: u64,
    },
}

enum Backing {
    Heap(Box<[AtomicU64]>),
    Shared(Mapping),
}

/// A shared mapping of a memfd.
struct Mapping {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    words: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows the words past
        // the table's lifetime.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.words * 8) };
    }
}

impl Mapping {
    fn map(fd: &impl std::os::fd::AsFd, words: usize) -> Result<Self, TableError> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        let len = std::num::NonZeroUsize::new(words * 8).ok_or(TableError::BadTable)?;
        // SAFETY: a fresh shared mapping of a file we own, read and written only through
        // AtomicU64 views (8-byte aligned: mmap returns page-aligned memory).
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| TableError::Sys {
            what: "mmap",
            source: e.into(),
        })?;
        Ok(Mapping { ptr, words })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `words` u64s long, page-aligned, zero-filled by the
        // kernel, and lives as long as `self`; AtomicU64 has u64's layout.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const AtomicU64, self.words) }
    }
}

/// A VM's counters: exits `[vcpu][reason]`, the kernel's KVM statistics `[vcpu][stat]`,
/// and boot times. In shared memory (a memfd the supervisor creates and the VM child
/// maps) it outlives the child, so counts survive a crash and stay monotonic across
/// restarts; on the heap for a VM run on its own.
pub struct ExitCounters {
    rows: usize,
    backing: Backing,
    /// When the table was made: no counter of a shared table can exceed its age in ns.
    born: Instant,
    /// Unique in this process: tells a replaced table from the one it replaced.
    id: u64,
}

fn next_table_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl std::fmt::Debug for ExitCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitCounters")
            .field("rows", &self.rows)
            .field("vcpus", &self.vcpus())
            .finish()
    }
}

fn table_words(rows: usize) -> usize {
    HEADER_WORDS + rows * (ExitReason::COUNT + KVM_STATS.len())
}

impl ExitCounters {
    /// A zeroed in-process table for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        let cells = (0..table_words(vcpus)).map(|_| AtomicU64::new(0)).collect();
        let t = ExitCounters {
            rows: vcpus,
            backing: Backing::Heap(cells),
            born: Instant::now(),
            id: next_table_id(),
        };
        t.words()[H_MAGIC].store(MAGIC, Ordering::Relaxed);
        t.set_vcpus(vcpus);
        t
    }

    /// A new table in a memfd named after `name`, with rows for [`MAX_VCPUS`], sealed so
    /// that its size can never change. The fd is close-on-exec; a child maps it with
    /// [`ExitCounters::open_shared_fd`] (inherited).
    pub fn create_shared(name: &str) -> Result<(Self, OwnedFd), TableError> {
        use nix::fcntl::{FcntlArg, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let sys = |what| {
            move |e: nix::Error| TableError::Sys {
                what,
                source: e.into(),
            }
        };
        let fd = memfd_create(
            format!("vmm-fleet:{name}").as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(sys("memfd_create"))?;
        let words = table_words(MAX_VCPUS);
        nix::unistd::ftruncate(&fd, (words * 8) as i64).map_err(sys("ftruncate"))?;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(required_seals())).map_err(sys("F_ADD_SEALS"))?;
        let mapping = Mapping::map(&fd, words)?;
        mapping.words()[H_MAGIC].store(MAGIC, Ordering::Relaxed);
        Ok((
            ExitCounters {
                rows: MAX_VCPUS,
                backing: Backing::Shared(mapping),
                born: Instant::now(),
                id: next_table_id(),
            },
            fd,
        ))
    }

    /// Map a table created by [`ExitCounters::create_shared`] from an fd the child
    /// already holds (inherited). The fd must carry the resize seals and have exactly
    /// the table's size; it is closed once mapped.
    pub fn open_shared_fd(fd: OwnedFd) -> Result<Self, TableError> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|e| match e {
            // Not a memfd (or a memfd made without MFD_ALLOW_SEALING).
            nix::Error::EINVAL => TableError::NotSealed(0),
            e => TableError::Sys {
                what: "F_GET_SEALS",
                source: e.into(),
            },
        })?;
        if !SealFlag::from_bits_truncate(seals).contains(required_seals()) {
            return Err(TableError::NotSealed(seals));
        }
        let file = std::fs::File::from(fd);
        let len = file
            .metadata()
            .map_err(|source| TableError::Sys {
                what: "stat counter table",
                source,
            })?
            .len();
        if len != (table_words(MAX_VCPUS) * 8) as u64 {
            return Err(TableError::BadTable);
        }
        let mapping = Mapping::map(&file, table_words(MAX_VCPUS))?;
        if mapping.words()[H_MAGIC].load(Ordering::Relaxed) != MAGIC {
            return Err(TableError::BadTable);
        }
        Ok(ExitCounters {
            rows: MAX_VCPUS,
            backing: Backing::Shared(mapping),
            born: Instant::now(),
            id: next_table_id(),
        })
    }

    /// This table's identity, unique within the process (a replacement has another).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True while the magic word is intact.
    pub fn magic_ok(&self) -> bool {
        self.words()[H_MAGIC].load(Ordering::Relaxed) == MAGIC
    }

    /// The vCPU count the header claims, unclamped (untrusted in a shared table).
    pub fn header_vcpus(&self) -> u64 {
        self.words()[H_VCPUS].load(Ordering::Relaxed)
    }

    /// The largest value any counter of this table can honestly hold: one event per
    /// nanosecond of its life, per vCPU (an exit, or a nanosecond halted). `u64::MAX`
    /// for an in-process table, which no other process writes.
    pub fn plausible_max(&self) -> u64 {
        match self.backing {
            Backing::Heap(_) => u64::MAX,
            Backing::Shared(_) => u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Every counter of row `vcpu` (exits, then KVM statistics).
    fn row_values(&self, vcpu: usize) -> impl Iterator<Item = u64> + '_ {
        let exits = ExitReason::ALL.into_iter().map(move |r| self.get(vcpu, r));
        let kvm = (0..KVM_STATS.len()).map(move |s| self.kvm_stat(vcpu, s));
        exits.chain(kvm)
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.backing {
            Backing::Heap(b) => b,
            Backing::Shared(m) => m.words(),
        }
    }

    /// vCPUs of the VM's current (or last) run.
    pub fn vcpus(&self) -> usize {
        (self.words()[H_VCPUS].load(Ordering::Relaxed) as usize).min(self.rows)
    }

    /// Record how many vCPUs the VM has; rows beyond the table are never counted.
    pub fn set_vcpus(&self, n: usize) {
        self.words()[H_VCPUS].store(n.min(self.rows) as u64, Ordering::Relaxed);
    }

    fn cell(&self, vcpu: usize, reason: ExitReason) -> Option<&AtomicU64> {
        if vcpu >= self.rows {
            return None;
        }
        self.words()
            .get(HEADER_WORDS + vcpu * ExitReason::COUNT + reason as usize)
    }

    fn kvm_cell(&self, vcpu: usize, stat: usize) -> Option<&AtomicU64> {
        if vcpu >= self.rows || stat >= KVM_STATS.len() {
            return None;
        }
        self.words()
            .get(HEADER_WORDS + self.rows * ExitReason::COUNT + vcpu * KVM_STATS.len() + stat)
    }

    /// Count one exit: one relaxed atomic add. Rows past the table are ignored.
    #[inline]
    pub fn add(&self, vcpu: usize, reason: ExitReason) {
        if let Some(c) = self.cell(vcpu, reason) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The current count (0 for rows past the table).
    pub fn get(&self, vcpu: usize, reason: ExitReason) -> u64 {
        self.cell(vcpu, reason)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The sum of one reason over every vCPU.
    pub fn total(&self, reason: ExitReason) -> u64 {
        (0..self.vcpus()).map(|v| self.get(v, reason)).sum()
    }

    /// A KVM statistic (index into [`KVM_STATS`]), cumulative over the VM's runs.
    pub fn kvm_stat(&self, vcpu: usize, stat: usize) -> u64 {
        self.kvm_cell(vcpu, stat)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Publish a KVM statistic; it never goes down (a lower value is ignored).
    pub fn set_kvm_stat(&self, vcpu: usize, stat: usize, value: u64) {
        if let Some(c) = self.kvm_cell(vcpu, stat) {
            c.fetch_max(value, Ordering::Relaxed);
        }
    }

    /// Boot times of the current run, in ns from the child's start: (first console
    /// byte, userspace up); 0 = not yet.
    pub fn boot_ns(&self) -> (u64, u64) {
        let w = self.words();
        (
            w[H_FIRST_CONSOLE_NS].load(Ordering::Relaxed),
            w[H_USERSPACE_UP_NS].load(Ordering::Relaxed),
        )
    }

    /// A new run begins: clear its boot times.
    pub fn reset_boot(&self) {
        let w = self.words();
        w[H_FIRST_CONSOLE_NS].store(0, Ordering::Relaxed);
        w[H_USERSPACE_UP_NS].store(0, Ordering::Relaxed);
    }

    /// The guest wrote its first console byte `ns` after the child started (first call wins).
    pub fn mark_first_console(&self, ns: u64) {
        let _ = self.words()[H_FIRST_CONSOLE_NS].compare_exchange(
            0,
            ns.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The guest said its userspace is up `ns` after the child started (first call wins).
    pub fn mark_userspace_up(&self, ns: u64) {
        let _ = self.words()[H_USERSPACE_UP_NS].compare_exchange(
            0,
            ns.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// The supervisor's side of one VM's shared table: the mapping, the sealed memfd handed
/// to each child, and the most vCPUs any child of the VM was given (what the table may
/// honestly hold rows for).
pub struct SharedTable {
    counters: Arc<ExitCounters>,
    fd: OwnedFd,
    handed_vcpus: usize,
}

impl std::fmt::Debug for SharedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTable")
            .field("counters", &self.counters)
            .field("handed_vcpus", &self.handed_vcpus)
            .finish()
    }
}

impl SharedTable {
    /// A fresh sealed table for VM `name` (see [`ExitCounters::create_shared`]).
    pub fn create(name: &str) -> Result<Self, TableError> {
        let (t, fd) = ExitCounters::create_shared(name)?;
        Ok(SharedTable {
            counters: Arc::new(t),
            fd,
            handed_vcpus: 0,
        })
    }

    /// A table handed over by the program this one replaced at reexec: `fd` is its
    /// memfd (checked as a child checks it), `age` how long it has existed (a counter
    /// may be as large as its age in ns), `handed_vcpus` the most vCPUs a child of it got.
    pub fn adopt(
        fd: OwnedFd,
        age: std::time::Duration,
        handed_vcpus: usize,
    ) -> Result<Self, TableError> {
        let copy = fd.try_clone().map_err(|source| TableError::Sys {
            what: "dup counter table",
            source,
        })?;
        let mut t = ExitCounters::open_shared_fd(copy)?;
        t.born = Instant::now().checked_sub(age).unwrap_or(t.born);
        Ok(SharedTable {
            counters: Arc::new(t),
            fd,
            handed_vcpus: handed_vcpus.min(MAX_VCPUS),
        })
    }

    /// How long the table has existed (see [`SharedTable::adopt`]).
    pub fn age(&self) -> std::time::Duration {
        self.counters.born.elapsed()
    }

    /// The most vCPUs a child of this table was given.
    pub fn handed_vcpus(&self) -> usize {
        self.handed_vcpus
    }

    /// The supervisor's mapping (what the exporter reads).
    pub fn counters(&self) -> &Arc<ExitCounters> {
        &self.counters
    }

    /// The memfd, to pass to a child.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The table is about to be handed to a child with `vcpus` vCPUs.
    pub fn handing_to(&mut self, vcpus: usize) {
        self.handed_vcpus = self.handed_vcpus.max(vcpus.min(MAX_VCPUS));
    }

    /// Check what the children so far left in the table: the magic, a header no larger
    /// than the most vCPUs a child was given, no counts past those rows, and no counter
    /// above the table's age in ns. Reads 4,600 words: run it before a spawn, not per
    /// scrape.
    pub fn check(&self) -> Result<(), Corruption> {
        let t = &self.counters;
        let magic = t.words()[H_MAGIC].load(Ordering::Relaxed);
        if magic != MAGIC {
            return Err(Corruption::BadMagic(magic));
        }
        let limit = self.handed_vcpus;
        let header = t.header_vcpus();
        if header > limit as u64 {
            return Err(Corruption::TooManyVcpus { header, limit });
        }
        if let Some(v) = (limit..MAX_VCPUS).find(|&v| t.row_values(v).any(|x| x != 0)) {
            return Err(Corruption::RowPastVcpus(v));
        }
        let max = t.plausible_max();
        for vcpu in 0..limit {
            if let Some(value) = t.row_values(vcpu).find(|&x| x > max) {
                return Err(Corruption::Implausible {
                    vcpu,
                    value,
                    limit: max,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_own_cell() {
        let t = ExitCounters::new(2);
        t.add(0, ExitReason::IoOut);
        t.add(1, ExitReason::IoOut);
        t.add(1, ExitReason::IoOut);
        t.add(1, ExitReason::Other);
        t.add(7, ExitReason::IoOut); // past the table: ignored
        t.set_kvm_stat(1, 0, 5);
        t.set_kvm_stat(1, 0, 3); // never goes down
        assert_eq!(t.kvm_stat(1, 0), 5);
        assert_eq!(t.kvm_stat(0, 0), 0);
        assert_eq!(t.get(0, ExitReason::IoOut), 1);
        assert_eq!(t.get(1, ExitReason::IoOut), 2);
        assert_eq!(t.get(1, ExitReason::Other), 1);
        assert_eq!(t.get(0, ExitReason::Other), 0);
        assert_eq!(t.total(ExitReason::IoOut), 3);
        assert_eq!(t.get(9, ExitReason::IoOut), 0);
    }

    /// `fd`'s file opened again, read-write, the way another process would.
    fn reopen(fd: impl AsFd) -> std::fs::File {
        let path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
        );
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_shared_table_is_seen_through_a_second_mapping_and_outlives_it() {
        let (t, fd) = ExitCounters::create_shared("test").unwrap();
        {
            let child = ExitCounters::open_shared_fd(reopen(&fd).into()).unwrap();
            child.set_vcpus(2);
            child.add(1, ExitReason::IoIn);
            child.mark_first_console(42);
            child.mark_first_console(99);
        }
        assert_eq!(t.vcpus(), 2);
        assert_eq!(t.get(1, ExitReason::IoIn), 1);
        assert_eq!(t.boot_ns(), (42, 0));
        // A second run adds on top: monotonic across restarts.
        let again = ExitCounters::open_shared_fd(reopen(&fd).into()).unwrap();
        again.add(1, ExitReason::IoIn);
        assert_eq!(t.get(1, ExitReason::IoIn), 2);
        let junk = std::env::temp_dir().join(format!("not-a-table-{}", std::process::id()));
        std::fs::write(&junk, b"x").unwrap();
        let junk_file = std::fs::File::open(&junk).unwrap();
        assert!(ExitCounters::open_shared_fd(junk_file.into()).is_err());
        let _ = std::fs::remove_file(junk);
    }

    fn seals_of(fd: impl AsFd) -> nix::fcntl::SealFlag {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        SealFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GET_SEALS).unwrap())
    }

    #[test]
    fn a_shared_table_is_sealed_and_cannot_be_resized_through_any_fd() {
        let (t, fd) = ExitCounters::create_shared("seal").unwrap();
        assert!(seals_of(&fd).contains(required_seals()));
        let size = (table_words(MAX_VCPUS) * 8) as i64;
        // The supervisor's own fd, and the file reopened the way another process would.
        let reopened: OwnedFd = reopen(&fd).into();
        for f in [fd.as_fd(), reopened.as_fd()] {
            for len in [0, size - 8, size + 4096] {
                assert_eq!(
                    nix::unistd::ftruncate(f, len),
                    Err(nix::Error::EPERM),
                    "ftruncate to {len}"
                );
            }
        }
        // No seal can be taken away or added (F_SEAL_SEAL).
        assert_eq!(
            nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_WRITE)
            ),
            Err(nix::Error::EPERM)
        );
        // The mapping is intact: every word is still readable.
        t.set_vcpus(3);
        assert_eq!(t.vcpus(), 3);
        assert_eq!(t.get(MAX_VCPUS - 1, ExitReason::Other), 0);
        // The child side maps it from the fd itself as well as by path.
        let child = ExitCounters::open_shared_fd(reopened).unwrap();
        child.add(2, ExitReason::IoOut);
        assert_eq!(t.get(2, ExitReason::IoOut), 1);
    }

    #[test]
    fn the_child_refuses_an_unsealed_or_missized_memfd() {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let size = (table_words(MAX_VCPUS) * 8) as i64;
        // Unsealable: made without MFD_ALLOW_SEALING (the table as it used to be).
        let plain = memfd_create("plain", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&plain, size).unwrap();
        assert!(matches!(
            ExitCounters::open_shared_fd(plain),
            Err(TableError::NotSealed(_))
        ));
        // Sealable but not sealed.
        let open = memfd_create("open", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&open, size).unwrap();
        assert!(matches!(
            ExitCounters::open_shared_fd(open),
            Err(TableError::NotSealed(_))
        ));
        // Sealed at the wrong size.
        let small = memfd_create("small", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&small, 4096).unwrap();
        fcntl(&small, FcntlArg::F_ADD_SEALS(required_seals())).unwrap();
        assert!(matches!(
            ExitCounters::open_shared_fd(small),
            Err(TableError::BadTable)
        ));
        // Sealed, right size, no magic.
        let blank = memfd_create("blank", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&blank, size).unwrap();
        fcntl(
            &blank,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .unwrap();
        assert!(matches!(
            ExitCounters::open_shared_fd(blank),
            Err(TableError::BadTable)
        ));
    }

    #[test]
    fn check_finds_what_a_child_cannot_honestly_have_written() {
        let mut st = SharedTable::create("check").unwrap();
        assert_eq!(st.check(), Ok(()));
        st.handing_to(2);
        let child = ExitCounters::open_shared_fd(reopen(st.fd()).into()).unwrap();
        child.set_vcpus(2);
        child.add(1, ExitReason::IoOut);
        child.set_kvm_stat(0, 6, 1);
        assert_eq!(st.check(), Ok(()));
        let w = child.words();
        w[H_VCPUS].store(255, Ordering::Relaxed);
        assert_eq!(
            st.check(),
            Err(Corruption::TooManyVcpus {
                header: 255,
                limit: 2
            })
        );
        w[H_VCPUS].store(2, Ordering::Relaxed);
        child.add(5, ExitReason::Hlt);
        assert_eq!(st.check(), Err(Corruption::RowPastVcpus(5)));
        // A later child with more vCPUs makes that row honest.
        st.handing_to(8);
        assert_eq!(st.check(), Ok(()));
        child.set_kvm_stat(3, 0, u64::MAX);
        assert!(matches!(
            st.check(),
            Err(Corruption::Implausible {
                vcpu: 3,
                value: u64::MAX,
                ..
            })
        ));
        w[H_MAGIC].store(0xdead, Ordering::Relaxed);
        assert_eq!(st.check(), Err(Corruption::BadMagic(0xdead)));
        assert!(!st.counters().magic_ok());
        // A fresh table is another table.
        let fresh = SharedTable::create("check").unwrap();
        assert_ne!(fresh.counters().id(), st.counters().id());
        assert_eq!(fresh.check(), Ok(()));
    }

    #[test]
    fn names_are_unique() {
        let mut n: Vec<_> = ExitReason::ALL.iter().map(|r| r.name()).collect();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), ExitReason::COUNT);
        for (i, r) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
