//! A vCPU: its KVM fd, the run loop on its own thread, the shared run state, and the
//! kick (`immediate_exit` + SIGRTMIN) that gets a vCPU out of `KVM_RUN`.
//!
//! The kick follows Firecracker: the signal handler sets `immediate_exit` in the
//! interrupted thread's own `kvm_run`, so a signal that lands just before `KVM_RUN`
//! makes the next `KVM_RUN` return at once instead of being lost.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::null_mut;
use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Barrier, Condvar, Mutex, OnceLock};

use kvm_bindings::{
    CpuId, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_mp_state, kvm_msr_entry, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::boot;
use super::devices::Bus;
use super::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use crate::metrics::counters::{ExitCounters, ExitReason};

/// The run state all vCPUs of a VM share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRunState {
    /// vCPUs run the guest.
    Running,
    /// vCPUs wait outside `KVM_RUN` until the state changes.
    Suspended,
    /// vCPUs leave their loops and their threads end.
    Exiting,
}

/// A [`VmRunState`] behind a mutex, with a condvar to wake waiting vCPUs, and how many
/// vCPUs are parked (waiting while suspended), so a pause can wait for them.
#[derive(Debug)]
pub struct VcpuRunState {
    state: Mutex<RunInner>,
    cv: Condvar,
}

#[derive(Debug)]
struct RunInner {
    state: VmRunState,
    parked: usize,
}

impl Default for VcpuRunState {
    fn default() -> Self {
        VcpuRunState {
            state: Mutex::new(RunInner {
                state: VmRunState::Running,
                parked: 0,
            }),
            cv: Condvar::new(),
        }
    }
}

impl VcpuRunState {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunInner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the state and wake every waiter.
    pub fn set_and_notify(&self, s: VmRunState) {
        self.lock().state = s;
        self.cv.notify_all();
    }

    /// Change `from` to `to` atomically; false (and no change) if the state was not `from`.
    pub fn transition(&self, from: VmRunState, to: VmRunState) -> bool {
        let mut g = self.lock();
        if g.state != from {
            return false;
        }
        g.state = to;
        self.cv.notify_all();
        true
    }

    /// The current state.
    pub fn get(&self) -> VmRunState {
        self.lock().state
    }

    /// Block while suspended (counted as parked meanwhile); return the state that ended
    /// the wait.
    pub fn wait_while_suspended(&self) -> VmRunState {
        let mut g = self.lock();
        if g.state != VmRunState::Suspended {
            return g.state;
        }
        g.parked += 1;
        self.cv.notify_all();
        let mut g = self
            .cv
            .wait_while(g, |s| s.state == VmRunState::Suspended)
            .unwrap_or_else(|p| p.into_inner());
        g.parked -= 1;
        g.state
    }

    /// How many vCPUs are parked now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Wait at most `d` until `n` vCPUs are parked or the state is no longer suspended;
    /// true if `n` are parked (and the state still suspended).
    pub fn wait_parked(&self, n: usize, d: std::time::Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| s.state == VmRunState::Suspended && s.parked < n)
            .unwrap_or_else(|p| p.into_inner());
        g.state == VmRunState::Suspended && g.parked >= n
    }
}

/// Why a VM stops, as seen by a vCPU or a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off or halted.
    Poweroff,
    /// The guest asked for a reset.
    Reset,
    /// The guest crashed (triple fault, entry failure, internal error), with KVM's detail.
    Crash(String),
    /// The VMM failed while running the guest.
    Error(String),
}

/// Told when a vCPU stops the VM (the seed's exit handler).
pub trait ExitHandler: Send + Sync {
    /// The VM should stop for `reason`.
    fn kick(&self, reason: StopReason);
}

/// Errors of a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vcpu {id}: {what}: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("vcpu {id}: KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many we gave.
        wanted: usize,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The vCPU thread's seccomp filter could not be installed.
    #[error("vcpu {id}: {source}")]
    Seccomp {
        /// vCPU index.
        id: u8,
        /// Why.
        source: SeccompError,
    },
}

