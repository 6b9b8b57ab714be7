"""Dirac gradient canaries: drawn from the seed alone, sampled like records, added before the noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_dp_lora.audit.dirac import DiracCanaries, StepCanaries, canary_generator
from fed_dp_lora.models import build_model, trainable_state
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine

SIZES = {"b": 300, "a": 1000, "c": 7}


def test_canaries_are_distinct_coordinates_drawn_from_the_seed_and_layout_alone():
    canaries = DiracCanaries.draw(SIZES, 600, seed=7)
    same = DiracCanaries.draw(dict(reversed(SIZES.items())), 600, seed=7)  # dict order is no input
    other = DiracCanaries.draw(SIZES, 600, seed=8)
    for field in ("tensor", "offset", "sign", "included"):
        assert np.array_equal(getattr(canaries, field), getattr(same, field)), field
    assert not np.array_equal(canaries.offset, other.offset)
    assert canaries.names == ("a", "b", "c")
    sizes = np.array([SIZES[n] for n in canaries.names])
    assert np.all(canaries.offset >= 0) and np.all(canaries.offset < sizes[canaries.tensor])
    assert len({(t, o) for t, o in zip(canaries.tensor, canaries.offset)}) == 600  # no coordinate twice
    assert set(np.unique(canaries.sign)) == {-1.0, 1.0}
    # Fair coins and signs: within five standard deviations of 300 out of 600.
    assert abs(int(canaries.included.sum()) - 300) < 5 * np.sqrt(150)
    assert abs(int((canaries.sign > 0).sum()) - 300) < 5 * np.sqrt(150)
    with pytest.raises(ValueError, match="coordinates"):
        DiracCanaries.draw(SIZES, 1308, seed=7)


def test_read_gives_each_canarys_coordinate():
    canaries = DiracCanaries.draw(SIZES, 50, seed=1)
    state = {n: torch.arange(s, dtype=torch.float32).reshape(-1, 1) + 10_000 * i
             for i, (n, s) in enumerate(sorted(SIZES.items()))}
    expected = canaries.offset + 10_000 * canaries.tensor
    assert np.array_equal(canaries.read(state), expected)


@pytest.fixture(scope="module")
def model():
    from fed_dp_lora.config import compose_config

    torch.manual_seed(0)
    return build_model(compose_config(["+preset=tiny", "model.keep_layers=1"]), 2)


def _sizes(model) -> dict[str, int]:
    return {n: t.numel() for n, t in trainable_state(model).items()}


def _params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_a_sampled_canary_adds_sign_times_C_on_its_coordinate_and_nothing_else(model):
    canaries = DiracCanaries.draw(_sizes(model), 200, seed=3)
    step = StepCanaries(canaries, model, rate=1.0, clip_norm=2.5, generator=torch.Generator().manual_seed(0))
    sums = step.step_sum(_params(model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = {n: s for n, s in zip(names, sums)}
    values = canaries.read(state)
    assert np.array_equal(values[canaries.included], 2.5 * canaries.sign[canaries.included])
    assert np.all(values[~canaries.included] == 0)
    total = torch.cat(sums)
    assert int((total != 0).sum()) == int(canaries.included.sum())  # one coordinate per canary
    assert step.sampled == int(canaries.included.sum())


def test_canaries_are_poisson_sampled_at_the_records_rate(model):
    canaries = DiracCanaries.draw(_sizes(model), 400, seed=4)
    k = int(canaries.included.sum())
    step = StepCanaries(canaries, model, rate=0.1, clip_norm=1.0, generator=torch.Generator().manual_seed(1))
    never = StepCanaries(canaries, model, rate=0.0, clip_norm=1.0, generator=torch.Generator().manual_seed(1))
    params = _params(model)
    assert never.step_sum(params) is None
    counts, per_canary = [], np.zeros(len(canaries))
    for _ in range(300):
        sums = step.step_sum(params)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        hit = canaries.read(dict(zip(names, sums))) != 0 if sums is not None else np.zeros(len(canaries), bool)
        counts.append(int(hit.sum()))
        per_canary += hit
    counts = np.array(counts)
    # Binomial(k, 0.1) records per step, each canary Binomial(300, 0.1) times: not all at once.
    assert abs(counts.mean() - 0.1 * k) < 5 * np.sqrt(0.09 * k / 300)
    assert counts.var() == pytest.approx(0.09 * k, rel=0.3)
    assert abs(per_canary[canaries.included].mean() - 30) < 5 * np.sqrt(27 / k)
    assert per_canary[~canaries.included].sum() == 0


def test_canaries_drawn_for_another_adapter_are_refused(model):
    canaries = DiracCanaries.draw(SIZES, 10, seed=1)
    with pytest.raises(ValueError, match="layout"):
        StepCanaries(canaries, model, 0.1, 1.0, torch.Generator())


class FixedExtra:
    """A step extra that returns the same vectors every step."""

    def __init__(self, vectors: list[torch.Tensor] | None) -> None:
        self.vectors = vectors

    def step_sum(self, params):
        return None if self.vectors is None else [v.clone() for v in self.vectors]


def test_private_engine_adds_the_canaries_to_the_clipped_sum_before_the_one_noise_draw(model):
    params = _params(model)
    extra = [torch.randn(p.numel(), generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def grads(step_extra) -> list[torch.Tensor]:
        engine = PrivateGradientEngine(model, 8.0, 1.5, 0.9, torch.Generator().manual_seed(5), extra=step_extra)
        try:
            for p in params:
                p.grad = None
            assert engine.finalize(0) is True
            return [p.grad.detach().clone().flatten() for p in params]
        finally:
            engine.detach()

    with_extra, without = grads(FixedExtra(extra)), grads(None)
    for g, g0, e in zip(with_extra, without, extra):
        torch.testing.assert_close(g - g0, e / 8.0, rtol=0, atol=1e-6)  # same noise, plus extra / B
    assert not torch.equal(without[0], torch.zeros_like(without[0]))  # there was noise


def test_non_private_engine_adds_the_canaries_to_the_gradient(model):
    params = _params(model)
    extra = [torch.full((p.numel(),), 3.0) for p in params]
    engine = GradientEngine(model, 4.0, extra=FixedExtra(extra))
    for p in params:
        p.grad = None
    assert engine.finalize(0) is True  # an empty batch with a canary is a step
    assert all(torch.equal(p.grad, torch.full_like(p, 0.75)) for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    engine.finalize(5)
    assert all(torch.equal(p.grad, torch.full_like(p, 1.75)) for p in params)
    assert GradientEngine(model, 4.0, extra=FixedExtra(None)).finalize(0) is False


def test_canary_stream_is_derived_from_the_sampling_stream_without_drawing_from_it():
    sampling = torch.Generator().manual_seed(11)
    state = sampling.get_state().clone()
    a, b = canary_generator(sampling), canary_generator(sampling)
    assert torch.equal(sampling.get_state(), state)  # the real records' batches are unchanged
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    other = canary_generator(torch.Generator().manual_seed(12))
    assert not torch.equal(torch.rand(5, generator=canary_generator(sampling)), torch.rand(5, generator=other))
    assert not torch.equal(torch.rand(5, generator=canary_generator(None)),
                           torch.rand(5, generator=canary_generator(None)))
