//! Booting a guest: the kernel (bzImage or ELF, through linux-loader), initramfs and
//! command line, the zero page with its e820 map, and the x86-64 long-mode start state
//! (GDT, identity page tables, registers, CPUID, MSRs, FPU, LAPIC LINT pins).
//!
//! The layout follows Firecracker's x86_64 boot setup.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    CpuId, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::memory::GuestMem;

/// Where the GDT goes.
pub const GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT goes.
pub const IDT_START: u64 = 0x520;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The boot stack pointer of the BSP.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages, identity-mapping 0..4 GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it, the MP table in it.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte past the legacy hole: where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18), as Firecracker's.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

// The boot structures must not overlap one another.
const _: () = assert!(GDT_START + 32 <= IDT_START && IDT_START + 8 <= ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PDE_START + 4 * 4096 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 4096;

/// Errors booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file is missing or unreadable.
    #[error("kernel {path}: {source}")]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs file is missing or unreadable.
    #[error("initrd {path}: {source}")]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel or initrd path is not a regular file (a FIFO, a device, a socket...).
    #[error("{what} {path}: is {kind}, not a regular file")]
    NotRegular {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Neither magic matched.
    #[error("kernel {0}: neither a bzImage nor an ELF image")]
    UnknownFormat(String),
    /// linux-loader refused the image.
    #[error("kernel {what}: cannot load: {detail}")]
    Load {
        /// Which image.
        what: String,
        /// linux-loader's message.
        detail: String,
    },
    /// The images do not fit in guest memory.
    #[error("guest memory too small: {0}")]
    TooSmall(String),
    /// Command line rejected.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing {0} into guest memory failed")]
    Write(&'static str),
}

/// A kernel or initrd file, opened and checked to be a regular file (so a FIFO swapped
/// in for it after validation cannot hang the VMM), kept open so it can be loaded after
/// the process has dropped the privileges it opened it with.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: File,
}

impl ImageFile {
    /// Open `path` (O_NONBLOCK | O_CLOEXEC: opening a FIFO never waits for a writer),
    /// then fstat it: a regular file only, and not on a kernel interface file system
    /// (`/proc/kcore`, opened as root before the drop, would put the host's memory into
    /// the guest). `what` (`kernel`, `initrd`) names it in errors.
    pub fn open(what: &'static str, path: &Path) -> Result<Self, BootError> {
        use crate::config::files::{KERNEL_INTERFACE_FILE, NotRegular, open_regular_file};
        let path_buf = || path.to_path_buf();
        let not_regular = |kind| BootError::NotRegular {
            what,
            path: path_buf(),
            kind,
        };
        match open_regular_file(path) {
            Ok((file, _)) => Ok(ImageFile {
                path: path_buf(),
                file,
            }),
            Err(NotRegular::Io(source)) if what == "initrd" => Err(BootError::InitrdFile {
                path: path_buf(),
                source,
            }),
            Err(NotRegular::Io(source)) => Err(BootError::KernelFile {
                path: path_buf(),
                source,
            }),
            Err(NotRegular::Directory) => Err(not_regular("a directory")),
            // Not refused when reading (the link is followed); listed for completeness.
            Err(NotRegular::Symlink) => Err(not_regular("a symbolic link")),
            Err(NotRegular::Special(kind)) => Err(not_regular(kind)),
            Err(NotRegular::KernelInterface) => Err(not_regular(KERNEL_INTERFACE_FILE)),
        }
    }

    /// The open file (to check, not to read from: reading moves its offset).
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }
}

/// Where a kernel comes from.
pub enum KernelImage<'a> {
    /// A file on the host (opened with [`ImageFile::open`]).
    File(&'a Path),
    /// A file opened already.
    Opened(&'a mut ImageFile),
    /// Bytes in our own binary (the built-in guest).
    Bytes(&'a str, &'a [u8]),
}

/// What loading produced: where the BSP starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte past the kernel image.
    pub kernel_end: u64,
    /// The initramfs, if any: (address, size).
    pub initrd: Option<(u64, u64)>,
}

