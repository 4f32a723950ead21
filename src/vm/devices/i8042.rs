//! An i8042 keyboard controller that knows one command: 0xFE on port 0x64, pulse the
//! reset line. The guest asks for a reset that way (Linux with `reboot=k`).

use std::sync::Arc;

use vm_device::DevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

use crate::vm::vcpu::{ExitHandler, StopReason};

/// The controller's data port.
pub const I8042_DATA: u16 = 0x60;
/// The controller's command/status port.
pub const I8042_CMD: u16 = 0x64;
/// The "pulse reset line" command.
pub const CMD_RESET: u8 = 0xfe;

/// The reset-only i8042, registered on ports 0x60..=0x64.
pub struct I8042 {
    exit: Arc<dyn ExitHandler>,
}

impl I8042 {
    /// An i8042 that reports a reset to `exit`.
    pub fn new(exit: Arc<dyn ExitHandler>) -> Self {
        I8042 { exit }
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so drivers never wait.
        data.fill(0);
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if base.0.wrapping_add(offset) == I8042_CMD && data.first() == Some(&CMD_RESET) {
            self.exit.kick(StopReason::Reset);
        }
    }
}
