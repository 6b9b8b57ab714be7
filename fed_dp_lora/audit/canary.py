"""The auditor's side of the one-run privacy audit (maths in audit/bounds.py).

The server knows the canaries and their secret coins (both from audit.seed). A canary's
membership score is how much its loss fell between the initial and the final global
adapter: a trained-on canary with a random label is pulled towards that label. Scoring the
drop rather than the final loss cancels how hard each canary is to begin with; subtracting
the mean drop of canaries with the same label cancels the model's general drift towards
one class, which moves all canaries of that label alike. The score uses only the model and
the public canary set, never the coins, as the audit's theorem requires.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fed_dp_lora.audit.bounds import epsilon_lower_bound, guesses
from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.data.canaries import canary_table, canary_words, included_canaries
from fed_dp_lora.models import load_tokenizer
from fed_dp_lora.training import encode


class CanaryAudit:
    """Scores the canaries before training; `result` scores them after and bounds epsilon."""

    def __init__(self, cfg: DictConfig, evaluator: CentralEvaluator, initial: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        tokenizer = load_tokenizer(cfg)
        table = canary_table(cfg, evaluator.num_labels, canary_words(tokenizer.get_vocab()))
        self.data = encode(table, tokenizer, cfg)
        self.included = included_canaries(cfg)
        self.before = evaluator.losses(initial, self.data)

    def result(self, final: dict[str, torch.Tensor], claimed_epsilon: float | None, delta: float) -> dict[str, Any]:
        """The audit record for summary.json's privacy.audit."""
        a = self.cfg.audit
        m = int(a.canaries)
        drop = self.before - self.evaluator.losses(final, self.data)
        scores = drop.copy()
        if self.data.labels.dim() == 1:
            labels = self.data.labels.numpy()
            for label in np.unique(labels):
                scores[labels == label] -= drop[labels == label].mean()
        made, correct = guesses(scores, self.included, int(m * float(a.guess_fraction)))
        return {
            "epsilon_lower": epsilon_lower_bound(m, made, correct, delta, float(a.confidence)),
            "claimed_epsilon": claimed_epsilon,
            "canaries": m,
            "included": int(self.included.sum()),
            "guesses": made,
            "correct": correct,
            "confidence": float(a.confidence),
            "delta": delta,
            "score": "loss drop from the initial to the final global adapter, centred per label",
            "method": "Steinke, Nasr, Jagielski 2023, one training run",
        }
