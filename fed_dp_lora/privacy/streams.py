"""Per-round random streams of a client: which records each Poisson batch takes, and the noise.

Derived from a secret and the server round, so a resumed run draws exactly what the
interrupted one would have (same batches, same noise), and a round retrained after a server
stop produces the same update instead of a second, differently-noised release.

Whoever knows the secret can subtract the noise, so by default it is the client's own key
(`ClientStateDir.secret`: on the institution's disk in deployment, under the run's output-dir
in simulation; never sent) mixed with the study id, so two studies never share noise. With
`privacy.seeded_noise=true` a simulated client's stream comes from the run's `seed` instead:
reproducible across runs, for experiments; refused in deployment.
"""

from __future__ import annotations

import hashlib

import torch


def simulation_secret(seed: int, partition_id: int) -> bytes:
    return f"simulation seed={seed} partition={partition_id}".encode()


def institution_secret(key: bytes, study: str) -> bytes:
    return key + b"|study=" + study.encode()


def _seed(secret: bytes, server_round: int, purpose: str) -> int:
    digest = hashlib.sha256(secret + f"|round={server_round}|{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_seed(secret: bytes, server_round: int) -> int:
    """Seed for the model's own randomness in a round (dropout), for reproducible rounds."""
    return _seed(secret, server_round, "model")


def round_generators(secret: bytes, server_round: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(batch sampling generator on CPU, noise generator on `device`) for one round."""
    sampling = torch.Generator().manual_seed(_seed(secret, server_round, "sampling"))
    noise = torch.Generator(device=device).manual_seed(_seed(secret, server_round, "noise"))
    return sampling, noise
