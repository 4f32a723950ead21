#!/usr/bin/env bash
# Build the vmm-fleet .deb (cargo-deb) and .rpm (cargo-generate-rpm) from a release build.
# Installs the cargo tools when missing. Prints the two package paths last.
#   packaging/build-packages.sh [OUT_DIR]    (default: target/packages)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/packages}
mkdir -p "$out" target/packaging

need=()
cargo deb --version >/dev/null 2>&1 || need+=(cargo-deb)
cargo generate-rpm --version >/dev/null 2>&1 || need+=(cargo-generate-rpm)
if [ ${#need[@]} -gt 0 ]; then
  echo "== cargo install ${need[*]}"
  cargo install "${need[@]}" --locked
fi

echo "== cargo build --release"
cargo build --release
bin=target/release/vmm-fleet
[ -x "$bin" ] || { echo "no $bin" >&2; exit 1; }

# Files both packages take from target/packaging: the man page, gzip'd reproducibly,
# and (for the rpm, which does not strip) a stripped copy of the binary.
gzip -9n -c packaging/vmm-fleet.1 > target/packaging/vmm-fleet.1.gz
cp "$bin" target/packaging/vmm-fleet
strip --strip-unneeded target/packaging/vmm-fleet 2>/dev/null || true

echo "== cargo deb"
rm -f "$out"/vmm-fleet_*.deb "$out"/vmm-fleet-*.rpm
deb=$(cargo deb --no-build --output "$out" | tail -n 1)
echo "== cargo generate-rpm"
cargo generate-rpm --output "$out/"
rpm=$(ls "$out"/vmm-fleet-*.rpm)
echo "$deb"
echo "$rpm"
