# RPM %postun of portcullis ($1: 0 when the package is erased). RPM has no purge: the state
# directory (audit trail, CA key) stays; docs/install.md says how to remove it.
if [ "$1" -eq 0 ]; then
    rm -f /usr/share/pki/ca-trust-source/anchors/portcullis-local-ca.pem
    if command -v update-ca-trust >/dev/null 2>&1; then
        update-ca-trust extract
    fi
    rm -rf /run/portcullis
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
fi
exit 0
