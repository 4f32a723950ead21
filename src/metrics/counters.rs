//! vCPU exit counters: the list of exit reasons and a table of atomic counters
//! indexed `[vcpu][reason]`, bumped with one relaxed atomic add per exit.

use std::sync::atomic::{AtomicU64, Ordering};

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
        };
        t.set_vcpus(vcpus);
        t
    }

    /// A new table in a memfd named after `name`, with rows for [`MAX_VCPUS`]. The fd
    /// is close-on-exec; a child opens it through `/proc/<pid>/fd/<fd>`.
    pub fn create_shared(name: &str) -> Result<(Self, std::os::fd::OwnedFd), TableError> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let sys = |what| {
            move |e: nix::Error| TableError::Sys {
                what,
                source: e.into(),
            }
        };
        let fd = memfd_create(format!("vmm-fleet:{name}").as_str(), MFdFlags::MFD_CLOEXEC)
            .map_err(sys("memfd_create"))?;
        let words = table_words(MAX_VCPUS);
        nix::unistd::ftruncate(&fd, (words * 8) as i64).map_err(sys("ftruncate"))?;
        let mapping = Mapping::map(&fd, words)?;
        mapping.words()[H_MAGIC].store(MAGIC, Ordering::Relaxed);
        Ok((
            ExitCounters {
                rows: MAX_VCPUS,
                backing: Backing::Shared(mapping),
            },
            fd,
        ))
    }

    /// Map a table created by [`ExitCounters::create_shared`] (in the VM child).
    pub fn open_shared(path: &std::path::Path) -> Result<Self, TableError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| TableError::Sys {
                what: "open counter table",
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| TableError::Sys {
                what: "stat counter table",
                source,
            })?
            .len() as usize;
        if len != table_words(MAX_VCPUS) * 8 {
            return Err(TableError::BadTable);
        }
        let mapping = Mapping::map(&file, len / 8)?;
        if mapping.words()[H_MAGIC].load(Ordering::Relaxed) != MAGIC {
            return Err(TableError::BadTable);
        }
        Ok(ExitCounters {
            rows: MAX_VCPUS,
            backing: Backing::Shared(mapping),
        })
    }

    /// Map a table created by [`ExitCounters::create_shared`] from an inherited fd (in
    /// the VM child, which may no longer reopen `/proc/self/fd/N` once it has dropped its
    /// privileges and is not dumpable). The mapping keeps the memory; the fd is closed.
    pub fn open_shared_fd(fd: std::os::fd::OwnedFd) -> Result<Self, TableError> {
        let file = std::fs::File::from(fd);
        let len = file
            .metadata()
            .map_err(|source| TableError::Sys {
                what: "stat counter table",
                source,
            })?
            .len() as usize;
        if len != table_words(MAX_VCPUS) * 8 {
            return Err(TableError::BadTable);
        }
        let mapping = Mapping::map(&file, len / 8)?;
        if mapping.words()[H_MAGIC].load(Ordering::Relaxed) != MAGIC {
            return Err(TableError::BadTable);
        }
        Ok(ExitCounters {
            rows: MAX_VCPUS,
            backing: Backing::Shared(mapping),
        })
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

    #[test]
    fn a_shared_table_is_seen_through_a_second_mapping_and_outlives_it() {
        let (t, fd) = ExitCounters::create_shared("test").unwrap();
        let path = std::path::PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ));
        {
            let child = ExitCounters::open_shared(&path).unwrap();
            child.set_vcpus(2);
            child.add(1, ExitReason::IoIn);
            child.mark_first_console(42);
            child.mark_first_console(99);
        }
        assert_eq!(t.vcpus(), 2);
        assert_eq!(t.get(1, ExitReason::IoIn), 1);
        assert_eq!(t.boot_ns(), (42, 0));
        // A second run adds on top: monotonic across restarts.
        let again = ExitCounters::open_shared(&path).unwrap();
        again.add(1, ExitReason::IoIn);
        assert_eq!(t.get(1, ExitReason::IoIn), 2);
        let junk = std::env::temp_dir().join(format!("not-a-table-{}", std::process::id()));
        std::fs::write(&junk, b"x").unwrap();
        assert!(ExitCounters::open_shared(&junk).is_err());
        let _ = std::fs::remove_file(junk);
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
