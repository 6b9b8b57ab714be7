"""Audit canaries: derived from the auditor's seed, each in at most one client's records."""

from __future__ import annotations

import pandas as pd
import pytest

from fed_dp_lora.config import ConfigError
from fed_dp_lora.data import client_partition, holdout_split, load_table
from fed_dp_lora.data.canaries import canary_table, canary_words, client_canaries, included_canaries
from fed_dp_lora.client_data import client_data as _client_data
from fed_dp_lora.node_policy import PolicyError, apply_node_config
from fed_dp_lora.models import load_tokenizer


@pytest.fixture(scope="module")
def words():
    from fed_dp_lora.config import compose_config

    return canary_words(load_tokenizer(compose_config([])).get_vocab())


def test_canaries_are_fixed_by_the_seed(make_cfg, words):
    cfg = make_cfg("audit.canaries=50")
    assert canary_table(cfg, 2, words).equals(canary_table(cfg, 2, words))
    assert (included_canaries(cfg) == included_canaries(cfg)).all()
    other = make_cfg("audit.canaries=50", "audit.seed=99")
    assert not canary_table(other, 2, words).equals(canary_table(cfg, 2, words))
    table = canary_table(cfg, 2, words)
    assert table["text"].is_unique and set(table["label"]) == {0, 1}
    assert all(len(t.split()) == 8 and set(t.split()) <= set(words) for t in table["text"])


def test_each_included_canary_goes_to_exactly_one_client(make_cfg, words):
    cfg = make_cfg("audit.canaries=300")
    included = set(canary_table(cfg, 2, words)["text"][included_canaries(cfg)])
    parts = [set(client_canaries(cfg, 2, words, i, 4)["text"]) for i in range(4)]
    assert sum(len(p) for p in parts) == len(included)  # no canary in two clients
    assert set().union(*parts) == included              # and every included one in some client


def test_about_half_the_canaries_are_included(make_cfg):
    m = 4000
    share = included_canaries(make_cfg(f"audit.canaries={m}")).mean()
    assert abs(share - 0.5) < 4 * (0.25 / m) ** 0.5


def client_data(cfg, node_config):
    """The client's tokenized records under this node-config."""
    return _client_data(*apply_node_config(cfg, node_config)).encoded


def test_client_trains_on_its_partition_plus_its_included_canaries(make_cfg, words):
    cfg = make_cfg("audit.enabled=true", "audit.canaries=40")
    plain = make_cfg()
    node = {"partition-id": 1, "num-partitions": 2}
    train, _ = holdout_split(load_table(plain), plain)
    partition = client_partition(train, plain, 1, 2)
    mine = client_canaries(cfg, 2, words, 1, 2)
    assert 0 < len(mine) < 40
    assert len(client_data(cfg, node)) == len(partition) + len(mine)
    assert len(client_data(plain, node)) == len(partition)


def test_deployment_audit_needs_a_slot_per_institution(make_cfg, tmp_path):
    path = tmp_path / "records.csv"
    pd.DataFrame({"text": ["a b", "c d"], "label": ["good", "bad"]}).to_csv(path, index=False)
    cfg = make_cfg("audit.enabled=true", "audit.canaries=10")
    node = {"data-path": str(path), "state-dir": str(tmp_path / "state"), "records": 20, "epsilon": 8.0,
            "labels": "good,bad"}
    with pytest.raises(PolicyError, match="partition-id=<i> num-partitions=<n>"):
        client_data(cfg, node)
    with_slot = client_data(cfg, {**node, "partition-id": 0, "num-partitions": 1})
    assert len(with_slot) == 2 + int(included_canaries(cfg).sum())
