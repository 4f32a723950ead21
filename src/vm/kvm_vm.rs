//! `KvmVm`, as in the seed notes: the VM fd, its memory slots, MP table and irqchip,
//! the vCPUs and their threads, started behind a barrier and stopped by signal; and
//! [`RunControl`], the part another thread holds to pause and resume the vCPUs with the
//! guest's clock kept (KVM_GET_CLOCK at pause, KVM_SET_CLOCK at resume).

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_clock_data, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use super::boot;
use super::devices::Bus;
use super::memory::GuestMem;
use super::mptable;
use super::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use super::vcpu::{
    ExitHandler, KvmVcpu, StopReason, VcpuConfig, VcpuError, VcpuRunState, VmRunState,
    install_kick_handler, kick_signal,
};
use crate::metrics::counters::ExitCounters;

/// KVM's TSS, three pages in the 32-bit MMIO hole (as Firecracker).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// How long `shutdown` waits for vCPU threads before it gives up.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a pause waits for every vCPU to leave `KVM_RUN` before it reads the clock.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The seed's VM configuration: how many vCPUs and how each is set up.
#[derive(Clone)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub num_vcpus: u8,
    /// One entry per vCPU.
    pub vcpus_config: Vec<VcpuConfig>,
}

impl VmConfig {
    /// `num_vcpus` vCPUs with KVM's supported CPUID, patched per vCPU, and the boot MSRs.
    pub fn new(kvm: &Kvm, num_vcpus: u8) -> Result<Self, VmError> {
        let base = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let vcpus_config = (0..num_vcpus)
            .map(|id| VcpuConfig {
                id,
                cpuid: boot::vcpu_cpuid(&base, id, num_vcpus),
                msrs: boot::boot_msrs(),
            })
            .collect();
        Ok(VmConfig {
            num_vcpus,
            vcpus_config,
        })
    }
}

