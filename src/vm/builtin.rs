//! The built-in guest images, built from guest/ at build time.
//!
//! `build.rs` compiles `guest/builtin/` (freestanding C plus an assembly entry stub) and
//! `guest/tiny/tiny.S` with the C compiler chosen by the `cc` crate, and links them with
//! their linker scripts into `OUT_DIR`.
//!
//! Contract of [`BUILTIN_ELF`]: linked (and loaded) at 1 MiB, entry 0x100000, image end
//! below 0x280000 (the 256 per-vCPU 4 KiB stacks are in `.bss`). Every vCPU enters at the
//! ELF entry in 64-bit long mode (CS=0x08, data selectors 0x10, identity-mapped paging over
//! 0..4 GiB, RFLAGS=0x2) with RSI = guest-physical address of the Linux zero page; the
//! command line (`boot_params.hdr.cmd_line_ptr`) carries `then=`, `io_exits=`,
//! `heartbeat_ms=`, `echo=0|1`, `touch=ADDR:N` and `ro_write=ADDR`. See
//! `guest/builtin/main.c`.
//!
//! With `then=idle` the BSP takes interrupts: the LAPIC timer (heartbeat), the keyboard
//! (IRQ 1) and, with `echo=1`, the UART (IRQ 4), both routed through the in-kernel IOAPIC
//! to vector 0x41 / 0x44 (the 8259s masked). It enables the i8042's keyboard interrupt
//! itself (command byte 0x45: translation on, so scancode set 1); on Ctrl-Alt-Del it
//! prints `ctrl-alt-del: powering off` and powers off through the ACPI sleep register;
//! with `echo=1` it writes back every byte it receives (`\r` as `\r\n`). Other modes never
//! enable interrupts and ignore both devices.

/// The built-in guest: an ELF64 image entered in 64-bit long mode at its ELF entry.
pub const BUILTIN_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builtin.elf"));
/// The tiny benchmark guest: ELF64 with a PVH note, prints one line and resets.
pub const TINY_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny.elf"));

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    const LOAD_ADDR: u64 = 0x10_0000;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[derive(Debug, Clone, Copy)]
    struct Phdr {
        p_type: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
        align: u64,
    }

    /// Checks the ELF header (ELF64, little-endian, EXEC, x86-64) and returns the entry.
    fn check_header(elf: &[u8]) -> u64 {
        assert!(elf.len() >= 64, "image too short");
        assert_eq!(&elf[..4], b"\x7fELF", "magic");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "ELFDATA2LSB");
        assert_eq!(u16_at(elf, 16), ET_EXEC, "e_type");
        assert_eq!(u16_at(elf, 18), EM_X86_64, "e_machine");
        u64_at(elf, 24)
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 32) as usize;
        let phentsize = usize::from(u16_at(elf, 54));
        let phnum = usize::from(u16_at(elf, 56));
        assert_eq!(phentsize, 56, "e_phentsize");
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32_at(elf, p),
                    offset: u64_at(elf, p + 8),
                    vaddr: u64_at(elf, p + 16),
                    paddr: u64_at(elf, p + 24),
                    filesz: u64_at(elf, p + 32),
                    memsz: u64_at(elf, p + 40),
                    align: u64_at(elf, p + 48),
                }
            })
            .collect()
    }

    fn loads(elf: &[u8]) -> Vec<Phdr> {
        let loads: Vec<Phdr> = phdrs(elf)
            .into_iter()
            .filter(|p| p.p_type == PT_LOAD)
            .collect();
        assert!(!loads.is_empty(), "no PT_LOAD segment");
        for p in &loads {
            assert_eq!(p.paddr, p.vaddr, "identity-linked: {p:?}");
            assert!(p.filesz <= p.memsz, "{p:?}");
            assert!(
                (p.offset + p.filesz) as usize <= elf.len(),
                "segment beyond the file: {p:?}"
            );
        }
        loads
    }

    #[test]
    fn builtin_is_elf64_x86_64_exec_at_1mib() {
        let entry = check_header(BUILTIN_ELF);
        assert_eq!(entry, LOAD_ADDR);
        let loads = loads(BUILTIN_ELF);
        let start = loads.iter().map(|p| p.paddr).min().unwrap();
        let end = loads.iter().map(|p| p.paddr + p.memsz).max().unwrap();
        assert_eq!(start, LOAD_ADDR, "image starts at 1 MiB");
        assert!(
            end <= 0x28_0000,
            "image end {end:#x} must be below 0x280000"
        );
        // Room for the 256 per-vCPU stacks of 4 KiB.
        assert!(
            end - start >= 256 * 4096,
            "image too small to hold the stacks"
        );
        assert!(
            loads
                .iter()
                .any(|p| p.paddr <= entry && entry < p.paddr + p.filesz),
            "entry inside a loaded segment"
        );
    }

    #[test]
    fn tiny_is_elf64_x86_64_exec_at_1mib() {
        let entry = check_header(TINY_ELF);
        assert_eq!(entry, LOAD_ADDR);
        let loads = loads(TINY_ELF);
        assert_eq!(loads.iter().map(|p| p.paddr).min(), Some(LOAD_ADDR));
        let end = loads.iter().map(|p| p.paddr + p.memsz).max().unwrap();
        assert!(end <= 0x28_0000, "image end {end:#x}");
    }

    /// Returns the descriptors of all (name, type) notes in the PT_NOTE segments.
    fn notes(elf: &[u8], name: &[u8], n_type: u32) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        for p in phdrs(elf).into_iter().filter(|p| p.p_type == PT_NOTE) {
            let align = p.align.max(4) as usize;
            let seg = &elf[p.offset as usize..(p.offset + p.filesz) as usize];
            let mut off = 0;
            while off + 12 <= seg.len() {
                let namesz = u32_at(seg, off) as usize;
                let descsz = u32_at(seg, off + 4) as usize;
                let ty = u32_at(seg, off + 8);
                let name_off = off + 12;
                let desc_off = name_off + namesz.next_multiple_of(align);
                let next = desc_off + descsz.next_multiple_of(align);
                assert!(desc_off + descsz <= seg.len(), "note overruns its segment");
                if ty == n_type && &seg[name_off..name_off + namesz] == name {
                    found.push(seg[desc_off..desc_off + descsz].to_vec());
                }
                off = next;
            }
        }
        found
    }

    #[test]
    fn tiny_has_pvh_note_with_entry() {
        let entry = check_header(TINY_ELF);
        let pvh = notes(TINY_ELF, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY);
        assert_eq!(pvh.len(), 1, "exactly one Xen PVH entry note");
        let desc = &pvh[0];
        assert!(desc.len() == 4 || desc.len() == 8, "descsz {}", desc.len());
        let mut addr = [0u8; 8];
        addr[..desc.len()].copy_from_slice(desc);
        assert_eq!(u64::from_le_bytes(addr), entry, "PVH entry == e_entry");
        // The note must also be loaded (QEMU and linux-loader read it from the file, but
        // keep it inside the image all the same).
        assert!(
            loads(TINY_ELF)
                .iter()
                .any(|p| p.paddr <= entry && entry < p.paddr + p.filesz)
        );
    }

    #[test]
    fn builtin_has_no_pvh_note() {
        assert!(notes(BUILTIN_ELF, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY).is_empty());
    }
}
