"""Frozen-encoder features of a client's records, computed once and kept where the records are.

The cache maps a hash of each record's tokens to its feature vector, so a record is encoded once
per base model, whichever partition, round or run asks for it. It is derived from records: in
deployment it lives in the institution's state dir and is never sent; the server keeps its own
for its test set. Simulated clients (partitions of a public data set) share the user cache dir.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from fed_dp_lora.files import write_atomic
from fed_dp_lora.probe.model import LinearProbe, identity_digest
from fed_dp_lora.training import Encoded

log = logging.getLogger(__name__)
BATCH = 32  # records per encoder forward


def record_keys(data: Encoded) -> list[str]:
    lengths = data.attention_mask.sum(dim=1).tolist()
    return [
        hashlib.sha256(row[:n].numpy().tobytes()).hexdigest()[:32]
        for row, n in zip(data.input_ids, lengths, strict=True)
    ]


def cache_file(directory: Path, model: LinearProbe) -> Path:
    return Path(directory) / f"features-{identity_digest(model.identity)}.pt"


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    try:
        saved = torch.load(path, weights_only=True)
        return dict(zip(saved["keys"], saved["values"], strict=True))
    except Exception as err:  # a damaged cache is rebuilt, never trusted
        log.warning("feature cache %s unreadable (%s); encoding again", path, err)
        return {}


def cached_features(model: LinearProbe, data: Encoded, directory: Path, slots: int | None = None) -> torch.Tensor:
    """Features of every record of `data` (N x hidden, on CPU), encoding only those not cached.

    When anything is missing, all `slots` rows are encoded at the data's full width (slots past
    the data are padding rows): the one-off cost depends on public sizes, not on the records.
    """
    path = cache_file(directory, model)
    known = _load(path)
    keys = record_keys(data)
    if any(k not in known for k in keys):
        slots = max(len(data), slots or 0)
        index = torch.arange(slots)
        computed = []
        for start in range(0, slots, BATCH):
            rows, _ = data.slots(index[start : start + BATCH], torch.device("cpu"))
            computed.append(model.features(rows["input_ids"], rows["attention_mask"]).cpu())
        values = torch.cat(computed)[: len(data)]
        known = {**_load(path), **dict(zip(keys, values, strict=True))}  # others may have added records meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(known)
        write_atomic(
            path, lambda handle: torch.save({"keys": names, "values": torch.stack([known[k] for k in names])}, handle)
        )
    if not keys:
        return torch.zeros(0, model.hidden)
    return torch.stack([known[k] for k in keys])


def head_features(model: LinearProbe, data: Encoded, directory: Path, slots: int | None = None) -> torch.Tensor:
    """What the head reads for every record of `data`: its cached encoder features, then its
    column features when the head reads any (data.columns)."""
    return model.joined(cached_features(model, data, directory, slots), data.columns)
