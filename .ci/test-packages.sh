#!/usr/bin/env bash
# Package tests: build the .deb and .rpm (packaging/build-packages.sh), lint and list
# them, check the unit (systemd-analyze verify, and security: exposure at most 2.5),
# install the .deb, run its fleet as the vmm-fleet user the way vmm-fleet.service would
# (empty as installed, then with the example VM enabled; READY=1 and WATCHDOG=1 on a
# notify socket; then upgrade to a newer build with two VMs running: the postinst
# reexecs the fleet, same VM pids), remove and purge it (a user's file in /var/lib/vmm-fleet survives),
# and install the .rpm into a scratch root.
#
# Run as root on Debian 12 (installs what it needs with apt-get). Works without systemd
# as PID 1; /dev/kvm is given to group kvm (0660, as the udev rule does on a real
# host) while the fleet runs, and restored afterwards. The package is purged on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)

passed=0
failed=0
pass() { echo "  ok: $*"; passed=$((passed + 1)); }
fail() { echo "  FAIL: $*" >&2; failed=$((failed + 1)); }
# check DESCRIPTION COMMAND...: one test, passed when COMMAND succeeds.
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

if [ "$(id -u)" -ne 0 ]; then
  echo "test-packages.sh: must run as root (dpkg -i, useradd, /dev/kvm)" >&2
  exit 1
fi

need=()
for pkg_cmd in "lintian:lintian" "rpm:rpm" "systemd:systemd-analyze" "util-linux:setpriv" \
  "dpkg-dev:dpkg-shlibdeps" "binutils:strip" "adduser:adduser" "procps:pgrep" "gzip:gzip" \
  "python3-minimal:python3" "strace:strace"; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== apt-get install ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/vmm-fleet-packages.XXXXXX)
