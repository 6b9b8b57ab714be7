"""Data sources: the real credit table and users' CSV / JSONL / Parquet files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fed_dp_lora.config import ConfigError, compose_config, validate
from fed_dp_lora.data import DataError, label_names, load_table
from fed_dp_lora.data.sources import CREDIT_LABELS, read_file


@pytest.fixture(scope="module")
def credit():
    cfg = compose_config(["+preset=tiny"])
    validate(cfg)
    return load_table(cfg)


# --- the packaged credit data ---------------------------------------------------------------


def test_credit_table_size_and_columns(credit):
    assert len(credit) == 4454
    assert {"text", "label"} <= set(credit.columns)
    # natural-institution columns stay for data.partitioner=column
    assert {"Home", "Job", "Marital", "Records"} <= set(credit.columns)
    assert not credit[["Home", "Job", "Marital", "Records"]].isna().any().any()


def test_credit_labels_are_binary_with_published_balance(credit):
    assert set(credit["label"].unique()) == {0, 1}
    assert credit["label"].dtype.kind == "i"
    assert (credit["label"] == 1).sum() == 1254  # bad (default) is the class we predict
    assert (credit["label"] == 0).sum() == 3200
    assert 0.27 < credit["label"].mean() < 0.29
    assert CREDIT_LABELS == ("good", "bad")


def test_credit_texts_are_non_empty_and_informative(credit):
    texts = credit["text"]
    assert texts.map(lambda t: isinstance(t, str) and len(t.strip()) > 40).all()
    assert not texts.str.contains("nan").any()  # missing values are rendered as "unknown"
    first = texts.iloc[0]
    for word in ("job", "prior default records", "seniority", "age", "Income", "Loan", "months"):
        assert word in first
    # records differ: the text carries the applicant's features
    assert texts.nunique() > 4400


def test_credit_label_names(make_cfg):
    assert label_names(make_cfg()) == ["good", "bad"]


def test_credit_causal_lm_prompt_and_response(make_cfg):
    table = load_table(make_cfg("model=smollm2"))
    assert len(table) == 4454
    assert {"prompt", "response"} <= set(table.columns) and "label" not in table.columns
    assert set(table["response"]) == {"good", "bad"}
    assert (table["response"] == "bad").sum() == 1254
    assert table["prompt"].str.startswith("Loan applicant: ").all()
    assert table["prompt"].str.endswith("repay (good) or default (bad)?").all()


# --- users' files -----------------------------------------------------------------------------

RECORDS = pd.DataFrame(
    {
        "review": ["late payments twice", "always on time", "defaulted in 2019", "steady income"],
        "outcome": ["bad", "good", "bad", "good"],
        "bank": ["A", "A", "B", "B"],
    }
)


def _write(frame: pd.DataFrame, path) -> str:
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_with_custom_columns_loads(make_cfg, tmp_path, suffix):
    path = _write(RECORDS, tmp_path / f"bank{suffix}")
    cfg = make_cfg(
        "data=file", f"data.path={path}", "data.text_column=review", "data.label_column=outcome",
        "data.labels=[good,bad]",
    )
    table = load_table(cfg)
    assert list(table.columns) == ["text", "label"]
    assert list(table["text"]) == list(RECORDS["review"])
    assert list(table["label"]) == [1, 0, 1, 0]  # index in data.labels
    assert table["label"].dtype.kind == "i"


def test_explicit_path_overrides_data_path(make_cfg, tmp_path):
    """Deployment: the node's data-path is read, whatever data.path says."""
    path = _write(RECORDS, tmp_path / "node.csv")
    cfg = make_cfg("data=file", "data.text_column=review", "data.label_column=outcome",
                   "data.labels=[good,bad]")
    assert len(load_table(cfg, path=path)) == 4


def test_labels_default_to_sorted_values_seen(make_cfg, tmp_path):
    path = _write(RECORDS, tmp_path / "bank.csv")
    cfg = make_cfg("data=file", "data.text_column=review", "data.label_column=outcome")
    table = load_table(cfg, path=path)
    # sorted: bad=0, good=1
    assert list(table["label"]) == [0, 1, 0, 1]
    assert label_names(cfg, RECORDS["outcome"]) == ["bad", "good"]


