# RPM %post of portcullis ($1: 1 on install, 2 and more on upgrade). Every step is
# idempotent: the CA is created only when it is missing, the unit enabled only on install.
CONFIG=/etc/portcullis/portcullis.toml
ANCHOR=/usr/share/pki/ca-trust-source/anchors/portcullis-local-ca.pem

make_dir() {
    [ -d "$2" ] || install -d -o root -g root -m "$1" "$2"
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
