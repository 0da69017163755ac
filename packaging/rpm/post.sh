# RPM %post of portcullis ($1: 1 on install, 2 and more on upgrade). Every step is
# idempotent: the CA is created only when it is missing, the unit enabled only on install.
CONFIG=/etc/portcullis/portcullis.toml
ANCHOR=/usr/share/pki/ca-trust-source/anchors/portcullis-local-ca.pem

make_dir() {
    [ -d "$2" ] || install -d -o root -g root -m "$1" "$2"
}

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

# Puts the current host CA's line in, replacing the package's earlier one (a new CA after
# the old key was removed): OpenSSH then accepts the agent's host certificates for the
# names they carry, with StrictHostKeyChecking=yes and no prompt.
ssh_trust() {
    line=$(portcullis ssh known-hosts --config "$CONFIG") || return 1
    printf '%s\n' "$line" | grep -q -- "$SSH_CA_LINE" || return 1
    ssh_untrust
    [ -d /etc/ssh ] || install -d -m 0755 /etc/ssh
    if [ ! -f "$SSH_KNOWN_HOSTS" ]; then
        install -m 0644 /dev/null "$SSH_KNOWN_HOSTS"
    elif [ -s "$SSH_KNOWN_HOSTS" ] && [ -n "$(tail -c 1 "$SSH_KNOWN_HOSTS")" ]; then
        # The operator's last line has no newline: ours must not join it.
        echo >> "$SSH_KNOWN_HOSTS"
    fi
    printf '%s\n' "$line" >> "$SSH_KNOWN_HOSTS"
}

# State (audit trail, logins, the CA key): root's alone. The agent opens the state directory
# to others for traversal only (0711) when it publishes the CA certificate.
make_dir 0700 /var/lib/portcullis
make_dir 0700 /var/log/portcullis
make_dir 0755 /run/portcullis
make_dir 0755 /etc/portcullis/policies

# The TLS CA that PostgreSQL clients verify the proxy against: created once, never replaced
# by an upgrade (a new CA would break every client that trusts the old one).
if cert=$(portcullis ca init --config "$CONFIG"); then
    install -d -m 0755 "$(dirname "$ANCHOR")"
    install -m 0644 "$cert" "$ANCHOR"
    if command -v update-ca-trust >/dev/null 2>&1; then
        update-ca-trust extract
    fi
else
    echo "portcullis: the local CA was not created ($CONFIG did not load); the agent creates it at its first start" >&2
fi
ssh_trust || echo "portcullis: the SSH host CA line was not added to $SSH_KNOWN_HOSTS; fix $CONFIG, then reinstall the package" >&2

if command -v systemctl >/dev/null 2>&1; then
    if [ "$1" -eq 1 ]; then
        systemctl enable portcullis.service >/dev/null 2>&1 || :
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        if [ "$1" -eq 1 ]; then
            systemctl start portcullis.service || echo "portcullis: the agent did not start; configure a target and an issuer in $CONFIG (docs/install.md), then: systemctl start portcullis" >&2
        else
            # The new agent re-adopts the pinned programs: no window without enforcement.
            systemctl try-restart portcullis.service || echo "portcullis: the agent did not restart; see: journalctl -u portcullis" >&2
        fi
    fi
fi
exit 0
