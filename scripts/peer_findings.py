"""Why scripts/sweep_peer.py calls `dp-lora` 0.1.0 the way it does: three measurements on its own
classes (DPLoRAEngine, GradSampleModule, DPOptimizer, VirtualBatchManager's splitter, its noise
calibration), on the default model (all-MiniLM-L6-v2) and real credit records. Writes
results/sweep/peer-findings.txt.

1. Head: with task_type SEQ_CLS (its examples/sst2_roberta.py) PEFT trains the classification
   head, which dp-lora neither clips nor noises: after a step at a huge noise multiplier the head's
   gradient is still exactly the batch's raw gradient.
2. Mean loss: its hooks clip the gradient of the loss handed to backward. With model(**batch).loss
   (a mean, as its README and example do) each record's clipped vector is its gradient / b, b the
   size of the micro-batch it landed in, and b depends on which records Poisson sampling drew:
   adding one record to a logical batch of 256 re-splits it into 9 micro-batches instead of 8, so
   every other record's contribution grows. Measured on 256 copies of one record plus another, with
   the model's own head and with a head of unit scale (record gradients above max_grad_norm): with
   the latter the clipped sum moves by more than max_grad_norm, the sensitivity its accountant
   assumes, unless the loss is the sum of the records' losses.
3. Calibration: make_private_with_epsilon calibrates on q = batch / N and int(N / batch) steps per
   epoch, while its Poisson loader samples at 1 / len(loader); the epsilon its accountant reports
   after training differs from the target.

    .venv/bin/python scripts/peer_findings.py
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
C = 1.0  # dp-lora's documented max_grad_norm


def _records(count: int) -> dict[str, torch.Tensor]:
    from sweep_baselines import cell_split
    from sweep_peer import collate

    from fed_dp_lora.models import load_tokenizer
    from fed_dp_lora.training import encode

    train, _, cfg = cell_split("credit", 0)
    e = encode(train.iloc[:count], load_tokenizer(cfg), cfg)
    return collate(list(zip(e.input_ids, e.attention_mask, e.labels, strict=True)))


def _take(batch: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in batch.items()}


def _make_private(model, batch_size: int, noise_multiplier: float):
    """dp-lora's engine and DP optimizer over `model` (vanilla, max_grad_norm C, one fixed batch of
    `batch_size`, no Poisson sampling; SGD at lr 0: these measurements read gradients only)."""
    from dp_lora import DPLoRAEngine

    loader = torch.utils.data.DataLoader(range(batch_size), batch_size=batch_size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = DPLoRAEngine()
    _, dp_optimizer, _ = engine.make_private(
        model=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=C,
        method="vanilla",
        poisson_sampling=False,
    )
    return engine, dp_optimizer


def head_is_not_private(batch: dict[str, torch.Tensor]) -> list[str]:
    """One DP step of dp-lora at noise multiplier 1e4 on the as-shipped model: the LoRA
    gradients are noise, the head's equals the noise-free batch gradient."""
    from sweep_peer import peer_model

    model = peer_model(0, "as-shipped")
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    model.zero_grad()
    model(**batch).loss.backward()
    raw = head.grad.clone()
    engine, dp_optimizer = _make_private(model, len(batch["labels"]), 1e4)
    dp_optimizer.zero_grad()
    model(**batch).loss.backward()
    dp_optimizer.step(engine.grad_sample_module.get_per_sample_grads())
    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    return [
        "1. Head (task_type SEQ_CLS, as in its example): one dp-lora step at noise multiplier 1e4,",
        f"   head gradient after the step == raw batch gradient: {torch.equal(head.grad, raw)} "
        f"(norm {float(raw.norm()):.4f}); a LoRA B gradient's norm after the step: {float(lora.grad.norm()):.1f}",
        "   (noise). The head is trained on unclipped, unnoised gradients: the run is not DP.",
    ]


def _clipped_sum(model, engine, dp_optimizer, batch, loss: str) -> torch.Tensor:
    """dp-lora's clipped sum over one logical batch, split by its own virtual-batch splitter."""
    from dp_lora.data.virtual_batch import BatchSplittingSampler
    from sweep_peer import batch_loss

    dp_optimizer._summed_grads.clear()
    splitter = BatchSplittingSampler(
        sampler=[list(range(len(batch["labels"])))], max_batch_size=32, optimizer=dp_optimizer
    )
    for index in splitter:
        dp_optimizer._step_skip_queue.clear()
        model.zero_grad()
        batch_loss(model, _take(batch, index), "as-shipped" if loss == "mean" else "dp").backward()
        dp_optimizer.clip_and_accumulate(engine.grad_sample_module.get_per_sample_grads())
        engine.grad_sample_module.clear_per_sample_grads()
    return torch.cat([g.flatten() for g in dp_optimizer._summed_grads.values()])


