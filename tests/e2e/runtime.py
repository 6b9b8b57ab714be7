"""A private Flower SuperLink for end-to-end tests: own FLWR_HOME, free ports, stopped by PID.

Nothing here touches the default local SuperLink (127.0.0.1:39091) or any other process:
the SuperLink is started in its own session (process group) and only that group is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "e2e"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv), else from PATH."""
    import sys

    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def runtime_env(flwr_home: Path) -> dict[str, str]:
    """Environment for the SuperLink and `flwr`: quiet, offline, no per-run `uv sync`."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # Make sure the venv's console scripts come first for the SuperLink's own subprocesses.
    env["PATH"] = f"{Path(_bin('flwr')).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(flwr_home: Path, port: int) -> Path:
    """$FLWR_HOME/config.toml with one explicit connection, also the default.

    Format as written by flwr/cli/flower_config.py (`[superlink] default = ...` and
    `[superlink.NAME] address/insecure`). An explicit address is "user-managed": flwr never
    starts its own local SuperLink for it (the `:local:` magic address would).
    """
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )
    return path


@dataclass
class SuperLink:
    """A simulation SuperLink started by :func:`start_superlink`; call :meth:`stop`."""

    process: subprocess.Popen
    flwr_home: Path
    port: int
    control_port: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def command(self) -> list[str]:
        return list(self.process.args)  # type: ignore[arg-type]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def descendants(self) -> list:
        """Live processes this SuperLink started (psutil.Process objects, PID-reuse safe).

        Its process tree, plus processes that carry this SuperLink's private FLWR_HOME in
        their environment: Ray actors can be re-parented to init (outside the tree) once
        their raylet exits, but they inherit the environment. FLWR_HOME is a fresh temporary
        directory, so this never matches anybody else's processes.
        """
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with ray (flwr[simulation])
            return []
        found = {}
        try:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                found[proc.pid] = proc
        except psutil.Error:
            pass
        home = str(self.flwr_home)
        for proc in psutil.process_iter():
            if proc.pid in found or proc.pid in (self.process.pid, os.getpid()):
                continue
            try:
                if proc.environ().get("FLWR_HOME") == home:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self, grace: float = 15.0) -> None:
        """Stop the SuperLink by PID, with everything it started, and wait for it.

        The SuperLink runs in its own session, so its PID is its process-group id: SIGTERM
        goes to that group. flwr starts the SuperExec (and under it flwr-simulation and Ray)
        detached in a session of its own, outside that group, and a Ray actor can outlive a
        graceful stop; so the SuperLink's descendants are listed first (by PID) and any
        still alive after the grace period are killed one by one.
        """
        children = self.descendants()
        pgid = self.process.pid  # start_new_session=True: group id == the SuperLink's PID
        if self.process.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if children:
            import psutil

            _, alive = psutil.wait_procs(children, timeout=grace)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)


def start_superlink(
    flwr_home: Path, database: str | None = None, timeout: float = 60.0
) -> SuperLink:
    """Start `flower-superlink --simulation` on free ports, in a new session, and wait for /health.

    `database` defaults to a SQLite file in `flwr_home` (what flwr's own local SuperLink
    uses). `:memory:` works but is racy in flwr 1.41: all threads share one in-memory SQLite
    connection, and in one of two trial runs here the SuperExec's first pull-task-input failed
    with "cannot commit transaction - SQL statements in progress"; the run then ended without
    training while `flwr run --stream` still exited 0.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port, control_port = free_port(), free_port()
    while control_port == port:
        control_port = free_port()
    env = runtime_env(flwr_home)
    log_path = flwr_home / "superlink.log"
    command = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation", "subprocess",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--database", database or str(flwr_home / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    log_file = open(log_path, "wb")  # noqa: SIM115 (kept open for the process' lifetime)
    process = subprocess.Popen(
        command,
        env=env,
        cwd=str(flwr_home),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()  # the child holds its own descriptor
    link = SuperLink(process, flwr_home, port, control_port, log_path, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            link.stop()
            raise RuntimeError(
                f"flower-superlink exited with code {process.returncode}:\n{link.log()[-3000:]}"
            )
        if link.healthy():
            write_connection(flwr_home, port)
            return link
        time.sleep(0.5)
    link.stop()
    raise RuntimeError(f"flower-superlink not healthy after {timeout:.0f}s:\n{link.log()[-3000:]}")


def flwr_run(
    link: SuperLink,
    app_dir: Path,
    federation_config: str,
    run_config: list[str],
    timeout: float = 900.0,
) -> subprocess.CompletedProcess:
    """`flwr run APP CONNECTION --stream` against `link`; returns stdout+stderr (merged)."""
    command = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--federation-config", federation_config]
    for item in run_config:
        command += ["-c", item]
    return subprocess.run(
        command,
        env=link.env,
        cwd=str(link.flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
