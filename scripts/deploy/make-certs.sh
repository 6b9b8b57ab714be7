#!/usr/bin/env bash
# Make a test CA and a SuperLink TLS server certificate signed by it (for trials and
# loopback tests; a real deployment should use certificates from the institution's PKI).
#
# Usage: scripts/deploy/make-certs.sh OUT_DIR [EXTRA_HOST...]
#   OUT_DIR     where ca.key, ca.crt, server.key, server.pem are written
#   EXTRA_HOST  extra DNS names or IP addresses for the certificate's SAN
#               (localhost and 127.0.0.1 are always included)
# Env: FORCE=1 overwrite an existing CA in OUT_DIR; DAYS (default 365) validity.
# Give SuperNodes and `flwr` (connection.sh) ca.crt; the SuperLink (superlink.sh) uses
# all three of ca.crt, server.pem, server.key.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  awk 'NR>1 && !/^#/ {exit} NR>1 {sub(/^# ?/, ""); print}' "$0"
  exit 2
fi
out="$1"; shift
days="${DAYS:-365}"

if [[ -e "$out/ca.key" || -e "$out/ca.crt" ]] && [[ "${FORCE:-0}" != 1 ]]; then
  echo "error: $out already holds a CA (ca.key/ca.crt); set FORCE=1 to replace it" >&2
  exit 1
fi
mkdir -p "$out"
umask 077

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done

openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" \
  -subj "/CN=fed-dp-lora test CA" -out "$out/ca.crt"

openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=${1:-localhost}" -out "$out/server.csr"
cat > "$out/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days "$days" -sha256 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"

chmod 600 "$out/ca.key" "$out/server.key"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null

echo "Made in $(cd "$out" && pwd):"
echo "  ca.key      test CA private key (0600) - keep offline, only to sign server certs"
echo "  ca.crt      test CA certificate - give to every SuperNode and to flwr (root-certificates)"
echo "  server.key  SuperLink TLS private key (0600)"
echo "  server.pem  SuperLink TLS certificate, SAN: $san"
