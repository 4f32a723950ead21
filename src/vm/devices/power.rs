//! The ACPI sleep control register at port 0x600 (hardware-reduced ACPI, Cloud
//! Hypervisor's convention): writing S5 with SLP_EN (0x34) powers the VM off,
//! writing 1 resets it.

use std::sync::Arc;

use vm_device::DevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

use crate::vm::vcpu::{ExitHandler, StopReason};

/// Port of the sleep control register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep type S5 in bits 2..4 plus SLP_EN (bit 5).
pub const S5_POWEROFF: u8 = (5 << 2) | (1 << 5);
/// The value that asks for a reset.
pub const RESET: u8 = 1;

/// The sleep control register.
pub struct PowerDevice {
    exit: Arc<dyn ExitHandler>,
}

impl PowerDevice {
    /// A sleep register that reports power-off and reset to `exit`.
    pub fn new(exit: Arc<dyn ExitHandler>) -> Self {
        PowerDevice { exit }
    }
}

impl DevicePio for PowerDevice {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        match data.first() {
            Some(&S5_POWEROFF) => self.exit.kick(StopReason::Poweroff),
            Some(&RESET) => self.exit.kick(StopReason::Reset),
            _ => {}
        }
    }
}
