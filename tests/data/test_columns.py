"""Table columns as features of the probe's head: fixed public rules, nothing fitted on records."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from fed_dp_lora.config import ConfigError, compose_config, validate
from fed_dp_lora.config.data import TableColumns
from fed_dp_lora.data import load_table
from fed_dp_lora.data.columns import column_features, column_names, declared
from fed_dp_lora.data.sources import DataError, standardize


def test_numbers_become_signed_log_and_a_missing_flag_and_levels_one_hot():
    columns = TableColumns(["Income"], ["Home=rent|owner"], scale=0.5)
    table = pd.DataFrame({"Income": [0.0, 99.0, -99.0, None, "n/a"], "Home": ["owner", "rent", "castle", None, "rent"]})
    x = column_features(table, columns)
    assert x is not None and x.shape == (5, columns.width()) == (5, 4)
    log100 = 0.5 * math.log(100.0)
    expected = torch.tensor([[0, 0, 0, 0.5], [log100, 0, 0.5, 0], [-log100, 0, 0, 0], [0, 0.5, 0, 0], [0, 0.5, 0.5, 0]])
    assert torch.allclose(x, expected, atol=1e-6)  # an unlisted level ("castle") is all zeros, not a new level


def test_the_same_record_gets_the_same_features_whatever_else_the_table_holds():
    """No statistic of the records enters: a record's features depend on that record alone."""
    columns = declared(compose_config([]))
    table = load_table(compose_config([]))
    alone = column_features(table.iloc[[7]], columns)
    among = column_features(table.iloc[:50], columns)
    assert alone is not None and among is not None and torch.equal(alone[0], among[7])


def test_no_columns_declared_means_no_features():
    assert column_features(pd.DataFrame({"x": [1]}), TableColumns()) is None
    assert declared(compose_config(["data=reviews"])).width() == 0


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.columns.categorical=[Home]", "data.columns.categorical: 'Home' is not name=level"),
        ("data.columns.numeric=[Age,Age]", "data.columns.numeric: a column is named twice"),
        ("data.columns.scale=0", "data.columns.scale: must be > 0"),
    ],
)
def test_a_bad_column_declaration_is_one_line_naming_key_and_fix(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        validate(compose_config([override]))
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_a_file_without_a_declared_column_is_refused_with_the_fix():
    cfg = compose_config(["data=file", "data.path=x.csv", "data.columns.numeric=[Income]", "data.labels=[good,bad]"])
    table = pd.DataFrame({"text": ["a", "b"], "label": ["good", "bad"]})
    with pytest.raises(DataError, match=r"data.columns names column\(s\) \['Income'\].*Fix: remove them"):
        standardize(table, cfg, "data file x.csv")
    kept = standardize(table.assign(Income=[1, 2]), cfg, "data file x.csv")
    assert list(kept.columns) == ["text", "label", "Income"]


def test_credit_declares_its_codebook_columns():
    assert column_names(declared(compose_config([]))) == [
        "Seniority",
        "Time",
        "Age",
        "Expenses",
        "Income",
        "Assets",
        "Debt",
        "Amount",
        "Price",
        "Home",
        "Marital",
        "Records",
        "Job",
    ]


def test_the_deployment_helpers_allow_exactly_what_the_default_run_reads():
    """The e2e SuperNodes, compose file and manifests name the columns credit's head reads."""
    from pathlib import Path

    from tests.e2e.deployment import CREDIT_COLUMNS

    assert ",".join(column_names(declared(compose_config([])))) == CREDIT_COLUMNS
    root = Path(__file__).resolve().parents[2] / "containers"
    for manifest in (root / "compose.yaml", root / "kubernetes" / "institutions.yaml"):
        assert manifest.read_text().count(CREDIT_COLUMNS) == 3, manifest


def test_a_partition_column_the_head_also_reads_is_kept_once():
    """data.partition_column may name a declared column: one column, and one feature per level."""
    cfg = compose_config(
        [
            "data=file",
            "data.path=x.csv",
            "data.labels=[good,bad]",
            "data.partition_column=Home",
            "data.columns.numeric=[]",
            "data.columns.categorical=['Home=rent|owner']",
        ]
    )
    table = pd.DataFrame({"text": ["a", "b", "c"], "label": ["good", "bad", "good"], "Home": ["rent", "owner", "x"]})
    kept = standardize(table, cfg, "data file x.csv")
    assert list(kept.columns) == ["text", "label", "Home"]
    x = column_features(kept, declared(cfg))
    assert x is not None and torch.equal(x, torch.tensor([[0.25, 0.0], [0.0, 0.25], [0.0, 0.0]]))
