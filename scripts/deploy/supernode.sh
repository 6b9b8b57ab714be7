#!/usr/bin/env bash
# Start one institution's Flower SuperNode; `exec`s it, so this script's PID is the SuperNode's.
#
# Usage: scripts/deploy/supernode.sh --superlink HOST:PORT --ca CA.crt --key KEY \
#          --data FILE --state-dir DIR --records N --epsilon E [--labels a,b] [--max-delta D]
#          [--name NAME] [--text-column C] [--label-column C] [--feature-columns A,B,...]
#          [--allow-non-private]
#          [--port P] [--batch-size B] [--device auto|cpu|cuda] [--pin-app-hash SHA256]...
#          [--cold-start] [--keygen-only] [--insecure]
# Env (args win): SUPERLINK, CA_CERT, KEY, DATA_PATH, STATE_DIR, RECORDS, EPSILON, LABELS,
#   MAX_DELTA, NAME, FEATURE_COLUMNS, PORT, BATCH_SIZE, DEVICE, PIN_APP_HASH, FLWR_HOME (default ~/.flwr: where
#   the SuperNode unpacks the app it is sent).
#   --superlink   the SuperLink's address (superlink.sh's port)
#   --ca          CA certificate that signed the SuperLink's certificate (make-certs.sh ca.crt)
#   --key         this institution's ECDSA private key (OpenSSH format). If missing it is made
#                 with ssh-keygen -t ecdsa -b 384, KEY.pub is printed and the script exits 3:
#                 the operator registers KEY.pub (register.sh), then start this again.
#   --data        the institution's CSV/JSONL/Parquet file (columns text,label; label good/bad;
#                 and the table columns it lets the probe's head read, see --feature-columns)
#   --state-dir   directory on this institution's disk for the privacy ledger and noise key;
#                 one per SuperNode (a second SuperNode on the same directory is refused)
#   --records     the record count this institution declares publicly (at least the usable
#                 records in --data): it sets the sampling rate and the aggregation weight;
#                 the true count is never sent
#   --epsilon     this institution's lifetime privacy budget over every study it joins
#   --labels      class names in index order (e.g. good,bad); a run must use exactly these
#   --max-delta   the largest delta it accepts (default 1/(10 records))
#   --name        its public name in the server's report (default: the node id)
#   --text-column/--label-column  its columns (default text, label); a run cannot remap them
#   --feature-columns  table columns of --data the linear probe's head may read besides the text
#                 (comma-separated; default none). The default credit run reads the applicant's
#                 columns (conf/data/credit.yaml): export_institutions.py prints the list.
#   --allow-non-private  let a run with privacy off train on this data (off by default)
#   --port        local port of this SuperNode's runtime API, on 127.0.0.1 (default 9094;
#                 every SuperNode on one machine needs its own)
#   --batch-size/--device  optional per-institution settings for the ClientApp
#   --pin-app-hash  also run the app bundle with this SHA-256 (repeatable; env PIN_APP_HASH,
#                 space-separated). By default only a bundle byte-identical to the fed_dp_lora
#                 and conf/ installed here runs; any other is answered with error 106 and the
#                 differences go to STATE_DIR/app-check.jsonl (see fed_dp_lora/deploy/app_check.py)
#   --cold-start  Flower's own executor: every message a new Python process that imports
#                 everything again, and NO app check. Only to measure the difference.
#   --keygen-only make the key if missing, print KEY.pub and exit
#   --insecure    plain HTTP and no key: ONLY for a local test SuperLink started with --insecure
# Runs the app with the venv already installed here; never installs dependencies at run time.
# The ClientApp runs under our launcher (fed-dp-lora-launcher, started here beside
# `flower-supernode --isolation process`): it imports the heavy modules once and forks a fresh,
# warm process per message, after checking the app bundle. It exits with the SuperNode.
# Exit code 1 from flower-supernode ("Exit Code: 305 ... Failed to activate SuperNode") means the
# SuperLink refused it: key not registered, wrong CA, or - after a crash - the SuperLink still
# sees this node online (wait ~30-60 s for its heartbeat to expire; a SIGTERM stop is instant).
set -euo pipefail

