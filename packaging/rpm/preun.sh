# RPM %preun of portcullis ($1: 0 when the package is erased, 1 on upgrade). On erase: stop
# the agent, disable the unit and detach enforcement, so that erasing the package does not
# leave protected targets refused by pinned programs no installed binary can detach.
if [ "$1" -eq 0 ]; then
    if command -v systemctl >/dev/null 2>&1; then
        if [ -d /run/systemd/system ]; then
            systemctl stop portcullis.service || :
        fi
        systemctl disable portcullis.service >/dev/null 2>&1 || :
    fi
    # Only on a running system: in a chroot or an image build the pins in /sys/fs/bpf belong
    # to the host, never to this installation.
    if [ -d /run/systemd/system ]; then
        portcullis agent --detach --config /etc/portcullis/portcullis.toml || echo "portcullis: enforcement was not detached; run: portcullis agent --detach" >&2
    fi
fi
exit 0
