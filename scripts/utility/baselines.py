"""Non-private baselines on the package's split: credit LR / GBM on the table, reviews TF-IDF LR.

    PYTHONPATH=$PWD .venv/bin/python scripts/utility/baselines.py
Prints validation (fit -> val) and test (train -> test) numbers.
"""

from __future__ import annotations

import common  # noqa: F401  (paths, threads)
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

NUM = ["Seniority", "Time", "Age", "Expenses", "Income", "Assets", "Debt", "Amount", "Price"]
CAT = ["Home", "Marital", "Records", "Job"]


def credit_lr():
    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), NUM),
        ("cat", make_pipeline(SimpleImputer(strategy="constant", fill_value="unknown"),
                              OneHotEncoder(handle_unknown="ignore")), CAT),
    ])
    return make_pipeline(pre, LogisticRegression(max_iter=2000, class_weight="balanced"))


def credit_gbm():
    pre = ColumnTransformer([("num", "passthrough", NUM),
                             ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), CAT)])
    return make_pipeline(pre, HistGradientBoostingClassifier(class_weight="balanced", random_state=0))


def reviews_tfidf():
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, class_weight="balanced", C=10.0))


def run(name, make, splits, cols):
    for fit, ev in (("fit", "val"), ("train", "test")):
        model = make().fit(splits[fit][cols], splits[fit]["label"])
        p = model.predict_proba(splits[ev][cols])[:, 1]
        m = common.metrics(splits[ev]["label"].to_numpy(), p)
        print(f"{name:14s} {fit}->{ev}: bal_acc {m['bal_acc']:.3f} auc {m['auc']:.3f}")


if __name__ == "__main__":
    credit = common.credit_splits()
    for k, v in credit.items():
        v[CAT] = v[CAT].astype(object).fillna("unknown")
    print({k: len(v) for k, v in credit.items()})
    run("credit LR", credit_lr, credit, NUM + CAT)
    run("credit GBM", credit_gbm, credit, NUM + CAT)
    reviews = common.reviews_splits()
    print({k: len(v) for k, v in reviews.items()})
    run("reviews TFIDF", reviews_tfidf, reviews, "text")
