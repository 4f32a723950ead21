#!/usr/bin/env bash
# Manual check (not run by CI): packaging/vmm-fleet.service under a real systemd, on a
# host WITHOUT systemd as PID 1 (a build container). systemd is booted as PID 1 of new
# pid/mount/uts/ipc/cgroup namespaces and starts only the unit (a drop-in keeps it off
# sysinit.target, whose units would touch the host, runs it as a throw-away user instead
# of vmm-fleet, and runs target/release/vmm-fleet). Checks: the unit starts (READY=1,
# STATUS=), its sandbox is applied (no capabilities, NoNewPrivs, seccomp, no core), the
# example VM's heartbeats; a reload; a killed VM is restarted without the service
# failing; a stopped (hung) supervisor is restarted by the watchdog, and a running one
# is not. Everything it makes (user, /etc/vmm-fleet, /var/{log,lib}/vmm-fleet, the
# cgroups systemd made, /dev/kvm's mode) is undone at exit.
#   .ci/try-unit-under-systemd.sh [VMM_FLEET_BINARY]   (default target/release/vmm-fleet)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/vmm-fleet}")
[ "$(id -u)" -eq 0 ] || { echo "try-unit-under-systemd: run as root" >&2; exit 2; }
[ "$(cat /proc/1/comm)" != systemd ] || { echo "try-unit-under-systemd: systemd is PID 1 here; use systemctl" >&2; exit 2; }
[ -x "$bin" ] || { echo "try-unit-under-systemd: no $bin" >&2; exit 2; }
for p in /etc/vmm-fleet /var/log/vmm-fleet /var/lib/vmm-fleet /opt/vmm-fleet-sdtest; do
  [ ! -e "$p" ] || { echo "try-unit-under-systemd: $p exists (package installed?); not touching it" >&2; exit 2; }
done

user=vmmsdtest$$
work=$(mktemp -d /tmp/vmm-fleet-sdtest.XXXXXX)
kvm_owner=$(stat -c '%u:%g' /dev/kvm)
kvm_mode=$(stat -c '%a' /dev/kvm)
cg_before=$(ls -d /sys/fs/cgroup/*/init.scope /sys/fs/cgroup/*/system.slice 2>/dev/null || true)
pid1=
passed=0
failed=0
check() {
  local what=$1
  shift
  if "$@"; then echo "  ok: $what"; passed=$((passed + 1)); else echo "  FAIL: $what" >&2; failed=$((failed + 1)); fi
}
cleanup() {
  if [ -n "$pid1" ]; then kill -KILL "$pid1" 2>/dev/null || true; sleep 1; fi
  chown "$kvm_owner" /dev/kvm || true
  chmod "$kvm_mode" /dev/kvm || true
  rm -rf /etc/vmm-fleet /var/log/vmm-fleet /var/lib/vmm-fleet /opt/vmm-fleet-sdtest "$work"
  getent passwd "$user" >/dev/null && userdel "$user" 2>/dev/null
  getent group "$user" >/dev/null && groupdel "$user" 2>/dev/null
  # The cgroups the namespaced systemd made (and only those), once empty.
  for d in /sys/fs/cgroup/*/init.scope /sys/fs/cgroup/*/system.slice; do
    [ -d "$d" ] || continue
    grep -qxF "$d" <<<"$cg_before" && continue
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}
trap cleanup EXIT

useradd -r -M -d /nonexistent -s /usr/sbin/nologin "$user"
mkdir -p /opt/vmm-fleet-sdtest /etc/vmm-fleet/vms.d "$work/units/vmm-fleet.service.d"
cp "$bin" /opt/vmm-fleet-sdtest/vmm-fleet
sed 's/^metrics_address: .*/metrics_address: 127.0.0.1:0/' packaging/etc/fleet.yaml >/etc/vmm-fleet/fleet.yaml
sed 's/heartbeat_ms: 5000/heartbeat_ms: 500/' packaging/examples/example.yaml >/etc/vmm-fleet/vms.d/example.yaml
cp packaging/vmm-fleet.service "$work/units/"
cat >"$work/units/vmm-test.target" <<EOF
[Unit]
DefaultDependencies=no
Wants=vmm-fleet.service
EOF
cat >"$work/units/vmm-fleet.service.d/test.conf" <<EOF
[Unit]
DefaultDependencies=no
[Service]
User=$user
Group=$user
SupplementaryGroups=
ExecStart=
ExecStart=/opt/vmm-fleet-sdtest/vmm-fleet up --settings /etc/vmm-fleet/fleet.yaml /etc/vmm-fleet/vms.d
StandardOutput=append:$work/up.log
StandardError=append:$work/up.log
EOF
chgrp "$user" /dev/kvm
chmod 660 /dev/kvm

