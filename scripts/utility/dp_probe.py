"""DP-SGD linear probe on cached frozen features, federated (FedAvg) or centralized.

Uses the package's own PrivateGradientEngine (fused per-record gradients of the head, clipping,
noise / expected batch) and its accountant, with the same plan as a client round:
q = B / n, steps = round(epochs / q), sigma calibrated for all rounds' steps, delta = 1/(10 n).
Class weights multiply the clipped gradient, as in train_local.

Centering (--center):
  none     raw features
  oracle   minus the fit split's mean (NOT private: an upper bound)
  dp       each client centres with its OWN DP mean (Gaussian mechanism on the sum of
           features clipped to --stat-clip, noise --stat-sigma, divided by the public n),
           accounted in the same ledger as the DP-SGD steps; the head is sent in raw
           coordinates (bias folded), so the mean itself never leaves the client.
"""

from __future__ import annotations

import argparse
import itertools
import json

import common
import numpy as np
import torch
from torch import nn

from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine
from fed_dp_lora.training import plan_steps


_CAL_PATH = common.CACHE / "calibration.json"
_CAL = json.loads(_CAL_PATH.read_text()) if _CAL_PATH.exists() else {}


def calibrate(eps: float, delta: float, rate: float, steps: int, extra: list) -> float:
    """Smallest sigma (to 1e-3) with epsilon(extra + [(sigma, rate, steps)]) <= eps, RDP; cached on disk."""
    key = json.dumps([eps, delta, rate, steps, [list(e) for e in extra]])
    if key not in _CAL:
        def eps_of(sigma):
            return PrivacyLedger("rdp", delta, history=list(extra) + [(sigma, rate, steps)]).epsilon()
        lo, hi = 0.2, 40.0
        while hi - lo > 1e-3:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps_of(mid) <= eps else (mid, hi)
        _CAL[key] = hi
        _CAL_PATH.write_text(json.dumps(_CAL))
    return _CAL[key]


