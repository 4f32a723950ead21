//! The Prometheus exporter: a `Collector` that reads the fleet's state and every VM's
//! counter table at scrape time, served at `/metrics` by the bounded server in
//! [`super::http`].
//!
//! The supervisor hands the collector a fresh [`VmSnapshot`] list whenever something
//! changes; counters are read from the shared tables only when Prometheus scrapes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::counters::{ExitCounters, ExitReason, KVM_STATS};
use super::http::{AddressHandle, HttpError, HttpServer, Limits, LogFn};

/// What the exporter knows of one VM.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    /// VM name.
    pub name: String,
    /// Whether its child process runs.
    pub up: bool,
    /// Its lifecycle state (one of the exporter's state names).
    pub state: &'static str,
    /// Restarts so far.
    pub restarts: u64,
    /// Unix time its current (or last) child started.
    pub start_time: Option<f64>,
    /// The last child's exit code (128+N for death by signal N).
    pub last_exit_code: Option<i64>,
    /// Configured memory.
    pub memory_bytes: u64,
    /// Configured vCPUs.
    pub vcpus: u64,
    /// Its counter table (None if it could not be made: the VM is still reported).
    pub counters: Option<Arc<ExitCounters>>,
    /// Bytes of its console/log output the supervisor dropped (rate limit), read at
    /// scrape time; None when its output is not captured.
    pub console_dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// The fleet as last published by the supervisor.
pub struct FleetMetrics {
    vms: Mutex<Vec<VmSnapshot>>,
    states: &'static [&'static str],
}

impl FleetMetrics {
    /// An empty fleet whose VMs can be in any of `states`.
    pub fn new(states: &'static [&'static str]) -> Arc<Self> {
        Arc::new(FleetMetrics {
            vms: Mutex::new(Vec::new()),
            states,
        })
    }

    /// Replace the snapshot.
    pub fn update(&self, vms: Vec<VmSnapshot>) {
        *self.vms.lock().unwrap_or_else(|p| p.into_inner()) = vms;
    }

    fn snapshot(&self) -> Vec<VmSnapshot> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Metric families, built fresh at each scrape from the snapshot and the tables.
struct Families {
    exits: IntCounterVec,
    kvm: Vec<IntCounterVec>,
    halt_wait: prometheus::CounterVec,
    up: IntGaugeVec,
    restarts: IntCounterVec,
    state: IntGaugeVec,
    start_time: GaugeVec,
    last_exit: IntGaugeVec,
    memory: IntGaugeVec,
    vcpus: IntGaugeVec,
    boot: GaugeVec,
    console_dropped: IntCounterVec,
}

fn kvm_family_name(stat: &str) -> String {
    format!("vmm_fleet_kvm_vcpu_{stat}_total")
}

