"""Canary records for the privacy audit: unique random texts with random labels.

Canaries are built from `audit.seed` and the tokenizer's vocabulary alone, so the server
(the auditor) and every client derive the same set without exchanging anything. Canary i
belongs to the client with partition id i mod num_partitions, so each canary is in at most
one client's data and the per-record guarantee of that client is the one being audited.
A canary is a string of random whole-word tokens with a random label: unlike any real
record and unlike the other canaries, so its loss moves mainly if it was trained on.
(Random letter strings split into similar sub-word pieces and all look alike to the
model; measured, they gave the audit little power.)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from omegaconf import DictConfig

WORDS_PER_CANARY = 8


def canary_words(vocabulary: Iterable[str]) -> list[str]:
    """Whole lower-case words of a tokenizer's vocabulary (each one token), in a fixed order."""
    words = sorted({w.strip("Ġ▁") for w in vocabulary if w.strip("Ġ▁").isalpha() and w.strip("Ġ▁").islower()})
    return [w for w in words if len(w) >= 3]


def canary_table(cfg: DictConfig, num_labels: int | None, words: list[str]) -> pd.DataFrame:
    """All audit.canaries canaries, in the standardized columns of the configured task."""
    m = int(cfg.audit.canaries)
    rng = np.random.default_rng([int(cfg.audit.seed), 1])
    texts = [" ".join(rng.choice(words, size=WORDS_PER_CANARY)) for _ in range(m)]
    if cfg.model.task == "classification":
        labels = rng.integers(0, num_labels, size=m)
        return pd.DataFrame({"text": texts, "label": labels.astype(int)})
    prompts = [f"Code {rng.choice(words)}:" for _ in range(m)]
    return pd.DataFrame({"prompt": prompts, "response": texts})


def included_canaries(cfg: DictConfig) -> np.ndarray:
    """The secret fair coin of each canary: True means its client trains on it."""
    return np.random.default_rng([int(cfg.audit.seed), 2]).random(int(cfg.audit.canaries)) < 0.5


def client_canaries(
    cfg: DictConfig, num_labels: int | None, words: list[str], partition_id: int, num_partitions: int
) -> pd.DataFrame:
    """The included canaries this client adds to its training records."""
    table = canary_table(cfg, num_labels, words)
    index = np.arange(len(table))
    mine = included_canaries(cfg) & (index % num_partitions == partition_id)
    return table[mine].reset_index(drop=True)
