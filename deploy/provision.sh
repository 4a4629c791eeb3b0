#!/usr/bin/env bash
# Provision a fresh Ubuntu 22.04 VPS for KEKTECH's real-time backend (docs/deployment.md).
# Run as root. Idempotent: every step checks first and a second run changes nothing.
#
#   sudo deploy/provision.sh --email ops@example.com [--domain ws.kektech.xyz]
#        [--repo https://github.com/OWNER/REPO.git] [--branch main] [--dry-run]
#
# --dry-run prints every action (commands, and file writes with their content summarised)
# without changing anything; it needs no root and works on any machine.
# The first run creates /opt/kektech/.env from .env.example and stops before starting the
# services: fill in RPC_PROVIDER_URL and the contract addresses, then run it again.
set -Eeuo pipefail  # -E: functions (act, as_app...) fail through the ERR trap too

DOMAIN="ws.kektech.xyz"
REPO=""
BRANCH="main"
EMAIL=""
DRY_RUN=0

APP_USER="kektech"
APP_HOME="/home/kektech"
APP_DIR="/opt/kektech"
LOG_DIR="/var/log/kektech"
STATE_DIR="/var/lib/kektech"
ETC_DIR="/etc/kektech"
SECRETS="$ETC_DIR/redis.secrets"
WEBROOT="/var/www/certbot"
NODE_MAJOR=20
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --domain) DOMAIN="${2:?--domain needs a value}"; shift ;;
        --repo) REPO="${2:?--repo needs a value}"; shift ;;
        --branch) BRANCH="${2:?--branch needs a value}"; shift ;;
        --email) EMAIL="${2:?--email needs a value}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'provision: unknown argument %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'provision: %s\n' "$*"; }
fail() { printf 'provision: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'fail "step failed at line $LINENO (exit $?); fix the cause and run again: finished steps are skipped"' ERR

# Run a command that changes the machine (printed instead under --dry-run).
act() {
    if [ "$DRY_RUN" -eq 1 ]; then
        say "would run: $*"
    else
        say "run: $*"
        "$@"
    fi
}

# Run a command as the app user in the checkout, with its own HOME (PM2_HOME is ~/.pm2) and
# nothing else of root's environment: PM2 copies the environment it is started with into
# every app (and into dump.pm2), so nothing of this script's may reach it.
as_app() {
    act runuser -u "$APP_USER" -- env -i -C "$APP_DIR" HOME="$APP_HOME" USER="$APP_USER" \
        LOGNAME="$APP_USER" LANG=C.UTF-8 \
        PATH="$APP_DIR/node_modules/.bin:/usr/local/bin:/usr/bin:/bin" "$@"
}

# install_file PATH MODE OWNER[:GROUP] [secret] < content
# Writes PATH only when its content, mode or owner differ. Secret files are summarised by
# their variable or user names only, never their values.
install_file() {
    local path="$1" mode="$2" owner="$3" secret="${4:-}" content tmp
    content="$(cat)"
    if [ -f "$path" ] && [ "$(cat "$path" 2>/dev/null)" = "$content" ] &&
        [ "$(stat -c %a "$path")" = "$mode" ] && [ "$(stat -c %U:%G "$path")" = "$owner" ]; then
        return 1
    fi
    if [ "$DRY_RUN" -eq 1 ]; then
        say "would write $path (mode $mode, owner $owner, $(printf '%s\n' "$content" | wc -l) lines):"
        printf '%s\n' "$content" | grep -Ev '^[[:space:]]*(#|$)' | head -n 8 | if [ -n "$secret" ]; then
            sed -E -e 's/#[0-9a-f]{64}/#<sha256>/g' -e 's#(://[^:/@]+:)[^@]*@#\1<password>@#g' \
                -e 's/^([A-Z_]*PASSWORD)=.*/\1=<secret>/'
        else
            cat
        fi | sed 's/^/    | /'
        return 0
    fi
    say "write $path"
    install -d "$(dirname "$path")"
    tmp="$(mktemp "$path.XXXXXX")"
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    mv -f "$tmp" "$path"
}

# ensure_dir PATH MODE OWNER
ensure_dir() {
    local path="$1" mode="$2" owner="$3"
    if [ -d "$path" ] && [ "$(stat -c %a "$path")" = "$mode" ] && [ "$(stat -c %U:%G "$path")" = "$owner" ]; then
        return 0
    fi
    act install -d -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$path"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        act apt-get update -qq
        APT_UPDATED=1
    fi
}

# The major version apt would install of a package ("" when apt does not know it).
candidate_major() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: \([0-9]*:\)\{0,1\}\([0-9]*\).*/\2/p' | head -n1 || true
}

