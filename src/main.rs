//! The `vmm-fleet` command line: maps subcommands to the library and errors to exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode as ProcessExit;
use std::sync::Arc;
use std::sync::mpsc;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vmm_fleet::config::{FleetSettings, VmSpec, VmUser};
use vmm_fleet::control::{Command as Wire, cli};
use vmm_fleet::metrics::exporter::{Exporter, FleetMetrics};
use vmm_fleet::metrics::http::{AddressHandle, LogFn};
use vmm_fleet::protocol::ExitCode;
use vmm_fleet::supervisor::control::ControlServer;
use vmm_fleet::supervisor::output::OutputHub;
use vmm_fleet::supervisor::reexec::{self, ReexecContext};
use vmm_fleet::supervisor::spawn::ProcessSpawner;
use vmm_fleet::supervisor::{Event, EventLog, FleetSource, STATE_NAMES, Supervisor, handover};
use vmm_fleet::vm::jail::{self, Ids, Jail, OpenedVm};
use vmm_fleet::vm::seccomp::{SeccompMode, ThreadKind, spawn_filtered};
use vmm_fleet::vm::{RunningVm, StopCause, StopLatch, host_memory_mib, run_to_end};

#[derive(Parser)]
#[command(
    name = "vmm-fleet",
    version,
    about = "Run a fleet of KVM virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every VM in DIR (one *.yaml file each), restart them under their policies,
    /// stop them all on SIGTERM/SIGINT, reload DIR on SIGHUP.
    Up {
        /// The directory of VM files.
        dir: PathBuf,
        /// Fleet settings file (default: DIR/fleet.yaml when it exists).
        #[arg(long)]
        settings: Option<PathBuf>,
        /// Log directory when the settings name none.
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Where /metrics is served (overrides the settings' metrics_address, and a change of
        /// it at SIGHUP is then refused with a message; port 0 picks a free port).
        #[arg(long)]
        metrics_address: Option<std::net::SocketAddr>,
        /// The control socket to listen on (default: $RUNTIME_DIRECTORY/control.sock
        /// under systemd, else LOG_DIR/control.sock).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Set by a reexec: the fd of the state handed over by the program this one
        /// replaces (the VMs run on; nothing is started).
        #[arg(long, hide = true)]
        resume_fd: Option<i32>,
    },
    /// Show every VM (or VM NAME): state, pid, uptime, restarts, last exit, vCPUs,
    /// memory, console file.
    Status {
        /// The VM (default: every VM).
        name: Option<String>,
        /// JSON (an array of objects with the same fields) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Stop VM NAME gracefully (Ctrl-Alt-Del, then the grace period, then SIGTERM and
    /// SIGKILL); it stays stopped, through reloads, until `start`.
    Stop(VmArg),
    /// Start VM NAME (stopped, or waiting to restart).
    Start(VmArg),
    /// Stop VM NAME gracefully, then start it again.
    Restart(VmArg),
    /// Kill VM NAME at once (SIGKILL, no grace); it stays stopped until `start`.
    Kill(VmArg),
    /// Park VM NAME's vCPUs.
    Pause(VmArg),
    /// Run VM NAME's parked vCPUs again.
    Resume(VmArg),
    /// Clear VM NAME's start limit (state `failed`) and start it.
    ResetFailed(VmArg),
    /// Reread the VM directory (as SIGHUP) and say what changed, or why nothing did.
    Reload {
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Re-execute the supervisor's binary (an upgrade), every VM kept running.
    Reexec {
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Print the handover formats this binary reads (asked by a running fleet before it
    /// reexecs into this binary); one JSON line.
    HandoverFormats,
    /// Check every file in DIR and list every problem; exit 0 if all are valid, 1 if not.
    Validate {
        /// The directory of VM files.
        dir: PathBuf,
        /// Fleet settings file (default: DIR/fleet.yaml when it exists).
        #[arg(long)]
        settings: Option<PathBuf>,
    },
    /// Attach to a VM's serial console: what the guest prints, live, and keystrokes
    /// into it (one writer at a time; others watch read-only). Ctrl-] detaches.
    Console {
        /// The VM.
        name: String,
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Print a VM's console file; with -f, keep printing what the VM prints.
    Logs {
        /// The VM.
        name: String,
        /// Follow: keep printing new output until interrupted.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Run one VM from its YAML file until the guest stops or SIGTERM/SIGINT arrives.
    RunVm {
        /// The VM's YAML file.
        file: PathBuf,
        /// The VM's name (set by the supervisor so `ps` shows it).
        #[arg(long)]
        vm: Option<String>,
        /// Die with this supervisor (set by the supervisor).
        #[arg(long)]
        supervisor_pid: Option<u32>,
        /// Fleet settings whose defaults apply to this VM.
        #[arg(long)]
        settings: Option<PathBuf>,
        /// The shared exit-counter table the supervisor made for this VM, as an
        /// inherited fd.
        #[arg(long)]
        counters_fd: Option<i32>,
        /// The control channel the supervisor made for this VM, as an inherited fd
        /// (a SOCK_SEQPACKET socket; EOF on it stops the VM).
        #[arg(long)]
        control_fd: Option<i32>,
        /// Run the VM as this uid (set by a supervisor running as root).
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        /// Run the VM as this gid.
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// The VM's only supplementary group (kvm).
        #[arg(long, requires = "uid")]
        kvm_gid: Option<u32>,
        /// Read the VM's validated spec from stdin (set by the supervisor); FILE then
        /// only names it.
        #[arg(long)]
        spec_stdin: bool,
        /// The supervisor's version of the wire to its children (arguments, spec on
        /// stdin, counter table, control channel); refused unless it is this binary's.
        #[arg(long)]
        wire_version: Option<u32>,
        /// Seccomp filters on every thread of the VM process (the supervisor passes the
        /// fleet setting `seccomp` through); `off` only for debugging.
        #[arg(long, value_enum, default_value_t = OnOff::On)]
        seccomp: OnOff,
    },
}

/// Where a control command finds the daemon.
#[derive(clap::Args)]
struct ControlArg {
    /// The control socket (default: $VMM_FLEET_CONTROL, else the packaged service's
    /// /run/vmm-fleet/control.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

/// A per-VM control command's arguments.
#[derive(clap::Args)]
struct VmArg {
    /// The VM.
    name: String,
    #[command(flatten)]
    ctl: ControlArg,
}

/// A switch given as `on` or `off`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl From<OnOff> for SeccompMode {
    fn from(v: OnOff) -> Self {
        match v {
            OnOff::On => SeccompMode::On,
            OnOff::Off => SeccompMode::Off,
        }
    }
}

/// Spawner threads of `up` (see `supervisor::pool`). Measured on 2 cores (1000 VMs, all
/// heartbeating, `cargo bench --bench fleet_scale`): with fork, 1 thread 6.2 s, 2 threads
/// 6.2 s, 4 threads 6.4 s; with posix_spawn, 1 and 2 threads alike. The host's CPU is
/// saturated during a start-up (about 9 ms of CPU per VM: its process, its guest's
/// emulated boot, the supervisor's share), so a pool has no idle time to fill.
const SPAWN_THREADS: usize = 1;

fn main() -> ProcessExit {
    let cli = Cli::parse();
    match cli.command {
        Command::RunVm {
            file,
            vm,
            supervisor_pid,
            settings,
            counters_fd,
            control_fd,
            uid,
            gid,
            kvm_gid,
            spec_stdin,
            wire_version,
            seccomp,
        } => {
            if let Some(v) = wire_version.filter(|v| *v != vmm_fleet::protocol::WIRE_VERSION) {
                eprintln!(
                    "vmm-fleet: the supervisor speaks wire version {v}, this binary (vmm-fleet {}) \
                     speaks {}: not started",
                    env!("CARGO_PKG_VERSION"),
                    vmm_fleet::protocol::WIRE_VERSION
                );
                return ProcessExit::from(ExitCode::VmmError.code());
            }
            let ids = uid.zip(gid).map(|(uid, gid)| Ids { uid, gid, kvm_gid });
            let child = RunVmArgs {
                vm: vm.as_deref(),
                supervisor_pid,
                settings: settings.as_deref(),
                counters_fd,
                control_fd,
                ids,
                spec_stdin,
                seccomp: seccomp.into(),
            };
            ProcessExit::from(cmd_run_vm(&file, &child).code())
        }
        Command::Validate { dir, settings } => cmd_validate(&dir, settings),
        Command::Console { name, ctl } => {
            cmd_console(&vmm_fleet::control::client_socket(ctl.control), &name)
        }
        Command::Logs { name, follow, ctl } => cmd_logs(
            &vmm_fleet::control::client_socket(ctl.control),
            &name,
            follow,
        ),
        Command::Up {
            dir,
            settings,
            log_dir,
            metrics_address,
            control,
            resume_fd,
        } => match resume_fd {
            None => cmd_up(&dir, settings, log_dir, metrics_address, control),
            Some(fd) => cmd_resume(fd, metrics_address, control),
        },
        Command::Status { name, json, ctl } => cli::status(ctl.control, name, json),
        Command::Stop(a) => cli::vm(a.ctl.control, Wire::Stop { vm: a.name }),
        Command::Start(a) => cli::vm(a.ctl.control, Wire::Start { vm: a.name }),
        Command::Restart(a) => cli::vm(a.ctl.control, Wire::Restart { vm: a.name }),
        Command::Kill(a) => cli::vm(a.ctl.control, Wire::Kill { vm: a.name }),
        Command::Pause(a) => cli::vm(a.ctl.control, Wire::Pause { vm: a.name }),
        Command::Resume(a) => cli::vm(a.ctl.control, Wire::Resume { vm: a.name }),
        Command::ResetFailed(a) => cli::vm(a.ctl.control, Wire::ResetFailed { vm: a.name }),
        Command::Reload { ctl } => cli::reload(ctl.control),
        Command::Reexec { ctl } => cli::reexec(ctl.control),
        Command::HandoverFormats => {
            match serde_json::to_string(&handover::Formats::ours()) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("vmm-fleet: {e}");
                    return ProcessExit::FAILURE;
                }
            }
            ProcessExit::SUCCESS
        }
    }
}

/// `console NAME`: 0 on detach (Ctrl-]), 1 on an error or when the supervisor closes the
/// console, 128 + N on signal N.
fn cmd_console(socket: &Path, name: &str) -> ProcessExit {
    use vmm_fleet::control::console::{ConsoleEnd, console};
    match console(socket, name) {
        Ok(ConsoleEnd::Detached) => ProcessExit::SUCCESS,
        Ok(ConsoleEnd::Closed) => {
            eprintln!("vmm-fleet: the supervisor closed the console of {name}");
            ProcessExit::FAILURE
        }
        Ok(ConsoleEnd::Signal(sig)) => ProcessExit::from(128u8.saturating_add(sig as u8)),
        Err(e) => {
            eprintln!("vmm-fleet: {e}");
            ProcessExit::FAILURE
        }
    }
}

/// `logs NAME [-f]`.
fn cmd_logs(socket: &Path, name: &str, follow: bool) -> ProcessExit {
    match vmm_fleet::control::console::logs(socket, name, follow, &mut std::io::stdout().lock()) {
        Ok(()) => ProcessExit::SUCCESS,
        Err(e) => {
            eprintln!("vmm-fleet: {e}");
            ProcessExit::FAILURE
        }
    }
}

/// Logs go to $LOGS_DIRECTORY under systemd, else next to the VM directory.
fn default_log_dir(dir: &Path, flag: Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d;
    }
    if let Some(d) = std::env::var_os("LOGS_DIRECTORY") {
        return PathBuf::from(d);
    }
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.parent()
        .unwrap_or(Path::new("/"))
        .join("vmm-fleet-logs")
}

fn source(dir: &Path, settings: Option<PathBuf>, log_dir: Option<PathBuf>) -> FleetSource {
    FleetSource {
        dir: dir.to_path_buf(),
        settings,
        default_log_dir: default_log_dir(dir, log_dir),
        host_memory_mib: host_memory_mib(),
    }
}

fn cmd_validate(dir: &Path, settings: Option<PathBuf>) -> ProcessExit {
    match source(dir, settings, None).load() {
        Ok((_, specs)) => {
            println!("{}: {} VM(s), all valid", dir.display(), specs.len());
            ProcessExit::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ProcessExit::FAILURE
        }
    }
}

fn cmd_up(
    dir: &Path,
    settings: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    metrics_address: Option<std::net::SocketAddr>,
    control: Option<PathBuf>,
) -> ProcessExit {
    let src = source(dir, settings, log_dir);
    let (settings, specs) = match src.load() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("vmm-fleet: nothing started");
            return ProcessExit::FAILURE;
        }
    };
    let (tx, rx, signals) = match process_setup() {
        Ok(x) => x,
        Err(code) => return code,
    };
    let fleet = FleetMetrics::new(&STATE_NAMES);
    let addr = metrics_address.unwrap_or(settings.metrics_address);
    let exporter = start_exporter(addr, &fleet, None);
    let log = EventLog::default();
    log.line(6, &VmUser::describe(settings.vm_user.as_ref()));
    let exe = own_binary();
    let output = match OutputHub::start() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm-fleet: cannot start the output thread: {e}; nothing started");
            return ProcessExit::FAILURE;
        }
    };
    let control_path = vmm_fleet::control::server_socket(control, &settings.log_dir);
    let consoles = output.consoles().clone();
    let server = match ControlServer::start(&control_path, tx.clone(), consoles, control_log()) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("vmm-fleet: {e}; nothing started");
            return ProcessExit::FAILURE;
        }
    };
    log.line(6, &format!("control socket on {}", server.path().display()));
    let handle = exporter.as_ref().map(Exporter::address_handle);
    let mut sup = Supervisor::new(src, settings, specs, ProcessSpawner::new(exe.clone()), log)
        .with_metrics(fleet)
        .with_output(output)
        .with_cgroups()
        .with_spawn_threads(SPAWN_THREADS, &tx)
        .on_metrics_address_change(move |new| {
            metrics_address_changed(new, metrics_address, handle.as_ref())
        })
        .with_reexec(reexec_context(exe, exporter, Some(server.clone()), signals));
    let code = sup.run(&rx, &tx);
    drop(sup);
    server.remove();
    ProcessExit::from(code as u8)
}

