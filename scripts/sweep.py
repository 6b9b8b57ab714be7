"""Privacy-utility sweep: every cell is a whole federation through the real ServerApp/ClientApp.

Grid (docs/results.md, "Privacy against utility"): epsilon in {1, 2, 4, 8, off} x {centralized (one client), federated}
x {vanilla, ffa} x rank in {4, 8, 16} x seeds, plus label skew (Dirichlet alpha 0.1, 0.5, IID)
for the federated default. Each row records the epsilon measured by the clients' ledgers, not
the target. Rows go to results.csv as they finish, so an interrupted sweep resumes where it
stopped; then the Markdown tables and PNG plots are generated from the CSV, and with --doc the
sweep section of docs/results.md is rewritten from them (a finished grid only regenerates).

    .venv/bin/python scripts/sweep.py --doc docs/results.md   # the documented grid (about an hour here)
    .venv/bin/python scripts/sweep.py --seeds 1 --epsilons 8 off --ranks 8   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
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
# The sweep's size: the default credit task and model, cut to what this 2-core machine runs
# in about an hour (see docs/results.md for what it means for the numbers).
BASE = ("model.keep_layers=1 model.pooling=mean train.max_length=32 rounds=3 train.epochs=0.34 train.lr=0.01 eval.interval=3 "
        "strategy.min_available_clients=1 strategy.min_train_clients=1")
FEDERATED_CLIENTS = 3
FIELDS = ["group", "setting", "clients", "target_epsilon", "lora", "rank", "partitioner", "alpha", "seed",
          "epsilon_measured", "balanced_accuracy", "accuracy", "macro_f1", "auc", "seconds"]


def cells(args: argparse.Namespace) -> list[dict]:
    """The grid, main part first: one dict per run."""
    out = []
    for seed in range(args.seeds):
        for eps in args.epsilons:
            for setting in ("centralized", "federated"):
                for lora in ("vanilla", "ffa"):
                    for rank in args.ranks:
                        out.append(dict(group="main", setting=setting, target_epsilon=eps, lora=lora,
                                        rank=rank, partitioner="iid", alpha="", seed=seed))
        for eps in args.skew_epsilons:
            for alpha in ("0.1", "0.5", "iid"):
                out.append(dict(group="skew", setting="federated", target_epsilon=eps, lora="vanilla", rank=8,
                                partitioner="iid" if alpha == "iid" else "dirichlet",
                                alpha="" if alpha == "iid" else alpha, seed=seed))
    for cell in out:
        cell["clients"] = 1 if cell["setting"] == "centralized" else FEDERATED_CLIENTS
    return out


def cell_key(cell: dict) -> tuple:
    return tuple(str(cell[k]) for k in ("group", "setting", "target_epsilon", "lora", "rank", "alpha", "seed"))


def overrides(cell: dict, base: str) -> str:
    parts = [base, f"seed={cell['seed']}", f"lora={cell['lora']}", f"lora.r={cell['rank']}",
             f"lora.alpha={2 * int(cell['rank'])}"]
    parts.append("privacy=none" if cell["target_epsilon"] == "off" else f"privacy.epsilon={cell['target_epsilon']}")
    if cell["partitioner"] == "dirichlet":
        parts += ["data.partitioner=dirichlet", f"data.dirichlet_alpha={cell['alpha']}"]
    return " ".join(parts)


def _worker_init() -> None:
    """One torch thread per worker: small matmuls scale better across processes than threads."""
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.INFO)


def run_cell(cell: dict, base: str, scratch: Path) -> dict:
    from fed_dp_lora.experiments.inprocess import run_federation

    started = time.time()
    folder = scratch / f"run-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    summary = run_federation(overrides(cell, base), int(cell["clients"]), folder)
    eps = [float(e) for e in summary["privacy"]["epsilon"].values()]
    final = summary["final"]
    row = {**cell, "epsilon_measured": f"{max(eps):.4f}" if eps else "off",
            **{k: f"{final[k]:.4f}" for k in ("balanced_accuracy", "accuracy", "macro_f1", "auc")},
            "seconds": f"{time.time() - started:.1f}"}
    shutil.rmtree(folder, ignore_errors=True)
    return row


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def _eps_order(eps: str) -> float:
    return math.inf if eps == "off" else float(eps)


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds for every cell of the grid."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple(row[k] for k in ("group", "setting", "target_epsilon", "lora", "rank", "partitioner", "alpha"))
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        entry = dict(zip(("group", "setting", "target_epsilon", "lora", "rank", "partitioner", "alpha"), key))
        entry["seeds"] = len(members)
        for metric in ("balanced_accuracy", "auc"):
            entry[metric] = _stats([float(m[metric]) for m in members])
        measured = [float(m["epsilon_measured"]) for m in members if m["epsilon_measured"] != "off"]
        entry["epsilon_measured"] = max(measured) if measured else None
        out.append(entry)
    out.sort(key=lambda e: (e["group"], e["setting"], e["lora"], int(e["rank"]), e["alpha"],
                            _eps_order(e["target_epsilon"])))
    return out


def _grid_table(main: list[dict], metric: str, with_epsilon: bool) -> list[str]:
    epsilons = sorted({e["target_epsilon"] for e in main}, key=_eps_order)
    lines = ["| setting | LoRA | rank | " + " | ".join(f"ε={e}" if e != "off" else "no DP" for e in epsilons) + " |",
             "|---|---|---|" + "---|" * len(epsilons)]
    rows: dict[tuple, dict] = {}
    for e in main:
        rows.setdefault((e["setting"], e["lora"], int(e["rank"])), {})[e["target_epsilon"]] = e
    for (setting, lora, rank), by_eps in sorted(rows.items()):
        cells_md = []
        for eps in epsilons:
            e = by_eps.get(eps)
            if e is None:
                cells_md.append("-")
                continue
            mean, sd = e[metric]
            measured = f" (ε̂ {e['epsilon_measured']:.2f})" if with_epsilon and e["epsilon_measured"] is not None else ""
            cells_md.append(f"{mean:.3f} ± {sd:.3f}{measured}")
        lines.append(f"| {setting} | {lora} | {rank} | " + " | ".join(cells_md) + " |")
    return lines


def markdown(summary: list[dict]) -> str:
    """The results tables of docs/results.md: mean ± sd over seeds."""
    main = [e for e in summary if e["group"] == "main"]
    seeds = sorted({e["seeds"] for e in main})
    lines = [f"Balanced accuracy on the central test set, mean ± sd over {'/'.join(map(str, seeds))} seeds; ε̂ is "
             "the largest client epsilon measured by the ledgers (max over seeds):", ""]
    lines += _grid_table(main, "balanced_accuracy", True)
    lines += ["", "AUC (ranking quality, which survives when balanced accuracy collapses to the majority class):",
              ""]
    lines += _grid_table(main, "auc", False)
    skew = [e for e in summary if e["group"] == "skew"]
    if skew:
        lines += ["", "Label skew across the federated clients (vanilla LoRA, rank 8):", "",
                  "| partition | target ε | balanced accuracy | AUC | measured ε |", "|---|---|---|---|---|"]
        for e in sorted(skew, key=lambda e: (_eps_order(e["target_epsilon"]), e["alpha"] or "z")):
            part = f"Dirichlet α={e['alpha']}" if e["alpha"] else "IID"
            measured = f"{e['epsilon_measured']:.2f}" if e["epsilon_measured"] is not None else "-"
            lines.append(f"| {part} | {e['target_epsilon']} | {e['balanced_accuracy'][0]:.3f} ± "
                         f"{e['balanced_accuracy'][1]:.3f} | {e['auc'][0]:.3f} ± {e['auc'][1]:.3f} | {measured} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    """Balanced accuracy and AUC against epsilon: a column per setting, a line per LoRA mode and rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [e for e in summary if e["group"] == "main"]
    epsilons = sorted({e["target_epsilon"] for e in main}, key=_eps_order)
    x = {eps: i for i, eps in enumerate(epsilons)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, (metric, label, chance) in enumerate((("balanced_accuracy", "balanced accuracy", 0.5),
                                                   ("auc", "AUC", 0.5))):
        for ax, setting in zip(axes[row], ("centralized", "federated")):
            lines: dict[tuple, list] = {}
            for e in main:
                if e["setting"] == setting:
                    lines.setdefault((e["lora"], int(e["rank"])), []).append(e)
            for (lora, rank), points in sorted(lines.items()):
                points.sort(key=lambda e: _eps_order(e["target_epsilon"]))
                ax.errorbar([x[p["target_epsilon"]] for p in points], [p[metric][0] for p in points],
                            yerr=[p[metric][1] for p in points], marker="o", capsize=3,
                            linestyle="-" if lora == "vanilla" else "--", label=f"{lora} r={rank}")
            ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance / majority class")
            ax.set_xticks(range(len(epsilons)), [f"ε={e}" if e != "off" else "no DP" for e in epsilons])
            ax.set_title(f"{setting}: {label}")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(f"{label} (mean ± sd over seeds)")
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", nargs="+", default=["1", "2", "4", "8", "off"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--skew-epsilons", nargs="*", default=["8", "off"])
    parser.add_argument("--workers", type=int, default=2, help="cells run in parallel (one torch thread each)")
    parser.add_argument("--base", default=BASE, help="Hydra overrides every cell starts from")
    parser.add_argument("--doc", "--readme", dest="doc", type=Path, default=None,
                        help="rewrite the sweep section of this page (docs/results.md)")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # Flower's per-round logs; the sweep prints one line per cell

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "results.csv"
    base_path = args.out / "base.txt"
    if csv_path.exists() and base_path.exists() and base_path.read_text() != args.base:
        raise SystemExit(f"{csv_path} holds cells run from other base overrides ({base_path}). Fix: pass "
                         "--out to a new folder, or delete the old results to start over")
    base_path.write_text(args.base)
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    done = {cell_key(r) for r in rows}
    todo = [c for c in cells(args) if cell_key(c) not in done]
    print(f"sweep: {len(todo)} runs to do, {len(done)} already in {csv_path}", flush=True)
    started = time.time()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(run_cell, cell, args.base, args.out): cell for cell in todo}
        for i, future in enumerate(as_completed(futures), 1):
            cell, row = futures[future], future.result()
            rows.append(row)
            new = not csv_path.exists()
            with csv_path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow({k: row[k] for k in FIELDS})
            elapsed = time.time() - started
            print(f"[{i}/{len(todo)}] {cell['setting']} {cell['lora']} r={cell['rank']} "
                  f"eps={cell['target_epsilon']} alpha={cell['alpha'] or 'iid'} seed={cell['seed']}: "
                  f"bal_acc={row['balanced_accuracy']} eps_measured={row['epsilon_measured']} "
                  f"({row['seconds']}s, ~{elapsed / i * (len(todo) - i) / 60:.0f} min left)", flush=True)

    wanted = {cell_key(c) for c in cells(args)}
    summary = aggregate([r for r in rows if cell_key(r) in wanted])
    table = markdown(summary)
    (args.out / "results.md").write_text(table)
    plot(summary, args.out / "privacy_utility.png")
    print(table)
    if args.doc is not None:
        command = f"    .venv/bin/python scripts/sweep.py --doc {os.path.relpath(args.doc.resolve(), ROOT)}"
        rel = os.path.relpath(args.out.resolve() / "privacy_utility.png", args.doc.resolve().parent)
        body = (f"Generated by\n\n{command}\n\nwith every cell starting from `{args.base}`.\n\n{table}\n"
                f"![balanced accuracy against epsilon]({rel})\n")
        from fed_dp_lora.experiments.readme import write_section

        write_section(args.doc, "results", body)
        print(f"sweep section rewritten: {args.doc}")


if __name__ == "__main__":
    main()
