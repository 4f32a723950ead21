//! The i8042 keyboard controller, as much of it as a VMM needs to ask a guest to shut
//! down and to let the guest reset the machine (the model is Firecracker's
//! `devices/legacy/i8042.rs`; this one is written for this crate):
//! - port 0x64 command 0xFE pulses the reset line: the guest asks for a reset that way
//!   (Linux with `reboot=k`), reported to the VM's exit handler as a reset stop;
//! - [`I8042::ctrl_alt_del`] queues the make codes of Ctrl, Alt and Del in the output
//!   buffer and raises the keyboard interrupt (IRQ 1, through an irqfd), as a keyboard
//!   would: the guest reads them through the status (0x64) and data (0x60) ports;
//! - the controller commands a driver uses at start-up: read/write the control register
//!   (its keyboard-interrupt and translation bits are honoured), read/write the output
//!   port, the self tests; bytes written to the keyboard itself are acknowledged (0xFA).
//!
//! The scancodes follow the control register's translation bit: set 1 (0x1d, 0x38,
//! 0xe0 0x53) when it is on, as a PC firmware leaves it and as the built-in guest reads
//! them; set 2 (0x14, 0x11, 0xe0 0x71, what Firecracker sends) when a driver turned it off.
//! The keyboard interrupt is raised only while the control register enables it (off at
//! power-on): bytes queued before a driver is ready wait, and the interrupt comes when
//! the driver enables it.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vmm_sys_util::eventfd::EventFd;

use crate::vm::vcpu::{ExitHandler, StopReason};

/// The controller's data port.
pub const I8042_DATA: u16 = 0x60;
/// The controller's command/status port.
pub const I8042_CMD: u16 = 0x64;
/// Ports the controller decodes, from [`I8042_DATA`] through [`I8042_CMD`].
pub const I8042_LEN: u16 = 5;
/// The ISA interrupt line of the keyboard.
pub const KBD_IRQ: u32 = 1;
/// The "pulse reset line" command.
pub const CMD_RESET: u8 = 0xfe;
/// Read the control register (its value comes at the data port).
pub const CMD_READ_CTR: u8 = 0x20;
/// Write the control register (its value follows at the data port).
pub const CMD_WRITE_CTR: u8 = 0x60;
/// Controller self test (answers 0x55).
pub const CMD_SELF_TEST: u8 = 0xaa;
/// Keyboard interface test (answers 0x00).
pub const CMD_KBD_TEST: u8 = 0xab;
/// Read the output port.
pub const CMD_READ_OUTP: u8 = 0xd0;
/// Write the output port (its value follows at the data port).
pub const CMD_WRITE_OUTP: u8 = 0xd1;

/// Status: a byte waits at the data port.
pub const STATUS_OUT_FULL: u8 = 0x01;
/// Status: the controller waits for a command's parameter at the data port.
pub const STATUS_CMD_DATA: u8 = 0x08;
/// Status: the keyboard is not locked.
pub const STATUS_KBD_ENABLED: u8 = 0x10;

/// Control register: raise IRQ 1 when a keyboard byte waits.
pub const CTR_KBD_INT: u8 = 0x01;
/// Control register: the power-on self test passed.
pub const CTR_POST_OK: u8 = 0x04;
/// Control register: translate the keyboard's set 2 to set 1.
pub const CTR_XLATE: u8 = 0x40;

/// Ctrl, Alt, Del make codes in scancode set 1 (translation on).
pub const CTRL_ALT_DEL_SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];
/// Ctrl, Alt, Del make codes in scancode set 2 (translation off).
pub const CTRL_ALT_DEL_SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Bytes the output buffer holds.
pub const BUF_SIZE: usize = 16;

/// Errors of [`I8042::ctrl_alt_del`].
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not read what was queued before (it ignores its keyboard).
    #[error("i8042 output buffer full ({0} of {BUF_SIZE} bytes unread by the guest)")]
    BufferFull(usize),
    /// The interrupt could not be raised.
    #[error("raising the keyboard interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// The i8042, registered on ports 0x60..=0x64 behind a mutex.
pub struct I8042 {
    exit: Arc<dyn ExitHandler>,
    irq: EventFd,
    control: u8,
    outp: u8,
    /// The command whose parameter the data port expects next.
    pending: Option<u8>,
    buf: VecDeque<u8>,
}