fn control_log() -> vmm_fleet::supervisor::control::LogFn {
    Arc::new(|prio, msg| EventLog::default().line(prio, msg))
}

/// The binary `up` runs from, resolved once at start-up: what its VM children run and
/// what a reexec execs. Its path (e.g. /usr/bin/vmm-fleet), so that after a package
/// upgrade both are the new file.
fn own_binary() -> PathBuf {
    let p = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("vmm-fleet"));
    // Already replaced under us: the path is still where the binary is installed.
    match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => p,
    }
}

fn reexec_context(
    exe: PathBuf,
    exporter: Option<Exporter>,
    control: Option<Arc<ControlServer>>,
    signals: reexec::SignalThread,
) -> ReexecContext {
    ReexecContext {
        exe,
        args: reexec::strip_resume(std::env::args_os().skip(1)),
        exporter,
        control,
        signals: Some(signals),
    }
}

/// Serve `/metrics` on `addr` (or on a listener handed over at reexec). A metrics
/// failure (bind failures are retried inside) never stops the fleet.
fn start_exporter(
    addr: std::net::SocketAddr,
    fleet: &Arc<FleetMetrics>,
    handed: Option<reexec::ResumedMetrics>,
) -> Option<Exporter> {
    let metrics_log: LogFn = Arc::new(|prio, msg| EventLog::default().line(prio, msg));
    let limits = vmm_fleet::metrics::http::Limits::default();
    let addr = handed.as_ref().and_then(|h| h.wanted).unwrap_or(addr);
    let handed = handed.map(|h| (h.listener, h.marks));
    Exporter::start_adopting(addr, fleet.clone(), metrics_log, limits, handed)
        .inspect_err(|e| EventLog::default().line(3, &format!("{e}; running without /metrics")))
        .ok()
}

