//! The MP table (Intel MultiProcessor Specification 1.4) written for the guest.
//!
//! A guest kernel without ACPI finds its processors, I/O APIC and interrupt
//! routing here: it scans the last KiB of base memory for the MP floating
//! pointer structure (`_MP_`), follows its physical pointer to the MP
//! configuration table (`PCMP`) and walks the table's entries.
//!
//! The layout follows what Firecracker and rust-vmm's vmm-reference write:
//!
//! * floating pointer (16 bytes) at [`MPTABLE_START`];
//! * configuration table header (44 bytes) right after it;
//! * one processor entry (20 bytes) per vCPU, APIC IDs `0..num_cpus`,
//!   vCPU 0 being the bootstrap processor;
//! * one ISA bus entry (8 bytes);
//! * one I/O APIC entry (8 bytes) with APIC ID `num_cpus`;
//! * 24 I/O interrupt entries (8 bytes each): ISA IRQ `i` -> I/O APIC pin `i`;
//! * two local interrupt entries (8 bytes each): ExtINT on LINT0 of the BSP,
//!   NMI on LINT1 of every local APIC.
//!
//! Every structure is serialized field by field in little-endian order, so no
//! `#[repr(packed)]` structs and no `unsafe` are needed.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Where the MP floating pointer structure goes: the last KiB of base memory
/// (the EBDA area below 640 KiB), as Firecracker does.
pub const MPTABLE_START: u64 = 0x9fc00;

/// Most vCPUs an MP table built here describes (APIC IDs are u8; the I/O APIC
/// takes the next ID).
pub const MAX_SUPPORTED_CPUS: u8 = 254;

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than [`MAX_SUPPORTED_CPUS`].
    #[error("{0} vCPUs requested; an MP table describes at most {MAX_SUPPORTED_CPUS}")]
    TooManyCpus(u8),
    /// A guest needs at least one (bootstrap) processor.
    #[error("an MP table needs at least one vCPU")]
    ZeroCpus,
    /// Guest memory does not cover `[MPTABLE_START, MPTABLE_START + table size)`.
    #[error("guest memory does not cover the MP table at {MPTABLE_START:#x}")]
    NotEnoughMemory,
    /// Writing the table into guest memory failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

// ---- Layout and constants (MP spec 1.4, chapter 4; Linux asm/mpspec_def.h) ----

/// Size of the MP floating pointer structure.
const MPF_SIZE: usize = 16;
/// Size of the MP configuration table header.
const MPC_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
const MPC_CPU_SIZE: usize = 20;
/// Size of a bus, I/O APIC, I/O interrupt or local interrupt entry.
const MPC_SMALL_ENTRY_SIZE: usize = 8;

const SMP_MAGIC_IDENT: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// Specification revision 1.4.
const MPC_SPEC: u8 = 4;
const MPC_OEM: &[u8; 8] = b"VMMFLEET";
const MPC_PRODUCT_ID: &[u8; 12] = b"000000000000";
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";

/// Default local APIC base (Linux asm/apicdef.h).
const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// Default I/O APIC base (Linux asm/apicdef.h).
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Local APIC version reported for each processor (integrated xAPIC).
const APIC_VERSION: u8 = 0x14;
/// I/O APIC version (82093AA-style, as KVM's in-kernel I/O APIC reports).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_STEPPING: u32 = 6 << 8;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
// I/O APIC entry flags.
const MPC_APIC_USABLE: u8 = 1 << 0;

// Interrupt types.
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus".
const MP_IRQPOL_DEFAULT: u16 = 0;

/// Highest ISA/GSI routed through the I/O APIC (24 pins), as in
/// `kvm_setup_default_irq_routing()`.
const IRQ_MAX: u8 = 23;
/// Local interrupt destination "all local APICs".
const ALL_LAPICS: u8 = 0xff;

/// Absolute address of the configuration table (right after the floating pointer).
const MPC_TABLE_ADDR: u32 = (MPTABLE_START + MPF_SIZE as u64) as u32;
const _: () = assert!(MPTABLE_START + (MPF_SIZE as u64) <= u32::MAX as u64);

/// Largest base table (header + entries), for [`MAX_SUPPORTED_CPUS`] vCPUs.
const MAX_BASE_TABLE_LEN: usize = MPC_HEADER_SIZE + base_entries_size(MAX_SUPPORTED_CPUS);
const _: () = assert!(MAX_BASE_TABLE_LEN <= u16::MAX as usize);