impl I8042 {
    /// An i8042 that reports a reset to `exit` and raises its interrupt through `irq`
    /// (an eventfd registered as the irqfd of [`KBD_IRQ`]).
    pub fn new(exit: Arc<dyn ExitHandler>, irq: EventFd) -> Self {
        I8042 {
            exit,
            irq,
            control: CTR_POST_OK | CTR_XLATE,
            outp: 0,
            pending: None,
            buf: VecDeque::with_capacity(BUF_SIZE),
        }
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = STATUS_KBD_ENABLED;
        if !self.buf.is_empty() {
            s |= STATUS_OUT_FULL;
        }
        if self.pending.is_some() {
            s |= STATUS_CMD_DATA;
        }
        s
    }

    /// The control register.
    pub fn control(&self) -> u8 {
        self.control
    }

    /// Bytes queued for the guest.
    pub fn queued(&self) -> usize {
        self.buf.len()
    }

    /// Queue Ctrl, Alt, Del (make codes, in the scancode set the control register
    /// selects) and raise the keyboard interrupt if the guest enabled it. Nothing is
    /// queued when the buffer lacks room for all four bytes.
    pub fn ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if BUF_SIZE - self.buf.len() < CTRL_ALT_DEL_SET1.len() {
            return Err(I8042Error::BufferFull(self.buf.len()));
        }
        let codes = if self.control & CTR_XLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        self.buf.extend(codes);
        self.interrupt().map_err(I8042Error::Interrupt)
    }

    /// Raise IRQ 1 if a byte waits and the guest enabled the keyboard interrupt.
    fn interrupt(&self) -> std::io::Result<()> {
        if self.control & CTR_KBD_INT != 0 && !self.buf.is_empty() {
            self.irq.write(1)?;
        }
        Ok(())
    }

    /// The answer to a controller command replaces whatever the buffer held.
    fn answer(&mut self, byte: u8) {
        self.buf.clear();
        self.buf.push_back(byte);
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET => self.exit.kick(StopReason::Reset),
            CMD_READ_CTR => self.answer(self.control),
            CMD_READ_OUTP => self.answer(self.outp),
            CMD_SELF_TEST => self.answer(0x55),
            CMD_KBD_TEST => self.answer(0x00),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            // Keyboard enable/disable, A20 and the rest: accepted, nothing to do.
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => {
                self.control = v;
                // Bytes that waited for the driver to enable its interrupt.
                let _ = self.interrupt();
            }
            Some(_) => self.outp = v,
            None => {
                // A command to the keyboard itself: acknowledged.
                self.answer(0xfa);
                let _ = self.interrupt();
            }
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let port = base.0.wrapping_add(offset);
        let v = match port {
            I8042_CMD => self.status(),
            I8042_DATA => {
                let v = self.buf.pop_front().unwrap_or(0);
                // More to read: one interrupt per byte, as a controller does.
                let _ = self.interrupt();
                v
            }
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match base.0.wrapping_add(offset) {
            I8042_CMD => self.command(v),
            I8042_DATA => self.data(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Exits(Mutex<Vec<StopReason>>);
    impl ExitHandler for Exits {
        fn kick(&self, reason: StopReason) {
            self.0.lock().unwrap().push(reason);
        }
    }

    fn device() -> (I8042, EventFd, Arc<Exits>) {
        let exits = Arc::new(Exits::default());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(exits.clone(), irq.try_clone().unwrap());
        (dev, irq, exits)
    }

    fn inb(d: &mut I8042, port: u16) -> u8 {
        let mut b = [0xffu8];
        d.pio_read(PioAddress(I8042_DATA), port - I8042_DATA, &mut b);
        b[0]
    }

    fn outb(d: &mut I8042, port: u16, v: u8) {
        d.pio_write(PioAddress(I8042_DATA), port - I8042_DATA, &[v]);
    }

    /// Interrupts raised since the last call (0 if none).
    fn irqs(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    /// What a driver reads: every byte while the status says one waits.
    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        while inb(d, I8042_CMD) & STATUS_OUT_FULL != 0 {
            got.push(inb(d, I8042_DATA));
            assert!(got.len() <= BUF_SIZE, "status never cleared");
        }
        got
    }

    #[test]
    fn ctrl_alt_del_waits_for_the_interrupt_enable_then_reads_as_set_1() {
        let (mut d, irq, exits) = device();
        assert_eq!(
            inb(&mut d, I8042_CMD) & STATUS_OUT_FULL,
            0,
            "empty at start"
        );
        d.ctrl_alt_del().unwrap();
        assert_eq!(d.queued(), 4);
        assert_ne!(inb(&mut d, I8042_CMD) & STATUS_OUT_FULL, 0);
        assert_eq!(irqs(&irq), 0, "no interrupt before the driver enables it");
        // The driver enables the keyboard interrupt: the waiting bytes raise it.
        outb(&mut d, I8042_CMD, CMD_WRITE_CTR);
        assert_ne!(inb(&mut d, I8042_CMD) & STATUS_CMD_DATA, 0);
        outb(&mut d, I8042_DATA, CTR_XLATE | CTR_POST_OK | CTR_KBD_INT);
        assert_eq!(inb(&mut d, I8042_CMD) & STATUS_CMD_DATA, 0);
        assert_eq!(irqs(&irq), 1);
        assert_eq!(drain(&mut d), CTRL_ALT_DEL_SET1);
        // One interrupt per byte still waiting after a read.
        assert_eq!(irqs(&irq), 3);
        assert_eq!(inb(&mut d, I8042_DATA), 0, "an empty buffer reads 0");
        assert!(exits.0.lock().unwrap().is_empty());
    }

    #[test]
    fn without_translation_the_codes_are_set_2() {
        let (mut d, irq, _) = device();
        outb(&mut d, I8042_CMD, CMD_WRITE_CTR);
        outb(&mut d, I8042_DATA, CTR_POST_OK | CTR_KBD_INT);
        d.ctrl_alt_del().unwrap();
        assert_eq!(irqs(&irq), 1, "enabled: raised at once");
        assert_eq!(drain(&mut d), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn a_full_buffer_refuses_a_whole_sequence() {
        let (mut d, _, _) = device();
        for _ in 0..BUF_SIZE / 4 {
            d.ctrl_alt_del().unwrap();
        }
        assert!(matches!(d.ctrl_alt_del(), Err(I8042Error::BufferFull(16))));
        assert_eq!(d.queued(), BUF_SIZE);
        let got = drain(&mut d);
        assert_eq!(got.len(), BUF_SIZE);
        assert!(got.chunks(4).all(|c| c == CTRL_ALT_DEL_SET1));
        d.ctrl_alt_del().unwrap();
    }

    #[test]
    fn controller_commands_answer_at_the_data_port() {
        let (mut d, _, exits) = device();
        d.ctrl_alt_del().unwrap();
        outb(&mut d, I8042_CMD, CMD_READ_CTR);
        assert_eq!(drain(&mut d), [CTR_POST_OK | CTR_XLATE], "answer replaces");
        outb(&mut d, I8042_CMD, CMD_SELF_TEST);
        assert_eq!(drain(&mut d), [0x55]);
        outb(&mut d, I8042_CMD, CMD_WRITE_OUTP);
        outb(&mut d, I8042_DATA, 0xdf);
        outb(&mut d, I8042_CMD, CMD_READ_OUTP);
        assert_eq!(drain(&mut d), [0xdf]);
        // A byte for the keyboard (set LEDs): acknowledged.
        outb(&mut d, I8042_DATA, 0xed);
        assert_eq!(drain(&mut d), [0xfa]);
        assert!(exits.0.lock().unwrap().is_empty());
        outb(&mut d, I8042_CMD, CMD_RESET);
        assert_eq!(*exits.0.lock().unwrap(), [StopReason::Reset]);
    }

    #[test]
    fn wide_and_stray_accesses_do_not_panic() {
        let (mut d, _, _) = device();
        let mut wide = [0xffu8; 4];
        d.pio_read(PioAddress(I8042_DATA), 4, &mut wide);
        assert_eq!(wide, [STATUS_KBD_ENABLED, 0, 0, 0]);
        d.pio_read(PioAddress(I8042_DATA), 2, &mut wide);
        d.pio_write(PioAddress(I8042_DATA), 4, &[]);
        d.pio_write(PioAddress(I8042_DATA), 3, &[1, 2]);
        let mut none: [u8; 0] = [];
        d.pio_read(PioAddress(I8042_DATA), 0, &mut none);
    }
}
