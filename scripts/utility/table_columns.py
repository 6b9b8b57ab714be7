"""Validation only: the credit head on the text's features, on the table's columns, and on both.

Columns go through the package's own featurizer (fed_dp_lora/data/columns.py with
conf/data/credit.yaml's data.columns), so what is measured here is what the package computes.
Non-private: sklearn logistic regression on standardized features (C swept). DP: dp_probe.run
(3 clients x 3 rounds, DP centring by the Gaussian mechanism; for "both" the release clips the
joint vector to sqrt(4.5^2 + col_clip^2), the noise bound the package uses, where the package
clips each part to its own bound: fed_dp_lora/probe/centring.py).

    PYTHONPATH=$PWD .venv/bin/python scripts/utility/table_columns.py
"""

from __future__ import annotations

import argparse
import json

import common
import dp_probe
import numpy as np
import probe
import torch
from features import features
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fed_dp_lora.config import compose_config
from fed_dp_lora.data.columns import column_features, declared


def load(scale: float) -> tuple[dict, dict, dict]:
    texts, splits = probe.texts_for("credit", None)
    columns = declared(compose_config([]))
    columns.scale = scale
    enc = {k: features(texts[k], 64)["mean"][1:7].mean(0) for k in ("fit", "val")}
    tab = {k: column_features(splits[k], columns).numpy() for k in ("fit", "val")}
    y = {k: splits[k]["label"].to_numpy() for k in ("fit", "val")}
    return enc, tab, y


def sklearn_rows(enc: dict, tab: dict, y: dict) -> None:
    for name, x in (("text", enc), ("columns", tab), ("both", {k: np.hstack([enc[k], tab[k]]) for k in enc})):
        scaler = StandardScaler().fit(x["fit"])
        for c in (0.003, 0.01, 0.03, 0.1, 1.0):
            clf = LogisticRegression(max_iter=5000, class_weight="balanced", C=c).fit(
                scaler.transform(x["fit"]), y["fit"]
            )
            m = common.metrics(y["val"], clf.predict_proba(scaler.transform(x["val"]))[:, 1])
            print(
                json.dumps({"model": "sklearn LR", "features": name, "C": c, **{k: round(v, 3) for k, v in m.items()}})
            )


def dp_rows(enc: dict, tab: dict, y: dict, a: argparse.Namespace) -> None:
    ys, yv = torch.tensor(y["fit"]), torch.tensor(y["val"])
    kinds = {
        "text": (enc, 4.5),
        "columns": (tab, a.col_clip),
        "both": ({k: np.hstack([enc[k], tab[k]]) for k in enc}, float(np.hypot(4.5, a.col_clip))),
    }
    for name, (x, clip) in kinds.items():
        xs, xv = torch.tensor(x["fit"], dtype=torch.float32), torch.tensor(x["val"], dtype=torch.float32)
        for eps in a.eps:
            for lr_ in a.lr_off if eps == "off" else [0.1]:
                ns = argparse.Namespace(
                    clients=3,
                    rounds=3,
                    center="dp",
                    stat_sigma=10.0,
                    stat_clip=clip,
                    scale_clip=4.0,
                    weights_t=torch.tensor([0.7, 1.78]),
                    prior=None,
                    avg="none",
                    decay="none",
                )
                runs = [
                    dp_probe.run(
                        xs, ys, xv, yv, ns, eps=eps, batch=128, epochs=20, lr=lr_, clip=1.0, opt="adam", seed=s
                    )
                    for s in range(3)
                ]
                ba = np.mean([h[-1]["bal_acc"] for h, _ in runs])
                auc = np.mean([h[-1]["auc"] for h, _ in runs])
                print(
                    json.dumps(
                        {
                            "model": "DP probe",
                            "features": name,
                            "eps": eps,
                            "lr": lr_,
                            "bal_acc": round(float(ba), 3),
                            "auc": round(float(auc), 3),
                        }
                    ),
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--col-clip", type=float, default=4.0)
    ap.add_argument("--eps", nargs="+", default=["1", "8", "off"])
    ap.add_argument("--lr-off", nargs="+", type=float, default=[0.01, 0.03])
    a = ap.parse_args()
    enc, tab, y = load(a.scale)
    sklearn_rows(enc, tab, y)
    dp_rows(enc, tab, y, a)


if __name__ == "__main__":
    main()
