//! Reading the files a user hands us, without ever blocking or bloating the reader.
//!
//! VM files and the settings file must be regular files of at most [`MAX_CONFIG_BYTES`];
//! kernels and initrds must be regular files. Every file is opened with `O_NONBLOCK`
//! and checked with `fstat` on the open descriptor, so a FIFO, a device or a socket put
//! in their place is refused at once instead of hanging the reader (and a file swapped
//! after the check is still the one checked); console and log files are opened for
//! appending the same way, never through a symlink ([`open_append_file`]). YAML is
//! parsed with a bound on its nodes counted *after* alias expansion ([`parse_bounded`]),
//! on top of serde_yaml's own limits (nesting depth 128; alias replays at most 100 times the document's events).

use std::cell::Cell;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};

/// Largest VM or settings file accepted, in bytes (1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most YAML nodes (scalars, sequences, mappings, counted after alias expansion) a VM
/// or settings file may hold; a real one holds a few dozen.
pub const MAX_YAML_NODES: usize = 10_000;

/// What a file is when it is not a regular file, for messages.
fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Short reason for an I/O error on a path ("no such file", "permission denied", ...).
pub(super) fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

/// Why [`open_regular_file`] refused a path. Its message is a short reason without the
/// path, such as `is a FIFO, not a regular file`.
#[derive(Debug, thiserror::Error)]
pub enum NotRegular {
    /// Opening or `fstat` failed.
    #[error("{}", io_reason(.0))]
    Io(std::io::Error),
    /// A symbolic link, where none is followed.
    #[error("is a symbolic link; refusing to follow it")]
    Symlink,
    /// A directory.
    #[error("is a directory, expected a file")]
    Directory,
    /// Something else that is not a regular file: what it is (`a FIFO`, `a socket` ...).
    #[error("is {0}, not a regular file")]
    Special(&'static str),
    /// A "regular file" of a kernel interface file system (`/proc/kcore` as an initrd:
    /// the host's memory in a guest).
    #[error("is {KERNEL_INTERFACE_FILE}, not a regular file")]
    KernelInterface,
}

/// What a kernel interface file is, for messages.
pub const KERNEL_INTERFACE_FILE: &str = "a kernel interface (proc, sys, ...) file";

/// Opens `path` for reading without blocking (`O_NONBLOCK`: a FIFO opens at once) and
/// checks on the open descriptor that it is a regular file, not on a kernel interface
/// file system. The one place every file a user names for reading is opened.
pub fn open_regular_file(path: &Path) -> Result<(File, Metadata), NotRegular> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(NotRegular::Io)?;
    let meta = file.metadata().map_err(NotRegular::Io)?;
    if meta.is_dir() {
        return Err(NotRegular::Directory);
    }
    if !meta.is_file() {
        return Err(NotRegular::Special(kind(&meta)));
    }
    if is_kernel_interface(&file) {
        return Err(NotRegular::KernelInterface);
    }
    Ok((file, meta))
}

/// Opens a console or log file for appending: never through a symlink (`O_NOFOLLOW`),
/// never anything but a regular file (a FIFO is refused without blocking), not on a
/// kernel interface file system, mode 0640 when created.
pub fn open_append_file(path: &Path) -> Result<File, NotRegular> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => NotRegular::Symlink,
            _ => NotRegular::Io(e),
        })?;
    let meta = file.metadata().map_err(NotRegular::Io)?;
    if !meta.is_file() {
        return Err(NotRegular::Special(kind(&meta)));
    }
    if is_kernel_interface(&file) {
        return Err(NotRegular::KernelInterface);
    }
    Ok(file)
}

/// [`open_regular_file`] with its error as a short reason without the path.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), String> {
    open_regular_file(path).map_err(|e| e.to_string())
}

