"""A record's table columns as features for the linear probe's head, by fixed public rules.

Nothing here is fitted on records: the transform of a numeric value is the same for every data
set (sign(v) log(1 + |v|), which brings money and counts to a few units), and categorical levels
are the ones the configuration declares. A statistic of the records (a mean, a scale, the levels
seen) would be a release outside the accountant; the client's DP feature mean does the centring.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from fed_dp_lora.config.data import TableColumns


def declared(cfg: DictConfig) -> TableColumns:
    """The columns this run's model reads: `data.columns` for the linear probe on a classification
    task; none otherwise (LoRA's classifier and a causal LM read the text alone)."""
    c = cfg.data.columns
    if cfg.train.method != "linear-probe" or cfg.model.task != "classification":
        return TableColumns()
    return TableColumns(list(c.numeric), list(c.categorical), float(c.scale), float(c.clip))


def column_names(columns: TableColumns) -> list[str]:
    """Every column the features read, numeric first."""
    return list(columns.numeric) + list(columns.levels())


def column_features(table: pd.DataFrame, columns: TableColumns) -> torch.Tensor | None:
    """N x columns.width() float32 features (times columns.scale), or None when none are declared.

    The table must hold every declared column (data.sources.standardize checks a user's file);
    a non-numeric entry of a numeric column counts as missing.
    """
    if columns.width() == 0:
        return None
    parts = []
    for name in columns.numeric:
        value = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
        missing = ~np.isfinite(value)
        known = np.where(missing, 0.0, value)
        parts += [np.sign(known) * np.log1p(np.abs(known)), missing.astype(np.float64)]
    for name, levels in columns.levels().items():
        value = table[name].astype(str).to_numpy()
        parts += [(value == level).astype(np.float64) for level in levels]
    return torch.tensor(np.stack(parts, axis=1) * columns.scale, dtype=torch.float32)
