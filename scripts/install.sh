#!/usr/bin/env bash
# Install everything the project needs on a Debian/Ubuntu machine. Idempotent: a second run
# only checks. System packages (apt) are installed only when missing.
#   - apt: redis-server, nginx, postgresql (server binaries), pgbouncer, nodejs + npm,
#     python3 venv, openssl (throwaway TLS certificates in the Nginx tests)
#   - npm: the tools pinned in package-lock.json (anvil, solc, pm2)
#   - Python: .venv from uv.lock (uv itself pinned below)
#   - promtool (the alert rules' tests) from the distribution's prometheus package, unpacked
#     into .venv/bin: the package is not installed, so no Prometheus server is started
set -euo pipefail

UV_VERSION="0.13.8"
MIN_PYTHON="3.11"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf 'install: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found: install these packages by hand: $*"
        exit 1
    fi
    apt_update
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

python_new_enough() {
    "$1" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))" 2>/dev/null
}

# New enough and able to make a virtualenv with pip: Debian and Ubuntu ship `venv` with the
# interpreter but `ensurepip` in the separate pythonX.Y-venv package.
python_ok() {
    python_new_enough "$1" && "$1" -c "import venv, ensurepip" 2>/dev/null
}

find_python() {
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# --- system packages -----------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
check_node() {
    local node_major
    node_major="$(node -p 'process.versions.node.split(".")[0]')"
    if [ "$node_major" -lt 18 ]; then
        # Debian 12 has 18; Ubuntu 22.04's 12 cannot even parse the npm tools' scripts.
        log "node $(node --version) is too old (the npm tools need 18 or newer, 20 preferred):"
        log "install a current Node.js, e.g. from https://github.com/nodesource/distributions"
        exit 1
    fi
}
if command -v node >/dev/null 2>&1; then
    check_node
else
    missing+=(nodejs)
fi
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
    check_node  # the distribution's own may be too old (Ubuntu 22.04: 12)
fi

PYTHON="$(find_python || true)"
if [ -z "$PYTHON" ]; then
    if command -v python3 >/dev/null 2>&1 && python_new_enough python3; then
        apt_install "python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    else
        apt_install python3.11 python3.11-venv
    fi
    PYTHON="$(find_python)"
fi

# --- npm tools -------------------------------------------------------------------------------
stamp="node_modules/.kektech-lock"
if [ ! -x node_modules/.bin/anvil ] || ! cmp -s package-lock.json "$stamp"; then
    log "npm ci"
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json "$stamp"
fi

# --- Python ------------------------------------------------------------------------------------
# A virtualenv left without pip (made before pythonX.Y-venv was installed) is made again.
if [ ! -x .venv/bin/python ] || ! python_new_enough .venv/bin/python ||
    ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    log "creating .venv with $PYTHON"
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi
if [ "$(.venv/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    log "installing uv $UV_VERSION"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
.venv/bin/uv sync --frozen --quiet

# --- promtool -----------------------------------------------------------------------------------
# tests/deploy/test_alert_*.py run deploy/monitoring/alerts.yml under `promtool test rules`.
# Debian and Ubuntu ship promtool only inside the prometheus package, whose installation would
# start a Prometheus server: the package is downloaded and promtool alone taken out of it.
# APT::Sandbox::User=root: as root, apt would warn that its sandbox user cannot write the
# scratch directory, then download as root all the same.
apt_download() {
    local into="$1" package="$2"
    shift 2
    (cd "$into" && apt-get download -qq -o APT::Sandbox::User=root "$@" "$package")
}
if ! .venv/bin/promtool --version >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found: put promtool (Prometheus 2.x) at .venv/bin/promtool by hand"
        exit 1
    fi
    log "promtool from the prometheus package"
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    # Package lists missing or older than the mirror: fresh ones of our own, in the scratch
    # directory, then again. Not the system's: provision.sh and update.sh run this as the app
    # user, who may not update them (and a deploy must not stop for want of a test tool).
    if ! apt_download "$scratch" prometheus 2>/dev/null; then
        own_lists=(-o "Dir::State::Lists=$scratch/lists" -o "Dir::Cache=$scratch/cache"
            -o Debug::NoLocking=1)
        mkdir -p "$scratch/lists/partial" "$scratch/cache/archives/partial"
        apt-get update -qq -o APT::Sandbox::User=root "${own_lists[@]}"
        apt_download "$scratch" prometheus "${own_lists[@]}"
    fi
    dpkg-deb --fsys-tarfile "$scratch"/prometheus_*.deb |
        tar -xO ./usr/bin/promtool >"$scratch/promtool"
    chmod 755 "$scratch/promtool"
    mv "$scratch/promtool" .venv/bin/promtool
fi
log "ready: $(.venv/bin/python --version), anvil $(node_modules/.bin/anvil --version | head -n1 | cut -d' ' -f3), promtool $(.venv/bin/promtool --version 2>&1 | head -n1 | cut -d' ' -f3)"
