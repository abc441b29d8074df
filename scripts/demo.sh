#!/usr/bin/env bash
# The main job on embedded defaults. Sets itself up on first run.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
exec python -m fleet_server.demo "$@"
