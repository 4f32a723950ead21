//! Builds the built-in guest images from `guest/` into `OUT_DIR`.
//!
//! - `builtin.elf`: `guest/builtin/{entry.S,main.c}` linked with `guest/builtin/link.ld`.
//! - `tiny.elf`: `guest/tiny/tiny.S` linked with `guest/tiny/link.ld`.
//!
//! Both are compiled with the C compiler that the `cc` crate selects, as freestanding
//! x86-64 code, and linked by the same compiler driver with their linker script.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags for freestanding, non-PIC, no-FPU/SIMD ring-0 guest code.
const GUEST_CFLAGS: &[&str] = &[
    "-m64",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mno-sse",
    "-mno-mmx",
    "-mno-avx",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-zero-initialized-in-bss",
    "-fno-common",
    "-falign-functions=16",
    "-falign-jumps=1",
    "-falign-loops=1",
    "-falign-labels=1",
    "-nostdlib",
    "-static",
    "-O2",
    "-Wall",
    "-Wextra",
];

/// Flags for linking a guest image with the compiler driver.
const GUEST_LDFLAGS: &[&str] = &[
    "-m64",
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
];

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("guest");

    println!("cargo:rerun-if-changed=build.rs");
    for f in [
        "builtin/entry.S",
        "builtin/main.c",
        "builtin/link.ld",
        "tiny/tiny.S",
        "tiny/link.ld",
    ] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }

    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .cargo_warnings(false)
        .opt_level(2)
        .debug(false)
        .pic(false)
        .warnings(false)
        .get_compiler();

    let builtin_dir = guest.join("builtin");
    let objs = [
        compile(
            &compiler,
            &builtin_dir.join("entry.S"),
            &out.join("builtin-entry.o"),
        ),
        compile(
            &compiler,
            &builtin_dir.join("main.c"),
            &out.join("builtin-main.o"),
        ),
    ];
    link(
        &compiler,
        &builtin_dir.join("link.ld"),
        &objs,
        &out.join("builtin.elf"),
    );

    let tiny_dir = guest.join("tiny");
    let objs = [compile(
        &compiler,
        &tiny_dir.join("tiny.S"),
        &out.join("tiny.o"),
    )];
    link(
        &compiler,
        &tiny_dir.join("link.ld"),
        &objs,
        &out.join("tiny.elf"),
    );
}

/// Compiles (or assembles, for `.S`) one guest source file to an object file.
fn compile(compiler: &cc::Tool, src: &Path, obj: &Path) -> PathBuf {
    let mut cmd = bare_command(compiler);
    cmd.args(GUEST_CFLAGS);
    if compiler.is_like_gnu() {
        // Keep GCC from turning the guest's own memset/memcpy loops into calls to them.
        cmd.arg("-fno-tree-loop-distribute-patterns");
    }
    cmd.arg("-c").arg(src).arg("-o").arg(obj);
    run(cmd, &format!("compile {}", src.display()));
    obj.to_path_buf()
}

/// Links guest objects into an ELF image with the given linker script.
fn link(compiler: &cc::Tool, script: &Path, objs: &[PathBuf], elf: &Path) {
    let mut cmd = bare_command(compiler);
    cmd.args(GUEST_LDFLAGS)
        .arg(format!("-Wl,-T,{}", script.display()))
        .args(objs)
        .arg("-o")
        .arg(elf);
    run(cmd, &format!("link {}", elf.display()));
}

/// The compiler driver with its environment but without the host-oriented default
/// arguments `cc` would add (`-fPIC`, `-ffunction-sections`, debug info, ...); only
/// target selection flags are kept (e.g. `--target=` for clang).
fn bare_command(compiler: &cc::Tool) -> Command {
    let mut cmd = Command::new(compiler.path());
    for (k, v) in compiler.get_envs() {
        cmd.env(k, v);
    }
    for arg in compiler.args() {
        if arg.to_str().is_some_and(|a| a.starts_with("--target=")) {
            cmd.arg(arg);
        }
    }
    cmd
}

fn run(mut cmd: Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !status.success() {
        panic!("{what}: {cmd:?} failed with {status}");
    }
}
