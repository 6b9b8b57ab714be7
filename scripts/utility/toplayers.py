"""DP LoRA on the top transformer layers, trained from cached lower-layer states (LP-FT).

The layers below `start` carry no LoRA and stay frozen, so each record's hidden states entering
layer `start` are computed once (no grad) and cached, with the running sum of the lower layers'
token means (for the layer-mix pooling); every step then runs only the top layers, the pooling
and the head. Per-record gradients, clipping, noise and accounting are the package's
(PrivateGradientEngine, plan_steps, the RDP ledger). Federated = FedAvg over IID client
partitions of the fit split; evaluation on the validation split after every round.

Rounds 1..head_rounds train the head only (linear probe), later rounds LoRA + head; one noise
multiplier for every step (same q), calibrated over all of them plus the DP centring release.
"""

from __future__ import annotations

import argparse
import json
import time

import common
import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from dp_probe import calibrate, dp_mean
from fed_dp_lora.config import compose_config
from fed_dp_lora.models import build_model, load_tokenizer
from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine
from fed_dp_lora.training import plan_steps

MODULES = {"qv": "(query|value)", "qkv": "(query|key|value)",
           "all": "(query|key|value|attention\\.output\\.dense|intermediate\\.dense|output\\.dense)"}
LAYERS = 6


def make_model(start: int, rank: int, modules: str, mode: str):
    cfg = compose_config(["model.pooling=mean", f"lora.r={rank}", f"lora.alpha={2 * rank}", f"lora={mode}"])
    layers = "|".join(str(i) for i in range(start, LAYERS))
    cfg.lora.target_modules = rf".*layer\.({layers})\..*{MODULES[modules]}"
    return build_model(cfg, 2)


def bert_of(model):
    return model.base_model.model.bert


def head_of(model):
    return model.base_model.model.classifier  # ModulesToSaveWrapper around the Linear


def token_mean(h, m):
    mf = m.unsqueeze(-1).to(h.dtype)
    return (h * mf).sum(1) / mf.sum(1).clamp(min=1)


@torch.no_grad()
def cache_states(model, tokenizer, texts, start, max_length, batch=32):
    """(hidden states entering layer `start` fp16, mask, sum of token means of layers 1..start)."""
    bert = bert_of(model)
    model.eval()
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    width = int(enc["attention_mask"].sum(1).max())
    ids, mask = enc["input_ids"][:, :width], enc["attention_mask"][:, :width]
    order = torch.argsort(mask.sum(1))
    hidden = torch.zeros(len(texts), width, 384, dtype=torch.float16)
    low = torch.zeros(len(texts), 384)
    for s in range(0, len(texts), batch):
        idx = order[s:s + batch]
        w = int(mask[idx].sum(1).max())
        i, m = ids[idx, :w], mask[idx, :w]
        h = bert.embeddings(input_ids=i)
        m4 = create_bidirectional_mask(config=bert.config, inputs_embeds=h, attention_mask=m)
        for layer in bert.encoder.layer[:start]:
            h = layer(h, m4)
            low[idx] += token_mean(h, m)
        hidden[idx, :w] = h.half()
    return hidden, mask, low


def pooled(model, hidden, mask, low, start, pooling):
    bert = bert_of(model)
    width = max(int(mask.sum(1).max()), 1)
    h, m = hidden[:, :width].float(), mask[:, :width]
    m4 = create_bidirectional_mask(config=bert.config, inputs_embeds=h, attention_mask=m)
    total = low.clone() if pooling == "mix" else None
    for layer in bert.encoder.layer[start:]:
        h = layer(h, m4)
        if total is not None:
            total = total + token_mean(h, m)
    return total / LAYERS if total is not None else token_mean(h, m)


def logits_of(model, batch, start, pooling, mu):
    if len(batch) == 1:  # cached pooled features (head phase)
        feats = batch[0] - mu
    else:
        hidden, mask, low = batch
        feats = pooled(model, hidden, mask, low, start, pooling) - mu
    cls_model = model.base_model.model
    return cls_model.classifier(cls_model.dropout(feats))


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def head_params(model):
    return {n: p for n, p in model.named_parameters() if "classifier" in n and "modules_to_save" in n}


