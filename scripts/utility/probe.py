"""Non-private linear probes (sklearn LR) on frozen MiniLM features: which layer, which pooling.

    PYTHONPATH=$PWD .venv/bin/python scripts/utility/probe.py credit|reviews [render]
"""

from __future__ import annotations

import sys

import common
import numpy as np
from sklearn.linear_model import LogisticRegression

from features import features


def texts_for(task: str, render: str | None):
    if task == "credit":
        import renders

        splits = common.credit_splits()
        fn = renders.RENDERS[render or "current"]
        return {k: [fn(r) for _, r in v.iterrows()] for k, v in splits.items()}, splits
    splits = common.reviews_splits()
    return {k: list(v["text"]) for k, v in splits.items()}, splits


def main() -> None:
    task = sys.argv[1]
    render = sys.argv[2] if len(sys.argv) > 2 else None
    max_length = int(sys.argv[3]) if len(sys.argv) > 3 else (64 if task == "credit" else 256)
    texts, splits = texts_for(task, render)
    f = {k: features(texts[k], max_length) for k in ("fit", "val")}
    y = {k: splits[k]["label"].to_numpy() for k in ("fit", "val")}
    for pool in ("cls", "mean"):
        for layer in range(f["fit"][pool].shape[0]):
            xs = {k: f[k][pool][layer] for k in f}
            for norm in (False, True):
                if norm:
                    xs = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in xs.items()}
                clf = LogisticRegression(max_iter=3000, class_weight="balanced", C=1.0).fit(xs["fit"], y["fit"])
                m = common.metrics(y["val"], clf.predict_proba(xs["val"])[:, 1])
                print(f"{task} {render} {pool:4s} layer {layer} l2norm={norm!s:5s}: bal_acc {m['bal_acc']:.3f} auc {m['auc']:.3f}")


if __name__ == "__main__":
    main()
