//! One KVM virtual machine: memory, vCPUs, devices, boot, and the run loop.
//!
//! [`VmParams`] says what to build; [`RunningVm::start`] builds and starts it;
//! [`run_vm`] is the whole `run-vm` process: start, wait for the guest or a signal,
//! shut down, and map the outcome to an [`ExitCode`].

pub mod boot;
pub mod builtin;
pub mod control;
pub mod devices;
pub mod jail;
pub mod kvm_vm;
pub mod memory;
pub mod mptable;
pub mod seccomp;
pub mod stats;
pub mod vcpu;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_device::DeviceMmio;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BuiltinConsole, ConsoleSpec, KernelSpec, VmSpec};
use crate::metrics::counters::ExitCounters;
use crate::protocol::ExitCode;
use boot::{BootError, ImageFile, KernelImage};
use devices::debug_port::{DEBUG_PORT, DebugPort};
use devices::i8042::{I8042, I8042_DATA, I8042_LEN, KBD_IRQ};
use devices::power::{PowerDevice, SLEEP_CONTROL_PORT};
use devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, FirstByteWriter, SerialDevice};
use devices::{Bus, BusError};
pub use kvm_vm::{KvmVm, StopCause, StopLatch, VmConfig, VmError};
use memory::{GuestMem, MemoryError, RegionSpec, ram_layout};
use seccomp::{SeccompError, SeccompMode, ThreadKind};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
pub use vcpu::StopReason;

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    NoKvm(kvm_ioctls::Error),
    /// More vCPUs than KVM or the MP table allow.
    #[error("vcpus: {asked} is more than this host allows ({max})")]
    TooManyVcpus {
        /// Asked for.
        asked: u8,
        /// The limit.
        max: usize,
    },
    /// No vCPUs.
    #[error("vcpus: a VM needs at least 1 vCPU")]
    ZeroVcpus,
    /// More memory than the host has.
    #[error("memory_mib: {asked} MiB is more than this host has ({host} MiB)")]
    TooMuchMemory {
        /// Asked for.
        asked: u64,
        /// MemTotal.
        host: u64,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd, command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// KVM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Devices.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The console file.
    #[error("console {path}: {source}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An eventfd.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// A helper thread's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

impl RunError {
    /// The exit code this error ends `run-vm` with.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::VmmError
    }
}

/// Which kernel to boot.
pub enum Kernel {
    /// The built-in guest, with the command line that steers it.
    Builtin,
    /// A bzImage or ELF vmlinux on the host.
    Path(PathBuf),
    /// A bzImage or ELF vmlinux opened already (e.g. before dropping privileges).
    Opened(ImageFile),
    /// An ELF or bzImage held in memory (name for messages, bytes).
    Bytes(String, Vec<u8>),
}

/// Which initramfs to load.
pub enum Initrd {
    /// A file on the host, opened when the VM starts.
    Path(PathBuf),
    /// A file opened already (e.g. before dropping privileges).
    Opened(ImageFile),
}

impl From<PathBuf> for Initrd {
    fn from(p: PathBuf) -> Self {
        Initrd::Path(p)
    }
}

/// Everything needed to build one VM.
pub struct VmParams {
    /// vCPU count.
    pub vcpus: u8,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// The kernel.
    pub kernel: Kernel,
    /// The initramfs.
    pub initrd: Option<Initrd>,
    /// The kernel command line as passed.
    pub cmdline: String,
    /// Where the guest's serial output goes.
    pub console: Box<dyn Write + Send>,
    /// Extra memory regions beyond RAM (read-only or dirty-logged slots).
    pub extra_regions: Vec<RegionSpec>,
    /// Extra MMIO devices: (base, length, device).
    pub mmio_devices: Vec<(u64, u64, Arc<dyn DeviceMmio + Send + Sync>)>,
    /// Exit counters, one row per vCPU; made here when None.
    pub counters: Option<Arc<ExitCounters>>,
    /// When the VM's process started (boot times count from here); now when None.
    pub started: Option<Instant>,
    /// The control channel from the supervisor, served by the `control` thread
    /// ([`control`]); none when run by hand.
    pub control: Option<OwnedFd>,
    /// The VM's name, for the control thread's log lines.
    pub name: String,
}

