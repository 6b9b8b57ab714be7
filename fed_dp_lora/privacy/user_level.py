"""User-level (institution-level) DP for DP-FedAvg: whole-update clipping and noise split.

No Flower here. The accountant is the record-level one (`PrivacyLedger`): one round of
DP-FedAvg is one application of the subsampled Gaussian mechanism to the sum of clipped
updates, so the history (noise multiplier, client sample rate, 1) per round composes exactly
as DP-SGD steps do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

USER_PRIVACY_UNIT = (
    "client: one institution's whole contribution (all its records, every round); neighbouring "
    "runs differ by one client's update being replaced by none"
)


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a whole update, all tensors flattened together."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """The update scaled to L2 norm at most `clip_norm` (float64), and its norm before clipping."""
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * factor for k, v in update.items()}, norm


def adaptive_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier left for the update when the unclipped count is also released.

    Andrew et al. 2021 (Thm. 1): releasing the sum of clipped updates with multiplier z_u and
    the sum of centred bits (b - 1/2, sensitivity 1/2) with std sigma_b is as private as one
    Gaussian mechanism with z = (z_u^-2 + (2 sigma_b)^-2)^-1/2; so z_u = (z^-2 - (2 sigma_b)^-2)^-1/2.
    """
    if noise_multiplier >= 2 * clipped_count_stddev:
        raise ValueError(
            f"adaptive clipping: clipped_count_stddev={clipped_count_stddev:g} leaves no noise for the "
            f"update at noise_multiplier={noise_multiplier:g} (needs clipped_count_stddev > "
            f"{noise_multiplier / 2:g})"
        )
    return (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5