def dp_mean(x: torch.Tensor, clip: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    clipped = x * (clip / norms).clamp(max=1.0)
    noise = torch.normal(0.0, sigma * clip, size=(x.shape[1],), generator=gen)
    return (clipped.sum(0) + noise) / len(x)


def dp_scale(x: torch.Tensor, clip: float, sigma: float, gen: torch.Generator, n_public: int) -> torch.Tensor:
    """Mean pairwise distance of the client's features (a spread that needs no mean), released by
    the Gaussian mechanism: T = sum_{i<j} min(|x_i - x_j|, clip) / N with N the public record count;
    adding a record adds at most n <= N terms of at most clip, so T has sensitivity clip."""
    d = torch.cdist(x, x).clamp(max=clip)
    t = (d.sum() / 2 + 0) / n_public
    t = t + torch.normal(0.0, sigma * clip, size=(), generator=gen)
    return (2 * t / (n_public - 1)).clamp(min=0.05 * clip)


def iid_parts(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def make_optim(params, opt, lr):
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if opt == "sgdm" else 0.0)


def local_train(head, x, y, *, sigma, rate, steps, lr, clip, opt, weights, private, gen, avg="none", decay="none"):
    """avg: none | tail (mean of the iterates over the second half of the steps) | ema.
    Both are post-processing of the DP iterates: no privacy cost."""
    n = len(x)
    engine = PrivateGradientEngine(head, rate * n, clip, sigma, generator=gen) if private else GradientEngine(head, rate * n)
    optim = make_optim(engine.params, opt, lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps) if decay == "cos" else None
    w = None if weights is None else weights / weights.max()
    acc, count = [torch.zeros_like(p) for p in engine.params], 0
    for step in range(steps):
        idx = (torch.rand(n, generator=gen) < rate).nonzero().squeeze(1)
        optim.zero_grad(set_to_none=True)
        if len(idx):
            losses = nn.functional.cross_entropy(engine.module(x[idx]), y[idx], reduction="none")
            engine.backward(losses, None if w is None else w[y[idx]])
        if engine.finalize(len(idx)):
            optim.step()
        if sched is not None:
            sched.step()
        if avg == "tail" and step >= steps // 2:
            count += 1
            for a_, p in zip(acc, engine.params):
                a_.add_(p.detach())
        elif avg == "ema":
            count = 1
            for a_, p in zip(acc, engine.params):
                a_.mul_(0.9 if step else 0.0).add_(p.detach(), alpha=0.1 if step else 1.0)
    engine.detach()
    if avg != "none" and count:
        with torch.no_grad():
            for a_, p in zip(acc, engine.params):
                p.copy_(a_ / count)


def run(xs, ys, xval, yval, a, *, eps, batch, epochs, lr, clip, opt, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    parts = getattr(a, "parts", None) or iid_parts(len(xs), a.clients, seed)
    private = eps != "off"
    raw = nn.Linear(xs.shape[1], 2)
    nn.init.zeros_(raw.weight); nn.init.zeros_(raw.bias)
    oracle_mu = xs.mean(0) if a.center == "oracle" else None
    clients = []
    for part in parts:
        n = len(part)
        rate, steps = plan_steps(n, batch, epochs)
        delta = 1.0 / (10 * n)
        extra = [(a.stat_sigma, 1.0, 1)] * {"dp": 1, "dpstd": 2}.get(a.center, 0) if private else []
        sigma = calibrate(float(eps), delta, rate, steps * a.rounds, extra) if private else 0.0
        scale = torch.tensor(1.0)
        if a.center in ("dp", "dpstd"):
            mu = dp_mean(xs[part], a.stat_clip, a.stat_sigma, gen) if private else xs[part].mean(0)
            if a.center == "dpstd":
                scale = dp_scale(xs[part], a.scale_clip, a.stat_sigma, gen, n) if private else \
                    torch.cdist(xs[part], xs[part]).sum() / (n * (n - 1))
        else:
            mu = oracle_mu if oracle_mu is not None else torch.zeros(xs.shape[1])
        clients.append(dict(part=torch.tensor(part), mu=mu, scale=scale, rate=rate, steps=steps, sigma=sigma, extra=extra, delta=delta))
    history = []
    for r in range(a.rounds):
        ws, bs, sizes = [], [], []
        for c in clients:
            head = nn.Linear(xs.shape[1], 2)
            with torch.no_grad():  # raw -> standardized: W' (x - mu) / s + b' with W' = W s, b' = b + W mu
                head.weight.copy_(raw.weight * c["scale"]); head.bias.copy_(raw.bias + raw.weight @ c["mu"])
            local_train(head, (xs[c["part"]] - c["mu"]) / c["scale"], ys[c["part"]], sigma=c["sigma"], rate=c["rate"], steps=c["steps"],
                        lr=lr, clip=clip, opt=opt, weights=a.weights_t, private=private, gen=gen,
                        avg=a.avg, decay=a.decay)
            with torch.no_grad():
                ws.append(head.weight / c["scale"]); bs.append(head.bias - head.weight @ c["mu"] / c["scale"])
                sizes.append(len(c["part"]))
        tot = sum(sizes)
        with torch.no_grad():
            raw.weight.copy_(sum(w * (s / tot) for w, s in zip(ws, sizes)))
            raw.bias.copy_(sum(b * (s / tot) for b, s in zip(bs, sizes)))
            logits = raw(xval)
            if a.prior is not None:  # logit adjustment (Menon et al. 2021) with a PUBLIC class prior
                logits = logits - torch.log(a.prior)
            p = torch.softmax(logits, -1)[:, 1].numpy()
        history.append(common.metrics(yval.numpy(), p))
    c = clients[0]
    eps_spent = PrivacyLedger("rdp", c["delta"], history=c["extra"] + [(c["sigma"], c["rate"], c["steps"] * a.rounds)]).epsilon() if private else None
    return history, (c["sigma"], c["rate"], c["steps"], eps_spent)


def load(a):
    import probe
    from features import features

    texts, splits = probe.texts_for(a.task, a.render)
    lo, _, hi = a.layer.partition("-")
    layers = list(range(int(lo), int(hi or lo) + 1))
    x = {k: torch.tensor(features(texts[k], a.max_length)[a.pool][layers].mean(0)) for k in ("fit", "val")}
    y = {k: torch.tensor(splits[k]["label"].to_numpy()) for k in ("fit", "val")}
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="credit")
    ap.add_argument("--render", default="current")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--pool", default="mean")
    ap.add_argument("--layer", default="6", help="a layer, or a range a-b: the mean over those layers")
    ap.add_argument("--center", default="none", choices=["none", "oracle", "dp", "dpstd"])
    ap.add_argument("--stat-sigma", type=float, default=20.0)
    ap.add_argument("--stat-clip", type=float, default=4.5)
    ap.add_argument("--scale-clip", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eps", nargs="+", default=["8"])
    ap.add_argument("--batch", nargs="+", type=int, default=[128])
    ap.add_argument("--epochs", nargs="+", type=float, default=[20.0])
    ap.add_argument("--lr", nargs="+", type=float, default=[0.1])
    ap.add_argument("--clip", nargs="+", type=float, default=[1.0])
    ap.add_argument("--opt", nargs="+", default=["adam"])
    ap.add_argument("--weights", default="0.7,1.78")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--whiten", default="none", choices=["none", "oracle", "foreign", "synthetic"])
    ap.add_argument("--whiten-scale", type=float, default=0.05, help="whitened features times this")
    ap.add_argument("--whiten-k", type=int, default=0, help="keep the top k components (0: all)")
    ap.add_argument("--prior", default=None, help="public class prior for logit adjustment, e.g. 3200,1254")
    ap.add_argument("--avg", default="none", choices=["none", "tail", "ema"])
    ap.add_argument("--decay", default="none", choices=["none", "cos"])
    a = ap.parse_args()
    a.max_length = a.max_length or (64 if a.task == "credit" else 256)
    a.weights_t = None if a.weights == "none" else torch.tensor([float(v) for v in a.weights.split(",")])
    x, y = load(a)
    a.prior = None if a.prior is None else torch.tensor([float(v) for v in a.prior.split(",")]) / sum(float(v) for v in a.prior.split(","))
    if a.whiten != "none":
        ref = x["fit"]
        if a.whiten == "synthetic":  # public: rendered synthetic applicants (synthetic.py)
            import renders, synthetic
            from features import features as feats_of
            lo, _, hi = a.layer.partition("-")
            syn = [renders.RENDERS[a.render](r) for _, r in synthetic.applicants(3000).iterrows()]
            ref = torch.tensor(feats_of(syn, a.max_length)[a.pool][list(range(int(lo), int(hi or lo) + 1))].mean(0))
        if a.whiten == "foreign":
            b = argparse.Namespace(**vars(a)); b.task = "reviews" if a.task == "credit" else "credit"
            b.max_length = 64 if b.task == "credit" else 256
            ref = load(b)[0]["fit"]
        cov = torch.cov((ref - ref.mean(0)).T.double())
        evals, evecs = torch.linalg.eigh(cov)
        keep = evals > evals.max() * 1e-6
        proj = (evecs[:, keep] / evals[keep].sqrt() * a.whiten_scale).float()
        if a.whiten_k:
            proj = proj[:, -a.whiten_k:]
        print("whitening", a.whiten, "dims", proj.shape[1], flush=True)
        x = {k: v @ proj for k, v in x.items()}
    for eps, batch, epochs, lr, clip, opt in itertools.product(a.eps, a.batch, a.epochs, a.lr, a.clip, a.opt):
        runs = [run(x["fit"], y["fit"], x["val"], y["val"], a, eps=eps, batch=batch, epochs=epochs, lr=lr, clip=clip,
                    opt=opt, seed=s) for s in range(a.seeds)]
        ba = np.array([h[-1]["bal_acc"] for h, _ in runs]); auc = np.array([h[-1]["auc"] for h, _ in runs])
        sigma, rate, steps, spent = runs[0][1]
        print(json.dumps(dict(ssig=a.stat_sigma, w=a.weights, prior=a.prior is not None, task=a.task, layer=a.layer, center=a.center, avg=a.avg, decay=a.decay, eps=eps, B=batch, ep=epochs, R=a.rounds, lr=lr,
                              C=clip, opt=opt, sigma=round(sigma, 3), q=round(rate, 3), steps=steps,
                              eps_spent=None if spent is None else round(spent, 3),
                              ba=f"{ba.mean():.3f}±{ba.std():.3f}", auc=f"{auc.mean():.3f}±{auc.std():.3f}",
                              ba_rounds=[round(float(np.mean([h[r]['bal_acc'] for h, _ in runs])), 3) for r in range(a.rounds)])),
              flush=True)


if __name__ == "__main__":
    main()
