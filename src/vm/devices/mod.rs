//! The VM's I/O bus: port and MMIO ranges mapped to devices (rust-vmm's vm-device),
//! plus the legacy devices the guests here need: a 16550 UART (console in and out), an
//! i8042 (the reset command, and Ctrl-Alt-Del for a graceful stop), the ACPI sleep
//! register and the POST/debug port.
//!
//! Accesses that no device claims are counted and ignored: reads return all ones.

pub mod debug_port;
pub mod i8042;
pub mod power;
pub mod serial;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// Errors registering devices on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps another device or is empty.
    #[error("cannot register {what} at {base:#x} (+{len:#x}): {source}")]
    Register {
        /// Which device.
        what: &'static str,
        /// First address of the range.
        base: u64,
        /// Length of the range.
        len: u64,
        /// What vm-device said.
        source: vm_device::bus::Error,
    },
}

/// The VM's I/O bus, shared by every vCPU thread.
#[derive(Default)]
pub struct Bus {
    io: IoManager,
    unclaimed_pio: AtomicU64,
    unclaimed_mmio: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claim ports `[base, base + len)` for `dev`.
    pub fn add_pio(
        &mut self,
        what: &'static str,
        base: u16,
        len: u16,
        dev: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), BusError> {
        let err = |source| BusError::Register {
            what,
            base: u64::from(base),
            len: u64::from(len),
            source,
        };
        let range = PioRange::new(PioAddress(base), len).map_err(err)?;
        self.io.register_pio(range, dev).map_err(err)
    }

    /// Claim guest-physical addresses `[base, base + len)` for `dev`.
    pub fn add_mmio(
        &mut self,
        what: &'static str,
        base: u64,
        len: u64,
        dev: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), BusError> {
        let err = |source| BusError::Register {
            what,
            base,
            len,
            source,
        };
        let range = MmioRange::new(MmioAddress(base), len).map_err(err)?;
        self.io.register_mmio(range, dev).map_err(err)
    }

    /// A port read; unclaimed ports read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
            self.unclaimed_pio.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A port write; unclaimed ports drop it.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.io.pio_write(PioAddress(port), data).is_err() {
            self.unclaimed_pio.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.io.mmio_read(MmioAddress(addr), data).is_err() {
            data.fill(0xff);
            self.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An MMIO write; unclaimed addresses drop it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.io.mmio_write(MmioAddress(addr), data).is_err() {
            self.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many port accesses no device claimed.
    pub fn unclaimed_pio(&self) -> u64 {
        self.unclaimed_pio.load(Ordering::Relaxed)
    }

    /// How many MMIO accesses no device claimed.
    pub fn unclaimed_mmio(&self) -> u64 {
        self.unclaimed_mmio.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::MutDevicePio;
    use vm_device::bus::PioAddressOffset;

    #[derive(Default)]
    struct Rec(Vec<(u16, u8)>);
    impl MutDevicePio for Rec {
        fn pio_read(&mut self, _b: PioAddress, off: PioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8);
        }
        fn pio_write(&mut self, _b: PioAddress, off: PioAddressOffset, data: &[u8]) {
            self.0.push((off, data[0]));
        }
    }

    #[test]
    fn claimed_ports_reach_the_device_and_others_are_counted() {
        let rec = Arc::new(Mutex::new(Rec::default()));
        let mut bus = Bus::new();
        bus.add_pio("rec", 0x100, 4, rec.clone()).unwrap();
        bus.pio_write(0x102, &[7]);
        let mut b = [0u8; 1];
        bus.pio_read(0x103, &mut b);
        assert_eq!(b[0], 3);
        assert_eq!(rec.lock().unwrap().0, vec![(2, 7)]);
        assert_eq!(bus.unclaimed_pio(), 0);
        bus.pio_write(0x104, &[1]);
        bus.pio_read(0x99, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.unclaimed_pio(), 2);
        let mut m = [0u8; 4];
        bus.mmio_read(0xd000_0000, &mut m);
        assert_eq!(m, [0xff; 4]);
        assert_eq!(bus.unclaimed_mmio(), 1);
        assert!(bus.add_pio("dup", 0x101, 1, rec).is_err());
    }
}
