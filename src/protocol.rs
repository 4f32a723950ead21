//! The contract between the supervisor and a VM child: the child's exit codes, where it
//! finds its counter table, and the messages of its control channel.
//!
//! A `run-vm` process ends with exactly one of these codes; the README tables them and
//! the supervisor's restart policy reads them. This module imports nothing else of the crate.

/// The fd a VM child finds its counter table at: the supervisor puts it there at spawn
/// and passes `--counters-fd 3`; every other fd but 0, 1 and 2 is closed.
pub const COUNTERS_FD: i32 = 3;

/// The version of the whole supervisor -> child wire: `run-vm`'s arguments, the spec it
/// reads on stdin (`VmSpec::to_wire`), the counter table's layout (whose magic word
/// carries its own version too) and the control channel (each packet carries
/// [`CONTROL_VERSION`]). The supervisor passes `--wire-version N`; a child of another
/// version refuses to start with a message naming both, rather than misreading any of
/// them. After an upgrade and a reexec, children started before it run the old binary
/// and new ones the new binary: a change to any of these bumps this number, and the
/// supervisor keeps speaking what its running children speak (the table and channel
/// are checked by version at adoption).
pub const WIRE_VERSION: u32 = 1;

/// The fd a VM child finds its control channel at: one end of a SOCK_SEQPACKET
/// socketpair whose other end the supervisor keeps; passed as `--control-fd 4`. EOF on it
/// means the supervisor is gone: the child stops as on SIGTERM.
pub const CONTROL_FD: i32 = 4;

/// The version of the control channel's messages (the first byte of every packet), so
/// a child started by an older or newer supervisor binary is told apart.
pub const CONTROL_VERSION: u8 = 1;

/// The most console input bytes one [`ToChild::Console`] packet carries.
pub const CONSOLE_CHUNK_MAX: usize = 1024;

/// A packet on the control channel the child cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// An empty packet.
    #[error("empty control packet")]
    Empty,
    /// A version this program does not speak.
    #[error("control packet of version {got}, this program speaks {CONTROL_VERSION}")]
    Version {
        /// The packet's version byte.
        got: u8,
    },
    /// An unknown message kind.
    #[error("unknown control message kind {0}")]
    Kind(u8),
    /// A message with a payload it must not have, or too long a payload.
    #[error("control message kind {kind} with a bad payload of {len} bytes")]
    Payload {
        /// The message kind.
        kind: u8,
        /// The payload's length.
        len: usize,
    },
}

/// A message from the supervisor to a VM child, one per packet: `[version, kind,
/// payload...]`. The channel carries no replies; the console output flows through the
/// child's stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToChild {
    /// Park every vCPU (the guest's clock is held).
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Press Ctrl-Alt-Del on the VM's keyboard: the guest is asked to shut down.
    CtrlAltDel,
    /// Bytes typed into the serial console's receive side (at most
    /// [`CONSOLE_CHUNK_MAX`]).
    Console(Vec<u8>),
}

impl ToChild {
    const PAUSE: u8 = 1;
    const RESUME: u8 = 2;
    const CTRL_ALT_DEL: u8 = 3;
    const CONSOLE: u8 = 4;

    /// The packet for this message.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, &[u8]) = match self {
            ToChild::Pause => (Self::PAUSE, &[]),
            ToChild::Resume => (Self::RESUME, &[]),
            ToChild::CtrlAltDel => (Self::CTRL_ALT_DEL, &[]),
            ToChild::Console(b) => (Self::CONSOLE, b),
        };
        let mut p = Vec::with_capacity(2 + payload.len());
        p.push(CONTROL_VERSION);
        p.push(kind);
        p.extend_from_slice(payload);
        p
    }

    /// The message in `packet` (any bytes: it comes over a socket).
    pub fn decode(packet: &[u8]) -> Result<ToChild, ProtocolError> {
        let (&version, rest) = packet.split_first().ok_or(ProtocolError::Empty)?;
        if version != CONTROL_VERSION {
            return Err(ProtocolError::Version { got: version });
        }
        let (&kind, payload) = rest.split_first().ok_or(ProtocolError::Empty)?;
        let bad = || ProtocolError::Payload {
            kind,
            len: payload.len(),
        };
        let msg = match kind {
            Self::PAUSE => ToChild::Pause,
            Self::RESUME => ToChild::Resume,
            Self::CTRL_ALT_DEL => ToChild::CtrlAltDel,
            Self::CONSOLE => {
                if payload.is_empty() || payload.len() > CONSOLE_CHUNK_MAX {
                    return Err(bad());
                }
                return Ok(ToChild::Console(payload.to_vec()));
            }
            k => return Err(ProtocolError::Kind(k)),
        };
        if payload.is_empty() {
            Ok(msg)
        } else {
            Err(bad())
        }
    }
}

/// How a VM process ended. The discriminant is the process exit code.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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

    #[test]
    fn control_messages_round_trip_and_garbage_is_refused() {
        for m in [
            ToChild::Pause,
            ToChild::Resume,
            ToChild::CtrlAltDel,
            ToChild::Console(b"ls\r".to_vec()),
            ToChild::Console(vec![0xff; CONSOLE_CHUNK_MAX]),
        ] {
            assert_eq!(ToChild::decode(&m.encode()), Ok(m));
        }
        assert_eq!(ToChild::decode(&[]), Err(ProtocolError::Empty));
        assert_eq!(
            ToChild::decode(&[CONTROL_VERSION]),
            Err(ProtocolError::Empty)
        );
        assert_eq!(
            ToChild::decode(&[9, 1]),
            Err(ProtocolError::Version { got: 9 })
        );
        assert_eq!(
            ToChild::decode(&[CONTROL_VERSION, 77]),
            Err(ProtocolError::Kind(77))
        );
        assert!(ToChild::decode(&[CONTROL_VERSION, 1, 0]).is_err());
        assert!(ToChild::decode(&[CONTROL_VERSION, 4]).is_err());
        let mut long = vec![CONTROL_VERSION, 4];
        long.resize(2 + CONSOLE_CHUNK_MAX + 1, b'x');
        assert!(ToChild::decode(&long).is_err());
    }
}
