"""Per-attempt random streams of a client: which records each Poisson batch takes, and the noise.

A stream is derived from a secret, the server round, the digest of the global adapter the
client was sent, and the attempt number (counted durably in the state dir before training).
So no two releases ever share a noise draw: if two releases of the same round shared their
noise, their difference would carry none. A round asked again on the same global adapter is
answered with the kept release (ledger_store), not retrained.

Whoever knows the secret can subtract the noise, so by default it is the client's own key
(`InstitutionState.secret`: on the institution's disk, never sent) mixed with the study id. With
`privacy.seeded_noise=true` a simulated client's stream comes from the run's `seed` instead:
reproducible across runs, for experiments; refused in deployment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def simulation_secret(seed: int, partition_id: int) -> bytes:
    return f"simulation seed={seed} partition={partition_id}".encode()


def institution_secret(key: bytes, study: str) -> bytes:
    return key + b"|study=" + study.encode()


@dataclass(frozen=True)
class StreamKey:
    """Everything a round's randomness is derived from."""

    secret: bytes
    server_round: int
    global_digest: str
    attempt: int

    def seed(self, purpose: str) -> int:
        material = (f"|round={self.server_round}|global={self.global_digest}|attempt={self.attempt}|{purpose}").encode()
        digest = hashlib.sha256(self.secret + material).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_seed(key: StreamKey) -> int:
    """Seed for the model's own randomness in a round (dropout)."""
    return key.seed("model")


def round_generators(key: StreamKey, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(batch sampling generator on CPU, noise generator on `device`) for one attempt."""
    sampling = torch.Generator().manual_seed(key.seed("sampling"))
    noise = torch.Generator(device=device).manual_seed(key.seed("noise"))
    return sampling, noise
