"""Measure FedAvg against the robust aggregators with 0% and 25% malicious clients.

Every cell is a whole federation through the real ServerApp and ClientApp
(fed_dp_lora.experiments.inprocess.run_federation) on the default task (credit, MiniLM),
with small settings so the table takes minutes on 2 CPU cores. Prints a Markdown table of
the final central metrics; the attackers are the first round(fraction * clients) partitions.

    nice -n 10 .venv/bin/python scripts/robustness.py [--clients 4] [--rounds 3] [--out DIR]
    .venv/bin/python scripts/robustness.py --table-from DIR   # the table again, from saved runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fed_dp_lora.experiments.inprocess import run_federation  # noqa: E402

STRATEGIES = {
    "fedavg": "strategy=fedavg",
    "krum": "strategy=krum strategy.num_malicious=1",
    "multi-krum": "strategy=multi-krum strategy.num_malicious=1",
    "trimmed-mean": "strategy=trimmed-mean strategy.beta=0.25",
    "median": "strategy=median",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.25, help="malicious fraction of the attacked runs")
    parser.add_argument("--attack", default="sign-flip attack.scale=10", help="attack.kind=... and its settings")
    parser.add_argument("--base", default="model.keep_layers=2 model.pooling=mean train.max_length=32 privacy=none "
                        "train.batch_size=64 train.lr=0.01 train.epochs=0.5",
                        help="Hydra overrides shared by every cell")
    parser.add_argument("--out", type=Path, default=None, help="keep each cell's outputs here")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the table from the summary.json files of an earlier --out, without running")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    out = args.out or args.table_from or Path(tempfile.mkdtemp(prefix="robustness-"))
    base = f"{args.base} rounds={args.rounds}"
    attacks = {"0%": "attack.fraction=0.0", f"{args.fraction:.0%}": f"attack.fraction={args.fraction} attack.kind={args.attack}"}
    results: dict[tuple[str, str], dict] = {}
    started = time.time()
    for name, strategy in STRATEGIES.items():
        for label, attack in attacks.items():
            t0 = time.time()
            folder = out / f"{name}-{label.rstrip('%')}"
            if args.table_from:
                results[(name, label)] = json.loads((folder / "summary.json").read_text())["final"]
                continue
            summary = run_federation(f"{base} {strategy} {attack}", args.clients, folder)
            results[(name, label)] = summary["final"]
            print(f"{name:13s} {label:>4s} malicious: balanced_accuracy={summary['final']['balanced_accuracy']:.4f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    labels = list(attacks)
    timing = "" if args.table_from else f"; {time.time() - started:.0f}s in total"
    print(f"Settings: `{base}`, {args.clients} clients, attack `{attacks[labels[1]]}`{timing}. Final "
          "round, central test set (majority baseline: balanced accuracy 0.5, AUC 0.5).\n")
    metrics = (("balanced_accuracy", "balanced acc."), ("auc", "AUC"), ("accuracy", "accuracy"))
    print("| strategy | " + " | ".join(f"{title} ({lb} malicious)" for _, title in metrics for lb in labels) + " |")
    print("|---" * (1 + len(metrics) * len(labels)) + "|")
    for name in STRATEGIES:
        cells = [f"{results[(name, lb)][key]:.3f}" for key, _ in metrics for lb in labels]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
