#!/usr/bin/env bash
# Build the vmm-fleet test guest from Debian 12 packages:
#
#   OUT/bzImage            Debian's linux-image-amd64 (6.1) bzImage, as shipped
#   OUT/vmlinux            the uncompressed ELF64 kernel extracted from it
#   OUT/initramfs.cpio.gz  newc cpio: static busybox + /init (guest/debian-init)
#   OUT/kernel-package.txt which kernel package/version/compression was used
#
# Usage: guest/build-debian-guest.sh [OUT_DIR]     (default: guest/out)
#
# Runs as root on Debian 12; needs only Debian's package mirrors. Idempotent:
# an output that exists is not rebuilt (the initramfs is rebuilt when
# guest/debian-init is newer than it). FORCE=1 rebuilds everything.
# KERNEL_PKG=linux-image-6.1.0-NN-amd64 pins the kernel package instead of
# resolving the linux-image-amd64 metapackage.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC="$SCRIPT_DIR/debian-init"
OUT=${1:-$SCRIPT_DIR/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEB_CACHE="$OUT/.debs"

BZIMAGE="$OUT/bzImage"
VMLINUX="$OUT/vmlinux"
INITRAMFS="$OUT/initramfs.cpio.gz"
KINFO="$OUT/kernel-package.txt"

log() { printf '[build-debian-guest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, mknod)"
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

if [ "${FORCE:-0}" = 1 ]; then
    rm -f "$BZIMAGE" "$VMLINUX" "$INITRAMFS" "$KINFO"
fi

SCRATCH=$(mktemp -d /var/tmp/build-debian-guest.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT

# ---------------------------------------------------------------- what to do
need_bzimage=0; need_vmlinux=0; need_initramfs=0
[ -s "$BZIMAGE" ] || need_bzimage=1
[ -s "$VMLINUX" ] || need_vmlinux=1
if [ ! -s "$INITRAMFS" ] || [ "$INIT_SRC" -nt "$INITRAMFS" ]; then
    need_initramfs=1
fi
if [ $need_bzimage = 0 ] && [ $need_vmlinux = 0 ] && [ $need_initramfs = 0 ]; then
    log "all outputs present; nothing to build"
fi

# ------------------------------------------------------------ 1. host tools
# (a stamp file, not a variable: this is also called inside $(...) subshells)
apt_update_once() {
    if [ ! -e "$SCRATCH/.apt-updated" ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        : > "$SCRATCH/.apt-updated"
    fi
}

ensure_tools() {
    # command:package pairs; install only what is missing.
    local pair cmd pkg missing=()
    for pair in "$@"; do
        cmd=${pair%%:*}; pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt_update_once
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

tools=()
if [ $need_bzimage = 1 ] || [ $need_initramfs = 1 ]; then
    tools+=(dpkg-deb:dpkg apt-cache:apt)
fi
if [ $need_bzimage = 1 ] || [ $need_vmlinux = 1 ]; then
    # Debian's kernels use xz (6.1) or zstd/gzip; bzip2/lzma/lzo/lz4 payloads
    # are tried too, but only with decompressors that are already installed.
    tools+=(xz:xz-utils zstd:zstd gzip:gzip readelf:binutils file:file)
fi
if [ $need_initramfs = 1 ]; then
    tools+=(cpio:cpio gzip:gzip)
fi
[ ${#tools[@]} -gt 0 ] && ensure_tools "${tools[@]}"

# ----------------------------------------------------- 2. fetch & unpack debs
# fetch_deb PKG -> prints the path of the .deb (downloaded once into DEB_CACHE)
fetch_deb() {
    local pkg=$1 ver deb
    # reuse a .deb fetched by an earlier run without touching the network
    deb=$(find "$DEB_CACHE" -maxdepth 1 -name "${pkg}_*_amd64.deb" -size +0 2>/dev/null \
          | LC_ALL=C sort | tail -n1)
    if [ -n "$deb" ]; then
        log "using cached $(basename "$deb")"
        printf '%s\n' "$deb"; return
    fi
    apt_update_once
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no candidate for $pkg"
    mkdir -p "$DEB_CACHE"
    # apt file names encode ':' in epochs as %3a
    deb="$DEB_CACHE/${pkg}_${ver//:/%3a}_amd64.deb"
    if [ ! -s "$deb" ]; then
        log "apt-get download $pkg=$ver"
        # _apt must be able to write here, otherwise apt warns and runs unsandboxed
        chown _apt "$DEB_CACHE" 2>/dev/null || true
        (cd "$DEB_CACHE" && apt-get download -qq "$pkg=$ver") >&2
    fi
    [ -s "$deb" ] || die "download of $pkg=$ver did not produce $deb"
    printf '%s\n' "$deb"
}

resolve_kernel_pkg() {
    if [ -n "${KERNEL_PKG:-}" ]; then
        printf '%s\n' "$KERNEL_PKG"; return
    fi
    apt_update_once
    local real
    real=$(apt-cache depends linux-image-amd64 \
           | awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}')
    [ -n "$real" ] || die "could not resolve linux-image-amd64 to a linux-image-6.1.0-*-amd64 package"
    printf '%s\n' "$real"
}

if [ $need_bzimage = 1 ]; then
    kpkg=$(resolve_kernel_pkg)
    kdeb=$(fetch_deb "$kpkg")
    kver=$(dpkg-deb -f "$kdeb" Version)
    log "kernel package: $kpkg $kver"
    log "dpkg-deb -x $(basename "$kdeb")"
    dpkg-deb -x "$kdeb" "$SCRATCH/kernel"
    vmlinuz=$(find "$SCRATCH/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
    [ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $kdeb"
    # the bzImage setup header carries "HdrS" at 0x202
    [ "$(dd if="$vmlinuz" bs=1 skip=514 count=4 2>/dev/null)" = HdrS ] \
        || die "$vmlinuz has no HdrS magic at 0x202; not a bzImage"
    kconfig=$(find "$SCRATCH/kernel/boot" -maxdepth 1 -name 'config-*' | head -n1)
    if [ -n "$kconfig" ]; then
        for opt in CONFIG_DEVTMPFS CONFIG_DEVPORT CONFIG_SERIAL_8250_CONSOLE \
                   CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP CONFIG_PVH; do
            grep -q "^$opt=y" "$kconfig" || log "warning: $opt is not =y in $(basename "$kconfig")"
        done
    fi
    cp "$vmlinuz" "$BZIMAGE.tmp"
    mv "$BZIMAGE.tmp" "$BZIMAGE"
    printf 'package=%s\nversion=%s\nimage=%s\n' "$kpkg" "$kver" "$(basename "$vmlinuz")" > "$KINFO"
    need_vmlinux=1   # a new bzImage invalidates any old vmlinux
fi

# ------------------------------------------------- 3. bzImage -> ELF vmlinux
# Like linux/scripts/extract-vmlinux: find each candidate compression magic in
# the image, decompress from that offset, and keep the first result that is an
# ELF file. Trailing garbage after the stream makes the decompressors complain;
# that is expected and ignored (the ELF check is what counts).
is_x86_64_elf() {
    local h
    h=$(readelf -h "$1" 2>/dev/null) || return 1
    grep -q 'Class:[[:space:]]*ELF64' <<<"$h" &&
    grep -q 'Machine:[[:space:]]*Advanced Micro Devices X86-64' <<<"$h" &&
    grep -q 'Type:[[:space:]]*EXEC' <<<"$h"
}

try_decompress() { # img out name magic(PCRE bytes) cmd...
    local img=$1 out=$2 name=$3 magic=$4; shift 4
    local pos
    command -v "$1" >/dev/null 2>&1 || return 1
    for pos in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
        tail -c "+$((pos + 1))" "$img" | "$@" > "$out" 2>/dev/null || true
        if [ -s "$out" ] && is_x86_64_elf "$out"; then
            log "found $name payload at offset $pos ($(printf '0x%x' "$pos"))"
            printf '%s\n' "$name"
            return 0
        fi
    done
    rm -f "$out"
    return 1
}

extract_vmlinux() { # bzImage out -> prints compression name
    local img=$1 out=$2
    try_decompress "$img" "$out" gzip  '\x1f\x8b\x08'         gzip -dc  ||
    try_decompress "$img" "$out" xz    '\xfd7zXZ\x00'         xz -dc    ||
    try_decompress "$img" "$out" zstd  '\x28\xb5\x2f\xfd'     zstd -dcq ||
    try_decompress "$img" "$out" bzip2 'BZh'                  bzip2 -dc ||
    try_decompress "$img" "$out" lzma  '\x5d\x00\x00\x00'     xz -dc --format=lzma ||
    try_decompress "$img" "$out" lzo   '\x89\x4c\x5a'         lzop -dc  ||
    try_decompress "$img" "$out" lz4   '\x02\x21\x4c\x18'     lz4 -dc   ||
    return 1
}

if [ $need_vmlinux = 1 ]; then
    [ -s "$BZIMAGE" ] || die "no $BZIMAGE to extract from"
    log "extracting vmlinux from bzImage"
    comp=$(extract_vmlinux "$BZIMAGE" "$SCRATCH/vmlinux") \
        || die "no decompressible ELF payload found in $BZIMAGE"
    file "$SCRATCH/vmlinux" | sed 's/^/[build-debian-guest]   /' >&2
    mv "$SCRATCH/vmlinux" "$VMLINUX"
    if [ -f "$KINFO" ]; then
        sed -i '/^compression=/d' "$KINFO"
        echo "compression=$comp" >> "$KINFO"
    fi
fi

# ------------------------------------------------------- 4. initramfs (newc)
if [ $need_initramfs = 1 ]; then
    bdeb=$(fetch_deb busybox-static)
    log "dpkg-deb -x $(basename "$bdeb")"
    dpkg-deb -x "$bdeb" "$SCRATCH/busybox"
    bb="$SCRATCH/busybox/bin/busybox"
    [ -x "$bb" ] || die "no bin/busybox in $bdeb"
    file "$bb" | grep -q 'statically linked' || die "$bb is not statically linked"

    root="$SCRATCH/rootfs"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
    chmod 1777 "$root/tmp"
    install -m 0755 "$bb" "$root/bin/busybox"
    # one symlink per applet, where busybox says it lives (bin/sh, sbin/reboot, ...)
    n=0
    while read -r applet; do
        case "$applet" in
            bin/busybox|"") continue ;;
        esac
        dir=$(dirname "$applet")
        [ -e "$root/$applet" ] && continue
        mkdir -p "$root/$dir"
        ln -s "/bin/busybox" "$root/$applet"
        n=$((n + 1))
    done < <("$bb" --list-full)
    log "busybox $({ "$bb" --help 2>&1 || true; } | awk 'NR==1 {print $2}'): $n applet symlinks"
    # applets /init uses (all reachable through its PATH)
    applets=$("$bb" --list)
    for a in sh mount mkdir cat grep dd printf sync sleep reboot poweroff; do
        grep -qx "$a" <<<"$applets" || die "busybox lacks applet $a"
    done
    # static nodes so the kernel can open /dev/console before /init runs
    # (devtmpfs is mounted over /dev by /init later)
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 600 "$root/dev/ttyS0"   c 4 64
    mknod -m 666 "$root/dev/null"    c 1 3
    install -m 0755 "$INIT_SRC" "$root/init"

    # fixed owners, inode numbers and mtimes: same inputs -> same archive
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible) \
        | gzip -9 -n > "$INITRAMFS.tmp"
    mv "$INITRAMFS.tmp" "$INITRAMFS"
fi

# ------------------------------------------------------------- 5. verify/list
[ "$(dd if="$BZIMAGE" bs=1 skip=514 count=4 2>/dev/null)" = HdrS ] || die "bad $BZIMAGE"
if command -v readelf >/dev/null 2>&1; then
    is_x86_64_elf "$VMLINUX" || die "$VMLINUX is not an ELF64 x86-64 executable"
fi

log "outputs:"
for f in "$BZIMAGE" "$VMLINUX" "$INITRAMFS"; do
    printf '%-60s %10s bytes (%s)\n' "$f" "$(stat -c %s "$f")" "$(du -h "$f" | cut -f1)"
done
[ -f "$KINFO" ] && sed 's/^/  /' "$KINFO"
exit 0
