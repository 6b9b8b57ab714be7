"""Helpers for the container tests: build the images, run containers/compose.yaml, remove it all.

Everything goes through the scripts a user runs (scripts/containers/*.sh, podman-compose with
the repo's compose file). A test project has its own compose project name, so its containers,
network and volumes have names of their own; :meth:`ComposeFederation.remove` deletes exactly
those, by name, and reports anything of the project that is still there. The SuperLink's port
is published on 127.0.0.1 only; the containers talk to each other on the project's Podman network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "containers" / "compose.yaml"
CONTAINER_SCRIPTS = REPO / "scripts" / "containers"


def missing_podman() -> str | None:
    """Why the container tests cannot run here, or None if they can."""
    missing = [tool for tool in ("podman", "podman-compose") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: run `bash scripts/containers/setup-podman.sh` "
                "as root (Debian packages)")
    if os.geteuid() != 0:
        return "needs root: rootful Podman, and debootstrap for the base image"
    return None


def podman(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`podman ARGS`; merged output; RuntimeError with it on a non-zero exit if `check`."""
    proc = subprocess.run(["podman", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc


def build_images(tag: str, timeout: float = 3600.0) -> dict[str, str]:
    """scripts/containers/build-images.sh TAG: {"superlink": image, "supernode": image}."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(CONTAINER_SCRIPTS / "build-images.sh"), tag], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"build-images.sh exited {proc.returncode}:\n{proc.stderr[-5000:]}")
    images = proc.stdout.split()
    return {name: next(i for i in images if f"fed-dp-lora-{name}:" in i) for name in ("superlink", "supernode")}


def make_federation(directory: Path) -> Path:
    """scripts/containers/federation.sh: certificates, three registered-to-be keys, records."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(CONTAINER_SCRIPTS / "federation.sh"), str(directory)], env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"federation.sh exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return directory


@dataclass
class ComposeFederation:
    """containers/compose.yaml under its own project name; remove() deletes what it made."""

    project: str
    env: dict[str, str] = field(repr=False)

    @classmethod
    def create(cls, project: str, federation: Path, tag: str, port: int) -> "ComposeFederation":
        env = dict(os.environ, FDL_FEDERATION=str(federation), FDL_TAG=tag, FDL_PORT=str(port),
                   FDL_PUBLISH="127.0.0.1")
        return cls(project, env)

    @property
    def spec(self) -> dict:
        return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))

    def compose(self, *args: str, timeout: float = 300.0) -> str:
        command = ["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        proc = subprocess.run(command, env=self.env, cwd=str(REPO), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
        return proc.stdout

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # podman-compose's container name

    @property
    def network(self) -> str:
        return f"{self.project}_default"

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def logs(self, service: str) -> str:
        return podman("logs", self.container(service), check=False).stdout

    def wait_log(self, service: str, text: str, timeout: float = 120.0) -> str:
        """The container's log once it holds `text`; RuntimeError with the log if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.logs(service)
            if text in log:
                return log
            state = podman("inspect", "--format", "{{.State.Status}}", self.container(service), check=False)
            if state.stdout.strip() in ("exited", "stopped"):
                raise RuntimeError(f"{service} exited before logging {text!r}:\n{log[-3000:]}")
            time.sleep(1)
        raise TimeoutError(f"{service}: no {text!r} within {timeout:.0f}s:\n{self.logs(service)[-3000:]}")

    def leftovers(self) -> list[str]:
        """Containers, volumes and the network of this project that still exist."""
        label = f"label=io.podman.compose.project={self.project}"
        found = podman("ps", "-a", "--filter", label, "--format", "{{.Names}}", check=False).stdout.split()
        volumes = [self.volume(name) for name in self.spec.get("volumes", {})]
        found += [v for v in volumes if podman("volume", "exists", v, check=False).returncode == 0]
        if podman("network", "exists", self.network, check=False).returncode == 0:
            found.append(self.network)
        return found

    def remove(self, extra_containers: tuple[str, ...] = ()) -> list[str]:
        """Stop and delete this project's containers, volumes and network, by name; what is left."""
        try:
            self.compose("down", "-v", timeout=300)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # removed one by one below
        names = [self.container(s) for s in self.spec["services"]] + list(extra_containers)
        for name in names:
            podman("rm", "-f", "-t", "10", name, check=False)
        for name in self.spec.get("volumes", {}):
            podman("volume", "rm", "-f", self.volume(name), check=False)
        podman("network", "rm", "-f", self.network, check=False)
        return self.leftovers()
