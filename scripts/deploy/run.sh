#!/usr/bin/env bash
# Start a run on a deployment's SuperLink, stream its log, and exit non-zero unless it completed.
#
# Usage: scripts/deploy/run.sh CONNECTION [flwr run options...]
#   CONNECTION  SuperLink connection in $FLWR_HOME/config.toml (connection.sh), e.g. credit
#   options     passed to `flwr run`, e.g. -c 'output-dir="/srv/fdl-runs/credit-1"'
#               -c 'overrides="rounds=3 strategy.min_available_clients=3"'
# Env: FLWR_HOME (default ~/.flwr).
# Runs `flwr run . CONNECTION --stream ...` for this checkout through fed_dp_lora/deploy/flwr_run.py:
# - a bad configuration is refused before anything starts: one line naming the key and the fix (exit 2);
# - the run id is printed when the run starts ("Successfully started run RUN_ID"); with it,
#   `flwr log RUN_ID CONNECTION --show`, `flwr stop RUN_ID CONNECTION` (`flwr ls CONNECTION` lists runs);
# - at the end the SuperLink is asked how the run ended: one last line says where the outputs are
#   (exit 0), or why it failed or was stopped and what to do (exit 1). `flwr run` alone exits 0 either way.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help || "$1" == -* ]]; then
  awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0" >&2; exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${FLWR_BIN:-$root/.venv/bin}"
[[ -x "$bin/python" ]] || bin="$(dirname "$(command -v python3)")"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
cd "$root"
exec "$bin/python" -m fed_dp_lora.deploy.flwr_run . "$@"
