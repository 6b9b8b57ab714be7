#!/usr/bin/env bash
# Add or replace a SuperLink connection [superlink.NAME] in $FLWR_HOME/config.toml, so that
# `flwr run . NAME`, `flwr supernode register KEY.pub NAME`, `flwr ls NAME` ... reach it.
#
# Usage: scripts/deploy/connection.sh NAME ADDRESS CA_CERT     (TLS, the normal case)
#        scripts/deploy/connection.sh --insecure NAME ADDRESS  (plain HTTP, local tests only)
#   NAME     connection name, e.g. credit
#   ADDRESS  host:port of the SuperLink (the one port of superlink.sh), e.g. link.example.org:9092
#   CA_CERT  the CA certificate that signed the SuperLink's certificate (ca.crt); stored as an
#            absolute path in `root-certificates` (flwr 1.41 rejects relative paths)
# Env: FLWR_HOME (default ~/.flwr). Other entries of config.toml are kept; the file is written
# with flwr's own writer (flwr.cli.flower_config), so keys are exactly those flwr 1.41 reads.
# With no `insecure` key a connection is TLS and verified against the system CAs unless
# root-certificates is set.
set -euo pipefail

insecure=0
if [[ "${1:-}" == --insecure ]]; then insecure=1; shift; fi
if [[ $# -ne $((3 - insecure)) ]]; then
  awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0" >&2; exit 2
fi
name="$1"; address="$2"; ca=""
if [[ $insecure == 0 ]]; then
  [[ -r "$3" ]] || { echo "error: CA certificate $3 not found" >&2; exit 1; }
  ca="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$(cd "$here/../.." && pwd)/.venv/bin/python}"
[[ -x "$py" ]] || py="$(command -v python3)"

export FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}"
mkdir -p "$FLWR_HOME"
NAME="$name" ADDRESS="$address" CA="$ca" INSECURE="$insecure" "$py" - <<'PY'
import os
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home

insecure = os.environ["INSECURE"] == "1"
write_superlink_connection(SuperLinkConnection(
    name=os.environ["NAME"],
    address=os.environ["ADDRESS"],
    root_certificates=None if insecure else os.environ["CA"],
    insecure=True if insecure else None,
))
print(f"[superlink.{os.environ['NAME']}] -> {os.environ['ADDRESS']} "
      f"({'INSECURE, tests only' if insecure else 'TLS, CA ' + os.environ['CA']}) "
      f"in {get_flwr_home() / 'config.toml'}")
PY
