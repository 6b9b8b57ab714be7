"""Per-attempt random streams: reproducible from their key, distinct whenever any part changes."""

from __future__ import annotations

import torch

from fed_dp_lora.privacy.streams import StreamKey, institution_secret, model_seed, round_generators, simulation_secret


def draws(secret: bytes, server_round: int, digest: str = "g", attempt: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    sampling, noise = round_generators(StreamKey(secret, server_round, digest, attempt), torch.device("cpu"))
    return torch.rand(5, generator=sampling), torch.randn(5, generator=noise)


def test_the_same_key_gives_the_same_batches_and_noise():
    a, b = draws(simulation_secret(0, 1), 3), draws(simulation_secret(0, 1), 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rounds_seeds_partitions_keys_studies_adapters_and_attempts_all_change_the_streams():
    base = draws(simulation_secret(0, 1), 3)
    for other in (draws(simulation_secret(0, 1), 4), draws(simulation_secret(1, 1), 3),
                  draws(simulation_secret(0, 2), 3), draws(institution_secret(b"k" * 32, "s1"), 3),
                  draws(institution_secret(b"k" * 32, "s2"), 3), draws(institution_secret(b"j" * 32, "s1"), 3),
                  draws(simulation_secret(0, 1), 3, digest="h"), draws(simulation_secret(0, 1), 3, attempt=2)):
        assert not torch.equal(base[1], other[1]) and not torch.equal(base[0], other[0])


def test_sampling_noise_and_model_streams_are_independent():
    key = StreamKey(b"x", 1, "g", 1)
    sampling, noise = round_generators(key, torch.device("cpu"))
    assert sampling.initial_seed() != noise.initial_seed() != model_seed(key)
