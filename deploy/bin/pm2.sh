#!/bin/sh
# /usr/local/bin/pm2 (deploy/provision.sh installs it): the KEKTECH services' PM2, that is the
# kektech user's daemon, whoever runs it. Root's own `pm2` would talk to a second, empty
# daemon (PM2_HOME is per user) and could start a second copy of the services.
set -eu
PM2=/opt/kektech/node_modules/.bin/pm2
if [ "$(id -un)" = kektech ]; then
    exec env HOME=/home/kektech "$PM2" "$@"
fi
exec sudo -u kektech -H "$PM2" "$@"