impl Families {
    fn new() -> Result<Self, prometheus::Error> {
        let vv = &["vm", "vcpu"];
        let kvm = KVM_STATS
            .iter()
            .filter(|s| **s != "halt_wait_ns")
            .map(|s| {
                IntCounterVec::new(
                    Opts::new(
                        kvm_family_name(s),
                        format!("KVM's own per-vCPU statistic `{s}` (binary stats fd), cumulative over the VM's runs."),
                    ),
                    vv,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Families {
            exits: IntCounterVec::new(
                Opts::new(
                    "vmm_fleet_vcpu_exits_total",
                    "vCPU exits that reached the VMM, by reason; monotonic across restarts of the VM.",
                ),
                &["vm", "vcpu", "reason"],
            )?,
            kvm,
            halt_wait: prometheus::CounterVec::new(
                Opts::new(
                    "vmm_fleet_kvm_vcpu_halt_wait_seconds_total",
                    "Time vCPUs spent halted inside KVM (KVM statistic halt_wait_ns).",
                ),
                vv,
            )?,
            up: IntGaugeVec::new(
                Opts::new("vmm_fleet_vm_up", "1 when the VM's process runs."),
                &["vm"],
            )?,
            restarts: IntCounterVec::new(
                Opts::new(
                    "vmm_fleet_vm_restarts_total",
                    "Times the supervisor restarted the VM.",
                ),
                &["vm"],
            )?,
            state: IntGaugeVec::new(
                Opts::new(
                    "vmm_fleet_vm_state",
                    "1 for the VM's current lifecycle state.",
                ),
                &["vm", "state"],
            )?,
            start_time: GaugeVec::new(
                Opts::new(
                    "vmm_fleet_vm_start_time_seconds",
                    "Unix time the VM's current or last process started.",
                ),
                &["vm"],
            )?,
            last_exit: IntGaugeVec::new(
                Opts::new(
                    "vmm_fleet_vm_last_exit_code",
                    "Exit code of the VM's last process (128+N: killed by signal N).",
                ),
                &["vm"],
            )?,
            memory: IntGaugeVec::new(
                Opts::new("vmm_fleet_vm_memory_bytes", "Configured guest memory."),
                &["vm"],
            )?,
            vcpus: IntGaugeVec::new(
                Opts::new("vmm_fleet_vm_vcpus", "Configured vCPUs."),
                &["vm"],
            )?,
            boot: GaugeVec::new(
                Opts::new(
                    "vmm_fleet_vm_boot_seconds",
                    "From the VM process's start to the guest's first console byte, and to its userspace-up signal (0x41 on port 0x80).",
                ),
                &["vm", "stage"],
            )?,
            console_dropped: IntCounterVec::new(
                Opts::new(
                    "vmm_fleet_console_dropped_bytes_total",
                    "Bytes of the VM's console and VMM log output dropped by the supervisor for going faster than console_rate_kib_s (or failing to be written).",
                ),
                &["vm"],
            )?,
        })
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        let mut v: Vec<&dyn Collector> = vec![
            &self.exits,
            &self.halt_wait,
            &self.up,
            &self.restarts,
            &self.state,
            &self.start_time,
            &self.last_exit,
            &self.memory,
            &self.vcpus,
            &self.boot,
            &self.console_dropped,
        ];
        v.extend(self.kvm.iter().map(|c| c as &dyn Collector));
        v
    }
}

/// The collector registered with the exporter's registry.
pub struct FleetCollector {
    fleet: Arc<FleetMetrics>,
    descs: Vec<Desc>,
}

impl FleetCollector {
    /// A collector over `fleet`.
    pub fn new(fleet: Arc<FleetMetrics>) -> Result<Self, prometheus::Error> {
        let f = Families::new()?;
        let descs = f
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(FleetCollector { fleet, descs })
    }

    fn build(&self) -> Result<Vec<MetricFamily>, prometheus::Error> {
        let f = Families::new()?;
        for vm in self.fleet.snapshot() {
            let n = vm.name.as_str();
            let vcpus = vm.counters.as_ref().map_or(0, |t| t.vcpus());
            for (t, vcpu) in vm
                .counters
                .iter()
                .flat_map(|t| (0..vcpus).map(move |v| (t, v)))
            {
                let vs = vcpu.to_string();
                for r in ExitReason::ALL {
                    f.exits
                        .with_label_values(&[n, &vs, r.name()])
                        .inc_by(t.get(vcpu, r));
                }
                let mut k = f.kvm.iter();
                for (s, name) in KVM_STATS.iter().enumerate() {
                    let v = t.kvm_stat(vcpu, s);
                    if *name == "halt_wait_ns" {
                        f.halt_wait
                            .with_label_values(&[n, &vs])
                            .inc_by(v as f64 / 1e9);
                    } else if let Some(c) = k.next() {
                        c.with_label_values(&[n, &vs]).inc_by(v);
                    }
                }
            }
            f.up.with_label_values(&[n]).set(i64::from(vm.up));
            f.restarts.with_label_values(&[n]).inc_by(vm.restarts);
            for s in self.fleet.states {
                f.state
                    .with_label_values(&[n, s])
                    .set(i64::from(*s == vm.state));
            }
            if let Some(st) = vm.start_time {
                f.start_time.with_label_values(&[n]).set(st);
            }
            if let Some(c) = vm.last_exit_code {
                f.last_exit.with_label_values(&[n]).set(c);
            }
            f.memory.with_label_values(&[n]).set(vm.memory_bytes as i64);
            f.vcpus.with_label_values(&[n]).set(vm.vcpus as i64);
            if let Some(d) = &vm.console_dropped {
                f.console_dropped
                    .with_label_values(&[n])
                    .inc_by(d.load(std::sync::atomic::Ordering::Relaxed));
            }
            let (console, up) = vm.counters.as_ref().map_or((0, 0), |t| t.boot_ns());
            if console > 0 {
                f.boot
                    .with_label_values(&[n, "first_console_byte"])
                    .set(console as f64 / 1e9);
            }
            if up > 0 {
                f.boot
                    .with_label_values(&[n, "userspace_up"])
                    .set(up as f64 / 1e9);
            }
        }
        Ok(f.collectors().iter().flat_map(|c| c.collect()).collect())
    }
}

impl Collector for FleetCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.build().unwrap_or_default()
    }
}

