#!/usr/bin/env bash
# Start the Flower SuperLink for a real deployment (not simulation); `exec`s it, so this
# script's PID is the SuperLink's PID.
#
# Usage: scripts/deploy/superlink.sh [--certs DIR] [--host H] [--port P] [--state-dir DIR] [--insecure]
# Env (args win): CERTS (dir with ca.crt, server.pem, server.key from make-certs.sh),
#   HOST (bind address, default 0.0.0.0; use 127.0.0.1 for loopback), PORT (default 9092),
#   STATE_DIR (default ./superlink-state: SQLite database superlink.db; logs go to stdout),
#   FLWR_HOME (default: STATE_DIR/flwr-home; the SuperLink keeps installed apps there).
# Flower 1.41 serves Fleet (SuperNodes), Control (`flwr`) and the ServerApp runtime on this
# one HTTPS port (--control-api-address is deprecated and not used). Its own SuperExec connects
# to 127.0.0.1:PORT (or HOST:PORT if HOST is a specific address): the server certificate must
# cover that name too (make-certs.sh always includes localhost and 127.0.0.1).
# Secure by default: TLS plus SuperNode authentication (only public keys registered with
# register.sh may connect). Runs the app with the venv already installed here: no per-run
# `uv sync`.
# --insecure: plain HTTP, no SuperNode auth. ONLY for local tests.
set -euo pipefail

certs="${CERTS:-}"; host="${HOST:-0.0.0.0}"; port="${PORT:-9092}"
state="${STATE_DIR:-./superlink-state}"; insecure=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --state-dir) state="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${FLWR_BIN:-$(cd "$here/../.." && pwd)/.venv/bin}"
[[ -x "$bin/flower-superlink" ]] || bin="$(dirname "$(command -v flower-superlink)")"

mkdir -p "$state"
state="$(cd "$state" && pwd)"
export FLWR_HOME="${FLWR_HOME:-$state/flwr-home}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PATH="$bin:$PATH"  # the SuperExec / ServerApp processes it starts come from the same venv
mkdir -p "$FLWR_HOME"

args=(--host "$host" --port "$port" --database "$state/superlink.db"
      --isolation subprocess --disable-runtime-dependency-installation)
if [[ $insecure == 1 ]]; then
  printf '%s\n' "########################################################################" \
    "# WARNING: --insecure: NO TLS and NO SuperNode authentication." \
    "# Anyone who can reach $host:$port can join the federation and read" \
    "# the model updates. For local tests only." \
    "########################################################################" >&2
  args+=(--insecure)
else
  [[ -n "$certs" ]] || { echo "error: give --certs DIR (or CERTS=DIR) with ca.crt server.pem server.key" >&2; exit 2; }
  for f in ca.crt server.pem server.key; do
    [[ -r "$certs/$f" ]] || { echo "error: $certs/$f missing (make it with make-certs.sh)" >&2; exit 1; }
  done
  certs="$(cd "$certs" && pwd)"
  args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem"
         --ssl-keyfile "$certs/server.key" --enable-supernode-auth)
fi

echo "SuperLink on $host:$port (state: $state, FLWR_HOME: $FLWR_HOME, pid $$)" >&2
cd "$state"  # relative output paths of the ServerApp land here
exec "$bin/flower-superlink" "${args[@]}"