/// What `up` sets up for the process before any thread: not dumpable, the fd limit, the
/// signal thread (SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR2). The events channel.
fn process_setup() -> Result<
    (
        mpsc::Sender<Event>,
        mpsc::Receiver<Event>,
        reexec::SignalThread,
    ),
    ProcessExit,
> {
    // Not dumpable: a process of our user (under the packaged unit, every VM child) can
    // then neither ptrace us nor open /proc/PID/mem or /proc/PID/fd. Children are not
    // affected (execve resets it; they make themselves not dumpable again).
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        EventLog::default().line(4, &format!("cannot make the supervisor not dumpable: {e}"));
    }
    if let Err(e) = vmm_fleet::supervisor::output::raise_fd_limit() {
        EventLog::default().line(4, &format!("cannot raise the open-files limit: {e}"));
    }
    // Only the signal thread takes the handled signals (see reexec::SignalThread); every
    // thread started from here on inherits them blocked. (After a reexec they are
    // blocked already, and those that came during the exec are pending.)
    reexec::block_signals();
    let (tx, rx) = mpsc::channel();
    match reexec::SignalThread::start(tx.clone()) {
        Ok(t) => Ok((tx, rx, t)),
        Err(e) => {
            eprintln!("vmm-fleet: cannot catch signals: {e}");
            Err(ProcessExit::FAILURE)
        }
    }
}

