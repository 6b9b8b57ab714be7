"""What a run prints: each Flower log line once, and no library notice a user cannot act on.

Two libraries print on every client of every round:
- Opacus calls `logging.basicConfig` when imported (opacus/utils/module_utils.py), which gives
  the root logger a timestamped stderr handler. Flower's logger has its own coloured handler
  and propagates to the root, so every Flower line came out twice.
- transformers reports the classification head as MISSING from the checkpoint (it always is:
  we add it and start it at zero), draws a progress bar for a sub-second load, and PEFT trips
  a FutureWarning inside transformers (`is_gradient_checkpointing`, from get_peft_model).
What the user can act on stays: models.load_base warns itself about base weights missing from a
checkpoint, and every other warning and log line passes as before.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from transformers.utils import logging as hf_logging

# The format of Opacus' import-time basicConfig: its handler and no other is removed.
OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def drop_opacus_root_handler() -> None:
    """Remove the root handler that importing Opacus installs (idempotent, any import order).

    Opacus is imported here first, so its basicConfig has run; a root handler the user or a
    test harness set up beforehand makes basicConfig a no-op and is never touched.
    """
    import opacus.utils.module_utils  # noqa: F401  (runs Opacus' basicConfig now, once)

    root = logging.getLogger()
    for handler in list(root.handlers):
        fmt = getattr(handler.formatter, "_fmt", None)
        if type(handler) is logging.StreamHandler and fmt == OPACUS_ROOT_FORMAT:
            root.removeHandler(handler)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers at error level and without progress bars, for one from_pretrained call."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def without_peft_deprecation_notice() -> Iterator[None]:
    """PEFT reads the deprecated `is_gradient_checkpointing`; the notice is for PEFT, not us."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
