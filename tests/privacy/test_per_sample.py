"""The fused per-sample-gradient path (fed_dp_lora.privacy.per_sample) and its engine wiring.

The clipped-sum-equals-one-record-at-a-time check for the fused path, on every model kind,
is test_engine.test_clipped_sum_matches_one_record_at_a_time[*-fused-*]. References here are
plain autograd one record at a time, or Opacus' hooks. Models: the tiny BERT; the per-kind
agreement of the two paths also on the packaged MiniLM (slow tier).
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fed_dp_lora.privacy import per_sample
from fed_dp_lora.privacy.engine import CoverageError, GradientEngine, PrivateGradientEngine
from fed_dp_lora.training import per_sample_losses
from tests.privacy.test_engine import (  # noqa: F401  (fixtures: _one_thread autouse, base_cfg)
    CPU,
    HEAD_BIAS,
    HEAD_WEIGHT,
    MODEL_KINDS,
    ShiftedHead,
    _no_dropout,
    _one_thread,
    _setup,
    _trainable,
    _weights,
    base_cfg,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _off_zero(model: nn.Module) -> None:
    """B and the head start at zero (every A gradient would be zero): move them off zero."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in _trainable(model).items():
            if "lora_B" in name or name in (HEAD_WEIGHT, HEAD_BIAS):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _swapped(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in m.__dict__]


# ---------------------------------------------------------------------------------------------
# 1. The Function: per record (batch row), never per token; weight and bias; 2-D and N-D inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 7), (5, 2, 3, 7)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_per_record_gradients_match_a_loop(shape, bias):
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(7, 4, bias=bias)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    target = torch.randn(shape[:-1] + (4,), generator=gen)

    def losses(inp: torch.Tensor) -> torch.Tensor:  # one nonlinear loss per record
        out = layer(inp)
        return (out - target[: inp.shape[0]]).pow(2).flatten(1).sum(dim=1) * torch.arange(
            1.0, inp.shape[0] + 1
        )

    handle = per_sample.attach(layer)
    try:
        losses(x).sum().backward()
    finally:
        gs_w, gs_b = layer.weight.grad_sample, getattr(layer.bias, "grad_sample", None)
        fused_x_grad = x.grad.clone()
        handle.remove()
    # The saved work: no summed gradient was built for the layer's parameters.
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    assert gs_w.shape == (shape[0], 4, 7) and gs_w.dtype == torch.float32
    for i in range(shape[0]):
        layer.zero_grad(set_to_none=True)
        xi = x.detach()[i : i + 1].clone().requires_grad_(True)
        out = layer(xi)
        ((out - target[i : i + 1]).pow(2).sum() * (i + 1)).backward()
        assert torch.allclose(gs_w[i], layer.weight.grad, rtol=1e-5, atol=1e-6), i
        if bias:
            assert gs_b.shape == (shape[0], 4)
            assert torch.allclose(gs_b[i], layer.bias.grad, rtol=1e-5, atol=1e-6), i
        assert torch.allclose(fused_x_grad[i : i + 1], xi.grad, rtol=1e-5, atol=1e-6), i
    if not bias:
        assert gs_b is None


def test_a_layer_called_twice_accumulates_both_calls():
    gen = torch.Generator().manual_seed(2)
    layer = nn.Linear(6, 6)
    x = torch.randn(4, 3, 6, generator=gen)
    handle = per_sample.attach(layer)
    try:
        layer(torch.tanh(layer(x))).pow(2).sum().backward()
        got = layer.weight.grad_sample.clone(), layer.bias.grad_sample.clone()
    finally:
        handle.remove()
    for i in range(4):
        layer.zero_grad(set_to_none=True)
        layer(torch.tanh(layer(x[i : i + 1]))).pow(2).sum().backward()
        assert torch.allclose(got[0][i], layer.weight.grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got[1][i], layer.bias.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. On the real models: fused and Opacus per-sample gradients agree
# ---------------------------------------------------------------------------------------------


@MODEL_KINDS
def test_fused_and_opacus_per_sample_gradients_agree(base_cfg, overrides):
    n = 6
    cfg, model, data = _setup(base_cfg, n, *overrides)
    _no_dropout(model)
    _off_zero(model)
    model.train()
    params = _trainable(model)
    assert per_sample.uncovered_parameters(model) == []
    assert set(per_sample.covered_parameters(model)) == set(params.values())
    batch = data.batch(torch.arange(n), CPU)

    handle = per_sample.attach(model)
    try:
        per_sample_losses(model, batch, _weights(cfg)).sum().backward()
        fused = {name: p.grad_sample.clone() for name, p in params.items()}
        assert all(p.grad is None for p in params.values())  # no summed gradient built
    finally:
        handle.remove()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        per_sample_losses(gsm, batch, _weights(cfg)).sum().backward()
        hooks = {name: p.grad_sample.clone() for name, p in params.items()}
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)
    for name in params:
        assert fused[name].shape == (n, *params[name].shape), name
        assert fused[name].dtype == torch.float32, name
        scale = float(hooks[name].abs().max())
        assert scale > 0, f"{name}: zero per-sample gradient, the test would be vacuous"
        assert float((fused[name] - hooks[name]).abs().max()) <= 1e-5 * scale, name