/// `up --resume-fd FD`: the program a reexec started. Reads the state handed over and
/// carries on with the running VMs; a state it cannot read puts it in hold mode
/// ([`reexec::hold`]): no VM is killed.
fn cmd_resume(
    fd: i32,
    metrics_address: Option<std::net::SocketAddr>,
    control: Option<PathBuf>,
) -> ProcessExit {
    let log = EventLog::default();
    let exe = own_binary();
    let doc = match reexec::read_document(fd) {
        Ok(d) => d,
        Err(e) => {
            let args = reexec::strip_resume(std::env::args_os().skip(1));
            return ProcessExit::from(reexec::hold(fd, &e.to_string(), &exe, &args, &log) as u8);
        }
    };
    // SAFETY: `fd` is the handover memfd, read whole; nothing else uses it.
    unsafe { libc::close(fd) };
    let (tx, rx, signals) = match process_setup() {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (sup, resumed) = Supervisor::resume(doc, ProcessSpawner::new(exe.clone()), log);
    let log = EventLog::default();
    for note in &resumed.notes {
        log.line(if note.starts_with("reexec:") { 6 } else { 4 }, note);
    }
    let fleet = FleetMetrics::new(&STATE_NAMES);
    let addr = metrics_address.unwrap_or(sup.settings().metrics_address);
    let exporter = start_exporter(addr, &fleet, resumed.metrics);
    let output = match OutputHub::start_adopting(
        resumed.output,
        Arc::new(vmm_fleet::supervisor::console::Consoles::default()),
    ) {
        Ok(o) => o,
        Err(e) => {
            // Its children keep running (their pipes fill, they block on output): the
            // same as any fleet whose output thread cannot start. Logged loudly.
            log.line(2, &format!("cannot start the output thread: {e}"));
            return ProcessExit::FAILURE;
        }
    };
    let control_path = vmm_fleet::control::server_socket(control, &sup.settings().log_dir);
    // The old program's listener (connections made during the exec wait in its backlog);
    // a new one if it could not be adopted.
    let server = match resumed.control {
        // Served at the path it is bound to (where clients reach it, and what is removed
        // at exit), whatever the settings say the default is now.
        Some((fd, bound)) => ControlServer::start_adopting(
            &bound,
            fd,
            tx.clone(),
            output.consoles().clone(),
            control_log(),
        ),
        None => ControlServer::start(
            &control_path,
            tx.clone(),
            output.consoles().clone(),
            control_log(),
        ),
    };
    let server = match server {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            // The VMs run on: only the control socket is missing (SIGUSR2 still works).
            log.line(2, &format!("{e}; running without the control socket"));
            None
        }
    };
    let handle = exporter.as_ref().map(Exporter::address_handle);
    let mut sup = sup
        .with_metrics(fleet)
        .with_output(output)
        .with_spawn_threads(SPAWN_THREADS, &tx)
        .on_metrics_address_change(move |new| {
            metrics_address_changed(new, metrics_address, handle.as_ref())
        })
        .with_reexec(reexec_context(exe, exporter, server.clone(), signals));
    let code = sup.run(&rx, &tx);
    drop(sup);
    if let Some(s) = server {
        s.remove();
    }
    ProcessExit::from(code as u8)
}

