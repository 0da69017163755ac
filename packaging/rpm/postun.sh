# RPM %postun of portcullis ($1: 0 when the package is erased). RPM has no purge: the state
# directory (audit trail, CA key) stays; docs/install.md says how to remove it.
if [ "$1" -eq 0 ]; then
    rm -f /usr/share/pki/ca-trust-source/anchors/portcullis-local-ca.pem
    if command -v update-ca-trust >/dev/null 2>&1; then
        update-ca-trust extract
    fi
    rm -rf /run/portcullis
    # The package's directories, once empty: cargo-generate-rpm lists files only, so rpm
    # does not remove the directories it created for them. A directory still holding an
    # operator's file (a policy, the .rpmsave of an edited config) stays.
    for dir in /etc/portcullis/examples/analysts /etc/portcullis/examples/ci-ssh \
        /etc/portcullis/examples/production-changes /etc/portcullis/examples \
        /etc/portcullis/policies /etc/portcullis /usr/share/doc/portcullis/docs \
        /usr/share/doc/portcullis /usr/share/licenses/portcullis; do
        rmdir "$dir" 2>/dev/null || :
    done
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
fi
exit 0
