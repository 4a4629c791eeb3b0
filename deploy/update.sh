#!/usr/bin/env bash
# Update a KEKTECH checkout to the newest commit of its branch and reload the services
# (docs/deployment.md). Steps, stopping at the first that fails:
#   1. git pull --ff-only
#   2. scripts/install.sh: .venv from uv.lock (uv sync --frozen), node_modules from
#      package-lock.json (npm ci, when it changed)
#   3. python -m indexer migrate
#   4. pm2 startOrReload ecosystem.config.js --update-env
#   5. kektech settle: every PM2 process stays online, without a restart, for --settle
#      seconds (default 30); then pm2 save
# When a step after the pull fails, the checkout goes back to the previous commit and is
# installed again, and after step 4 or 5 the services are reloaded on it; exit code 1.
#
#   deploy/update.sh [--dir /opt/kektech] [--ecosystem FILE] [--settle S] [--dry-run]
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
SETTLE=30
DRY_RUN=0
ARGS=("$@")

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift ;;
        --ecosystem) ECOSYSTEM="${2:?--ecosystem needs a value}"; shift ;;
        --settle) SETTLE="${2:?--settle needs a value}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'update: unknown argument %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'update: %s\n' "$*"; }
fail() { printf 'update: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$SETTLE" =~ ^[0-9]{1,4}$ ]] && [ "$SETTLE" -le 3600 ] ||
    fail "--settle takes whole seconds from 0 to 3600, not $SETTLE"
# A checkout made by `git worktree add` has a .git file, not a directory.
[ -e "$DIR/.git" ] || fail "$DIR is not a git checkout"
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
# The processes of this PM2 (PM2_HOME), asked with the checkout's own pm2.
SETTLE_COMMAND=(env OPS_PM2_BIN="$PM2" .venv/bin/python -m ops settle --seconds "$SETTLE")
STEPS=5
step=0
# run NAME COMMAND...: one numbered step; the first failure ends the update (rolled back).
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
    if [ "$status" -eq 0 ]; then
        return 0
    fi
    local failed="step $step/$STEPS ($name) failed with exit code $status"
    if [ "$step" -eq 1 ]; then
        fail "$failed; later steps did not run. The services still run $before."
    fi
    roll_back "$failed"
}

# roll_back WHY: the checkout and its install back to $before; the services too once the
# reload has run. Migrations already applied stay (docs/deployment.md, Rollback).
roll_back() {
    local why="$1"
    say "$why: rolling back to $before"
    if ! { git -C "$DIR" reset -q --hard "$before_full" && (cd "$DIR" && bash scripts/install.sh); }
    then
        fail "$why, and the rollback to $before failed: the checkout is at $(revision)." \
            "Roll back by hand (docs/deployment.md, Rollback)."
    fi
    if [ "$step" -lt 4 ]; then
        fail "$why. The checkout is back at $before, which the services still run."
    fi
    if ! (cd "$DIR" && "$PM2" startOrReload "$ECOSYSTEM" --update-env); then
        fail "$why, and reloading $before failed too: see pm2 status and pm2 logs."
    fi
    if [ ! -f "$DIR/ops/settle.py" ]; then  # a release from before `kektech settle`
        fail "$why. Rolled back and reloaded $before, which cannot check that the services" \
            "stay up: see pm2 status (the saved list is unchanged)."
    fi
    if (cd "$DIR" && "${SETTLE_COMMAND[@]}"); then
        fail "$why. Rolled back: the services run $before again (the saved list is unchanged)."
    fi
    fail "$why, and $before does not settle either after the rollback: see pm2 status" \
        "and pm2 logs."
}

revision() { git -C "$DIR" rev-parse --short HEAD 2>/dev/null || printf 'unknown'; }
before="$(revision)"
if [ "$DRY_RUN" -eq 1 ]; then
    say "dry run: nothing is changed (checkout $DIR at $before)"
else
    before_full="$(git -C "$DIR" rev-parse HEAD)" || fail "cannot read the commit of $DIR"
fi

run "pull" git pull --ff-only
unset_settings
run "install from the lock files" bash scripts/install.sh
run "migrate the database" .venv/bin/python -m indexer migrate
run "reload the services" "$PM2" startOrReload "$ECOSYSTEM" --update-env
run "check that they stay up" "${SETTLE_COMMAND[@]}"
if [ "$DRY_RUN" -eq 1 ]; then
    say "would run: $PM2 save"
else
    "$PM2" save || fail "pm2 save failed: the services run, but a reboot would restore the old list"
fi

after="$(revision)"
if [ "$DRY_RUN" -eq 0 ]; then
    say "updated $before -> $after; check with: $PM2 status, curl -fsS http://127.0.0.1:9465/healthz"
fi