superlink="${SUPERLINK:-}"; ca="${CA_CERT:-}"; key="${KEY:-}"; data="${DATA_PATH:-}"
state="${STATE_DIR:-}"; port="${PORT:-9094}"; epsilon="${EPSILON:-}"; batch="${BATCH_SIZE:-}"
device="${DEVICE:-}"; records="${RECORDS:-}"; labels="${LABELS:-}"; max_delta="${MAX_DELTA:-}"
name="${NAME:-}"; text_column=""; label_column=""; allow_non_private=0; insecure=0; keygen_only=0
feature_columns="${FEATURE_COLUMNS:-}"
# --- warm launcher and app check: settings ---
read -r -a pins <<<"${PIN_APP_HASH:-}"; cold=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --state-dir) state="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --epsilon) epsilon="$2"; shift 2 ;;
    --records) records="$2"; shift 2 ;;
    --labels) labels="$2"; shift 2 ;;
    --max-delta) max_delta="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --text-column) text_column="$2"; shift 2 ;;
    --label-column) label_column="$2"; shift 2 ;;
    --feature-columns) feature_columns="$2"; shift 2 ;;
    --allow-non-private) allow_non_private=1; shift ;;
    --batch-size) batch="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --pin-app-hash) pins+=("$2"); shift 2 ;;  # warm launcher and app check
    --cold-start) cold=1; shift ;;             # warm launcher and app check
    --keygen-only) keygen_only=1; shift ;;
    --insecure) insecure=1; shift ;;
    -h|--help) awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "error: $*" >&2; exit 1; }

if [[ $insecure == 0 ]]; then
  [[ -n "$key" ]] || die "give --key PATH (this institution's private key; made if missing)"
  if [[ ! -e "$key" ]]; then
    mkdir -p "$(dirname "$key")"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fed-dp-lora supernode $(hostname)" -f "$key"
    pub="$(cd "$(dirname "$key")" && pwd)/$(basename "$key").pub"
    echo "Made key pair $key. Send the PUBLIC key to the SuperLink operator to register:" >&2
    echo "  $pub" >&2
    [[ $keygen_only == 1 ]] && { echo "$pub"; exit 0; }
    echo "Start this script again once it is registered (until then the SuperLink refuses it)." >&2
    exit 3
  fi
  [[ $keygen_only == 1 ]] && { echo "$(cd "$(dirname "$key")" && pwd)/$(basename "$key").pub"; exit 0; }
  [[ -n "$ca" && -r "$ca" ]] || die "CA certificate (--ca) '${ca}' not found"
fi
[[ -n "$superlink" ]] || die "give --superlink HOST:PORT"
[[ -n "$data" && -f "$data" && -r "$data" ]] || die "data file (--data) '${data}' does not exist or is not readable"
[[ -n "$state" && -d "$state" && -w "$state" ]] || die "state dir (--state-dir) '${state}' does not exist or is not writable (create it: mkdir -p DIR; chmod 700 DIR)"
number='^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$'
[[ "$epsilon" =~ $number ]] || die "--epsilon (this institution's lifetime budget) must be a positive number, got '$epsilon'"
[[ "$records" =~ ^[1-9][0-9]*$ ]] || die "--records (the record count you declare publicly) must be a positive integer, got '$records'"
[[ -z "$max_delta" || "$max_delta" =~ $number ]] || die "--max-delta must be a number in (0, 1), got '$max_delta'"
[[ -z "$batch" || "$batch" =~ ^[1-9][0-9]*$ ]] || die "--batch-size must be a positive integer, got '$batch'"
[[ -z "$device" || "$device" =~ ^(auto|cpu|cuda)$ ]] || die "--device must be auto, cpu or cuda, got '$device'"

abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
toml_str() { local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"; }
node_config="data-path=$(toml_str "$(abspath "$data")") state-dir=$(toml_str "$(cd "$state" && pwd)")"
node_config+=" records=$records epsilon=$epsilon"
[[ -n "$labels" ]] && node_config+=" labels=$(toml_str "$labels")"
[[ -n "$max_delta" ]] && node_config+=" max-delta=$max_delta"
[[ -n "$name" ]] && node_config+=" name=$(toml_str "$name")"
[[ -n "$text_column" ]] && node_config+=" text-column=$(toml_str "$text_column")"
[[ -n "$label_column" ]] && node_config+=" label-column=$(toml_str "$label_column")"
[[ -n "$feature_columns" ]] && node_config+=" feature-columns=$(toml_str "$feature_columns")"
[[ $allow_non_private == 1 ]] && node_config+=" allow-non-private=true"
[[ -n "$batch" ]] && node_config+=" batch-size=$batch"
[[ -n "$device" ]] && node_config+=" device=$(toml_str "$device")"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${FLWR_BIN:-$(cd "$here/../.." && pwd)/.venv/bin}"
[[ -x "$bin/flower-supernode" ]] || bin="$(dirname "$(command -v flower-supernode)")"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PATH="$bin:$PATH"  # the SuperExec / ClientApp processes it starts come from the same venv

# The institution checks its own file first: problems show here, with the fix, before joining.
"$bin/python" -m fed_dp_lora.preflight --data "$data" --records "$records" --labels "$labels" \
  ${text_column:+--text-column "$text_column"} ${label_column:+--label-column "$label_column"} \
  ${feature_columns:+--feature-columns "$feature_columns"} >&2 \
  || die "the data file is not ready (see above); nothing was started"

# One SuperNode per state dir: two would share a noise key and a kept update. The lock is held
# by this process (and, after exec, by the SuperNode) for as long as it runs.
exec 9>"$state/.supernode.lock"
flock -n 9 || die "state dir $state is in use by another SuperNode; give each SuperNode its own --state-dir"
if [[ $insecure == 0 ]]; then
  fingerprint="$(ssh-keygen -lf "$(abspath "$key")" | awk '{print $2}')"
  if [[ -f "$state/supernode.identity" && "$(cat "$state/supernode.identity")" != "$fingerprint" ]]; then
    die "state dir $state belongs to the SuperNode with key $(cat "$state/supernode.identity"), not to $key ($fingerprint). Give this key its own --state-dir"
  fi
  echo "$fingerprint" > "$state/supernode.identity"
fi

args=(--superlink "$superlink" --port "$port" --node-config "$node_config")
if [[ $insecure == 1 ]]; then
  echo "WARNING: --insecure: no TLS, no SuperNode authentication. Local tests only." >&2
  args+=(--insecure)
else
  args+=(--root-certificates "$(abspath "$ca")" --auth-supernode-private-key "$(abspath "$key")")
fi

# --- warm launcher and app check: start ---
# The launcher takes the SuperNode's ClientApp tasks on its loopback Runtime API; a secret in the
# state dir (0600) makes sure no other local process can take them. `--parent-pid $$`: after the
# exec below, $$ is the SuperNode, so the launcher ends with it.
if [[ $cold == 0 ]]; then
  # The console script once installed (pip install -e .); else the module, with -P so that the
  # current directory is not on sys.path (nothing there may shadow the code it checks).
  launcher=("$bin/python" -P -m fed_dp_lora.deploy.launcher)
  [[ -x "$bin/fed-dp-lora-launcher" ]] && launcher=("$bin/fed-dp-lora-launcher")
  launcher+=(--audit-log "$(cd "$state" && pwd)/app-check.jsonl")
  for pin in "${pins[@]}"; do launcher+=(--pin-app-hash "$pin"); done
  app_hash="$("${launcher[@]}" --check)" || die "the launcher refused its settings (see above)"
  secret="$(cd "$state" && pwd)/superexec-auth.secret"
  [[ -s "$secret" ]] || (umask 077 && head -c 32 /dev/urandom >"$secret")
  "${launcher[@]}" --runtime-api-address "127.0.0.1:$port" --insecure \
    --superexec-auth-secret-file "$secret" --parent-pid $$ &
  args+=(--isolation process --superexec-auth-secret-file "$secret")
  echo "Launcher pid $!: runs app bundles identical to the code installed here (sha256 $app_hash)${pins[*]:+ or pinned: ${pins[*]}}" >&2
else
  [[ ${#pins[@]} == 0 ]] || die "--pin-app-hash needs the launcher; drop --cold-start"
  echo "WARNING: --cold-start: Flower's own executor, NO app check. For measurements only." >&2
fi

echo "SuperNode -> $superlink, runtime port $port, node-config: $node_config (pid $$)" >&2
exec "$bin/flower-supernode" "${args[@]}"
