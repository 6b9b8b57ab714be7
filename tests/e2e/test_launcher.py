"""The institution's launcher on the real runtime: a changed app is refused before any of it runs;
the same app runs once the institution pins its hash.

One insecure SuperLink on loopback and one SuperNode (scripts/deploy/supernode.sh, so the launcher
is the one operators get). The server sends a copy of this checkout whose client_app.py, when
imported, leaves a marker file beside itself: the marker shows whether the bundle's own code ran.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fed_dp_lora.deploy.app_check import build_reference
from fed_dp_lora.deploy.flower_runtime import APP_REFUSED
from fed_dp_lora.reply import Refusal
from tests.e2e.deployment import (REPO, SCRIPTS, flwr_run_deployment, start_deployment_superlink, start_supernode,
                                  write_tls_connection)
from tests.e2e.runtime import _bin

pytestmark = pytest.mark.e2e

MARKER = "BUNDLE_CODE_RAN"
OVERRIDES = "+preset=tiny rounds=1 strategy.min_available_clients=1 strategy.min_train_clients=1"


def changed_app(directory: Path) -> Path:
    for name in ("fed_dp_lora", "conf"):
        shutil.copytree(REPO / name, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(REPO / name, directory / name)
    client_app = directory / "fed_dp_lora" / "client_app.py"
    client_app.write_text(client_app.read_text() + f"\n__import__('pathlib').Path(__file__).with_name({MARKER!r}).touch()\n")
    return directory


def markers(flwr_home: Path) -> list[Path]:
    return list(flwr_home.rglob(MARKER))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launcher")
    subprocess.run([_bin("python"), str(SCRIPTS / "export_institutions.py"), str(tmp / "data"),
                    "--institutions", "1"], check=True, capture_output=True)
    app = changed_app(tmp / "app")
    pin = hashlib.sha256(build_reference(app)).hexdigest()
    link = start_deployment_superlink(tmp / "operator", None, insecure=True)
    node = None
    results = {}
    try:
        write_tls_connection(link.flwr_home, "local", link.port, None)
        for label, extra in (("refused", ()), ("pinned", ("--pin-app-hash", pin))):
            state = tmp / f"state-{label}"
            state.mkdir()
            node = start_supernode(tmp / f"node-{label}", link.port, None, None, tmp / "data" / "institution-0.csv",
                                   state, insecure=True, extra=extra)
            out = tmp / f"out-{label}"
            proc = flwr_run_deployment(link, "local", app, [f'overrides="{OVERRIDES}"', f'output-dir="{out}"'])
            summary = out / "summary.json"
            assert summary.is_file(), proc.stdout[-3000:]
            audit = [json.loads(line) for line in (state / "app-check.jsonl").read_text().splitlines()]
            results[label] = (json.loads(summary.read_text()), audit, markers(tmp / f"node-{label}"), node.log())
            node.stop()
            node = None
        yield {**results, "pin": pin}
    finally:
        if node is not None:
            node.stop()
        link.stop()


def test_a_changed_app_is_refused_with_the_fixed_reply_and_none_of_its_code_runs(runs):
    summary, audit, found, log = runs["refused"]
    (round1,) = summary["rounds"]
    assert not round1["clients"]
    (reason,) = [v for k, v in round1["failures"].items() if k != "server"]
    assert reason == f"error (code {int(Refusal.APP)}): {APP_REFUSED}"
    assert found == [], "the refused bundle's code was imported"
    (entry,) = audit
    assert not entry["accepted"] and entry["differences"] == ["changed file fed_dp_lora/client_app.py"]
    assert "REFUSED" in log


def test_the_same_app_runs_once_its_hash_is_pinned(runs):
    summary, audit, found, _ = runs["pinned"]
    pin = runs["pin"]
    (round1,) = summary["rounds"]
    assert len(round1["clients"]) == 1 and not {k for k in round1["failures"] if k != "server"}
    assert all(e["accepted"] and e["source"] == "pinned" and e["fab_sha256"] == pin for e in audit)
    assert found, "a pinned bundle runs its own code, not the installed copy"
