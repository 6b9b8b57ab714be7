"""Virtual batches: a logical Poisson batch in micro-batches, one noise draw per logical step.

Cut any way, the clipped sum is the same (clipping is per record) and so, with the same noise
generator, is the gradient the optimizer sees; gradient checkpointing changes nothing either.
Exactness does not depend on the weights: these run on the tiny BERT (tests/tiny_models.py).
"""

from __future__ import annotations

import pytest
import torch

from fed_dp_lora.privacy.engine import CoverageError, PrivateGradientEngine
from fed_dp_lora.training import per_sample_losses, train_local
from tests.privacy.test_engine import _no_dropout, _setup, _trainable, _weights

CLIP, SIGMA = 0.5, 0.7


def logical_step(model, data, index: torch.Tensor, micro: int, weights=None, **engine_kwargs):
    """One logical step through the engine in micro-batches of `micro`; the gradients set."""
    _no_dropout(model)
    engine = PrivateGradientEngine(model, 8.0, CLIP, SIGMA, torch.Generator().manual_seed(3), **engine_kwargs)
    try:
        for chunk in index.split(micro):
            batch = data.batch(chunk, torch.device("cpu"))
            engine.backward(per_sample_losses(engine.module, batch, None),
                            None if weights is None else weights[batch["labels"]])
        engine.finalize(len(index))
        return {n: p.grad.clone() for n, p in _trainable(model).items()}, engine
    finally:
        engine.detach()


@pytest.mark.parametrize("micro", [1, 3, 5])
def test_micro_batches_give_the_whole_batch_gradient_and_one_noise_draw(tiny_cfg, micro):
    cfg, model, data = _setup(tiny_cfg, 10)
    weights = _weights(cfg) / _weights(cfg).max()
    index = torch.arange(10)
    whole, _ = logical_step(model, data, index, 10, weights)
    pieces, engine = logical_step(model, data, index, micro, weights)
    assert engine.last_median_norm > 0
    for name in whole:
        # Same generator seed: equal only if the noise was drawn once, after all micro-batches.
        torch.testing.assert_close(pieces[name], whole[name], rtol=0, atol=1e-6 * CLIP, msg=name)


def test_gradient_checkpointing_changes_nothing_in_the_private_step(tiny_cfg):
    _, plain, data = _setup(tiny_cfg, 6)
    _, checkpointed, _ = _setup(tiny_cfg, 6, "train.gradient_checkpointing=true")
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.train()
    index = torch.arange(6)
    a, _ = logical_step(plain, data, index, 2)
    b, engine = logical_step(checkpointed, data, index, 2)
    assert engine.per_sample == "fused"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6 * CLIP, msg=name)
    with pytest.raises(CoverageError, match="gradient checkpointing"):
        PrivateGradientEngine(checkpointed, 8.0, CLIP, SIGMA, per_sample="opacus")


def test_training_in_micro_batches_takes_the_same_steps_to_the_same_model(tiny_cfg):
    cfg, model, data = _setup(tiny_cfg, 24)
    _no_dropout(model)
    start = {n: p.detach().clone() for n, p in _trainable(model).items()}
    results = {}
    for micro in (None, 4):
        cfg.train.micro_batch_size = micro
        with torch.no_grad():
            for n, p in _trainable(model).items():
                p.copy_(start[n])
        engine = PrivateGradientEngine(model, 8.0, CLIP, SIGMA, torch.Generator().manual_seed(0))
        try:
            stats = train_local(engine, data, cfg, 8 / 24, 3, None, torch.Generator().manual_seed(1))
        finally:
            engine.detach()
        results[micro] = (stats, {n: p.detach().clone() for n, p in _trainable(model).items()})
    (whole, after_whole), (pieces, after_pieces) = results[None], results[4]
    assert (pieces.steps, pieces.examples, pieces.empty_batches) == (whole.steps, whole.examples, whole.empty_batches)
    assert pieces.mean_loss == pytest.approx(whole.mean_loss, rel=1e-5)
    assert any(not torch.equal(after_whole[n], start[n]) for n in start), "nothing trained"
    for name in start:
        torch.testing.assert_close(after_pieces[name], after_whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batch_size_is_validated(tiny_cfg):
    from fed_dp_lora.config import ConfigError

    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        tiny_cfg("train.micro_batch_size=0")
