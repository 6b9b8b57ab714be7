"""The federation in containers: images built here with Podman, containers/compose.yaml, one round.

scripts/containers/build-images.sh builds the SuperLink and SuperNode images (the base image
and the dependency layer come from the cache after the first run on a machine);
scripts/containers/federation.sh makes a CA, the SuperLink certificate and three institutions'
keys and records; podman-compose starts the SuperLink container (TLS, SuperNode
authentication, published on 127.0.0.1 only), the operator registers the three public keys
from this host with scripts/deploy/register.sh, the three institution containers join, and
`flwr run` from this host trains one tiny round. Checks are on what the run wrote (summary.json
in the mounted runs/ folder, each institution's ledger in its own named volume) and on the
SuperLink refusing a key it never registered. Every container, volume and the network of the
compose project are removed by name afterwards, and the test fails if any is left.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from fed_dp_lora.privacy.institution_ledger import InstitutionLedger
from tests.e2e.containers import (
    REPO,
    ComposeFederation,
    build_images,
    make_federation,
    missing_podman,
    podman,
)
from tests.e2e.deployment import make_key, register, write_tls_connection
from tests.e2e.runtime import _bin, free_port, runtime_env

_REASON = missing_podman()
pytestmark = [pytest.mark.e2e] + ([pytest.mark.skip(reason=_REASON)] if _REASON else [])

TAG = "e2e"
NAME = "containers"
INSTITUTIONS = ("institution-0", "institution-1", "institution-2")
BUDGETS = {"institution-0": 4.0, "institution-1": 8.0, "institution-2": 8.0}  # compose.yaml's --epsilon
# The tiny settings of tests/e2e/test_strategies.py, one round, all three institutions.
OVERRIDES = ("+preset=tiny train.batch_size=16 train.epochs=0.001 privacy.noise_multiplier=1.0 "
             "data.test_fraction=0.05 rounds=1 strategy.min_available_clients=3")


def _wait_healthy(port: int, ca: Path, timeout: float = 120.0) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"SuperLink container not healthy on 127.0.0.1:{port} after {timeout:.0f}s")


def _records(csv: Path) -> int:
    """The record count an institution would declare for its file (its data rows)."""
    return sum(1 for _ in csv.open()) - 1


def _unregistered_supernode(fed: ComposeFederation, image: str, files: Path, key: Path) -> subprocess.CompletedProcess:
    """A SuperNode container with a key the operator never registered, on the project's network."""
    os.chown(key, 49999, 49999)
    command = ["podman", "run", "--rm", "--init", "--name", fed.container("unregistered"),
               "--network", fed.network,
               "-v", f"{files / 'certs' / 'ca.crt'}:/app/certs/ca.crt:ro",
               "-v", f"{key}:/app/keys/supernode.key:ro",
               "-v", f"{files / 'data' / 'institution-0.csv'}:/data/records.csv:ro",
               image, "--superlink", "superlink:9092", "--records", str(_records(files / "data" / "institution-0.csv")),
               "--epsilon", "8", "--labels", "good,bad"]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("containers")
    timings: dict[str, float] = {}
    start = time.monotonic()
    images = build_images(TAG)
    timings["build_s"] = time.monotonic() - start
    files = make_federation(tmp / "federation")
    rogue_key = make_key(tmp / "rogue" / "key")
    port = free_port()
    fed = ComposeFederation.create(f"fdl-e2e-{os.getpid()}", files, TAG, port)
    home = tmp / "operator"
    home.mkdir()
    try:
        start = time.monotonic()
        fed.compose("up", "-d", "superlink")
        _wait_healthy(port, files / "certs" / "ca.crt")
        write_tls_connection(home, NAME, port, files / "certs" / "ca.crt")
        node_ids = {i: register(home, NAME, files / "keys" / f"{i}.pub", i) for i in INSTITUTIONS}
        fed.compose("up", "-d", *INSTITUTIONS)
        logs = {i: fed.wait_log(i, "SuperNode ID") for i in INSTITUTIONS}
        timings["up_s"] = time.monotonic() - start
        start = time.monotonic()
        run = subprocess.run([_bin("flwr"), "run", str(REPO), NAME, "--stream",
                              "-c", f'output-dir="/app/runs/{NAME}"', "-c", f'overrides="{OVERRIDES}"'],
                             env=runtime_env(home), cwd=str(home), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=1800)
        timings["run_s"] = time.monotonic() - start
        summary_path = files / "runs" / NAME / "summary.json"
        if not summary_path.is_file():
            pytest.fail(f"no summary.json:\n{run.stdout[-4000:]}\n{fed.logs('superlink')[-3000:]}")
        summary = json.loads(summary_path.read_text())
        ledgers = {}
        for i in INSTITUTIONS:
            target = tmp / f"ledger-{i}.json"
            podman("cp", f"{fed.container(i)}:/app/state/ledger.json", str(target))
            ledgers[i] = json.loads(target.read_text())
        state_modes = {i: podman("exec", fed.container(i), "stat", "-c", "%a", "/app/state").stdout.strip()
                       for i in INSTITUTIONS}
        mounts = {i: podman("inspect", "--format", "{{range .Mounts}}{{.Name}}={{.Destination}} {{end}}",
                            fed.container(i)).stdout.split() for i in INSTITUTIONS}
        published = podman("port", fed.container("superlink")).stdout
        rogue = _unregistered_supernode(fed, images["supernode"], files, rogue_key.with_suffix(""))
        print(f"\ncontainer federation timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        yield SimpleNamespace(
            fed=fed, files=files, port=port, summary=summary, run_log=run.stdout, node_ids=node_ids,
            logs=logs, ledgers=ledgers, state_modes=state_modes, mounts=mounts, published=published,
            rogue=rogue, timings=timings,
        )
    finally:
        left = fed.remove(extra_containers=(fed.container("unregistered"),))
        assert not left, f"left behind: {left}"


