#!/bin/sh
# /usr/local/bin/kektech (deploy/provision.sh installs it): the operations CLI (`kektech
# doctor`, `kektech check`, `kektech settle`) as the kektech user, in the checkout, whose
# .env it reads.
set -eu
APP_USER=kektech
APP_HOME=/home/kektech
APP_DIR=/opt/kektech
cd "$APP_DIR"
# Whoever calls it, the app user included, the CLI gets an environment of its own, not the
# caller's: it reads its settings from .env, and a variable exported in the caller's shell (a
# REDIS_URL or DATABASE_URL for a one-off command, a PM2_HOME) would override it, so the same
# command would check something else depending on who typed it. PM2_HOME is one of those
# settings (.env.example): set it in .env.
set -- env -i HOME="$APP_HOME" USER="$APP_USER" LOGNAME="$APP_USER" LANG="${LANG:-C.UTF-8}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    .venv/bin/kektech "$@"
if [ "$(id -un)" = "$APP_USER" ]; then
    exec "$@"
fi
# Root needs no sudo (a minimal Debian has none): runuser comes with util-linux, in /usr/sbin,
# which a root shell from a plain `su` does not have on its PATH.
if [ "$(id -u)" -eq 0 ]; then
    exec /usr/sbin/runuser -u "$APP_USER" -- "$@"
fi
if ! command -v sudo >/dev/null 2>&1; then
    echo "kektech: run this as root or $APP_USER (there is no sudo to switch to $APP_USER)" >&2
    exit 1
fi
exec sudo -u "$APP_USER" -- "$@"
