//! The 16550 UART at 0x3f8 (rust-vmm's vm-superio), raising IRQ 4 through an irqfd,
//! its output going to the VM's console and its receive side fed by
//! [`SerialDevice::enqueue_input`] (console input from the supervisor).

use std::io::{self, Write};
use std::sync::Mutex;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports a 16550 decodes.
pub const COM1_LEN: u16 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Bytes the receive FIFO holds (vm-superio's).
pub const RX_FIFO_SIZE: usize = 64;

/// An eventfd registered as an irqfd: writing it raises the UART's interrupt.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A console writer that records when the guest's first byte arrives.
pub struct FirstByteWriter<W: Write> {
    inner: W,
    table: std::sync::Arc<crate::metrics::counters::ExitCounters>,
    start: std::time::Instant,
    seen: bool,
}

impl<W: Write> FirstByteWriter<W> {
    /// Wrap `inner`; the first write is recorded in `table` relative to `start`.
    pub fn new(
        inner: W,
        table: std::sync::Arc<crate::metrics::counters::ExitCounters>,
        start: std::time::Instant,
    ) -> Self {
        FirstByteWriter {
            inner,
            table,
            start,
            seen: false,
        }
    }
}

impl<W: Write> Write for FirstByteWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.seen && !buf.is_empty() {
            self.seen = true;
            self.table
                .mark_first_console(self.start.elapsed().as_nanos() as u64);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A serial port device for the bus.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes guest output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            inner: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Put `bytes` in the receive FIFO (64 bytes) and raise the received-data interrupt
    /// if the guest enabled it; never blocks. Returns how many were taken: what does not
    /// fit (the guest has not read what came before) is dropped by the caller.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        match self.inner.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            // FullFifo: nothing taken. A failed interrupt write (the eventfd counter at
            // its maximum) still left the bytes in the FIFO.
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(_) => bytes.len().min(room),
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Wrap for the bus.
    pub fn into_shared(self) -> std::sync::Arc<Mutex<SerialDevice>> {
        std::sync::Arc::new(Mutex::new(self))
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A console that cannot be written (full disk, closed pipe) must not stop
            // the guest: the byte is dropped.
            let _ = self.inner.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_the_console_and_lsr_says_empty() {
        let buf = Buf::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(evt, Box::new(buf.clone()));
        for b in b"hi\n" {
            s.pio_write(PioAddress(COM1_BASE), 0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        s.pio_read(PioAddress(COM1_BASE), 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn input_fills_the_fifo_raises_the_interrupt_and_drops_the_rest() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(evt.try_clone().unwrap(), Box::new(io::sink()));
        // Interrupt on received data (IER bit 0), as the echo guest sets it.
        s.pio_write(PioAddress(COM1_BASE), 1, &[0x01]);
        assert_eq!(s.enqueue_input(b"hello\r"), 6);
        assert_eq!(evt.read().unwrap(), 1, "IRQ 4 raised");
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            s.pio_read(PioAddress(COM1_BASE), 5, &mut b);
            if b[0] & 0x01 == 0 {
                break;
            }
            s.pio_read(PioAddress(COM1_BASE), 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"hello\r");
        let big = [b'x'; 100];
        assert_eq!(s.enqueue_input(&big), RX_FIFO_SIZE);
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(b"y"), 0, "full: nothing taken");
    }
}
