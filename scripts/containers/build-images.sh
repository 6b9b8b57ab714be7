#!/usr/bin/env bash
# Build the SuperLink and SuperNode images on the local Debian base (no registry needed).
#
# Usage: scripts/containers/build-images.sh [TAG]      (default TAG: latest)
# Makes localhost/fed-dp-lora-superlink:TAG and localhost/fed-dp-lora-supernode:TAG and prints
# their names. Steps: the base image (scripts/containers/base-image.sh, cached by a content
# key), then containers/build/ (stage_context.py: the torch CPU wheel, requirements, the host's
# extra CA certificates; gitignored), then both Containerfiles with the repo as context.
# The dependency layer is built once and shared by both images; a second build with unchanged
# dependencies only redoes the app layer.
# Env: BASE_IMAGE (build on this image instead; `{component}` in it becomes superlink or
#   supernode, e.g. BASE_IMAGE=docker.io/flwr/{component}:1.41.0 where a registry is reachable),
#   PODMAN (default podman), PYTHON (default python3, >= 3.11), TORCH_WHEELS (dir holding the
#   torch CPU wheel, default $PIP_FIND_LINKS or /opt/wheels), CA_DIR (extra CA certificates to
#   trust while pip downloads, default /usr/local/share/ca-certificates).
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-latest}"
podman="${PODMAN:-podman}"
py="${PYTHON:-python3}"

if [[ -n "${BASE_IMAGE:-}" ]]; then
  base="$BASE_IMAGE"
else
  base="$(bash scripts/containers/base-image.sh | tail -n 1)"
  "$podman" tag "$base" localhost/fed-dp-lora-base:latest
fi
stage_args=()
[[ -n "${TORCH_WHEELS:-}" ]] && stage_args+=(--wheels "$TORCH_WHEELS")
[[ -n "${CA_DIR:-}" ]] && stage_args+=(--ca-dir "$CA_DIR")
"$py" scripts/containers/stage_context.py "${stage_args[@]}" >&2

for component in superlink supernode; do
  image="localhost/fed-dp-lora-$component:$tag"
  previous="$("$podman" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  echo "building $image on ${base//\{component\}/$component} ..." >&2
  "$podman" build --layers --ignorefile containers/containerignore \
    --build-arg BASE_IMAGE="${base//\{component\}/$component}" -f "containers/$component.Containerfile" -t "$image" . >&2
  # The image this tag named before, if nothing else names it now (its layers stay cached).
  if [[ -n "$previous" && "$previous" != "$("$podman" image inspect --format '{{.Id}}' "$image")" &&
        -z "$("$podman" image inspect --format '{{join .RepoTags ""}}' "$previous" 2>/dev/null)" ]]; then
    "$podman" rmi "$previous" >/dev/null 2>&1 || true
  fi
  echo "$image"
done
