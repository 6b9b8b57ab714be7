"""Hold-out split and client partitions (flwr-datasets partitioners) on the real credit data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fed_dp_lora.config import ConfigError, compose_config, validate
from fed_dp_lora.data import client_partition, holdout_split, load_table


def _cfg(*overrides: str):
    cfg = compose_config(["+preset=tiny", *overrides])
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def credit() -> pd.DataFrame:
    return load_table(_cfg())


@pytest.fixture(scope="module")
def split(credit):
    return holdout_split(credit, _cfg())


def _keys(frame: pd.DataFrame) -> list[str]:
    """Record identity: the rendered text is unique enough, plus the label."""
    return list(frame["text"] + "|" + frame["label"].astype(str))


# --- hold-out -------------------------------------------------------------------------------


def test_holdout_sizes(credit, split):
    train, test = split
    assert len(train) + len(test) == len(credit) == 4454
    assert len(test) == pytest.approx(0.2 * len(credit), abs=2)


def test_holdout_is_stratified(credit, split):
    train, test = split
    for label in (0, 1):
        expected = round(0.2 * (credit["label"] == label).sum())
        assert abs((test["label"] == label).sum() - expected) <= 1
    assert test["label"].mean() == pytest.approx(credit["label"].mean(), abs=0.002)
    assert train["label"].mean() == pytest.approx(credit["label"].mean(), abs=0.002)


def test_holdout_is_disjoint_from_train_and_covers_the_data(credit, split):
    train, test = split
    # text is unique for almost every applicant: compare multisets of records
    assert sorted(_keys(train) + _keys(test)) == sorted(_keys(credit))
    only_once = credit["text"].value_counts()
    unique_texts = set(only_once[only_once == 1].index)
    assert not (set(train["text"]) & set(test["text"]) & unique_texts)


def test_holdout_train_is_shuffled(credit, split):
    """IidPartitioner takes contiguous shards: an unshuffled train would not be iid."""
    train, _ = split
    position = {t: i for i, t in enumerate(credit["text"])}
    order = np.array([position[t] for t in train["text"]])
    assert not np.all(np.diff(order) > 0)


def test_holdout_is_deterministic_for_a_seed(credit, split):
    train, test = holdout_split(credit, _cfg())
    pd.testing.assert_frame_equal(test, split[1])
    pd.testing.assert_frame_equal(train, split[0])
    other_train, other_test = holdout_split(credit, _cfg("seed=1"))
    assert set(other_test["text"]) != set(test["text"])
    assert len(other_test) == len(test)


def test_holdout_fraction_is_configurable(credit):
    _, test = holdout_split(credit, _cfg("data.test_fraction=0.5"))
    assert len(test) == pytest.approx(len(credit) / 2, abs=2)


def test_holdout_for_causal_lm_without_labels():
    cfg = _cfg("model=smollm2")
    table = load_table(cfg)
    train, test = holdout_split(table, cfg)
    assert len(train) + len(test) == len(table)
    assert len(test) == round(0.2 * len(table))
    assert not set(train["prompt"]) & set(test["prompt"]) - set(
        table["prompt"][table["prompt"].duplicated()]
    )


# --- client partitions ------------------------------------------------------------------------


def _all_partitions(train, cfg, clients):
    # each client computes its own partition independently, as in the simulation
    return [client_partition(train, cfg, i, clients) for i in range(clients)]


@pytest.mark.parametrize("clients", [2, 5])
def test_iid_partitions_are_disjoint_and_cover_train(split, clients):
    train, _ = split
    parts = _all_partitions(train, _cfg(), clients)
    assert sum(len(p) for p in parts) == len(train)
    assert sorted(k for p in parts for k in _keys(p)) == sorted(_keys(train))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # iid: every client sees roughly the global label balance
    for part in parts:
        assert part["label"].mean() == pytest.approx(train["label"].mean(), abs=0.05)


def test_iid_partition_is_deterministic(split):
    train, _ = split
    a = client_partition(train, _cfg(), 1, 3)
    b = client_partition(train, _cfg(), 1, 3)
    pd.testing.assert_frame_equal(a, b)


def test_dirichlet_small_alpha_gives_skewed_labels(split):
    train, _ = split
    cfg = _cfg("data.partitioner=dirichlet", "data.dirichlet_alpha=0.1")
    parts = _all_partitions(train, cfg, 4)
    # still a partition of the training records
    assert sum(len(p) for p in parts) == len(train)
    assert sorted(k for p in parts for k in _keys(p)) == sorted(_keys(train))
    rates = [p["label"].mean() for p in parts]
    overall = train["label"].mean()
    assert max(abs(r - overall) for r in rates) > 0.2
    assert max(rates) - min(rates) > 0.4


def test_dirichlet_large_alpha_is_close_to_iid(split):
    train, _ = split
    cfg = _cfg("data.partitioner=dirichlet", "data.dirichlet_alpha=1000")
    rates = [p["label"].mean() for p in _all_partitions(train, cfg, 4)]
    assert max(rates) - min(rates) < 0.1


def test_dirichlet_is_deterministic_for_a_seed(split):
    train, _ = split
    cfg = _cfg("data.partitioner=dirichlet", "data.dirichlet_alpha=0.3")
    first = client_partition(train, cfg, 2, 4)
    pd.testing.assert_frame_equal(first, client_partition(train, cfg, 2, 4))
    reseeded = _cfg("data.partitioner=dirichlet", "data.dirichlet_alpha=0.3", "seed=7")
    assert set(client_partition(train, reseeded, 2, 4)["text"]) != set(first["text"])


def test_column_partitioner_gives_one_partition_per_value(split):
    train, _ = split
    cfg = _cfg("data.partitioner=column", "data.partition_column=Home")
    values = sorted(train["Home"].unique())
    parts = _all_partitions(train, cfg, len(values))
    seen = []
    for part in parts:
        assert part["Home"].nunique() == 1
        value = part["Home"].iloc[0]
        assert len(part) == (train["Home"] == value).sum()
        seen.append(value)
    assert sorted(seen) == values
    assert sum(len(p) for p in parts) == len(train)


def test_column_partitioner_missing_column(split):
    train, _ = split
    cfg = _cfg("data.partitioner=column", "data.partition_column=Branch")
    with pytest.raises(ConfigError) as info:
        client_partition(train, cfg, 0, 2)
    message = str(info.value)
    assert message.startswith("data.partition_column:") and "'Branch'" in message
    assert "Home" in message and "Fix:" in message


@pytest.mark.parametrize("clients", [1, 3, 6])
def test_column_partitioner_wrong_client_count(split, clients):
    train, _ = split
    cfg = _cfg("data.partitioner=column", "data.partition_column=Records")  # yes / no
    with pytest.raises(ConfigError) as info:
        client_partition(train, cfg, 0, clients)
    message = str(info.value)
    assert message.startswith("data.partition_column:")
    assert "has 2 values" in message and "num-supernodes=2" in message


def test_column_partitioner_with_missing_values(make_cfg):
    """Records without an institution id form one more group instead of crashing."""
    train = pd.DataFrame(
        {"text": list("abcdef"), "label": [0, 1, 0, 1, 0, 1], "bank": ["A", "A", "B", "B", None, None]}
    )
    cfg = make_cfg("data.partitioner=column", "data.partition_column=bank")
    with pytest.raises(ConfigError, match="has 3 values"):
        client_partition(train, cfg, 0, 2)
    parts = [client_partition(train, cfg, i, 3) for i in range(3)]
    assert sorted(map(len, parts)) == [2, 2, 2]
    assert sorted(p["bank"].iloc[0] for p in parts) == ["A", "B", "unknown"]


def test_column_partitioner_numeric_ids(make_cfg):
    train = pd.DataFrame({"text": list("abcde"), "label": [0, 1, 0, 1, 0], "branch": [7, 7, 9, 9, 9]})
    cfg = make_cfg("data.partitioner=column", "data.partition_column=branch")
    parts = [client_partition(train, cfg, i, 2) for i in range(2)]
    assert sorted(map(len, parts)) == [2, 3]


def test_partition_count_larger_than_data(make_cfg):
    train = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ConfigError, match="^num-partitions: 3 clients for 2 training records"):
        client_partition(train, make_cfg(), 0, 3)
    # exactly one record per client is fine
    assert len(client_partition(train, make_cfg(), 1, 2)) == 1
