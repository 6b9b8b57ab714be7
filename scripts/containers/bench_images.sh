#!/usr/bin/env bash
# Time the image builds and report the image sizes; ends with one key=value line.
#
# Usage: sudo bash scripts/containers/bench_images.sh
# Measures, one after another on this machine: a base image made from scratch (debootstrap)
# under a throwaway name, a cold build of both images on it (build-images.sh with that base:
# every layer, the dependency install from PyPI included, and the second image sharing the
# first one's dependency layer as always), then a cached build (build-images.sh again on the
# usual base, nothing changed), and the sizes. The throwaway images are removed by name.
# The federation's run time in containers is printed by tests/e2e/test_containers.py
# ("container federation timings"). Take these on an idle machine: they move with its load and
# with PyPI's speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
podman="${PODMAN:-podman}"
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
size() { "$podman" image inspect --format '{{.Size}}' "$1" | python3 -c "import sys; print(f'{int(sys.stdin.read()) / 1e9:.2f}')"; }

scratch=localhost/fed-dp-lora-base:bench
t0=$(now); IMAGE=$scratch FORCE=1 bash scripts/containers/base-image.sh >/dev/null; t1=$(now)
base_s=$(secs "$t0" "$t1")
t0=$(now); BASE_IMAGE=$scratch bash scripts/containers/build-images.sh bench-cold >/dev/null; t1=$(now)
cold_s=$(secs "$t0" "$t1")
"$podman" rmi localhost/fed-dp-lora-superlink:bench-cold localhost/fed-dp-lora-supernode:bench-cold "$scratch" >/dev/null

bash scripts/containers/build-images.sh >/dev/null  # the cache holds this tree
t0=$(now); bash scripts/containers/build-images.sh >/dev/null; t1=$(now); cached_s=$(secs "$t0" "$t1")

base="$(bash scripts/containers/base-image.sh | tail -n 1)"
dep_layer=$("$podman" history --format '{{.Size}} {{.CreatedBy}}' localhost/fed-dp-lora-supernode:latest \
  | grep -- '--mount=type=bind' | awk '{print $1 $2}')
echo "base_image_s=$base_s build_cold_both_s=$cold_s build_cached_both_s=$cached_s" \
  "superlink_gb=$(size localhost/fed-dp-lora-superlink:latest) supernode_gb=$(size localhost/fed-dp-lora-supernode:latest)" \
  "base_gb=$(size "$base") shared_dependency_layer=$dep_layer"
