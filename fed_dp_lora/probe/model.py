"""A frozen encoder and a linear head on the mean of its layers' token-mean states.

The head sees the average over every transformer layer (not the embeddings) of the masked token
mean: all-MiniLM-L6-v2's top layer was trained for sentence similarity and keeps less of what a
task like sentiment needs than the middle layers (scripts/utility/NOTES.md, section 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fed_dp_lora.config.data import TableColumns

if TYPE_CHECKING:
    from fed_dp_lora.models import ModelSpec

HEAD_FILE = "probe_head.safetensors"
CONFIG_FILE = "probe_config.json"
POOLING = "mean over layers 1..L of the attention-masked token mean"


class LinearProbe(nn.Module):
    """The frozen base model's encoder and `classifier`, the only trainable (and sent) tensors."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int, identity: str, columns: str = "") -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.hidden = hidden
        self.columns = columns  # data.columns (JSON) whose features follow the encoder's, "" for none
        width = TableColumns(**json.loads(columns)).width() if columns else 0
        self.classifier = nn.Linear(hidden + width, num_labels)
        nn.init.zeros_(self.classifier.weight)  # every record starts at equal logits (models._zero_head)
        nn.init.zeros_(self.classifier.bias)
        self.identity = identity  # which encoder and pooling computed the features (cache key)

    def train(self, mode: bool = True) -> LinearProbe:
        """The encoder stays in eval mode: its features must not depend on dropout."""
        self.training = mode
        self.classifier.train(mode)
        return self

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.classifier.weight.device
        out = self.encoder(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True
        )
        mask = attention_mask.to(device).unsqueeze(-1).float()
        pooled = [(h.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0) for h in out.hidden_states[1:]]
        return torch.stack(pooled).mean(dim=0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        columns: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(
            logits=self.classifier(self.joined(self.features(input_ids, attention_mask), columns))
        )

    def joined(self, features: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """The head's input: the encoder's features, then the record's column features if it reads any."""
        width = self.classifier.in_features - self.hidden
        if width == 0:
            return features
        if columns is None or columns.shape[-1] != width:
            given = None if columns is None else columns.shape[-1]
            raise ValueError(f"the head reads {width} column features; the batch has {given}")
        return torch.cat([features, columns.to(features.device, features.dtype)], dim=-1)

    def save_pretrained(self, folder: str | Path) -> None:
        """The head (safetensors) and how to rebuild the features (JSON) beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()}, folder / HEAD_FILE
        )
        (folder / CONFIG_FILE).write_text(
            json.dumps(
                {
                    "method": "linear-probe",
                    "pooling": POOLING,
                    "base": self.identity,
                    "columns": json.loads(self.columns) if self.columns else None,
                },
                indent=1,
            )
        )


def probe_identity(spec: ModelSpec) -> str:
    """The base model settings the features depend on (tokens are hashed per record)."""
    model = {
        "name": spec.name,
        "task": spec.task,
        "quantization": spec.quantization,
        "pooling": spec.pooling,
        "keep_layers": spec.keep_layers,
    }
    return json.dumps({"model": model, "pooling": POOLING}, sort_keys=True)


def build_probe(spec: ModelSpec) -> LinearProbe:
    """The frozen base of spec with a zero head of spec.num_labels classes (config: classification only)."""
    from fed_dp_lora.models import load_base  # models imports this package's users; avoid a cycle

    num_labels = int(spec.num_labels)  # type: ignore[arg-type]  # validated: classification has labels
    base = load_base(spec)
    encoder = getattr(base, base.base_model_prefix)
    return LinearProbe(encoder, int(base.config.hidden_size), num_labels, probe_identity(spec), spec.columns).to(
        next(encoder.parameters()).device
    )


def identity_digest(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
