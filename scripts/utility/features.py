"""Frozen MiniLM features, cached on disk: per layer, the [CLS] state and the token mean.

    features(texts, max_length, tag) -> dict with "cls" and "mean": (layers+1, N, 384) float32
"""

from __future__ import annotations

import hashlib
import time

import common
import numpy as np
import torch


def _model():
    from transformers import AutoModel, AutoTokenizer

    from fed_dp_lora.models import model_source
    from fed_dp_lora.config import compose_config

    src = model_source(compose_config([]))
    return AutoTokenizer.from_pretrained(src), AutoModel.from_pretrained(src).eval()


@torch.no_grad()
def features(texts: list[str], max_length: int, batch: int = 32) -> dict[str, np.ndarray]:
    key = hashlib.sha256(("\x00".join(texts) + f"|{max_length}").encode()).hexdigest()[:16]
    path = common.CACHE / f"feat-{key}.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    tok, model = _model()
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    order = torch.argsort(lengths)
    n_layers = model.config.num_hidden_layers + 1
    cls = np.zeros((n_layers, len(texts), 384), np.float32)
    mean = np.zeros_like(cls)
    t0 = time.time()
    for s in range(0, len(texts), batch):
        idx = order[s:s + batch]
        w = int(lengths[idx].max())
        ids, mask = enc["input_ids"][idx, :w], enc["attention_mask"][idx, :w]
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.unsqueeze(-1).float()
        for layer, h in enumerate(hs):
            cls[layer, idx.numpy()] = h[:, 0].numpy()
            mean[layer, idx.numpy()] = ((h * m).sum(1) / m.sum(1)).numpy()
    print(f"features: {len(texts)} texts, max_length {max_length}, {time.time() - t0:.1f}s, "
          f"tokens mean {lengths.float().mean():.1f} max {int(lengths.max())}", flush=True)
    np.savez(path, cls=cls, mean=mean, lengths=lengths.numpy())
    return {"cls": cls, "mean": mean, "lengths": lengths.numpy()}
