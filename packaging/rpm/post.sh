# vmm-fleet %post: log and state directories owned by the service user.
for dir in /var/log/vmm-fleet /var/lib/vmm-fleet; do
    install -d -o vmm-fleet -g vmm-fleet -m 0750 "$dir" >/dev/null 2>&1 || install -d -m 0750 "$dir" || :
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
