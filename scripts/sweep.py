"""Privacy-utility sweep of the default recipe: every cell is a whole federation through the real
ServerApp/ClientApp (in process), on the default model (all six layers of MiniLM).

Grid (docs/results.md): task in {credit, reviews} x epsilon in {1, 4, 8, off} x seeds, for
  federated   3 institutions, the default recipe (DP linear probe)
  centralized one institution holding all the training records, the same recipe
  skew        3 institutions, Dirichlet(0.5) label skew
  textonly    the federated default with the head on the text's features alone (credit: without
              the applicant's table columns, data.columns), to show what the columns add
  lora        recipe=lora, vanilla and FFA (--lora-epsilons; slow: the encoder trains)
and beside them the non-private baselines on the same split (scripts/sweep_baselines.py). Each
row records the epsilon measured by the clients' ledgers, not the target. Rows go to results.csv
as they finish, so an interrupted sweep resumes where it stopped; the table in docs/results.md
(between its results markers) and the PNG are generated from the CSV.

    .venv/bin/python scripts/sweep.py                       # the whole grid
    .venv/bin/python scripts/sweep.py --seeds 1 --epsilons 8 off --groups federated   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
# Every cell starts from the defaults; these only let a one-institution cell run.
BASE = "strategy.min_available_clients=1 strategy.min_train_clients=1"
FEDERATED_CLIENTS = 3
GROUPS = ("federated", "centralized", "skew", "textonly", "lora", "baseline")
# The default run with its head on the text's features alone (data sources that declare data.columns).
TEXT_ONLY = "data.columns.numeric=[] data.columns.categorical=[]"
TABLE_TASKS = ("credit",)
FIELDS = ["group", "task", "clients", "target_epsilon", "recipe", "lora", "partitioner", "alpha", "seed",
          "epsilon_measured", "balanced_accuracy", "accuracy", "macro_f1", "auc", "seconds"]
KEY = ("group", "task", "target_epsilon", "recipe", "lora", "alpha", "seed")


def _cell(group: str, task: str, eps: str, seed: int, **extra) -> dict:
    cell = dict(group=group, task=task, target_epsilon=eps, recipe="linear-probe", lora="", partitioner="iid",
                alpha="", seed=seed, clients=1 if group == "centralized" else FEDERATED_CLIENTS)
    cell.update(extra)
    return cell


def cells(args: argparse.Namespace) -> list[dict]:
    """The grid, the default recipe's rows first, then baselines, then the slow LoRA rows."""
    out = []
    for task in args.tasks:
        for seed in range(args.seeds):
            for eps in args.epsilons:
                out += [_cell(g, task, eps, seed) for g in ("federated", "centralized") if g in args.groups]
                if "textonly" in args.groups and task in TABLE_TASKS:
                    out.append(_cell("textonly", task, eps, seed))
            if "skew" in args.groups:
                out += [_cell("skew", task, eps, seed, partitioner="dirichlet", alpha="0.5")
                        for eps in args.skew_epsilons]
            if "baseline" in args.groups:
                out.append(_cell("baseline", task, "off", seed, recipe="sklearn", clients=0))
    if "lora" in args.groups:
        for task in args.tasks:
            for seed in range(args.lora_seeds):
                out += [_cell("lora", task, eps, seed, recipe="lora", lora=mode)
                        for eps in args.lora_epsilons for mode in ("vanilla", "ffa")]
    return out


def cell_key(cell: dict) -> tuple:
    """A baseline cell writes one row per baseline (named in `lora`); its key ignores the name."""
    return tuple("" if k == "lora" and cell["group"] == "baseline" else str(cell[k]) for k in KEY)


def overrides(cell: dict, base: str) -> str:
    parts = [base, f"seed={cell['seed']}", f"data={cell['task']}"]
    if cell["recipe"] == "lora":
        parts += ["recipe=lora", f"lora={cell['lora']}"]
    parts.append("privacy=none" if cell["target_epsilon"] == "off" else f"privacy.epsilon={cell['target_epsilon']}")
    if cell["group"] == "textonly":
        parts.append(TEXT_ONLY)
    if cell["partitioner"] == "dirichlet":
        parts += ["data.partitioner=dirichlet", f"data.dirichlet_alpha={cell['alpha']}"]
    return " ".join(parts)


def _worker_init() -> None:
    """One torch thread per worker: small matmuls scale better across processes than threads."""
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.INFO)