/// Errors of the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A VM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be created or set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The MP table could not be written.
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::MpTableError),
    /// `run` was called with a vCPU count that does not match the configuration.
    #[error("{created} vCPUs created but the configuration asks for {configured}")]
    VcpuCount {
        /// vCPUs created.
        created: usize,
        /// vCPUs configured.
        configured: u8,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// Some vCPU threads did not stop in time.
    #[error("{0} vCPU thread(s) did not stop within {SHUTDOWN_TIMEOUT:?}")]
    ShutdownTimeout(usize),
    /// The VM is not in a state for this call.
    #[error("{0}")]
    State(&'static str),
    /// Some vCPUs were still in the guest when a pause gave up waiting.
    #[error("pause: {parked} of {vcpus} vCPUs parked within {PAUSE_TIMEOUT:?}")]
    PauseTimeout {
        /// vCPUs parked.
        parked: usize,
        /// vCPU threads.
        vcpus: usize,
    },
    /// The starting thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Counts live vCPU threads so `shutdown` can wait with a deadline.
#[derive(Default)]
struct LiveThreads {
    count: Mutex<usize>,
    cv: Condvar,
}

struct LiveGuard(Arc<LiveThreads>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut c = self.0.count.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.saturating_sub(1);
        self.0.cv.notify_all();
    }
}

/// A KVM virtual machine and its vCPU threads.
pub struct KvmVm {
    fd: Arc<VmFd>,
    config: VmConfig,
    // Only one of `vcpus` or `vcpu_handles` is populated: `run` drains the first into
    // the second.
    vcpus: Vec<KvmVcpu>,
    vcpu_handles: Vec<JoinHandle<()>>,
    exit_handler: Arc<dyn ExitHandler>,
    vcpu_barrier: Arc<Barrier>,
    vcpu_run_state: Arc<VcpuRunState>,
    control: Arc<RunControl>,
    live: Arc<LiveThreads>,
    slots: Vec<(u32, u64)>,
    /// A handle on the guest memory (its regions are shared): every slot KVM has stays
    /// mapped while the VM or any of its vCPU threads lives.
    mem: vm_memory::GuestMemoryMmap,
    /// Whether `run` filters the vCPU threads and the thread calling it.
    seccomp: SeccompMode,
}

impl KvmVm {
    /// Create the VM: memory slots, MP table, irqchip (PIC, IOAPIC, LAPICs, PIT), vCPUs.
    pub fn new(
        kvm: &Kvm,
        config: VmConfig,
        mem: &GuestMem,
        exit_handler: Arc<dyn ExitHandler>,
        bus: Arc<Bus>,
        counters: Arc<ExitCounters>,
    ) -> Result<Self, VmError> {
        let mut vm = Self::create_vm(kvm, config, exit_handler, mem)?;
        mptable::write(&mem.mem, vm.config.num_vcpus)?;
        vm.setup_irq_controller()?;
        vm.create_vcpus(bus, counters)?;
        Ok(vm)
    }

    fn create_vm(
        kvm: &Kvm,
        config: VmConfig,
        exit_handler: Arc<dyn ExitHandler>,
        mem: &GuestMem,
    ) -> Result<Self, VmError> {
        let fd = Arc::new(kvm.create_vm().map_err(|source| VmError::Kvm {
            what: "KVM_CREATE_VM",
            source,
        })?);
        let vcpu_run_state = Arc::new(VcpuRunState::default());
        let vm = KvmVm {
            // The calling thread is a party too: `run` returns only once every vCPU
            // thread is set up, so a shutdown right after `run` finds them all ready.
            vcpu_barrier: Arc::new(Barrier::new(usize::from(config.num_vcpus) + 1)),
            config,
            control: Arc::new(RunControl {
                fd: fd.clone(),
                run_state: vcpu_run_state.clone(),
                threads: Mutex::new(Vec::new()),
                clock: Mutex::new(None),
            }),
            fd,
            vcpus: Vec::new(),
            vcpu_handles: Vec::new(),
            exit_handler,
            vcpu_run_state,
            live: Arc::new(LiveThreads::default()),
            slots: Vec::new(),
            mem: mem.mem.clone(),
            seccomp: SeccompMode::Off,
        };
        let mut vm = vm;
        vm.configure_memory_regions(mem)?;
        Ok(vm)
    }

    /// One KVM slot per region, each with its own flags.
    pub fn configure_memory_regions(&mut self, mem: &GuestMem) -> Result<(), VmError> {
        for region in mem.kvm_regions() {
            // SAFETY: the region describes memory mapped by `mem`; `self.mem` holds the same
            // regions (shared, reference-counted) for as long as the VM fd exists, and each
            // vCPU thread holds them too, so no slot outlives its mapping.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
                what: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
            self.slots.push((region.slot, region.memory_size));
        }
        Ok(())
    }

    /// TSS and identity-map addresses, then the in-kernel irqchip and PIT.
    pub fn setup_irq_controller(&mut self) -> Result<(), VmError> {
        let kvm = |what| move |source| VmError::Kvm { what, source };
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    fn create_vcpus(&mut self, bus: Arc<Bus>, counters: Arc<ExitCounters>) -> Result<(), VmError> {
        for cfg in &self.config.vcpus_config {
            self.vcpus.push(KvmVcpu::new(
                &self.fd,
                cfg,
                bus.clone(),
                self.vcpu_run_state.clone(),
                self.vcpu_barrier.clone(),
                counters.clone(),
            )?);
        }
        Ok(())
    }

    /// The VM fd.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The vCPUs not yet started (empty once `run` has been called).
    pub fn vcpus(&self) -> &[KvmVcpu] {
        &self.vcpus
    }

    /// Route an eventfd to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Kvm {
                what: "KVM_IRQFD",
                source,
            })
    }

    /// Where the BSP starts when `run` gets no address (a Linux kernel's entry).
    pub fn set_bsp_entry(&mut self, entry: u64) -> Result<(), VmError> {
        let bsp = self
            .vcpus
            .first_mut()
            .ok_or(VmError::State("no vCPU to set an entry on"))?;
        bsp.boot_entry = Some(entry);
        Ok(())
    }

    /// The dirty-page bitmap of `slot` since the last call (KVM_GET_DIRTY_LOG): bit `i`
    /// of the result is page `i` of the slot.
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let size = self
            .slots
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, size)| *size)
            .ok_or(VmError::State("no such memory slot"))?;
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(|source| VmError::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                source,
            })
    }

    /// With [`SeccompMode::On`], `run` makes every vCPU thread install the vCPU filter at
    /// its start, and installs the main-thread filter on the calling thread once every
    /// vCPU thread exists, before the vCPUs are let into the guest. Call it only from the
    /// thread that owns the process (the `run-vm` main thread) after every helper thread
    /// has its own filter: the calling thread keeps the filter for good.
    pub fn set_seccomp(&mut self, mode: SeccompMode) {
        self.seccomp = mode;
    }

    /// The shared run state.
    pub fn run_state(&self) -> VmRunState {
        self.vcpu_run_state.get()
    }

    /// Start one thread per vCPU, `vcpu_{id}`. With `vcpu_run_addr`, every vCPU starts
    /// in long mode at that address; without it the BSP starts at its boot entry and the
    /// APs wait for the guest's INIT/SIPI. Returns once every vCPU is set up.
    pub fn run(&mut self, vcpu_run_addr: Option<u64>) -> Result<(), VmError> {
        if self.vcpus.len() != usize::from(self.config.num_vcpus) {
            return Err(VmError::VcpuCount {
                created: self.vcpus.len(),
                configured: self.config.num_vcpus,
            });
        }
        install_kick_handler()?;
        let vcpus: Vec<KvmVcpu> = self.vcpus.drain(..).collect();
        // Each thread first waits for a go from here, sent once every thread exists; only
        // then do they set up and meet at the barrier. If a thread cannot be started the
        // others get no go and end without ever reaching the barrier.
        let mut gates = Vec::with_capacity(vcpus.len());
        for mut vcpu in vcpus {
            vcpu.seccomp = self.seccomp;
            let exit_handler = self.exit_handler.clone();
            let run_state = self.vcpu_run_state.clone();
            let mem = self.mem.clone();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            *self.live.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            // Dropped with the closure if the thread cannot be spawned.
            let live = LiveGuard(self.live.clone());
            let spawned = thread::Builder::new()
                .name(format!("vcpu_{}", vcpu.id()))
                .spawn(move || {
                    let _live = live;
                    // Guest memory stays mapped while this thread can still run the guest.
                    let _mem = mem;
                    block_process_signals();
                    if go_rx.recv().is_err() {
                        return;
                    }
                    if let Some(reason) = vcpu.run(vcpu_run_addr) {
                        run_state.set_and_notify(VmRunState::Exiting);
                        exit_handler.kick(reason);
                    }
                });
            match spawned {
                Ok(h) => {
                    self.control.add_thread(h.as_pthread_t());
                    self.vcpu_handles.push(h);
                    gates.push(go_tx);
                }
                Err(e) => {
                    self.vcpu_run_state.set_and_notify(VmRunState::Exiting);
                    drop(gates);
                    self.control.forget_threads();
                    for h in self.vcpu_handles.drain(..) {
                        let _ = h.join();
                    }
                    return Err(VmError::Spawn(e));
                }
            }
        }
        for g in gates {
            let _ = g.send(());
        }
        // Every thread of the process exists now: filter this one too before the vCPUs
        // pass the barrier into the guest. If that fails no vCPU enters the guest.
        let filtered = seccomp::apply_if(self.seccomp, ThreadKind::Main);
        if filtered.is_err() {
            self.vcpu_run_state.set_and_notify(VmRunState::Exiting);
        }
        self.vcpu_barrier.wait();
        filtered?;
        Ok(())
    }

    fn kick_all(&self) {
        for h in &self.vcpu_handles {
            if !h.is_finished() {
                let _ = h.kill(kick_signal());
            }
        }
    }

    /// Pause every vCPU outside KVM_RUN (not once the VM is exiting); see
    /// [`RunControl::pause`].
    pub fn pause(&self) -> Result<Option<u64>, VmError> {
        self.control.pause()
    }

    /// Let paused vCPUs run again, the guest's clock where it was at the pause; see
    /// [`RunControl::resume`].
    pub fn resume(&self) -> Result<Option<u64>, VmError> {
        self.control.resume()
    }

    /// What another thread needs to pause and resume this VM.
    pub fn run_control(&self) -> Arc<RunControl> {
        self.control.clone()
    }

    /// Stop every vCPU: mark the state Exiting, kick each thread (SIGRTMIN, whose handler
    /// sets immediate_exit), and join them, waiting at most [`SHUTDOWN_TIMEOUT`].
    pub fn shutdown(&mut self) -> Result<(), VmError> {
        self.vcpu_run_state.set_and_notify(VmRunState::Exiting);
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let mut live = self.live.count.lock().unwrap_or_else(|p| p.into_inner());
        while *live > 0 {
            let now = Instant::now();
            if now >= deadline {
                let left = *live;
                return Err(VmError::ShutdownTimeout(left));
            }
            drop(live);
            self.kick_all();
            live = self.live.count.lock().unwrap_or_else(|p| p.into_inner());
            let wait = (deadline - now).min(Duration::from_millis(20));
            live = self
                .live
                .cv
                .wait_timeout_while(live, wait, |c| *c > 0)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(live);
        self.control.forget_threads();
        for h in self.vcpu_handles.drain(..) {
            let _ = h.join();
        }
        Ok(())
    }

    /// How many vCPU threads are still running.
    pub fn live_vcpus(&self) -> usize {
        *self.live.count.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if !self.vcpu_handles.is_empty() {
            let _ = self.shutdown();
        }
    }
}

