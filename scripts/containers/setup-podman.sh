#!/usr/bin/env bash
# Install what the container images, the compose file and tests/e2e/test_containers.py need, as
# root, from Debian's archive: podman, buildah, debootstrap (the base image, no registry),
# runc, catatonit (--init) and podman-compose. Idempotent: does nothing that is already done.
#
# Usage: sudo bash scripts/containers/setup-podman.sh
# On machines without systemd or with a hybrid cgroup v1/v2 layout (these build machines), it
# also writes /etc/containers/containers.conf.d/50-fed-dp-lora.conf: the runc runtime, cgroupfs,
# file events and fixed ulimits (crun refuses the hybrid layout; raising RLIMIT_NOFILE/NPROC is
# not permitted there). Hosts with systemd and cgroup v2 keep Podman's defaults.
set -euo pipefail

packages=(podman buildah debootstrap runc catatonit podman-compose)
if [[ $(id -u) != 0 ]]; then
  echo "error: run as root (apt-get install, and rootful Podman builds the base image with debootstrap)" >&2
  exit 1
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "installing ${missing[*]} ..." >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

conf=/etc/containers/containers.conf.d/50-fed-dp-lora.conf
if [[ ! -d /run/systemd/system || "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]]; then
  mkdir -p "$(dirname "$conf")"
  cat > "$conf.tmp" <<'CONF'
# Written by fed-dp-lora scripts/containers/setup-podman.sh: no systemd or a hybrid cgroup layout.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  mv "$conf.tmp" "$conf"
fi
podman info --format 'podman {{.Version.Version}}: runtime {{.Host.OCIRuntime.Name}}, cgroups {{.Host.CgroupManager}} {{.Host.CgroupsVersion}}' >&2
