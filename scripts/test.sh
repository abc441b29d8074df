#!/usr/bin/env bash
# Run lint, type check and the whole test suite. Sets itself up on first run.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
echo "==> ruff"
ruff check device_agent converters fleet_server tests bench
echo "==> mypy"
mypy
echo "==> pytest"
exec pytest -q "$@"
