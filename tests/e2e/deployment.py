"""Helpers for deployment tests: a TLS + SuperNode-auth SuperLink and real SuperNodes on loopback.

Each helper runs the operator script it mirrors in scripts/deploy/, so the tests exercise what
docs/deployment.md tells an operator to run. Everything binds 127.0.0.1, uses free ports and
its own FLWR_HOME, and is started in a new session (process group) and stopped by PID, never by
name (the machinery of tests/e2e/runtime.py, reused here).

Typical use::

    certs = make_certs(tmp / "certs")
    link = start_deployment_superlink(tmp / "link-home", certs)
    write_tls_connection(link.flwr_home, "dep", link.port, certs.ca)
    pub = make_key(tmp / "keys" / "inst-0")
    node_id = register(link.flwr_home, "dep", pub, "inst-0")
    node = start_supernode(tmp / "node-0", link.port, certs.ca, tmp / "keys" / "inst-0",
                           data_path, state_dir)
    proc = flwr_run_deployment(link, "dep", REPO, ['overrides="+preset=tiny"', f'output-dir="{out}"'])
    node.kill()   # SIGKILL, a crash; node.stop() is a graceful SIGTERM
    link.stop()

Flower 1.41 behaviour these helpers account for (measured on loopback):
- One HTTPS port serves Fleet, Control and the ServerApp runtime: `link.control_port == link.port`.
- The node id is fixed at registration (`register` returns it); a restarted SuperNode with the
  same key gets the same id.
- After a SIGKILL the SuperLink keeps the node "online" until its heartbeat expires (about
  30-60 s); a SuperNode restarted before that exits at once with code 1 ("Failed to activate
  SuperNode"). Use :func:`wait_node_status` (``"offline"``) before restarting. A SIGTERM stop
  marks the node offline immediately.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.runtime import SuperLink, _bin, free_port, runtime_env

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "deploy"
# conf/data/credit.yaml's data.columns: what the default run's head reads besides the text.
CREDIT_COLUMNS = "Seniority,Time,Age,Expenses,Income,Assets,Debt,Amount,Price,Home,Marital,Records,Job"


@dataclass(frozen=True)
class Certs:
    """The files make-certs.sh writes."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        return self.directory / "server.key"


def _env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = runtime_env(flwr_home)  # FLWR_HOME, quiet, offline, venv first on PATH
    env.update(FLWR_BIN=str(Path(_bin("flwr")).parent), PYTHON=sys.executable, **extra)
    return env


def _script(name: str, *args: str | Path, env: dict[str, str], timeout: float = 120.0) -> str:
    """Run scripts/deploy/NAME; its merged output, or RuntimeError naming the script and output."""
    proc = subprocess.run(["bash", str(SCRIPTS / name), *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}")
    return proc.stdout


def make_certs(directory: Path, *extra_hosts: str, force: bool = False) -> Certs:
    """A test CA and a SuperLink server certificate for localhost/127.0.0.1 (make-certs.sh)."""
    env = os.environ.copy()
    if force:
        env["FORCE"] = "1"
    _script("make-certs.sh", directory, *extra_hosts, env=env)
    return Certs(Path(directory))


def make_key(path: Path) -> Path:
    """An institution's ECDSA P-384 key pair (supernode.sh --keygen-only); the .pub path."""
    out = _script("supernode.sh", "--key", path, "--keygen-only", env=os.environ.copy())
    return Path(out.strip().splitlines()[-1])


@dataclass
class DeploymentSuperLink(SuperLink):
    """A deployment SuperLink started by :func:`start_deployment_superlink`.

    `stop()` and `log()` are runtime.SuperLink's: SIGTERM to its process group, then SIGKILL to
    anything left of it or of processes carrying its FLWR_HOME. `control_port == port`.
    """

    ca: Path | None = None  # None: started with --insecure

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        scheme = "http" if self.ca is None else "https"
        context = None if self.ca is None else ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2,
                                        context=context) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, OSError):
            return False


