#!/usr/bin/env bash
# Make the files containers/compose.yaml mounts, for a trial federation on one host: a test CA
# and SuperLink certificate (also valid for the compose service name `superlink`), one key pair
# per institution, each institution's records from the packaged credit data, and runs/ for the
# ServerApp's outputs. Uses the scripts of scripts/deploy/ (make-certs.sh, supernode.sh
# --keygen-only, export_institutions.py). In a real deployment each institution makes its own
# key and brings its own file; see docs/deployment-containers.md.
#
# Usage: scripts/containers/federation.sh DIR [--institutions N] [EXTRA_HOST...]
#   DIR            e.g. containers/federation (the compose file's default, gitignored)
#   EXTRA_HOST     more names for the SuperLink certificate (e.g. the host's public name)
# Env: PYTHON (default .venv/bin/python, for export_institutions.py).
# The images run as uid 49999 (as Flower's official images do), so as root this gives every
# mounted file to 49999 (the private keys stay 0600); otherwise it prints the chown to run.
set -euo pipefail

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0"; exit 2; }
dir="$1"; shift
n=3
if [[ "${1:-}" == --institutions ]]; then n="$2"; shift 2; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
deploy="$repo/scripts/deploy"
py="${PYTHON:-$repo/.venv/bin/python}"

mkdir -p "$dir/keys" "$dir/runs"
[[ -e "$dir/certs/ca.crt" ]] || bash "$deploy/make-certs.sh" "$dir/certs" superlink "$@" >&2
for ((i = 0; i < n; i++)); do
  bash "$deploy/supernode.sh" --key "$dir/keys/institution-$i" --keygen-only >/dev/null
done
"$py" "$deploy/export_institutions.py" "$dir/data" --institutions "$n" >&2

mounted=("$dir/certs/ca.crt" "$dir/certs/server.pem" "$dir/certs/server.key" "$dir/runs"
         "$dir"/keys/institution-* "$dir"/data/institution-*.csv)
if [[ $(id -u) == 0 ]]; then
  chown 49999:49999 "${mounted[@]}"
else
  echo "The containers run as uid 49999: as root, run  chown 49999:49999 ${mounted[*]}" >&2
fi
echo "Federation files in $(cd "$dir" && pwd): certs/ (ca.key stays here, never mounted), keys/, data/, runs/" >&2
