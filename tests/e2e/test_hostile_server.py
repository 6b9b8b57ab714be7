"""A hostile server on the real runtime: every attempt is refused or learns nothing.

Two institutions, each a `flower-supernode` started by scripts/deploy/supernode.sh (TLS,
registered keys, its own file, state dir and a lifetime budget of 3), face a ServerApp written to
attack them (tests/e2e/hostile/hostile_server.py). It resends a round on the same and on a changed
adapter, sends an overflowing head, starts new studies to reset the budget, remaps a pinned
column, and turns privacy off. Afterwards each institution's lifetime ledger must hold exactly the
releases that left it, within its budget, and every refusal must be a code with its fixed text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fed_dp_lora.privacy.ledger_store import InstitutionState
from fed_dp_lora.reply import METRICS, REFUSAL_TEXT, Refusal
from tests.e2e.deployment import (REPO, SCRIPTS, flwr_run_deployment, make_certs, make_key, register,
                                  start_deployment_superlink, start_supernode, write_tls_connection)
from tests.e2e.runtime import _bin

pytestmark = pytest.mark.e2e

NAME = "hostile"
LIFETIME = 3.0
TINY = "+preset=tiny train.batch_size=16 train.epochs=0.001 rounds=3 privacy.epsilon=3"
STEP = lambda study, rnd, adapter: {"study": study, "round": rnd, "adapter": adapter}  # noqa: E731
RUNS = {
    # s1 is planned for 3 rounds of 1 step at epsilon 3 (= the lifetime budget): the resend on a
    # changed adapter costs a step, so its round 3 no longer fits; then a new study s2 gets only
    # what is left of the lifetime budget.
    "legit-looking": ("", [STEP("s1", 1, "base"), STEP("s1", 1, "base"), STEP("s1", 1, "shifted"),
                           STEP("s1", 2, "overflow"), STEP("s1", 2, "base"), STEP("s1", 3, "base"),
                           STEP("s2", 1, "base")]),
    "remap-column": ("data.label_column=text", [STEP("s5", 1, "base")]),
    "privacy-off": ("privacy=none", [STEP("s6", 1, "base")]),
}


def hostile_app(folder: Path) -> Path:
    """An app bundle with our package and the hostile ServerApp in place of ours."""
    folder.mkdir(parents=True)
    shutil.copytree(REPO / "fed_dp_lora", folder / "fed_dp_lora", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", folder / "conf")
    shutil.copy(Path(__file__).parent / "hostile" / "hostile_server.py", folder / "hostile_server.py")
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject = pyproject.replace('serverapp = "fed_dp_lora.server_app:app"', 'serverapp = "hostile_server:app"')
    pyproject = pyproject.replace("[tool.flwr.app.config]\n",
                                  '[tool.flwr.app.config]\nattack-plan = "[]"\ninstitutions = 2\nmodel-overrides = ""\n')
    (folder / "pyproject.toml").write_text(pyproject)
    return folder


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    certs = make_certs(tmp / "certs")
    subprocess.run([_bin("python"), str(SCRIPTS / "export_institutions.py"), str(tmp / "data"),
                    "--institutions", "2"], check=True, capture_output=True)
    link = start_deployment_superlink(tmp / "operator", certs)
    nodes, state = {}, {i: tmp / f"state-{i}" for i in range(2)}
    try:
        write_tls_connection(link.flwr_home, NAME, link.port, certs.ca)
        for i in range(2):
            key = tmp / "keys" / f"bank-{i}"
            register(link.flwr_home, NAME, make_key(key), f"bank-{i}")
            state[i].mkdir()
            nodes[i] = start_supernode(tmp / f"node-{i}", link.port, certs.ca, key, tmp / "data" / f"institution-{i}.csv",
                                       state[i], epsilon=LIFETIME, records=2000, name=f"bank-{i}")
        app = hostile_app(tmp / "app")
        transcripts, logs = {}, {}
        for run, (overrides, plan) in RUNS.items():
            out = tmp / "out" / run
            numbered = [{**step, "i": k} for k, step in enumerate(plan)]
            proc = flwr_run_deployment(link, NAME, app, [
                f'overrides="{TINY} {overrides}"', f'model-overrides="{TINY}"', f'output-dir="{out}"',
                f"attack-plan='{json.dumps(numbered)}'", "institutions=2"])
            logs[run] = proc.stdout
            path = out / "transcript.json"
            transcripts[run] = json.loads(path.read_text()) if path.is_file() else None
        institution = {nodes[i].node_id: i for i in range(2)}
        yield SimpleNamespace(transcripts=transcripts, logs=logs, state=state, institution=institution)
    finally:
        for node in nodes.values():
            node.stop()
        link.stop()


def replies(attacked, run: str, index: int) -> list[dict]:
    """Both institutions' replies to step `index` of a run's plan."""
    transcript = attacked.transcripts[run]
    assert transcript is not None, attacked.logs[run][-3000:]
    chosen = sorted((e for e in transcript if e["step"]["i"] == index), key=lambda e: attacked.institution[e["node"]])
    assert len(chosen) == 2, transcript
    return chosen


def refused_with(entries: list[dict], code: Refusal) -> None:
    for entry in entries:
        assert "error" in entry, entry
        assert entry["error"] == {"code": int(code), "reason": REFUSAL_TEXT[code]}, entry


def test_every_reply_is_on_the_allowlist(attacked):
    for run, transcript in attacked.transcripts.items():
        assert transcript is not None, attacked.logs[run][-3000:]
        for entry in transcript:
            if "error" in entry:
                assert entry["error"]["reason"] == REFUSAL_TEXT[Refusal(entry["error"]["code"])], entry
            else:
                assert set(entry["metrics"]) <= set(METRICS) and set(entry["records"]) <= {"arrays", "metrics",
                                                                                            "node"}, entry


def test_a_repeat_on_the_same_adapter_is_the_kept_release_and_a_changed_adapter_is_counted(attacked):
    first, repeat, shifted = (replies(attacked, "legit-looking", i) for i in range(3))
    for a, b, c in zip(first, repeat, shifted):
        assert a["metrics"]["replayed"] == 0 and b["metrics"]["replayed"] == 1
        assert b["metrics"]["epsilon"] == a["metrics"]["epsilon"]
        assert c["metrics"]["steps-total"] == 2 * a["metrics"]["steps"]  # a new release, counted again
        assert c["metrics"]["epsilon"] > a["metrics"]["epsilon"]


def test_an_overflowing_head_is_refused_before_training(attacked):
    refused_with(replies(attacked, "legit-looking", 3), Refusal.INPUT)


def test_the_study_budget_holds_and_a_new_study_cannot_reset_the_lifetime_budget(attacked):
    refused_with(replies(attacked, "legit-looking", 5), Refusal.BUDGET)  # s1's round 3: its budget is spent
    first, new_study = replies(attacked, "legit-looking", 0), replies(attacked, "legit-looking", 6)
    for a, b in zip(first, new_study):
        # s2 is refused, or trains with more noise than s1 asked for the same epsilon: it gets only
        # what is left of the lifetime budget (how much more depends on the RDP curve; at this q
        # and sigma the conversion term dominates, so the extra steps are cheap).
        assert "error" in b and b["error"]["code"] == Refusal.BUDGET or \
            b["metrics"]["noise-multiplier"] > a["metrics"]["noise-multiplier"] * 1.05, (a, b)
    for i in range(2):
        lifetime = InstitutionState(attacked.state[i]).load_ledger()
        assert lifetime.lifetime(1 / (10 * 2000)).epsilon() <= LIFETIME * (1 + 1e-9)


def test_a_remapped_column_and_privacy_off_are_refused_by_the_institutions_policy(attacked):
    refused_with(replies(attacked, "remap-column", 0), Refusal.POLICY)
    refused_with(replies(attacked, "privacy-off", 0), Refusal.POLICY)


def test_each_lifetime_ledger_holds_exactly_the_releases_that_left(attacked):
    sent = {0: [], 1: []}
    last_epsilon = {}
    for transcript in attacked.transcripts.values():
        for entry in transcript:
            i = attacked.institution[entry["node"]]
            if "metrics" in entry and not entry["metrics"]["replayed"]:
                sent[i].append((entry["step"]["study"], entry["step"]["round"]))
                last_epsilon[i, entry["step"]["study"]] = entry["metrics"]["epsilon"]
    for i in range(2):
        ledger = InstitutionState(attacked.state[i]).load_ledger()
        assert [(r.study, r.round) for r in ledger.releases] == sent[i]
        for (j, study), epsilon in last_epsilon.items():
            if j == i:
                assert ledger.study(study).epsilon() == pytest.approx(epsilon, rel=1e-9)
