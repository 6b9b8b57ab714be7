"""One private optimizer step: per-sample gradients, clipping to C, Gaussian noise sigma*C.

Per-sample gradients come, when every trainable tensor belongs to a plain nn.Linear (LoRA
factors and classification heads, also on bitsandbytes base models whose quantized layers are
frozen), from our fused path (:mod:`fed_dp_lora.privacy.per_sample`: built inside the one
backward, instead of the summed gradient, so DP costs about nothing over a non-private step);
otherwise from Opacus' GradSampleModule hooks. Clipping and noise are ours, because DP-SGD with
Poisson sampling must take a noise-only step on an empty batch, where Opacus' optimizer raises.
"""

from __future__ import annotations

import secrets
from typing import Protocol

import torch
from opacus import GradSampleModule
from torch import nn

from fed_dp_lora.privacy import per_sample as fused

PER_SAMPLE_MODES = ("auto", "fused", "opacus")


class CoverageError(RuntimeError):
    """A trainable tensor has no per-sample gradient: it would escape clipping and noise."""


class StepExtra(Protocol):
    """Records whose clipped gradient is known in advance (the audit's gradient canaries).

    Called once per logical step: flat vectors (one per trainable tensor, in the engine's
    order) to add to the step's clipped sum before the noise, or None when none is sampled.
    """

    def step_sum(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None: ...


def per_sample_path(model: nn.Module, per_sample: str) -> str:
    """ "fused" or "opacus": the path that gives every trainable tensor of `model` per-sample
    gradients, as `per_sample` asks; CoverageError when the asked path cannot."""
    if per_sample not in PER_SAMPLE_MODES:
        raise ValueError(f"per_sample must be one of {PER_SAMPLE_MODES}, not {per_sample!r}")
    uncovered = fused.uncovered_parameters(model) if per_sample != "opacus" else []
    if per_sample == "fused" and uncovered:
        raise CoverageError(
            f"per_sample='fused': trainable tensors {uncovered[:3]} are not in a plain "
            "nn.Linear, so the fused path cannot give them per-sample gradients. Fix: use "
            "per_sample='auto' or 'opacus', or freeze them"
        )
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if checkpointing and (per_sample == "opacus" or uncovered):
        raise CoverageError(
            "gradient checkpointing needs the fused per-sample path (Opacus' hooks fail on the "
            f"recomputed forward), and {'per_sample=opacus was asked' if not uncovered else uncovered[:3]} "
            "Fix: train.gradient_checkpointing=false, or train only Linear layers"
        )
    return "opacus" if per_sample == "opacus" or uncovered else "fused"


class GradientEngine:
    """Non-private gradients: the baseline through the same training code path."""

    private = False

    def __init__(self, model: nn.Module, expected_batch_size: float, extra: StepExtra | None = None) -> None:
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.expected_batch_size = expected_batch_size
        self.extra = extra

    def verify_coverage(self, per_sample_losses: torch.Tensor) -> None:
        """Nothing to verify: non-private gradients need no per-record coverage."""

    def backward(self, per_sample_losses: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Backprop the (weighted) sum of per-record losses over the expected batch size.

        A weight of 0 marks a padding row (fixed-shape batches): it contributes nothing.
        """
        losses = (
            per_sample_losses
            if weights is None
            else torch.where(weights > 0, per_sample_losses * weights, torch.zeros_like(per_sample_losses))
        )
        losses.sum().div(self.expected_batch_size).backward()

    def finalize(self, batch_size: int) -> bool:
        """Make p.grad ready for optimizer.step(); False means skip the step."""
        extra = self.extra.step_sum(self.params) if self.extra is not None else None
        for p, e in zip(self.params, extra or (), strict=extra is not None):
            e = e.div(self.expected_batch_size).view_as(p).to(p.device, p.dtype)
            p.grad = e if p.grad is None else p.grad.add_(e)
        return batch_size > 0 or extra is not None

    def detach(self) -> None:
        """Leave the model as it was (a cached model is reused next round)."""


class PrivateGradientEngine(GradientEngine):
    """DP-SGD gradients for every trainable tensor of `model`."""

    private = True

    def __init__(
        self,
        model: nn.Module,
        expected_batch_size: float,
        clip_norm: float,
        noise_multiplier: float,
        generator: torch.Generator | None = None,
        per_sample: str = "auto",
        extra: StepExtra | None = None,
    ) -> None:
        """`per_sample`: "fused" (our single-backward path; CoverageError if a trainable tensor
        is not in a plain nn.Linear), "opacus" (GradSampleModule hooks), or "auto" (fused when
        it covers every trainable tensor, else Opacus)."""
        super().__init__(model, expected_batch_size, extra)
        self.names = {p: n for n, p in model.named_parameters() if p.requires_grad}
        self.per_sample = per_sample_path(model, per_sample)
        self._fused: fused.FusedHandle | None = None
        if self.per_sample == "opacus":
            # loss_reduction="sum": we backprop the sum of per-sample losses, so grad_sample[i]
            # is exactly the gradient of record i's loss.
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        else:
            self._fused = fused.attach(model)  # self.module stays the model itself
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        device = self.params[0].device
        if generator is None:
            # Unpredictable noise: a seed known to the server would let it subtract the noise.
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63))
        self.generator = generator
        self.last_clipped_fraction = 0.0
        self.last_median_norm = 0.0
        self._sums: list[torch.Tensor] | None = None  # clipped sums of this logical step so far
        self._norms: list[torch.Tensor] = []

    def backward(self, per_sample_losses: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Clip each record's gradient and add it to this logical step's sum.

        Called once per micro-batch when a logical (Poisson) batch is processed in pieces
        (`train.micro_batch_size`): clipping is per record, so the sum is the same whichever
        way the batch is cut, and `finalize` adds the noise once per logical step.

        `weights` (each in [0, 1]) weight the records. A loss weight would be undone by
        clipping (a clipped gradient has norm C whatever its weight), so the weight multiplies
        the clipped gradient: record i adds w_i clip(g_i, C), of norm at most C w_i <= C. A
        weight of 0 marks a padding row of a fixed-shape batch: it adds exactly zero.

        A record whose gradient is not finite (a loss that overflows, e.g. under a crafted
        global adapter) also adds exactly zero, whatever its values: `0 * inf` would be NaN
        and poison the whole release, and any other treatment would depend on the record.
        The sum's sensitivity stays C.
        """
        if weights is not None and (weights.min() < 0 or weights.max() > 1):
            raise ValueError("clip weights must lie in [0, 1]: each record's bound is C * w <= C")
        flat = self.per_sample_gradients(per_sample_losses)
        # Squared norms per tensor, summed: no concatenation, no B x numel temporary.
        norms = torch.sqrt(sum(torch.linalg.vector_norm(g.float(), dim=1).square() for g in flat))
        keep = torch.isfinite(norms)
        factors = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        if weights is not None:
            factors = factors * weights.detach().float()  # w_i * clip(g_i, C): norm <= C * w_i <= C
            keep &= weights > 0
        factors = torch.where(keep, factors, torch.zeros_like(factors))
        sums = [factors @ torch.where(keep[:, None], g.float(), 0.0) for g in flat]
        self._sums = sums if self._sums is None else [a.add_(b) for a, b in zip(self._sums, sums, strict=True)]
        records = norms if weights is None else norms[weights > 0]
        self._norms.append(records.detach())

    def per_sample_gradients(self, per_sample_losses: torch.Tensor) -> list[torch.Tensor]:
        """Each record's gradient of every trainable tensor (B x numel, in `self.params` order),
        from one backward of the summed losses; raises CoverageError if one is missing."""
        if self._fused is not None:
            for p in self._fused.params:  # .grad_sample accumulates: start from nothing
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' convention
        per_sample_losses.sum().backward()
        return self._per_sample_grads(per_sample_losses.shape[0])

    def verify_coverage(self, per_sample_losses: torch.Tensor) -> None:
        """Refuse before the first step if any trainable tensor lacks a per-sample gradient.

        Runs one backward on a probe batch and discards it: nothing is updated or released.
        Checking only inside steps would let noise-only steps (empty batches) run first.
        """
        self.backward(per_sample_losses)
        self._sums, self._norms = None, []
        for p in self.params:
            p.grad = None

    def _per_sample_grads(self, batch_size: int) -> list[torch.Tensor]:
        grads = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None or gs.shape[0] != batch_size:
                raise CoverageError(
                    f"trainable tensor {self.names[p]} has no per-sample gradient for this batch; "
                    "it would not be clipped or noised. Refusing to train. Fix: freeze it, or use "
                    "a layer type Opacus supports (Linear, Embedding, LayerNorm, Conv)"
                )
            grads.append(gs.reshape(batch_size, -1))  # a view: grad_sample is contiguous
            p.grad_sample = None  # type: ignore[attr-defined]
            p.grad = None
        return grads

    def finalize(self, batch_size: int) -> bool:
        """Set p.grad = (sum_i clip(g_i) + extra + N(0, (sigma C)^2)) / expected batch size.

        `batch_size` is the number of records (not padding rows) in the logical step. One noise
        draw per logical step, however many micro-batches made the sum. An empty Poisson batch
        contributes a zero sum: the step is noise only, and it is still a step the accountant
        counts.
        """
        norms = torch.cat(self._norms) if self._norms else torch.zeros(0)
        if len(norms) != batch_size:
            raise RuntimeError(f"finalize({batch_size}) after backward over {len(norms)} records")
        if batch_size > 0:
            finite = norms[torch.isfinite(norms)]
            self.last_clipped_fraction = float((finite > self.clip_norm).float().mean()) if len(finite) else 0.0
            self.last_median_norm = float(finite.median()) if len(finite) else 0.0
        sums = self._sums or [torch.zeros(p.numel(), device=p.device) for p in self.params]
        extra = self.extra.step_sum(self.params) if self.extra is not None else None
        if extra is not None:  # before the noise: these records get the same mechanism as real ones
            sums = [s + e.to(s.device) for s, e in zip(sums, extra, strict=True)]
        self._sums, self._norms = None, []
        std = self.noise_multiplier * self.clip_norm
        for p, s in zip(self.params, sums, strict=True):
            noise = torch.normal(0.0, std, size=s.shape, device=s.device, generator=self.generator)
            p.grad = noise.add_(s).div_(self.expected_batch_size).view_as(p).to(p.dtype)
        return True

    def detach(self) -> None:
        """Remove the hooks or the fused forwards (a cached model is reused next round)."""
        if self._fused is not None:
            self._fused.remove()
            self._fused = None
        elif isinstance(self.module, GradSampleModule):
            self.module._close()
