//! The 16550 UART at 0x3f8 (rust-vmm's vm-superio), raising IRQ 4 through an irqfd,
//! its output going to the VM's console.

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
}
