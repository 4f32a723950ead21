//! Boot the built-in guest through the library API: 2 vCPUs, print its console, wait for
//! it to power off, and show the exit counters.
//!
//! `cargo run --example boot_builtin`

use std::sync::Arc;

use vmm_fleet::metrics::counters::ExitReason;
use vmm_fleet::vm::{Kernel, RunningVm, StopLatch, VmParams, describe, exit_code_for};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let params = VmParams {
        vcpus: 2,
        memory_mib: 32,
        kernel: Kernel::Builtin,
        initrd: None,
        // The built-in guest reads its orders from the kernel command line.
        cmdline: "then=poweroff io_exits=10".into(),
        console: Box::new(std::io::stdout()),
        extra_regions: Vec::new(),
        mmio_devices: Vec::new(),
        counters: None,
        started: None,
        control: None,
        name: "builtin".into(),
    };
    let mut vm = RunningVm::start(params, Arc::new(StopLatch::default()))?;
    let cause = vm.wait();
    vm.shutdown()?;
    println!(
        "{} -> exit code {}",
        describe(&cause),
        exit_code_for(&cause).code()
    );
    for vcpu in 0..vm.counters().vcpus() {
        let counts: Vec<String> = ExitReason::ALL
            .iter()
            .map(|r| (r, vm.counters().get(vcpu, *r)))
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
        println!("vcpu {vcpu}: {}", counts.join(" "));
    }
    Ok(())
}
