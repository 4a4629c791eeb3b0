#!/bin/bash
# /usr/local/bin/pm2 (deploy/provision.sh installs it): the KEKTECH services' PM2, that is the
# kektech user's daemon, whoever runs it. Root's own `pm2` would talk to a second, empty
# daemon (PM2_HOME is per user) and could start a second copy of the services.
# bash rather than sh: `compgen -e` below lists the caller's variables by name alone.
set -eu
APP_USER=kektech
APP_HOME=/home/kektech
APP_DIR=/opt/kektech
PM2="$APP_DIR/node_modules/.bin/pm2"
# Without the services' settings (the names in .env.example) of the caller's shell: with
# --update-env PM2 copies its environment into every app and dump.pm2, where a DATABASE_URL
# exported for a one-off command would override .env. KEKTECH_* (read by
# ecosystem.config.js) and PM2_HOME stay.
settings="$(sed -nE 's/^#? ?([A-Z][A-Z0-9_]*)=.*/\1/p' "$APP_DIR/.env.example")"
for name in $settings; do
    [ "$name" = PM2_HOME ] || unset "$name"
done
if [ "$(id -un)" = "$APP_USER" ]; then
    exec env HOME="$APP_HOME" "$PM2" "$@"
fi

# Anyone else (root, as the VPS is administered) switches to the app user with an environment
# of its own: nothing of the caller's but KEKTECH_* and PM2_HOME, handed over as arguments of
# env(1), since sudo's env_reset (Debian's and Ubuntu's default) drops every variable it is
# given. `KEKTECH_BROADCASTER_INSTANCES=3 pm2 start ...` must reach PM2. Each value is passed
# as it is, whatever its characters; names that are not valid shell names are not passed.
keep=(HOME="$APP_HOME" USER="$APP_USER" LOGNAME="$APP_USER" LANG="${LANG:-C.UTF-8}"
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
[ -z "${TERM:-}" ] || keep+=(TERM="$TERM")  # `pm2 monit` draws on the terminal
for name in $(compgen -e); do
    case "$name" in
        KEKTECH_* | PM2_HOME) keep+=("$name=${!name}") ;;
    esac
done
# root needs no sudo (a minimal Debian has none): runuser comes with util-linux, in /usr/sbin,
# which a root shell from a plain `su` does not have on its PATH.
if [ "$(id -u)" -eq 0 ]; then
    exec /usr/sbin/runuser -u "$APP_USER" -- env -i "${keep[@]}" "$PM2" "$@"
fi
if ! command -v sudo >/dev/null 2>&1; then
    echo "pm2: run this as root or $APP_USER (there is no sudo to switch to $APP_USER)" >&2
    exit 1
fi
exec sudo -u "$APP_USER" -- env -i "${keep[@]}" "$PM2" "$@"