impl VmParams {
    /// Parameters for the VM a config file describes. The console file, kernel and
    /// initrd are opened here (kernel and initrd checked to be regular files), so the
    /// caller may drop privileges before [`RunningVm::start_filtered`].
    pub fn from_spec(spec: &VmSpec) -> Result<Self, RunError> {
        let console: Box<dyn Write + Send> = match &spec.console {
            ConsoleSpec::Stdout => Box::new(std::io::stdout()),
            ConsoleSpec::Off => Box::new(std::io::sink()),
            ConsoleSpec::File(path) => {
                Box::new(crate::config::files::open_append_file(path).map_err(|e| {
                    RunError::Console {
                        path: path.clone(),
                        source: match e {
                            crate::config::files::NotRegular::Io(e) => e,
                            other => std::io::Error::other(other.to_string()),
                        },
                    }
                })?)
            }
        };
        let (kernel, cmdline) = match &spec.kernel {
            KernelSpec::Builtin => (
                Kernel::Builtin,
                format!(
                    "{} then={} io_exits={} heartbeat_ms={} echo={}",
                    spec.cmdline,
                    spec.builtin.then.as_str(),
                    spec.builtin.io_exits,
                    spec.builtin.heartbeat_ms,
                    u8::from(spec.builtin.console == BuiltinConsole::Echo),
                ),
            ),
            KernelSpec::Path(p) => (
                Kernel::Opened(ImageFile::open("kernel", p)?),
                spec.cmdline.clone(),
            ),
        };
        let initrd = spec
            .initrd
            .as_deref()
            .map(|p| ImageFile::open("initrd", p).map(Initrd::Opened))
            .transpose()?;
        Ok(VmParams {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel,
            initrd,
            cmdline,
            console,
            extra_regions: Vec::new(),
            mmio_devices: Vec::new(),
            counters: None,
            started: None,
            control: None,
            name: spec.name.clone(),
        })
    }
}

/// The host's total RAM in MiB (MemTotal), from sysinfo(2): /proc/meminfo is hidden
/// under the unit's `ProcSubset=pid`.
pub fn host_memory_mib() -> Option<u64> {
    let info = nix::sys::sysinfo::sysinfo().ok()?;
    Some(info.ram_total() >> 20)
}

/// A VM whose vCPUs run.
pub struct RunningVm {
    // Field order matters: the VM (and its vCPU threads) go before the memory.
    vm: KvmVm,
    mem: GuestMem,
    latch: Arc<StopLatch>,
    bus: Arc<Bus>,
    counters: Arc<ExitCounters>,
    debug_port: Arc<DebugPort>,
    stats: Option<StatsThread>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    control: Option<(Arc<control::ControlStats>, JoinHandle<()>)>,
}

/// How often the kernel's KVM statistics are copied into the counter table.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The `kvm_stats` thread: its stop channel and handle.
type StatsThread = (mpsc::Sender<()>, JoinHandle<()>);

