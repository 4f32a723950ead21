# vmm-fleet %posttrans: after an upgrade (marked by %post), the running supervisor execs
# the new binary on the same pid (`vmm-fleet reexec`) and hands its state over: every VM
# keeps running (VMs started from now on run the new binary). Only if that fails is the
# service restarted, which restarts every VM. Runs last in the transaction, after the
# old package's %postun.
if [ -e /run/vmm-fleet-rpm/upgraded ]; then
    rm -rf /run/vmm-fleet-rpm
    sock=/run/vmm-fleet/control.sock
    running=no
    if [ -d /run/systemd/system ]; then
        systemctl is-active --quiet vmm-fleet.service && running=yes
    elif [ -S "$sock" ]; then
        running=yes
    fi
    if [ "$running" = yes ]; then
        if /usr/bin/vmm-fleet reexec --control "$sock"; then
            echo "vmm-fleet: the running fleet now runs the new version; its VMs kept running"
        elif [ -d /run/systemd/system ]; then
            echo "vmm-fleet: reexec failed; restarting vmm-fleet.service (its VMs restart)" >&2
            systemctl try-restart vmm-fleet.service >/dev/null 2>&1 || :
        fi
    fi
fi
exit 0
