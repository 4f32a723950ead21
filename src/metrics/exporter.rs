//! The Prometheus exporter: a `Collector` that reads the fleet's state and every VM's
//! counter table at scrape time, served at `/metrics` by the bounded server in
//! [`super::http`].
//!
//! The supervisor hands the collector a fresh [`VmSnapshot`] list whenever something
//! changes; counters are read from the shared tables only when Prometheus scrapes.
//!
//! A shared table is written by a VM child, which may be compromised: what it holds is
//! untrusted. The collector exports at most the VM's configured vCPUs as rows, caps each
//! counter at one event per nanosecond of the table's life, and keeps a high-water mark
//! per exported `_total` series (`Mark`): a series never goes below what it last
//! exported, and when the supervisor replaces a corrupted table by a fresh one, what was
//! exported becomes a per-series base, so counting continues upward from there.
//!
//! At reexec the marks go to the new program ([`Exporter::held_marks`], then
//! [`Exporter::start_adopting`]), which reads the same tables: every `_total` series
//! continues where it was, with no reset and no jump.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::counters::{ExitCounters, ExitReason, KVM_STATS, MAX_VCPUS};
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

/// The high-water mark of one exported counter series.
///
/// The exported value is `base + source`, never below the last exported one. A source
/// that goes down in place (a child rewrote its table) holds the series where it was; a
/// source replaced by a fresh one ([`Mark::rebase`]) counts on from there. The base moves
/// only at a replacement, so a child that writes its table up and down cannot pump it.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Mark {
    base: u64,
    last: u64,
}

impl Mark {
    /// The source was replaced by a new one counting from zero: continue from here.
    fn rebase(&mut self) {
        self.base = self.last;
    }

    /// The value to export when the source reads `cur`.
    fn next(&mut self, cur: u64) -> u64 {
        self.last = self.last.max(self.base.saturating_add(cur));
        self.last
    }
}

/// Every mark of one VM.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct VmMarks {
    /// The table the per-vCPU marks follow ([`ExitCounters::id`]; ids are this
    /// process's, so they are not handed over).
    #[serde(skip)]
    table: Option<u64>,
    /// Handed over at reexec: the first table seen is the one the marks followed in the
    /// old program (the same memfd, under a new id), not a replacement.
    #[serde(skip)]
    adopted: bool,
    exits: Vec<[Mark; ExitReason::COUNT]>,
    kvm: Vec<[Mark; KVM_STATS.len()]>,
    restarts: Mark,
    console_dropped: Mark,
    /// The last scrape that saw this VM (VMs gone from the fleet are dropped).
    #[serde(skip)]
    seen: u64,
}

/// The exporter's high-water marks of every VM, as handed to the next program at
/// reexec (opaque: serialized into the handover).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct HeldMarks {
    vms: HashMap<String, VmMarks>,
}

/// Every VM's marks, by name, and the number of the current scrape.
#[derive(Debug, Default)]
struct Marks {
    scrape: u64,
    vms: HashMap<String, VmMarks>,
}

impl VmMarks {
    fn rows(&mut self, n: usize) {
        if self.exits.len() < n {
            self.exits.resize(n, Default::default());
            self.kvm.resize(n, Default::default());
        }
    }
}

/// The boot stage of a table (ns since the child started) as seconds, if it is sane: set,
/// and no later than the current run has lasted (plus a second of clock slack).
fn boot_seconds(ns: u64, run_start_unix: Option<f64>, now_unix: f64) -> Option<f64> {
    let age = now_unix - run_start_unix?;
    let s = ns as f64 / 1e9;
    (ns > 0 && age.is_finite() && s <= age + 1.0).then_some(s)
}

/// The collector registered with the exporter's registry.
pub struct FleetCollector {
    fleet: Arc<FleetMetrics>,
    descs: Vec<Desc>,
    /// High-water marks by VM name; VMs gone from the fleet are dropped.
    marks: Arc<Mutex<Marks>>,
}

