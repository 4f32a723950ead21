//! The `vmm-fleet` command line: maps subcommands to the library and errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode as ProcessExit;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vmm_fleet::config::VmSpec;
use vmm_fleet::protocol::ExitCode;
use vmm_fleet::vm::{StopCause, StopLatch, run_vm};

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
    /// Run one VM from its YAML file until the guest stops or SIGTERM/SIGINT arrives.
    RunVm {
        /// The VM's YAML file.
        file: PathBuf,
    },
}

fn main() -> ProcessExit {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::RunVm { file } => cmd_run_vm(&file),
    };
    ProcessExit::from(code.code())
}

fn cmd_run_vm(file: &std::path::Path) -> ExitCode {
    let spec = match VmSpec::load(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm-fleet: {e}");
            return ExitCode::VmmError;
        }
    };
    let latch = Arc::new(StopLatch::default());
    // Signals are caught before anything starts, so a SIGTERM during start-up still
    // stops the VM through the vCPU shutdown path.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm-fleet: cannot catch SIGTERM/SIGINT: {e}");
            return ExitCode::VmmError;
        }
    };
    let l = latch.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                l.set(StopCause::Signal(sig));
            }
        });
    run_vm(&spec, latch, &mut std::io::stderr())
}