# below MAJOR MIN: true when MAJOR is unknown (empty) or lower than MIN.
below() { [ -z "$1" ] || [ "$1" -lt "$2" ]; }

# add_repo NAME KEY_URL "deb line with @KEY@"
add_repo() {
    local name="$1" key_url="$2" line="$3" keyring="/etc/apt/keyrings/$1.gpg"
    if [ ! -s "$keyring" ]; then
        if [ "$DRY_RUN" -eq 1 ]; then
            say "would run: curl -fsSL $key_url | gpg --dearmor -o $keyring"
        else
            say "run: curl -fsSL $key_url | gpg --dearmor -o $keyring"
            install -d -m 0755 /etc/apt/keyrings
            curl -fsSL "$key_url" | gpg --batch --yes --dearmor -o "$keyring"
        fi
    fi
    if install_file "/etc/apt/sources.list.d/$name.list" 644 root:root <<<"${line//@KEY@/$keyring}"; then
        APT_UPDATED=0
    fi
}

# ---------------------------------------------------------------------------- preconditions
if [ "$DRY_RUN" -eq 0 ]; then
    [ "$(id -u)" -eq 0 ] || fail "run as root (sudo $0 ...), or with --dry-run to see the plan"
    command -v apt-get >/dev/null 2>&1 || fail "apt-get not found: this script targets Ubuntu 22.04"
else
    say "dry run: nothing is changed"
fi
[[ "$DOMAIN" =~ ^[A-Za-z0-9.-]+$ ]] || fail "--domain: not a host name: $DOMAIN"
# shellcheck source=/dev/null
CODENAME="$( (. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}") || true)"
CODENAME="${CODENAME:-jammy}"

# ---------------------------------------------------------------------------- packages
# Ubuntu 22.04 ships Python 3.10, Node 12 and Redis 6.0: too old for us (Python >= 3.11, PM2
# and anvil want Node >= 18, the ACL file needs Redis >= 7). Python 3.11 comes from Ubuntu's
# own jammy-updates (python3.11, python3.11-venv); Node from NodeSource; Redis from redis.io.
say "== packages"
if ! installed curl || ! installed gnupg || ! installed ca-certificates; then
    apt_update
    act env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl gnupg ca-certificates
fi
node_major="$(node --version 2>/dev/null | sed 's/^v\([0-9]*\).*/\1/' || true)"
redis_major="$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([0-9]*\).*/\1/p' || true)"
NODESOURCE=0
if below "$node_major" 18 && below "$(candidate_major nodejs)" 18; then
    NODESOURCE=1
    add_repo nodesource https://deb.nodesource.com/gpgkey/nodesource-repo.gpg.key \
        "deb [signed-by=@KEY@] https://deb.nodesource.com/node_${NODE_MAJOR}.x nodistro main"
fi
if below "$redis_major" 7 && below "$(candidate_major redis-server)" 7; then
    add_repo redis https://packages.redis.io/gpg \
        "deb [signed-by=@KEY@] https://packages.redis.io/deb $CODENAME main"
fi
# postgresql and pgbouncer: scripts/install.sh (run below as the app user, without sudo)
# checks for them; postgresql also serves the local database created below.
packages=(git redis-server nginx certbot ufw logrotate cron openssl postgresql pgbouncer nodejs)
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    packages+=(python3.11 python3.11-venv)
elif ! python3 -c 'import ensurepip' 2>/dev/null; then
    # Debian 12, Ubuntu 24.04: new enough, but venv's pip comes in a package of its own, and
    # scripts/install.sh runs as the app user, who cannot apt-get.
    packages+=(python3-venv)
fi
# NodeSource's nodejs bundles npm and conflicts with Ubuntu's npm package, whatever its
# repository file is called (nodesource.list, nodesource.sources, a tool's own name): npm is
# asked for only when neither the installed nodejs nor the one apt would install brings it.
nodejs_provides_npm() {
    if installed nodejs; then
        dpkg-query -W -f='${Provides}\n' nodejs
    else
        apt-cache show --no-all-versions nodejs 2>/dev/null | sed -n 's/^Provides: //p'
    fi | tr ',' ' ' | grep -qw npm
}
if [ "$NODESOURCE" -eq 0 ] && ! command -v npm >/dev/null 2>&1 && ! nodejs_provides_npm; then
    packages+=(npm)
