"""Cost of one DP-SGD step over a non-private LoRA step, on the same model, batch and clipping.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/bench_dp_step.py \
        [--lora vanilla|ffa] [--quantization none|4|8] [--batch 32] [--seq 64] [--steps 30]

Variants, all through our training code (per_sample_losses, engine.backward/finalize,
optimizer.step):
  nodp    GradientEngine: the non-private LoRA step (the baseline)
  fused   PrivateGradientEngine(per_sample="fused"): per-record gradients built inside the one
          backward (fed_dp_lora.privacy.per_sample)
  opacus  PrivateGradientEngine(per_sample="opacus"): Opacus GradSampleModule hooks
  dplora  the `dp-lora` PyPI package (a peer), only with --dp-lora and when it imports: its
          hooks and DPOptimizer. It gives the classification head no per-sample gradient (the
          head is stepped unclipped and un-noised: a privacy leak); the check below says so.

First, on one batch, the per-sample scale is checked: the fused per-record gradients must sum
to the non-private gradient (times the batch size: one record, not one token, is the unit),
and Opacus' per-record gradients and clipped sum must match the fused ones. Only then is
anything timed. Time: all variants in this one process, interleaved round-robin (the order
rotates every round) so that drift (thermal, the other tenant's load) hits all of them alike;
attaching and detaching an engine is outside the timed region. Memory: each variant in a
fresh subprocess (this script with --variant X --measure-memory), see measure_memory().

The head cannot be frozen through the config (models.py always trains it for classification),
so there is no --no-head mode. Ends with one line of key=value pairs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fed_dp_lora.config import load_config  # noqa: E402
from fed_dp_lora.client_data import cached_model  # noqa: E402
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine  # noqa: E402
from fed_dp_lora.training import make_optimizer, per_sample_losses  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
VARIANTS = ("nodp", "fused", "opacus", "dplora")
MALLOC_ENV = {
    # A fixed mmap threshold (setting it turns off glibc's dynamic one): every block of
    # 128 KiB or more is mmapped and unmapped on free, so memory freed after the warm-up step
    # leaves RSS, and each timed step's activations and gradients show up in the peak
    # instead of hiding in free lists that the warm-up step already grew.
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", choices=["vanilla", "ffa"], default="vanilla")
    ap.add_argument("--quantization", choices=["none", "4", "8"], default="none")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64, help="tokens per record (no padding)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--mem-steps", type=int, default=5, help="steps per memory subprocess")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--keep-layers", type=int, default=None, help="truncate the model (smoke runs)")
    ap.add_argument("--overrides", default="", help="extra config overrides, e.g. 'lora.r=16'")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: a CUDA GPU when there is one (then memory is torch's peak allocation)")
    ap.add_argument("--dp-lora", action="store_true", help="add the dp-lora package as a variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--measure-memory",
        "--lora", args.lora, "--quantization", args.quantization, "--batch", str(args.batch),
        "--seq", str(args.seq), "--mem-steps", str(args.mem_steps), "--clip", str(args.clip),
        "--sigma", str(args.sigma), "--overrides", args.overrides, "--threads", str(args.threads),
    ]
    if args.keep_layers is not None:
        argv += ["--keep-layers", str(args.keep_layers)]
    return argv


# ---------------------------------------------------------------------------------------------
# Model, batch, variants
# ---------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace):
    overrides = ["recipe=lora", f"lora={args.lora}", f"model.quantization={args.quantization}",
                 f"train.max_length={args.seq}", f"train.device={args.device}"]
    if args.keep_layers is not None:
        overrides.append(f"model.keep_layers={args.keep_layers}")
    cfg = load_config({"overrides": " ".join(overrides) + " " + args.overrides})
    model = cached_model(cfg)
    model.train()
    # B and the head start at zero, which makes every LoRA gradient zero: move them off zero
    # so that the agreement check below compares something (the cost is the same either way).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "modules_to_save" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg.model.task == "classification":
        batch["labels"] = torch.randint(0, int(model.config.num_labels), (args.batch,), generator=gen)
    else:
        batch["labels"] = ids.clone()
    return cfg, model, batch


class Variant:
    """One way to take a step; attach/detach are not timed, step is."""

    def __init__(self, name: str, model: nn.Module, cfg, args: argparse.Namespace) -> None:
        self.name, self.model, self.args = name, model, args
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        self.engine = None
        if name == "dplora":
            from dp_lora import DPOptimizer

            self.optimizer = DPOptimizer(
                self.optimizer, noise_multiplier=args.sigma, max_grad_norm=args.clip,
                expected_batch_size=args.batch, generator=torch.Generator().manual_seed(1),
            )

    def attach(self, noise_multiplier: float | None = None) -> None:
        sigma = self.args.sigma if noise_multiplier is None else noise_multiplier
        b = float(self.args.batch)
        if self.name == "nodp":
            self.engine = GradientEngine(self.model, b)
        elif self.name in ("fused", "opacus"):
            self.engine = PrivateGradientEngine(
                self.model, b, self.args.clip, sigma, torch.Generator().manual_seed(1),
                per_sample=self.name,
            )
        else:
            from dp_lora import GradSampleModule as DPLoraGSM

            self.engine = DPLoraGSM(self.model, method=self.args.lora)

    def detach(self) -> None:
        if self.name == "dplora":
            self.engine.clear_per_sample_grads()
            self.engine.remove_hooks()
        else:
            self.engine.detach()
        self.engine = None

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        if self.name == "dplora":
            per_sample_losses(self.model, batch, None).sum().backward()
        else:
            self.engine.backward(per_sample_losses(self.engine.module, batch, None))

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad()
        self.forward_backward(batch)
        if self.name == "dplora":
            self.optimizer.step(self.engine.get_per_sample_grads())
            self.engine.clear_per_sample_grads()
        elif self.engine.finalize(self.args.batch):
            self.optimizer.step()


# ---------------------------------------------------------------------------------------------
# The per-sample scale, checked first
# ---------------------------------------------------------------------------------------------


def _per_sample_and_sum(v: Variant, batch) -> tuple[dict, dict]:
    """(per-record gradients, p.grad after the step's finalize) on `batch`, noise-free."""
    names = {p: n for n, p in v.model.named_parameters() if p.requires_grad}
    v.attach(noise_multiplier=0.0)
    try:
        v.model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)  # the same dropout masks for every variant
        if v.name == "dplora":
            v.forward_backward(batch)
            per = {names[p]: g.detach().float().clone() for p, g in v.engine.get_per_sample_grads()}
            return per, {}
        flat = v.engine.per_sample_gradients(per_sample_losses(v.engine.module, batch, None))
        per = {v.engine.names[p]: g.view(-1, *p.shape).clone() for p, g in zip(v.engine.params, flat)}
        torch.manual_seed(1234)
        v.forward_backward(batch)  # the same batch again, now clipped into the step's sum
        v.engine.finalize(v.args.batch)
        return per, {n: p.grad.detach().clone() for p, n in names.items()}
    finally:
        v.detach()
        v.model.zero_grad(set_to_none=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def check_agreement(variants: dict[str, Variant], batch, tol: float = 1e-4) -> list[str]:
    """Raise unless fused per-record gradients are exact; return notes on other variants."""
    notes = []
    ref_per, ref_sum = _per_sample_and_sum(variants["fused"], batch)
    # The non-private gradient is (sum of per-record gradients) / batch size: same scale.
    nodp = variants["nodp"]
    nodp.attach()
    try:
        nodp.model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        nodp.forward_backward(batch)
        plain = {n: p.grad.detach().clone() for n, p in nodp.model.named_parameters() if p.requires_grad}
    finally:
        nodp.detach()
        nodp.model.zero_grad(set_to_none=True)
    if set(plain) != set(ref_per):
        raise SystemExit(f"fused: per-sample gradients for {sorted(ref_per)} but trainable {sorted(plain)}")
    worst = max(_rel(ref_per[n].sum(0) / nodp.args.batch, plain[n]) for n in plain)
    if worst > tol:
        raise SystemExit(f"per-sample scale: fused per-record sum / B vs non-private grad, rel {worst:.1e}")
    notes.append(f"fused: sum of per-record grads / B == non-private grad (max rel diff {worst:.1e})")
    for name in ("opacus", "dplora"):
        if name not in variants:
            continue
        per, summed = _per_sample_and_sum(variants[name], batch)
        missing = sorted(set(ref_per) - set(per))
        common = [n for n in ref_per if n in per]
        worst = max(_rel(per[n], ref_per[n]) for n in common)
        if worst > tol:
            raise SystemExit(f"{name}: per-record gradients differ from fused (max rel {worst:.1e})")
        note = f"{name}: per-record grads == fused on {len(common)} tensors (max rel diff {worst:.1e})"
        if summed:
            worst_sum = max(_rel(summed[n], ref_sum[n]) for n in ref_sum)
            if worst_sum > tol:
                raise SystemExit(f"{name}: clipped sum differs from fused (max rel {worst_sum:.1e})")
            note += f"; clipped sum == fused (max rel diff {worst_sum:.1e})"
        if missing:
            note += f"; NO per-record gradient for {missing} (stepped unclipped, un-noised)"
        notes.append(note)
    return notes


# ---------------------------------------------------------------------------------------------
# Time (one process, interleaved) and memory (one subprocess per variant)
# ---------------------------------------------------------------------------------------------


def time_variants(variants: dict[str, Variant], batch, steps: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for round_ in range(warmup + steps):
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            v = variants[name]
            v.attach()
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            v.step(batch)
            elapsed = time.perf_counter() - start
            gc.enable()
            v.detach()
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS while taking steps, over the RSS after model load and one warm-up step.

    Method: reset the kernel's high-water mark (write 5 to /proc/self/clear_refs) after the
    warm-up step, then read VmHWM after the steps. The kernel updates VmHWM on every page
    it maps, so no short peak is missed (a sampling thread can miss one between samples), and
    the reset excludes the model-loading peak (getrusage's ru_maxrss is a high-water mark
    since process start and cannot be reset: the loading peak, larger than a step's,
    would hide the steps entirely). Where clear_refs cannot be written, we fall back to a
    thread sampling VmRSS every millisecond.
    """
    torch.set_num_threads(args.threads)
    cfg, model, batch = setup(args)
    v = Variant(args.variant, model, cfg, args)
    v.attach()
    v.step(batch)  # warm-up: lazy inits, optimizer state, allocator
    gc.collect()
    if next(model.parameters()).device.type == "cuda":  # GPU memory is the allocator's, not RSS
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.mem_steps):
            v.step(batch)
        top = torch.cuda.max_memory_allocated()
        v.detach()
        return {"base_mb": base / 2**20, "peak_mb": top / 2**20, "growth_mb": (top - base) / 2**20,
                "method": "torch.cuda.max_memory_allocated"}
    base = _status_kb("VmRSS")
    sampler = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        import threading

        peak, stop = [base], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _status_kb("VmRSS"))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        method = "VmRSS sampled every 1 ms"
    for _ in range(args.mem_steps):
        v.step(batch)
    if sampler is None:
        top = _status_kb("VmHWM")
    else:
        stop.set()
        sampler.join()
        top = peak[0]
    v.detach()
    return {"base_mb": base / 1024, "peak_mb": top / 1024, "growth_mb": (top - base) / 1024, "method": method}


def memory_in_subprocess(args: argparse.Namespace, variant: str) -> dict[str, float]:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    out = subprocess.run(child_argv(args, variant), env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    raise RuntimeError(f"memory subprocess for {variant} failed:\n{out.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure_memory:
        print("MEMORY " + json.dumps(measure_memory(args)), flush=True)
        return
    torch.set_num_threads(args.threads)
    names = ["nodp", "fused", "opacus"]
    if args.dp_lora:
        try:
            import dp_lora  # noqa: F401

            names.append("dplora")
        except ImportError as err:
            print(f"dp-lora variant skipped: {err}")
    cfg, model, batch = setup(args)
    variants = {name: Variant(name, model, cfg, args) for name in names}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {cfg.model.name} lora={args.lora} quantization={args.quantization} "
          f"layers={model.config.num_hidden_layers} trainable={trainable} "
          f"batch={args.batch}x{args.seq} clip={args.clip} sigma={args.sigma} threads={args.threads}")
    for note in check_agreement(variants, batch):
        print("check  " + note)

    times = time_variants(variants, batch, args.steps, args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    memory = {} if args.no_memory else {name: memory_in_subprocess(args, name) for name in names}

    tokens = args.batch * args.seq
    print(f"\n{'variant':8} {'median ms':>10} {'tokens/s':>9} {'vs nodp':>8} {'peak MB':>12} {'step MB':>8} "
          f"{'mem vs nodp':>12}")
    for name in names:
        row = f"{name:8} {1000 * medians[name]:10.1f} {tokens / medians[name]:9.0f} {medians[name] / medians['nodp']:8.3f}"
        if memory:
            m = memory[name]
            row += f" {m['peak_mb']:12.1f} {m['growth_mb']:8.1f} {m['peak_mb'] / memory['nodp']['peak_mb']:12.3f}"
        print(row)
    if memory:
        print(f"(memory: {memory['nodp']['method']}; peak RSS while stepping, step MB = peak over "
              "the RSS after load + one warm-up step)")
    keys = {"dp_vs_nodp": "fused", "opacus_vs_nodp": "opacus", "dplora_vs_nodp": "dplora"}
    device = next(model.parameters()).device.type
    pairs = [f"device={device}", f"dp_tokens_per_s={tokens / medians['fused']:.0f}"]
    for key, name in keys.items():
        if name not in medians:
            continue
        pairs.append(f"{key}_time={medians[name] / medians['nodp']:.3f}")
        if memory:
            pairs.append(f"{key}_mem={memory[name]['peak_mb'] / memory['nodp']['peak_mb']:.3f}")
    print(" ".join(pairs))


if __name__ == "__main__":
    main()