/// Total size in bytes of what [`build`] returns for `num_cpus` vCPUs.
fn mp_size(num_cpus: u8) -> usize {
    MPF_SIZE + MPC_HEADER_SIZE + base_entries_size(num_cpus)
}

/// Number of entries in the base configuration table.
fn entry_count(num_cpus: u8) -> u16 {
    // processors + bus + I/O APIC + I/O interrupts + 2 local interrupts
    u16::from(num_cpus) + 1 + 1 + (u16::from(IRQ_MAX) + 1) + 2
}

const fn base_entries_size(num_cpus: u8) -> usize {
    num_cpus as usize * MPC_CPU_SIZE
        + MPC_SMALL_ENTRY_SIZE // bus
        + MPC_SMALL_ENTRY_SIZE // I/O APIC
        + (IRQ_MAX as usize + 1) * MPC_SMALL_ENTRY_SIZE
        + 2 * MPC_SMALL_ENTRY_SIZE
}

/// Byte-wise sum modulo 256.
fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The checksum byte that makes `bytes` (with the checksum byte still 0) sum to 0.
fn checksum_for(bytes: &[u8]) -> u8 {
    sum(bytes).wrapping_neg()
}

fn check_cpus(num_cpus: u8) -> Result<(), MpTableError> {
    if num_cpus == 0 {
        return Err(MpTableError::ZeroCpus);
    }
    if num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    Ok(())
}

fn push_cpu(buf: &mut Vec<u8>, apic_id: u8) {
    let start = buf.len();
    let mut flags = CPU_ENABLED;
    if apic_id == 0 {
        flags |= CPU_BOOTPROCESSOR;
    }
    buf.push(MP_PROCESSOR);
    buf.push(apic_id);
    buf.push(APIC_VERSION);
    buf.push(flags);
    buf.extend_from_slice(&CPU_STEPPING.to_le_bytes());
    buf.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
    buf.extend_from_slice(&[0u8; 8]); // reserved
    debug_assert_eq!(buf.len() - start, MPC_CPU_SIZE);
}

fn push_bus(buf: &mut Vec<u8>) {
    buf.push(MP_BUS);
    buf.push(0); // bus id
    buf.extend_from_slice(BUS_TYPE_ISA);
}

fn push_ioapic(buf: &mut Vec<u8>, ioapic_id: u8) {
    buf.push(MP_IOAPIC);
    buf.push(ioapic_id);
    buf.push(IOAPIC_VERSION);
    buf.push(MPC_APIC_USABLE);
    buf.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
}

fn push_intsrc(buf: &mut Vec<u8>, ioapic_id: u8, irq: u8) {
    buf.push(MP_INTSRC);
    buf.push(MP_IRQ_INT);
    buf.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
    buf.push(0); // source bus id (ISA)
    buf.push(irq); // source bus IRQ
    buf.push(ioapic_id); // destination I/O APIC
    buf.push(irq); // destination I/O APIC pin
}

fn push_lintsrc(buf: &mut Vec<u8>, irq_type: u8, dest_apic: u8, dest_lint: u8) {
    buf.push(MP_LINTSRC);
    buf.push(irq_type);
    buf.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
    buf.push(0); // source bus id
    buf.push(0); // source bus IRQ
    buf.push(dest_apic);
    buf.push(dest_lint);
}

