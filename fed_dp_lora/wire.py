"""What travels: adapter tensors as ArrayRecords, their byte counts, and update checks."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the serialized tensors in one ArrayRecord."""
    return sum(len(a.data) for a in arrays.values())


def update_problem(arrays: ArrayRecord, reference: ArrayRecord, max_norm: float = 1e6) -> str | None:
    """Why a client's adapter cannot be aggregated (None if it can).

    Checked before any aggregation, for every strategy: same keys and shapes as the global
    adapter, finite values, and a change from the global adapter of sane size.
    """
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(reference.keys()))[:3]
        return f"wrong tensors (missing {missing}, unexpected {extra})"
    sq = 0.0
    for key, ref in reference.items():
        new, old = arrays[key].numpy(), ref.numpy()
        if new.shape != old.shape:
            return f"{key}: shape {new.shape} != {old.shape}"
        if not np.all(np.isfinite(new)):
            return f"{key}: NaN or Inf values"
        sq += float(np.sum((new.astype(np.float64) - old) ** 2))
    if np.sqrt(sq) > max_norm:
        return f"update norm {np.sqrt(sq):.3g} exceeds {max_norm:g}"
    return None