/// A reload found `metrics_address` changed to `new`: move the endpoint there, unless the
/// command line's `--metrics-address` (`cli`) overrides the settings.
fn metrics_address_changed(
    new: std::net::SocketAddr,
    cli: Option<std::net::SocketAddr>,
    handle: Option<&AddressHandle>,
) {
    let log = EventLog::default();
    match (cli, handle) {
        (Some(cli), _) => log.line(
            4,
            &format!(
                "metrics_address changed to {new} in the settings: refused, \
                 --metrics-address {cli} on the command line overrides it"
            ),
        ),
        (None, Some(h)) => {
            log.line(
                6,
                &format!("metrics_address changed to {new}: moving /metrics there"),
            );
            h.set(new);
        }
        (None, None) => log.line(
            4,
            &format!("metrics_address changed to {new}: ignored, /metrics is not running"),
        ),
    }
}

/// What `run-vm` was told by its supervisor (all unset when run by hand).
struct RunVmArgs<'a> {
    vm: Option<&'a str>,
    supervisor_pid: Option<u32>,
    settings: Option<&'a Path>,
    counters_fd: Option<i32>,
    control_fd: Option<i32>,
    ids: Option<Ids>,
    spec_stdin: bool,
    seccomp: SeccompMode,
}

/// With `--spec-stdin`, nothing of the VM may be made (memory, KVM, threads) before the
/// spec is read here: the supervisor places this process in its VM's cgroup before it
/// sends the spec (`supervisor::spawn`).
fn load_spec(file: &Path, a: &RunVmArgs<'_>) -> Result<VmSpec, String> {
    if a.spec_stdin {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("reading the VM spec from stdin: {e}"))?;
        return VmSpec::from_wire(&text).map_err(|e| e.to_string());
    }
    match a.settings {
        None => VmSpec::load(file),
        Some(s) => FleetSettings::load(s, PathBuf::from("/")).and_then(|fs| fs.load_vm(file)),
    }
    .map_err(|e| e.to_string())
}

