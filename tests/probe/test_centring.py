"""The linear probe's centring: the Gaussian mechanism it claims, and a head the server can use
without the mean."""

from __future__ import annotations

import torch
from torch import nn

from fed_dp_lora.probe.centring import centred_head, fold_into, private_mean


def test_the_private_mean_is_the_clipped_sum_plus_gaussian_noise_over_the_public_count():
    torch.manual_seed(0)
    x = torch.randn(300, 64) * 3 + 2  # norms ~25: every row is clipped
    clip, sigma, records = 4.5, 10.0, 320
    clipped = x * (clip / x.norm(dim=1, keepdim=True)).clamp(max=1.0)
    exact = clipped.sum(0) / records
    blocks = [(64, clip)]
    draws = torch.stack([private_mean(x, blocks, sigma, records, torch.Generator().manual_seed(s)) for s in range(50)])
    noise = (draws - exact) * records / (sigma * clip)  # should be N(0, 1) per coordinate
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.0) < 0.05
    # the same generator state gives the same release; the norm bound is what the accountant assumes
    assert torch.equal(private_mean(x, blocks, sigma, records, torch.Generator().manual_seed(3)), draws[3])
    assert float(clipped.norm(dim=1).max()) <= clip + 1e-4


def test_the_head_sent_in_raw_coordinates_equals_the_trained_centred_head():
    torch.manual_seed(1)
    raw, mean, x = nn.Linear(16, 2), torch.randn(16) * 4, torch.randn(10, 16) + 4
    centred = centred_head(raw, mean)
    assert torch.allclose(centred(x - mean), raw(x), atol=1e-5)
    with torch.no_grad():  # "training" in centred coordinates
        centred.weight.add_(torch.randn_like(centred.weight))
        centred.bias.add_(1.0)
    fold_into(raw, centred, mean)
    assert torch.allclose(raw(x), centred(x - mean), atol=1e-4)
    assert dict(raw.named_parameters()).keys() == {"weight", "bias"}  # nothing of the feature size but W


def test_without_a_generator_the_noise_is_not_torchs_global_stream():
    """Model loading seeds torch's global generator with a public seed: the mean must not use it."""
    x = torch.randn(40, 8)
    torch.manual_seed(0)
    first = private_mean(x, [(8, 4.5)], 10.0, 40, None)
    torch.manual_seed(0)
    assert not torch.equal(first, private_mean(x, [(8, 4.5)], 10.0, 40, None))


def test_with_table_columns_each_part_is_clipped_and_the_noise_fits_the_joint_bound():
    """Encoder part clipped to 4.5, column part to 4: one record moves the sum by at most
    sqrt(4.5^2 + 4^2), and the noise's std is sigma times that bound."""
    torch.manual_seed(2)
    x = torch.cat([torch.randn(200, 32) * 5, torch.randn(200, 6) * 9], dim=1)
    blocks, sigma, records = [(32, 4.5), (6, 4.0)], 10.0, 200
    bound = (4.5**2 + 4.0**2) ** 0.5
    zero = torch.Generator().manual_seed(5)
    without = private_mean(x[1:], blocks, sigma, records, zero)
    with_record = private_mean(x, blocks, sigma, records, torch.Generator().manual_seed(5))
    moved = float(((with_record - without) * records).norm())
    assert 4.5 < moved <= bound + 1e-3  # more than either clip alone allows: both parts count
    exact = torch.cat([x[:, :32] * (4.5 / x[:, :32].norm(dim=1, keepdim=True)).clamp(max=1.0),
                       x[:, 32:] * (4.0 / x[:, 32:].norm(dim=1, keepdim=True)).clamp(max=1.0)], dim=1).sum(0)
    draws = torch.stack([private_mean(x, blocks, sigma, records, torch.Generator().manual_seed(s)) for s in range(60)])
    noise = (draws * records - exact) / (sigma * bound)
    assert abs(float(noise.std()) - 1.0) < 0.05
