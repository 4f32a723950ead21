# vmm-fleet %post: log and state directories owned by the service user.
for dir in /var/log/vmm-fleet /var/lib/vmm-fleet; do
    install -d -o vmm-fleet -g vmm-fleet -m 0750 "$dir" >/dev/null 2>&1 || install -d -m 0750 "$dir" || :
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
# An upgrade: %posttrans (after the old package's scriptlets) hands the running fleet
# over to the new binary.
if [ "$1" -ge 2 ]; then
    mkdir -p /run/vmm-fleet-rpm && touch /run/vmm-fleet-rpm/upgraded || :
fi
exit 0
