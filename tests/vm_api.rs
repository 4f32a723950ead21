//! The library API under real KVM: memory slots with their own flags, and shutdown that
//! leaves no vCPU thread behind. One test function: it inspects this process's threads.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_device::MutDeviceMmio;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vmm_fleet::metrics::counters::ExitReason;
use vmm_fleet::vm::memory::{RegionFlags, RegionSpec};
use vmm_fleet::vm::{Kernel, RunningVm, StopLatch, VmParams};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);
impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[derive(Default)]
struct MmioRecorder(Vec<(u64, Vec<u8>)>);
impl MutDeviceMmio for MmioRecorder {
    fn mmio_read(&mut self, _b: MmioAddress, _o: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, base: MmioAddress, off: MmioAddressOffset, data: &[u8]) {
        self.0.push((base.0 + off, data.to_vec()));
    }
}

const RO_BASE: u64 = 0x1000_0000;
const DIRTY_BASE: u64 = 0x1100_0000;

fn params(vcpus: u8, cmdline: &str, console: &Console) -> VmParams {
    VmParams {
        vcpus,
        memory_mib: 32,
        kernel: Kernel::Builtin,
        initrd: None,
        cmdline: cmdline.to_string(),
        console: Box::new(console.clone()),
        extra_regions: Vec::new(),
        mmio_devices: Vec::new(),
        counters: None,
        started: None,
        control: None,
        name: "builtin".into(),
    }
}

fn vcpu_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("vcpu_"))
        .collect()
}

fn wait_for(console: &Console, needle: &str) -> bool {
    common::wait_until(Duration::from_secs(20), || console.text().contains(needle))
}

#[test]
fn memory_slots_and_shutdown() {
    if !common::kvm_available("vm_api::memory_slots_and_shutdown") {
        return;
    }

    // 1. A read-only slot and a dirty-logged slot.
    let console = Console::default();
    let mut p = params(
        1,
        &format!("then=idle ro_write={RO_BASE:#x} touch={DIRTY_BASE:#x}:3"),
        &console,
    );
    p.extra_regions = vec![
        RegionSpec {
            base: RO_BASE,
            size: 0x10000,
            flags: RegionFlags {
                read_only: true,
                dirty_log: false,
            },
        },
        RegionSpec {
            base: DIRTY_BASE,
            size: 0x10000,
            flags: RegionFlags {
                read_only: false,
                dirty_log: true,
            },
        },
    ];
    let rec = Arc::new(Mutex::new(MmioRecorder::default()));
    p.mmio_devices = vec![(RO_BASE, 0x10000, rec.clone())];
    let mut vm = RunningVm::start(p, Arc::new(StopLatch::default())).expect("start");
    assert!(wait_for(&console, "mptable cpus=1"), "{}", console.text());
    assert!(common::wait_until(Duration::from_secs(10), || !rec
        .lock()
        .unwrap()
        .0
        .is_empty()));
    assert_eq!(rec.lock().unwrap().0, vec![(RO_BASE, vec![0xab])]);
    assert!(vm.counters().get(0, ExitReason::MmioWrite) >= 1);
    let slot = vm.memory().slot_of(DIRTY_BASE).expect("dirty slot");
    let bitmap = vm.vm().dirty_log(slot).expect("dirty log");
    assert_eq!(bitmap[0], 0b111, "exactly pages 0, 1, 2: {bitmap:x?}");
    assert!(bitmap[1..].iter().all(|&w| w == 0));
    // The log was cleared by reading it; nothing writes there since.
    assert!(vm.vm().dirty_log(slot).unwrap().iter().all(|&w| w == 0));
    // A read-only slot keeps what the VMM put there: the guest write did not land.
    let mut b = [0u8; 1];
    vm_memory::Bytes::read_slice(&vm.memory().mem, &mut b, vm_memory::GuestAddress(RO_BASE))
        .unwrap();
    assert_eq!(b[0], 0);
    vm.shutdown().expect("shutdown");
    assert_eq!(vm.vm().live_vcpus(), 0);
    drop(vm);
    assert!(vcpu_threads().is_empty(), "{:?}", vcpu_threads());

    // 2. Shutdown of vCPUs spinning with no exits, right after start, and halted.
    for (then, settle) in [("spin", 300), ("spin", 0), ("idle", 0), ("poweroff", 200)] {
        let console = Console::default();
        let mut vm = RunningVm::start(
            params(4, &format!("then={then}"), &console),
            Arc::new(StopLatch::default()),
        )
        .expect("start");
        assert_eq!(vcpu_threads().len(), 4, "one thread per vCPU");
        std::thread::sleep(Duration::from_millis(settle));
        vm.shutdown()
            .unwrap_or_else(|e| panic!("{then}: {e}; console:\n{}", console.text()));
        assert_eq!(vm.vm().live_vcpus(), 0);
        assert!(vcpu_threads().is_empty(), "{then}: {:?}", vcpu_threads());
    }
}

#[test]
fn run_refuses_a_vcpu_count_that_does_not_match_the_config() {
    use vmm_fleet::vm::memory::{GuestMem, ram_layout};
    use vmm_fleet::vm::{KvmVm, VmConfig, VmError};
    if !common::kvm_available("vm_api::run_refuses_mismatch") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let mut config = VmConfig::new(&kvm, 2).unwrap();
    config.vcpus_config.truncate(1); // one vCPU set up, two configured
    let mem = GuestMem::new(ram_layout(16 << 20)).unwrap();
    let latch = Arc::new(StopLatch::default());
    let mut vm = KvmVm::new(
        &kvm,
        config,
        &mem,
        latch,
        Arc::new(vmm_fleet::vm::devices::Bus::new()),
        Arc::new(vmm_fleet::metrics::counters::ExitCounters::new(2)),
    )
    .unwrap();
    match vm.run(Some(0x10_0000)) {
        Err(VmError::VcpuCount {
            created: 1,
            configured: 2,
        }) => {}
        other => panic!("expected a vCPU count error, got {other:?}"),
    }
    assert_eq!(vm.live_vcpus(), 0, "no vCPU thread was started");
}
