//! Guest memory (vm-memory, anonymous mmap) and its KVM slots: one slot per region,
//! each with its own flags (read-only, dirty-page logging).

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, TSS live in it), as in Firecracker.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits; RAM above the hole continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// Per-slot KVM flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionFlags {
    /// `KVM_MEM_READONLY`: guest writes come back as MMIO write exits.
    pub read_only: bool,
    /// `KVM_MEM_LOG_DIRTY_PAGES`: KVM records the pages the guest writes.
    pub dirty_log: bool,
}

impl RegionFlags {
    /// The flags word of `kvm_userspace_memory_region`.
    pub fn kvm_flags(self) -> u32 {
        let mut f = 0;
        if self.read_only {
            f |= kvm_bindings::KVM_MEM_READONLY;
        }
        if self.dirty_log {
            f |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        }
        f
    }
}

/// One guest-physical region to back with memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// First guest-physical address.
    pub base: u64,
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Its slot's flags.
    pub flags: RegionFlags,
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Sizes must be whole pages and regions must not overlap.
    #[error("invalid memory layout: {0}")]
    Layout(String),
    /// mmap failed.
    #[error("cannot allocate guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// Guest memory plus the flags of each region, in guest-address order.
pub struct GuestMem {
    /// The memory itself.
    pub mem: GuestMemoryMmap,
    /// The regions as asked for, sorted by base; slot `i` is region `i`.
    pub regions: Vec<RegionSpec>,
}

/// The RAM regions for `bytes` of memory: below the 32-bit MMIO hole, the rest above 4 GiB.
pub fn ram_layout(bytes: u64) -> Vec<RegionSpec> {
    let flags = RegionFlags::default();
    if bytes <= MMIO_GAP_START {
        return vec![RegionSpec {
            base: 0,
            size: bytes,
            flags,
        }];
    }
    vec![
        RegionSpec {
            base: 0,
            size: MMIO_GAP_START,
            flags,
        },
        RegionSpec {
            base: MMIO_GAP_END,
            size: bytes - MMIO_GAP_START,
            flags,
        },
    ]
}

impl GuestMem {
    /// Map anonymous memory for `regions` (MAP_NORESERVE: untouched pages cost nothing).
    pub fn new(mut regions: Vec<RegionSpec>) -> Result<Self, MemoryError> {
        regions.sort_by_key(|r| r.base);
        for r in &regions {
            if r.size == 0 || r.size % 4096 != 0 || r.base % 4096 != 0 {
                return Err(MemoryError::Layout(format!(
                    "region {:#x}+{:#x} is not whole pages",
                    r.base, r.size
                )));
            }
        }
        for w in regions.windows(2) {
            if w[0].base + w[0].size > w[1].base {
                return Err(MemoryError::Layout(format!(
                    "regions at {:#x} and {:#x} overlap",
                    w[0].base, w[1].base
                )));
            }
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|r| {
                usize::try_from(r.size)
                    .map(|s| (GuestAddress(r.base), s))
                    .map_err(|_| MemoryError::Layout(format!("region size {:#x}", r.size)))
            })
            .collect::<Result<_, _>>()?;
        let mem = GuestMemoryMmap::from_ranges(&ranges)?;
        Ok(GuestMem { mem, regions })
    }

    /// The KVM slot descriptions, slot `i` for region `i`.
    pub fn kvm_regions(&self) -> Vec<kvm_bindings::kvm_userspace_memory_region> {
        self.mem
            .iter()
            .zip(&self.regions)
            .enumerate()
            .map(
                |(slot, (region, spec))| kvm_bindings::kvm_userspace_memory_region {
                    slot: slot as u32,
                    flags: spec.flags.kvm_flags(),
                    guest_phys_addr: region.start_addr().0,
                    memory_size: region.len(),
                    userspace_addr: region.as_ptr() as u64,
                },
            )
            .collect()
    }

    /// The slot that holds `addr`, if any.
    pub fn slot_of(&self, addr: u64) -> Option<u32> {
        self.regions
            .iter()
            .position(|r| addr >= r.base && addr < r.base + r.size)
            .map(|i| i as u32)
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// End of the RAM that starts at 0 (the first region), in bytes.
    pub fn low_ram_end(&self) -> u64 {
        self.regions
            .first()
            .filter(|r| r.base == 0)
            .map_or(0, |r| r.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_hole() {
        assert_eq!(ram_layout(64 << 20).len(), 1);
        let big = ram_layout(4 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].size, MMIO_GAP_START);
        assert_eq!(big[1].base, 1 << 32);
        assert_eq!(big[0].size + big[1].size, 4 << 30);
    }

    #[test]
    fn slots_carry_their_own_flags() {
        let ro = RegionFlags {
            read_only: true,
            dirty_log: false,
        };
        let dl = RegionFlags {
            read_only: false,
            dirty_log: true,
        };
        let m = GuestMem::new(vec![
            RegionSpec {
                base: 0x10_0000,
                size: 0x1000,
                flags: ro,
            },
            RegionSpec {
                base: 0,
                size: 0x10_0000,
                flags: RegionFlags::default(),
            },
            RegionSpec {
                base: 0x20_0000,
                size: 0x4000,
                flags: dl,
            },
        ])
        .unwrap();
        let k = m.kvm_regions();
        assert_eq!(k.len(), 3);
        assert_eq!(k[0].guest_phys_addr, 0);
        assert_eq!(k[0].flags, 0);
        assert_eq!(k[1].flags, kvm_bindings::KVM_MEM_READONLY);
        assert_eq!(k[2].flags, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES);
        assert_eq!(m.slot_of(0x20_1000), Some(2));
        assert_eq!(m.slot_of(0x30_0000), None);
        assert!(
            GuestMem::new(vec![RegionSpec {
                base: 0,
                size: 100,
                flags: RegionFlags::default()
            }])
            .is_err()
        );
    }
}
