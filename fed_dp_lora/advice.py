"""What the server tells its operator when a run is heading somewhere useless, and what to change.

Computed from the server's own data only (its central test set and the global model's metrics
on it): nothing here reads a client's records.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

# Balanced accuracy within this of 1 / classes after a round: every record gets the same class.
MAJORITY_TOLERANCE = 0.005
# Warn when the run's max_length cuts more than this share of the test texts.
CUT_SHARE = 0.25


def majority_warning(cfg: DictConfig, metrics: dict[str, float], num_classes: int) -> str | None:
    """A warning naming what to change when the global model predicts (nearly) one class only."""
    balanced = metrics.get("balanced_accuracy")
    if balanced is None or balanced > 1.0 / num_classes + MAJORITY_TOLERANCE:
        return None
    fixes = []
    if cfg.train.method == "lora":
        fixes.append(
            "recipe=linear-probe (the default: a DP head on frozen features learns from ~1000 "
            "records per client where LoRA's few noisy steps do not)"
        )
    else:
        fixes.append("a higher learning rate (train.lr; the defaults are data.lr.private / data.lr.non_private)")
        fixes.append("more local epochs (train.epochs)")
    if cfg.data.class_weights is None:
        fixes.append("class weights from what you know of the label balance (data.class_weights=[w0,w1,...])")
    if cfg.privacy.enabled:
        fixes.append("a larger budget (privacy.epsilon) or more records per institution")
    return (
        f"balanced accuracy {balanced:.3f}: the global model predicts one class for (nearly) every "
        "test record. Try: " + "; ".join(fixes)
    )


def length_report(lengths: np.ndarray, max_length: int) -> tuple[str, str | None]:
    """Token-length percentiles of the server's test texts, and a warning when max_length cuts many."""
    p50, p75, p90, p95 = np.percentile(lengths, [50, 75, 90, 95]).astype(int)
    cut = float(np.mean(lengths > max_length))
    info = (
        f"test texts: token lengths median {p50}, 75th {p75}, 90th {p90}, 95th {p95}; "
        f"train.max_length={max_length} cuts {cut:.0%} of them"
    )
    if cut <= CUT_SHARE:
        return info, None
    return info, (
        f"train.max_length={max_length} cuts {cut:.0%} of the test texts; train.max_length={p75} "
        f"keeps three quarters whole (longer sequences cost encoder time, once per record "
        "with the linear probe)"
    )