/// Pause and resume for a thread other than the VM's owner (the control thread): the
/// shared run state, the vCPU threads to kick, the VM fd for the clock.
pub struct RunControl {
    fd: Arc<VmFd>,
    run_state: Arc<VcpuRunState>,
    /// The vCPU threads, while they can be signalled: emptied (under this lock) before
    /// they are joined, so a kick never names a thread that is gone.
    threads: Mutex<Vec<libc::pthread_t>>,
    /// KVM's clock when the VM was paused.
    clock: Mutex<Option<kvm_clock_data>>,
}

impl RunControl {
    /// A run control for a VM with no vCPU threads (unit tests of the control thread).
    #[cfg(test)]
    pub(crate) fn for_test(fd: Arc<VmFd>) -> Arc<Self> {
        Arc::new(RunControl {
            fd,
            run_state: Arc::new(VcpuRunState::default()),
            threads: Mutex::new(Vec::new()),
            clock: Mutex::new(None),
        })
    }

    fn add_thread(&self, t: libc::pthread_t) {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(t);
    }

    fn forget_threads(&self) {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Kick every vCPU thread out of KVM_RUN; the number of threads.
    fn kick(&self) -> usize {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.iter() {
            // SAFETY: `t` is a thread of this process that has not been joined or
            // detached (the list is emptied under this lock before that happens), so
            // its pthread_t is valid even if the thread has ended.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
        threads.len()
    }

    /// The VM's KVM clock (kvmclock's nanoseconds), KVM_GET_CLOCK.
    pub fn clock(&self) -> Result<u64, VmError> {
        self.fd
            .get_clock()
            .map(|c| c.clock)
            .map_err(|source| VmError::Kvm {
                what: "KVM_GET_CLOCK",
                source,
            })
    }

    /// Park every vCPU outside KVM_RUN (kicked out of the guest, waiting at most
    /// [`PAUSE_TIMEOUT`] for them), then read KVM's clock for the resume. `Ok(None)` if
    /// the VM was not running (paused already, or stopping); else the clock read.
    pub fn pause(&self) -> Result<Option<u64>, VmError> {
        if !self
            .run_state
            .transition(VmRunState::Running, VmRunState::Suspended)
        {
            return Ok(None);
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut parked = false;
        let mut vcpus = 0;
        while !parked {
            vcpus = self.kick();
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // A kick that landed before KVM_RUN is kept (immediate_exit); kick again
            // now and then all the same.
            parked = self
                .run_state
                .wait_parked(vcpus, (deadline - now).min(Duration::from_millis(20)));
            if self.run_state.get() != VmRunState::Suspended {
                return Ok(None);
            }
        }
        let clock = self.fd.get_clock().map_err(|source| VmError::Kvm {
            what: "KVM_GET_CLOCK",
            source,
        })?;
        let ns = clock.clock;
        *self.clock.lock().unwrap_or_else(|p| p.into_inner()) = Some(clock);
        if !parked {
            return Err(VmError::PauseTimeout {
                parked: self.run_state.parked(),
                vcpus,
            });
        }
        Ok(Some(ns))
    }

    /// Set KVM's clock back to its value at the pause (so the guest's time does not jump
    /// by the time it was paused) and let the vCPUs run. `Ok(None)` if the VM was not
    /// paused; else the clock set. The vCPUs run again even if the clock cannot be set.
    pub fn resume(&self) -> Result<Option<u64>, VmError> {
        if self.run_state.get() != VmRunState::Suspended {
            return Ok(None);
        }
        let saved = self.clock.lock().unwrap_or_else(|p| p.into_inner()).take();
        let set = match saved {
            None => Ok(None),
            Some(c) => {
                // Only the value: KVM_CLOCK_REALTIME would make KVM add the time elapsed.
                let c = kvm_clock_data {
                    clock: c.clock,
                    ..Default::default()
                };
                self.fd
                    .set_clock(&c)
                    .map(|()| Some(c.clock))
                    .map_err(|source| VmError::Kvm {
                        what: "KVM_SET_CLOCK",
                        source,
                    })
            }
        };
        self.run_state
            .transition(VmRunState::Suspended, VmRunState::Running);
        set
    }

    /// The shared run state.
    pub fn run_state(&self) -> VmRunState {
        self.run_state.get()
    }
}

/// vCPU threads leave process signals (SIGTERM, SIGINT, SIGHUP, SIGCHLD) to the others,
/// so those never interrupt KVM_RUN.
fn block_process_signals() {
    let set = SigSet::from_iter([
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ]);
    let _ = set.thread_block();
}

/// A stop reason kept for whoever waits on the VM; the first one wins.
#[derive(Default)]
pub struct StopLatch {
    reason: Mutex<Option<StopCause>>,
    cv: Condvar,
}

/// Why `run_vm` stops a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// A vCPU or device stopped it.
    Guest(StopReason),
    /// The process got this signal.
    Signal(i32),
    /// The control channel ended: the supervisor is gone (stopped as on SIGTERM).
    SupervisorGone,
}

impl StopLatch {
    /// Record `cause` unless one is there already.
    pub fn set(&self, cause: StopCause) {
        let mut g = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(cause);
        }
        self.cv.notify_all();
    }

    /// Wait for a cause.
    pub fn wait(&self) -> StopCause {
        let g = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let g = self
            .cv
            .wait_while(g, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone().unwrap_or(StopCause::Signal(0))
    }

    /// Wait at most `d` for a cause.
    pub fn wait_timeout(&self, d: Duration) -> Option<StopCause> {
        let g = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// The cause so far.
    pub fn get(&self) -> Option<StopCause> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ExitHandler for StopLatch {
    fn kick(&self, reason: StopReason) {
        self.set(StopCause::Guest(reason));
    }
}
