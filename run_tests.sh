#!/usr/bin/env bash
# Runs ruff (ruff.toml) and then the whole test suite (creates .venv and installs the Debian packages the tests use on
# first run).  Extra arguments go to pytest, e.g. bash run_tests.sh -k layout
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh dataset-fashion-mnist openssh-server
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
