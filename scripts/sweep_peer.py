"""The `dp-lora` package (a peer: centralized DP LoRA for HF transformers) on exactly the split of
each sweep cell (scripts/sweep.py), for issue 13's "the dp-lora package at the same epsilon".

One party holds every training record of the cell (the peer has no federation) and trains the
default model (all-MiniLM-L6-v2 from the offline package) with dp-lora's documented recipe, as its
README and examples/sst2_roberta.py state it: LoRA r=8, alpha=16, dropout 0 on query/value, method
vanilla (its better one at rank 8), AdamW lr 5e-4, 3 epochs, logical batch 256 (Poisson, through
its engine), physical batch 32 (its VirtualBatchManager), max_grad_norm 1.0, noise calibrated by
make_private_with_epsilon. Records are the package's own rendering, cut at the task's
train.max_length (conf/data); the central test set is the cell's.

Delta is ours, not dp-lora's N^-1.1: the sweep's centralized cell (one ledger over all N training
records) accounts at 1 / (10 N) (node_policy.resolve_delta), which is stricter than each federated
client's 1 / (10 N / 3). The recorded epsilon is what dp-lora's own accountant reports at that delta
after training (engine.get_epsilon()), not the target.

Two variants (`variant` column):
  dp          the row in docs/results.md: dp-lora's clipping covers everything that trains. The
              head stays frozen at its seeded random initialization (dp-lora's README quick start:
              LoraConfig without task_type), because dp-lora clips and noises only LoRA factors
              and a trained head would take raw gradients; and the loss handed to backward is the
              sum of the records' losses, so the per-sample gradient dp-lora clips is each record's
              own (a mean loss scales it by 1/micro-batch, a size that depends on which records
              were sampled). Both are choices of how we call the package; its code is untouched.
  as-shipped  its example verbatim (task_type SEQ_CLS: the head trains on unclipped, unnoised
              gradients; model(**batch).loss, a mean): NOT differentially private, measured only
              to show what the example's recipe gives (scripts/peer_findings.py shows why).

Needs the bench extra (pyproject.toml), never the main install.

    .venv/bin/python scripts/sweep_peer.py --seeds 0             # the six seed-0 cells
    .venv/bin/python scripts/sweep_peer.py --seeds 1 2           # more seeds; done cells are skipped
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# dp-lora's documented recipe (README "Experimental Results", examples/sst2_roberta.py).
RECIPE = dict(
    rank=8,
    alpha=16,
    targets=["query", "value"],
    method="vanilla",
    lr=5e-4,
    epochs=3,
    logical_batch=256,
    physical_batch=32,
    max_grad_norm=1.0,
)
VARIANTS = ("dp", "as-shipped")
FIELDS = [
    "group",
    "task",
    "target_epsilon",
    "variant",
    "seed",
    "records",
    "max_length",
    "delta",
    "noise_multiplier",
    "steps",
    "epsilon_measured",
    "balanced_accuracy",
    "accuracy",
    "macro_f1",
    "auc",
    "seconds",
]
KEY = ("task", "target_epsilon", "variant", "seed")


class Records(torch.utils.data.Dataset):
    """Rows of an Encoded as (input_ids, attention_mask, label): Opacus' Poisson loader reads
    dataset[0] as a tuple to shape an empty batch."""

    def __init__(self, encoded) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.encoded
        return e.input_ids[i], e.attention_mask[i], e.labels[i]


def collate(rows: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Stack, then cut the padding past the longest record: with right padding and the attention
    mask, no record's logits or gradients change (only the time taken)."""
    ids, mask, labels = (torch.stack(column) for column in zip(*rows, strict=True))
    width = max(int(mask.sum(dim=1).max()), 1)
    return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width], "labels": labels}


def peer_model(seed: int, variant: str):
    """MiniLM with dp-lora's LoRA config; the head is seeded random (HF's initialization)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from fed_dp_lora.console import quiet_loading
    from fed_dp_lora.models import source_of

    torch.manual_seed(seed)
    with quiet_loading():
        base = AutoModelForSequenceClassification.from_pretrained(source_of("minilm"), num_labels=2)
    config = LoraConfig(
        r=RECIPE["rank"],
        lora_alpha=RECIPE["alpha"],
        target_modules=RECIPE["targets"],
        lora_dropout=0.0,
        bias="none",
        task_type="SEQ_CLS" if variant == "as-shipped" else None,
    )
    return get_peft_model(base, config)


def batch_loss(model, batch: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """as-shipped: the model's own loss (mean over the micro-batch); dp: the sum of record losses."""
    if variant == "as-shipped":
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="sum")