fi
missing=()
for package in "${packages[@]}"; do
    installed "$package" || missing+=("$package")
done
# Installed but too old (Ubuntu's own): upgraded from the repositories added above.
if [ -n "$node_major" ] && below "$node_major" 18; then missing+=(nodejs); fi
if [ -n "$redis_major" ] && below "$redis_major" 7; then missing+=(redis-server); fi
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    act env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# ---------------------------------------------------------------------------- app user, dirs
say "== app user and directories"
if ! id -u "$APP_USER" >/dev/null 2>&1; then
    act useradd --system --create-home --home-dir "$APP_HOME" --shell /bin/bash "$APP_USER"
fi
# Private home: PM2 keeps the apps' environments (Redis passwords) in ~/.pm2/dump.pm2.
ensure_dir "$APP_HOME" 750 "$APP_USER:$APP_USER"
ensure_dir "$LOG_DIR" 750 "$APP_USER:$APP_USER"
ensure_dir "$STATE_DIR" 750 "$APP_USER:$APP_USER"
ensure_dir "$ETC_DIR" 750 "root:$APP_USER"
ensure_dir "$WEBROOT" 755 root:root

# ---------------------------------------------------------------------------- checkout
say "== checkout at $APP_DIR"
if [ -z "$REPO" ]; then
    # The checkout this script comes from: its origin if it has one, else the checkout itself.
    REPO="$(git -C "$SOURCE" remote get-url origin 2>/dev/null || printf '%s' "$SOURCE")"
fi
if [ -d "$APP_DIR/.git" ]; then
    say "checkout exists (deploy/update.sh updates it)"
    if [ "$(stat -c %U "$APP_DIR")" != "$APP_USER" ]; then
        act chown -R "$APP_USER:$APP_USER" "$APP_DIR"
    fi
else
    act git clone --branch "$BRANCH" "$REPO" "$APP_DIR"
    act chown -R "$APP_USER:$APP_USER" "$APP_DIR"
fi

# ---------------------------------------------------------------------------- secrets, .env
say "== secrets"
# Redis passwords: generated once, root-only; everything else is derived from this file.
if [ -r "$SECRETS" ]; then
    # shellcheck source=/dev/null
    . "$SECRETS"
elif [ "$DRY_RUN" -eq 1 ]; then
    INDEXER_REDIS_PASSWORD="generated-on-the-first-real-run"
    BROADCASTER_REDIS_PASSWORD="generated-on-the-first-real-run"
    OPS_REDIS_PASSWORD="generated-on-the-first-real-run"
    ADMIN_REDIS_PASSWORD="generated-on-the-first-real-run"
    say "would generate $SECRETS (openssl rand -hex 32 for users indexer, broadcaster, ops, admin)"
else
    INDEXER_REDIS_PASSWORD="$(openssl rand -hex 32)"
    BROADCASTER_REDIS_PASSWORD="$(openssl rand -hex 32)"
    OPS_REDIS_PASSWORD="$(openssl rand -hex 32)"
    ADMIN_REDIS_PASSWORD="$(openssl rand -hex 32)"
    install_file "$SECRETS" 600 root:root secret <<EOF || true
INDEXER_REDIS_PASSWORD=$INDEXER_REDIS_PASSWORD
BROADCASTER_REDIS_PASSWORD=$BROADCASTER_REDIS_PASSWORD
OPS_REDIS_PASSWORD=$OPS_REDIS_PASSWORD
ADMIN_REDIS_PASSWORD=$ADMIN_REDIS_PASSWORD
EOF
fi
# Not exported: the passwords go only to the one command that needs them (render-acl.sh).
redis_url() { printf 'redis://%s:%s@127.0.0.1:6379/0' "$1" "$2"; }

# Each service's own Redis user: PM2 puts these files' variables into that app's environment,
# where they override .env (pydantic-settings: environment before .env). See docs/deployment.md.
install_file "$ETC_DIR/indexer.env" 640 "root:$APP_USER" secret <<EOF || true
REDIS_URL=$(redis_url indexer "$INDEXER_REDIS_PASSWORD")
EOF
install_file "$ETC_DIR/broadcaster.env" 640 "root:$APP_USER" secret <<EOF || true
REDIS_URL=$(redis_url broadcaster "$BROADCASTER_REDIS_PASSWORD")
EOF

