"""Dirac gradient canaries: each one a record whose clipped gradient is +-C on one coordinate.

Both sides derive the same canaries from `audit.seed` and the adapter's layout (tensor names
and sizes): the audited client, which adds the included ones to its DP steps, and the server
(the auditor), which reads their coordinates in what the client releases. Nothing is sent.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DiracCanaries:
    """m canaries: coordinate (tensor, flat offset), sign, and the secret fair coin."""

    names: tuple[str, ...]  # the adapter's tensors, sorted: the flat vector's layout
    tensor: np.ndarray  # per canary: index into names
    offset: np.ndarray  # per canary: flat index inside its tensor
    sign: np.ndarray  # per canary: +1.0 or -1.0
    included: np.ndarray  # per canary: True means the audited client treats it as a record

    @classmethod
    def draw(cls, sizes: Mapping[str, int], count: int, seed: int) -> DiracCanaries:
        """`count` distinct coordinates of the adapter, uniformly; signs and coins from `seed`."""
        names = tuple(sorted(sizes))
        bounds = np.cumsum([0] + [int(sizes[n]) for n in names])
        if count > bounds[-1]:
            raise ValueError(f"{count} canaries need as many coordinates; the adapter has {bounds[-1]}")
        rng = np.random.default_rng([seed, 3])  # [seed, 1] and [seed, 2]: the input canaries
        flat = rng.choice(bounds[-1], size=count, replace=False)
        tensor = np.searchsorted(bounds, flat, side="right") - 1
        sign = rng.choice(np.array([-1.0, 1.0]), size=count)
        included = rng.random(count) < 0.5
        return cls(names, tensor, flat - bounds[tensor], sign, included)

    def __len__(self) -> int:
        return len(self.tensor)

    def read(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> np.ndarray:
        """The value of every canary's coordinate in an adapter (float64)."""
        values = np.empty(len(self), dtype=np.float64)
        for i, name in enumerate(self.names):
            mine = self.tensor == i
            if mine.any():
                flat = np.asarray(state[name], dtype=np.float64).reshape(-1)
                values[mine] = flat[self.offset[mine]]
        return values


class StepCanaries:
    """The audited client's included canaries as records of every DP step (engine's `extra`).

    Each is Poisson-sampled with the real records' rate q in every logical step and, when
    sampled, adds sign * C at its coordinate to the clipped sum before the noise: a record of
    norm exactly C, so the step gives it exactly the claimed per-record guarantee. The coins
    come from their own generator, so the real records' batches are the same as without the
    audit, and it is derived from the round's secret sampling stream: a server that knew
    which steps took a canary would face a weaker mechanism than the accountant's.
    """

    def __init__(
        self, canaries: DiracCanaries, model: nn.Module, rate: float, clip_norm: float, generator: torch.Generator
    ) -> None:
        names = {p: n for n, p in model.named_parameters() if p.requires_grad}
        if set(names.values()) != set(canaries.names):
            raise ValueError("the canaries were drawn for another adapter layout")
        chosen = np.flatnonzero(canaries.included)
        self.where = {
            name: (
                torch.from_numpy(canaries.offset[chosen][canaries.tensor[chosen] == i]),
                torch.from_numpy(np.flatnonzero(canaries.tensor[chosen] == i)),
            )
            for i, name in enumerate(canaries.names)
        }
        self.values = torch.from_numpy(canaries.sign[chosen] * clip_norm).float()
        self.names = names
        self.rate = rate
        self.generator = generator
        self.sampled = 0  # canary records added so far (this client's own log, never sent)

    def step_sum(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """This step's canary records, summed per tensor; None when none was sampled."""
        taken = torch.rand(len(self.values), generator=self.generator) < self.rate
        if not taken.any():
            return None
        self.sampled += int(taken.sum())
        added = torch.where(taken, self.values, 0.0)
        sums = []
        for p in params:
            offsets, which = self.where[self.names[p]]
            sums.append(torch.zeros(p.numel()).index_add_(0, offsets, added[which]).to(p.device))
        return sums


def canary_generator(sampling: torch.Generator | None) -> torch.Generator:
    """A generator as secret as the round's batch sampling, without drawing from it."""
    if sampling is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(sampling.get_state().numpy().tobytes() + b"|audit canaries").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
