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
# A host name only: it goes into sed replacements and URLs unescaped.
[[ "$DOMAIN" =~ ^[A-Za-z0-9.-]+$ ]] || fail "DOMAIN must be a host name, got $DOMAIN"

# The monitoring settings name the public endpoint: the one this VPS serves, not the example's.
# `|` never occurs in the URLs (checked by the settings when they load).
sed -e "s|^REDIS_URL=.*|REDIS_URL=$REDIS_URL|" \
    -e "s|^DATABASE_URL=.*|DATABASE_URL=$DATABASE_URL|" \
    -e "s|^OPS_TLS_ENDPOINT=.*|OPS_TLS_ENDPOINT=$DOMAIN:443|" \
    -e "s|^MONITOR_WS_URL=.*|MONITOR_WS_URL=wss://$DOMAIN/ws|" \
    "$example"
