//! The built-in guest under a bare kvm-ioctls loop: the baseline for the port-I/O exit
//! round trip that `benches/run_vm.rs` compares `vmm-fleet run-vm` against.
//!
//! It borrows only the library's memory and boot setup (guest memory, ELF loading, zero
//! page, command line, long-mode tables, MP table, CPUID): no vmm-fleet vCPU loop, bus,
//! devices, counters or threads. One vCPU runs on the calling thread; every port-I/O exit
//! is ignored except a write to the ACPI sleep port 0x600 (the guest's power-off), which
//! ends the loop. Bytes written to COM1 are kept so they can be shown afterwards.
//!
//! `cargo run --release --example bare_loop -- 'then=poweroff io_exits=1000000'`

use std::error::Error;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuExit};
use vmm_fleet::vm::boot::{
    KernelImage, boot_fpu, boot_regs, load_guest, long_mode_sregs, vcpu_cpuid,
};
use vmm_fleet::vm::builtin::BUILTIN_ELF;
use vmm_fleet::vm::kvm_vm::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use vmm_fleet::vm::memory::{GuestMem, ram_layout};
use vmm_fleet::vm::mptable;

/// The guest's power-off: ACPI sleep control port (it writes 0x34 = S5 | SLP_EN).
const POWEROFF_PORT: u16 = 0x600;
/// COM1 transmit register.
const COM1: u16 = 0x3f8;
/// Guest RAM, as in the benchmark's YAML files.
const MEMORY_MIB: u64 = 32;

/// What one bare run did.
pub struct BareRun {
    /// Port-I/O exits seen (in and out), the power-off write included.
    pub io_exits: u64,
    /// Other exits that came back to the loop (none are expected).
    pub other_exits: u64,
    /// Bytes the guest wrote to COM1.
    pub console: Vec<u8>,
    /// Wall time from before `KVM_CREATE_VM` until the power-off exit.
    pub elapsed: Duration,
}

/// Boot the built-in guest with `cmdline` on one vCPU and run it until it powers off.
pub fn run(cmdline: &str) -> Result<BareRun, Box<dyn Error + Send + Sync>> {
    let start = Instant::now();
    let kvm = Kvm::new()?;

    // Declared before the VM so that it is dropped after it.
    let mem = GuestMem::new(ram_layout(MEMORY_MIB << 20))?;
    let boot = load_guest(
        &mem,
        KernelImage::Bytes("builtin", BUILTIN_ELF),
        None,
        cmdline,
    )?;
    mptable::write(&mem.mem, 1)?;

    let vm = kvm.create_vm()?;
    for region in mem.kvm_regions() {
        // SAFETY: the region describes memory mapped by `mem`, which lives until the end
        // of this function, after `vm` (declared later, dropped first) is gone.
        unsafe { vm.set_user_memory_region(region) }?;
    }
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;

    let mut vcpu = vm.create_vcpu(0)?;
    let base = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    vcpu.set_cpuid2(&vcpu_cpuid(&base, 0, 1))?;
    vcpu.set_fpu(&boot_fpu())?;
    let sregs = vcpu.get_sregs()?;
    vcpu.set_sregs(&long_mode_sregs(sregs))?;
    vcpu.set_regs(&boot_regs(boot.entry))?;

    let mut io_exits = 0u64;
    let mut other_exits = 0u64;
    let mut console = Vec::new();
    loop {
        match vcpu.run()? {
            VcpuExit::IoOut(POWEROFF_PORT, _) => {
                io_exits += 1;
                break;
            }
            VcpuExit::IoOut(COM1, data) => {
                io_exits += 1;
                console.extend_from_slice(data);
            }
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => io_exits += 1,
            VcpuExit::Shutdown => return Err("guest shut down (triple fault)".into()),
            VcpuExit::InternalError => return Err("KVM internal error".into()),
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(format!("VM entry failed: reason {reason:#x} on cpu {cpu}").into());
            }
            VcpuExit::Hlt => return Err("guest halted with no in-kernel irqchip".into()),
            _ => other_exits += 1,
        }
    }
    Ok(BareRun {
        io_exits,
        other_exits,
        console,
        elapsed: start.elapsed(),
    })
}

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let cmdline = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "then=poweroff io_exits=0".to_string());
    let r = run(&cmdline)?;
    print!("{}", String::from_utf8_lossy(&r.console));
    println!(
        "bare loop: cmdline {cmdline:?}: {} port-I/O exits, {} other exits, {:.3} ms",
        r.io_exits,
        r.other_exits,
        r.elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}