def _private_parts(head_std: float | None):
    """The dp-variant model with LoRA B ~ N(0, 0.02) (at B = 0 the A factors get no gradient) and,
    if `head_std`, a head of that scale (a head a user brings); dp-lora at noise 0."""
    from sweep_peer import peer_model

    model = peer_model(0, "dp")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (head_std is not None and name.endswith("classifier.weight")):
                p.normal_(0, 0.02 if "lora_B" in name else head_std, generator=generator)
    engine, dp_optimizer = _make_private(model, 8, 0.0)
    return model, engine, dp_optimizer


def _first_norm(model, engine, batch, loss: str) -> float:
    """The norm of the first record's per-sample gradient as dp-lora's hooks compute it."""
    from sweep_peer import batch_loss

    model.zero_grad()
    batch_loss(model, batch, "as-shipped" if loss == "mean" else "dp").backward()
    grads = engine.grad_sample_module.get_per_sample_grads()
    engine.grad_sample_module.clear_per_sample_grads()
    return float(torch.sqrt(sum(g[0].pow(2).sum() for _, g in grads)))


def mean_loss_sensitivity(batch: dict[str, torch.Tensor]) -> list[str]:
    """How a record's clipped vector depends on its micro-batch, and what that does to
    ||S(B + x) - S(B)|| for B = 256 copies of one record r (x: another record)."""
    out = [
        "2. Mean loss (model(**batch).loss, as its README and example): r's per-sample gradient norm as dp-lora",
        "   computes it, alone with the sum loss, and in micro-batches of 32 and 29 with the mean loss; then the",
        f"   clipped sum over B = 256 copies of r and over B + x (split 8 x 32, then 9 x 28-29; max_grad_norm {C}):",
    ]
    copies, plus = [0] * 256, [0] * 256 + [256]
    for head_std, what in ((None, "its seeded head (std 0.02)"), (1.0, "a head of std 1")):
        model, engine, dp_optimizer = _private_parts(head_std)
        own = _first_norm(model, engine, _take(batch, [0]), "sum")
        in32, in29 = (_first_norm(model, engine, _take(batch, list(range(b))), "mean") for b in (32, 29))
        out.append(
            f"   {what}: own {own:.4f}; in 32: {in32:.5f} (own / {own / in32:.1f}); "
            f"in 29: {in29:.5f} (own / {own / in29:.1f})"
        )
        for loss in ("mean", "sum"):
            change = float(
                (
                    _clipped_sum(model, engine, dp_optimizer, _take(batch, plus), loss)
                    - _clipped_sum(model, engine, dp_optimizer, _take(batch, copies), loss)
                ).norm()
            )
            out.append(
                f"     loss={loss}: ||S(B+x) - S(B)|| = {change:.3f} = {change / C:.2f} x max_grad_norm "
                f"({'within' if change <= C * (1 + 1e-4) else 'ABOVE'} the sensitivity its accountant assumes)"
            )
    return out


def calibration() -> list[str]:
    """Target epsilon against what its accountant reports for the sampling its loader does."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant as rdp
    from dp_lora.accounting.accountant import RDP_ORDERS, get_noise_multiplier

    out = ["3. Calibration (3 epochs, logical batch 256, delta 1/(10 N); its example's drop_last=True loader):"]
    for task, n in (("credit", 3563), ("reviews", 4000)):
        for eps in (1.0, 4.0, 8.0):
            sigma = get_noise_multiplier(target_epsilon=eps, target_delta=1 / (10 * n), sample_rate=256 / n, epochs=3)
            q, steps = 1 / (n // 256), (n // 256) * 3
            acc = rdp.RdpAccountant(RDP_ORDERS)
            acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
            out.append(
                f"   {task} N={n} target {eps:g}: sigma {sigma:.4f} calibrated at q={256 / n:.5f}, "
                f"{int(n / 256) * 3} steps; loader q={q:.5f}, {steps} steps -> epsilon "
                f"{acc.get_epsilon(1 / (10 * n)):.3f}"
            )
    return out


def main() -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    import dp_lora

    batch = _records(257)
    lines = [f"dp-lora {dp_lora.__version__} on all-MiniLM-L6-v2, credit records (scripts/peer_findings.py)", ""]
    lines += head_is_not_private(_take(batch, slice(0, 32))) + [""]
    lines += mean_loss_sensitivity(batch) + [""] + calibration()
    text = "\n".join(lines) + "\n"
    (ROOT / "results" / "sweep" / "peer-findings.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
