"""The docs: generated tables match the code and saved results they describe, every link
resolves, and the README stays a front page."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_privacy_doc_tables_are_current():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "docs_tables.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_every_reply_key_and_node_key_is_documented():
    text = (REPO / "docs" / "privacy.md").read_text()
    from fed_dp_lora.node_policy import NODE_KEYS
    from fed_dp_lora.reply import METRICS

    assert all(f"metric `{key}`" in text for key in METRICS)
    assert all(f"`{key}`" in text for key in NODE_KEYS)


# --- The README is a front page, and every link in the docs leads somewhere --------------------

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out = set()
    text, fenced = path.read_text().splitlines(), False
    for line in text:
        if FENCE.match(line):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().replace("`", "").lower())
        slug = title.replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_anchor_slugs_follow_github():
    page = REPO / "docs" / "architecture.md"
    assert "1-the-server-asks-configure_train" in anchors(page)
    assert "where-things-live" in anchors(page)


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for line in prose_lines(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto: (not checked offline)
                    continue
                file_part, _, anchor = target.partition("#")
                path = (page.parent / file_part).resolve() if file_part else page
                if not path.exists():
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nothing) [gone](missing.md)\n```\n[code](x.md)\n```\n")
    targets = [t for line in prose_lines(page) for t in LINK.findall(line)]
    assert targets == ["#title", "#nothing", "missing.md"]
    assert anchors(page) == {"title"}


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 170, f"README.md has {len(lines)} lines: move detail to docs/"


def test_readme_holds_the_command_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()[-1].strip()
    assert ci == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    readme = (REPO / "README.md").read_text()
    assert f"```bash\n{ci}\n```" in readme
    assert "```bash\nbash scripts/setup.sh && bash scripts/simulate.sh\n```" in readme


# Every generated section: the file its generator writes, and the marker names it writes between.
GENERATED = {
    "README.md": ["status"],  # scripts/readme_status.py
    "docs/results.md": ["results", "audit", "audit-release"],  # scripts/sweep.py, scripts/audit_power.py
    "docs/deployment.md": ["round-times"],  # scripts/round_times.py
    "docs/performance.md": ["performance"],  # scripts/readme_performance.py
    "docs/privacy.md": ["allowlist", "node-config", "relation"],  # docs_tables.py, relation_cost.py
    "docs/configuration.md": ["config"],  # the typed configuration's table
}


def test_each_generated_section_lives_in_exactly_one_page():
    texts = {page.relative_to(REPO).as_posix(): page.read_text() for page in PAGES}
    for owner, names in GENERATED.items():
        for name in names:
            for marker in (f"<!-- {name}:begin -->", f"<!-- {name}:end -->"):
                holders = [path for path, text in texts.items() if marker in text]
                assert holders == [owner], f"{marker} is in {holders}, expected only in {owner}"
                assert texts[owner].count(marker) == 1


# --- Sections generated from saved results regenerate identically -------------------------------



def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(page: str, name: str) -> str:
    text = (REPO / page).read_text()
    return text.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_performance_section_is_what_results_perf_gives():
    body = script("readme_performance").render(REPO / "results" / "perf")
    assert section("docs/performance.md", "performance").endswith(body)


def test_release_audit_section_is_what_its_saved_records_give():
    audit_power = script("audit_power")
    records = json.loads((REPO / "results" / "audit" / "release.json").read_text())
    rows = [audit_power.release_row(r) for r in records]
    table = "\n".join([*audit_power.RELEASE_HEADER, *rows]) + "\n"
    assert section("docs/results.md", "audit-release").endswith(table)


def test_sweep_section_is_what_results_csv_gives():
    sweep, table = script("sweep"), script("sweep_table")
    grid = argparse.Namespace(tasks=["credit", "reviews"], seeds=3, epsilons=["1", "4", "8", "off"],
                              skew_epsilons=["8", "off"], groups=list(sweep.GROUPS), lora_epsilons=["8", "off"],
                              lora_seeds=1, base=sweep.BASE, out=REPO / "results" / "sweep")  # sweep.py's defaults
    rows = list(csv.DictReader((REPO / "results" / "sweep" / "results.csv").open()))
    done = {sweep.cell_key(r) for r in rows}
    missing = [f"{c['group']} {c['task']} {c['recipe']} {c['lora']} ε={c['target_epsilon']} seed {c['seed']}"
               .replace("  ", " ") for c in sweep.cells(grid) if sweep.cell_key(c) not in done]
    assert rows and section("docs/results.md", "results") == table.body(rows, grid, missing) + "\n"


def test_every_configuration_key_is_documented():
    text = (REPO / "docs" / "configuration.md").read_text()
    from fed_dp_lora.config.keys import walk

    keys = [spec.key for spec in walk()]
    assert len(keys) > 80 and "strategy.beta" in keys and "audit.release.guesses" in keys
    assert all(f"| `{key}` |" in text for key in keys)
