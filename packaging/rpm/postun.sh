# vmm-fleet %postun: reload units. An upgrade does not restart the service: %posttrans
# asks the running fleet to reexec into the new binary instead (its VMs keep running).
# On erase, as RPM packages do, the user and /var/log/vmm-fleet are kept (remove them by
# hand if wanted: userdel vmm-fleet; rm -rf /var/log/vmm-fleet). /var/lib/vmm-fleet,
# which %post made, goes only when empty: users keep kernels and disk images there, and
# nothing a user put there is ever removed.
if [ "$1" -eq 0 ] && [ -d /var/lib/vmm-fleet ]; then
    rmdir /var/lib/vmm-fleet 2>/dev/null ||
        echo "vmm-fleet: /var/lib/vmm-fleet is not empty (kernels, disk images?): kept" >&2
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
