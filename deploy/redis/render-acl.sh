#!/usr/bin/env bash
# Print the Redis ACL file of KEKTECH (deploy/redis/kektech-acl.conf with its placeholders
# filled) on stdout. Passwords come from the environment, never from the command line (ps
# shows arguments): INDEXER_REDIS_PASSWORD, BROADCASTER_REDIS_PASSWORD, OPS_REDIS_PASSWORD,
# ADMIN_REDIS_PASSWORD.
# REDIS_STREAM_KEY defaults to kektech:events. The file holds SHA-256 hashes only.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/kektech-acl.conf"
STREAM_KEY="${REDIS_STREAM_KEY:-kektech:events}"

fail() { printf 'render-acl: %s\n' "$*" >&2; exit 1; }

# Glob characters in the key would widen the key pattern the users get.
[[ "$STREAM_KEY" =~ ^[A-Za-z0-9:_.-]+$ ]] || fail "REDIS_STREAM_KEY must match [A-Za-z0-9:_.-]+"

sha256() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

hashes=()
for var in INDEXER_REDIS_PASSWORD BROADCASTER_REDIS_PASSWORD OPS_REDIS_PASSWORD ADMIN_REDIS_PASSWORD; do
    value="${!var:-}"
    [ "${#value}" -ge 16 ] || fail "$var must be set (at least 16 characters)"
    hashes+=("$(sha256 "$value")")
done

grep -v '^#' "$TEMPLATE" | sed \
    -e "s/@INDEXER_HASH@/${hashes[0]}/" \
    -e "s/@BROADCASTER_HASH@/${hashes[1]}/" \
    -e "s/@OPS_HASH@/${hashes[2]}/" \
    -e "s/@ADMIN_HASH@/${hashes[3]}/" \
    -e "s/@STREAM_KEY@/${STREAM_KEY}/g"