/// What one vCPU is set up with.
#[derive(Clone)]
pub struct VcpuConfig {
    /// vCPU index, also its LAPIC ID.
    pub id: u8,
    /// Its CPUID table.
    pub cpuid: CpuId,
    /// MSRs set before it runs.
    pub msrs: Vec<kvm_msr_entry>,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

extern "C" fn kick_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` is this thread's own kvm_run mapping, set by the vCPU thread before
        // it can be signalled and cleared before the mapping is dropped; a volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
    fence(Ordering::Release);
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Install the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    match RESULT
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
    {
        Ok(()) => Ok(()),
        Err(errno) => Err(VcpuError::Signal(vmm_sys_util::errno::Error::new(*errno))),
    }
}

/// One vCPU, owned by its thread once the VM runs.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u8,
    bus: Arc<Bus>,
    run_state: Arc<VcpuRunState>,
    barrier: Arc<Barrier>,
    counters: Arc<ExitCounters>,
    /// Where this vCPU starts when `run` is given no address (the BSP's kernel entry).
    pub boot_entry: Option<u64>,
    /// Whether `run` installs the vCPU seccomp filter on its thread first.
    pub seccomp: SeccompMode,
}

impl KvmVcpu {
    /// Create vCPU `config.id` and set its CPUID, MSRs, FPU and LAPIC LINT pins.
    pub fn new(
        vm: &VmFd,
        config: &VcpuConfig,
        bus: Arc<Bus>,
        run_state: Arc<VcpuRunState>,
        barrier: Arc<Barrier>,
        counters: Arc<ExitCounters>,
    ) -> Result<Self, VcpuError> {
        let id = config.id;
        let kvm = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&config.cpuid)
            .map_err(kvm("KVM_SET_CPUID2"))?;
        let msrs = Msrs::from_entries(&config.msrs).map_err(|_| VcpuError::Msrs {
            id,
            set: 0,
            wanted: config.msrs.len(),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != config.msrs.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                wanted: config.msrs.len(),
            });
        }
        fd.set_fpu(&boot::boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        fd.set_lapic(&boot::set_lint(lapic))
            .map_err(kvm("KVM_SET_LAPIC"))?;
        Ok(KvmVcpu {
            fd,
            id,
            bus,
            run_state,
            barrier,
            counters,
            boot_entry: None,
            seccomp: SeccompMode::Off,
        })
    }

    /// This vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The vCPU's own fd (KVM_GET_STATS_FD and the like).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Registers for the start: long mode at `ip` for every vCPU given one; the BSP at its
    /// boot entry otherwise; APs with neither wait for INIT/SIPI from the guest.
    fn setup_registers(&mut self, ip: Option<u64>) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm = |what| move |source| VcpuError::Kvm { id, what, source };
        let Some(entry) = ip.or(if id == 0 { self.boot_entry } else { None }) else {
            return Ok(());
        };
        let sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&boot::boot_regs(entry))
            .map_err(kvm("KVM_SET_REGS"))?;
        if id != 0 {
            self.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// The body of the vCPU thread: install its seccomp filter (when on), set up, meet the
    /// others at the barrier, run until the guest stops the VM (`Some(reason)`) or the run
    /// state says Exiting (`None`).
    pub fn run(&mut self, ip: Option<u64>) -> Option<StopReason> {
        KVM_RUN_PTR.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        let setup = catch_unwind(AssertUnwindSafe(|| {
            let id = self.id;
            seccomp::apply_if(self.seccomp, ThreadKind::Vcpu)
                .map_err(|source| VcpuError::Seccomp { id, source })?;
            self.setup_registers(ip)
        }));
        // A vCPU that could not be set up (or filtered) stops the others before any of
        // them runs the guest.
        if !matches!(setup, Ok(Ok(()))) {
            self.run_state.set_and_notify(VmRunState::Exiting);
        }
        // Everyone (the starting thread included) meets here, set up or not, so a failed
        // vCPU cannot leave the others waiting.
        self.barrier.wait();
        let result = match setup {
            Ok(Ok(())) => catch_unwind(AssertUnwindSafe(|| self.run_loop()))
                .unwrap_or_else(|_| Some(StopReason::Error(format!("vcpu {} panicked", self.id)))),
            Ok(Err(e)) => Some(StopReason::Error(e.to_string())),
            Err(_) => Some(StopReason::Error(format!(
                "vcpu {} panicked during setup",
                self.id
            ))),
        };
        KVM_RUN_PTR.with(|c| c.set(null_mut()));
        result
    }

    fn run_loop(&mut self) -> Option<StopReason> {
        loop {
            match self.run_state.get() {
                VmRunState::Exiting => return None,
                VmRunState::Suspended => {
                    if self.run_state.wait_while_suspended() == VmRunState::Exiting {
                        return None;
                    }
                }
                VmRunState::Running => {}
            }
            if let Some(stop) = self.run_once() {
                return Some(stop);
            }
        }
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> Option<StopReason> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                fence(Ordering::Acquire);
                self.counters.add(usize::from(id), ExitReason::Interrupted);
                return None;
            }
            Err(e) => return Some(StopReason::Error(format!("vcpu {id}: KVM_RUN: {e}"))),
        };
        let bus = &self.bus;
        let counters = &self.counters;
        let v = usize::from(id);
        match exit {
            VcpuExit::IoIn(port, data) => {
                counters.add(v, ExitReason::IoIn);
                bus.pio_read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                counters.add(v, ExitReason::IoOut);
                bus.pio_write(port, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                counters.add(v, ExitReason::MmioRead);
                bus.mmio_read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                counters.add(v, ExitReason::MmioWrite);
                bus.mmio_write(addr, data);
                None
            }
            VcpuExit::Hlt => {
                counters.add(v, ExitReason::Hlt);
                Some(StopReason::Poweroff)
            }
            VcpuExit::Shutdown => {
                counters.add(v, ExitReason::Shutdown);
                Some(StopReason::Crash(format!(
                    "vcpu {id}: triple fault (KVM_EXIT_SHUTDOWN)"
                )))
            }
            VcpuExit::FailEntry(reason, cpu) => {
                counters.add(v, ExitReason::FailEntry);
                Some(StopReason::Crash(format!(
                    "vcpu {id}: VM entry failed (KVM_EXIT_FAIL_ENTRY): hardware entry failure reason {reason:#x} on host cpu {cpu}"
                )))
            }
            VcpuExit::InternalError => {
                counters.add(v, ExitReason::InternalError);
                Some(StopReason::Crash(self.internal_error_detail()))
            }
            VcpuExit::SystemEvent(kind, data) => {
                counters.add(v, ExitReason::SystemEvent);
                match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Some(StopReason::Poweroff),
                    KVM_SYSTEM_EVENT_RESET => Some(StopReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Some(StopReason::Crash(format!(
                        "vcpu {id}: guest reported a crash (KVM_SYSTEM_EVENT_CRASH) {data:x?}"
                    ))),
                    _ => None,
                }
            }
            VcpuExit::Intr => {
                counters.add(v, ExitReason::Interrupted);
                None
            }
            // Exits the guest cannot recover from by running again: re-entering would
            // spin forever on the same exit.
            VcpuExit::Unknown | VcpuExit::Exception | VcpuExit::Unsupported(_) => {
                counters.add(v, ExitReason::Other);
                Some(StopReason::Crash(format!(
                    "vcpu {id}: unexpected exit {:?}",
                    self.fd.get_kvm_run().exit_reason
                )))
            }
            _ => {
                counters.add(v, ExitReason::Other);
                None
            }
        }
    }

    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, so the `internal`
        // member is the live one of the union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        format!(
            "vcpu {}: KVM internal error (KVM_EXIT_INTERNAL_ERROR): suberror {} ({what}), data {:x?}",
            self.id,
            internal.suberror,
            &internal.data[..n]
        )
    }
}
