//! The kernel's own per-vCPU KVM statistics (`KVM_GET_STATS_FD`, the binary stats
//! interface), published into the VM's counter table so that exits KVM handles without
//! the VMM are visible too.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;

use crate::metrics::counters::{ExitCounters, KVM_STATS};

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}
use ioctls::KVM_GET_STATS_FD;

const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;

/// One vCPU's stats fd and where each statistic we export lives in it.
pub struct VcpuStats {
    file: File,
    /// Byte offset of each of [`KVM_STATS`] in the file, when KVM has it.
    offsets: [Option<u64>; KVM_STATS.len()],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Find each wanted statistic in the binary stats header and descriptors.
pub fn parse_offsets(header: &[u8], descs: &[u8]) -> Option<[Option<u64>; KVM_STATS.len()]> {
    let name_size = u32_at(header, 4)? as usize;
    let num_desc = u32_at(header, 8)? as usize;
    let data_offset = u64::from(u32_at(header, 20)?);
    let step = DESC_FIXED_SIZE + name_size;
    let mut out = [None; KVM_STATS.len()];
    for i in 0..num_desc {
        let d = descs.get(i * step..(i + 1) * step)?;
        let size = u16::from_le_bytes([d[6], d[7]]);
        let offset = u64::from(u32_at(d, 8)?);
        let name = &d[DESC_FIXED_SIZE..];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        if let Some(k) = KVM_STATS.iter().position(|s| s.as_bytes() == name)
            && size >= 1
        {
            out[k] = Some(data_offset + offset);
        }
    }
    Some(out)
}

impl VcpuStats {
    /// Open the stats fd of `vcpu` and read its descriptors.
    pub fn open(vcpu: &VcpuFd) -> std::io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)?;
        let bad = || std::io::Error::from(std::io::ErrorKind::InvalidData);
        let name_size = u32_at(&header, 4).ok_or_else(bad)? as usize;
        let num_desc = u32_at(&header, 8).ok_or_else(bad)? as usize;
        let desc_offset = u64::from(u32_at(&header, 16).ok_or_else(bad)?);
        let mut descs = vec![0u8; num_desc * (DESC_FIXED_SIZE + name_size)];
        file.read_exact_at(&mut descs, desc_offset)?;
        let offsets = parse_offsets(&header, &descs).ok_or_else(bad)?;
        Ok(VcpuStats { file, offsets })
    }

    /// The current values (0 where KVM lacks the statistic).
    pub fn read(&self) -> [u64; KVM_STATS.len()] {
        let mut out = [0u64; KVM_STATS.len()];
        for (o, off) in out.iter_mut().zip(self.offsets) {
            let mut b = [0u8; 8];
            if let Some(off) = off
                && self.file.read_exact_at(&mut b, off).is_ok()
            {
                *o = u64::from_le_bytes(b);
            }
        }
        out
    }

    /// The raw fd (for diagnostics).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// Publishes every vCPU's statistics into the table, on top of what earlier runs of the
/// same VM left there, so the exported values never go down.
pub struct StatsPublisher {
    vcpus: Vec<VcpuStats>,
    base: Vec<[u64; KVM_STATS.len()]>,
    table: Arc<ExitCounters>,
}

impl StatsPublisher {
    /// Take the table's current values as this run's base.
    pub fn new(vcpus: Vec<VcpuStats>, table: Arc<ExitCounters>) -> Self {
        let base = (0..vcpus.len())
            .map(|v| std::array::from_fn(|s| table.kvm_stat(v, s)))
            .collect();
        StatsPublisher { vcpus, base, table }
    }

    /// Read every vCPU's statistics and publish base + current.
    pub fn publish(&self) {
        for (v, (stats, base)) in self.vcpus.iter().zip(&self.base).enumerate() {
            for (s, cur) in stats.read().iter().enumerate() {
                self.table.set_kvm_stat(v, s, base[s].saturating_add(*cur));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_found_by_name() {
        let name_size = 48usize;
        let mut header = vec![0u8; HEADER_SIZE];
        header[4..8].copy_from_slice(&(name_size as u32).to_le_bytes());
        header[8..12].copy_from_slice(&3u32.to_le_bytes());
        header[20..24].copy_from_slice(&1000u32.to_le_bytes());
        let mut descs = Vec::new();
        for (i, name) in ["halt_exits", "bogus", "exits"].iter().enumerate() {
            let mut d = vec![0u8; DESC_FIXED_SIZE + name_size];
            d[6..8].copy_from_slice(&1u16.to_le_bytes());
            d[8..12].copy_from_slice(&((i as u32) * 8).to_le_bytes());
            d[DESC_FIXED_SIZE..DESC_FIXED_SIZE + name.len()].copy_from_slice(name.as_bytes());
            descs.extend(d);
        }
        let o = parse_offsets(&header, &descs).unwrap();
        assert_eq!(o[0], Some(1016)); // exits
        assert_eq!(o[3], Some(1000)); // halt_exits
        assert_eq!(o[1], None); // io_exits absent
        assert!(parse_offsets(&header, &descs[..10]).is_none());
    }
}