/// The `kvm_stats` thread, filtered (when `mode` is on) before this returns. No thread
/// (and no error) when KVM has no binary statistics; an error if its filter fails.
fn start_stats_thread(
    vm: &KvmVm,
    counters: &Arc<ExitCounters>,
    mode: SeccompMode,
) -> Result<Option<StatsThread>, SeccompError> {
    let Ok(stats) = vm
        .vcpus()
        .iter()
        .map(|v| stats::VcpuStats::open(v.fd()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Ok(None);
    };
    let publisher = stats::StatsPublisher::new(stats, counters.clone());
    let (tx, rx) = mpsc::channel::<()>();
    let spawned = seccomp::spawn_filtered(ThreadKind::KvmStats, mode, move || {
        loop {
            publisher.publish();
            match rx.recv_timeout(STATS_INTERVAL) {
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                _ => break,
            }
        }
        publisher.publish();
    });
    match spawned {
        Ok(handle) => Ok(Some((tx, handle))),
        // As before: no statistics thread if the system cannot start one.
        Err(SeccompError::Spawn { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl RunningVm {
    /// Build the VM `p` describes and start its vCPUs; `latch` receives the stop cause.
    /// No seccomp filter (see [`RunningVm::start_filtered`]).
    pub fn start(p: VmParams, latch: Arc<StopLatch>) -> Result<Self, RunError> {
        let kvm = Kvm::new().map_err(RunError::NoKvm)?;
        Self::start_filtered(kvm, p, latch, SeccompMode::Off)
    }

    /// [`RunningVm::start`] on `/dev/kvm` opened already (before dropping privileges),
    /// and with [`SeccompMode::On`] every thread it starts and the calling thread get
    /// their seccomp filters before the guest runs (see [`KvmVm::set_seccomp`]). For the `run-vm` process's main thread only, after the
    /// privilege drop and once every helper thread started before (the signal thread) has
    /// its own filter: the calling thread keeps its filter for good.
    pub fn start_filtered(
        kvm: Kvm,
        mut p: VmParams,
        latch: Arc<StopLatch>,
        seccomp: SeccompMode,
    ) -> Result<Self, RunError> {
        if p.vcpus == 0 {
            return Err(RunError::ZeroVcpus);
        }
        if let Some(host) = host_memory_mib()
            && p.memory_mib > host
        {
            return Err(RunError::TooMuchMemory {
                asked: p.memory_mib,
                host,
            });
        }
        let max = kvm
            .get_max_vcpus()
            .min(usize::from(mptable::MAX_SUPPORTED_CPUS));
        if usize::from(p.vcpus) > max {
            return Err(RunError::TooManyVcpus {
                asked: p.vcpus,
                max,
            });
        }

        let mut regions = ram_layout(p.memory_mib << 20);
        regions.extend(p.extra_regions.iter().copied());
        let mem = GuestMem::new(regions)?;
        let (image, builtin) = match &mut p.kernel {
            Kernel::Builtin => (KernelImage::Bytes("builtin", builtin::BUILTIN_ELF), true),
            Kernel::Path(path) => (KernelImage::File(path), false),
            Kernel::Opened(f) => (KernelImage::Opened(f), false),
            Kernel::Bytes(name, bytes) => (KernelImage::Bytes(name, bytes), false),
        };
        let mut initrd = match p.initrd.take() {
            None => None,
            Some(Initrd::Opened(f)) => Some(f),
            Some(Initrd::Path(path)) => Some(ImageFile::open("initrd", &path)?),
        };
        let boot = boot::load_guest_opened(&mem, image, initrd.as_mut(), &p.cmdline)?;
        drop(initrd);

        let started = p.started.unwrap_or_else(Instant::now);
        let counters = p
            .counters
            .unwrap_or_else(|| Arc::new(ExitCounters::new(usize::from(p.vcpus))));
        counters.set_vcpus(usize::from(p.vcpus));
        counters.reset_boot();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::EventFd)?;
        let serial_irq_kvm = serial_irq.try_clone().map_err(RunError::EventFd)?;
        let debug_port = Arc::new(DebugPort::with_table(counters.clone(), started));
        let console = FirstByteWriter::new(p.console, counters.clone(), started);
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::EventFd)?;
        let kbd_irq_kvm = kbd_irq.try_clone().map_err(RunError::EventFd)?;
        let mut bus = Bus::new();
        let serial = SerialDevice::new(serial_irq, Box::new(console)).into_shared();
        bus.add_pio("serial", COM1_BASE, COM1_LEN, serial.clone())?;
        let exit: Arc<dyn vcpu::ExitHandler> = latch.clone();
        // i8042 data port 0x60 through command port 0x64.
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), kbd_irq)));
        bus.add_pio("i8042", I8042_DATA, I8042_LEN, i8042.clone())?;
        bus.add_pio(
            "acpi-sleep",
            SLEEP_CONTROL_PORT,
            1,
            Arc::new(PowerDevice::new(exit.clone())),
        )?;
        bus.add_pio("debug-port", DEBUG_PORT, 1, debug_port.clone())?;
        for (base, len, dev) in p.mmio_devices {
            bus.add_mmio("mmio", base, len, dev)?;
        }
        let bus = Arc::new(bus);

        let config = VmConfig::new(&kvm, p.vcpus)?;
        let mut vm = KvmVm::new(&kvm, config, &mem, exit, bus.clone(), counters.clone())?;
        vm.register_irqfd(&serial_irq_kvm, COM1_IRQ)?;
        vm.register_irqfd(&kbd_irq_kvm, KBD_IRQ)?;
        let stats = start_stats_thread(&vm, &counters, seccomp)?;
        // The control thread acts on the VM from now on: a pause before the vCPUs run
        // parks them at their start.
        let control = match p.control {
            None => None,
            Some(fd) => {
                let controller = control::Controller::new(
                    &p.name,
                    control::Targets {
                        run: vm.run_control(),
                        i8042: i8042.clone(),
                        serial: serial.clone(),
                        latch: latch.clone(),
                    },
                    Box::new(std::io::stderr()),
                );
                let stats = controller.stats();
                Some((stats, control::start(controller, fd, seccomp)?))
            }
        };
        vm.set_seccomp(seccomp);
        if builtin {
            // The built-in guest: every vCPU enters at the ELF entry in long mode.
            vm.run(Some(boot.entry))?;
        } else {
            vm.set_bsp_entry(boot.entry)?;
            vm.run(None)?;
        }
        Ok(RunningVm {
            vm,
            mem,
            latch,
            bus,
            counters,
            debug_port,
            stats,
            serial,
            i8042,
            control,
        })
    }

    /// Wait until the guest or a signal stops the VM.
    pub fn wait(&self) -> StopCause {
        self.latch.wait()
    }

    /// Wait at most `d`.
    pub fn wait_timeout(&self, d: Duration) -> Option<StopCause> {
        self.latch.wait_timeout(d)
    }

    /// Stop every vCPU through the signal path, then publish the KVM statistics once more.
    pub fn shutdown(&mut self) -> Result<(), VmError> {
        let r = self.vm.shutdown();
        if let Some((tx, handle)) = self.stats.take() {
            let _ = tx.send(());
            let _ = handle.join();
        }
        r
    }

    /// The VM.
    pub fn vm(&self) -> &KvmVm {
        &self.vm
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The I/O bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The exit counters.
    pub fn counters(&self) -> &Arc<ExitCounters> {
        &self.counters
    }

    /// The debug port (boot-complete time).
    pub fn debug_port(&self) -> &DebugPort {
        &self.debug_port
    }

    /// Park the vCPUs and read KVM's clock (see [`kvm_vm::RunControl::pause`]).
    pub fn pause(&self) -> Result<Option<u64>, VmError> {
        self.vm.pause()
    }

    /// Run the vCPUs again with KVM's clock as it was at the pause.
    pub fn resume(&self) -> Result<Option<u64>, VmError> {
        self.vm.resume()
    }

    /// KVM's clock now (KVM_GET_CLOCK), in nanoseconds.
    pub fn clock_ns(&self) -> Result<u64, VmError> {
        self.vm.run_control().clock()
    }

    /// Press Ctrl-Alt-Del on the VM's keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), devices::i8042::I8042Error> {
        self.i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ctrl_alt_del()
    }

    /// Type `bytes` into the UART's receive side; how many it took.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes)
    }

    /// The control thread's counters (none without a control channel).
    pub fn control_stats(&self) -> Option<&control::ControlStats> {
        self.control.as_ref().map(|(s, _)| &**s)
    }
}