/// Build the bytes of the MP table for `num_cpus` (floating pointer + config
/// table header + entries) as it sits at [`MPTABLE_START`].
///
/// The floating pointer's physical pointer is absolute: it points to
/// `MPTABLE_START + 16`, where the configuration table header follows.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    check_cpus(num_cpus)?;
    let total = mp_size(num_cpus);
    let mut buf = Vec::with_capacity(total);

    // MP floating pointer structure (MP spec 4.1).
    buf.extend_from_slice(SMP_MAGIC_IDENT);
    buf.extend_from_slice(&MPC_TABLE_ADDR.to_le_bytes()); // physical address pointer
    buf.push(1); // length in 16-byte paragraphs
    buf.push(MPC_SPEC); // spec revision 1.4
    buf.push(0); // checksum, patched below
    buf.extend_from_slice(&[0u8; 5]); // feature bytes 1-5: config table present, no IMCR
    debug_assert_eq!(buf.len(), MPF_SIZE);
    buf[10] = checksum_for(&buf[..MPF_SIZE]);

    // MP configuration table header (MP spec 4.2).
    let table_start = buf.len();
    // Fits: at most MAX_BASE_TABLE_LEN, checked against u16::MAX at compile time.
    let base_len = (MPC_HEADER_SIZE + base_entries_size(num_cpus)) as u16;
    buf.extend_from_slice(MPC_SIGNATURE);
    buf.extend_from_slice(&base_len.to_le_bytes()); // base table length
    buf.push(MPC_SPEC);
    buf.push(0); // checksum, patched below
    buf.extend_from_slice(MPC_OEM);
    buf.extend_from_slice(MPC_PRODUCT_ID);
    buf.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer: none
    buf.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    buf.extend_from_slice(&entry_count(num_cpus).to_le_bytes());
    buf.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    buf.push(0); // extended table checksum
    buf.push(0); // reserved
    debug_assert_eq!(buf.len() - table_start, MPC_HEADER_SIZE);

    // Base table entries, sorted by type as the spec requires.
    let ioapic_id = num_cpus;
    for apic_id in 0..num_cpus {
        push_cpu(&mut buf, apic_id);
    }
    push_bus(&mut buf);
    push_ioapic(&mut buf, ioapic_id);
    for irq in 0..=IRQ_MAX {
        push_intsrc(&mut buf, ioapic_id, irq);
    }
    push_lintsrc(&mut buf, MP_IRQ_EXTINT, 0, 0);
    push_lintsrc(&mut buf, MP_IRQ_NMI, ALL_LAPICS, 1);

    debug_assert_eq!(buf.len(), total);
    debug_assert_eq!(buf.len() - table_start, usize::from(base_len));
    buf[table_start + 7] = checksum_for(&buf[table_start..]);
    Ok(buf)
}

