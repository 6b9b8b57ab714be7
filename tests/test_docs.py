"""Generated documentation stays generated: the tables in docs/ match the code they describe."""

from __future__ import annotations

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
