#!/bin/sh
# certbot deploy hook (installed as /etc/letsencrypt/renewal-hooks/deploy/reload-nginx.sh by
# deploy/provision.sh): after a certificate was renewed, Nginx picks it up without dropping
# connections. A config that fails `nginx -t` is never reloaded; the hook then fails loudly
# (certbot logs it) and Nginx keeps serving with the certificate it has.
set -eu
nginx -t -q
systemctl reload nginx
