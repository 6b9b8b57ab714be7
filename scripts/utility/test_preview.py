"""The settled probe recipe on the real split (train side -> central test set), 3 seeds.

Credit: the package's hold-out for each seed (holdout_split with seed s) and its IID partition
(client_partition: flwr-datasets IidPartitioner over the shuffled train side); reviews:
modeldata training_data -> testing_data, partitioned the same way. Features: the frozen MiniLM,
mean over layers 1-6 of the token means. DP as in dp_probe.run (DP centring, sigma calibrated over
all steps plus the centring release). A preview for the report, not the evidence sweep: the
evidence is regenerated through the package (run_federation) once the recipe is integrated.
"""

from __future__ import annotations

import argparse
import json

import common
import numpy as np
import pandas as pd
import torch

import dp_probe
from features import features


def credit_data():
    import renders

    raw = common.credit_raw()
    texts = [renders.RENDERS["current"](r) for _, r in raw.iterrows()]
    f = torch.tensor(features(texts, 64)["mean"][1:7].mean(0))
    return raw.assign(row=np.arange(len(raw))), f


def reviews_data(max_length):
    s = common.reviews_splits()
    table = pd.concat([s["train"], s["test"]], ignore_index=True)
    f = torch.tensor(features(list(table["text"]), max_length)["mean"][1:7].mean(0))
    return table.assign(row=np.arange(len(table)), split=["train"] * len(s["train"]) + ["test"] * len(s["test"])), f


def split_for(task, table, seed, clients, partitioner="iid", alpha=0.5):
    from fed_dp_lora.config import compose_config
    from fed_dp_lora.data import client_partition, holdout_split

    overrides = [f"seed={seed}", f"data.partitioner={partitioner}", f"data.dirichlet_alpha={alpha}"]
    cfg = compose_config(overrides)
    if task == "credit":
        train, test = holdout_split(table, cfg)
    else:
        train = table[table.split == "train"].sample(frac=1.0, random_state=seed).reset_index(drop=True)
        test = table[table.split == "test"]
    parts = [client_partition(train[["row", "label"]], cfg, i, clients)["row"].to_numpy() for i in range(clients)]
    return parts, test["row"].to_numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="credit")
    ap.add_argument("--eps", nargs="+", default=["1", "4", "8", "off"])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--partitioner", default="iid")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-nodp", type=float, default=None)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    table, feats = credit_data() if a.task == "credit" else reviews_data(a.max_length)
    lr = a.lr or (0.1 if a.task == "credit" else 0.03)
    opts = argparse.Namespace(clients=a.clients, rounds=a.rounds, center="dp", stat_sigma=10.0, stat_clip=4.5,
                              weights_t=torch.tensor([0.7, 1.78] if a.task == "credit" else [0.77, 1.43]),
                              prior=None, avg="none", decay="none")
    for eps in a.eps:
        rows = []
        for seed in range(a.seeds):
            parts, test = split_for(a.task, table, seed, a.clients, a.partitioner, a.alpha)
            x = feats[torch.tensor(np.concatenate(parts))]
            y = torch.tensor(table["label"].to_numpy()[np.concatenate(parts)])
            sizes = [len(p) for p in parts]
            opts.parts = np.split(np.arange(len(x)), np.cumsum(sizes)[:-1])
            hist, info = dp_probe.run(x, y, feats[torch.tensor(test)], torch.tensor(table["label"].to_numpy()[test]), opts,
                                      eps=eps, batch=128, epochs=a.epochs, lr=(a.lr_nodp or lr) if eps == "off" else lr,
                                      clip=1.0, opt="adam", seed=seed)
            rows.append((hist[-1], info, sizes))
        ba = [r[0]["bal_acc"] for r in rows]; auc = [r[0]["auc"] for r in rows]
        print(json.dumps(dict(task=a.task, partitioner=a.partitioner, clients=a.clients, eps=eps, lr=lr,
                              sizes=rows[0][2], sigma=round(rows[0][1][0], 3), steps=rows[0][1][2],
                              eps_spent=None if rows[0][1][3] is None else round(max(r[1][3] for r in rows), 3),
                              ba=f"{np.mean(ba):.3f}±{np.std(ba, ddof=1):.3f}", auc=f"{np.mean(auc):.3f}±{np.std(auc, ddof=1):.3f}",
                              ba_seeds=[round(v, 3) for v in ba])), flush=True)


if __name__ == "__main__":
    main()
