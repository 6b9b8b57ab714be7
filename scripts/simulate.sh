#!/usr/bin/env bash
# Run the default simulation with the real Flower runtime and stream its log.
# Extra arguments go to `flwr run`, e.g.: scripts/simulate.sh -c 'overrides="privacy.epsilon=4"'
# Uses a project-local FLWR_HOME (.flwr/), its own local SuperLink (stopped by PID at the
# end), and never lets Flower reinstall the app's dependencies per run (that would pull torch).
# Ends with one line: "Outputs: DIR" (exit 0), or why the run was refused (exit 2, before it
# starts), failed or stopped (exit 1), naming the key or file and the fix
# (fed_dp_lora/deploy/flwr_run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Ray (the simulation engine) warns of a future change for CPU-only actors; nothing a user can act on.
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}
export FLWR_LOCAL_CONTROL_API_PORT=${FLWR_LOCAL_CONTROL_API_PORT:-39093}
export PATH="$PWD/.venv/bin:$PATH"
NODES=${NUM_SUPERNODES:-3}
OUT=${OUTPUT_DIR:-$PWD/outputs/$(date +%Y%m%d-%H%M%S)}

stop_superlink() {
  # The local SuperLink is detached by flwr; find it by our own FLWR_HOME and stop its PID.
  for pid in $(pgrep -f "flower-superlink.*$FLWR_HOME/local-superlink" || true); do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_superlink EXIT

python -m fed_dp_lora.deploy.flwr_run . \
  --federation-config "num-supernodes=$NODES client-resources-num-cpus=${CPUS_PER_CLIENT:-1}" \
  -c "output-dir=\"$OUT\"" "$@"
