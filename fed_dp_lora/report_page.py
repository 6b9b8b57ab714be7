"""A run's report for people: report.md with PNG plots, and report.html with the plots inlined.

Generated from summary.json alone (never written by hand), so it can be rebuilt for any
finished run: `python -m fed_dp_lora.report_page <output-dir>`.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fed_dp_lora.files import write_atomic  # noqa: E402

SHOWN_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auc", "loss", "perplexity")


def fmt(value: Any) -> str:
    """A cell's text (plain: the HTML writers escape it)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _round_axis(ax: Axes) -> None:
    """Rounds are whole numbers: no tick at round 1.25."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


def metrics_figure(summary: dict[str, Any]) -> Figure:
    """Each central metric per round, and the majority-class baseline of each (dashed)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = [r for r in summary["rounds"] if "metrics" in r]
    baseline = summary.get("final", {}).get("majority_baseline") or {}
    for key in SHOWN_METRICS:
        points = [(r["round"], r["metrics"][key]) for r in done if key in r["metrics"]]
        if points:
            (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=key)
            if key in baseline:
                ax.axhline(baseline[key], color=line.get_color(), linestyle="--", linewidth=1)
    if baseline:
        ax.plot([], [], color="grey", linestyle="--", linewidth=1, label="majority-class baseline")
    _round_axis(ax)
    ax.set_title("Central evaluation of the global adapter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def epsilon_figure(summary: dict[str, Any]) -> Figure:
    rounds = summary["rounds"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    clients = sorted({c for r in rounds for c in r.get("epsilon", {})})
    for client in clients:
        points = [(r["round"], float(r["epsilon"][client])) for r in rounds if client in r.get("epsilon", {})]
        ax.plot(*zip(*points, strict=True), marker="o", label=client)
    _round_axis(ax)
    ax.set_ylabel("epsilon (record level)")
    ax.set_title("Each client's epsilon after the round")
    ax.grid(alpha=0.3)
    if clients:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "privacy off", ha="center", va="center", transform=ax.transAxes)
    return fig


def bytes_figure(summary: dict[str, Any]) -> Figure:
    rounds = summary["rounds"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["round"] for r in rounds]
    width = 0.4
    ax.bar([i - width / 2 for i in x], [r["bytes"]["up"] / 1e6 for r in rounds], width, label="up")
    ax.bar([i + width / 2 for i in x], [r["bytes"]["down"] / 1e6 for r in rounds], width, label="down")
    _round_axis(ax)
    ax.set_ylabel("MB")
    ax.set_title("Bytes on the wire per round")
    ax.legend(fontsize=8)
    return fig


def summary_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables shared by the Markdown and HTML reports."""
    rounds = summary["rounds"]
    metric_keys = [k for k in SHOWN_METRICS if any(k in r.get("metrics", {}) for r in rounds)]
    per_round = [
        [str(r["round"])]
        + [fmt(r.get("metrics", {}).get(k, "")) for k in metric_keys]
        + [
            fmt(max(map(float, r["epsilon"].values()))) if r.get("epsilon") else "-",
            str(len(r["clients"])),
            str(len(r["failures"])),
            f"{r['bytes']['up'] / 1e6:.2f}",
            f"{r['bytes']['down'] / 1e6:.2f}",
        ]
        for r in rounds
    ]
    privacy = summary["privacy"]
    clients = sorted({c for r in rounds for c in r["clients"]} | {c for r in rounds for c in r["failures"]})
    participation = [
        [
            c,
            str(sum(c in r["clients"] for r in rounds)),
            fmt(privacy["epsilon"].get(c, "-")),
            "; ".join(f"round {r['round']}: {r['failures'][c]}" for r in rounds if c in r["failures"]) or "-",
        ]
        for c in clients
    ]
    tables = [
        ("Rounds", ["round", *metric_keys, "max client epsilon", "clients", "failed", "up MB", "down MB"], per_round),
        ("Clients", ["client", "rounds trained", "epsilon", "failures"], participation),
    ]
    audit_table = _audit_table(privacy.get("audit") or {})
    if audit_table is not None:
        tables.append(audit_table)
    return tables


def _audit_table(audit: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    """The final-model audit and the release audit, each a row, if the run had either."""
    audits = [("final global adapter, input canaries", audit)] if "epsilon_lower" in audit else []
    if audit.get("release"):
        audits.append((f"{audit['release']['client']}'s releases, gradient canaries", audit["release"]))
    if not audits:
        return None
    header = ["audited", "epsilon lower bound", "claimed epsilon", "canaries", "guesses", "correct", "confidence"]
    rows = [
        [
            what,
            fmt(a["epsilon_lower"]),
            fmt(a["claimed_epsilon"] if a["claimed_epsilon"] is not None else "privacy off"),
            str(a["canaries"]),
            str(a["guesses"]),
            str(a["correct"]),
            fmt(a["confidence"]),
        ]
        for what, a in audits
    ]
    return "Privacy audit", header, rows


def headline(summary: dict[str, Any]) -> list[str]:
    privacy = summary["privacy"]
    eps = [float(e) for e in privacy["epsilon"].values()]
    lines = [
        f"Rounds: {len(summary['rounds'])}",
        "Privacy: "
        + (
            "off"
            if not privacy["enabled"]
            else f"on, record-level, budget {privacy['budget']}, "
            + (f"max client epsilon {max(eps):.4g}" if eps else "no client epsilon reported yet")
            + f" ({privacy['accountant']})"
        ),
        f"Unit: {privacy['unit']}",
    ]
    final = {k: v for k, v in summary["final"].items() if k != "majority_baseline"}
    if final:
        lines.append("Final: " + ", ".join(f"{k} {fmt(v)}" for k, v in final.items()))
    if "majority_baseline" in summary["final"]:
        base = summary["final"]["majority_baseline"]
        lines.append("Majority-class baseline: " + ", ".join(f"{k} {fmt(v)}" for k, v in base.items()))
    return lines


PLOTS = (("metrics.png", metrics_figure), ("epsilon.png", epsilon_figure), ("bytes.png", bytes_figure))


def write_report(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """report.md (+ report-*.png) and a self-contained report.html in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name, figure in PLOTS:
        path = out_dir / f"report-{name}"
        _save(figure(summary), path)
        images.append(path)
    tables = summary_tables(summary)
    md = ["# fed-dp-lora run report", "", *[f"- {line}" for line in headline(summary)], ""]
    for title, header, rows in tables:
        md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    md_path = out_dir / "report.md"
    write_atomic(md_path, "\n".join(md).encode())

    body = ["<h1>fed-dp-lora run report</h1>", "<ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in headline(summary)] + ["</ul>"]
    for title, header, rows in tables:
        body.append(
            f"<h2>{html.escape(title)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
        )
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        body.append("</table>")
    body.append("<h2>Plots</h2>")
    for p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<img alt="{p.stem}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #bbb;padding:3px 8px}"
    )
    html_path = out_dir / "report.html"
    write_atomic(
        html_path,
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>fed-dp-lora run report"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
        ).encode(),
    )
    return md_path, html_path


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    for written in write_report(json.loads((folder / "summary.json").read_text()), folder):
        print(written)
