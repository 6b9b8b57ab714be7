"""The per-run report: generated from summary.json, readable, with the plots really drawn."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from fed_dp_lora.report_page import bytes_figure, epsilon_figure, metrics_figure, write_report


def summary() -> dict:
    rounds = [
        {"round": 1, "clients": {"client-0": {"epsilon": 3.1}, "client-1": {"epsilon": 3.2}},
         "failures": {}, "bytes": {"up": 2_000_000, "down": 2_000_000},
         "epsilon": {"client-0": 3.1, "client-1": 3.2},
         "metrics": {"balanced_accuracy": 0.61, "accuracy": 0.7, "macro_f1": 0.6, "auc": 0.68}},
        {"round": 2, "clients": {"client-0": {"epsilon": 4.4}},
         "failures": {"client-1": "error (code 100): privacy budget exhausted"},
         "bytes": {"up": 1_000_000, "down": 2_000_000}, "epsilon": {"client-0": 4.4},
         "metrics": {"balanced_accuracy": 0.655, "accuracy": 0.72, "macro_f1": 0.64, "auc": 0.7}},
    ]
    return {
        "rounds": rounds,
        "final": {**rounds[-1]["metrics"], "majority_baseline": {"balanced_accuracy": 0.5}},
        "privacy": {"enabled": True, "unit": "record", "accountant": "RDP", "budget": 8.0,
                    "epsilon": {"client-0": 4.4, "client-1": 3.2},
                    "audit": {"epsilon_lower": 0.125, "claimed_epsilon": 4.4, "canaries": 500, "guesses": 100,
                              "correct": 57, "confidence": 0.95}},
    }


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings, self.cells, self.images, self._tag = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._tag in ("h1", "h2"):
            self.headings.append(data)
        elif self._tag in ("td", "th"):
            self.cells.append(data)

    def handle_endtag(self, tag):
        self._tag = None


def test_html_report_holds_rounds_clients_audit_and_drawn_plots(tmp_path):
    md_path, html_path = write_report(summary(), tmp_path)
    page = Page()
    page.feed(html_path.read_text())
    assert page.headings == ["fed-dp-lora run report", "Rounds", "Clients", "Privacy audit", "Plots"]
    assert {"0.655", "4.4", "0.125", "57", "500"} <= set(page.cells)
    assert "round 2: error (code 100): privacy budget exhausted" in page.cells  # why client-1 stopped
    assert len(page.images) == 3
    for src in page.images:
        assert src.startswith("data:image/png;base64,")  # self-contained: opens without the PNG files
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
        assert image.shape == (350, 600, 3)
        # Really drawn: coloured line/bar pixels, not a blank canvas.
        coloured = (image.max(axis=2).astype(int) - image.min(axis=2)) > 60
        assert coloured.mean() > 0.002


def test_markdown_report_links_existing_pngs(tmp_path):
    md_path, _ = write_report(summary(), tmp_path)
    text = md_path.read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(links) == 3 and all((tmp_path / link).stat().st_size > 1000 for link in links)
    assert "| 2 | 0.655 |" in text
    assert "| 0.125 | 4.4 | 500 | 100 | 57 | 0.95 |" in text


def test_privacy_off_report_says_so(tmp_path):
    s = summary()
    s["privacy"].update(enabled=False, epsilon={}, audit=None)
    for r in s["rounds"]:
        r["epsilon"] = {}
    _, html_path = write_report(s, tmp_path)
    text = html_path.read_text()
    assert "Privacy: off" in text and "Privacy audit" not in text


def test_round_axes_tick_whole_rounds_only(tmp_path):
    """Two rounds used to get ticks at 1.2, 1.4, ...: a round 1.25 does not exist."""
    for figure in (metrics_figure, epsilon_figure, bytes_figure):
        fig = figure(summary())
        fig.canvas.draw()
        ax = fig.axes[0]
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown == [1.0, 2.0], (figure.__name__, shown)


def test_metrics_plot_draws_each_majority_baseline_in_its_metrics_colour():
    s = summary()
    s["final"]["majority_baseline"] = {"balanced_accuracy": 0.5, "accuracy": 0.718}
    ax = metrics_figure(s).axes[0]
    curves = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    flat = [line for line in ax.lines if len(line.get_ydata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]]
    assert {(float(line.get_ydata()[0]), line.get_color()) for line in flat} == {
        (0.5, curves["balanced_accuracy"].get_color()), (0.718, curves["accuracy"].get_color())}
    assert all(line.get_linestyle() == "--" for line in flat)
    assert "majority-class baseline" in [t.get_text() for t in ax.get_legend().get_texts()]

    s["final"].pop("majority_baseline")  # a causal LM has none: nothing drawn, nothing named
    ax = metrics_figure(s).axes[0]
    assert all(len(set(line.get_ydata())) > 1 for line in ax.lines if len(line.get_ydata()))
    assert "majority-class baseline" not in [t.get_text() for t in ax.get_legend().get_texts()]


def test_release_audit_gets_its_own_row_beside_the_input_audit_or_alone(tmp_path):
    s = summary()
    release = {"client": "client-0", "epsilon_lower": 0.43, "claimed_epsilon": 2.0, "canaries": 1000,
               "guesses": 200, "correct": 133, "confidence": 0.95}
    s["privacy"]["audit"]["release"] = release
    text = write_report(s, tmp_path / "both")[0].read_text()
    assert "| final global adapter, input canaries | 0.125 | 4.4 | 500 | 100 | 57 | 0.95 |" in text
    assert "| client-0's releases, gradient canaries | 0.43 | 2 | 1000 | 200 | 133 | 0.95 |" in text
    s["privacy"]["audit"] = {"release": {**release, "claimed_epsilon": None}}
    text = write_report(s, tmp_path / "alone")[0].read_text()
    assert "| client-0's releases, gradient canaries | 0.43 | privacy off | 1000 | 200 | 133 | 0.95 |" in text
    assert "input canaries" not in text