def _spawn(command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, cwd=str(cwd), stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def start_deployment_superlink(
    flwr_home: Path, certs: Certs | Path | None, *, insecure: bool = False, timeout: float = 60.0
) -> DeploymentSuperLink:
    """scripts/deploy/superlink.sh on 127.0.0.1 and a free port; waits until /health answers.

    TLS with `certs` and --enable-supernode-auth, unless `insecure` (then `certs` may be None).
    The SuperLink's FLWR_HOME (installed apps) is `flwr_home`, its database and working
    directory `flwr_home/superlink-state`; its output goes to `flwr_home/superlink.log`.
    """
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    state = flwr_home / "superlink-state"
    env = _env(flwr_home, HOST="127.0.0.1", PORT=str(port), STATE_DIR=str(state))
    command = ["bash", str(SCRIPTS / "superlink.sh")]
    ca = None
    if insecure:
        command.append("--insecure")
    else:
        if certs is None:
            raise ValueError("certs are required unless insecure=True")
        certs = certs if isinstance(certs, Certs) else Certs(Path(certs))
        command += ["--certs", str(certs.directory)]
        ca = certs.ca
    log_path = flwr_home / "superlink.log"
    process = _spawn(command, env, flwr_home, log_path)
    link = DeploymentSuperLink(process, flwr_home, port, port, log_path, env, ca=ca)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            link.stop()
            raise RuntimeError(f"superlink.sh exited with code {process.returncode}:\n{link.log()[-3000:]}")
        if link.healthy():
            return link
        time.sleep(0.5)
    link.stop()
    raise RuntimeError(f"SuperLink not healthy after {timeout:.0f}s:\n{link.log()[-3000:]}")


def write_tls_connection(flwr_home: Path, name: str, port: int, ca: Path | None) -> Path:
    """[superlink.NAME] for 127.0.0.1:PORT in FLWR_HOME/config.toml (connection.sh); insecure if ca is None."""
    args = ["--insecure", name, f"127.0.0.1:{port}"] if ca is None else [name, f"127.0.0.1:{port}", ca]
    _script("connection.sh", *args, env=_env(Path(flwr_home)))
    return Path(flwr_home) / "config.toml"


def register(flwr_home: Path, name: str, pubkey: Path, supernode_name: str | None = None) -> int | None:
    """Register `pubkey` with connection NAME (register.sh); the new node id, None if already registered."""
    args = [name, pubkey] + ([supernode_name] if supernode_name else [])
    out = _script("register.sh", *args, env=_env(Path(flwr_home)))
    match = re.search(r"SuperNode (\d+) registered", out)
    return int(match.group(1)) if match else None


def flwr_run_deployment(link: SuperLink, name: str, app_dir: Path, run_config: list[str],
                        timeout: float = 900.0) -> subprocess.CompletedProcess:
    """`flwr run APP NAME --stream -c ...` with the operator's FLWR_HOME (`link.flwr_home`).

    No --federation-config: the federation is whichever SuperNodes are connected. Check the
    run's outputs, not only the exit code (a failed ClientApp is just an error reply).
    """
    command = [_bin("flwr"), "run", str(app_dir), name, "--stream"]
    for item in run_config:
        command += ["-c", item]
    return subprocess.run(command, env=link.env, cwd=str(link.flwr_home), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def list_nodes(flwr_home: Path, name: str) -> list[dict]:
    """`flwr supernode ls NAME --format json`: dicts with node-id (str), status, online-at, ..."""
    proc = subprocess.run([_bin("flwr"), "supernode", "ls", name, "--format", "json"], env=_env(Path(flwr_home)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    data = json.loads(proc.stdout)
    if not data.get("success"):  # --format json exits 0 even on errors
        raise RuntimeError(f"flwr supernode ls {name}: {data}")
    return list(data["nodes"])


def wait_node_status(flwr_home: Path, name: str, node_id: int, status: str, timeout: float = 120.0) -> None:
    """Wait until the SuperLink reports `status` (registered/online/offline) for `node_id`."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = {int(n["node-id"]): n["status"] for n in list_nodes(flwr_home, name)}.get(node_id)
        if seen == status:
            return
        time.sleep(2)
    raise TimeoutError(f"node {node_id} is {seen!r}, not {status!r}, after {timeout:.0f}s")


@dataclass
class SuperNode(SuperLink):
    """A SuperNode started by :func:`start_supernode` (`port` is its own runtime API port).

    Reuses runtime.SuperLink's process handling: `stop()` is SIGTERM to its process group (the
    SuperLink marks it offline at once), then SIGKILL to leftovers, including ClientApp
    processes that carry this node's private FLWR_HOME.
    """

    node_id: int | None = None

    def kill(self) -> None:
        """A crash: SIGKILL the SuperNode's process group and its ClientApp processes, no grace.

        The SuperLink notices only when the heartbeat expires (about 30-60 s later).
        """
        children = self.descendants()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in children:
            try:
                proc.kill()
            except Exception:  # psutil.Error: already gone
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def start_supernode(
    flwr_home: Path,
    superlink_port: int,
    ca: Path | None,
    key: Path | None,
    data_path: Path,
    state_dir: Path,
    *,
    epsilon: float = 8.0,
    records: int = 2000,
    labels: str | None = "good,bad",
    name: str | None = None,
    feature_columns: str | None = CREDIT_COLUMNS,
    batch_size: int | None = None,
    device: str | None = None,
    insecure: bool = False,
    extra: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> SuperNode:
    """scripts/deploy/supernode.sh against 127.0.0.1:superlink_port; waits for its node id.

    `epsilon` is the institution's lifetime budget and `records` the count it declares publicly
    (at least its file's records): both required by supernode.sh. `feature_columns` are the
    table columns it lets the probe's head read (default: those the default credit run reads).

    `flwr_home` is this SuperNode's own (apps it is sent, log `supernode.log`); `key` its
    registered private key (see :func:`make_key`, :func:`register`); `extra` more supernode.sh
    flags (e.g. --pin-app-hash H, --cold-start). Raises RuntimeError with
    the log if the SuperNode exits (e.g. refused by the SuperLink) before it is connected.
    """
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = ["bash", str(SCRIPTS / "supernode.sh"), "--superlink", f"127.0.0.1:{superlink_port}",
               "--port", str(port), "--data", str(data_path), "--state-dir", str(state_dir)]
    if insecure:
        command.append("--insecure")
    else:
        if ca is None or key is None:
            raise ValueError("ca and key are required unless insecure=True")
        if not Path(key).exists():
            raise FileNotFoundError(f"{key}: make and register it first (make_key, register)")
        command += ["--ca", str(ca), "--key", str(key)]
    for flag, value in (("--epsilon", epsilon), ("--records", records), ("--labels", labels), ("--name", name),
                        ("--feature-columns", feature_columns), ("--batch-size", batch_size), ("--device", device)):
        if value is not None:
            command += [flag, str(value)]
    command += list(extra)
    log_path = flwr_home / "supernode.log"
    process = _spawn(command, _env(flwr_home), flwr_home, log_path)
    node = SuperNode(process, flwr_home, port, port, log_path, _env(flwr_home))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"SuperNode ID: (\d+)", node.log())
        if match:
            node.node_id = int(match.group(1))
            return node
        if process.poll() is not None:
            node.stop()
            raise RuntimeError(f"supernode.sh exited with code {process.returncode}:\n{node.log()[-3000:]}")
        time.sleep(0.3)
    node.stop()
    raise RuntimeError(f"SuperNode not connected after {timeout:.0f}s:\n{node.log()[-3000:]}")
