//! The contract between the supervisor and a VM child: the child's exit codes and
//! where it finds its counter table.
//!
//! A `run-vm` process ends with exactly one of these codes; the README tables them and
//! the supervisor's restart policy reads them. This module imports nothing else of the crate.

/// The fd a VM child finds its counter table at: the supervisor puts it there at spawn
/// and passes `--counters-fd 3`; every other fd but 0, 1 and 2 is closed.
pub const COUNTERS_FD: i32 = 3;

/// How a VM process ended. The discriminant is the process exit code.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitCode {
    /// The guest powered off (ACPI sleep register, S5) or halted.
    GuestPoweroff = 0,
    /// The guest asked for a reset (i8042 command 0xFE, or `reboot=k`).
    GuestReset = 3,
    /// The guest crashed: triple fault, VM entry failure, KVM internal/emulation error.
    GuestCrash = 4,
    /// The VMM failed or refused to start: bad config, missing or unloadable kernel,
    /// not enough memory, no /dev/kvm, a KVM failure.
    VmmError = 5,
    /// The VM was stopped by SIGTERM or SIGINT and shut down cleanly.
    Stopped = 6,
}

impl ExitCode {
    /// Every code, in table order.
    pub const ALL: [ExitCode; 5] = [
        ExitCode::GuestPoweroff,
        ExitCode::GuestReset,
        ExitCode::GuestCrash,
        ExitCode::VmmError,
        ExitCode::Stopped,
    ];

    /// The numeric process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The code that a process exit status stands for, if it is one of ours.
    pub fn from_code(code: i32) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| i32::from(c.code()) == code)
    }

    /// A short lower-case name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ExitCode::GuestPoweroff => "poweroff",
            ExitCode::GuestReset => "reset",
            ExitCode::GuestCrash => "crash",
            ExitCode::VmmError => "vmm_error",
            ExitCode::Stopped => "stopped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_code(i32::from(c.code())), Some(c));
        }
        let mut codes: Vec<u8> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ExitCode::ALL.len());
        assert_eq!(ExitCode::GuestPoweroff.code(), 0);
        assert_eq!(ExitCode::from_code(1), None);
    }
}