fleet_pid=
notify_pid=
kvm_owner=
kvm_mode=
user_file=
kvm_group_before=yes
user_before=yes
cleanup() {
  if [ -n "$notify_pid" ]; then kill "$notify_pid" 2>/dev/null || true; fi
  if [ -n "$fleet_pid" ] && kill -0 "$fleet_pid" 2>/dev/null; then
    kill -KILL "$fleet_pid" 2>/dev/null || true
    wait "$fleet_pid" 2>/dev/null || true
  fi
  if [ -n "$kvm_mode" ]; then
    chown "$kvm_owner" /dev/kvm || true
    chmod "$kvm_mode" /dev/kvm || true
  fi
  if dpkg-query -W -f='${db:Status-Status}' vmm-fleet 2>/dev/null | grep -qv '^not-installed$'; then
    dpkg -P vmm-fleet >/dev/null 2>&1 || true
  fi
  rm -f /etc/vmm-fleet/vms.d/example2.yaml
  # What the test put where a user would (purge keeps those, by design).
  if [ -n "$user_file" ]; then
    rm -f "$user_file" /etc/vmm-fleet/vms.d/example.yaml
    rmdir /var/lib/vmm-fleet /etc/vmm-fleet/vms.d /etc/vmm-fleet 2>/dev/null || true
  fi
  # Leave the host's users as found: a user or group kvm the package made stays on a
  # real host, but not on a test host that had none (another test there could pick it).
  if [ "$user_before" = no ] && getent passwd vmm-fleet >/dev/null; then
    echo "  note: user vmm-fleet still there (in use?): userdel -f" >&2
    userdel -f vmm-fleet 2>/dev/null || true
    groupdel vmm-fleet 2>/dev/null || true
  fi
  if [ "$kvm_group_before" = no ] && getent group kvm >/dev/null; then
    groupdel kvm 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
echo "== build (packaging/build-packages.sh)"
if bash packaging/build-packages.sh "$work/out" >"$work/build.log" 2>&1; then
  pass "both packages build"
else
  tail -n 40 "$work/build.log" >&2
  fail "both packages build"
  echo "packages: $passed passed, $failed failed"
  exit 1
fi
deb=$(ls "$work"/out/vmm-fleet_*_amd64.deb)
rpm=$(ls "$work"/out/vmm-fleet-*.x86_64.rpm)
echo "  $deb"
echo "  $rpm"

# Every file the packages must hold, without the leading / (the systemd unit differs).
expected=(
  usr/bin/vmm-fleet
  etc/vmm-fleet/fleet.yaml
  etc/vmm-fleet/vms.d/README
  usr/share/doc/vmm-fleet/examples/example.yaml
  usr/share/doc/vmm-fleet/README.md
  usr/share/doc/vmm-fleet/copyright
  usr/share/man/man1/vmm-fleet.1.gz
  usr/share/vmm-fleet/prometheus.yml
)
# ... and every file of metrics/ (the top level and targets/).
for f in metrics/* metrics/targets/*; do
  [ -f "$f" ] && expected+=("usr/share/vmm-fleet/${f#metrics/}")
done
# ... among them, by name, those the issue lists.
expected+=(usr/share/vmm-fleet/{prometheus-lab.yml,vmm-fleet-rules.yml,grafana-dashboard.json,README.md})
ls metrics/targets/* >/dev/null  # at least one Prometheus file_sd target file

# ---------------------------------------------------------------------------------------
echo "== lintian"
lintian_rc=0
lintian --fail-on error --display-info --profile debian "$deb" >"$work/lintian.txt" 2>&1 || lintian_rc=$?
sed 's/^/  | /' "$work/lintian.txt"
echo "  lintian: $(grep -c '^E:' "$work/lintian.txt" || true) error(s), $(grep -c '^W:' "$work/lintian.txt" || true) warning(s), $(grep -c '^I:' "$work/lintian.txt" || true) info(s)"
check "lintian: no errors" test "$lintian_rc" -eq 0

# ---------------------------------------------------------------------------------------
echo "== deb contents (dpkg -c) and control"
dpkg -c "$deb" | awk '{print $6}' | sed 's|^\./||' >"$work/deb.list"
deb_missing=()
for p in "${expected[@]}" usr/lib/systemd/system/vmm-fleet.service usr/share/doc/vmm-fleet/changelog.Debian.gz \
  usr/share/lintian/overrides/vmm-fleet; do
  grep -qx "$p" "$work/deb.list" || deb_missing+=("$p")
done
check "deb holds the ${#expected[@]}+3 expected files${deb_missing[*]:+ (missing: ${deb_missing[*]})}" \
  test ${#deb_missing[@]} -eq 0
check "deb: /usr/bin/vmm-fleet is 0755 root" \
  bash -c "dpkg -c '$deb' | grep -Eq '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/vmm-fleet\$'"
dpkg-deb -e "$deb" "$work/control"
check "deb conffiles: fleet.yaml and vms.d/README" \
  bash -c "grep -qx /etc/vmm-fleet/fleet.yaml '$work/control/conffiles' &&
           grep -qx /etc/vmm-fleet/vms.d/README '$work/control/conffiles'"
check "deb: no VM file enabled (no *.yaml in /etc/vmm-fleet/vms.d)" \
  bash -c "! grep -E '^etc/vmm-fleet/vms\.d/.*\.ya?ml\$' '$work/deb.list'"
check "deb control: amd64, depends on libc6 and adduser, description" \
  bash -c "f=\$(dpkg-deb -f '$deb' Architecture Depends Description);
           grep -qx 'Architecture: amd64' <<<\"\$f\" && grep -q '^Depends: .*libc6' <<<\"\$f\" &&
           grep -q '^Depends: .*adduser' <<<\"\$f\" && grep -q '^Description: .' <<<\"\$f\""
check "deb maintainer scripts: postinst and postrm, sh -n clean" \
  bash -c "sh -n '$work/control/postinst' && sh -n '$work/control/postrm' &&
           grep -q 'adduser' '$work/control/postinst' && grep -q purge '$work/control/postrm'"

# ---------------------------------------------------------------------------------------
echo "== rpm contents (rpm -qlp) and header"
rpm -qlp "$rpm" 2>/dev/null | sed 's|^/||' >"$work/rpm.list"
rpm_missing=()
for p in "${expected[@]}" usr/lib/systemd/system/vmm-fleet.service; do
  grep -qx "$p" "$work/rpm.list" || rpm_missing+=("$p")
done
check "rpm holds the ${#expected[@]}+1 expected files${rpm_missing[*]:+ (missing: ${rpm_missing[*]})}" \
  test ${#rpm_missing[@]} -eq 0
check "rpm config(noreplace): fleet.yaml and vms.d/README; no VM file enabled" \
  bash -c "c=\$(rpm -qp --configfiles '$rpm' 2>/dev/null);
           grep -qx /etc/vmm-fleet/fleet.yaml <<<\"\$c\" && grep -qx /etc/vmm-fleet/vms.d/README <<<\"\$c\" &&
           ! grep -E '^etc/vmm-fleet/vms\.d/.*\.ya?ml\$' '$work/rpm.list' &&
           rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' '$rpm' 2>/dev/null | grep -q '^/etc/vmm-fleet/fleet.yaml cn\$'"
check "rpm header: x86_64, license, summary, libc requirement" \
  bash -c "[ \"\$(rpm -qp --qf '%{ARCH}|%{LICENSE}' '$rpm' 2>/dev/null)\" = 'x86_64|Apache-2.0 OR BSD-3-Clause' ] &&
           [ -n \"\$(rpm -qp --qf '%{SUMMARY}' '$rpm' 2>/dev/null)\" ] &&
           rpm -qpR '$rpm' 2>/dev/null | grep -q '^libc.so.6'"
check "rpm scriptlets: pre, post, preun, postun" \
  bash -c "s=\$(rpm -qp --scripts '$rpm' 2>/dev/null);
           for k in preinstall postinstall preuninstall postuninstall; do grep -q \"^\$k scriptlet\" <<<\"\$s\" || exit 1; done"

# ---------------------------------------------------------------------------------------
echo "== dpkg -i"
dpkg -P vmm-fleet >/dev/null 2>&1 || true
kvm_group_before=no
getent group kvm >/dev/null && kvm_group_before=yes
user_before=no
getent passwd vmm-fleet >/dev/null && user_before=yes
if dpkg -i "$deb" >"$work/dpkg-i.log" 2>&1; then
  pass "dpkg -i"
else
  cat "$work/dpkg-i.log" >&2
  fail "dpkg -i"
  echo "packages: $passed passed, $failed failed"
  exit 1
fi
check "user vmm-fleet: system user, group vmm-fleet, member of kvm, no login shell" \
  bash -c "u=\$(getent passwd vmm-fleet) && [ \"\$(id -u vmm-fleet)\" -lt 1000 ] &&
           [ \"\$(id -gn vmm-fleet)\" = vmm-fleet ] && id -nG vmm-fleet | tr ' ' '\n' | grep -qx kvm &&
           [[ \"\${u##*:}\" == */nologin ]]"
