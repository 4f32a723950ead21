//! The Debian guest (guest/build-debian-guest.sh builds it into guest/out): the ELF vmlinux
//! booted under real KVM as far as these machines let Linux go, and the bzImage loader.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_fleet::vm::boot::{self, KernelImage};
use vmm_fleet::vm::memory::{GuestMem, ram_layout};

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 clearcpuid=cx16 noxsave reboot=k panic=1";

fn guest_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("VMM_FLEET_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/out"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run guest/build-debian-guest.sh first (the README's test command does)",
        p.display()
    );
    p
}

/// Parse `BIOS-e820: [mem 0xA-0xB] usable` lines into (start, end inclusive).
fn usable_ranges(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter(|l| l.contains("BIOS-e820:") && l.trim_end().ends_with("usable"))
        .filter_map(|l| {
            let r = l.split("[mem ").nth(1)?.split(']').next()?;
            let (a, b) = r.split_once('-')?;
            Some((
                u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?,
                u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?,
            ))
        })
        .collect()
}

#[test]
fn debian_elf_vmlinux_boots_as_far_as_this_kvm_allows() {
    if !common::kvm_available("linux::debian_elf_vmlinux") {
        return;
    }
    let (vmlinux, initrd) = (guest_file("vmlinux"), guest_file("initramfs.cpio.gz"));
    let dir = common::scratch("debian");
    let cfg = dir.join("debian.yaml");
    let memory_mib = 256u64;
    std::fs::write(
        &cfg,
        format!(
            "name: debian\nvcpus: 2\nmemory_mib: {memory_mib}\nkernel: {}\ninitrd: {}\ncmdline: \"{CMDLINE}\"\nconsole: debian.console\n",
            vmlinux.display(),
            initrd.display()
        ),
    )
    .unwrap();
    let (code, err) = common::run_to_end(&cfg, Duration::from_secs(300));
    let console = common::read(&dir.join("debian.console"));
    let tail: String = console
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(console.contains("Linux version"), "console:\n{console}");
    assert!(
        console.contains(&format!("Command line: {CMDLINE}")),
        "command line not echoed:\n{console}"
    );
    let usable = usable_ranges(&console);
    assert_eq!(
        usable,
        vec![(0, 0x9fbff), (0x10_0000, (memory_mib << 20) - 1)],
        "e820 map does not match memory_mib"
    );
    if console.contains("VMM-FLEET-GUEST-UP") {
        // Hardware KVM: userspace ran /init, which reboots through the i8042.
        assert!(console.contains("VMM-FLEET-GUEST-UP cpus=2"), "{tail}");
        assert_eq!(code, Some(3), "stderr: {err}");
    } else {
        // This machine's emulated ring 0: the int3 self-test ends in an emulation
        // failure, which must be a guest crash with KVM's detail in the log.
        assert_eq!(code, Some(4), "stderr: {err}\nconsole tail:\n{tail}");
        assert!(
            err.contains("KVM internal error") && err.contains("emulation failure"),
            "stderr: {err}"
        );
    }
}

#[test]
fn bzimage_is_loaded_as_the_boot_protocol_says() {
    let bz = guest_file("bzImage");
    let initrd = guest_file("initramfs.cpio.gz");
    let file = std::fs::read(&bz).unwrap();
    let setup_sects = match file[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let mem = GuestMem::new(ram_layout(256 << 20)).unwrap();
    let info = boot::load_guest(&mem, KernelImage::File(&bz), Some(&initrd), CMDLINE).unwrap();

    // The protected-mode kernel sits at 1 MiB; the 64-bit entry is 0x200 into it.
    assert_eq!(info.entry, boot::HIMEM_START + 0x200);
    let payload = &file[(setup_sects + 1) * 512..];
    let mut placed = vec![0u8; 64 * 1024];
    mem.mem
        .read_slice(&mut placed, GuestAddress(boot::HIMEM_START))
        .unwrap();
    assert_eq!(&placed[..], &payload[..placed.len()]);
    // Nothing may follow the kernel inside the area it decompresses itself into:
    // [pref_address, pref_address + init_size) from the setup header.
    let pref = u64::from_le_bytes(file[0x258..0x260].try_into().unwrap());
    let init_size = u64::from(u32::from_le_bytes(file[0x260..0x264].try_into().unwrap()));
    assert_eq!(
        info.kernel_end,
        (boot::HIMEM_START + payload.len() as u64).max(pref + init_size)
    );
    assert!(info.kernel_end > pref, "decompression area accounted for");

    // The zero page carries the bzImage's own setup header, completed by us.
    let mut zp = vec![0u8; 4096];
    mem.mem
        .read_slice(&mut zp, GuestAddress(boot::ZERO_PAGE_START))
        .unwrap();
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(
        &zp[0x1f1..0x210],
        &file[0x1f1..0x210],
        "setup header up to type_of_loader"
    );
    let version = u16::from_le_bytes([zp[0x206], zp[0x207]]);
    assert!(version >= 0x020c, "boot protocol {version:#x}");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    let u32_at = |o: usize| u32::from_le_bytes(zp[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0x228), boot::CMDLINE_START as u32, "cmd_line_ptr");
    let (rd_addr, rd_size) = info.initrd.unwrap();
    assert_eq!(u32_at(0x218), rd_addr as u32, "ramdisk_image");
    assert_eq!(u32_at(0x21c), rd_size as u32, "ramdisk_size");
    assert_eq!(rd_addr % 4096, 0);
    assert!(rd_addr >= info.kernel_end);
    assert!(
        rd_addr + rd_size <= u64::from(u32_at(0x22c)) + 1,
        "below initrd_addr_max"
    );
    let rd = std::fs::read(&initrd).unwrap();
    let mut back = vec![0u8; rd.len()];
    mem.mem
        .read_slice(&mut back, GuestAddress(rd_addr))
        .unwrap();
    assert!(back == rd, "initramfs bytes differ");
    // The command line, NUL-terminated.
    let mut cl = vec![0u8; CMDLINE.len() + 1];
    mem.mem
        .read_slice(&mut cl, GuestAddress(boot::CMDLINE_START))
        .unwrap();
    assert_eq!(&cl[..CMDLINE.len()], CMDLINE.as_bytes());
    assert_eq!(cl[CMDLINE.len()], 0);
    assert_eq!(zp[0x1e8], 3, "e820 entries");
}
