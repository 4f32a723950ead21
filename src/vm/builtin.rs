//! The built-in guest images, built from guest/ at build time.

/// The built-in guest: an ELF64 image entered in 64-bit long mode at its ELF entry.
pub const BUILTIN_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builtin.elf"));
/// The tiny benchmark guest: ELF64 with a PVH note, prints one line and resets.
pub const TINY_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny.elf"));