check "/var/log/vmm-fleet and /var/lib/vmm-fleet: vmm-fleet:vmm-fleet 750" \
  bash -c "[ \"\$(stat -c '%U:%G %a' /var/log/vmm-fleet)\" = 'vmm-fleet:vmm-fleet 750' ] &&
           [ \"\$(stat -c '%U:%G %a' /var/lib/vmm-fleet)\" = 'vmm-fleet:vmm-fleet 750' ]"
check "man page installed and renders" bash -c "zcat /usr/share/man/man1/vmm-fleet.1.gz | grep -q '^.TH VMM-FLEET 1'"
echo "# edited by the admin" >>/etc/vmm-fleet/fleet.yaml
check "reinstall (upgrade path): dpkg -i again keeps an edited conffile" \
  bash -c "dpkg -i '$deb' >'$work/dpkg-i2.log' 2>&1 && grep -qx '# edited by the admin' /etc/vmm-fleet/fleet.yaml &&
           [ \"\$(stat -c '%U:%G %a' /var/log/vmm-fleet)\" = 'vmm-fleet:vmm-fleet 750' ] ||
           { cat '$work/dpkg-i2.log' >&2; false; }"

echo "== systemd-analyze verify"
# The .deb ships it in /usr/lib/systemd/system; /lib is /usr/lib on Debian 12.
unit=/lib/systemd/system/vmm-fleet.service
check "$unit installed" test -f "$unit"
sa_rc=0
systemd-analyze verify --man=no "$unit" >"$work/verify.txt" 2>&1 || sa_rc=$?
sed 's/^/  | /' "$work/verify.txt"
check "systemd-analyze verify accepts $unit" test "$sa_rc" -eq 0
check "systemd-analyze verify: nothing to say about vmm-fleet.service" \
  bash -c "! grep -q 'vmm-fleet.service' '$work/verify.txt'"
check "unit: Type=notify, runs as vmm-fleet with kvm, up --settings /etc/vmm-fleet/fleet.yaml /etc/vmm-fleet/vms.d" \
  bash -c "grep -qx 'Type=notify' $unit && grep -qx 'User=vmm-fleet' $unit && grep -qx 'SupplementaryGroups=kvm' $unit &&
           grep -qx 'ExecStart=/usr/bin/vmm-fleet up --settings /etc/vmm-fleet/fleet.yaml /etc/vmm-fleet/vms.d' $unit &&
           grep -qx 'ExecReload=/bin/kill -HUP \$MAINPID' $unit && grep -qx 'KillMode=mixed' $unit &&
           grep -qx 'DeviceAllow=/dev/kvm rw' $unit && grep -qx 'LogsDirectory=vmm-fleet' $unit"
check "unit contains a VM's failure: OOMPolicy=continue, OOMScoreAdjust<0, WatchdogSec, Delegate, LimitCORE=0" \
  bash -c "grep -qx 'OOMPolicy=continue' $unit && grep -Eqx 'OOMScoreAdjust=-[0-9]+' $unit &&
           grep -Eqx 'WatchdogSec=[1-9][0-9]*s' $unit && grep -qx 'Delegate=yes' $unit && grep -qx 'LimitCORE=0' $unit"
check "unit: no capabilities, native syscalls only, /proc limited, IP only to localhost" \
  bash -c "grep -qx 'CapabilityBoundingSet=' $unit && grep -qx 'AmbientCapabilities=' $unit &&
           grep -qx 'SystemCallArchitectures=native' $unit && grep -q '^SystemCallFilter=@system-service' $unit &&
           grep -qx 'ProtectProc=invisible' $unit && grep -qx 'ProcSubset=pid' $unit &&
           grep -qx 'IPAddressDeny=any' $unit && grep -qx 'IPAddressAllow=localhost' $unit &&
           grep -qx 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK' $unit"
# The default metrics address must be inside IPAddressAllow=localhost.
check "fleet.yaml's metrics_address is a loopback address (IPAddressAllow=localhost)" \
  grep -Eqx 'metrics_address: (127\.[0-9.]+|\[::1\]):[0-9]+' /etc/vmm-fleet/fleet.yaml
# The exposure level systemd computes from the unit (0 = locked down, 10 = wide open);
# --threshold is in tenths.
echo "== systemd-analyze security"
sec_rc=0
systemd-analyze security --offline=true --threshold=25 --no-pager "$unit" >"$work/security.txt" 2>&1 || sec_rc=$?
grep -E '✗' "$work/security.txt" | sed 's/^/  | /' || true
exposure=$(sed -n 's/.*Overall exposure level for vmm-fleet\.service: \([0-9.]*\).*/\1/p' "$work/security.txt")
echo "  exposure level: ${exposure:-?} (at most 2.5)"
check "systemd-analyze security: exposure ${exposure:-?} <= 2.5 (--threshold=25 exit $sec_rc)" \
  bash -c "[ '$sec_rc' -eq 0 ] && [ -n '$exposure' ] && awk 'BEGIN { exit !($exposure <= 2.5) }'"
# SystemCallFilter= refuses (EPERM) what it does not list: run the fleet under strace
# and check every call it makes against the filter.
sc_rc=0
bash .ci/check-unit-syscalls.sh target/release/vmm-fleet >"$work/syscalls.txt" 2>&1 || sc_rc=$?
sed 's/^/  | /' "$work/syscalls.txt"
check "every system call the fleet makes is allowed by the unit's SystemCallFilter= (strace)" test "$sc_rc" -eq 0

echo "== installed binary: validate, and run the fleet as vmm-fleet (empty, then the example)"
check "vmm-fleet --version" bash -c "/usr/bin/vmm-fleet --version | grep -q '^vmm-fleet '"
check "example VM not enabled after install: no *.yaml in /etc/vmm-fleet/vms.d" \
  bash -c "! ls /etc/vmm-fleet/vms.d/ | grep -Eq '\.ya?ml\$'"
check "vmm-fleet validate on the installed (empty) fleet: 0 VM(s), all valid" \
  bash -c "/usr/bin/vmm-fleet validate --settings /etc/vmm-fleet/fleet.yaml /etc/vmm-fleet/vms.d | grep -q ' 0 VM(s), all valid'"

# /dev/kvm as the udev rule leaves it on a real host: root:kvm 0660.
kvm_owner=$(stat -c '%u:%g' /dev/kvm)
kvm_mode=$(stat -c '%a' /dev/kvm)
chgrp kvm /dev/kvm
chmod 660 /dev/kvm
# The installed settings serve metrics on 127.0.0.1:9464; if something else holds
# that port here, let the kernel pick one rather than fail on a busy CI host.
metrics=()
if (exec 3<>/dev/tcp/127.0.0.1/9464) 2>/dev/null; then
  echo "  note: 127.0.0.1:9464 is in use here; running with --metrics-address 127.0.0.1:0"
  metrics=(--metrics-address 127.0.0.1:0)
fi
console=/var/log/vmm-fleet/example.console
# systemd's side of Type=notify: a datagram socket that records what the fleet sends.
chmod 0711 "$work"  # the vmm-fleet user must reach the socket below
mkdir -m 0755 "$work/notify"
python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1] + ".tmp")
os.chmod(sys.argv[1] + ".tmp", 0o777)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
with open(sys.argv[2], "a") as out:
    while True:
        out.write(s.recv(4096).decode().rstrip("\n") + "\n")
        out.flush()
