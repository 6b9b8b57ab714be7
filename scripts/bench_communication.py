"""Bytes per client per round: vanilla LoRA, FFA, the full model, and 8-bit uploads.

    .venv/bin/python scripts/bench_communication.py [--seeds 2] [--no-train]

Sizes are what Flower serializes (ArrayRecord payloads) for the default model. The accuracy
effect of `upload.compression=int8` is measured on in-process federations (the real ServerApp
and ClientApp, fed_dp_lora/experiments/inprocess.py) with `privacy.seeded_noise=true`, so a run
with and without compression draws the same batches and the same DP noise: the difference is
the quantization alone. Ends with one key=value line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ArrayRecord  # noqa: E402

from fed_dp_lora.config import load_config  # noqa: E402
from fed_dp_lora.experiments.inprocess import run_federation  # noqa: E402
from fed_dp_lora.client_data import cached_model  # noqa: E402
from fed_dp_lora.models import trainable_state  # noqa: E402
from fed_dp_lora.wire import encode_int8_update, payload_bytes  # noqa: E402

# The sweep's small cells (docs/results.md, the sweep), 3 clients, DP at epsilon 8.
TRAIN = ("model.keep_layers=1 model.pooling=mean train.max_length=32 rounds=3 train.epochs=0.34 "
         "train.lr=0.01 privacy.seeded_noise=true strategy.min_available_clients=1 strategy.min_train_clients=1")


def sizes(lora: str) -> dict[str, int]:
    model = cached_model(load_config({"overrides": f"recipe=lora lora={lora}"}))
    adapter = trainable_state(model)
    full = {n: p.detach().float() for n, p in model.named_parameters()}
    return {"adapter": payload_bytes(ArrayRecord(adapter)),
            "int8": payload_bytes(encode_int8_update(adapter, adapter)),
            "full": payload_bytes(ArrayRecord(full))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="sizes only")
    args = parser.parse_args()
    table = {lora: sizes(lora) for lora in ("vanilla", "ffa")}
    print("| upload per client per round | vanilla LoRA | FFA (B and head only) |\n|---|---|---|")
    for key, label in (("full", "full model, float32"), ("adapter", "adapter, float32"), ("int8", "adapter update, int8")):
        print(f"| {label} | {table['vanilla'][key] / 1e6:.3f} MB | {table['ffa'][key] / 1e6:.3f} MB |")
    pairs = {
        "vanilla_mb": table["vanilla"]["adapter"] / 1e6, "ffa_mb": table["ffa"]["adapter"] / 1e6,
        "full_mb": table["vanilla"]["full"] / 1e6,
        "ffa_vs_vanilla": table["ffa"]["adapter"] / table["vanilla"]["adapter"],
        "vanilla_vs_full": table["vanilla"]["adapter"] / table["vanilla"]["full"],
        "int8_vs_float": table["vanilla"]["int8"] / table["vanilla"]["adapter"],
    }
    if not args.no_train:
        print("\n| LoRA | upload | bytes up per client per round | balanced accuracy | AUC |\n|---|---|---|---|---|")
        for lora in ("vanilla", "ffa"):
            results = {}
            for compression in ("none", "int8"):
                runs = []
                for seed in range(args.seeds):
                    with tempfile.TemporaryDirectory() as out:
                        runs.append(run_federation(f"{TRAIN} lora={lora} upload.compression={compression} seed={seed}",
                                                   3, Path(out)))
                up = statistics.mean(r["bytes"]["up"] / len(r["clients"]) for s in runs for r in s["rounds"])
                bal = statistics.mean(s["final"]["balanced_accuracy"] for s in runs)
                auc = statistics.mean(s["final"]["auc"] for s in runs)
                results[compression] = (up, bal, auc)
                print(f"| {lora} | {compression} | {up / 1e6:.3f} MB | {bal:.3f} | {auc:.3f} |", flush=True)
            pairs[f"{lora}_int8_auc_delta"] = results["int8"][2] - results["none"][2]
            pairs[f"{lora}_int8_bytes_ratio"] = results["int8"][0] / results["none"][0]
    print(" ".join(f"{k}={v:.4g}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
