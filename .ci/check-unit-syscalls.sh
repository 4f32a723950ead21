#!/usr/bin/env bash
# Does vmm-fleet.service's SystemCallFilter= allow every system call the fleet makes?
# Runs `vmm-fleet up` (supervisor and VM children) under strace -f through what the
# service does: start a VM, serve /metrics, ping the watchdog, reload (SIGHUP) with a
# second VM, reexec (SIGUSR2: memfd, exec), stop (SIGTERM); then checks each system
# call seen against the unit's filter, expanded with `systemd-analyze syscall-filter` as
# systemd reads it (an allow list starts from @default; later lines add, `~` lines
# remove, in order).
# A call outside the filter would fail with EPERM under systemd (SystemCallErrorNumber=).
#   .ci/check-unit-syscalls.sh [VMM_FLEET_BINARY]   (default target/release/vmm-fleet)
# Needs root (strace, /dev/kvm), strace, python3, systemd-analyze. Works without systemd.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/vmm-fleet}")
unit=${UNIT:-packaging/vmm-fleet.service}  # UNIT=FILE checks another unit file
for cmd in strace python3 systemd-analyze; do
  command -v "$cmd" >/dev/null || { echo "check-unit-syscalls: needs $cmd" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "check-unit-syscalls: no $bin (cargo build --release)" >&2; exit 2; }

work=$(mktemp -d /tmp/vmm-fleet-syscalls.XXXXXX)
fleet_pid=
strace_pid=
cleanup() {
  if [ -n "$fleet_pid" ] && kill -0 "$fleet_pid" 2>/dev/null; then
    kill -KILL "$fleet_pid" 2>/dev/null || true
  fi
  if [ -n "$strace_pid" ]; then wait "$strace_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

vm() {
  printf 'name: %s\nvcpus: %s\nmemory_mib: 32\nkernel: builtin\nbuiltin:\n  then: idle\n  heartbeat_ms: 100\n' \
    "$1" "$2" >"$work/vms/$1.yaml"
}
mkdir -p "$work/vms" "$work/logs"
vm one 1
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
while True:
    s.recv(4096)
' "$work/notify.sock" &
notify_pid=$!
trap 'kill $notify_pid 2>/dev/null || true; cleanup' EXIT
while [ ! -S "$work/notify.sock" ]; do sleep 0.05; done

env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin NOTIFY_SOCKET="$work/notify.sock" WATCHDOG_USEC=400000 \
  strace -f -qq -o "$work/trace" "$bin" up "$work/vms" --log-dir "$work/logs" \
  --metrics-address 127.0.0.1:0 2>"$work/up.err" &
strace_pid=$!
# The supervisor: strace's child (signals go to it, not to strace).
for _ in $(seq 100); do
  fleet_pid=$(pgrep -P "$strace_pid" -x vmm-fleet || true)
  [ -n "$fleet_pid" ] && break
  sleep 0.1
done
[ -n "$fleet_pid" ] || { echo "check-unit-syscalls: vmm-fleet did not start" >&2; exit 1; }
# until DEADLINE_S COMMAND...
until_ok() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $end ] || { echo "check-unit-syscalls: timed out: $*" >&2; cat "$work/up.err" >&2; exit 1; }
    sleep 0.2
  done
}
until_ok 60 grep -qs 'heartbeat 2' "$work/logs/one.console"
addr=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$work/up.err" | head -n 1)
exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}"
printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
head -c 12 <&3 | grep -q ' 200' || { echo "check-unit-syscalls: /metrics did not answer 200" >&2; exit 1; }
exec 3<&-
vm two 2
kill -HUP "$fleet_pid"
until_ok 60 grep -qs 'heartbeat 2' "$work/logs/two.console"
# Reexec (an upgrade): the new binary asked for its formats, the state in a sealed memfd,
# the exec of the binary by its path, the new program reading it and carrying on.
kill -USR2 "$fleet_pid"
until_ok 60 grep -qs 'reexec: resumed from' "$work/up.err"
size=$(stat -c %s "$work/logs/two.console")
until_ok 60 bash -c "[ \$(stat -c %s '$work/logs/two.console') -gt $size ]"
kill -TERM "$fleet_pid"
rc=0
wait "$strace_pid" || rc=$?
fleet_pid=
[ "$rc" -eq 0 ] || { echo "check-unit-syscalls: up exited $rc" >&2; cat "$work/up.err" >&2; exit 1; }

systemd-analyze syscall-filter >"$work/groups.txt" 2>/dev/null
python3 - "$unit" "$work/groups.txt" "$work/trace" <<'EOF'
import re, sys
unit, groups_txt, trace = sys.argv[1:]
groups, cur = {}, None
for line in open(groups_txt):
    s = line.strip()
    if not s or s.startswith('#'):
        continue
    if line.startswith('@'):
        cur = s.split()[0]
        groups[cur] = []
    elif cur:
        groups[cur].append(s.split()[0])

def expand(name):
    if not name.startswith('@'):
        return {name}
    out = set()
    for x in groups[name]:
        out |= expand(x)
    return out

allowed, allow_list = None, None
for line in open(unit):
    m = re.match(r'^SystemCallFilter=(.*)$', line.strip())
    if not m:
        continue
    value = m.group(1).strip()
    if not value:
        allowed, allow_list = None, None
        continue
    invert = value.startswith('~')
    names = set().union(*(expand(n) for n in value.lstrip('~').split()))
    if allowed is None:
        allow_list = not invert
        allowed = expand('@default') if allow_list else set()
    if invert == (not allow_list):
        allowed |= names   # allow list + name, or deny list + ~name: listed
    else:
        allowed -= names
if allowed is None or not allow_list:
    sys.exit(f'{unit}: no SystemCallFilter= allow list')

used = {}
for line in open(trace):
    m = re.match(r'^\d+\s+([a-z0-9_]+)\(', line)
    if m:
        used[m.group(1)] = used.get(m.group(1), 0) + 1
refused = sorted(set(used) - allowed)
print(f'{len(used)} distinct system calls made; {len(allowed)} allowed by {unit}')
if refused:
    for name in refused:
        print(f'  REFUSED under the unit (EPERM): {name} ({used[name]} calls)')
    sys.exit(1)
print('every system call made is allowed')
EOF