/// The exit code for a stop cause.
pub fn exit_code_for(cause: &StopCause) -> ExitCode {
    match cause {
        StopCause::Guest(StopReason::Poweroff) => ExitCode::GuestPoweroff,
        StopCause::Guest(StopReason::Reset) => ExitCode::GuestReset,
        StopCause::Guest(StopReason::Crash(_)) => ExitCode::GuestCrash,
        StopCause::Guest(StopReason::Error(_)) => ExitCode::VmmError,
        StopCause::Signal(_) | StopCause::SupervisorGone => ExitCode::Stopped,
    }
}

/// A one-line description of a stop cause, for the log.
pub fn describe(cause: &StopCause) -> String {
    match cause {
        StopCause::Guest(StopReason::Poweroff) => "guest powered off".into(),
        StopCause::Guest(StopReason::Reset) => "guest reset".into(),
        StopCause::Guest(StopReason::Crash(d)) => format!("guest crashed: {d}"),
        StopCause::Guest(StopReason::Error(d)) => format!("VMM error: {d}"),
        StopCause::Signal(s) => format!("stopped by signal {s}"),
        StopCause::SupervisorGone => "stopped: the supervisor is gone".into(),
    }
}

/// The `run-vm` process: run the VM `spec` describes until the guest stops it or
/// SIGTERM/SIGINT arrives (recorded in `latch` by the caller's signal thread).
pub fn run_vm(
    spec: &VmSpec,
    latch: Arc<StopLatch>,
    counters: Option<Arc<ExitCounters>>,
    started: Instant,
    log: &mut dyn Write,
) -> ExitCode {
    let started = VmParams::from_spec(spec).and_then(|mut p| {
        p.counters = counters;
        p.started = Some(started);
        RunningVm::start(p, latch)
    });
    run_to_end(&spec.name, started, log)
}

/// The rest of the `run-vm` process once the VM is started (or failed to): wait for the
/// guest or a signal, shut down, log the outcome and return its exit code.
pub fn run_to_end(
    name: &str,
    started: Result<RunningVm, RunError>,
    log: &mut dyn Write,
) -> ExitCode {
    let mut vm = match started {
        Ok(vm) => vm,
        Err(e) => {
            let _ = writeln!(log, "vmm-fleet: vm {name}: {e}");
            return e.exit_code();
        }
    };
    let cause = vm.wait();
    let stopped = vm.shutdown();
    let mut code = exit_code_for(&cause);
    let _ = writeln!(
        log,
        "vmm-fleet: vm {name}: {} (exit code {})",
        describe(&cause),
        code.code()
    );
    if let Err(e) = stopped {
        let _ = writeln!(log, "vmm-fleet: vm {name}: shutdown: {e}");
        code = ExitCode::VmmError;
    }
    code
}

impl RunningVm {
    /// Start the VM a config file describes.
    pub fn start_spec(spec: &VmSpec, latch: Arc<StopLatch>) -> Result<Self, RunError> {
        Self::start(VmParams::from_spec(spec)?, latch)
    }
}
