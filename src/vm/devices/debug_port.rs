//! The POST/debug port 0x80. Guests write boot progress here; the value 0x41 means
//! "userspace is up" (Cloud Hypervisor's convention), and its first arrival is kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vm_device::DevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

use crate::metrics::counters::ExitCounters;

/// The port.
pub const DEBUG_PORT: u16 = 0x80;
/// The value a guest writes once its userspace is up.
pub const BOOT_COMPLETE: u8 = 0x41;

/// The debug port: counts writes, remembers when the guest said it was up.
#[derive(Default)]
pub struct DebugPort {
    writes: AtomicU64,
    boot_complete: OnceLock<Instant>,
    table: Option<(Arc<ExitCounters>, Instant)>,
}

impl DebugPort {
    /// A debug port that also records the boot time (from `start`) in `table`.
    pub fn with_table(table: Arc<ExitCounters>, start: Instant) -> Self {
        DebugPort {
            table: Some((table, start)),
            ..Default::default()
        }
    }

    /// How many bytes the guest wrote to the port.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// When the guest first wrote [`BOOT_COMPLETE`], if it has.
    pub fn boot_complete(&self) -> Option<Instant> {
        self.boot_complete.get().copied()
    }
}

impl DevicePio for DebugPort {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if data.first() == Some(&BOOT_COMPLETE) && self.boot_complete.get().is_none() {
            let now = Instant::now();
            let _ = self.boot_complete.set(now);
            if let Some((table, start)) = &self.table {
                table.mark_userspace_up(now.duration_since(*start).as_nanos() as u64);
            }
        }
    }
}
