# RPM %postun of portcullis ($1: 0 when the package is erased). RPM has no purge: the state
# directory (audit trail, CA key) stays; docs/install.md says how to remove it.

# OpenSSH's system-wide known_hosts. The package's line is the `@cert-authority` line of the
# agent's SSH host CA, recognised by that key's comment; lines of anyone else stay as they are.
SSH_KNOWN_HOSTS=/etc/ssh/ssh_known_hosts
SSH_CA_LINE='^@cert-authority .* portcullis SSH host CA$'

# Takes the package's line out (a file left empty by that goes, with /etc/ssh if the package
# made it). `cat >` keeps the file's owner and mode.
ssh_untrust() {
    [ -f "$SSH_KNOWN_HOSTS" ] || return 0
    grep -q -- "$SSH_CA_LINE" "$SSH_KNOWN_HOSTS" || return 0
    grep -v -- "$SSH_CA_LINE" "$SSH_KNOWN_HOSTS" > "$SSH_KNOWN_HOSTS.portcullis-new" || true
    cat "$SSH_KNOWN_HOSTS.portcullis-new" > "$SSH_KNOWN_HOSTS"
    rm -f "$SSH_KNOWN_HOSTS.portcullis-new"
    if [ ! -s "$SSH_KNOWN_HOSTS" ]; then
        rm -f "$SSH_KNOWN_HOSTS"
        rmdir /etc/ssh 2>/dev/null || true
    fi
}
if [ "$1" -eq 0 ]; then
    rm -f /usr/share/pki/ca-trust-source/anchors/portcullis-local-ca.pem
    ssh_untrust
    if command -v update-ca-trust >/dev/null 2>&1; then
        update-ca-trust extract
    fi
    rm -rf /run/portcullis
    # The package's directories, once empty: cargo-generate-rpm lists files only, so rpm
    # does not remove the directories it created for them. A directory still holding an
    # operator's file (a policy, the .rpmsave of an edited config) stays.
    for dir in /etc/portcullis/examples/analysts /etc/portcullis/examples/ci-ssh \
        /etc/portcullis/examples/production-changes /etc/portcullis/examples/ssh-logins \
        /etc/portcullis/examples/ssh-forwarding /etc/portcullis/examples/ssh-files \
        /etc/portcullis/examples \
        /etc/portcullis/policies /etc/portcullis /usr/share/doc/portcullis/docs \
        /usr/share/doc/portcullis /usr/share/licenses/portcullis; do
        rmdir "$dir" 2>/dev/null || :
    done
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
fi
exit 0
