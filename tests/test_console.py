"""What a run prints: each Flower log line once, and warnings a user can act on still shown."""

from __future__ import annotations

import os
import subprocess
import sys

# A fresh interpreter: Opacus' handler is installed at import time, which pytest's own logging
# set-up would hide (basicConfig does nothing once the root logger has a handler).
PROGRAM = """
import logging
import opacus  # before our modules, as any caller may import it
import fed_dp_lora.models
from flwr.common.logger import log
log(logging.INFO, "one flower line")
logging.getLogger("fed_dp_lora.client_round").warning("a warning to act on")
"""


def test_each_flower_line_is_printed_once_and_our_warnings_still_show():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert printed.count("one flower line") == 1, printed
    assert printed.count("a warning to act on") == 1, printed
