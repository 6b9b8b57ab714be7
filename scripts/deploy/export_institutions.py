"""Write one CSV per institution from the packaged credit data, for a deployment trial.

Usage (from the repo root):
    /work/venv/bin/python scripts/deploy/export_institutions.py OUT_DIR --institutions N [--seed S]
        [--overrides "HYDRA OVERRIDES"]

Writes OUT_DIR/institution-<i>.csv (i = 0..N-1) with columns text,label (label names good/bad)
and the table columns the run's probe head reads (data.columns), ready for `supernode.sh --data`;
it prints the `--feature-columns` value an institution gives to let the head read them.
The split is the project's own: the central
hold-out (data.test_fraction, seeded) is removed first with `holdout_split`, so the test set
the ServerApp evaluates on never reaches an institution; the rest is divided with
`client_partition` exactly as simulation divides it among N SuperNodes. Give the run's seed
(and any data.* overrides) so that the hold-out matches the one the ServerApp computes:
`--seed 3` here pairs with `-c 'overrides="seed=3 ..."'` on `flwr run`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fed_dp_lora.config import load_config  # noqa: E402
from fed_dp_lora.data import client_partition, holdout_split, label_names, load_table  # noqa: E402
from fed_dp_lora.data.columns import column_names, declared  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--institutions", "-n", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: conf's)")
    parser.add_argument("--overrides", default="", help="the run's Hydra overrides, if any touch data.*")
    args = parser.parse_args(argv)
    if args.institutions < 1:
        parser.error("--institutions must be at least 1")

    overrides = shlex.split(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config({"overrides": shlex.join(overrides)})
    if cfg.model.task != "classification":
        parser.error("only classification tasks export to text,label (model.task is "
                     f"{cfg.model.task!r})")
    names = label_names(cfg)
    columns = column_names(declared(cfg))
    train, test = holdout_split(load_table(cfg), cfg)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.institutions):
        part = client_partition(train, cfg, i, args.institutions)
        out = part[["text", "label", *columns]].assign(label=part["label"].map(lambda v: names[int(v)]))
        path = args.out_dir / f"institution-{i}.csv"
        out.to_csv(path, index=False)
        counts = out["label"].value_counts().to_dict()
        print(f"{path}: {len(out)} records {counts}")
    print(f"(seed {cfg.seed}; {len(test)} hold-out records kept back for the server's evaluation)")
    if columns:
        print(f"the run's head also reads: --feature-columns {','.join(columns)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