/// Encode a GDT entry from flags, base and limit (the x86 descriptor layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decode a GDT entry into the `kvm_segment` KVM_SET_SREGS wants.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0x0000_ffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The identity page tables: PML4, PDPT and four page directories of 2 MiB pages
/// covering 0..4 GiB (the LAPIC at 0xFEE00000 included). Returns (address, bytes) pairs.
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPTE_START | 0x03).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    for i in 0..4u64 {
        let e = (PDE_START + i * 4096) | 0x03;
        pdpt[(i as usize) * 8..(i as usize) * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    let mut pd = vec![0u8; 4 * 4096];
    for i in 0..2048u64 {
        // Present, writable, page size (2 MiB).
        let e = (i << 21) | 0x83;
        pd[(i as usize) * 8..(i as usize) * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    vec![(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pd)]
}

/// Write the GDT, an empty IDT and the page tables.
pub fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_START))
        .map_err(|_| BootError::Write("GDT"))?;
    mem.write_slice(&0u64.to_le_bytes(), GuestAddress(IDT_START))
        .map_err(|_| BootError::Write("IDT"))?;
    for (addr, bytes) in page_tables() {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| BootError::Write("page tables"))?;
    }
    Ok(())
}

/// Turn a vCPU's reset sregs into 64-bit long mode with our GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // PE | ET | PG, caches on (the reset value has CD and NW set).
    sregs.cr0 = 0x8000_0011;
    sregs.cr3 = PML4_START;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    sregs
}

/// General registers at the entry point (Linux 64-bit boot protocol: RSI = zero page).
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU state Linux expects at boot.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set at boot (Firecracker's list): SYSENTER/SYSCALL zeroed, fast strings on,
/// MTRRs on with write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const FAST_STRING: u64 = 1;
    let list: [(u32, u64); 10] = [
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0082, 0),       // LSTAR
        (0x1a0, FAST_STRING),   // IA32_MISC_ENABLE
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, WB
    ];
    list.iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as i8;
    }
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a PC's BIOS leaves them.
pub fn set_lint(mut l: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(&mut l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
    l
}

/// The CPUID of vCPU `id` of `n`: KVM's supported leaves with this vCPU's APIC ID and a
/// topology of `n` single-threaded cores in one package.
pub fn vcpu_cpuid(base: &CpuId, id: u8, n: u8) -> CpuId {
    let mut c = base.clone();
    let n32 = u32::from(n.max(1));
    let core_shift = 32 - (n32 - 1).leading_zeros(); // ceil(log2(n))
    for e in c.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                // APIC ID, logical processor count, CLFLUSH size kept.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | ((n32 & 0xff) << 16);
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
                e.ecx |= 1 << 31; // hypervisor present
            }
            4 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n32 - 1 } else { 0 };
                // EAX[31:26]: addressable core IDs in the package - 1 (a power of two).
                let cores = (1u32 << core_shift).saturating_sub(1).min(0x3f);
                e.eax = (e.eax & 0x3ff) | ((sharing & 0xfff) << 14) | (cores << 26);
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = n32;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
    c
}

fn sniff(header: &[u8]) -> Option<bool> {
    if header.len() >= 4 && header[..4] == [0x7f, b'E', b'L', b'F'] {
        return Some(true);
    }
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        return Some(false);
    }
    None
}

