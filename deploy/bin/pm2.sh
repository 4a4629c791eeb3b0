#!/bin/sh
# /usr/local/bin/pm2 (deploy/provision.sh installs it): the KEKTECH services' PM2, that is the
# kektech user's daemon, whoever runs it. Root's own `pm2` would talk to a second, empty
# daemon (PM2_HOME is per user) and could start a second copy of the services.
set -eu
PM2=/opt/kektech/node_modules/.bin/pm2
# Without the services' settings (the names in .env.example) of the caller's shell: with
# --update-env PM2 copies its environment into every app and dump.pm2, where a DATABASE_URL
# exported for a one-off command would override .env. KEKTECH_* (read by
# ecosystem.config.js) and PM2_HOME stay.
settings="$(sed -nE 's/^#? ?([A-Z][A-Z0-9_]*)=.*/\1/p' /opt/kektech/.env.example)"
for name in $settings; do
    [ "$name" = PM2_HOME ] || unset "$name"
done
if [ "$(id -un)" = kektech ]; then
    exec env HOME=/home/kektech "$PM2" "$@"
fi
exec sudo -u kektech -H "$PM2" "$@"
