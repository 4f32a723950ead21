#!/usr/bin/env bash
# Is KVM on this host usable at all? Boots one built-in guest that powers itself off and
# waits up to 60 s for it, without ever waiting on the process itself: when the host
# kernel is wedged (e.g. its shared workqueue deadlocked, seen on this project's test
# host after 3000 VMs exited at once), a VM process hangs uninterruptibly in the kernel
# and neither `wait` nor SIGKILL would ever return.
#
# Usage: .ci/kvm-canary.sh BINARY. Exit 0: a guest booted and powered off. Exit 2: it did
# not within 60 s; what the kernel says about its hung tasks is printed.
set -uo pipefail
bin=$1
[ -e /dev/kvm ] || exit 0
dir=$(mktemp -d /tmp/vmm-fleet-canary.XXXXXX)
cat > "$dir/canary.yaml" <<'YAML'
name: canary
vcpus: 1
memory_mib: 16
kernel: builtin
builtin:
  then: poweroff
YAML
"$bin" run-vm "$dir/canary.yaml" >"$dir/console" 2>"$dir/log" </dev/null &
pid=$!
for _ in $(seq 600); do
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
  if [ "$state" = Z ] || [ "$state" = gone ]; then
    wait "$pid"; rc=$?
    if [ "$rc" = 0 ] && grep -q poweroff "$dir/console"; then
      rm -rf "$dir"
      exit 0
    fi
    echo "kvm-canary: the canary VM ended with exit code $rc:" >&2
    cat "$dir/log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "kvm-canary: a built-in guest did not power off within 60 s (pid $pid, state $state," >&2
echo "  waiting in $(cat /proc/$pid/wchan 2>/dev/null))." >&2
echo "  Tasks in uninterruptible sleep: $(ps -eo stat | grep -c '^D')" >&2
ps -eo stat,wchan:30 | awk '$1 ~ /^D/ {print $2}' | sort | uniq -c | sort -rn | head -5 >&2
dmesg 2>/dev/null | grep -E "blocked|hung" | tail -3 >&2
exit 2
