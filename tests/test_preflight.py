"""The institution's own check of its file, before its SuperNode joins."""

from __future__ import annotations

import pandas as pd

from fed_dp_lora.preflight import main


def test_a_file_without_an_allowed_feature_column_is_named_with_the_fix(tmp_path, capsys):
    path = tmp_path / "bank.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["good", "bad"], "Age": [30, 40]}).to_csv(path, index=False)
    base = ["--data", str(path), "--records", "2", "--labels", "good,bad"]
    assert main([*base, "--feature-columns", "Age,Income"]) == 1
    err = capsys.readouterr().err
    assert "no column(s) ['Income'] that --feature-columns allows" in err and "Fix:" in err
    assert main([*base, "--feature-columns", "Age"]) == 0
    assert "2 usable records" in capsys.readouterr().out


def test_the_file_is_read_once(tmp_path, monkeypatch, capsys):
    """An institution's file may be large: the column check and the count share one read."""
    from fed_dp_lora import preflight

    path = tmp_path / "bank.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["good", "bad", "good"], "Age": [30, 40, 50]}).to_csv(
        path, index=False
    )
    reads = []
    read = preflight.read_file
    monkeypatch.setattr(preflight, "read_file", lambda p: reads.append(p) or read(p))
    args = ["--data", str(path), "--records", "3", "--labels", "good,bad", "--feature-columns", "Age"]
    assert main(args) == 0
    assert "3 usable records" in capsys.readouterr().out
    assert reads == [str(path)]
