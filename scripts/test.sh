#!/usr/bin/env bash
# Run lint, type check and the whole test suite. Sets itself up on first run.
EDGEFLEET_SETUP=test
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"

# The suite runs against PostgreSQL as well as SQLite: make sure a server answers on
# 127.0.0.1:5432 (the tests create and drop their own databases).
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "==> starting PostgreSQL"
  if [ "$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null 2>&1; then
    for v in $(ls /etc/postgresql 2>/dev/null); do
      pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    done
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

echo "==> ruff"
ruff check device_agent converters fleet_server tests bench
ruff format --check device_agent converters fleet_server tests bench
echo "==> import contracts"
lint-imports
echo "==> mypy"
mypy
echo "==> pytest"
exec pytest -q "$@"
