#!/usr/bin/env bash
# Update a KEKTECH checkout to the newest commit of its branch and reload the services
# (docs/deployment.md). Steps, stopping at the first that fails:
#   1. git pull --ff-only
#   2. scripts/install.sh: .venv from uv.lock (uv sync --frozen), node_modules from
#      package-lock.json (npm ci, when it changed)
#   3. python -m indexer migrate
#   4. pm2 startOrReload ecosystem.config.js --update-env, then pm2 save
#
#   deploy/update.sh [--dir /opt/kektech] [--ecosystem FILE] [--dry-run]
#
# Runs as the owner of the checkout (the app user); started as root it runs itself as that
# user, with nothing of root's environment but PATH, LANG and PM2_HOME. The services' own
# settings (the names in .env.example) are removed from its environment: the services read
# .env, and a variable exported in the caller's shell would override it (in the migration,
# and through --update-env in every app and dump.pm2). --dir defaults to the checkout
# holding this script; --ecosystem to its ecosystem.config.js. --dry-run prints the steps
# and changes nothing.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ECOSYSTEM=""
DRY_RUN=0
ARGS=("$@")

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift ;;
        --ecosystem) ECOSYSTEM="${2:?--ecosystem needs a value}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'update: unknown argument %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'update: %s\n' "$*"; }
fail() { printf 'update: ERROR: %s\n' "$*" >&2; exit 1; }

[ -d "$DIR/.git" ] || fail "$DIR is not a git checkout"
DIR="$(cd "$DIR" && pwd)"
ECOSYSTEM="${ECOSYSTEM:-$DIR/ecosystem.config.js}"

OWNER="$(stat -c %U "$DIR")"
if [ "$(id -un)" != "$OWNER" ] && [ "$DRY_RUN" -eq 1 ]; then
    say "would run as $OWNER, the owner of $DIR"
elif [ "$(id -un)" != "$OWNER" ]; then
    [ "$(id -u)" -eq 0 ] || fail "run as $OWNER, the owner of $DIR (or as root)"
    home="$(getent passwd "$OWNER" | cut -d: -f6)"
    say "running as $OWNER"
    # Nothing else of root's environment: PM2 (--update-env) copies the environment it is
    # given into every app and dump.pm2, where the owner reads it (`pm2 env`).
    exec runuser -u "$OWNER" -- env -i HOME="$home" USER="$OWNER" LOGNAME="$OWNER" \
        LANG="${LANG:-C.UTF-8}" PATH="$PATH" ${PM2_HOME:+PM2_HOME="$PM2_HOME"} \
        bash "${BASH_SOURCE[0]}" "${ARGS[@]}"
fi

# PM2_HOME stays: it is also PM2's own, naming the daemon to reload. Again after the pull:
# the new release's .env.example may name more.
unset_settings() {
    local name
    while read -r name; do
        [ "$name" = PM2_HOME ] || unset "$name"
    done < <(sed -nE 's/^#? ?([A-Z][A-Z0-9_]*)=.*/\1/p' "$DIR/.env.example")
}
unset_settings

PM2="$DIR/node_modules/.bin/pm2"
STEPS=4
step=0
# run NAME COMMAND...: one numbered step; the first failure ends the update.
run() {
    local name="$1" status=0
    shift
    step=$((step + 1))
    if [ "$DRY_RUN" -eq 1 ]; then
        say "[$step/$STEPS] $name: would run: $*"
        return 0
    fi
    say "[$step/$STEPS] $name: $*"
    (cd "$DIR" && "$@") || status=$?
    if [ "$status" -ne 0 ]; then
        fail "step $step/$STEPS ($name) failed with exit code $status; later steps did not run." \
            "The services still run the previous release (see docs/deployment.md, Rollback)."
    fi
}

revision() { git -C "$DIR" rev-parse --short HEAD 2>/dev/null || printf 'unknown'; }
before="$(revision)"
[ "$DRY_RUN" -eq 0 ] || say "dry run: nothing is changed (checkout $DIR at $before)"

run "pull" git pull --ff-only
unset_settings
run "install from the lock files" bash scripts/install.sh
run "migrate the database" .venv/bin/python -m indexer migrate
run "reload the services" "$PM2" startOrReload "$ECOSYSTEM" --update-env
if [ "$DRY_RUN" -eq 1 ]; then
    say "would run: $PM2 save"
else
    "$PM2" save || fail "pm2 save failed: the services run, but a reboot would restore the old list"
fi

after="$(revision)"
if [ "$DRY_RUN" -eq 0 ]; then
    say "updated $before -> $after; check with: $PM2 status, curl -fsS http://127.0.0.1:9465/healthz"
fi
