"""The clipped sum under hostile inputs: a record whose gradient is not finite, and padding rows.

Both must add exactly zero, whatever their values: `0 * inf` is NaN, and a NaN in the sum would
tell the server that such a record was sampled. A tiny Linear model is enough: the fused
per-sample path covers every trainable nn.Linear, which is what LoRA factors and heads are.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_dp_lora.privacy.engine import PrivateGradientEngine

CLIP = 1.0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def clipped_sum(x: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The step's gradient with zero noise: (sum_i w_i clip(g_i)) / 1."""
    torch.manual_seed(0)
    model = Tiny()
    engine = PrivateGradientEngine(model, 1.0, CLIP, 0.0, torch.Generator().manual_seed(1), per_sample="fused")
    try:
        losses = model(x).pow(2).sum(dim=1)
        engine.backward(losses, weights)
        engine.finalize(int((weights > 0).sum()) if weights is not None else len(x))
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        engine.detach()


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 1e30])
def test_a_record_with_a_non_finite_gradient_adds_exactly_zero(poison):
    honest = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    hostile = torch.cat([honest, torch.full((1, 4), poison)])
    with_it, without = clipped_sum(hostile), clipped_sum(honest)
    for name in without:
        assert torch.isfinite(with_it[name]).all(), name
        assert torch.equal(with_it[name], without[name]), name


def test_padding_rows_add_exactly_zero_even_when_their_values_overflow():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    x[1] = float("inf")  # a padding row's content must not matter at all
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0])
    got = clipped_sum(x, weights)
    kept = torch.tensor([0, 2, 3])
    expected = clipped_sum(x[kept], weights[kept])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_weights_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clipped_sum(torch.randn(2, 4), torch.tensor([1.0, 1.5]))