def set_phase(model, phase, mode):
    for n, p in lora_params(model).items():
        p.requires_grad_(phase == "lora" and ("lora_B" in n or mode == "vanilla"))
    for p in head_params(model).values():
        p.requires_grad_(True)


def get_state(model):
    return {n: p.detach().clone() for n, p in {**lora_params(model), **head_params(model)}.items()}


def set_state(model, state):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def fold(state, model, mu, sign):
    """Head bias between raw (sign=-1: to raw) and centred coordinates (sign=+1: from raw)."""
    out = dict(state)
    (wn, w), (bn, b) = sorted((n, v) for n, v in state.items() if n in head_params(model))[::-1]
    out[bn] = b + sign * (w @ mu)
    return out


@torch.no_grad()
def evaluate(model, data, start, pooling, mu):
    model.eval()
    hidden, mask, low, labels = data
    probs = []
    for s in range(0, len(labels), 64):
        batch = (hidden[s:s + 64], mask[s:s + 64], low[s:s + 64])
        probs.append(torch.softmax(logits_of(model, batch, start, pooling, mu), -1)[:, 1])
    return common.metrics(labels.numpy(), torch.cat(probs).numpy())


def local_train(model, data, *, mu, sigma, rate, steps, head_lr, lora_lr, clip, weights, gen, a, private, feats=None):
    hidden, mask, low, labels = data
    n = len(labels)
    model.train()
    engine = PrivateGradientEngine(model, rate * n, clip, sigma, generator=gen) if private else GradientEngine(model, rate * n)
    heads = [p for p in head_params(model).values() if p.requires_grad]
    loras = [p for p in lora_params(model).values() if p.requires_grad]
    groups = [{"params": heads, "lr": head_lr}] + ([{"params": loras, "lr": lora_lr}] if loras else [])
    optim = torch.optim.Adam(groups)
    w = None if weights is None else weights / weights.max()
    losses_sum, count = 0.0, 0
    for _ in range(steps):
        idx = (torch.rand(n, generator=gen) < rate).nonzero().squeeze(1)
        optim.zero_grad(set_to_none=True)
        for chunk in idx.split(a.micro) if len(idx) else ():
            batch = (feats[chunk],) if feats is not None else (hidden[chunk], mask[chunk], low[chunk])
            logits = logits_of(model, batch, a.start, a.pooling, mu)
            losses = nn.functional.cross_entropy(logits.float(), labels[chunk], reduction="none")
            engine.backward(losses, None if w is None else w[labels[chunk]])
            losses_sum += float(losses.detach().sum()); count += len(chunk)
        if engine.finalize(len(idx)):
            optim.step()
    engine.detach()
    return losses_sum / max(count, 1)


def plan(a):
    return [("head", a.head_epochs) if r < a.head_rounds else ("lora", a.epochs) for r in range(a.rounds)]