def train(model, data, epsilon: float, delta: float, seed: int, variant: str, label: str):
    """dp-lora's engine and training loop (its README's virtual-batch loop); returns the engine."""
    from dp_lora import DPLoRAEngine
    from dp_lora.data.virtual_batch import VirtualBatchManager

    loader = torch.utils.data.DataLoader(
        Records(data),
        batch_size=RECIPE["logical_batch"],
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    engine = DPLoRAEngine()
    model, dp_optimizer, loader = engine.make_private_with_epsilon(
        model=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=epsilon,
        target_delta=delta,
        epochs=RECIPE["epochs"],
        max_grad_norm=RECIPE["max_grad_norm"],
        method=RECIPE["method"],
        poisson_sampling=True,
    )
    for epoch in range(1, RECIPE["epochs"] + 1):
        model.train()
        started, total, seen = time.time(), 0.0, 0
        with VirtualBatchManager(
            data_loader=loader, max_physical_batch_size=RECIPE["physical_batch"], optimizer=dp_optimizer
        ) as physical:
            for batch in physical:
                dp_optimizer.zero_grad()
                loss = batch_loss(model, batch, variant)
                loss.backward()
                dp_optimizer.step(engine.grad_sample_module.get_per_sample_grads())
                engine.grad_sample_module.clear_per_sample_grads()
                size = len(batch["labels"])
                total, seen = total + float(loss.detach()) * (size if variant == "as-shipped" else 1), seen + size
        print(
            f"  {label} epoch {epoch}/{RECIPE['epochs']}: mean record loss {total / max(seen, 1):.4f}, "
            f"{engine.accountant.steps} steps, epsilon so far {engine.get_epsilon():.3f} "
            f"({time.time() - started:.0f}s)",
            flush=True,
        )
    return engine, dp_optimizer


def run_cell(task: str, eps: str, seed: int, variant: str) -> dict:
    """Train on the cell's training side, score on its central test set."""
    from sweep_baselines import cell_split

    from fed_dp_lora.models import load_tokenizer
    from fed_dp_lora.training import encode, evaluate

    started = time.time()
    train_table, test_table, cfg = cell_split(task, seed)
    tokenizer = load_tokenizer(cfg)
    records = len(train_table)
    delta = 1.0 / (10.0 * records)  # the sweep's centralized ledger: node_policy.resolve_delta
    model = peer_model(seed, variant)
    label = f"peer {task} eps={eps} seed={seed} {variant}"
    engine, dp_optimizer = train(model, encode(train_table, tokenizer, cfg), float(eps), delta, seed, variant, label)
    metrics = evaluate(model, encode(test_table, tokenizer, cfg), 32)
    return {
        "group": "peer",
        "task": task,
        "target_epsilon": eps,
        "variant": variant,
        "seed": seed,
        "records": records,
        "max_length": int(cfg.train.max_length),
        "delta": f"{delta:.4g}",
        "noise_multiplier": f"{dp_optimizer.noise_multiplier:.4f}",
        "steps": engine.accountant.steps,
        "epsilon_measured": f"{engine.get_epsilon():.4f}",
        **{k: f"{metrics[k]:.4f}" for k in ("balanced_accuracy", "accuracy", "macro_f1", "auc")},
        "seconds": f"{time.time() - started:.1f}",
    }


def main() -> None:
    from sweep import append_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep" / "peer.csv")
    parser.add_argument("--tasks", nargs="+", default=["credit", "reviews"], choices=["credit", "reviews"])
    parser.add_argument("--epsilons", nargs="+", default=["1", "4", "8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variant", default="dp", choices=VARIANTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # dp-lora's and transformers' per-call notices
    # dp-lora hooks LoRA Linears whose inputs need no grad; torch notes that on every backward.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    done = set()
    if args.out.exists():
        done = {tuple(r[k] for k in KEY) for r in csv.DictReader(args.out.open())}
    todo = [
        (t, e, s)
        for s in args.seeds
        for t in args.tasks
        for e in args.epsilons
        if (t, e, args.variant, str(s)) not in done
    ]
    print(f"peer: {len(todo)} cells to run, {len(done)} already in {args.out}", flush=True)
    for i, (task, eps, seed) in enumerate(todo, 1):
        row = run_cell(task, eps, seed, args.variant)
        append_rows(args.out, [row], FIELDS)
        print(
            f"[{i}/{len(todo)}] peer {task} eps={eps} seed={seed} {args.variant}: "
            f"bal_acc={row['balanced_accuracy']} auc={row['auc']} eps_measured={row['epsilon_measured']} "
            f"(sigma={row['noise_multiplier']}, {row['steps']} steps, {row['seconds']}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