/// Is `dir` safe to hold console and log files: not writable by other users, unless it
/// is sticky and ours (then no one else can rename or delete what we create there)?
/// A directory that does not exist yet is fine: it is created mode 0750. The error is a
/// short reason without the path.
pub fn check_log_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_reason(&e)),
    };
    if !meta.is_dir() {
        return Err("exists and is not a directory".to_string());
    }
    let mode = meta.mode();
    let me = nix::unistd::geteuid().as_raw();
    let sticky_and_ours = mode & 0o1000 != 0 && meta.uid() == me;
    if mode & 0o002 != 0 && !sticky_and_ours {
        return Err(format!(
            "is writable by every user (mode {:o}) and is not a sticky directory of ours: \
             another user could put a symlink or a FIFO where a console file goes; \
             use a directory only the fleet's user can write",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Is `dir` safe to take VM files from: not writable by every user (sticky or not:
/// anyone could add a VM there, with a kernel, initrd and console file of their
/// choosing, run by the fleet's user)? The error is a short reason without the path.
pub fn check_config_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o002 != 0 => Err(format!(
            "is writable by every user (mode {:o}): any local user could add or change a \
             VM; use a directory only the fleet's administrators can write",
            m.permissions().mode() & 0o7777
        )),
        // Other failures are reported by whoever reads the directory next.
        _ => Ok(()),
    }
}

/// Why a console file on a kernel interface file system is refused.
pub const KERNEL_INTERFACE: &str = "is on a kernel interface file system (proc, sys, \
     cgroup, ...), not a place for a log file: the guest would be writing to the host kernel";

/// Is `file` on a file system whose "regular files" are kernel knobs: a console
/// pointed at `/proc/sys/kernel/core_pattern` or a cgroup's `memory.limit_in_bytes`
/// would let the guest's output reconfigure the host (as the supervisor's user).
pub fn is_kernel_interface<F: std::os::fd::AsFd>(file: F) -> bool {
    use nix::sys::statfs::{
        BPF_FS_MAGIC, CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, DEBUGFS_MAGIC, PROC_SUPER_MAGIC,
        SECURITYFS_MAGIC, SELINUX_MAGIC, SMACK_MAGIC, SYSFS_MAGIC, TRACEFS_MAGIC, fstatfs,
    };
    const EFIVARFS_MAGIC: u32 = 0xde5e_81e4;
    const CONFIGFS_MAGIC: u32 = 0x6265_6570;
    let Ok(fs) = fstatfs(file) else {
        return false;
    };
    let t = fs.filesystem_type();
    // Magic numbers are 32 bits; fs_type_t is wider on some targets.
    let raw = t.0 as u32;
    [
        PROC_SUPER_MAGIC,
        SYSFS_MAGIC,
        CGROUP_SUPER_MAGIC,
        CGROUP2_SUPER_MAGIC,
        DEBUGFS_MAGIC,
        TRACEFS_MAGIC,
        SECURITYFS_MAGIC,
        SELINUX_MAGIC,
        SMACK_MAGIC,
        BPF_FS_MAGIC,
    ]
    .contains(&t)
        || [EFIVARFS_MAGIC, CONFIGFS_MAGIC].contains(&raw)
}

/// Reads a VM or settings file: a regular file of at most [`MAX_CONFIG_BYTES`], valid
/// UTF-8, not writable by every user. The error is a short reason without the path.
pub fn read_config(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let (file, meta) = open_regular(path)?;
    let mode = meta.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(format!(
            "is writable by every user (mode {:o}): any local user could change this VM \
             or the fleet's settings; chmod o-w",
            mode & 0o7777
        ));
    }
    let too_big = |n: u64| {
        format!(
            "is {n} bytes, more than the {MAX_CONFIG_BYTES} bytes (1 MiB) a VM or settings file may have"
        )
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big(meta.len()));
    }
    // The file may grow after the fstat: read one byte past the limit at most.
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_reason(&e))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|_| "is not valid UTF-8 text".to_string())
}

/// Parses one YAML document into a [`Value`], failing as soon as it holds more than
/// [`MAX_YAML_NODES`] nodes counting every alias expansion (so a "billion laughs"
/// file is refused before it is expanded, not after).
pub fn parse_bounded(text: &str) -> Result<Value, serde_yaml::Error> {
    let left = Cell::new(MAX_YAML_NODES);
    Counted(&left).deserialize(serde_yaml::Deserializer::from_str(text))
}

/// A [`Value`] builder that counts down the nodes it may still build.
#[derive(Clone, Copy)]
struct Counted<'a>(&'a Cell<usize>);

impl Counted<'_> {
    fn node<E: de::Error>(self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(n) => {
                self.0.set(n);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "more than {MAX_YAML_NODES} YAML nodes (counting each use of an alias); \
                 a VM file needs a few dozen"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Counted<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.node()?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.node()?;
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.node()?;
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.node()?;
        Ok(Value::Number(v.into()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.node()?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.node()?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.node()?;
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.node()?;
        let mut v = Vec::new();
        while let Some(e) = seq.next_element_seed(self)? {
            v.push(e);
        }
        Ok(Value::Sequence(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.node()?;
        let mut m = Mapping::new();
        while let Some(k) = map.next_key_seed(self)? {
            let v = map.next_value_seed(self)?;
            m.insert(k, v);
        }
        Ok(Value::Mapping(m))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        self.node()?;
        let (tag, variant): (String, _) = data.variant()?;
        let value = de::VariantAccess::newtype_variant_seed(variant, self)?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_plain_file_parses_like_serde_yaml_does() {
        let text = "name: a\nvcpus: 2\nlist: [1, -2, 3.5, true, ~, x]\ntagged: !t 5\n";
        let want: Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(parse_bounded(text).unwrap(), want);
    }

    #[test]
    fn alias_expansion_is_counted_and_refused_early() {
        // Nine levels of ten aliases each: 10^9 nodes once expanded.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let t = Instant::now();
        let e = parse_bounded(&text).unwrap_err().to_string();
        assert!(e.contains("more than 10000 YAML nodes"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // serde_yaml's own repetition limit refuses it too, but only far later.
        let few = "a: &a [1, 2]\nb: [*a, *a]\n";
        assert!(parse_bounded(few).is_ok());
    }

    #[test]
    fn deep_nesting_hits_serde_yamls_recursion_limit() {
        let text = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let e = parse_bounded(&text).unwrap_err().to_string();
        assert!(e.contains("recursion limit"), "{e}");
    }

    #[test]
    fn fifos_and_big_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vmm-fleet-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("x.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(
            read_config(&fifo).unwrap_err(),
            "is a FIFO, not a regular file"
        );
        let big = dir.join("big.yaml");
        std::fs::write(&big, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).unwrap();
        assert!(read_config(&big).unwrap_err().contains("more than the"));
        assert_eq!(
            read_config(&dir).unwrap_err(),
            "is a directory, expected a file"
        );
        let ok = dir.join("ok.yaml");
        std::fs::write(&ok, "a: 1\n").unwrap();
        assert_eq!(read_config(&ok).unwrap(), "a: 1\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