ENV_FILE="$APP_DIR/.env"
ENV_CREATED=0
if [ ! -f "$ENV_FILE" ]; then
    ENV_CREATED=1
    example="$APP_DIR/.env.example"
    [ -f "$example" ] || example="$SOURCE/.env.example"
    # The shared .env gets the `ops` user (PING, TYPE, XLEN: `kektech doctor` and `check`);
    # each service's own user exists only in its PM2 environment.
    DOMAIN="$DOMAIN" REDIS_URL="$(redis_url ops "$OPS_REDIS_PASSWORD")" \
        DATABASE_URL="postgresql://$APP_USER@/$APP_USER?host=/var/run/postgresql" \
        bash "$SOURCE/deploy/render-env.sh" "$example" |
        install_file "$ENV_FILE" 600 "$APP_USER:$APP_USER" secret || true
fi

# ---------------------------------------------------------------------------- Postgres
say "== postgres (local database $APP_USER, peer authentication over the Unix socket)"
psql_as_postgres() { runuser -u postgres -- psql -tAqc "$1" 2>/dev/null; }
if [ "$(psql_as_postgres "SELECT 1 FROM pg_roles WHERE rolname = '$APP_USER'" || true)" != "1" ]; then
    act runuser -u postgres -- createuser "$APP_USER"
fi
if [ "$(psql_as_postgres "SELECT 1 FROM pg_database WHERE datname = '$APP_USER'" || true)" != "1" ]; then
    act runuser -u postgres -- createdb --owner "$APP_USER" "$APP_USER"
fi

# ---------------------------------------------------------------------------- Python, Node
say "== virtualenv and node_modules from the lock files (scripts/install.sh as $APP_USER)"
as_app bash scripts/install.sh

# ---------------------------------------------------------------------------- Redis
say "== redis: loopback only, ACL users indexer and broadcaster, default user off"
REDIS_CHANGED=0
if ! grep -qs '^include /etc/redis/kektech.conf' /etc/redis/redis.conf; then
    act sh -c 'printf "\ninclude /etc/redis/kektech.conf\n" >> /etc/redis/redis.conf'
    REDIS_CHANGED=1
fi
if install_file /etc/redis/kektech.conf 640 redis:redis <"$SOURCE/deploy/redis/kektech.conf"; then
    REDIS_CHANGED=1
fi
stream_key="$(sed -n 's/^REDIS_STREAM_KEY=//p' "$ENV_FILE" 2>/dev/null | tail -n1 || true)"
acl="$(REDIS_STREAM_KEY="${stream_key:-kektech:events}" \
    INDEXER_REDIS_PASSWORD="$INDEXER_REDIS_PASSWORD" \
    BROADCASTER_REDIS_PASSWORD="$BROADCASTER_REDIS_PASSWORD" \
    OPS_REDIS_PASSWORD="$OPS_REDIS_PASSWORD" ADMIN_REDIS_PASSWORD="$ADMIN_REDIS_PASSWORD" \
    bash "$SOURCE/deploy/redis/render-acl.sh")"
if install_file /etc/redis/users.acl 640 redis:redis secret <<<"$acl"; then
    REDIS_CHANGED=1
fi
if [ "$REDIS_CHANGED" -eq 1 ]; then
    act systemctl enable redis-server
    act systemctl restart redis-server
fi
if [ "$DRY_RUN" -eq 0 ]; then
    # The password travels in the environment (REDISCLI_AUTH), not on the command line.
    for _ in $(seq 50); do
        [ "$(REDISCLI_AUTH="$ADMIN_REDIS_PASSWORD" redis-cli --no-auth-warning --user admin ping 2>/dev/null)" = PONG ] && break
        sleep 0.2
    done
    [ "$(REDISCLI_AUTH="$ADMIN_REDIS_PASSWORD" redis-cli --no-auth-warning --user admin ping 2>/dev/null)" = PONG ] ||
        fail "redis-server does not answer the admin user after the restart: journalctl -u redis-server"
fi