impl FleetCollector {
    /// A collector over `fleet`.
    pub fn new(fleet: Arc<FleetMetrics>) -> Result<Self, prometheus::Error> {
        Self::with_marks(fleet, HeldMarks::default())
    }

    /// A collector over `fleet` that continues from `held` (handed over at reexec).
    pub fn with_marks(
        fleet: Arc<FleetMetrics>,
        held: HeldMarks,
    ) -> Result<Self, prometheus::Error> {
        let f = Families::new()?;
        let descs = f
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(FleetCollector {
            fleet,
            descs,
            marks: Arc::new(Mutex::new(Marks {
                scrape: 0,
                vms: held
                    .vms
                    .into_iter()
                    .map(|(n, mut m)| {
                        m.adopted = true;
                        (n, m)
                    })
                    .collect(),
            })),
        })
    }

    /// Every VM's marks as they stand (the scrapes' lock is held while they are copied).
    fn held(marks: &Mutex<Marks>) -> HeldMarks {
        let all = marks.lock().unwrap_or_else(|p| p.into_inner());
        HeldMarks {
            vms: all
                .vms
                .iter()
                .map(|(n, m)| {
                    (
                        n.clone(),
                        VmMarks {
                            table: None,
                            adopted: false,
                            exits: m.exits.clone(),
                            kvm: m.kvm.clone(),
                            restarts: m.restarts,
                            console_dropped: m.console_dropped,
                            seen: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    fn build(&self) -> Result<Vec<MetricFamily>, prometheus::Error> {
        let f = Families::new()?;
        let snapshot = self.fleet.snapshot();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        // Held for the whole scrape: concurrent scrapes must not interleave their marks.
        let mut all = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        all.scrape += 1;
        let scrape = all.scrape;
        for vm in &snapshot {
            let n = vm.name.as_str();
            if !all.vms.contains_key(n) {
                all.vms.insert(vm.name.clone(), VmMarks::default());
            }
            let Some(marks) = all.vms.get_mut(n) else {
                continue;
            };
            marks.seen = scrape;
            if let Some(t) = &vm.counters {
                Self::vcpu_rows(&f, n, vm, t, marks);
            }
            f.up.with_label_values(&[n]).set(i64::from(vm.up));
            f.restarts
                .with_label_values(&[n])
                .inc_by(marks.restarts.next(vm.restarts));
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
                let v = marks
                    .console_dropped
                    .next(d.load(std::sync::atomic::Ordering::Relaxed));
                f.console_dropped.with_label_values(&[n]).inc_by(v);
            }
            let (console, up) = vm
                .counters
                .as_ref()
                .filter(|t| t.magic_ok())
                .map_or((0, 0), |t| t.boot_ns());
            for (stage, ns) in [("first_console_byte", console), ("userspace_up", up)] {
                if let Some(s) = boot_seconds(ns, vm.start_time, now_unix) {
                    f.boot.with_label_values(&[n, stage]).set(s);
                }
            }
        }
        all.vms.retain(|_, m| m.seen == scrape);
        drop(all);
        Ok(f.collectors().iter().flat_map(|c| c.collect()).collect())
    }

    /// The per-vCPU series of one VM: at most its configured vCPUs, rows once exported
    /// kept, every value through its mark. A table whose magic is gone is not read: its
    /// series hold their last values until the supervisor replaces it.
    fn vcpu_rows(f: &Families, n: &str, vm: &VmSnapshot, t: &ExitCounters, marks: &mut VmMarks) {
        let spec = usize::try_from(vm.vcpus)
            .unwrap_or(usize::MAX)
            .min(MAX_VCPUS);
        let readable = t.magic_ok();
        let header = if readable {
            usize::try_from(t.header_vcpus()).unwrap_or(usize::MAX)
        } else {
            0
        };
        let rows = header.max(marks.exits.len()).min(spec);
        marks.rows(rows);
        if marks.table != Some(t.id()) && std::mem::take(&mut marks.adopted) {
            // The table the old program's marks followed, handed over with them.
            marks.table = Some(t.id());
        }
        if marks.table != Some(t.id()) {
            // A new table (the old one was found corrupted and replaced): it counts from
            // zero, on top of everything exported so far.
            marks.table = Some(t.id());
            for m in marks.exits.iter_mut().flatten() {
                m.rebase();
            }
            for m in marks.kvm.iter_mut().flatten() {
                m.rebase();
            }
        }
        let max = t.plausible_max();
        let read = |v: u64| readable.then_some(v.min(max));
        for vcpu in 0..rows {
            let vs = vcpu.to_string();
            for r in ExitReason::ALL {
                let m = &mut marks.exits[vcpu][r as usize];
                let v = read(t.get(vcpu, r)).map_or(m.last, |c| m.next(c));
                f.exits.with_label_values(&[n, &vs, r.name()]).inc_by(v);
            }
            let mut k = f.kvm.iter();
            for (s, name) in KVM_STATS.iter().enumerate() {
                let m = &mut marks.kvm[vcpu][s];
                let v = read(t.kvm_stat(vcpu, s)).map_or(m.last, |c| m.next(c));
                if *name == "halt_wait_ns" {
                    f.halt_wait
                        .with_label_values(&[n, &vs])
                        .inc_by(v as f64 / 1e9);
                } else if let Some(c) = k.next() {
                    c.with_label_values(&[n, &vs]).inc_by(v);
                }
            }
        }
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
    marks: Arc<Mutex<Marks>>,
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
        Self::start_adopting(addr, fleet, log, limits, None)
    }

    /// [`Exporter::start_with`] for a program started by reexec: the old program's
    /// listening socket (`listener.0`, asked for `addr`) and marks (`listener.1`).
    pub fn start_adopting(
        addr: SocketAddr,
        fleet: Arc<FleetMetrics>,
        log: LogFn,
        limits: Limits,
        handed: Option<(Option<OwnedFd>, HeldMarks)>,
    ) -> Result<Self, ExporterError> {
        let (listener, held) = handed.unwrap_or_default();
        let registry = Registry::new();
        let collector = FleetCollector::with_marks(fleet, held)?;
        let marks = collector.marks.clone();
        registry.register(Box::new(collector))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let render = Arc::new(move || render(&registry));
        let server = HttpServer::start_adopting(addr, listener, render, log, limits)?;
        Ok(Exporter { server, marks })
    }

    /// Before a reexec: stop accepting scrapes (they wait in the backlog for the next
    /// program) and let those in progress finish, at most `limit` (see
    /// [`HttpServer::drain`]).
    pub fn drain(&self, limit: std::time::Duration) -> bool {
        self.server.drain(limit)
    }

    /// Accept scrapes again (the reexec failed).
    pub fn undrain(&self) {
        self.server.undrain();
    }

    /// The marks of every `_total` series, for the next program at reexec.
    pub fn held_marks(&self) -> HeldMarks {
        FleetCollector::held(&self.marks)
    }

    /// A copy of the listening socket and its asked-for address (see
    /// [`HttpServer::listener`]).
    pub fn listener(&self) -> Option<(OwnedFd, SocketAddr)> {
        self.server.listener()
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
    use crate::metrics::counters::SharedTable;
    use std::collections::BTreeMap;

    fn snapshot(name: &str, vcpus: u64, t: &SharedTable) -> VmSnapshot {
        snapshot_with(name, vcpus, t, None)
    }

    fn snapshot_with(
        name: &str,
        vcpus: u64,
        t: &SharedTable,
        dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> VmSnapshot {
        VmSnapshot {
            name: name.into(),
            up: true,
            state: "running",
            restarts: 1,
            start_time: Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
                    - 0.5,
            ),
            last_exit_code: None,
            memory_bytes: 32 << 20,
            vcpus,
            counters: Some(t.counters().clone()),
            console_dropped: dropped,
        }
    }

    /// Every `_total` series of a scrape: name{labels} -> value.
    fn totals(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains("_total{"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn registry(fleet: Arc<FleetMetrics>) -> Registry {
        let r = Registry::new();
        r.register(Box::new(FleetCollector::new(fleet).unwrap()))
            .unwrap();
        r
    }

    /// A child's view of the table, and the file a hostile one writes through.
    fn child_of(t: &SharedTable) -> (ExitCounters, std::fs::File) {
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&t.fd()));
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        (ExitCounters::open_shared_fd(open().into()).unwrap(), open())
    }

    /// Overwrite the whole table with xorshift bytes; `magic` kept or not.
    fn garble(f: &std::fs::File, seed: u64, keep_magic: bool) {
        use std::os::unix::fs::FileExt;
        let len = f.metadata().unwrap().len() as usize;
        let mut x = seed | 1;
        let mut bytes = Vec::with_capacity(len);
        while bytes.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.truncate(len);
        if keep_magic {
            bytes[..8].copy_from_slice(&0x766d_6d66_6c74_0001u64.to_le_bytes());
        }
        bytes[8..16].copy_from_slice(&255u64.to_le_bytes()); // vcpus = 255
        f.write_all_at(&bytes, 0).unwrap();
    }

    fn vcpu_labels(text: &str) -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.split("vcpu=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect()
    }

    #[test]
    fn a_garbled_table_gives_clamped_monotonic_series_and_a_replacement_counts_on() {
        let fleet = FleetMetrics::new(&["running"]);
        let t = SharedTable::create("g").unwrap();
        let (child, file) = child_of(&t);
        child.set_vcpus(2);
        for _ in 0..40 {
            child.add(0, ExitReason::IoOut);
        }
        child.add(1, ExitReason::Hlt);
        child.set_kvm_stat(1, 0, 25);
        child.mark_first_console(1_000);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(5));
        fleet.update(vec![snapshot_with("g", 2, &t, Some(dropped.clone()))]);
        let reg = registry(fleet.clone());
        let first = totals(&String::from_utf8(render(&reg)).unwrap());
        let io0 = "vmm_fleet_vcpu_exits_total{reason=\"io_out\",vcpu=\"0\",vm=\"g\"}";
        assert_eq!(first[io0], 40.0);
        // Per-vCPU series, restarts and dropped console bytes.
        assert_eq!(first.len(), 2 * (ExitReason::COUNT + KVM_STATS.len()) + 2);

        // Garbage with the magic intact: read, but clamped.
        for seed in [1, 0x9e37_79b9_7f4a_7c15, 42] {
            let before = totals(&String::from_utf8(render(&reg)).unwrap());
            garble(&file, seed, true);
            let text = String::from_utf8(render(&reg)).unwrap();
            let age = t.counters().plausible_max() as f64;
            let after = totals(&text);
            assert!(vcpu_labels(&text).iter().all(|v| *v < 2), "{text}");
            for (k, v) in &before {
                let a = after.get(k).unwrap_or_else(|| panic!("{k} vanished"));
                assert!(a >= v, "{k} went down: {v} -> {a}");
                assert!(*a <= age, "{k} = {a}: more than one event per ns");
            }
            assert!(
                !text.contains("vmm_fleet_vm_boot_seconds"),
                "an absurd boot time was exported:\n{text}"
            );
        }

        // Counters lowered and the magic gone: every series holds its value (the dropped
        // bytes counter too, were it ever to go down).
        let before = totals(&String::from_utf8(render(&reg)).unwrap());
        garble(&file, 7, false);
        dropped.store(1, std::sync::atomic::Ordering::Relaxed);
        let text = String::from_utf8(render(&reg)).unwrap();
        assert_eq!(totals(&text), before);
        assert!(vcpu_labels(&text).iter().all(|v| *v < 2));

        // The supervisor replaces the table; the new child counts on top.
        let fresh = SharedTable::create("g").unwrap();
        let (child2, _f) = child_of(&fresh);
        child2.set_vcpus(2);
        for _ in 0..3 {
            child2.add(0, ExitReason::IoOut);
        }
        fleet.update(vec![snapshot_with("g", 2, &fresh, Some(dropped.clone()))]);
        let again = totals(&String::from_utf8(render(&reg)).unwrap());
        assert_eq!(again[io0], before[io0] + 3.0);
        for (k, v) in &before {
            assert!(again[k] >= *v, "{k} went down after the replacement");
        }
        child2.add(0, ExitReason::IoOut);
        let more = totals(&String::from_utf8(render(&reg)).unwrap());
        assert_eq!(more[io0], before[io0] + 4.0);
    }

    #[test]
    fn rows_are_capped_by_the_spec_and_a_removed_vm_is_forgotten() {
        let fleet = FleetMetrics::new(&["running"]);
        let t = SharedTable::create("cap").unwrap();
        let (child, _f) = child_of(&t);
        child.set_vcpus(200);
        child.add(150, ExitReason::IoIn);
        fleet.update(vec![snapshot("cap", 4, &t)]);
        let reg = registry(fleet.clone());
        let text = String::from_utf8(render(&reg)).unwrap();
        let labels = vcpu_labels(&text);
        assert_eq!(labels.iter().max(), Some(&3), "{text}");
        fleet.update(vec![]);
        let text = String::from_utf8(render(&reg)).unwrap();
        assert!(!text.contains("vm=\"cap\""));
    }

    #[test]
    fn a_boot_time_longer_than_the_run_is_not_exported() {
        assert_eq!(boot_seconds(0, Some(100.0), 200.0), None);
        assert_eq!(boot_seconds(2_000_000_000, Some(100.0), 200.0), Some(2.0));
        assert_eq!(boot_seconds(u64::MAX, Some(100.0), 200.0), None);
        assert_eq!(boot_seconds(5_000_000_000, None, 200.0), None);
        assert_eq!(boot_seconds(1, Some(f64::NAN), 200.0), None);
    }

    #[test]
    fn held_marks_continue_every_series_over_the_same_table_without_a_jump() {
        let table = SharedTable::create("held").unwrap();
        let (child, _file) = child_of(&table);
        child.set_vcpus(1);
        for _ in 0..5 {
            child.add(0, ExitReason::IoOut);
        }
        let fleet = FleetMetrics::new(&["running"]);
        fleet.update(vec![snapshot("held", 1, &table)]);
        let old = FleetCollector::new(fleet.clone()).unwrap();
        let r = Registry::new();
        let _ = old.build().unwrap();
        let held = FleetCollector::held(&old.marks);
        let json = serde_json::to_string(&held).unwrap();
        // The new program: the same memfd, mapped again (another table id).
        let adopted = SharedTable::adopt(
            table.fd().try_clone_to_owned().unwrap(),
            table.age(),
            table.handed_vcpus(),
        )
        .unwrap();
        child.add(0, ExitReason::IoOut);
        let fleet2 = FleetMetrics::new(&["running"]);
        fleet2.update(vec![snapshot("held", 1, &adopted)]);
        let new = FleetCollector::with_marks(fleet2, serde_json::from_str(&json).unwrap()).unwrap();
        r.register(Box::new(new)).unwrap();
        let t = totals(&String::from_utf8(render(&r)).unwrap());
        let io = r#"vmm_fleet_vcpu_exits_total{reason="io_out",vcpu="0",vm="held"}"#;
        assert_eq!(t.get(io), Some(&6.0), "continued, not reset, not doubled");
    }

    #[test]
    fn a_mark_holds_on_a_drop_and_counts_on_after_a_rebase() {
        let mut m = Mark::default();
        assert_eq!(m.next(10), 10);
        assert_eq!(m.next(3), 10); // rewritten lower: held
        assert_eq!(m.next(12), 12);
        assert_eq!(m.next(0), 12);
        assert_eq!(m.next(3), 12); // no pumping: up and down does not add
        m.rebase(); // a fresh source
        assert_eq!(m.next(0), 12);
        assert_eq!(m.next(5), 17);
        assert_eq!(m.next(u64::MAX), u64::MAX); // saturates, no overflow
    }
}
