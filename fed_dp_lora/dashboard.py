"""A live page for one run, rebuilt from its summary.json at every request.

    .venv/bin/python -m fed_dp_lora.dashboard OUTPUT_DIR [--port 0] [--refresh 5]

The ServerApp rewrites OUTPUT_DIR/summary.json after every round (atomically), so the page is
always the run as it stands: the round it is at, each round's metrics beside the majority-class
baseline, each institution's epsilon against the run's budget, who trained and who failed and
why, bytes on the wire, and the privacy audit once the run has one. It reloads itself every
--refresh seconds. Serves only that page and the summary itself (/summary.json), on 127.0.0.1
only; port 0 takes a free port. Prints its address and PID; stop it with `kill PID`.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fed_dp_lora.report_page import fmt, headline, summary_tables

STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:1.5em auto;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child,.clients td:last-child{text-align:left}"
    "tr.baseline td{font-style:italic;background:#f4f4f4}"
    ".bars{display:grid;grid-template-columns:max-content 1fr max-content;gap:6px 12px;align-items:center}"
    ".track{background:#eee;height:18px;position:relative;border:1px solid #ccc}"
    ".fill{background:#3b7dd8;height:100%}.fill.over{background:#c0392b}"
    "#status{font-size:1.2em;font-weight:bold}.muted{color:#666}"
)


def status(summary: dict[str, Any]) -> str:
    """Where the run is: round N of M, finished, or stopped and why."""
    total = int(summary["config"]["rounds"])
    done = max((int(r["round"]) for r in summary["rounds"]), default=0)
    stopped = summary["run"].get("stopped")
    if stopped:
        return f"Stopped after round {done} of {total}: {stopped}"
    if done >= total and summary["final"]:
        return f"Finished: {done} of {total} rounds"
    if done == 0:
        return f"Started: no round of {total} finished yet"
    return f"Running: round {done} of {total} done"


def _headline(summary: dict[str, Any], finished: bool) -> list[str]:
    """The report's headline; before the end its "Final" metrics are the latest round's."""
    lines = headline(summary)
    return lines if finished else [line.replace("Final: ", "Latest round: ", 1) for line in lines]


def epsilon_bars(summary: dict[str, Any]) -> str:
    """One bar per institution: its epsilon so far as a share of the run's budget."""
    privacy = summary["privacy"]
    if not privacy["enabled"]:
        return "<p>Privacy: off</p>"
    budget = privacy.get("budget")
    rows = []
    for name, eps in sorted(privacy["epsilon"].items()):
        value = float(eps)
        share = min(value / float(budget), 1.0) if budget else 1.0
        over = " over" if budget and value > float(budget) else ""
        rows.append(
            f"<span>{html.escape(name)}</span>"
            f'<div class="track"><div class="fill{over}" style="width:{100 * share:.1f}%"></div></div>'
            f'<span class="bar" data-institution="{html.escape(name, quote=True)}" data-epsilon="{value}" '
            f'data-budget="{budget}">{fmt(value)} / {fmt(budget)}</span>'
        )
    return f'<div class="bars">{"".join(rows)}</div>' if rows else "<p class='muted'>No epsilon reported yet.</p>"


def _table(title: str, header: list[str], rows: list[list[str]], extra: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    table_class = html.escape(title.split()[0].lower())
    return f"<h2>{html.escape(title)}</h2><table class='{table_class}'><tr>{head}</tr>{body}{extra}</table>"


def _baseline_row(summary: dict[str, Any], header: list[str]) -> str:
    base = summary["final"].get("majority_baseline") or {}
    if not base:
        return ""
    cells = ["majority-class baseline"] + [fmt(base[h]) if h in base else "" for h in header[1:]]
    return '<tr class="baseline">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def render(summary: dict[str, Any] | None, out_dir: Path, refresh: int) -> str:
    """The whole page for the summary as it is now (None: no round finished yet)."""
    meta = f'<meta http-equiv="refresh" content="{refresh}">'
    title = f"fed-dp-lora: {html.escape(out_dir.name)}"
    if summary is None:
        body = (
            f"<h1>{title}</h1><p id='status'>Waiting for the first round (no summary.json in "
            f"{html.escape(str(out_dir))} yet)</p>"
        )
    else:
        state = status(summary)
        lines = _headline(summary, state.startswith("Finished"))
        parts = [
            f"<h1>{title}</h1>",
            f"<p id='status'>{html.escape(state)}</p>",
            "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>",
            "<h2>Epsilon per institution (against the run's budget)</h2>",
            epsilon_bars(summary),
        ]
        for name, header, rows in summary_tables(summary):
            extra = _baseline_row(summary, header) if name == "Rounds" else ""
            parts.append(_table(name, header, rows, extra))
        comm = summary["communication"]
        parts.append(f"<p>Bytes on the wire in all: up {comm['up'] / 1e6:.2f} MB, down {comm['down'] / 1e6:.2f} MB</p>")
        body = "".join(parts)
    stamp = time.strftime("%H:%M:%S")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{title}</title><style>{STYLE}</style>"
        f"</head><body>{body}<p class='muted'>Page built {stamp}; reloads every {refresh} s.</p></body></html>"
    )


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Handler(BaseHTTPRequestHandler):
    """GET / (the page) and GET /summary.json; nothing else is served."""

    def __init__(self, *args, out_dir: Path, refresh: int, **kwargs) -> None:
        self.out_dir, self.refresh = out_dir, refresh
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, "text/html; charset=utf-8", render(read_summary(self.out_dir), self.out_dir, self.refresh))
        elif path == "/summary.json" and (self.out_dir / "summary.json").is_file():
            self._send(200, "application/json", (self.out_dir / "summary.json").read_text())
        else:
            self._send(404, "text/plain; charset=utf-8", "not found\n")

    def _send(self, code: int, kind: str, text: str) -> None:
        data = text.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Quiet: a reloading page would log a line every few seconds."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fed_dp_lora.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="the run's output-dir (where summary.json is written)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--refresh", type=int, default=5, help="seconds between the page's reloads")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"error: output dir {args.output_dir} does not exist (give the run's output-dir)", file=sys.stderr)
        return 2
    out_dir = args.output_dir.resolve()
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port), partial(Handler, out_dir=out_dir, refresh=max(1, args.refresh))
    )
    print(
        f"Dashboard for {out_dir}: http://127.0.0.1:{server.server_port}/ (pid {os.getpid()}; stop: kill "
        f"{os.getpid()})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