fn load_any<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    what: &str,
    image: &mut F,
) -> Result<KernelLoaderResult, BootError> {
    let mut header = vec![0u8; 0x210];
    let n = image.read(&mut header).map_err(|e| BootError::Load {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    header.truncate(n);
    let is_elf = sniff(&header).ok_or_else(|| BootError::UnknownFormat(what.to_string()))?;
    image.rewind().map_err(|e| BootError::Load {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    let res = if is_elf {
        Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
    } else {
        BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
    };
    res.map_err(|e| BootError::Load {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// The e820 map: RAM below the EBDA, reserved EBDA..1 MiB, then the RAM regions.
pub fn e820_map(mem: &GuestMem) -> Vec<boot_e820_entry> {
    let mut v = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for r in &mem.regions {
        let (start, end) = (r.base.max(HIMEM_START), r.base + r.size);
        if end > start {
            v.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    v
}

/// Build the zero page for a loaded kernel.
pub fn build_boot_params(
    mem: &GuestMem,
    loaded: &KernelLoaderResult,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        p.hdr = hdr;
    } else {
        p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        p.hdr.header = KERNEL_HDR_MAGIC;
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    p.e820_entries = map.len() as u8;
    p
}

fn kernel_name(k: &KernelImage<'_>) -> String {
    match k {
        KernelImage::File(p) => p.display().to_string(),
        KernelImage::Opened(f) => f.path.display().to_string(),
        KernelImage::Bytes(name, _) => (*name).to_string(),
    }
}

/// Copy the initramfs `img` to the top of RAM below 3.25 GiB (and below the kernel's
/// `initrd_addr_max`), above the kernel (`kernel_end`). Returns (address, size).
fn place_initrd(
    mem: &GuestMem,
    img: &mut ImageFile,
    loaded: &KernelLoaderResult,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let low_end = mem.low_ram_end();
    let path = img.path.clone();
    let f = img.file();
    let size = f
        .metadata()
        .map_err(|source| BootError::InitrdFile {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    f.seek(std::io::SeekFrom::Start(0))
        .map_err(|source| BootError::InitrdFile {
            path: path.to_path_buf(),
            source,
        })?;
    let max = loaded
        .setup_header
        .map_or(0x7fff_ffff, |h| u64::from(h.initrd_addr_max))
        .min(low_end.saturating_sub(1));
    let addr = (max + 1).saturating_sub(size) & !(PAGE_SIZE - 1);
    if size == 0 || addr < kernel_end.max(HIMEM_START) {
        return Err(BootError::TooSmall(format!(
            "kernel ends at {} KiB and the initramfs needs {} KiB more, but RAM below 3.25 GiB ends at {} KiB",
            kernel_end / 1024,
            size.div_ceil(1024),
            low_end / 1024
        )));
    }
    mem.mem
        .read_exact_volatile_from(GuestAddress(addr), f, size as usize)
        .map_err(|_| BootError::Write("initramfs"))?;
    Ok((addr, size))
}

/// Load a kernel, an optional initramfs and the command line; write the zero page
/// and the long-mode tables. Returns where the BSP starts.
pub fn load_guest(
    mem: &GuestMem,
    kernel: KernelImage<'_>,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let mut initrd = initrd.map(|p| ImageFile::open("initrd", p)).transpose()?;
    load_guest_opened(mem, kernel, initrd.as_mut(), cmdline)
}

/// [`load_guest`] with an initramfs opened already (see [`ImageFile`]).
pub fn load_guest_opened(
    mem: &GuestMem,
    kernel: KernelImage<'_>,
    initrd: Option<&mut ImageFile>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let m = &mem.mem;
    let kernel_name = kernel_name(&kernel);
    let loaded = match kernel {
        KernelImage::File(path) => {
            let mut f = ImageFile::open("kernel", path)?;
            load_any(m, &kernel_name, f.file())?
        }
        KernelImage::Opened(f) => {
            // Loading reads from the start, whatever an earlier load left the offset at.
            f.file
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|source| BootError::KernelFile {
                    path: f.path.clone(),
                    source,
                })?;
            load_any(m, &kernel_name, f.file())?
        }
        KernelImage::Bytes(name, bytes) => load_any(m, name, &mut Cursor::new(bytes))?,
    };
    let low_end = mem.low_ram_end();
    // linux-loader reports the end as an address, not a length.
    let mut kernel_end = loaded.kernel_end;
    if let Some(hdr) = loaded.setup_header {
        // We enter bzImages at their 64-bit entry: boot protocol 2.12+ with XLF_KERNEL_64.
        let (version, xloadflags) = (hdr.version, hdr.xloadflags);
        if version < 0x020c || xloadflags & 1 == 0 {
            return Err(BootError::Load {
                what: kernel_name,
                detail: format!(
                    "bzImage has boot protocol {version:#x} and xloadflags {xloadflags:#x}: no 64-bit entry point (needs 2.12+ with XLF_KERNEL_64)"
                ),
            });
        }
        // The kernel decompresses itself into [pref_address, pref_address + init_size):
        // nothing may be placed there.
        let (pref, init_size) = (hdr.pref_address, hdr.init_size);
        kernel_end = kernel_end.max(pref.saturating_add(u64::from(init_size)));
    }
    // bzImage: the 64-bit entry is 0x200 past the protected-mode code (boot protocol);
    // ELF: linux-loader gives the entry point.
    let entry = if loaded.setup_header.is_some() {
        loaded.kernel_load.0 + 0x200
    } else {
        loaded.kernel_load.0
    };

    let initrd_placed = match initrd {
        None => None,
        Some(img) => Some(place_initrd(mem, img, &loaded, kernel_end)?),
    };
    if kernel_end > low_end {
        return Err(BootError::TooSmall(format!(
            "the kernel ends at {} KiB, past {} KiB of RAM",
            kernel_end / 1024,
            low_end / 1024
        )));
    }

    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} allowed",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(m, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let params = build_boot_params(mem, &loaded, cmdline.len() + 1, initrd_placed);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        m,
    )
    .map_err(|_| BootError::Write("boot params"))?;
    write_long_mode_tables(m)?;
    Ok(BootInfo {
        entry,
        kernel_end,
        initrd: initrd_placed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::memory::{GuestMem, ram_layout};

    #[test]
    fn gdt_matches_the_known_long_mode_descriptors() {
        assert_eq!(GDT[0], 0);
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_),
            (0x08, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!(
            (ds.selector, ds.l, ds.db, ds.type_, ds.s),
            (0x10, 0, 1, 3, 1)
        );
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_4gib_with_2mib_pages() {
        let t = page_tables();
        let pml4 = &t[0].1;
        assert_eq!(
            u64::from_le_bytes(pml4[..8].try_into().unwrap()),
            PDPTE_START | 3
        );
        assert!(pml4[8..].iter().all(|&b| b == 0));
        let pdpt = &t[1].1;
        for i in 0..4 {
            let e = u64::from_le_bytes(pdpt[i * 8..i * 8 + 8].try_into().unwrap());
            assert_eq!(e, (PDE_START + i as u64 * 4096) | 3);
        }
        let pd = &t[2].1;
        let at = |va: u64| {
            let i = (va >> 21) as usize;
            u64::from_le_bytes(pd[i * 8..i * 8 + 8].try_into().unwrap())
        };
        assert_eq!(at(0), 0x83);
        assert_eq!(at(0xfee0_0000), 0xfee0_0000 | 0x83);
        assert_eq!(at(0xffff_ffff) & !0xfff, 0xffe0_0000);
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_hole() {
        let mem = GuestMem::new(ram_layout(64 << 20)).unwrap();
        let map = e820_map(&mem);
        let m: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            m,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let big = GuestMem::new(ram_layout(5 << 30)).unwrap();
        let map = e820_map(&big);
        assert_eq!(map.len(), 4);
        assert_eq!({ map[3].addr }, 1 << 32);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn boot_params_for_an_elf_kernel() {
        let mem = GuestMem::new(ram_layout(32 << 20)).unwrap();
        let loaded = KernelLoaderResult {
            kernel_load: GuestAddress(0x100_0000),
            kernel_end: 0x180_0000,
            ..Default::default()
        };
        let p = build_boot_params(&mem, &loaded, 20, Some((0x1e0_0000, 0x1000)));
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 20);
        assert_eq!({ p.hdr.ramdisk_image }, 0x1e0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].size }, (32 << 20) - HIMEM_START);
        // And the bytes at the offsets the boot protocol names.
        let bytes = vm_memory::ByteValued::as_slice(&p);
        assert_eq!(bytes[0x1e8], 3, "e820_entries at 0x1e8");
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(u16::from_le_bytes([bytes[0x1fe], bytes[0x1ff]]), 0xaa55);
        assert_eq!(bytes[0x210], 0xff, "type_of_loader");
        assert_eq!(
            u32::from_le_bytes(bytes[0x228..0x22c].try_into().unwrap()),
            CMDLINE_START as u32
        );
        assert_eq!(
            u32::from_le_bytes(bytes[0x218..0x21c].try_into().unwrap()),
            0x1e0_0000,
            "ramdisk_image"
        );
        // e820 table at 0x2d0, 20 bytes per entry.
        let e1 = &bytes[0x2d0 + 20..0x2d0 + 40];
        assert_eq!(u64::from_le_bytes(e1[..8].try_into().unwrap()), EBDA_START);
        assert_eq!(
            u32::from_le_bytes(e1[16..20].try_into().unwrap()),
            E820_RESERVED
        );
    }

    #[test]
    fn long_mode_registers() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.gdt.base, GDT_START);
        assert_eq!(s.cs.selector, 8);
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
    }

    #[test]
    fn cpuid_carries_apic_id_and_topology() {
        use kvm_bindings::kvm_cpuid_entry2;
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0008_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = vcpu_cpuid(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!((e[1].ebx, e[1].ecx), (1, 0x100));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx), (2, 4, 0x201));
    }

    #[test]
    fn lint_pins() {
        let l = set_lint(kvm_lapic_state::default());
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x400);
    }

    #[test]
    fn sniffing_formats() {
        assert_eq!(sniff(b"\x7fELF...."), Some(true));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(sniff(&bz), Some(false));
        assert_eq!(sniff(b"#!/bin/sh\n"), None);
    }
}
