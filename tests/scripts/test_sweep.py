"""scripts/sweep.py: the grid it runs, and the results page it generates from results.csv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(SCRIPTS))
    import sweep as module
    import sweep_table

    yield module, sweep_table
    sys.path.remove(str(SCRIPTS))


def args(**kw):
    base = dict(tasks=["credit", "reviews"], seeds=3, epsilons=["1", "4", "8", "off"], skew_epsilons=["8", "off"],
                groups=["federated", "centralized", "skew", "lora", "baseline"], lora_epsilons=["8", "off"],
                lora_seeds=1, base="BASE", out=Path("."))
    return argparse.Namespace(**{**base, **kw})


def test_the_grid_is_the_issue_grid(sweep):
    module, _ = sweep
    cells = module.cells(args())
    by_group = {g: [c for c in cells if c["group"] == g] for g in module.GROUPS}
    assert len(by_group["federated"]) == len(by_group["centralized"]) == 2 * 3 * 4
    assert len(by_group["skew"]) == 2 * 3 * 2 and len(by_group["baseline"]) == 2 * 3
    assert len(by_group["lora"]) == 2 * 2 * 2  # tasks x epsilons x {vanilla, ffa}
    assert len({module.cell_key(c) for c in cells}) == len(cells)
    assert {c["clients"] for c in by_group["centralized"]} == {1}
    assert cells[-1]["group"] == "lora"  # the slow rows last
    skew = module.overrides(by_group["skew"][0], "BASE")
    assert "data.partitioner=dirichlet data.dirichlet_alpha=0.5" in skew and "data=credit" in skew
    lora = module.overrides(by_group["lora"][1], "BASE")
    assert "recipe=lora lora=ffa" in lora
    # a baseline cell writes one row per baseline; its key still matches the cell
    row = {**by_group["baseline"][0], "lora": "LR"}
    assert module.cell_key(row) == module.cell_key(by_group["baseline"][0])


def _row(eps, seed, bal, group="federated", task="credit", lora="", recipe="linear-probe"):
    return dict(group=group, task=task, clients=3, target_epsilon=eps, recipe=recipe, lora=lora, partitioner="iid",
                alpha="", seed=seed, epsilon_measured="off" if eps == "off" else f"{float(eps) - 0.01 * seed:.4f}",
                balanced_accuracy=str(bal), accuracy="0.7", macro_f1="0.6", auc=str(bal + 0.1), seconds="1")


def test_the_page_is_rewritten_between_its_markers_only(sweep, tmp_path):
    _, table = sweep
    rows = [_row("8", 0, 0.60), _row("8", 1, 0.64), _row("off", 0, 0.70), _row("off", 1, 0.70),
            _row("off", 0, 0.75, group="baseline", lora="LR", recipe="sklearn")]
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nkept above\n<!-- results:begin -->\nold\n<!-- results:end -->\nkept below\n")
    a = args(out=tmp_path, docs=page)
    table.write_results(rows, a, a)
    text = page.read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.endswith("kept below\n") and "\nold\n" not in text


def test_the_table_cells_and_verdicts(sweep, tmp_path):
    _, table = sweep
    rows = [_row("8", 0, 0.60), _row("8", 1, 0.64), _row("off", 0, 0.70), _row("off", 1, 0.70),
            _row("off", 0, 0.75, group="baseline", lora="LR", recipe="sklearn")]
    a = args(out=tmp_path, docs=tmp_path / "r.md")
    table.write_results(rows, a, a)
    text = (tmp_path / "r.md").read_text()
    # mean 0.62, sample sd 0.028 over two seeds; AUC = bal + 0.1
    assert "| federated, 3 clients (the default run) | – | – | 0.620 ± 0.028 / 0.720 ± 0.028 (2 seeds)" in text
    assert ("credit, ε = 8, against the non-private LR: balanced accuracy -13.0 points, AUC -13.0 points: "
            "we lose on balanced accuracy and AUC.") in text
    assert "credit ε = 8 balanced accuracy >= 0.72: 0.620, NOT met." in text
    assert "Largest epsilon any client's ledger reported in these cells: 8.000" in text
    assert "Not run yet" in text and "reviews" in text.split("Not run yet")[1]
    assert "chosen on validation splits" in text
    assert (tmp_path / "privacy_utility.png").stat().st_size > 10_000


def _peer(eps, seed, bal, task="credit", variant="dp", measured=None):
    return dict(group="peer", task=task, target_epsilon=eps, variant=variant, seed=seed, records=100, max_length=64,
                delta="0.001", noise_multiplier="1.0", steps=39, epsilon_measured=f"{measured or float(eps):.4f}",
                balanced_accuracy=str(bal), accuracy="0.7", macro_f1="0.6", auc=str(bal + 0.1), seconds="1")


def _write_peer(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_peer_row_and_its_verdicts(sweep, tmp_path):
    _, table = sweep
    rows = [_row("8", 0, 0.60), _row("8", 1, 0.64), _row("1", 0, 0.50), _row("4", 0, 0.55),
            _row("8", 0, 0.55, group="textonly")]
    # The as-shipped row (not DP) must not reach the table; a missing peer epsilon gives no verdict.
    _write_peer(tmp_path / "peer.csv", [_peer("8", 0, 0.50, measured=8.3327), _peer("8", 1, 0.54, measured=8.31),
                                        _peer("1", 0, 0.55), _peer("8", 0, 0.99, variant="as-shipped")])
    a = args(out=tmp_path, docs=tmp_path / "r.md")
    table.write_results(rows, a, a)
    text = (tmp_path / "r.md").read_text()
    peer_line = next(line for line in text.splitlines() if line.startswith("| peer: dp-lora 0.1.0"))
    # ε = 1 one seed, ε = 4 not run, ε = 8 two seeds (mean 0.52, sd 0.028), the largest measured epsilon
    assert peer_line == ("| peer: dp-lora 0.1.0 (centralized DP LoRA, its documented recipe) | 0.550 ± 0.000 / 0.650 ± "
                         "0.000 (1 seed); measured ε 1.00 | – | 0.520 ± 0.028 / 0.620 ± 0.028 (2 seeds); measured ε "
                         "8.33 | – |")
    assert ("- credit, ε = 8, our federated default against dp-lora trained centrally on the same records "
            "(2 peer seeds, its accountant's ε 8.33, our ledgers' at most 8.00): balanced accuracy +10.0 points, "
            "AUC +10.0 points: we win on both.") in text
    assert ("- credit, ε = 1, our federated default against dp-lora trained centrally on the same records "
            "(1 peer seed, its accountant's ε 1.00, our ledgers' at most 1.00): balanced accuracy -5.0 points, "
            "AUC -5.0 points: we lose on balanced accuracy and AUC."
            ) in text
    assert ("- credit, ε = 8, our text-only federated run against dp-lora trained centrally on the same records "
            "(2 peer seeds, its accountant's ε 8.33, our ledgers' at most 8.00): balanced accuracy +3.0 points, "
            "AUC +3.0 points: we win on both.") in text
    assert "ε = 4, our federated default against dp-lora" not in text
    # the peer's epsilon is its own accountant's, not a client's ledger
    assert "Largest epsilon any client's ledger reported in these cells: 8.000" in text
    assert "Not in this grid: more than one seed" in text and "`dp-lora` package at the same ε" not in text
    assert "The peer row (`scripts/sweep_peer.py`" in text


def test_without_peer_rows_the_page_says_the_peer_is_missing(sweep, tmp_path):
    _, table = sweep
    a = args(out=tmp_path, docs=tmp_path / "r.md")
    table.write_results([_row("8", 0, 0.60)], a, a)
    text = (tmp_path / "r.md").read_text()
    assert "Not in this grid: the `dp-lora` package at the same ε" in text and "| peer: dp-lora" not in text


def test_mixed_verdicts_say_which_metric_wins(sweep):
    _, table = sweep
    assert table._verdict(1.0, -0.5) == "we win on balanced accuracy and lose on AUC"
    assert table._verdict(-1.0, 0.5) == "we win on AUC and lose on balanced accuracy"
    assert table._verdict(0.04, -0.04) == "we match or beat it"  # both print as 0.0 points


def test_a_baseline_difference_that_prints_as_zero_is_no_loss(sweep):
    _, table = sweep
    ours = {"balanced_accuracy": (0.7496, 0.0), "auc": (0.80, 0.0), "seeds": 3, "eps": 8.0}
    base = {"balanced_accuracy": (0.75, 0.0), "auc": (0.79, 0.0), "seeds": 3, "eps": None}
    agg = {("federated", "credit", "8", "linear-probe", ""): ours, ("baseline", "credit", "off", "sklearn", "LR"): base}
    assert ("- credit, ε = 8, against the non-private LR: balanced accuracy -0.0 points, AUC +1.0 points: "
            "we match or beat it.") in table.verdicts(agg, "credit")


def test_rows_are_appended_under_one_header(sweep, tmp_path):
    import csv

    module, _ = sweep
    path = tmp_path / "results.csv"
    module.append_rows(path, [{**_row("8", 0, 0.6), "extra": "dropped"}])
    module.append_rows(path, [_row("8", 1, 0.64), _row("off", 0, 0.7)])
    read = list(csv.DictReader(path.open()))
    assert [r["seed"] for r in read] == ["0", "1", "0"] and list(read[0]) == module.FIELDS
