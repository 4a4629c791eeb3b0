#!/usr/bin/env bash
# Print the first .env of a VPS: the given .env.example with this host's values filled in.
# Values come from the environment, never the command line (ps shows arguments; REDIS_URL
# holds a password): DOMAIN (the public host name), REDIS_URL, DATABASE_URL.
#   render-env.sh /opt/kektech/.env.example > .env
set -euo pipefail

fail() { printf 'render-env: %s\n' "$*" >&2; exit 1; }

example="${1:?usage: render-env.sh PATH/.env.example}"
[ -f "$example" ] || fail "$example does not exist"
: "${DOMAIN:?DOMAIN must be set}" "${REDIS_URL:?REDIS_URL must be set}" "${DATABASE_URL:?DATABASE_URL must be set}"
# A host name only: it goes into URLs unescaped.
[[ "$DOMAIN" =~ ^[A-Za-z0-9.-]+$ ]] || fail "DOMAIN must be a host name, got $DOMAIN"

# The monitoring settings name the public endpoint: the one this VPS serves, not the example's.
# awk reads the values from its environment (ENVIRON, which takes them as they are: no
# escapes, no `&`), so they never become a command's arguments.
export DOMAIN REDIS_URL DATABASE_URL
awk '
    /^REDIS_URL=/ { print "REDIS_URL=" ENVIRON["REDIS_URL"]; next }
    /^DATABASE_URL=/ { print "DATABASE_URL=" ENVIRON["DATABASE_URL"]; next }
    /^OPS_TLS_ENDPOINT=/ { print "OPS_TLS_ENDPOINT=" ENVIRON["DOMAIN"] ":443"; next }
    /^MONITOR_WS_URL=/ { print "MONITOR_WS_URL=wss://" ENVIRON["DOMAIN"] "/ws"; next }
    { print }
' "$example"
