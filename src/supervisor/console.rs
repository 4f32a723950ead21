//! STUB until the console helper's branch lands (it replaces this whole file): the
//! console registry and the two connection servers the control socket hands `console`
//! and `logs` connections to. Same signatures as theirs; each answers an error line.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Every VM's console watchers (stub: none).
#[derive(Debug, Default)]
pub struct Consoles {
    _none: (),
}

/// How a console session ended (stub).
#[derive(Debug)]
pub struct SessionEnd;

fn unavailable(mut stream: &UnixStream, what: &str) -> io::Error {
    let line =
        crate::control::Response::error(format!("{what} is not available in this build")).to_line();
    let _ = stream.write_all(line.as_bytes());
    io::Error::other(format!("{what} not available"))
}

/// Attach `stream` to VM `vm`'s console (stub: refuses).
pub fn serve_console(stream: UnixStream, vm: &str, consoles: &Consoles) -> io::Result<SessionEnd> {
    let _ = (vm, consoles);
    Err(unavailable(&stream, "console"))
}

/// Send the console file at `path` to `stream`, then what is appended if `follow`
/// (stub: refuses).
pub fn serve_logs(stream: UnixStream, path: &Path, follow: bool) -> io::Result<()> {
    let _ = (path, follow);
    Err(unavailable(&stream, "logs"))
}
