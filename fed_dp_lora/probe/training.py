"""DP-SGD on the head over cached features: the same Poisson slots, padding rows, per-record
clipping, class weights and noise as training.train_local, without the encoder's forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fed_dp_lora.privacy.engine import GradientEngine
from fed_dp_lora.training import TrainStats, poisson_steps


def padded(features: torch.Tensor, labels: torch.Tensor, slots: int) -> tuple[torch.Tensor, ...]:
    """Features and labels over `slots` public slots; rows past the data are zero padding."""
    extra = slots - len(features)
    if extra < 0:
        raise ValueError(f"{len(features)} records in {slots} slots: every record needs a slot")
    x = torch.cat([features, features.new_zeros(extra, features.shape[1])])
    y = torch.cat([labels, labels.new_zeros(extra)])
    return x, y, torch.arange(slots) < len(features)


def train_head(
    engine: GradientEngine,
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: DictConfig,
    sample_rate: float,
    steps: int,
    class_weights: torch.Tensor | None,
    generator: torch.Generator | None = None,
    slots: int | None = None,
) -> TrainStats:
    """`steps` Poisson steps over `slots` slots; engine.module is the (centred) head."""
    head = engine.module
    device = engine.params[0].device
    x, y, real = padded(features, labels, len(features) if slots is None else slots)
    x, y = x.to(device), y.to(device)
    record_weights = None if class_weights is None else (class_weights / class_weights.max()).to(device)
    if engine.private:
        engine.verify_coverage(F.cross_entropy(head(x[:2]), y[:2], reduction="none"))

    def backward(index: torch.Tensor) -> tuple[int, float]:
        mine = real[index]
        if not len(index):
            return 0, 0.0
        losses = F.cross_entropy(head(x[index]), y[index], reduction="none")
        weights = mine.to(device).float()
        if record_weights is not None:
            weights = weights * record_weights[y[index]]
        engine.backward(losses, weights)
        return int(mine.sum()), float(losses.detach()[mine.to(device)].sum())

    return poisson_steps(engine, cfg, len(real), sample_rate, steps, generator, backward)
