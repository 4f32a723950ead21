//! The POST/debug port 0x80. Guests write boot progress here; the value 0x41 means
//! "userspace is up" (Cloud Hypervisor's convention), and its first arrival is kept.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use vm_device::DevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

/// The port.
pub const DEBUG_PORT: u16 = 0x80;
/// The value a guest writes once its userspace is up.
pub const BOOT_COMPLETE: u8 = 0x41;

/// The debug port: counts writes, remembers when the guest said it was up.
#[derive(Default)]
pub struct DebugPort {
    writes: AtomicU64,
    boot_complete: OnceLock<Instant>,
}

impl DebugPort {
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
        if data.first() == Some(&BOOT_COMPLETE) {
            let _ = self.boot_complete.set(Instant::now());
        }
    }
}