' "$work/notify/sock" "$work/notify.log" &
notify_pid=$!
while [ ! -S "$work/notify/sock" ] && kill -0 "$notify_pid" 2>/dev/null; do sleep 0.05; done
# start_fleet NAME: as the unit does: user vmm-fleet with its groups, a clean environment,
# $LOGS_DIRECTORY, $NOTIFY_SOCKET, and WatchdogSec= as $WATCHDOG_USEC (1 s here) with
# $WATCHDOG_PID = the supervisor's pid (sh execs it, keeping its pid).
start_fleet() {
  : >"$work/notify.log"
  # RuntimeDirectory=vmm-fleet: where the control socket goes.
  install -d -o vmm-fleet -g vmm-fleet -m 0750 /run/vmm-fleet
  setpriv --reuid=vmm-fleet --regid=vmm-fleet --init-groups \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LOGS_DIRECTORY=/var/log/vmm-fleet \
    RUNTIME_DIRECTORY=/run/vmm-fleet \
    NOTIFY_SOCKET="$work/notify/sock" WATCHDOG_USEC=1000000 \
    sh -c 'WATCHDOG_PID=$$ exec "$@"' sh \
    /usr/bin/vmm-fleet up "${metrics[@]}" --settings /etc/vmm-fleet/fleet.yaml /etc/vmm-fleet/vms.d \
    >"$work/up-$1.out" 2>"$work/up-$1.err" &
  fleet_pid=$!
}
# wait_for SECONDS COMMAND...: until COMMAND succeeds, the fleet exits, or the time is up.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  while [ $SECONDS -lt $deadline ] && kill -0 "$fleet_pid" 2>/dev/null && ! "$@"; do sleep 0.2; done
  "$@"
}
# stop_fleet NAME: SIGTERM; it must stop within 30 s (stop_grace_s is 10). Sets up_rc.
stop_fleet() {
  up_rc=0
  kill -TERM "$fleet_pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$fleet_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  kill -KILL "$fleet_pid" 2>/dev/null && echo "  fleet did not stop within 30 s: SIGKILL" >&2
  wait "$fleet_pid" || up_rc=$?
  fleet_pid=
  if [ "$up_rc" -ne 0 ]; then
    echo "  --- up stderr ($1):" >&2
    tail -n 20 "$work/up-$1.err" >&2 || true
  fi
}
pings() { grep -cx 'WATCHDOG=1' "$work/notify.log" || true; }