def test_fused_matches_opacus_with_lora_dropout(tiny_cfg):
    """Dropout > 0: lora_A sees the dropped input, in both paths (the same masks, same seed)."""
    n = 4
    cfg, model, data = _setup(tiny_cfg, n, "lora.dropout=0.3")
    _off_zero(model)
    model.train()
    params = _trainable(model)
    batch = data.batch(torch.arange(n), CPU)
    grads = {}
    for mode in ("fused", "opacus"):
        engine = PrivateGradientEngine(model, 1.0, 1.0, 0.0, torch.Generator(), per_sample=mode)
        try:
            torch.manual_seed(5)  # the same dropout masks in both forwards
            flat = engine.per_sample_gradients(per_sample_losses(engine.module, batch, None))
            grads[mode] = {engine.names[p]: g.clone() for p, g in zip(engine.params, flat)}
        finally:
            engine.detach()
    for name in params:
        scale = float(grads["opacus"][name].abs().max())
        assert scale > 0, name
        assert float((grads["fused"][name] - grads["opacus"][name]).abs().max()) <= 1e-5 * scale, name


def _ready(cfg_for, n: int = 4):
    """A model with dropout off and B and the head off zero, in train mode; its trainable
    tensors and one batch of n records."""
    cfg, model, data = _setup(cfg_for, n)
    _no_dropout(model)
    _off_zero(model)
    model.train()
    return model, _trainable(model), data.batch(torch.arange(n), CPU)


# ---------------------------------------------------------------------------------------------
# 3. attach / remove on the cached model
# ---------------------------------------------------------------------------------------------


def test_remove_restores_the_original_forward(tiny_cfg):
    model, params, batch = _ready(tiny_cfg)
    assert _swapped(model) == []
    with torch.no_grad():
        before = per_sample_losses(model, batch, None)

    handle = per_sample.attach(model)
    swapped = _swapped(model)
    assert swapped and all(type(m) is nn.Linear for m in swapped)
    assert any(HEAD_WEIGHT == name + ".weight" for name, m in model.named_modules() if m in swapped)
    losses = per_sample_losses(model, batch, None)
    assert torch.allclose(losses, before, rtol=1e-6, atol=1e-7)  # same forward values
    losses.sum().backward()
    assert all(p.grad is None and p.grad_sample is not None for p in params.values())
    handle.remove()

    assert _swapped(model) == []
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    # An ordinary non-private backward afterwards: summed .grad, and no per-sample gradient.
    per_sample_losses(model, batch, None).sum().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not hasattr(p, "grad_sample"), name
    # ... and that .grad is the sum of the fused per-sample gradients' rows.
    summed = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad(set_to_none=True)
    engine = PrivateGradientEngine(model, 1.0, 1e9, 0.0, torch.Generator(), per_sample="fused")
    try:
        flat = engine.per_sample_gradients(per_sample_losses(engine.module, batch, None))
        for p, g in zip(engine.params, flat):
            name = engine.names[p]
            assert torch.allclose(g.sum(dim=0).view_as(p), summed[name], rtol=1e-5, atol=1e-7), name
    finally:
        engine.detach()
    assert _swapped(model) == []