# ---------------------------------------------------------------------------- kernel
# Before Nginx listens: the kernel caps an accept queue at somaxconn when listen() is called.
say "== kernel: accept queues for reconnect storms"
if install_file /etc/sysctl.d/60-kektech.conf 644 root:root <"$SOURCE/deploy/sysctl/60-kektech.conf"; then
    act sysctl -p /etc/sysctl.d/60-kektech.conf
    # A socket already listening keeps the queue it got; a reload does not listen again.
    if systemctl is-active --quiet nginx 2>/dev/null; then
        say "NOTE: the deeper accept queues apply to nginx and the broadcasters at their next restart"
    fi
fi

# ---------------------------------------------------------------------------- firewall
# Before Nginx and certbot: an image with UFW already active (SSH only) would fail the
# HTTP-01 challenge. SSH on whatever ports sshd listens on, and 22: a server moved to
# another port must not lock its operator out once the firewall is on.
read -r -a ssh_ports <<<"$( { echo 22; (sshd -T 2>/dev/null || true) |
    awk '$1 == "port" {print $2}'; } | sort -un | tr '\n' ' ')"
say "== ufw: deny incoming except SSH (${ssh_ports[*]}), 80, 443"
ufw_status="$(ufw status verbose 2>/dev/null || true)"
grep -q 'deny (incoming)' <<<"$ufw_status" || act ufw default deny incoming
grep -q 'allow (outgoing)' <<<"$ufw_status" || act ufw default allow outgoing
for port in "${ssh_ports[@]}" 80 443; do
    # SSH first, before enabling, so the session running this survives.
    grep -Eq "^$port/tcp +ALLOW IN" <<<"$ufw_status" || act ufw allow "$port/tcp"
done
grep -q '^Status: active' <<<"$ufw_status" || act ufw --force enable
allowed="$(IFS='|'; echo "${ssh_ports[*]}|80|443")"
extra="$(grep -E 'ALLOW IN' <<<"$ufw_status" | grep -Ev "^($allowed)/tcp" || true)"
[ -z "$extra" ] || say "WARNING: other ufw rules allow traffic, review them: $extra"

# ---------------------------------------------------------------------------- Nginx, TLS
say "== nginx and certificates for $DOMAIN"
CERT="/etc/letsencrypt/live/$DOMAIN/fullchain.pem"
install_file /etc/letsencrypt/renewal-hooks/deploy/reload-nginx.sh 755 root:root \
    <"$SOURCE/deploy/certbot/reload-nginx.sh" || true
if [ ! -f "$CERT" ]; then
    # Bootstrap: the real config serves :443 and cannot start without the certificate, so
    # port 80 first serves only the ACME webroot while certbot gets the first certificate.
    [ -n "$EMAIL" ] || [ "$DRY_RUN" -eq 1 ] || fail "--email is needed for the first certificate (Let's Encrypt account)"
    install_file /etc/nginx/nginx.conf.kektech-bootstrap 644 root:root <<EOF || true
# Temporary: only until certbot got the first certificate (deploy/provision.sh).
events {}
http {
    server {
        listen 80;
        listen [::]:80;
        server_name $DOMAIN;
        location /.well-known/acme-challenge/ { root $WEBROOT; }
        location / { return 404; }
    }
}
EOF
    if [ -f /etc/nginx/nginx.conf ] && [ ! -f /etc/nginx/nginx.conf.before-kektech ]; then
        act cp -p /etc/nginx/nginx.conf /etc/nginx/nginx.conf.before-kektech
    fi
    act cp /etc/nginx/nginx.conf.kektech-bootstrap /etc/nginx/nginx.conf
    act nginx -t
    act systemctl enable nginx
    act systemctl restart nginx
    act certbot certonly --webroot -w "$WEBROOT" -d "$DOMAIN" --email "${EMAIL:-EMAIL}" \
        --agree-tos --non-interactive --keep-until-expiring
