"""The institution's policy (node-config) wins over the run config, and a bad value names the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_dp_lora.node_policy import PolicyError, apply_node_config, resolve_delta, simulation_state_dir


def deployment(tmp_path, **extra) -> dict:
    return {"data-path": str(tmp_path / "records.csv"), "state-dir": str(tmp_path / "state"), "records": 1000,
            "epsilon": 4.0, "labels": "good,bad", **extra}


def test_node_settings_apply_to_this_client_only(make_cfg, tmp_path):
    cfg = make_cfg("privacy.epsilon=8")
    mine, node = apply_node_config(cfg, deployment(tmp_path, **{"batch-size": 32, "device": "cpu"}))
    assert (mine.train.batch_size, mine.train.device, list(mine.data.labels)) == (32, "cpu", ["good", "bad"])
    assert cfg.train.batch_size != 32 and cfg.data.labels is None  # the run's config is untouched
    assert (node.records, node.lifetime_epsilon, node.partition) == (1000, 4.0, None) and node.deployment


@pytest.mark.parametrize("node_config, match", [
    ({"data-pth": "/x.csv"}, r"node-config data-pth: unknown key.*data-path"),
    ({"batch-size": "big"}, "node-config batch-size.*not a int"),
    ({"batch-size": 2.5}, "node-config batch-size"),
    ({"batch-size": 0}, "node-config batch-size"),
    ({"device": "tpu"}, "node-config device"),
    ({"epsilon": -1}, "node-config epsilon"),
    ({"records": 0}, "node-config records"),
    ({"max-delta": 2}, "node-config max-delta"),
    ({"labels": "good"}, "node-config labels"),
    ({"allow-non-private": "yes"}, "node-config allow-non-private.*not a bool"),
    ({"data-path": 3}, "node-config data-path.*not a str"),
    ({"state-dir": "relative/dir"}, "state-dir.*not absolute"),
])
def test_bad_node_settings_name_the_key_and_the_fix(make_cfg, tmp_path, node_config, match):
    with pytest.raises(PolicyError, match=match) as info:
        apply_node_config(make_cfg(), {**deployment(tmp_path), **node_config})
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("missing", ["state-dir", "epsilon", "records", "labels"])
def test_an_institution_with_dp_must_declare_its_policy(make_cfg, tmp_path, missing):
    node = deployment(tmp_path)
    del node[missing]
    with pytest.raises(PolicyError, match=f"node-config {missing}"):
        apply_node_config(make_cfg(), node)


def test_privacy_off_is_refused_unless_the_node_allows_it(make_cfg, tmp_path):
    with pytest.raises(PolicyError, match="allow-non-private"):
        apply_node_config(make_cfg("privacy=none"), deployment(tmp_path))
    apply_node_config(make_cfg("privacy=none"), deployment(tmp_path, **{"allow-non-private": True}))
    apply_node_config(make_cfg("privacy=none"), {"partition-id": 0, "num-partitions": 2})  # simulation


@pytest.mark.parametrize("run, key", [("data.label_column=Status", "label-column"),
                                      ("data.text_column=notes", "text-column"),
                                      ("data.labels=[bad,good]", "labels")])
def test_the_run_cannot_remap_columns_or_labels_the_node_pinned(make_cfg, tmp_path, run, key):
    with pytest.raises(PolicyError, match=f"node-config {key}: the run asks"):
        apply_node_config(make_cfg(run), deployment(tmp_path))
    pinned = deployment(tmp_path, **{"label-column": "Status"})
    apply_node_config(make_cfg("data.label_column=Status"), pinned)


def test_seeded_noise_is_refused_in_deployment(make_cfg, tmp_path):
    with pytest.raises(PolicyError, match="anyone knowing the seed"):
        apply_node_config(make_cfg("privacy.seeded_noise=true"), deployment(tmp_path))
    apply_node_config(make_cfg("privacy.seeded_noise=true"), {"partition-id": 0, "num-partitions": 2})


def test_delta_is_the_runs_capped_by_the_node_and_below_one_over_records(make_cfg, tmp_path):
    _, node = apply_node_config(make_cfg(), deployment(tmp_path))
    assert resolve_delta(make_cfg(), node, 1000) == pytest.approx(1e-4)  # 1 / (10 records)
    _, capped = apply_node_config(make_cfg(), deployment(tmp_path, **{"max-delta": 1e-6}))
    assert resolve_delta(make_cfg("privacy.delta=1e-5"), capped, 1000) == 1e-6
    with pytest.raises(PolicyError, match="1/records"):
        resolve_delta(make_cfg("privacy.delta=0.01"), node, 1000)


@pytest.mark.slow  # a federation in process
def test_simulated_clients_keep_their_state_outside_the_run_outputs(tmp_path, monkeypatch):
    from fed_dp_lora.experiments.inprocess import run_federation

    monkeypatch.setenv("FED_DP_LORA_STATE", str(tmp_path / "state"))
    out = tmp_path / "run"
    summary = run_federation("+preset=tiny train.batch_size=16 train.epochs=0.001 privacy.noise_multiplier=1 "
                             "strategy.min_train_clients=1 strategy.min_available_clients=1", 1, out)
    assert not list(out.rglob("noise.key")), "a simulated client's key sits in the run's outputs"
    folder = simulation_state_dir(summary["run"]["study"], 0)
    assert Path(folder).is_relative_to(tmp_path / "state") and (folder / "noise.key").is_file()
    assert json.loads((folder / "ledger.json").read_text())["ledger"]["steps"] == [1]


def test_the_head_reads_only_the_table_columns_the_node_allows(tmp_path):
    from fed_dp_lora.config import compose_config

    cfg = compose_config(["privacy.epsilon=8"])  # the default: credit, whose head reads its columns
    with pytest.raises(PolicyError, match=r"node-config feature-columns: the run asks the head to read column\(s\) "
                                          r"\['Seniority'.*this node allows none\. Fix: add feature-columns="):
        apply_node_config(cfg, deployment(tmp_path))
    with pytest.raises(PolicyError, match=r"read column\(s\) \['Job'\]; this node allows \['Age'"):
        apply_node_config(compose_config(["data.columns.numeric=[Age]", "data.columns.categorical=['Job=fixed']"]),
                          deployment(tmp_path, **{"feature-columns": "Age"}))
    age_only = compose_config(["data.columns.numeric=[Age]", "data.columns.categorical=[]"])
    apply_node_config(age_only, deployment(tmp_path, **{"feature-columns": "Age"}))
    text_only = "data.columns.numeric=[]", "data.columns.categorical=[]"
    apply_node_config(compose_config(list(text_only)), deployment(tmp_path))


def test_the_key_table_names_the_supernode_flag_of_every_key_the_launcher_sets():
    """docs/privacy.md's node-config table is generated, but its flag column is a hand-kept map."""
    import re

    from fed_dp_lora.node_policy import NODE_KEYS, markdown

    script = (Path(__file__).resolve().parents[1] / "scripts" / "deploy" / "supernode.sh").read_text()
    flags = set(re.findall(r"^\s*--([a-z-]+)\)", script, re.MULTILINE))
    launched = {key: "data" if key == "data-path" else key for key in NODE_KEYS}
    launched = {key: flag for key, flag in launched.items() if flag in flags}
    assert {"data-path", "epsilon", "feature-columns"} <= set(launched)
    table = markdown()
    assert all(f"| `{key}` | `--{flag}` |" in table for key, flag in launched.items())
