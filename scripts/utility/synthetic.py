"""Synthetic credit applicants from the public schema only (no record is read).

Each field is drawn independently: categories uniformly from the schema's levels, numbers from wide,
round ranges that say what the columns are (years, months, money). Rendered like real records, their
frozen features give a PUBLIC basis of the directions in which field values move the encoder.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LEVELS = {
    "Home": ["owner", "rent", "parents", "priv", "other", "ignore"],
    "Marital": ["married", "single", "separated", "divorced", "widow"],
    "Records": ["no", "yes"],
    "Job": ["fixed", "freelance", "partime", "others"],
}


def applicants(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    amount = rng.integers(1, 51, n) * 100
    out = {k: rng.choice(v, n) for k, v in LEVELS.items()}
    out.update({
        "Seniority": rng.integers(0, 41, n),
        "Time": rng.choice([12, 24, 36, 48, 60], n),
        "Age": rng.integers(18, 71, n),
        "Expenses": rng.integers(35, 151, n),
        "Income": np.where(rng.random(n) < 0.1, np.nan, rng.integers(20, 501, n)).astype(float),
        "Assets": np.where(rng.random(n) < 0.4, 0, rng.integers(1, 51, n) * 1000).astype(float),
        "Debt": np.where(rng.random(n) < 0.7, 0, rng.integers(1, 51, n) * 100).astype(float),
        "Amount": amount,
        "Price": (amount * rng.uniform(1.0, 2.5, n)).round(),
    })
    return pd.DataFrame(out)