# As installed: no VM. The fleet runs anyway (READY=1, metrics, watchdog).
start_fleet empty
wait_for 30 bash -c "[ \"\$(grep -cx 'WATCHDOG=1' '$work/notify.log')\" -ge 2 ]" || true
check "empty fleet (as installed) runs: READY=1, 'STATUS=0 running', 2 WATCHDOG=1" \
  bash -c "grep -qx 'READY=1' '$work/notify.log' && grep -q '^STATUS=0 running' '$work/notify.log' &&
           [ \"\$(grep -cx 'WATCHDOG=1' '$work/notify.log')\" -ge 2 ]"
sed 's/^/  | notify: /' "$work/notify.log" | sort | uniq -c | sed 's/^ */  /'
stop_fleet empty
check "empty fleet: SIGTERM, exit 0 (exit $up_rc)" test "$up_rc" -eq 0

# Enabled by hand, as the README says.
cp /usr/share/doc/vmm-fleet/examples/example.yaml /etc/vmm-fleet/vms.d/
check "enabled example validates: 1 VM(s), all valid" \
  bash -c "/usr/bin/vmm-fleet validate --settings /etc/vmm-fleet/fleet.yaml /etc/vmm-fleet/vms.d | grep -q ' 1 VM(s), all valid'"
start_fleet example
wait_for 40 grep -qs 'heartbeat 1' "$console" || true
check "example VM's console shows 'heartbeat 1' ($console)" grep -q 'heartbeat 1' "$console"
vm_pids=$(pgrep -P "$fleet_pid" || true)
vm_users() { for p in $vm_pids; do stat -c %U "/proc/$p"; done | sort -u; }
check "supervisor and its VM process run as vmm-fleet, not root" \
  test "$(stat -c %U "/proc/$fleet_pid")/$(vm_users | tr '\n' ' ')" = "vmm-fleet/vmm-fleet "
# The jail where the children share the supervisor's user (as under the unit): each VM
# process has no_new_privs, its seccomp filter, is not dumpable (its /proc files are
# root's), runs in its own session, and has a higher oom_score_adj than the supervisor.
jailed() {
  local p sup_oom sup_sid
  sup_oom=$(cat "/proc/$fleet_pid/oom_score_adj")
  sup_sid=$(sed 's/.*) //' "/proc/$fleet_pid/stat" | cut -d' ' -f4)
  [ -n "$vm_pids" ] || return 1
  for p in $vm_pids; do
    [ "$(awk '$1 == "NoNewPrivs:" { print $2 }' "/proc/$p/status")" = 1 ] &&
      [ "$(awk '$1 == "Seccomp:" { print $2 }' "/proc/$p/status")" = 2 ] &&
      [ "$(stat -c %u "/proc/$p/status")" = 0 ] &&
      [ "$(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f4)" != "$sup_sid" ] &&
      [ "$(cat "/proc/$p/oom_score_adj")" -gt "$sup_oom" ] || return 1
  done
}
check "VM process jailed under a vmm-fleet supervisor: NoNewPrivs 1, Seccomp 2, not dumpable, own session, oom_score_adj above the supervisor's" \
  jailed
seen=$(pings)
wait_for 20 bash -c "[ \"\$(grep -cx 'WATCHDOG=1' '$work/notify.log')\" -ge $((seen + 3)) ]" || true
check "sd_notify (Type=notify): READY=1, a STATUS= line, WATCHDOG=1 keeps arriving ($(pings) so far)" \
  bash -c "grep -qx 'READY=1' '$work/notify.log' && grep -q '^STATUS=1 running' '$work/notify.log' &&
           [ \"\$(grep -cx 'WATCHDOG=1' '$work/notify.log')\" -ge $((seen + 3)) ]"
sed 's/^/  | notify: /' "$work/notify.log" | sort | uniq -c | sed 's/^ */  /'
check "console and log files belong to vmm-fleet" \
  bash -c "[ \"\$(stat -c %U $console /var/log/vmm-fleet/example.log | sort -u)\" = vmm-fleet ]"

echo "== upgrade to a newer build with the fleet running: the VMs keep running (reexec)"
# A second VM, added by a reload, so that two VMs run through the upgrade.
sed 's/^name: .*/name: example2/' /usr/share/doc/vmm-fleet/examples/example.yaml \
  >/etc/vmm-fleet/vms.d/example2.yaml
kill -HUP "$fleet_pid"
wait_for 40 grep -qs 'heartbeat 1' /var/log/vmm-fleet/example2.console || true
vm_pids=$(pgrep -P "$fleet_pid" | sort -n | tr '\n' ' ')
old_exe=$(readlink "/proc/$fleet_pid/exe")
# The same build under a higher version: dpkg replaces /usr/bin/vmm-fleet (a new file).
new_version="$(dpkg-deb -f "$deb" Version)+reexectest"
cargo deb --no-build --deb-version "$new_version" --output "$work/out2" >"$work/build2.log" 2>&1 ||
  tail -n 20 "$work/build2.log" >&2
deb2=$(ls "$work"/out2/vmm-fleet_*_amd64.deb 2>/dev/null | head -n 1)
check "a newer build of the .deb ($new_version)" test -n "$deb2"
resumed_before=$(grep -c 'reexec: resumed from' "$work/up-example.err" || true)
dpkg_rc=0
dpkg -i "$deb2" >"$work/dpkg-upgrade.log" 2>&1 || dpkg_rc=$?
sed 's/^/  | /' "$work/dpkg-upgrade.log"
check "dpkg -i of the newer build with the fleet running (exit $dpkg_rc)" test "$dpkg_rc" -eq 0
check "installed version is $new_version" \
  test "$(dpkg-query -W -f='${Version}' vmm-fleet)" = "$new_version"
wait_for 30 bash -c "[ \$(grep -c 'reexec: resumed from' '$work/up-example.err') -gt $resumed_before ]" || true
check "postinst reexec'd the running fleet into the new binary (same supervisor pid $fleet_pid)" \
  bash -c "kill -0 $fleet_pid && [ \$(grep -c 'reexec: resumed from' '$work/up-example.err') -gt $resumed_before ] &&
           ! readlink /proc/$fleet_pid/exe | grep -q deleted"
echo "  supervisor exe: before $old_exe; after $(readlink "/proc/$fleet_pid/exe")"
check "same VM pids after the upgrade ($vm_pids)" \
  test "$(pgrep -P "$fleet_pid" | sort -n | tr '\n' ' ')" = "$vm_pids"
size=$(stat -c %s "$console")
check "the example VM's heartbeat goes on after the upgrade" \
  wait_for 30 bash -c "[ \$(stat -c %s '$console') -gt $size ]"
check "no VM was restarted by the upgrade" \
  bash -c "[ \$(grep -c 'vm example: starting' '$work/up-example.err') -eq 1 ] &&
           [ \$(grep -c 'vm example2: starting' '$work/up-example.err') -eq 1 ]"
rm -f /etc/vmm-fleet/vms.d/example2.yaml
stop_fleet example
kill "$notify_pid" 2>/dev/null || true
wait "$notify_pid" 2>/dev/null || true
notify_pid=
check "SIGTERM: vmm-fleet up exits 0 (exit $up_rc)" test "$up_rc" -eq 0
if [ "$up_rc" -ne 0 ] || [ ! -s "$console" ]; then
  tail -n 20 /var/log/vmm-fleet/example.log >&2 || true
fi
# Gone, or a zombie its new parent has not reaped yet. (Not `pgrep -u vmm-fleet`: on a
# shared test host another test may run processes as that user while it exists.)
gone() { for p in "$@"; do [ ! -e "/proc/$p" ] || grep -q '^[0-9]* (.*) Z' "/proc/$p/stat" || return 1; done; }
check "the example fleet's VM process is gone ($vm_pids)" gone $vm_pids
chown "$kvm_owner" /dev/kvm
chmod "$kvm_mode" /dev/kvm
kvm_mode=
check "/dev/kvm permissions restored ($kvm_owner $(stat -c %a /dev/kvm))" \
  test "$(stat -c '%u:%g' /dev/kvm)" = "$kvm_owner"

echo "== dpkg -r, dpkg -P: what a user put there survives"
# A user's disk image, as an admin would leave one for a VM.
user_file=/var/lib/vmm-fleet/disk-of-a-user.img
printf 'user data\n' >"$user_file"
chown vmm-fleet:vmm-fleet "$user_file"
check "dpkg -r" bash -c "dpkg -r vmm-fleet >'$work/dpkg-r.log' 2>&1 || { cat '$work/dpkg-r.log' >&2; false; }"
check "after remove: no /usr/bin/vmm-fleet, conffiles kept, user kept" \
  bash -c "[ ! -e /usr/bin/vmm-fleet ] && [ -f /etc/vmm-fleet/fleet.yaml ] && getent passwd vmm-fleet >/dev/null"
check "dpkg -P" bash -c "dpkg -P vmm-fleet >'$work/dpkg-p.log' 2>&1 || { cat '$work/dpkg-p.log' >&2; false; }"
sed 's/^/  | /' "$work/dpkg-p.log"
# userdel refuses while any process runs as the user: say which, if one did (on a
# shared test host, another test may run processes as vmm-fleet while it exists).
user_in_use() {
  local pid
  pid=$(sed -n 's/.*used by process \([0-9]*\).*/\1/p' "$1" | head -n 1)
  if [ -n "$pid" ]; then
    ps -o pid,ppid,user,args -p "$pid" | sed 's/^/  | user vmm-fleet in use by: /' || true
  fi
}
user_in_use "$work/dpkg-p.log"
check "after purge: the user's file in /var/lib/vmm-fleet survives, intact" \
  bash -c "[ \"\$(cat '$user_file')\" = 'user data' ]"
check "after purge: the kept /var/lib/vmm-fleet is root's (0750), and the note says so" \
  bash -c "[ \"\$(stat -c '%U:%G %a' /var/lib/vmm-fleet)\" = 'root:root 750' ] &&
           grep -q '/var/lib/vmm-fleet is not empty' '$work/dpkg-p.log'"
check "after purge: the VM file the admin enabled is kept, the package's conffiles are gone" \
  bash -c "[ -f /etc/vmm-fleet/vms.d/example.yaml ] && [ ! -e /etc/vmm-fleet/fleet.yaml ] &&
           [ ! -e /etc/vmm-fleet/vms.d/README ]"
check "after purge: /var/log/vmm-fleet (the package's logs) is gone" test ! -e /var/log/vmm-fleet
# The admin's own clean-up; then a purge with nothing of a user's leaves nothing.
rm -rf /var/lib/vmm-fleet /etc/vmm-fleet
check "dpkg -i, dpkg -P again (nothing of a user's this time)" \
  bash -c "{ dpkg -i '$deb' && dpkg -P vmm-fleet; } >'$work/dpkg-ip.log' 2>&1 || { cat '$work/dpkg-ip.log' >&2; false; }"
user_in_use "$work/dpkg-ip.log"
left=()
for p in /usr/bin/vmm-fleet /etc/vmm-fleet /var/log/vmm-fleet /var/lib/vmm-fleet /run/vmm-fleet \
  /lib/systemd/system/vmm-fleet.service /usr/share/vmm-fleet /usr/share/doc/vmm-fleet \
  /usr/share/man/man1/vmm-fleet.1.gz; do
  [ -e "$p" ] && left+=("$p")
done
check "after purge: no files left${left[*]:+ (left: ${left[*]})}" test ${#left[@]} -eq 0
check "after purge: no user or group vmm-fleet, no kvm membership" \
  bash -c "! getent passwd vmm-fleet && ! getent group vmm-fleet && ! getent group kvm | grep -q vmm-fleet"
check "after purge: group kvm kept (existed before: $kvm_group_before)" bash -c "getent group kvm >/dev/null"
check "after purge: dpkg -l vmm-fleet shows it not installed" \
  bash -c "s=\$(dpkg-query -W -f='\${db:Status-Abbrev}' vmm-fleet 2>/dev/null) || exit 0; [ \"\${s:1:1}\" = n ]"

# ---------------------------------------------------------------------------------------
echo "== rpm -i --root (scratch root)"
# An empty root has no /bin/sh or useradd for the scriptlets, so they are skipped here
# (--noscripts); on a real RPM host %pre makes the user and %post its directories.
root="$work/rpmroot"
mkdir -p "$root"
rpm --root "$root" --initdb
check "rpm -i --root DIR --nodeps --noscripts" \
  bash -c "rpm -i --root '$root' --nodeps --noscripts '$rpm' >'$work/rpm-i.log' 2>&1 || { cat '$work/rpm-i.log' >&2; false; }"
rpm -ql --root "$root" vmm-fleet 2>/dev/null | sed 's|^/||' >"$work/rpm-installed.list" || true
rpm_absent=()
for p in "${expected[@]}" usr/lib/systemd/system/vmm-fleet.service; do
  { grep -qx "$p" "$work/rpm-installed.list" && [ -f "$root/$p" ]; } || rpm_absent+=("$p")
done
check "rpm -ql --root lists them and they exist under DIR${rpm_absent[*]:+ (missing: ${rpm_absent[*]})}" \
  test ${#rpm_absent[@]} -eq 0
check "rpm-installed binary validates the rpm-installed fleet" \
  "$root/usr/bin/vmm-fleet" validate --settings "$root/etc/vmm-fleet/fleet.yaml" "$root/etc/vmm-fleet/vms.d"
check "rpm -e --root removes it" \
  bash -c "rpm -e --root '$root' --noscripts vmm-fleet 2>/dev/null && [ ! -e '$root/usr/bin/vmm-fleet' ]"

echo "== package tests took $(($(date +%s) - start)) s"
echo "packages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