unshare --pid --fork --mount --mount-proc --uts --ipc --cgroup \
  env -i container=vmm-fleet-test PATH=/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_UNIT_PATH="$work/units:" \
  /lib/systemd/systemd --system --unit=vmm-test.target >"$work/pid1.log" 2>&1 &
unshare_pid=$!
for _ in $(seq 50); do
  pid1=$(pgrep -P "$unshare_pid" -x systemd || true)
  [ -n "$pid1" ] && break
  sleep 0.1
done
[ -n "$pid1" ] || { echo "systemd did not start" >&2; cat "$work/pid1.log" >&2; exit 1; }
sctl() { nsenter -t "$pid1" -m -p -- systemctl "$@" 2>/dev/null; }
prop() { sctl show vmm-fleet -p "$1" --value; }
until_ok() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do [ $SECONDS -lt $end ] || return 1; sleep 0.5; done
}
heartbeats() {
  local c
  c=$(grep -c heartbeat /var/log/vmm-fleet/example.console 2>/dev/null) || true
  echo "${c:-0}"
}
more_heartbeats_than() { [ "$(heartbeats)" -gt "$1" ]; }

echo "== start"
active() { [ "$(sctl is-active vmm-fleet)" = active ]; }
check "vmm-fleet.service active (Type=notify: READY=1 arrived)" until_ok 60 active
check "STATUS= shows the example running" until_ok 20 bash -c "nsenter -t $pid1 -m -p -- systemctl show vmm-fleet -p StatusText --value | grep -q '^1 running'"
main=$(pgrep -f '^/opt/vmm-fleet-sdtest/vmm-fleet up' | head -n 1)
echo "  supervisor pid $main (host), unit: $(prop MainPID) (namespace)"
grep -E '^(Uid|NoNewPrivs|Seccomp|CapEff|CapBnd):' "/proc/$main/status" | sed 's/^/  | /'
check "sandbox applied: NoNewPrivs 1, seccomp filter, no capabilities, core limit 0" \
  bash -c "grep -q '^NoNewPrivs:.1' /proc/$main/status && grep -q '^Seccomp:.2' /proc/$main/status &&
           grep -q '^CapEff:.0000000000000000' /proc/$main/status && grep -q '^CapBnd:.0000000000000000' /proc/$main/status &&
           grep -Eq '^Max core file size +0 +0' /proc/$main/limits"
echo "  oom_score_adj: $(cat "/proc/$main/oom_score_adj") (OOMScoreAdjust=-500; 0 where root may not lower it)"
n=$(heartbeats)
check "the example VM's heartbeats go on" until_ok 20 more_heartbeats_than "$n"

echo "== reload, a killed VM"
sctl reload vmm-fleet
check "systemctl reload: the fleet reloads" until_ok 20 grep -q 'reload: ' "$work/up.log"
vm=$(pgrep -P "$main" -f 'run-vm' | head -n 1)
kill -KILL "$vm"
check "a killed VM is restarted; the service stays active, not restarted" \
  until_ok 30 bash -c "[ \$(grep -c 'vm example: running' '$work/up.log') -ge 2 ] &&
                       [ \"\$(nsenter -t $pid1 -m -p -- systemctl is-active vmm-fleet)\" = active ] &&
                       [ \"\$(nsenter -t $pid1 -m -p -- systemctl show vmm-fleet -p NRestarts --value)\" = 0 ]"

echo "== watchdog (WatchdogSec=30s)"
kill -STOP "$main"
check "a stopped supervisor is restarted by the watchdog (NRestarts 1, a new supervisor)" \
  until_ok 60 bash -c "[ \"\$(nsenter -t $pid1 -m -p -- systemctl show vmm-fleet -p NRestarts --value)\" = 1 ] &&
                       [ \"\$(nsenter -t $pid1 -m -p -- systemctl is-active vmm-fleet)\" = active ]"
restarted=$SECONDS
# A running one is not: 40 s (more than WatchdogSec) without another restart.
while [ $((SECONDS - restarted)) -lt 40 ]; do sleep 1; done
check "a running supervisor is not restarted: still NRestarts 1 after 40 s" test "$(prop NRestarts)" = 1
echo "== $passed passed, $failed failed"
[ "$failed" -eq 0 ]
