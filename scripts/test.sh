#!/usr/bin/env bash
# Install what is missing, then run every check: ruff, mypy and the test suite (which starts
# its own Postgres, Redis and anvil on free loopback ports). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
