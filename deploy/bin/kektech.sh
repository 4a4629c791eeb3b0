#!/bin/sh
# /usr/local/bin/kektech (deploy/provision.sh installs it): the operations CLI (`kektech
# doctor`, `kektech check`) as the kektech user, in the checkout, whose .env it reads.
set -eu
cd /opt/kektech
if [ "$(id -un)" = kektech ]; then
    exec .venv/bin/kektech "$@"
fi
exec sudo -u kektech -H .venv/bin/kektech "$@"