def test_numeric_labels_map_through_data_labels(make_cfg, tmp_path):
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 0, 1]})
    path = _write(frame, tmp_path / "num.parquet")
    table = load_table(make_cfg("data=file", "data.labels=[0,1]"), path=path)
    assert list(table["label"]) == [1, 0, 1]
    # a different order of data.labels changes the indices
    table = load_table(make_cfg("data=file", "data.labels=[1,0]"), path=path)
    assert list(table["label"]) == [0, 1, 0]


def test_a_record_with_an_unknown_label_is_dropped_and_counted(make_cfg, tmp_path):
    """Never an error: whether a round runs must not depend on one record (the server sees it)."""
    frame = RECORDS.assign(outcome=["bad", "good", "maybe", "good"])
    path = _write(frame, tmp_path / "bank.csv")
    cfg = make_cfg("data=file", "data.text_column=review", "data.label_column=outcome",
                   "data.labels=[good,bad]")
    table = load_table(cfg, path=path)
    assert list(table["label"]) == [1, 0, 0] and table.attrs["dropped"] == {"label not in data.labels": 1}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_malformed_line_is_skipped_and_counted(make_cfg, tmp_path, suffix):
    path = tmp_path / f"bank{suffix}"
    if suffix == ".csv":
        path.write_text('text,label\n"a",good\n"b",bad,oops,more\n"c",bad\n')
    else:
        path.write_text('{"text": "a", "label": "good"}\n{"text": "b", "lab\n{"text": "c", "label": "bad"}\n')
    table = load_table(make_cfg("data=file", "data.labels=[good,bad]"), path=str(path))
    assert list(table["text"]) == ["a", "c"] and table.attrs["dropped"] == {"malformed line": 1}


def test_label_names_needs_data_labels_before_reading_a_file(make_cfg):
    with pytest.raises(ConfigError, match=r"^data\.labels: .*Fix: set data\.labels"):
        label_names(make_cfg("data=file"))


def test_rows_with_missing_text_or_label_are_dropped(make_cfg, tmp_path):
    frame = pd.DataFrame({"text": ["a", None, "c", "d"], "label": ["x", "y", None, "y"]})
    path = _write(frame, tmp_path / "holes.parquet")
    table = load_table(make_cfg("data=file", "data.labels=[x,y]"), path=path)
    assert list(table["text"]) == ["a", "d"] and list(table["label"]) == [0, 1]


def test_partition_column_is_kept_from_a_file(make_cfg, tmp_path):
    path = _write(RECORDS, tmp_path / "bank.csv")
    cfg = make_cfg("data=file", "data.text_column=review", "data.label_column=outcome",
                   "data.labels=[good,bad]", "data.partitioner=column", "data.partition_column=bank")
    assert list(load_table(cfg, path=path)["bank"]) == ["A", "A", "B", "B"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_causal_lm_prompt_response_columns_load(make_cfg, tmp_path, suffix):
    frame = pd.DataFrame(
        {"question": ["Is a 30% debt ratio high?", "What is APR?"],
         "answer": ["It is moderate.", "The annual percentage rate."], "extra": [1, 2]}
    )
    path = _write(frame, tmp_path / f"qa{suffix}")
    cfg = make_cfg("model=smollm2", "data=file", "data.prompt_column=question",
                   "data.response_column=answer")
    table = load_table(cfg, path=path)
    assert list(table.columns) == ["prompt", "response"]
    assert list(table["prompt"]) == list(frame["question"])
    assert list(table["response"]) == list(frame["answer"])


def test_jsonl_is_read_line_by_line(make_cfg, tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "a" if i % 2 else "b"})
                              for i in range(5)) + "\n")
    table = load_table(make_cfg("data=file", "data.labels=[a,b]"), path=str(path))
    assert len(table) == 5 and list(table["label"]) == [1, 0, 1, 0, 1]


