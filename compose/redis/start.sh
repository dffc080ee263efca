#!/bin/sh
# Starts Redis with the botline ACL (botline-acl.conf, beside this script):
# the default user off, the user `botline` with BOTLINE_REDIS_PASSWORD, and,
# when BOTLINE_REDIS_ADMIN_PASSWORD is set, an `admin` user for operators.
# docker-compose.yml and compose/kubernetes (the ConfigMap redis-start, this
# same file) run it as the Redis container's command:
#   sh start.sh [redis-server flags…]
# It writes the ACL with SHA-256 hashes of the passwords (never the
# passwords) to RENDERED_ACL (default /tmp/botline-acl.conf, outside the
# read-only mount this script comes from), then replaces itself with
#   redis-server --include RENDERED_ACL [redis-server flags…]
# so Redis gets the signals. tests/tests/ops.rs and kubernetes.rs run it
# against a local redis-server, with --port and --dir as extra flags.
set -eu

template="$(dirname "$0")/botline-acl.conf"
rendered="${RENDERED_ACL:-/tmp/botline-acl.conf}"
password="${BOTLINE_REDIS_PASSWORD:-}"
admin_password="${BOTLINE_REDIS_ADMIN_PASSWORD:-}"

# The stages put the password into BOTLINE_REDIS_URL as it is, so it must
# need no percent-encoding there: letters, digits and - . _ ~ only.
case "$password" in
"")
    echo "start.sh: BOTLINE_REDIS_PASSWORD is empty: set it (openssl rand -hex 32)" >&2
    exit 1
    ;;
*[!A-Za-z0-9._~-]*)
    echo "start.sh: BOTLINE_REDIS_PASSWORD may hold only letters, digits and - . _ ~ (it goes into BOTLINE_REDIS_URL unencoded): openssl rand -hex 32 makes one" >&2
    exit 1
    ;;
esac

sha256() {
    hash=$(printf '%s' "$1" | sha256sum | cut -d ' ' -f 1)
    if [ "${#hash}" -ne 64 ]; then
        echo "start.sh: sha256sum did not hash the password" >&2
        exit 1
    fi
    echo "$hash"
}

if ! grep -q '^user botline on >CHANGE-ME ' "$template"; then
    echo "start.sh: $template has no 'user botline on >CHANGE-ME' line to put the password in" >&2
    exit 1
fi

botline_hash=$(sha256 "$password")
admin_hash=""
if [ -n "$admin_password" ]; then
    admin_hash=$(sha256 "$admin_password")
fi

umask 077
mkdir -p "$(dirname "$rendered")"
{
    sed "s/^user botline on >CHANGE-ME /user botline on #$botline_hash /" "$template"
    if [ -n "$admin_hash" ]; then
        echo "user admin on #$admin_hash ~* &* +@all"
    fi
} >"$rendered"

exec redis-server --include "$rendered" "$@"
