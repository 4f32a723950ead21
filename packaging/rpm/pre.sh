# vmm-fleet %pre: the system user the service runs as (member of kvm, which owns
# /dev/kvm). Never fails: in a bare --root without the shadow tools it does nothing.
getent group kvm >/dev/null 2>&1 || groupadd -r kvm >/dev/null 2>&1 || :
getent group vmm-fleet >/dev/null 2>&1 || groupadd -r vmm-fleet >/dev/null 2>&1 || :
if ! getent passwd vmm-fleet >/dev/null 2>&1; then
    useradd -r -g vmm-fleet -G kvm -d /var/lib/vmm-fleet -M -s /sbin/nologin \
        -c "vmm-fleet VM supervisor" vmm-fleet >/dev/null 2>&1 || :
fi
usermod -a -G kvm vmm-fleet >/dev/null 2>&1 || :
exit 0
