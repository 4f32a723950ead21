# vmm-fleet %postun: reload units; restart a running service after an upgrade.
# On erase the user, /var/log/vmm-fleet and /var/lib/vmm-fleet are kept, as RPM
# packages do (there is no purge); remove them by hand if wanted:
#   userdel vmm-fleet; rm -rf /var/log/vmm-fleet /var/lib/vmm-fleet
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart vmm-fleet.service >/dev/null 2>&1 || :
    fi
fi
exit 0
