"""The client's own feature mean, and the head's change of coordinates around it.

Frozen-encoder features share a large common offset (all-MiniLM-L6-v2: |mean| ~4 against a
spread of ~0.6 on the credit task); DP-SGD on raw features spends its few noisy steps on that
offset. Each client therefore trains on its features minus its own mean. Under DP the mean is a
Gaussian-mechanism release: every record's feature vector clipped to norm C, the sum plus
N(0, (sigma C)^2 I), divided by the PUBLIC record count. Adding or removing one record moves the
sum by at most C, so this is one Gaussian mechanism with noise multiplier sigma, composed in the
institution's ledger as (sigma, q = 1, one step). When the head also reads table columns
(data.columns), the encoder's part is clipped to probe.center_clip and the columns' part to
data.columns.clip, so a record moves the sum by at most C = sqrt(center_clip^2 + clip^2) and
the noise is scaled to that C.

The client trains the head in centred coordinates and sends it in raw ones (logits = W x + b with
b = b_c - W mu): the global head needs no mean, and the mean is never sent; only what the head's
bias folds in, which is post-processing of the accounted release.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from fed_dp_lora.data.columns import declared
from fed_dp_lora.files import write_atomic
from fed_dp_lora.privacy.institution_ledger import FEATURE_MEAN, InstitutionLedger, Mechanism
from fed_dp_lora.privacy.ledger_store import InstitutionState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Centre:
    """The mean a client centres on, and what it was computed from (kept in the state dir)."""

    mean: torch.Tensor
    source: str  # digest of the features and the mechanism's settings


def _source(cfg: DictConfig, features: torch.Tensor) -> str:
    h = hashlib.sha256(features.contiguous().numpy().tobytes())
    h.update(f"{cfg.probe.center_clip}:{cfg.data.columns.clip}:{cfg.probe.center_noise_multiplier}".encode())
    return h.hexdigest()


def clip_blocks(cfg: DictConfig, width: int) -> list[tuple[int, float]]:
    """(width, clip) of each part of a feature vector: the encoder's, then the columns' if any."""
    columns = declared(cfg).width()
    blocks = [(width - columns, float(cfg.probe.center_clip))]
    return blocks + [(columns, float(cfg.data.columns.clip))] if columns else blocks


def _path(store: InstitutionState, study: str) -> Path:
    return store.path / f"feature-mean-{hashlib.sha256(study.encode()).hexdigest()[:16]}.pt"


def charge(cfg: DictConfig) -> tuple[tuple[str, Mechanism], ...]:
    """The release a new DP mean costs: one Gaussian mechanism (sigma, q = 1, one step)."""
    if not (cfg.privacy.enabled and cfg.probe.center):
        return ()
    return ((FEATURE_MEAN, (float(cfg.probe.center_noise_multiplier), 1.0, 1)),)


def kept(
    cfg: DictConfig, store: InstitutionState | None, ledger: InstitutionLedger, study: str, features: torch.Tensor
) -> Centre | None:
    """The mean to reuse without a new charge, or None when a new one must be computed.

    Reused only under DP, from a file of this study written after its charge was on the ledger,
    computed from these very features with these settings (a changed file is a new release).
    """
    if not cfg.probe.center:
        return Centre(torch.zeros(features.shape[1]), "none")
    if store is None or not cfg.privacy.enabled or not ledger.charged(study, FEATURE_MEAN):
        return None
    path = _path(store, study)
    try:
        saved = torch.load(path, weights_only=True) if path.is_file() else None
    except Exception as err:  # unreadable: a new release (counted again), never a guess
        log.warning("feature mean %s unreadable (%s); releasing a new one", path, err)
        saved = None
    if saved is None or saved["source"] != _source(cfg, features):
        return None
    return Centre(saved["mean"], saved["source"])


def compute(cfg: DictConfig, features: torch.Tensor, records: int, generator: torch.Generator | None) -> Centre:
    """The DP mean under DP (noise from this attempt's stream); the exact mean without DP."""
    if not cfg.privacy.enabled:
        return Centre(features.mean(dim=0), "exact")
    mean = private_mean(
        features, clip_blocks(cfg, features.shape[1]), float(cfg.probe.center_noise_multiplier), records, generator
    )
    return Centre(mean, _source(cfg, features))


def keep(store: InstitutionState, study: str, centre: Centre) -> None:
    """Keep the released mean for the study's later rounds (call after the ledger is saved)."""
    write_atomic(
        _path(store, study), lambda handle: torch.save({"mean": centre.mean.cpu(), "source": centre.source}, handle)
    )


def private_mean(
    features: torch.Tensor,
    blocks: list[tuple[int, float]],
    noise_multiplier: float,
    records: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(sum_i clip(x_i) + N(0, (sigma C)^2 I)) / records, each (width, clip) block of a record
    clipped to its own norm bound, so one record moves the sum by at most C = sqrt(sum clip^2).

    Without a generator the noise comes from OS entropy, never from torch's global generator
    (model loading seeds that with a public seed, so the server could replay its draws).
    """
    assert sum(w for w, _ in blocks) == features.shape[1], "the blocks must cover every feature"
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    parts = []
    for part, (_, clip) in zip(features.split([w for w, _ in blocks], dim=1), blocks, strict=True):
        parts.append(part * (clip / (part.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0))
    sensitivity = math.sqrt(sum(clip**2 for _, clip in blocks))
    noise = torch.normal(
        0.0, noise_multiplier * sensitivity, size=(features.shape[1],), generator=generator, device=generator.device
    ).to(features.device)
    return (torch.cat(parts, dim=1).sum(dim=0) + noise) / records


def centred_head(raw: nn.Linear, mean: torch.Tensor) -> nn.Linear:
    """A head on x - mean with the same logits as `raw` on x: W, b + W mean."""
    head = nn.Linear(raw.in_features, raw.out_features).to(raw.weight.device)
    with torch.no_grad():
        head.weight.copy_(raw.weight)
        head.bias.copy_(raw.bias + raw.weight @ mean.to(raw.weight.device))
    return head


def fold_into(raw: nn.Linear, centred: nn.Linear, mean: torch.Tensor) -> None:
    """Write the centred head back in raw coordinates: W, b - W mean."""
    with torch.no_grad():
        raw.weight.copy_(centred.weight)
        raw.bias.copy_(centred.bias - centred.weight @ mean.to(centred.weight.device))
