"""DP-SGD gradient engine and the local training loop, on a tiny BERT + LoRA (PEFT).

References are computed the slow, obvious way (one record at a time, plain autograd), never
through the engine or Opacus. The tiny random BERT runs the same code as the packaged MiniLM
(tests/tiny_models.py); the equivalence tests per model kind also run on the packaged MiniLM,
in the slow tier.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

import fed_dp_lora.training as training
from fed_dp_lora.models import build_model, load_tokenizer, trainable_state
from fed_dp_lora.privacy.engine import CoverageError, GradientEngine, PrivateGradientEngine
from fed_dp_lora.training import IGNORE, Encoded, encode, per_sample_losses, train_local

# Opacus' full backward hooks warn when no input requires grad (always so with a frozen base).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CPU = torch.device("cpu")
HEAD_WEIGHT = "base_model.model.classifier.modules_to_save.default.weight"
HEAD_BIAS = "base_model.model.classifier.modules_to_save.default.bias"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices on a shared 2-core machine: a second intra-op thread only contends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _texts(n: int) -> pd.DataFrame:
    """Short credit-like records of different lengths (so batches are padded and trimmed)."""
    jobs = ["fixed", "freelance", "partime", "others"]
    homes = ["owner", "rent", "parents", "priv"]
    rows = [
        f"applicant aged {21 + 3 * i} with {jobs[i % 4]} job, home {homes[(i // 2) % 4]}, "
        f"asks {500 + 137 * i} for {6 * (1 + i % 5)} months" + " and has savings" * (i % 3)
        for i in range(n)
    ]
    return pd.DataFrame({"text": rows, "label": [(i * 7 // 3) % 2 for i in range(n)]})


def _setup(cfg_for, n: int, *overrides: str):
    """A one-layer model with LoRA, and n encoded records; cfg_for is tiny_cfg or make_cfg."""
    cfg = cfg_for("model.keep_layers=1", *overrides)
    model = build_model(cfg, 2)
    data = encode(_texts(n), load_tokenizer(cfg), cfg)
    return cfg, model, data


def _no_dropout(model: nn.Module) -> None:
    """model.eval() would disable Opacus' hooks: zero the dropout rates instead."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _weights(cfg) -> torch.Tensor:
    return torch.tensor(list(cfg.data.class_weights), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# 1. Clipped per-sample gradients equal a one-record-at-a-time loop
# ---------------------------------------------------------------------------------------------


MODEL_KINDS = pytest.mark.parametrize(
    "overrides",
    [(), ("lora=ffa",), ("model.quantization=4",), ("model.quantization=8",)],
    ids=["vanilla", "ffa", "bnb-4bit", "bnb-8bit"],
)


@pytest.fixture(params=["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def base_cfg(request, tiny_cfg, make_cfg):
    """The tiny BERT (fast tier) and the packaged MiniLM (slow tier): the same checks on both."""
    return tiny_cfg if request.param == "tiny" else make_cfg


@MODEL_KINDS
@pytest.mark.parametrize("per_sample", ["fused", "opacus"])
def test_clipped_sum_matches_one_record_at_a_time(base_cfg, overrides, per_sample):
    n = 8
    cfg, model, data = _setup(base_cfg, n, *overrides)
    _no_dropout(model)
    model.train()
    params = _trainable(model)
    names = list(params)
    assert HEAD_WEIGHT in names and HEAD_BIAS in names
    if "lora=ffa" in overrides:
        assert not any("lora_A" in name for name in names)
    else:
        assert any("lora_A" in name for name in names)
    if "model.quantization=4" in overrides:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if "model.quantization=8" in overrides:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    # B and the head start at zero, which would make every LoRA gradient zero: move them off
    # zero so that every trainable tensor has a non-trivial per-sample gradient.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in params.items():
            if "lora_B" in name or name in (HEAD_WEIGHT, HEAD_BIAS):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    weights = _weights(cfg)
    # A previous round on the same (cached) model: its engine must leave no hook or
    # per-sample state behind that would leak into this round's gradients.
    previous = PrivateGradientEngine(model, 2.0, 1.0, 1.0, torch.Generator().manual_seed(9))
    previous.backward(per_sample_losses(previous.module, data.batch(torch.arange(3), CPU), weights))
    previous.detach()

    # Reference: every record alone, plain autograd, joint L2 norm over all trainable tensors.
    per_record = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss = per_sample_losses(model, data.batch(torch.tensor([i]), CPU), weights)
        assert loss.shape == (1,)
        loss.sum().backward()
        per_record.append({name: p.grad.detach().clone() for name, p in params.items()})
    model.zero_grad(set_to_none=True)
    norms = torch.stack(
        [torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())) for grads in per_record]
    )
    middle = norms.sort().values[n // 2 - 1 : n // 2 + 1]
    clip = float(middle.mean())  # half the records get clipped, half do not
    expected = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for grads, norm in zip(per_record, norms):
        factor = min(1.0, clip / float(norm))
        for name, g in grads.items():
            expected[name] += factor * g.double()
    clipped_fraction = float((norms > clip).double().mean())
    assert clipped_fraction == 0.5

    expected_batch_size = 5.5
    engine = PrivateGradientEngine(
        model, expected_batch_size, clip, 0.0, torch.Generator(), per_sample=per_sample
    )
    try:
        assert engine.per_sample == per_sample
        losses = per_sample_losses(engine.module, data.batch(torch.arange(n), CPU), weights)
        assert losses.shape == (n,)
        engine.backward(losses)
        assert engine.finalize(n) is True
    finally:
        engine.detach()
    assert engine.last_clipped_fraction == pytest.approx(clipped_fraction)
    for name, p in params.items():
        got = p.grad.double() * expected_batch_size
        want = expected[name]
        assert want.norm() > 0, f"{name}: reference gradient is zero, the test would be vacuous"
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
        # atol 1e-6 C: batched and single records differ by float32 rounding (other padding widths)
        worst = float((got - want).abs().max())
        assert worst < 1e-6 * clip, f"{name}: max abs diff {worst:.2e} >= 1e-6 C"


# ---------------------------------------------------------------------------------------------
# 2. Every trainable tensor must have a per-sample gradient
# ---------------------------------------------------------------------------------------------


class ShiftedHead(nn.Module):
    """The classification head plus a trainable per-class logit shift.

    The shift lives in an nn.ParameterList whose own forward never runs, so Opacus' module
    hooks never see it: it gets a .grad but no .grad_sample (it would escape clip and noise).
    """

    def __init__(self, head: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.head = head
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(num_labels))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.shift[0]


def test_tensor_without_per_sample_gradient_is_refused_before_any_step(tiny_cfg, monkeypatch):
    cfg, model, data = _setup(tiny_cfg, 6)
    model.base_model.model.classifier = ShiftedHead(model.base_model.model.classifier, 2)
    shift = model.base_model.model.classifier.shift[0]
    assert shift.requires_grad
    before = trainable_state(model)
    optimizers = _spy_optimizers(monkeypatch)

    engine = PrivateGradientEngine(model, 3.0, 1.0, 1.0, torch.Generator().manual_seed(0))
    try:
        with pytest.raises(CoverageError, match=r"base_model\.model\.classifier\.shift\.0"):
            train_local(engine, data, cfg, 1.0, 3, _weights(cfg), torch.Generator().manual_seed(0))
    finally:
        engine.detach()
    # The shift did receive a gradient: without the check, the optimizer would have used it
    # unclipped and un-noised.
    assert shift.grad is not None and shift.grad.abs().sum() > 0
    assert getattr(shift, "grad_sample", None) is None
    assert sum(o.steps for o in optimizers) == 0
    after = trainable_state(model)
    assert set(after) == set(before)
    for name in before:
        assert torch.equal(after[name], before[name]), f"{name} changed before the refusal"


# ---------------------------------------------------------------------------------------------
# 3. Noise standard deviation sigma * C / expected batch size
# ---------------------------------------------------------------------------------------------


def test_noise_only_step_has_the_calibrated_std(tiny_cfg):
    _, model, _ = _setup(tiny_cfg, 1)
    sigma, clip, expected_batch_size = 0.7, 2.5, 12.5
    std = sigma * clip / expected_batch_size
    engine = PrivateGradientEngine(
        model, expected_batch_size, clip, sigma, torch.Generator().manual_seed(7)
    )
    params = _trainable(model)
    draws = {name: [] for name in params}
    try:
        for _ in range(200):  # the tiny model has ~2k trainable coordinates: 200 draws of them
            for p in params.values():
                p.grad = None
            assert engine.finalize(0) is True  # an empty batch still takes a step
            for name, p in params.items():
                assert p.grad is not None and p.grad.shape == p.shape, name
                draws[name].append(p.grad.detach().clone().flatten())
    finally:
        engine.detach()
    per_tensor = {name: torch.stack(d).double() for name, d in draws.items()}
    everything = torch.cat([d.flatten() for d in per_tensor.values()])
    assert everything.numel() > 400_000
    assert float(everything.mean()) == pytest.approx(0.0, abs=0.01 * std)
    assert float(everything.std()) == pytest.approx(std, rel=0.01)
    for name, d in per_tensor.items():  # every tensor is noised, with the same std
        tol = 5 / math.sqrt(2 * d.numel())  # five standard errors of an empirical std
        assert float(d.std()) == pytest.approx(std, rel=tol), name
        assert not torch.equal(d[0], d[1]), f"{name}: the same noise in two steps"
    first = list(per_tensor.values())
    assert not torch.equal(first[0][0], first[2][0])  # query and value lora_A: not shared


def test_noise_added_to_a_real_batch_has_the_calibrated_std(tiny_cfg):
    n = 8
    cfg, model, data = _setup(tiny_cfg, n)
    _no_dropout(model)
    model.train()
    sigma, clip, expected_batch_size = 1.3, 0.01, 6.0
    batch = data.batch(torch.arange(n), CPU)
    weights = _weights(cfg)

    def gradient(noise_multiplier: float, seed: int) -> torch.Tensor:
        engine = PrivateGradientEngine(
            model, expected_batch_size, clip, noise_multiplier, torch.Generator().manual_seed(seed)
        )
        try:
            model.zero_grad(set_to_none=True)
            engine.backward(per_sample_losses(engine.module, batch, weights))
            engine.finalize(n)
        finally:
            engine.detach()
        assert engine.last_clipped_fraction == 1.0
        return torch.cat([p.grad.detach().flatten().double() for p in _trainable(model).values()])

    clean = gradient(0.0, 0)
    # All records clipped to C: the noise-free sum has norm at most n * C.
    assert 0 < float(clean.norm()) * expected_batch_size <= n * clip * (1 + 1e-5)
    noisy = gradient(sigma, 1)
    difference = noisy - clean
    assert float(difference.std()) == pytest.approx(
        sigma * clip / expected_batch_size, rel=5 / math.sqrt(2 * difference.numel())
    )
    std = sigma * clip / expected_batch_size
    # Five standard errors of an empirical mean (on MiniLM's 13k coordinates this was written
    # as 0.05 std, about 5.7 standard errors; the tiny model has ~2k coordinates).
    assert float(difference.mean()) == pytest.approx(0.0, abs=5 * std / math.sqrt(difference.numel()))
    # Same seed, same noise (the generator passed in is the only source of randomness).
    again = gradient(sigma, 1)
    assert torch.allclose(again, noisy, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(gradient(sigma, 2), noisy)


# ---------------------------------------------------------------------------------------------
# 4. Empty Poisson batches
# ---------------------------------------------------------------------------------------------


class CountingEncoded(Encoded):
    """Records every batch the training loop actually draws (non-empty ones only)."""

    def slots(self, index, device):
        self.sizes.append(len(index))
        return super().slots(index, device)


class _CountingOptimizer:
    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner, self.steps = inner, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.steps += 1
        self.inner.step()


def _spy_optimizers(monkeypatch) -> list[_CountingOptimizer]:
    made: list[_CountingOptimizer] = []
    real = training.make_optimizer

    def make(params, cfg):
        made.append(_CountingOptimizer(real(params, cfg)))
        return made[-1]

    monkeypatch.setattr(training, "make_optimizer", make)
    return made


def _counting(data: Encoded) -> CountingEncoded:
    counted = CountingEncoded(data.input_ids, data.attention_mask, data.labels, data.pad_token_id)
    counted.sizes = []
    return counted


@pytest.mark.parametrize("private", [True, False], ids=["private", "non-private"])
def test_empty_poisson_batches(tiny_cfg, monkeypatch, private):
    n, steps = 16, 12
    cfg, model, data = _setup(tiny_cfg, n)
    weights = _weights(cfg)

    def engine_for():
        if private:
            return PrivateGradientEngine(model, 0.5, 1.0, 1.0, torch.Generator().manual_seed(3))
        return GradientEngine(model, 0.5)

    # Mostly empty batches: q * n = 0.5 records expected per batch.
    mixed = _counting(data)
    optimizers = _spy_optimizers(monkeypatch)
    engine = engine_for()
    try:
        stats = train_local(
            engine, mixed, cfg, 0.5 / n, steps, weights, torch.Generator().manual_seed(5)
        )
    finally:
        engine.detach()
    # The private engine first runs one coverage probe (2 records, discarded, no step).
    probe = 1 if private else 0
    assert mixed.sizes[:probe] == [2] * probe
    nonempty = len(mixed.sizes) - probe
    assert stats.steps == steps
    assert stats.empty_batches == steps - nonempty
    assert steps / 2 < stats.empty_batches < steps  # mostly, but not only, empty
    assert stats.examples == sum(mixed.sizes[probe:])
    assert optimizers[-1].steps == (steps if private else nonempty)

    # Only empty batches: the private engine still moves every trainable tensor (noise only),
    # the non-private one takes no step at all.
    before = trainable_state(model)
    empty = _counting(data)
    engine = engine_for()
    try:
        stats = train_local(engine, empty, cfg, 1e-9, 5, weights, torch.Generator().manual_seed(5))
    finally:
        engine.detach()
    assert empty.sizes == [2] * probe and stats.empty_batches == 5 and stats.examples == 0
    assert stats.mean_loss == 0.0
    after = trainable_state(model)
    assert optimizers[-1].steps == (5 if private else 0)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == private, f"{name}: changed={changed}"


# ---------------------------------------------------------------------------------------------
# 5. The adapter really changes (Opacus issue 820)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [(), ("lora=ffa",)], ids=["vanilla", "ffa"])
def test_train_local_changes_the_adapter(tiny_cfg, overrides):
    n = 16
    cfg, model, data = _setup(tiny_cfg, n, *overrides)
    probe = data.batch(torch.arange(4), CPU)

    def logits() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
            return out.logits

    start_logits, start = logits(), trainable_state(model)
    lora_b = [name for name in start if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(start[name]) == 0 for name in lora_b)

    # Noise-free DP-SGD (sigma = 0): any change comes from the clipped gradients, not noise.
    for round_ in range(2):  # a cached model is reused next round: hooks must come off
        engine = PrivateGradientEngine(model, 0.5 * n, 1.0, 0.0, torch.Generator().manual_seed(0))
        try:
            stats = train_local(
                engine, data, cfg, 0.5, 3, _weights(cfg), torch.Generator().manual_seed(round_)
            )
        finally:
            engine.detach()
        assert stats.empty_batches == 0
    end = trainable_state(model)  # what a client would send
    for name in lora_b:
        assert torch.count_nonzero(end[name]) > 0, f"{name} never updated"
    for name in start:
        assert not torch.equal(start[name], end[name]), f"{name} never updated"
    assert not torch.allclose(logits(), start_logits)  # the forward pass uses the new weights
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 6. Per-sample losses from logits (privacy unit = one record)
# ---------------------------------------------------------------------------------------------


class LogitsStub(nn.Module):
    """Returns fixed logits, like a Hugging Face model's output object."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape[0] == self.logits.shape[0]
        return SimpleNamespace(logits=self.logits)


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_sum = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_sum for v in row]


def test_per_sample_losses_for_token_labels():
    gen = torch.Generator().manual_seed(0)
    batch_size, length, vocab = 3, 7, 11
    logits = torch.randn(batch_size, length, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (batch_size, length), generator=gen)
    # Prompt tokens (and padding) are -100; records have 4, 1 and 5 response tokens.
    labels[0, :3] = IGNORE
    labels[1, :5] = IGNORE
    labels[1, 6] = IGNORE
    labels[2, :2] = IGNORE
    batch = {
        "input_ids": torch.zeros(batch_size, length, dtype=torch.long),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": labels,
    }
    losses = per_sample_losses(LogitsStub(logits), batch, None)
    assert losses.shape == (batch_size,)

    expected, counts = [], []
    for i in range(batch_size):
        terms = []
        for t in range(1, length):  # logits at t-1 predict token t
            if int(labels[i, t]) != IGNORE:
                terms.append(-_log_softmax(logits[i, t - 1].tolist())[int(labels[i, t])])
        expected.append(sum(terms) / len(terms))
        counts.append(len(terms))
    assert counts == [4, 1, 5]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    # Not the batch's token mean (what the model's own .loss would give), for any record.
    token_mean = sum(e * c for e, c in zip(expected, counts)) / sum(counts)
    assert all(abs(loss - token_mean) > 1e-3 for loss in losses.tolist())


def test_per_sample_losses_for_classification_are_per_record():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=gen)
    labels = torch.tensor([0, 2, 1, 1, 0])
    weights = torch.tensor([0.5, 2.0, 1.5])
    batch = {
        "input_ids": torch.zeros(5, 4, dtype=torch.long),
        "attention_mask": torch.ones(5, 4, dtype=torch.long),
        "labels": labels,
    }
    losses = per_sample_losses(LogitsStub(logits), batch, weights)
    assert losses.shape == (5,)
    expected = [
        -float(weights[y]) * _log_softmax(logits[i].tolist())[int(y)] for i, y in enumerate(labels)
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    # Record i's loss depends on record i only: its gradient w.r.t. the logits is zero elsewhere.
    leaf = logits.clone().requires_grad_(True)
    per_sample_losses(LogitsStub(leaf), batch, weights)[2].backward()
    assert torch.count_nonzero(leaf.grad[[0, 1, 3, 4]]) == 0
    assert torch.count_nonzero(leaf.grad[2]) == 3


# ---------------------------------------------------------------------------------------------
# 7. Record weights (class weighting under DP) multiply the clipped gradient, never exceed C
# ---------------------------------------------------------------------------------------------


def test_record_weights_scale_clipped_gradients_and_keep_sensitivity(tiny_cfg):
    n = 6
    cfg, model, data = _setup(tiny_cfg, n)
    _no_dropout(model)
    model.train()
    params = _trainable(model)
    clip = 1e-3  # far below every record's gradient norm: all records are clipped
    weights = torch.tensor([0.25, 1.0, 0.5, 1.0, 0.75, 0.4])

    def summed(w: torch.Tensor | None, index: torch.Tensor) -> dict[str, torch.Tensor]:
        engine = PrivateGradientEngine(model, 1.0, clip, 0.0, torch.Generator())
        try:
            engine.backward(per_sample_losses(engine.module, data.batch(index, CPU), None), w)
            engine.finalize(len(index))
            assert engine.last_clipped_fraction == 1.0
        finally:
            engine.detach()
        return {name: p.grad.detach().double().clone() for name, p in params.items()}

    singles = [summed(None, torch.tensor([i])) for i in range(n)]
    for i, grads in enumerate(singles):  # unweighted: every clipped record has norm exactly C
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        assert float(norm) == pytest.approx(clip, rel=1e-3)
        weighted = summed(weights[i : i + 1], torch.tensor([i]))
        w_norm = torch.sqrt(sum(g.pow(2).sum() for g in weighted.values()))
        assert float(w_norm) == pytest.approx(clip * float(weights[i]), rel=1e-3)  # <= C
    got = summed(weights, torch.arange(n))
    for name in params:
        want = sum(float(weights[i]) * singles[i][name] for i in range(n))
        # atol 1e-6 C: batched and single records differ by float32 rounding (other padding widths)
        assert torch.allclose(got[name], want, rtol=1e-4, atol=1e-6 * clip), (name, float((got[name] - want).abs().max()))


def test_record_weights_outside_unit_interval_are_refused(tiny_cfg):
    _, model, data = _setup(tiny_cfg, 2)
    model.train()
    engine = PrivateGradientEngine(model, 1.0, 1.0, 0.0, torch.Generator())
    try:
        losses = per_sample_losses(engine.module, data.batch(torch.arange(2), CPU), None)
        with pytest.raises(ValueError, match="<= C"):
            engine.backward(losses, torch.tensor([1.0, 1.78]))
    finally:
        engine.detach()
