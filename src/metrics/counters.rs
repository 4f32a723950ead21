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

/// A table of monotonic exit counters, one row per vCPU.
#[derive(Debug)]
pub struct ExitCounters {
    vcpus: usize,
    cells: Box<[AtomicU64]>,
}

impl ExitCounters {
    /// A zeroed table for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        let cells = (0..vcpus * ExitReason::COUNT)
            .map(|_| AtomicU64::new(0))
            .collect();
        ExitCounters { vcpus, cells }
    }

    /// Number of vCPU rows.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    fn cell(&self, vcpu: usize, reason: ExitReason) -> Option<&AtomicU64> {
        if vcpu >= self.vcpus {
            return None;
        }
        self.cells.get(vcpu * ExitReason::COUNT + reason as usize)
    }

    /// Count one exit. Rows past the table are ignored.
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
        (0..self.vcpus).map(|v| self.get(v, reason)).sum()
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
        assert_eq!(t.get(0, ExitReason::IoOut), 1);
        assert_eq!(t.get(1, ExitReason::IoOut), 2);
        assert_eq!(t.get(1, ExitReason::Other), 1);
        assert_eq!(t.get(0, ExitReason::Other), 0);
        assert_eq!(t.total(ExitReason::IoOut), 3);
        assert_eq!(t.get(9, ExitReason::IoOut), 0);
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
