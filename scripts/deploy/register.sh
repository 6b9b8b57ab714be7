#!/usr/bin/env bash
# Register one institution's SuperNode public key with the SuperLink, so that the SuperNode
# holding the matching private key may connect (SuperLink started with --enable-supernode-auth,
# i.e. superlink.sh without --insecure). Run by the federation operator.
#
# Usage: scripts/deploy/register.sh NAME KEY.pub [SUPERNODE_NAME]
#   NAME            SuperLink connection in $FLWR_HOME/config.toml (see connection.sh)
#   KEY.pub         the institution's ECDSA public key (OpenSSH format, NIST curve, e.g. from
#                   `ssh-keygen -t ecdsa -b 384`; supernode.sh makes one and prints its path)
#   SUPERNODE_NAME  optional label stored with the node (flwr 1.41 `supernode ls` does not show it)
# Env: FLWR_HOME (default ~/.flwr).
# Flower 1.41 (open source) needs nothing else: no `flwr login`, no account auth; the node id
# is assigned here, at registration, and printed. A key can be registered only once: if it is
# already registered this script says so and exits 0. Remove one with
# `flwr supernode unregister NODE_ID NAME`.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0" >&2; exit 2; fi
name="$1"; key="$2"; label="${3:-}"
[[ -r "$key" ]] || { echo "error: public key $key not found" >&2; exit 1; }
if grep -q "PRIVATE KEY" "$key"; then echo "error: $key is a PRIVATE key; give the .pub file" >&2; exit 1; fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${FLWR_BIN:-$(cd "$here/../.." && pwd)/.venv/bin}"
[[ -x "$bin/flwr" ]] || bin="$(dirname "$(command -v flwr)")"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

args=(supernode register "$key" "$name")
[[ -n "$label" ]] && args+=(--name "$label")
if out="$("$bin/flwr" "${args[@]}" 2>&1)"; then
  echo "$out"
elif grep -q "already in use" <<<"$out"; then
  echo "$key is already registered with '$name' (flwr supernode ls $name lists the nodes)."
else
  echo "$out" >&2
  exit 1
fi
