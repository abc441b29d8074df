# Shared set-up for the README commands: a project virtual environment with
# every extra installed, and the system packages the tests need.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEFLEET_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
# the tests also drive a real browser and need PostgreSQL; the demo needs neither
if [ "${EDGEFLEET_SETUP:-}" = "test" ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
fi
if ((${#need_apt[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing system packages: ${need_apt[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# promtool checks and unit-tests the exported Prometheus alerting rules: Debian's
# prometheus package without its recommends (a 19 MB download; its service is not started)
if [ "${EDGEFLEET_SETUP:-}" = "test" ] && ! command -v promtool >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing system packages: prometheus (for promtool)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

stamp="$VENV/.edgefleet-installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "==> installing edgefleet and its dependencies (first run takes a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # torch first, pinned to the CPU build this machine image provides, so that
  # nothing below pulls the multi-GB CUDA build from the registry
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e "$ROOT[agent,converters,torch,server,dev]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