fi
# The repo's nginx.conf is the whole main config; only the host name is substituted.
# Tested as a candidate next to the live file (relative includes resolve the same) first.
rendered="$(sed "s/ws\.kektech\.xyz/$DOMAIN/g" "$SOURCE/nginx.conf")"
if [ "$(cat /etc/nginx/nginx.conf 2>/dev/null)" != "$rendered" ]; then
    install_file /etc/nginx/nginx.conf.kektech-candidate 644 root:root <<<"$rendered" || true
    act nginx -t -c /etc/nginx/nginx.conf.kektech-candidate
    if [ -f /etc/nginx/nginx.conf ] && [ ! -f /etc/nginx/nginx.conf.before-kektech ]; then
        act cp -p /etc/nginx/nginx.conf /etc/nginx/nginx.conf.before-kektech
    fi
    if [ -f /etc/nginx/nginx.conf ]; then
        act cp -p /etc/nginx/nginx.conf "/etc/nginx/nginx.conf.backup-$(date -u +%Y%m%dT%H%M%SZ)"
    fi
    act mv /etc/nginx/nginx.conf.kektech-candidate /etc/nginx/nginx.conf
    act nginx -t
    act systemctl enable nginx
    act systemctl reload-or-restart nginx
fi

# ---------------------------------------------------------------------------- logs, cron
say "== log rotation and monitoring cron"
install_file /etc/logrotate.d/kektech 644 root:root <"$SOURCE/deploy/logrotate/kektech" || true
install_file /etc/cron.d/kektech-check 644 root:root <"$SOURCE/deploy/monitoring/kektech-check.cron" || true
# `pm2 ...` and `kektech ...` for the operator, as the app user whoever runs them.
install_file /usr/local/bin/pm2 755 root:root <"$SOURCE/deploy/bin/pm2.sh" || true
install_file /usr/local/bin/kektech 755 root:root <"$SOURCE/deploy/bin/kektech.sh" || true

# ---------------------------------------------------------------------------- PM2
say "== pm2 (as $APP_USER): start, boot service, save"
PM2="$APP_DIR/node_modules/.bin/pm2"
if [ "$ENV_CREATED" -eq 1 ] || grep -q '^RPC_PROVIDER_URL=http://127.0.0.1:8545$' "$ENV_FILE" 2>/dev/null; then
    say "NEXT: edit $ENV_FILE (RPC_PROVIDER_URL, MARKET_FACTORY_ADDRESS, START_BLOCK, ...; see .env.example)"
    say "      then run this script again to migrate and start the services under PM2"
    [ "$DRY_RUN" -eq 1 ] || exit 0
fi
as_app .venv/bin/python -m indexer migrate
running=""
if [ "$DRY_RUN" -eq 0 ]; then  # `pm2 jlist` starts a PM2 daemon when none runs
    running="$(runuser -u "$APP_USER" -- env HOME="$APP_HOME" "$PM2" jlist 2>/dev/null || true)"
fi
if ! grep -q '"name":"kektech-event-indexer"' <<<"$running" ||
    ! grep -q '"name":"kektech-websocket-server"' <<<"$running"; then
    as_app pm2 start ecosystem.config.js
    as_app pm2 save
fi
if [ "$DRY_RUN" -eq 0 ] && ! runuser -u "$APP_USER" -- env HOME="$APP_HOME" "$PM2" jlist 2>/dev/null |
    grep -q '"REDIS_URL":"redis://indexer:'; then
    # The indexer then publishes with the read-only user from .env and every publish fails.
    say "WARNING: kektech-event-indexer did not get REDIS_URL from $ETC_DIR/indexer.env:" \
        "ecosystem.config.js must merge $ETC_DIR/<service>.env (docs/deployment.md)"
fi
if ! systemctl is-enabled "pm2-$APP_USER" >/dev/null 2>&1; then
    act env PATH="/usr/bin:/bin:/usr/local/bin" "$PM2" startup systemd -u "$APP_USER" --hp "$APP_HOME"
    as_app pm2 save
fi
# At boot PM2 restores the apps at once; an indexer that finds Postgres or the network not
# up yet waits for them (logging why), which only delays its start: order the unit anyway.
if install_file "/etc/systemd/system/pm2-$APP_USER.service.d/kektech.conf" 644 root:root <<UNIT; then
[Unit]
Wants=network-online.target
After=network-online.target postgresql.service redis-server.service
UNIT
    act systemctl daemon-reload
fi
# Started is not up: with a wrong setting in .env the indexer crash-loops, which PM2 shows as
# online between its restarts. Every app must stay online, without a restart, for 30 s.
if ! as_app env OPS_PM2_BIN="$PM2" .venv/bin/python -m ops settle --seconds 30; then
    fail "the services do not stay up: see pm2 logs (as $APP_USER, whoever runs it), fix" \
        "$ENV_FILE and run this again"
fi
say "done: https://$DOMAIN/health; status: pm2 status (as $APP_USER, whoever runs it)"