# --- file errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, missing, key",
    [
        (["data.text_column=body", "data.label_column=outcome"], "body", "data.text_column"),
        (["data.text_column=review", "data.label_column=y"], "y", "data.label_column"),
    ],
)
def test_missing_column_names_the_key_to_set(make_cfg, tmp_path, overrides, missing, key):
    path = _write(RECORDS, tmp_path / "bank.csv")
    cfg = make_cfg("data=file", "data.labels=[good,bad]", *overrides)
    with pytest.raises(DataError) as info:
        load_table(cfg, path=path)
    message = str(info.value)
    assert repr(missing) in message and f"Fix: set {key} " in message
    assert "review" in message  # lists the columns the file has
    other = {"data.text_column", "data.label_column"} - {key}
    assert other.pop() not in message  # only the key at fault


def test_missing_prompt_and_response_columns(make_cfg, tmp_path):
    path = _write(RECORDS, tmp_path / "bank.jsonl")
    with pytest.raises(DataError) as info:
        load_table(make_cfg("model=smollm2", "data=file"), path=path)
    message = str(info.value)
    assert "data.prompt_column" in message and "data.response_column" in message


def test_default_columns_missing_names_both_keys(make_cfg, tmp_path):
    path = _write(RECORDS, tmp_path / "bank.csv")
    with pytest.raises(DataError, match="data.text_column, data.label_column"):
        load_table(make_cfg("data=file", f"data.path={path}", "data.labels=[good,bad]"))


def test_missing_file(make_cfg, tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError) as info:
        load_table(make_cfg("data=file", f"data.path={path}", "data.labels=[a,b]"))
    message = str(info.value)
    assert str(path) in message and "does not exist" in message and "data.path" in message


def test_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_file(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_zero_byte_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        read_file(path)
    message = str(info.value)
    assert str(path) in message and "empty" in message and "Fix:" in message


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_with_header_but_no_records(tmp_path, suffix):
    path = _write(RECORDS.iloc[:0], tmp_path / f"header{suffix}")
    with pytest.raises(DataError, match="has no records"):
        read_file(path)


def test_file_with_only_empty_values_gives_no_records_and_says_why(make_cfg, tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("text,label\n,\n,\n")
    table = load_table(make_cfg("data=file", "data.labels=[a,b]"), path=str(path))
    assert table.empty and table.attrs["dropped"] == {"missing value": 2}


@pytest.mark.parametrize("name", ["records.txt", "records.xlsx", "records"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("text,label\na,b\n")
    with pytest.raises(DataError) as info:
        read_file(path)
    message = str(info.value)
    assert "unsupported type" in message and ".csv" in message and ".parquet" in message


def test_malformed_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DataError, match=f"{path} could not be parsed as .parquet"):
        read_file(path)


def test_hub_source_loads_a_dataset_folder_offline(make_cfg, tmp_path):
    """data.source=hub goes through datasets.load_dataset; a local dataset folder needs no network."""
    folder = tmp_path / "bank-reviews"
    folder.mkdir()
    pd.DataFrame({"review": ["late payments", "paid early"], "outcome": ["bad", "good"]}).to_csv(
        folder / "train.csv", index=False
    )
    cfg = make_cfg("data.source=hub", f"data.name={folder}", "data.text_column=review",
                   "data.label_column=outcome", "data.labels=[good,bad]")
    table = load_table(cfg)
    assert list(table["text"]) == ["late payments", "paid early"]
    assert list(table["label"]) == [1, 0]


# --- the packaged reviews (modeldata small_fine_foods) ----------------------------------------


def test_reviews_load_offline_with_the_publishers_split():
    from fed_dp_lora.data import holdout_split
    from fed_dp_lora.data.sources import REVIEW_LABELS

    cfg = compose_config(["+preset=tiny", "data=reviews"])
    validate(cfg)
    table = load_table(cfg)
    assert len(table) == 5000 and {"text", "label", "split"} <= set(table.columns)
    assert label_names(cfg) == list(REVIEW_LABELS) == ["great", "other"]
    train, test = holdout_split(table, cfg)
    assert (len(train), len(test)) == (4000, 1000)
    assert (test["label"] == 1).sum() == 342 and (train["label"] == 1).sum() == 1400  # "other"
    assert train["text"].str.len().min() > 0