/// Write the MP table for `num_cpus` into guest memory at [`MPTABLE_START`].
///
/// Fails with [`MpTableError::NotEnoughMemory`] (writing nothing) if guest
/// memory does not cover the whole table.
pub fn write<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus)?;
    let start = GuestAddress(MPTABLE_START);
    if !mem.check_range(start, bytes.len(), Permissions::Write) {
        return Err(MpTableError::NotEnoughMemory);
    }
    mem.write_slice(&bytes, start).map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// What a guest learns from the MP table.
    #[derive(Debug, Default)]
    struct Parsed {
        /// Address of the configuration table.
        table_addr: u64,
        /// `(APIC id, flags)` for each processor entry, in table order.
        cpus: Vec<(u8, u8)>,
        /// `(APIC id, flags, address)` for each I/O APIC entry.
        ioapics: Vec<(u8, u8, u32)>,
        /// `(source bus irq, destination APIC, destination pin)` per I/O interrupt entry.
        intsrcs: Vec<(u8, u8, u8)>,
        /// `(irq type, destination APIC, destination LINT#)` per local interrupt entry.
        lintsrcs: Vec<(u8, u8, u8)>,
        /// Bus type strings.
        buses: Vec<[u8; 6]>,
        /// Entry count from the header.
        header_entry_count: u16,
        /// Entries actually walked.
        walked_entries: u16,
        /// Local APIC address from the header.
        lapic: u32,
    }

    impl Parsed {
        fn enabled_cpus(&self) -> usize {
            self.cpus
                .iter()
                .filter(|(_, f)| f & CPU_ENABLED != 0)
                .count()
        }
    }

    fn read_bytes<M: GuestMemory>(mem: &M, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn le16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Find and parse the MP table the way a guest kernel does: scan the last
    /// KiB of base memory on 16-byte boundaries for a `_MP_` floating pointer
    /// whose checksum is valid, follow its pointer to a `PCMP` table with a
    /// valid checksum, then walk the entries by type-determined size.
    fn parse<M: GuestMemory>(mem: &M) -> Result<Parsed, String> {
        // Scan 16-byte paragraphs of 0x9fc00..0xa0000 that exist in memory.
        let mpf = (0x9fc00u64..0xa0000)
            .step_by(16)
            .map_while(|addr| {
                let mut para = [0u8; 16];
                mem.read_slice(&mut para, GuestAddress(addr)).ok()?;
                Some(para)
            })
            .find(|para| &para[0..4] == SMP_MAGIC_IDENT && para[8] == 1 && sum(para) == 0)
            .ok_or("no valid _MP_ floating pointer")?;
        let mpf = &mpf[..];
        if mpf[9] != 1 && mpf[9] != 4 {
            return Err(format!("bad spec rev {}", mpf[9]));
        }
        if mpf[11] != 0 {
            return Err("default configuration requested".into());
        }
        let table_addr = u64::from(le32(mpf, 4));
        let header = read_bytes(mem, table_addr, MPC_HEADER_SIZE);
        if &header[0..4] != MPC_SIGNATURE {
            return Err("bad PCMP signature".into());
        }
        let length = usize::from(le16(&header, 4));
        if length < MPC_HEADER_SIZE {
            return Err("table shorter than its header".into());
        }
        let table = read_bytes(mem, table_addr, length);
        if sum(&table) != 0 {
            return Err("bad PCMP checksum".into());
        }
        let mut p = Parsed {
            table_addr,
            header_entry_count: le16(&table, 34),
            lapic: le32(&table, 36),
            ..Default::default()
        };
        let mut off = MPC_HEADER_SIZE;
        while off < length {
            let size = match table[off] {
                MP_PROCESSOR => MPC_CPU_SIZE,
                MP_BUS | MP_IOAPIC | MP_INTSRC | MP_LINTSRC => MPC_SMALL_ENTRY_SIZE,
                t => return Err(format!("unknown entry type {t} at {off}")),
            };
            if off + size > length {
                return Err("entry overruns the table".into());
            }
            let e = &table[off..off + size];
            match e[0] {
                MP_PROCESSOR => p.cpus.push((e[1], e[3])),
                MP_BUS => p.buses.push(e[2..8].try_into().unwrap()),
                MP_IOAPIC => p.ioapics.push((e[1], e[3], le32(e, 4))),
                MP_INTSRC => p.intsrcs.push((e[5], e[6], e[7])),
                _ => p.lintsrcs.push((e[1], e[6], e[7])),
            }
            p.walked_entries += 1;
            off += size;
        }
        Ok(p)
    }

    fn mem_1m() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Memory from 0 up to (and including) the whole table for `num_cpus`.
    fn mem_for(num_cpus: u8) -> GuestMemoryMmap {
        let end = MPTABLE_START as usize + mp_size(num_cpus);
        let size = end.next_multiple_of(4096);
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn structure_sizes() {
        let one = build(1).unwrap();
        let two = build(2).unwrap();
        assert_eq!(two.len() - one.len(), MPC_CPU_SIZE);
        // 16 + 44 + 20 + bus 8 + ioapic 8 + 24 * 8 + 2 * 8
        assert_eq!(one.len(), 16 + 44 + 20 + 8 + 8 + 24 * 8 + 16);
        assert_eq!(one.len(), mp_size(1));
    }

    #[test]
    fn floating_pointer() {
        let b = build(4).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
        assert_eq!(u64::from(le32(&b, 4)), MPTABLE_START + 16, "physptr");
        assert_eq!(b[8], 1, "length in paragraphs");
        assert_eq!(b[9], 4, "spec rev 1.4");
        assert_eq!(&b[11..16], &[0; 5], "feature bytes");
    }

    #[test]
    fn config_table_header() {
        for n in [1u8, 2, 4, 17, MAX_SUPPORTED_CPUS] {
            let b = build(n).unwrap();
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = usize::from(le16(t, 4));
            assert_eq!(
                len,
                t.len(),
                "base table length covers everything after mpf"
            );
            assert_eq!(sum(&t[..len]), 0, "config table checksum, {n} cpus");
            assert_eq!(t[6], 4);
            assert_eq!(&t[8..16], b"VMMFLEET");
            assert_eq!(&t[16..28], b"000000000000");
            assert_eq!(le32(t, 28), 0, "no OEM table");
            assert_eq!(le16(t, 32), 0);
            assert_eq!(le16(t, 34), u16::from(n) + 28, "entry count");
            assert_eq!(le32(t, 36), 0xfee0_0000);
            assert_eq!(&t[40..44], &[0; 4], "no extended table");
        }
    }

    #[test]
    fn entries_as_guest_sees_them() {
        for n in [1u8, 2, 3, 8, 64, 200, MAX_SUPPORTED_CPUS] {
            let mem = mem_for(n);
            write(&mem, n).unwrap();
            let p = parse(&mem).unwrap();
            assert_eq!(p.table_addr, MPTABLE_START + 16);
            assert_eq!(p.lapic, 0xfee0_0000);
            assert_eq!(
                p.walked_entries, p.header_entry_count,
                "entry count, {n} cpus"
            );

            // Exactly one processor entry per vCPU, APIC ids 0..n, all enabled,
            // BSP flag only on id 0.
            assert_eq!(p.cpus.len(), usize::from(n));
            assert_eq!(p.enabled_cpus(), usize::from(n));
            for (i, &(id, flags)) in p.cpus.iter().enumerate() {
                assert_eq!(usize::from(id), i);
                assert_ne!(flags & CPU_ENABLED, 0);
                assert_eq!(flags & CPU_BOOTPROCESSOR != 0, id == 0, "BSP flag on {id}");
            }

            assert_eq!(p.buses, vec![*b"ISA   "]);
            assert_eq!(p.ioapics, vec![(n, MPC_APIC_USABLE, 0xfec0_0000)]);
            let expect_int: Vec<_> = (0..=23u8).map(|i| (i, n, i)).collect();
            assert_eq!(p.intsrcs, expect_int);
            assert_eq!(
                p.lintsrcs,
                vec![(MP_IRQ_EXTINT, 0, 0), (MP_IRQ_NMI, 0xff, 1)]
            );
        }
    }

    #[test]
    fn processor_entry_bytes() {
        let b = build(2).unwrap();
        let cpu0 = &b[60..80];
        let cpu1 = &b[80..100];
        assert_eq!(&cpu0[0..4], &[0, 0, 0x14, 0x03]);
        assert_eq!(&cpu1[0..4], &[0, 1, 0x14, 0x01]);
        for cpu in [cpu0, cpu1] {
            assert_eq!(le32(cpu, 4), 0x600, "cpu signature");
            assert_eq!(le32(cpu, 8), 0x201, "feature flags FPU|APIC");
            assert_eq!(&cpu[12..20], &[0; 8]);
        }
        // I/O APIC entry right after the bus entry.
        assert_eq!(&b[100..108], b"\x01\x00ISA   ");
        assert_eq!(&b[108..116], &[2, 2, 0x11, 1, 0x00, 0x00, 0xc0, 0xfe]);
    }

    #[test]
    fn cpu_count_errors() {
        assert!(matches!(build(0), Err(MpTableError::ZeroCpus)));
        assert!(matches!(build(255), Err(MpTableError::TooManyCpus(255))));
        assert!(build(MAX_SUPPORTED_CPUS).is_ok());
        let mem = mem_1m();
        assert!(matches!(write(&mem, 0), Err(MpTableError::ZeroCpus)));
        assert!(matches!(
            write(&mem, 255),
            Err(MpTableError::TooManyCpus(255))
        ));
    }

    #[test]
    fn write_puts_built_bytes_at_start() {
        let mem = mem_1m();
        write(&mem, 4).unwrap();
        let expect = build(4).unwrap();
        assert_eq!(read_bytes(&mem, MPTABLE_START, expect.len()), expect);
        assert_eq!(parse(&mem).unwrap().enabled_cpus(), 4);
    }

    #[test]
    fn write_fails_cleanly_on_small_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
        assert!(matches!(write(&mem, 1), Err(MpTableError::NotEnoughMemory)));

        // Memory ending one byte short of the table: nothing written.
        let n = 4;
        let short = MPTABLE_START as usize + mp_size(n) - 1;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), short)]).unwrap();
        assert!(matches!(write(&mem, n), Err(MpTableError::NotEnoughMemory)));
        let untouched = read_bytes(&mem, MPTABLE_START, mp_size(n) - 1);
        assert!(untouched.iter().all(|&b| b == 0), "partial write");
        // Exactly enough memory works.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), short + 1)]).unwrap();
        write(&mem, n).unwrap();
        assert_eq!(parse(&mem).unwrap().enabled_cpus(), usize::from(n));
    }

    #[test]
    fn error_messages() {
        assert!(MpTableError::TooManyCpus(255).to_string().contains("254"));
        assert!(!MpTableError::ZeroCpus.to_string().is_empty());
        assert!(
            MpTableError::NotEnoughMemory
                .to_string()
                .contains("0x9fc00")
        );
    }
}
