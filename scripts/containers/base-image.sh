#!/usr/bin/env bash
# Build the local Debian base image that the SuperLink and SuperNode images start FROM, without a
# container registry: debootstrap (minbase) + Python 3.11 in a venv on PATH + user `app` (uid
# 49999, HOME /app), the layout of Flower's official images, so that the Containerfiles run
# unchanged on flwr/superlink or flwr/supernode where a registry is reachable.
#
# Usage: scripts/containers/base-image.sh        (prints the image name on its last line)
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), PODMAN (default podman),
#   IMAGE (default: the content-key name below) and FORCE=1 (build even if it exists), for
#   scripts/containers/bench_images.sh, which times a fresh base under a throwaway name.
# The tag is a content key: the hash of this script's code (comments aside), so a second call
# on the same machine returns at once, and any change to the recipe makes a new base. Needs root (debootstrap, chroot).
set -euo pipefail

podman="${PODMAN:-podman}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
packages=python3,python3-venv,ca-certificates,openssh-client
key="$(grep -v '^[[:space:]]*#' "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)"  # comments aside
image="${IMAGE:-localhost/fed-dp-lora-base:$suite-$key}"

if [[ "${FORCE:-0}" != 1 ]] && "$podman" image exists "$image"; then echo "$image"; exit 0; fi
command -v debootstrap >/dev/null || { echo "error: debootstrap not installed (scripts/containers/setup-podman.sh)" >&2; exit 1; }

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fdl-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $suite (minbase + $packages) into $rootfs ..." >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >&2

# The official images' layout: a venv at /python/venv on PATH, user app:app 49999, HOME=/app.
chroot "$rootfs" python3 -m venv /python/venv >&2
chroot "$rootfs" groupadd --gid 49999 app
chroot "$rootfs" useradd --uid 49999 --gid 49999 --home-dir /app --create-home --shell /bin/bash app
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

tar -C "$rootfs" -c . | "$podman" import \
  --change 'ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV HOME=/app' --change 'ENV LANG=C.UTF-8' \
  --change 'WORKDIR /app' --change 'USER app' --change 'CMD ["/bin/bash"]' \
  --message "debootstrap $suite minbase + $packages, venv /python/venv, user app 49999" \
  - "$image" >&2
if [[ -z "${IMAGE:-}" ]]; then  # bases made by earlier versions of this script: untag (layers in use stay)
  for old in $("$podman" images --format '{{.Repository}}:{{.Tag}}' localhost/fed-dp-lora-base); do
    [[ "$old" == "localhost/fed-dp-lora-base:$suite-"* && "$old" != "$image" ]] && "$podman" untag "$old" "$old" >&2 || true
  done
fi
echo "$image"