def run_cell(cell: dict, base: str, scratch: Path) -> list[dict]:
    """The cell's rows: one federation, or (baseline cells) one row per baseline."""
    started = time.time()
    if cell["group"] == "baseline":
        from sweep_baselines import baselines

        return [{**cell, "lora": name, "epsilon_measured": "off", "accuracy": "", "macro_f1": "",
                 **{k: f"{v:.4f}" for k, v in metrics.items()}, "seconds": f"{time.time() - started:.1f}"}
                for name, metrics in baselines(cell["task"], int(cell["seed"])).items()]
    from fed_dp_lora.experiments.inprocess import run_federation

    folder = scratch / f"run-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    summary = run_federation(overrides(cell, base), int(cell["clients"]), folder)
    eps = [float(e) for e in summary["privacy"]["epsilon"].values()]
    final = summary["final"]
    shutil.rmtree(folder, ignore_errors=True)
    return [{**cell, "epsilon_measured": f"{max(eps):.4f}" if eps else "off",
             **{k: f"{final[k]:.4f}" for k in ("balanced_accuracy", "accuracy", "macro_f1", "auc")},
             "seconds": f"{time.time() - started:.1f}"}]


def time_default(out: Path) -> None:
    """The default credit run (no overrides, 3 clients) timed twice: with an empty feature cache
    (what a first run pays: the encoder over every record once) and with the cache filled."""
    import json
    import tempfile

    from fed_dp_lora.experiments.inprocess import run_federation

    timings = {}
    with tempfile.TemporaryDirectory(prefix="fdl-timing-") as scratch:
        os.environ["FED_DP_LORA_CACHE"] = os.environ["FED_DP_LORA_STATE"] = scratch
        for label in ("cold", "warm"):
            started = time.time()
            summary = run_federation("", FEDERATED_CLIENTS, Path(scratch) / label)
            timings[label] = {"seconds": time.time() - started, "final": summary["final"]}
    record = {"command": "run_federation('', 3) (fed_dp_lora/experiments/inprocess.py)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": f"{os.getloadavg()[0]:.1f}",
              **{f"{k}_seconds": v["seconds"] for k, v in timings.items()},
              **{f"{k}_final": v["final"] for k, v in timings.items()}}
    (out / "default-run.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)


def append_rows(csv_path: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    """Append `rows` (their `fields` columns) as each finishes, so a stopped sweep resumes."""
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep")
    parser.add_argument("--tasks", nargs="+", default=["credit", "reviews"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", nargs="+", default=["1", "4", "8", "off"])
    parser.add_argument("--skew-epsilons", nargs="*", default=["1", "4", "8", "off"])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--lora-epsilons", nargs="*", default=["8", "off"])
    parser.add_argument("--lora-seeds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="cells run in parallel (one torch thread each)")
    parser.add_argument("--base", default=BASE, help="Hydra overrides every cell starts from")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md",
                        help="the page whose results section is rewritten from results.csv")
    parser.add_argument("--table-only", action="store_true", help="only regenerate the table from results.csv")
    parser.add_argument("--time-default", action="store_true", help="time the default credit run (cold, warm)")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # Flower's per-round logs; the sweep prints one line per cell

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, base_path = args.out / "results.csv", args.out / "base.txt"
    if csv_path.exists() and base_path.exists() and base_path.read_text() != args.base:
        raise SystemExit(f"{csv_path} holds cells run from other base overrides ({base_path}). Fix: pass "
                         "--out to a new folder, or delete the old results to start over")
    base_path.write_text(args.base)
    if args.time_default:
        time_default(args.out)
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    done = {cell_key(r) for r in rows}
    todo = [] if args.table_only else [c for c in cells(args) if cell_key(c) not in done]
    print(f"sweep: {len(todo)} runs to do, {len(done)} already in {csv_path}", flush=True)
    started = time.time()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(run_cell, cell, args.base, args.out): cell for cell in todo}
        for i, future in enumerate(as_completed(futures), 1):
            cell, new_rows = futures[future], future.result()
            rows += new_rows
            append_rows(csv_path, new_rows)
            elapsed = time.time() - started
            print(f"[{i}/{len(todo)}] {cell['group']} {cell['task']} {cell['recipe']} {cell['lora']} "
                  f"eps={cell['target_epsilon']} seed={cell['seed']}: bal_acc={new_rows[0]['balanced_accuracy']} "
                  f"auc={new_rows[0]['auc']} eps_measured={new_rows[0]['epsilon_measured']} "
                  f"({new_rows[0]['seconds']}s, ~{elapsed / i * (len(todo) - i) / 60:.0f} min left)", flush=True)

    from sweep_table import write_results

    write_results(rows, args, parser.parse_args([]))


if __name__ == "__main__":
    main()
