#!/usr/bin/env bash
# Install what is missing, then run the system on local defaults: a throwaway Postgres, Redis
# and anvil (chain id 32323) with the KEKTECH test contracts and simulated activity.
# Ctrl-C stops everything. Extra arguments go to `python -m devnet` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
exec .venv/bin/python -m devnet "$@"
