"""The utility cost of the three sound neighbouring-relation designs on the default task.

For the default run's plan (each client's q, steps and delta at the default epsilon) it computes
the noise multiplier each design needs, then runs the default federation (in process, the real
ServerApp and ClientApp) at that noise for every seed, and writes the table into docs/privacy.md:

1. add/remove, declared public count (ours): Opacus RDP of the Poisson-subsampled Gaussian.
2. add/remove, a DP count: one Gaussian count (sigma_count, sensitivity 1) released first, composed
   in the same RDP ledger; DP-SGD gets what is left.
3. replace-one, n public: fixed batches sampled without replacement, dp-accounting's RDP for
   replace-one neighbours (Wang, Balle, Kasiviswanathan 2019); the clipped sum's sensitivity is 2C,
   so its noise multiplier relative to that sensitivity is sigma / 2.

    .venv/bin/python scripts/relation_cost.py --out results/relation [--seeds 0 1 2] [--write-docs]

Cells already in --out are reused (runs can be split over several sittings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.privacy_accountant import NeighboringRelation  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from fed_dp_lora.config import load_config  # noqa: E402
from fed_dp_lora.data import client_partition, holdout_split, load_table  # noqa: E402
from fed_dp_lora.experiments.inprocess import run_federation  # noqa: E402
from fed_dp_lora.experiments.readme import write_section  # noqa: E402
from fed_dp_lora.privacy.accountant import calibrate_noise  # noqa: E402
from fed_dp_lora.training import plan_steps  # noqa: E402

CLIENTS = 3
COUNT_SIGMA = 10.0  # the DP count's noise (sensitivity 1): about 1% of a default client's size
DESIGNS = {
    "declared": "add/remove, declared public count (ours)",
    "dp-count": f"add/remove, DP count (sigma {COUNT_SIGMA:g})",
    "replace-one": "replace-one, n public, sampling without replacement",
}


def default_plan() -> dict[str, float]:
    """q, steps and delta of the default run's smallest client (the one that needs most noise)."""
    cfg = load_config({"overrides": ""})
    train, _ = holdout_split(load_table(cfg), cfg)
    n = min(len(client_partition(train, cfg, i, CLIENTS)) for i in range(CLIENTS))
    q, steps = plan_steps(n, int(cfg.train.batch_size), float(cfg.train.epochs))
    return {"n": n, "batch": int(cfg.train.batch_size), "q": q, "steps": steps * int(cfg.rounds),
            "delta": 1.0 / (10 * n), "epsilon": float(cfg.privacy.epsilon)}


def _replace_one_epsilon(sigma: float, plan: dict[str, float]) -> float:
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    step = dp_event.SampledWithoutReplacementDpEvent(int(plan["n"]), int(plan["batch"]),
                                                     dp_event.GaussianDpEvent(sigma / 2))
    accountant.compose(dp_event.SelfComposedDpEvent(step, int(plan["steps"])))
    return accountant.get_epsilon(plan["delta"])


def noise_multipliers(plan: dict[str, float]) -> dict[str, float]:
    eps, delta, q, steps = plan["epsilon"], plan["delta"], plan["q"], int(plan["steps"])
    low, high = 0.1, 50.0
    while high - low > 1e-3 * high:  # epsilon falls as sigma grows
        mid = (low + high) / 2
        low, high = (mid, high) if _replace_one_epsilon(mid, plan) > eps else (low, mid)
    return {
        "declared": calibrate_noise(eps, delta, q, steps, "rdp"),
        "dp-count": calibrate_noise(eps, delta, q, steps, "rdp", ((COUNT_SIGMA, 1.0, 1),)),
        "replace-one": high,
    }


def run_cell(out: Path, design: str, sigma: float, seed: int) -> dict:
    path = out / f"{design}-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        summary = run_federation(f"seed={seed} privacy.noise_multiplier={sigma}", CLIENTS, Path(folder) / "run")
    cell = {"design": design, "seed": seed, "noise_multiplier": sigma, **summary["final"],
            "seconds": round(time.time() - started)}
    cell.pop("majority_baseline", None)
    path.write_text(json.dumps(cell, indent=1))
    return cell


def table(plan: dict[str, float], sigmas: dict[str, float], cells: list[dict]) -> str:
    rows = [f"Default task ({CLIENTS} clients, epsilon {plan['epsilon']:g}, delta 1/(10 n), q = {plan['q']:.4f}, "
            f"{int(plan['steps'])} steps); seeds {sorted({c['seed'] for c in cells})} (mean ± sd when more than one):", "",
            "| design | noise multiplier for the same epsilon | balanced accuracy | AUC |", "|---|---|---|---|"]
    for design, label in DESIGNS.items():
        mine = [c for c in cells if c["design"] == design]
        stat = lambda key: ("not run" if not mine else f"{mine[0][key]:.3f}" if len(mine) == 1  # noqa: E731
                            else f"{statistics.mean(c[key] for c in mine):.3f} ± "
                                 f"{statistics.pstdev(c[key] for c in mine):.3f}")
        rows.append(f"| {label} | {sigmas[design]:.3f} | {stat('balanced_accuracy')} | {stat('auc')} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/relation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/privacy.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = default_plan()
    sigmas = noise_multipliers(plan)
    (args.out / "plan.json").write_text(json.dumps({"plan": plan, "noise_multipliers": sigmas}, indent=1))
    print(json.dumps({"plan": plan, "noise_multipliers": sigmas}), flush=True)
    cells = []
    for design in args.designs:
        for seed in args.seeds:
            cells.append(run_cell(args.out, design, sigmas[design], seed))
            print(json.dumps(cells[-1]), flush=True)
    cells = [json.loads(p.read_text()) for p in sorted(args.out.glob("*-seed*.json"))]
    body = table(plan, sigmas, cells)
    print(body)
    if args.write_docs:
        docs = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
        write_section(docs, "relation", f"Generated by `scripts/relation_cost.py --write-docs`:\n\n{body}")
    ratio = sigmas["replace-one"] / sigmas["declared"]
    print(f"replace_one_vs_declared_noise={ratio:.3f} dp_count_vs_declared_noise="
          f"{sigmas['dp-count'] / sigmas['declared']:.4f}")


if __name__ == "__main__":
    main()
