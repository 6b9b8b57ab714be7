"""A real deployment on loopback: TLS, SuperNode authentication, a crash, a server stop, a resume.

One SuperLink (scripts/deploy/superlink.sh, TLS + --enable-supernode-auth) and three
institutions, each a `flower-supernode` (scripts/deploy/supernode.sh) with its own registered
key, CSV file and state dir; institution 0 sets its own budget (epsilon=4). The run has DP on
and three rounds, and everything a deployment does to it happens in order:

1. Round 1 trains on all three; as soon as its checkpoint is written the operator stops the
   run (`flwr stop`), while round 2 is under way.
2. `flwr run ... -c resume=true` continues at round 2. Institution 2's SuperNode is killed
   (SIGKILL, with its ClientApp) as soon as its ClientApp starts; round 2 completes with the
   other two once the SuperLink reports the node unavailable, and the node is restarted.
3. Round 3 waits for all three (min_available_clients=3): the restarted node rejoins with the
   ledger it keeps on its own disk.

The checks are on summary.json and the institutions' ledger files, never only on exit codes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fed_dp_lora import local_log
from fed_dp_lora.privacy.ledger_store import InstitutionState
from tests.e2e.deployment import (
    SCRIPTS,
    make_certs,
    make_key,
    register,
    start_deployment_superlink,
    start_supernode,
    wait_node_status,
    write_tls_connection,
)
from tests.e2e.runtime import _bin

pytestmark = pytest.mark.e2e

NAME = "dep"
ROUNDS = 3
OVERRIDES = f"+preset=tiny rounds={ROUNDS} strategy.min_available_clients=3 strategy.min_train_clients=2"


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


def _completed_round(out: Path) -> int:
    from fed_dp_lora import checkpoint

    try:
        saved = checkpoint.load(out)
    except Exception:  # being replaced right now
        return 0
    return 0 if saved is None else saved.completed_round


def _took_message(log: str) -> bool:
    """The SuperNode pulled a train message of a running run (a stopped run's are ignored,
    which it logs on the line right after receiving)."""
    lines = log.splitlines()
    return any("Receiving: train message" in line and i + 1 < len(lines) and "Ignoring" not in lines[i + 1]
               for i, line in enumerate(lines))


def _flwr(link, *args: str, timeout: float = 60) -> str:
    proc = subprocess.run([_bin("flwr"), *args], env=link.env, cwd=str(link.flwr_home), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.stdout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployment")
    certs = make_certs(tmp / "certs")
    subprocess.run([_bin("python"), str(SCRIPTS / "export_institutions.py"), str(tmp / "data"),
                    "--institutions", "3"], check=True, capture_output=True)
    link = start_deployment_superlink(tmp / "operator", certs)
    nodes: dict[int, object] = {}
    out = tmp / "out"
    state = {i: tmp / f"state-{i}" for i in range(3)}
    try:
        write_tls_connection(link.flwr_home, NAME, link.port, certs.ca)
        keys = {i: tmp / "keys" / f"institution-{i}" for i in range(3)}
        for i, key in keys.items():
            register(link.flwr_home, NAME, make_key(key), f"institution-{i}")
            state[i].mkdir()

        def start(i: int):
            return start_supernode(tmp / f"node-{i}", link.port, certs.ca, keys[i],
                                   tmp / "data" / f"institution-{i}.csv", state[i],
                                   epsilon=4.0 if i == 0 else 8.0)

        nodes = {i: start(i) for i in range(3)}
        run_config = ["-c", f'overrides="{OVERRIDES}"', "-c", f'output-dir="{out}"']
        first_log = tmp / "run-1.log"
        with open(first_log, "w") as log_file:
            first = subprocess.Popen(["bash", str(SCRIPTS / "run.sh"), NAME, *run_config],
                                     env=link.env, cwd=str(link.flwr_home), stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run_id = _wait(lambda: re.findall(r"started run (\d+)", first_log.read_text()), 120, "run id")[0]
            _wait(lambda: _completed_round(out) >= 1, 600, "round 1")
            stopped_at = _completed_round(out)
            stop_output = _flwr(link, "stop", run_id, NAME)
            first.wait(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()

        seen = len(nodes[2].log())
        with open(tmp / "run-2.log", "w") as log_file:
            second = subprocess.Popen(["bash", str(SCRIPTS / "run.sh"), NAME, *run_config, "-c", "resume=true"],
                                      env=link.env, cwd=str(link.flwr_home), stdout=log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Kill institution 2 once its SuperNode has taken the resumed run's round-2 message.
            _wait(lambda: _took_message(nodes[2].log()[seen:]), 300, "institution 2 taking round 2", poll=0.2)
            nodes[2].kill()  # a crash in the middle of the round
            killed_id = nodes[2].node_id
            wait_node_status(link.flwr_home, NAME, killed_id, "offline", timeout=180)
            nodes[2] = start(2)  # the same key and state dir: the same institution rejoins
            second.wait(timeout=900)
        finally:
            if second.poll() is None:
                second.kill()
        summary_path = out / "summary.json"
        if not summary_path.is_file():
            pytest.fail(f"no summary.json.\n{(tmp / 'run-2.log').read_text()[-4000:]}\n{link.log()[-3000:]}")
        yield SimpleNamespace(
            summary=json.loads(summary_path.read_text()), state=state, stopped_at=stopped_at,
            stop_output=stop_output, killed_id=killed_id, rejoined_id=nodes[2].node_id, killed="institution-2",
            names={i: f"institution-{i}" for i in nodes}, ids={i: n.node_id for i, n in nodes.items()},
            log=(tmp / "run-2.log").read_text(), first_log=first_log.read_text(), out=out, run_id=run_id,
            exit_codes=(first.returncode, second.returncode),
        )
    finally:
        for node in nodes.values():
            node.stop()
        link.stop()


def test_the_run_finished_every_round_once_after_a_stop_and_a_resume(deployment):
    s = deployment.summary
    assert deployment.stopped_at == 1, deployment.first_log[-3000:]
    assert [r["round"] for r in s["rounds"]] == [1, 2, 3], deployment.log[-3000:]
    assert s["run"]["resumed_after_round"] == [1] and s["run"]["stopped"] is None
    assert "balanced_accuracy" in s["final"]
    assert all((deployment.out / "adapters" / f"round-{r}").is_dir() for r in (1, 2, 3))


def test_run_sh_exits_1_for_the_stopped_run_and_0_for_the_completed_one(deployment):
    """`flwr run` exits 0 either way; scripts/deploy/run.sh asks the SuperLink how the run ended."""
    assert deployment.exit_codes == (1, 0), (deployment.first_log[-2000:], deployment.log[-2000:])
    last = [line for line in deployment.first_log.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: run {deployment.run_id} was stopped") and "resume=true" in last
    assert [line for line in deployment.log.splitlines() if line.strip()][-1].startswith(f"Outputs: {deployment.out}")


def test_the_killed_node_was_left_out_of_its_round_and_rejoined_later(deployment):
    s = deployment.summary
    round1, round2, round3 = s["rounds"]
    assert set(round1["clients"]) == set(deployment.names.values())
    assert deployment.killed in round2["failures"], round2
    assert deployment.killed not in round2["clients"] and len(round2["clients"]) == 2
    assert deployment.rejoined_id == deployment.killed_id  # the registered key keeps its node id
    assert set(round3["clients"]) == set(deployment.names.values()) and not round3["failures"], round3


def test_every_reported_epsilon_is_the_institution_ledger_with_no_round_twice(deployment):
    s = deployment.summary
    study = s["run"]["study"]
    for i, name in deployment.names.items():
        lifetime = InstitutionState(deployment.state[i]).load_ledger()
        rounds = [r.round for r in lifetime.releases if r.study == study]
        assert len(rounds) == len(set(rounds)), f"{name} counted a round twice: {rounds}"
        assert rounds[-1] == 3 and 1 in rounds, (name, rounds, local_log.read(deployment.state[i])[-3:])
        ledger = lifetime.study(study)
        assert s["privacy"]["epsilon"][name] == pytest.approx(ledger.epsilon(), rel=1e-9), name
        assert s["privacy"]["steps"][name] == ledger.steps
        budget = 4.0 if i == 0 else 8.0
        assert ledger.epsilon() <= budget * (1 + 1e-9)
    # The institution with its own, smaller budget ran with more noise.
    noise = s["privacy"]["noise_multiplier"]
    assert noise[deployment.names[0]] > max(noise[deployment.names[1]], noise[deployment.names[2]])


def test_institutions_are_named_as_registered_in_the_summary_and_the_report(deployment):
    s = deployment.summary
    assert s["run"]["nodes"] == {f"institution-{i}": node_id for i, node_id in deployment.ids.items()}
    assert set(s["privacy"]["epsilon"]) == set(deployment.names.values())
    report = (deployment.out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in deployment.names.values())


def test_every_message_ran_the_checked_installed_app(deployment):
    for i, name in deployment.names.items():
        audit = [json.loads(line) for line in (deployment.state[i] / "app-check.jsonl").read_text().splitlines()]
        trained = sum(name in r["clients"] and not r["clients"][name].get("replayed") for r in deployment.summary["rounds"])
        assert len(audit) >= trained and all(e["accepted"] and e["source"] == "installed" for e in audit), name


def test_round_times_show_where_a_deployment_round_goes(deployment):
    """Each institution times its rounds in its own local log; the reply carries no timing."""
    for entry in deployment.summary["rounds"]:
        assert not any("seconds" in key for m in entry["clients"].values() for key in m)
    for i in deployment.names:
        rounds = [e for e in local_log.read(deployment.state[i]) if e["event"] == "round" and not e.get("replayed")]
        assert rounds and all(e["train-seconds"] > 0 and e["load-seconds"] > 0 for e in rounds)
        assert all(e["startup-seconds"] >= 0 for e in rounds)
