"""Central evaluation time by batch size, on the default task's test set.

    .venv/bin/python scripts/bench_eval.py | tee results/perf/eval-batch.txt

Evaluates the same model on the same records with each batch size, the sizes interleaved
(every repeat runs each size once), and reports the median seconds per size against 256, the
old fixed default. eval.batch_size=auto uses fed_dp_lora.central.CPU_EVAL_BATCH on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fed_dp_lora.central import CPU_EVAL_BATCH, CentralEvaluator  # noqa: E402
from fed_dp_lora.config import compose_config, validate  # noqa: E402
from fed_dp_lora.models import load_trainable_state  # noqa: E402
from fed_dp_lora.training import Encoded, evaluate  # noqa: E402

BASELINE = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,16,32,64,128,256", help="batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the test set per size")
    ap.add_argument("--records", type=int, default=None, help="only the first N test records (smoke runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--overrides", default="", help="extra config overrides, e.g. 'train.max_length=128'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {BASELINE, CPU_EVAL_BATCH})

    cfg = compose_config(["recipe=lora", *args.overrides.split()])  # the LoRA model's forward is what it times
    validate(cfg)
    central = CentralEvaluator(cfg)  # the server's own model and test records
    model, data = central.model, central.test
    if args.records is not None:
        data = Encoded(data.input_ids[:args.records], data.attention_mask[:args.records], data.labels[:args.records])
    # B and the head start at zero, which predicts one constant for every record: a random
    # adapter makes the check below (same metrics at every batch size) mean something.
    gen = torch.Generator().manual_seed(0)
    load_trainable_state(model, {name: torch.randn(t.shape, generator=gen) * 0.1
                                 for name, t in central.initial_state().items()})
    print(f"model {cfg.model.name} records={len(data)} tokens<={cfg.train.max_length} threads={args.threads} "
          f"repeats={args.repeats}", flush=True)

    evaluate(model, data, CPU_EVAL_BATCH)  # warm-up
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    results: dict[int, dict[str, float]] = {}
    for repeat in range(args.repeats):
        for size in sizes:
            started = time.perf_counter()
            results[size] = evaluate(model, data, size)
            seconds[size].append(time.perf_counter() - started)
        print(f"repeat {repeat + 1}/{args.repeats}: " + " ".join(f"{s}:{seconds[s][-1]:.1f}s" for s in sizes),
              flush=True)
    worst = max(abs(results[s][k] - results[BASELINE][k]) for s in sizes for k in results[BASELINE])
    print(f"check  every batch size gives the same metrics (max abs diff {worst:.1e})")
    if worst > 1e-4:
        raise SystemExit("metrics differ between batch sizes: the timing would compare different work")

    median = {size: statistics.median(seconds[size]) for size in sizes}
    fastest = min(sizes, key=median.__getitem__)
    print("\n| eval batch | seconds per pass | vs 256 | records/s |\n|---|---|---|---|")
    for size in sizes:
        note = " (auto on CPU)" if size == CPU_EVAL_BATCH else ""
        print(f"| {size}{note} | {median[size]:.2f} | {median[size] / median[BASELINE]:.3f} | "
              f"{len(data) / median[size]:.0f} |")
    print(f"\nrecords={len(data)} auto_batch={CPU_EVAL_BATCH} fastest_batch={fastest} "
          f"auto_vs_256_time={median[CPU_EVAL_BATCH] / median[BASELINE]:.3f} "
          f"fastest_vs_256_time={median[fastest] / median[BASELINE]:.3f}")


if __name__ == "__main__":
    main()
