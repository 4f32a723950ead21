//! The supervisor's end of a VM child's control channel: a SOCK_SEQPACKET socketpair
//! made at spawn, whose other end the child finds at [`CONTROL_FD`]. Messages
//! ([`ToChild`]) go one way, one per packet, and a send never blocks the caller: a child
//! that does not read gets an error, not a stalled supervisor.
//!
//! [`CONTROL_FD`]: crate::protocol::CONTROL_FD

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, send, socketpair};

use crate::protocol::ToChild;

/// The supervisor's end of one child's control channel.
#[derive(Debug)]
pub struct ChildChannel {
    fd: OwnedFd,
}

impl ChildChannel {
    /// A new channel: the supervisor's end, and the child's (both close-on-exec; the
    /// spawner moves the child's to [`crate::protocol::CONTROL_FD`]).
    pub fn pair() -> io::Result<(ChildChannel, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((ChildChannel { fd: ours }, theirs))
    }

    /// A channel from an fd handed over (a re-exec).
    pub fn from_owned(fd: OwnedFd) -> Self {
        ChildChannel { fd }
    }

    /// Send `msg`, without blocking: a full socket buffer (a child that does not read)
    /// is `WouldBlock`, a child that is gone `BrokenPipe`/`ConnectionRefused`.
    pub fn send(&self, msg: &ToChild) -> io::Result<()> {
        let packet = msg.encode();
        let sent = send(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            &packet,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        if sent == packet.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short control packet",
            ))
        }
    }
}

impl AsFd for ChildChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::recv;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_packet_arrives_whole_and_a_full_channel_never_blocks() {
        let (ch, theirs) = ChildChannel::pair().unwrap();
        ch.send(&ToChild::Console(b"hi".to_vec())).unwrap();
        let mut buf = [0u8; 64];
        let n = recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(
            ToChild::decode(&buf[..n]),
            Ok(ToChild::Console(b"hi".to_vec()))
        );
        // Nobody reads: the sends fail with WouldBlock instead of hanging.
        let full = (0..100_000)
            .map(|_| ch.send(&ToChild::Console(vec![b'x'; 1024])))
            .find_map(Result::err)
            .expect("the buffer fills");
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
        drop(theirs);
        assert!(ch.send(&ToChild::Pause).is_err());
    }
}