def run(a, model, data, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fit = data["fit"]
    parts = [torch.tensor(p) for p in np.array_split(np.random.default_rng(seed).permutation(len(fit[3])), a.clients)]
    private = a.eps != "off"
    schedule = plan(a)
    weights = None if a.weights == "none" else torch.tensor([float(v) for v in a.weights.split(",")])
    model.load_state_dict(a.initial, strict=False)
    glob = get_state(model)  # raw coordinates
    clients = []
    for part in parts:
        n = len(part)
        rate = plan_steps(n, a.batch, 1.0)[0]
        steps = [plan_steps(n, a.batch, ep)[1] for _, ep in schedule]
        delta = 1.0 / (10 * n)
        extra = [(a.stat_sigma, 1.0, 1)] if private and a.center == "dp" else []
        sigma = calibrate(float(a.eps), delta, rate, sum(steps), extra) if private else 0.0
        with torch.no_grad():
            model.eval()
            base = torch.cat([pooled(model, (fit[0][part[s:s + 64]]), fit[1][part[s:s + 64]], fit[2][part[s:s + 64]],
                                     a.start, a.pooling) for s in range(0, n, 64)])
        if a.center == "dp":
            mu = dp_mean(base, a.stat_clip, a.stat_sigma, gen) if private else base.mean(0)
        else:
            mu = torch.zeros(base.shape[1])
        sub = tuple(t[part] for t in fit)
        clients.append(dict(data=sub, feats=base, mu=mu, rate=rate, steps=steps, sigma=sigma, delta=delta, extra=extra))
    history = []
    t0 = time.time()
    for r, (phase, _) in enumerate(schedule):
        set_phase(model, phase, a.mode)
        states, sizes, losses = [], [], []
        for c in clients:
            set_state(model, fold(glob, model, c["mu"], +1))
            losses.append(local_train(model, c["data"], mu=c["mu"], sigma=c["sigma"], rate=c["rate"], steps=c["steps"][r],
                                      head_lr=a.head_lr, lora_lr=a.lr, clip=a.clip, weights=weights, gen=gen, a=a,
                                      private=private, feats=c["feats"] if phase == "head" else None))
            states.append(fold(get_state(model), model, c["mu"], -1)); sizes.append(len(c["data"][3]))
        glob = {k: sum(s[k] * (m / sum(sizes)) for s, m in zip(states, sizes)) for k in glob}
        set_state(model, glob)
        m = evaluate(model, data["val"], a.start, a.pooling, torch.zeros_like(clients[0]["mu"]))
        m.update(round=r + 1, phase=phase, loss=round(float(np.mean(losses)), 4), secs=round(time.time() - t0, 1))
        history.append(m)
        print("   ", json.dumps(m), flush=True)
    c = clients[0]
    spent = PrivacyLedger("rdp", c["delta"], history=c["extra"] + [(c["sigma"], c["rate"], sum(c["steps"]))]).epsilon() if private else None
    return history, dict(sigma=round(c["sigma"], 3), q=round(c["rate"], 3), steps=c["steps"], eps_spent=spent)


def main():
    import probe

    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="credit")
    ap.add_argument("--render", default="current")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--start", type=int, default=5, help="first layer (0-based) with LoRA; below it is cached")
    ap.add_argument("--pooling", default="mix", choices=["mix", "last"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modules", default="qv")
    ap.add_argument("--mode", default="vanilla")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--eps", default="8", help="'off': no DP")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--head-rounds", type=int, default=1)
    ap.add_argument("--head-epochs", type=float, default=20.0)
    ap.add_argument("--head-lr", type=float, default=0.1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.003, help="LoRA learning rate")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--center", default="dp", choices=["dp", "none"])
    ap.add_argument("--stat-sigma", type=float, default=20.0)
    ap.add_argument("--stat-clip", type=float, default=4.0)
    ap.add_argument("--weights", default="0.7,1.78")
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = ap.parse_args()
    a.max_length = a.max_length or (64 if a.task == "credit" else 256)
    texts, splits = probe.texts_for(a.task, a.render)
    model = make_model(a.start, a.rank, a.modules, a.mode)
    a.initial = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = load_tokenizer(compose_config([]))
    data = {}
    t0 = time.time()
    for k in ("fit", "val"):
        data[k] = (*cache_states(model, tokenizer, texts[k], a.start, a.max_length),
                   torch.tensor(splits[k]["label"].to_numpy()))
    print(f"cached states entering layer {a.start} in {time.time() - t0:.0f}s: {tuple(data['fit'][0].shape)}", flush=True)
    finals = []
    for seed in a.seeds:
        hist, info = run(a, model, data, seed)
        finals.append(hist[-1])
    args = {k: v for k, v in vars(a).items() if k not in ("seeds", "initial")}
    print("RESULT", json.dumps({**args, "seeds": len(a.seeds), **info,
                                "ba": round(float(np.mean([f["bal_acc"] for f in finals])), 3),
                                "ba_sd": round(float(np.std([f["bal_acc"] for f in finals])), 3),
                                "auc": round(float(np.mean([f["auc"] for f in finals])), 3),
                                "best_ba_round": [round(float(np.mean([h for h in [f["bal_acc"]]])), 3) for f in finals]}), flush=True)


if __name__ == "__main__":
    main()