/// Open what the VM needs, lock the process down (jail), then run the VM.
fn jailed_vm(
    file: &Path,
    a: &RunVmArgs<'_>,
    started: std::time::Instant,
) -> Result<(String, OpenedVm), String> {
    jail::ignore_sighup().map_err(|e| e.to_string())?;
    if let Some(name) = a.vm {
        jail::name_process(name);
    }
    if let Some(pid) = a.supervisor_pid {
        jail::check_parent(pid).map_err(|e| e.to_string())?;
    }
    let channel = a
        .control_fd
        .map(vmm_fleet::vm::control::inherited_channel)
        .transpose()
        .map_err(|e| e.to_string())?;
    let spec = load_spec(file, a)?;
    let table = a
        .counters_fd
        .map(jail::inherited_table)
        .transpose()
        .map_err(|e| format!("counter table: {e}"))?;
    let mut opened = OpenedVm::open(&spec, table.map(Arc::new), started)
        .map_err(|e| format!("vm {}: {e}", spec.name))?;
    opened.params.control = channel;
    if let Some(ids) = a.ids {
        check_images_readable(ids, &opened.params).map_err(|e| format!("vm {}: {e}", spec.name))?;
    }
    jail::lock_down(&Jail {
        ids: a.ids,
        supervisor_pid: a.supervisor_pid,
        vcpus: spec.vcpus,
    })
    .map_err(|e| format!("vm {}: {e}", spec.name))?;
    Ok((spec.name, opened))
}

/// The kernel and initrd, opened as the supervisor's user, must be readable by the VM
/// user too ([`jail::check_readable_by`]).
fn check_images_readable(
    ids: jail::Ids,
    params: &vmm_fleet::vm::VmParams,
) -> Result<(), jail::NotReadable> {
    use vmm_fleet::vm::{Initrd, Kernel};
    if let Kernel::Opened(f) = &params.kernel {
        jail::check_readable_by(ids, "kernel", f.path(), f.as_file())?;
    }
    if let Some(Initrd::Opened(f)) = &params.initrd {
        jail::check_readable_by(ids, "initrd", f.path(), f.as_file())?;
    }
    Ok(())
}

fn cmd_run_vm(file: &Path, a: &RunVmArgs<'_>) -> ExitCode {
    let started = std::time::Instant::now();
    let latch = Arc::new(StopLatch::default());
    // Signals are caught before anything starts, so a SIGTERM during start-up still
    // stops the VM through the vCPU shutdown path. Their thread starts only after the
    // privilege drop: the process must have one thread when it changes its uid.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm-fleet: cannot catch SIGTERM/SIGINT: {e}");
            return ExitCode::VmmError;
        }
    };
    let (name, opened) = match jailed_vm(file, a, started) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm-fleet: {e}");
            return ExitCode::VmmError;
        }
    };
    let l = latch.clone();
    // Filtered from its start (the first thing it does), before any guest runs.
    let spawned = spawn_filtered(ThreadKind::Signals, a.seccomp, move || {
        if let Some(sig) = signals.forever().next() {
            l.set(StopCause::Signal(sig));
        }
    });
    if let Err(e) = spawned {
        eprintln!("vmm-fleet: vm {name}: {e}");
        return ExitCode::VmmError;
    }
    // The other threads get their filters as they start, this one last (see vm::seccomp).
    let vm = RunningVm::start_filtered(opened.kvm, opened.params, latch, a.seccomp);
    run_to_end(&name, vm, &mut std::io::stderr())
}