def test_the_federation_finished_its_round_with_every_institution(federation):
    s = federation.summary
    assert [r["round"] for r in s["rounds"]] == [1], federation.run_log[-3000:]
    (entry,) = s["rounds"]
    expected = set(INSTITUTIONS)  # the names the institutions declared (compose.yaml's --name)
    assert set(entry["clients"]) == expected and entry["failures"] == {}, entry
    assert "balanced_accuracy" in s["final"] and s["run"]["stopped"] is None
    assert (federation.files / "runs" / NAME / "adapters" / "round-1" / "adapter_model.safetensors").is_file()
    assert "[round 1/1]" in federation.run_log


def test_each_institution_joined_with_its_registered_key(federation):
    for i in INSTITUTIONS:
        assert f"SuperNode ID: {federation.node_ids[i]}" in federation.logs[i], federation.logs[i][-2000:]


def test_each_institution_keeps_its_ledger_in_its_own_volume(federation):
    s = federation.summary
    for i in INSTITUTIONS:
        name = i
        lifetime = InstitutionLedger.from_dict(federation.ledgers[i]["ledger"])
        ledger = lifetime.study(s["run"]["study"])
        assert ledger.rounds == [1]
        assert s["privacy"]["epsilon"][name] == pytest.approx(ledger.epsilon(), rel=1e-9), name
        assert ledger.epsilon() <= BUDGETS[i] * (1 + 1e-9)
        assert f"{federation.fed.volume(f'{i}-state')}=/app/state" in federation.mounts[i]
        assert federation.state_modes[i] == "700", "the privacy state dir is private to the app user"


def test_the_superlink_refuses_a_key_it_never_registered(federation):
    assert federation.rogue.returncode != 0, federation.rogue.stdout[-2000:]
    assert "Failed to activate SuperNode" in federation.rogue.stdout, federation.rogue.stdout[-2000:]


def test_only_the_superlink_port_is_published_and_on_loopback(federation):
    assert federation.published.split() == ["9092/tcp", "->", f"127.0.0.1:{federation.port}"]
    for i in INSTITUTIONS:
        assert podman("port", federation.fed.container(i)).stdout.strip() == ""