/// Errors starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The registry refused a collector.
    #[error("metrics registry: {0}")]
    Registry(#[from] prometheus::Error),
    /// The HTTP server could not be started (binding is not an error: it is retried).
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// The running `/metrics` endpoint (see [`super::http`] for its limits).
pub struct Exporter {
    server: HttpServer,
}

/// Render the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    buf
}

impl Exporter {
    /// Serve `/metrics` for `fleet` (plus this process's `process_*` metrics) on `addr`.
    /// A bind failure is logged through `log` and retried, never returned.
    pub fn start(
        addr: SocketAddr,
        fleet: Arc<FleetMetrics>,
        log: LogFn,
    ) -> Result<Self, ExporterError> {
        Self::start_with(addr, fleet, log, Limits::default())
    }

    /// [`Exporter::start`] with other HTTP limits (e.g. no page reuse, for a benchmark).
    pub fn start_with(
        addr: SocketAddr,
        fleet: Arc<FleetMetrics>,
        log: LogFn,
        limits: Limits,
    ) -> Result<Self, ExporterError> {
        let registry = Registry::new();
        registry.register(Box::new(FleetCollector::new(fleet)?))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let server =
            HttpServer::start_with(addr, Arc::new(move || render(&registry)), log, limits)?;
        Ok(Exporter { server })
    }

    /// The address bound (the real port with port 0); `None` while a bind is retried.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.addr()
    }

    /// A handle to move the endpoint to another address (at a reload).
    pub fn address_handle(&self) -> AddressHandle {
        self.server.address_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_follow_the_naming_rules_and_read_the_tables() {
        let fleet = FleetMetrics::new(&["running", "failed"]);
        let t = Arc::new(ExitCounters::new(2));
        for _ in 0..7 {
            t.add(1, ExitReason::IoOut);
        }
        t.set_kvm_stat(0, 6, 2_500_000_000);
        t.mark_first_console(1_000_000);
        fleet.update(vec![VmSnapshot {
            name: "web".into(),
            up: true,
            state: "running",
            restarts: 2,
            start_time: Some(1.7e9),
            last_exit_code: Some(137),
            memory_bytes: 32 << 20,
            vcpus: 2,
            counters: Some(t),
            console_dropped: Some(Arc::new(std::sync::atomic::AtomicU64::new(42))),
        }]);
        let registry = Registry::new();
        registry
            .register(Box::new(FleetCollector::new(fleet).unwrap()))
            .unwrap();
        let text = String::from_utf8(render(&registry)).unwrap();
        for want in [
            "vmm_fleet_vcpu_exits_total{reason=\"io_out\",vcpu=\"1\",vm=\"web\"} 7",
            "vmm_fleet_vcpu_exits_total{reason=\"io_out\",vcpu=\"0\",vm=\"web\"} 0",
            "vmm_fleet_kvm_vcpu_halt_wait_seconds_total{vcpu=\"0\",vm=\"web\"} 2.5",
            "vmm_fleet_kvm_vcpu_exits_total{vcpu=\"1\",vm=\"web\"} 0",
            "vmm_fleet_vm_up{vm=\"web\"} 1",
            "vmm_fleet_vm_restarts_total{vm=\"web\"} 2",
            "vmm_fleet_vm_state{state=\"running\",vm=\"web\"} 1",
            "vmm_fleet_vm_state{state=\"failed\",vm=\"web\"} 0",
            "vmm_fleet_vm_last_exit_code{vm=\"web\"} 137",
            "vmm_fleet_vm_memory_bytes{vm=\"web\"} 33554432",
            "vmm_fleet_vm_vcpus{vm=\"web\"} 2",
            "vmm_fleet_console_dropped_bytes_total{vm=\"web\"} 42",
            "vmm_fleet_vm_boot_seconds{stage=\"first_console_byte\",vm=\"web\"} 0.001",
            "# TYPE vmm_fleet_vcpu_exits_total counter",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("stage=\"userspace_up\""));
    }
}