def test_engine_detach_leaves_the_model_for_the_next_round(tiny_cfg):
    cfg, model, data = _setup(tiny_cfg, 4)
    batch = data.batch(torch.arange(4), CPU)
    for _ in range(2):  # the cached model is reused: attach twice, never stack forwards
        engine = PrivateGradientEngine(model, 2.0, 1.0, 1.0, torch.Generator().manual_seed(0))
        assert engine.per_sample == "fused" and engine.module is model
        try:
            engine.verify_coverage(per_sample_losses(engine.module, batch, _weights(cfg)))
            assert len(_swapped(model)) == 5  # q/v lora_A and lora_B, and the head
        finally:
            engine.detach()
        assert _swapped(model) == []
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_an_aborted_step_does_not_leak_into_the_next(tiny_cfg):
    """Leftovers of a step that never finalized (an exception in between) never reach a release:
    stale per-sample gradients are cleared by the next backward, and a clipped sum over other
    records than the step's is refused at finalize."""
    cfg, model, data = _setup(tiny_cfg, 6)
    _no_dropout(model)
    _off_zero(model)
    model.train()
    params = _trainable(model)
    first, second = data.batch(torch.arange(3), CPU), data.batch(torch.arange(3, 6), CPU)

    def step(batch, stale: bool = False) -> dict[str, torch.Tensor]:
        engine = PrivateGradientEngine(model, 1.0, 1e9, 0.0, torch.Generator(), per_sample="fused")
        try:
            if stale:  # a backward that died half-way left per-sample gradients behind
                for p in params.values():
                    p.grad_sample = torch.ones(3, *p.shape)
            engine.backward(per_sample_losses(engine.module, batch, None))
            engine.finalize(3)
        finally:
            engine.detach()
        return {name: p.grad.clone() for name, p in params.items()}

    alone, after_abort = step(second), step(second, stale=True)
    for name in params:
        assert torch.allclose(after_abort[name], alone[name], rtol=1e-6, atol=1e-9), name
    engine = PrivateGradientEngine(model, 1.0, 1e9, 0.0, torch.Generator(), per_sample="fused")
    try:
        for batch in (first, second):  # the first batch's step never finalized
            engine.backward(per_sample_losses(engine.module, batch, None))
        with pytest.raises(RuntimeError, match="finalize.3. after backward over 6 records"):
            engine.finalize(3)
    finally:
        engine.detach()


# ---------------------------------------------------------------------------------------------
# 4. Coverage: the fallback to Opacus, and "fused" refuses what it cannot cover
# ---------------------------------------------------------------------------------------------


def test_uncovered_trainable_parameter_falls_back_to_opacus(tiny_cfg):
    cfg, model, data = _setup(tiny_cfg, 4)
    model.base_model.model.classifier = ShiftedHead(model.base_model.model.classifier, 2)
    shift = "base_model.model.classifier.shift.0"
    assert per_sample.uncovered_parameters(model) == [shift]

    with pytest.raises(CoverageError, match=r"classifier\.shift\.0"):
        PrivateGradientEngine(model, 2.0, 1.0, 1.0, torch.Generator(), per_sample="fused")
    assert _swapped(model) == []  # the refusal attached nothing
    engine = PrivateGradientEngine(model, 2.0, 1.0, 1.0, torch.Generator())
    try:
        assert engine.per_sample == "opacus"
        assert isinstance(engine.module, GradSampleModule)
        assert _swapped(model) == []
    finally:
        engine.detach()


def test_trainable_layer_norm_falls_back_to_opacus_and_trains(tiny_cfg):
    """A trainable tensor outside nn.Linear that Opacus supports: auto must still train it."""
    cfg, model, data = _setup(tiny_cfg, 4)
    norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    norm.weight.requires_grad_(True)
    model.train()  # Opacus' hooks capture nothing in eval mode
    _off_zero(model)  # a zero head passes no gradient down to the LayerNorm
    assert norm.weight in set(_trainable(model).values())
    assert norm.weight not in per_sample.covered_parameters(model)
    engine = PrivateGradientEngine(model, 2.0, 1.0, 0.0, torch.Generator())
    try:
        assert engine.per_sample == "opacus"
        batch = data.batch(torch.arange(4), CPU)
        engine.backward(per_sample_losses(engine.module, batch, None))
        engine.finalize(4)
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    finally:
        engine.detach()


def test_unknown_per_sample_mode_is_refused(tiny_cfg):
    _, model, _ = _setup(tiny_cfg, 1)
    with pytest.raises(ValueError, match="per_sample"):
        PrivateGradientEngine(model, 1.0, 1.0, 1.0, torch.Generator(), per_sample="ghost")
    assert _swapped(model) == []


# ---------------------------------------------------------------------------------------------
# 5. The non-private engine is untouched
# ---------------------------------------------------------------------------------------------


def test_non_private_engine_is_untouched(tiny_cfg):
    model, params, batch = _ready(tiny_cfg)
    per_sample_losses(model, batch, None).sum().div(2.0).backward()
    plain = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad(set_to_none=True)

    # A private round before (attached, then detached) must change nothing for it.
    private = PrivateGradientEngine(model, 2.0, 1.0, 1.0, torch.Generator())
    private.backward(per_sample_losses(private.module, batch, None))
    private.detach()
    engine = GradientEngine(model, 2.0)
    assert engine.module is model and _swapped(model) == []
    engine.backward(per_sample_losses(engine.module, batch, None))
    assert engine.finalize(len(batch["labels"])) is True
    for name, p in params.items():
        assert not hasattr(p, "grad_sample"), name
        assert torch.equal(p.grad, plain[name]), name
