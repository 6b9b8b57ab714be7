"""The live dashboard, in headless Chromium: it shows what summary.json says and follows it by itself.

The summary is written by the ServerApp's own RunReport, round by round, as in a run. The page is
served by `python -m fed_dp_lora.dashboard` (a subprocess on 127.0.0.1, stopped by PID) and read
by Debian's chromium through chromium-driver (selenium), never by fetching the HTML directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fed_dp_lora.dashboard import render
from fed_dp_lora.report import RunReport

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CONFIG = {"rounds": 3, "privacy": {"enabled": True, "accountant": "rdp", "epsilon": 8.0, "clip_norm": 1.0}}
ODD_NAME = 'bank <b>"c"</b>'  # names come from the operator's registration: shown as text, never as HTML


def client(eps: float) -> dict[str, float]:
    return {"epsilon": eps, "delta": 1e-5, "noise-multiplier": 1.1, "sample-rate": 0.01, "steps-total": 10.0}


def play_round(report: RunReport, r: int) -> None:
    """What the ServerApp records for round r: two institutions train, a third fails."""
    report.record_train(r, {"institution-0": client(2.5 * r), "institution-1": client(2.0 * r)},
                        {ODD_NAME: "error (code 103): app bundle refused"}, 300_000, 900_000)
    report.record_eval(r, {"balanced_accuracy": 0.55 + 0.02 * r, "accuracy": 0.7, "auc": 0.6 + 0.01 * r})
    report.write()


@pytest.fixture
def report(tmp_path) -> RunReport:
    report = RunReport(tmp_path / "run", CONFIG)
    report.majority_baseline = {"balanced_accuracy": 0.5, "accuracy": 0.718}
    play_round(report, 1)
    return report


def test_the_page_escapes_names_and_says_when_nothing_ran_yet(report, tmp_path):
    page = render(json.loads((report.out_dir / "summary.json").read_text()), report.out_dir, 5)
    assert "<b>" not in page and "bank &lt;b&gt;" in page
    assert "Latest round: balanced_accuracy 0.57" in page and "Final:" not in page  # the run goes on
    assert "Waiting for the first round" in render(None, tmp_path, 5)
    started = RunReport(tmp_path / "started", CONFIG)
    started.write()  # what the ServerApp writes before its first round
    page = render(json.loads((started.out_dir / "summary.json").read_text()), started.out_dir, 5)
    assert "Started: no round of 3 finished yet" in page and "no client epsilon reported yet" in page


@pytest.fixture
def dashboard(report):
    proc = subprocess.Popen([sys.executable, "-m", "fed_dp_lora.dashboard", str(report.out_dir), "--refresh", "2"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, line
    yield line.split()[3]
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1100,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


STATE_JS = """
const bars = {};
for (const b of document.querySelectorAll('.bar'))
  bars[b.dataset.institution] = [parseFloat(b.dataset.epsilon), parseFloat(b.dataset.budget), b.textContent];
const tables = {};
for (const t of document.querySelectorAll('h2 + table'))
  tables[t.previousElementSibling.textContent] = [...t.querySelectorAll('tr')].slice(1)
    .map(r => [...r.querySelectorAll('td')].map(c => c.textContent));
return {status: document.getElementById('status').textContent, bars: bars, tables: tables};
"""


def page_state(driver) -> dict:
    """What the browser shows (status, epsilon bars, table rows by heading), read in one go: the
    page reloads itself, so element handles would go stale between reads."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def read(d):
        try:
            state = d.execute_script(STATE_JS)
        except WebDriverException:  # caught mid-reload
            return None
        state["bars"] = {k: tuple(v) for k, v in state["bars"].items()}
        return state

    return WebDriverWait(driver, 20).until(read)


def test_the_page_shows_summary_json_and_follows_it_round_by_round(report, dashboard, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(dashboard)
    for r in (1, 2):
        summary = json.loads((report.out_dir / "summary.json").read_text())
        shown = page_state(browser)
        assert shown["status"] == f"Running: round {r} of 3 done"
        assert shown["bars"] == {name: (eps, 8.0, f"{eps:.4g} / 8") for name, eps in summary["privacy"]["epsilon"].items()}
        rounds = shown["tables"]["Rounds"]
        assert [row[0] for row in rounds] == [str(x["round"]) for x in summary["rounds"]] + ["majority-class baseline"]
        assert rounds[-1][1] == "0.5"  # the baseline's balanced accuracy, in the balanced_accuracy column
        clients = {row[0]: row for row in shown["tables"]["Clients"]}
        assert clients[ODD_NAME][1] == "0" and "app bundle refused" in clients[ODD_NAME][3]
        assert clients["institution-0"][1] == str(r)
        browser.save_screenshot(str(tmp_path / f"dashboard-round-{r}.png"))
        if r == 1:
            play_round(report, 2)  # the ServerApp finishes round 2: the open page must follow by itself
            WebDriverWait(browser, 30).until(lambda d: "round 2 of 3" in page_state(d)["status"])
    assert (tmp_path / "dashboard-round-2.png").stat().st_size > 10_000
