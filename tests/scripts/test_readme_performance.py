"""scripts/readme_performance.py: tables come from the benchmarks' last key=value line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "readme_performance.py"
spec = importlib.util.spec_from_file_location("readme_performance", SCRIPT)
readme_performance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_performance)


def test_rows_per_setting_and_one_line_per_other_benchmark(tmp_path):
    (tmp_path / "dp-step-ffa.txt").write_text(
        "noise\nmodel minilm lora=ffa quantization=8 layers=6 batch=16x64 clip=1.0\n| a=b table |\n"
        "nodp          981.5      1043    1.000\ndp_vs_nodp_time=1.01 dp_vs_nodp_mem=1.00\n")
    (tmp_path / "dp-step-vanilla.txt").write_text("dp_vs_nodp_time=0.99 opacus_vs_nodp_time=1.05\n")
    (tmp_path / "scale.txt").write_text("| round | s |\n|---|---|\n| 1 | 12.5 |\nclients=100 round_s=12.5\n")
    body = readme_performance.render(tmp_path)
    assert "| ffa | minilm (6 layers), ffa, 8-bit | 16x64 | 981.5 | 1.01 | 1.00 | n/a |" in body
    assert "| vanilla | n/a | n/a | n/a | 0.99 | n/a | 1.05 |" in body
    assert body.index("| ffa |") < body.index("| vanilla |")
    assert "`scale`: clients = 100, round_s = 12.5\n\n| round | s |\n|---|---|\n| 1 | 12.5 |" in body
