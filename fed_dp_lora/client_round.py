"""One client round as named steps, in the order privacy needs them.

    check the request -> claim the state dir -> replay? -> data and model -> plan (budgets)
    -> train -> persist (ledger, then kept release) -> Released

`_persist` is the only place a `Released` is made, and it writes the ledger to the
institution's disk before it returns one. client_app.py builds a reply only from a `Released`,
so no update can leave before its cost is on record. No Flower types here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from fed_dp_lora import local_log, reply
from fed_dp_lora.audit.release import release_canaries
from fed_dp_lora.client_data import ClientData, cached_model, client_data, client_features
from fed_dp_lora.models import load_trainable_state, trainable_state
from fed_dp_lora.node_policy import NodePolicy, PolicyError, apply_node_config, resolve_delta, simulation_state_dir
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine, StepExtra
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger, Plan, Request
from fed_dp_lora.privacy.ledger_store import InstitutionState, LedgerError, LedgerReceipt, reconcile, state_digest
from fed_dp_lora.privacy.streams import StreamKey, institution_secret, model_seed, round_generators, simulation_secret
from fed_dp_lora.probe import LinearProbe, centring
from fed_dp_lora.probe.centring import centred_head, fold_into
from fed_dp_lora.probe.training import train_head
from fed_dp_lora.training import TrainStats, train_local

log = logging.getLogger(__name__)

# A global adapter with a coordinate beyond this is refused before training: LoRA factors and
# heads live around 1e-2..1e1, and a crafted adapter that overflows on one record's features
# needs far larger values. Refusing depends on the server's input only.
MAX_GLOBAL_ABS = 1e4


class InputRefused(ValueError):
    """The server's global adapter or instructions are malformed or out of range."""


@dataclass(frozen=True)
class RoundRequest:
    """What the server sent (all of it server-controlled input)."""

    global_state: dict[str, torch.Tensor]
    server_round: int = 0
    study: str | None = None
    node_id: int = 0


@dataclass
class Released:
    """An update whose cost is on the institution's disk: the only thing a reply is built from.

    An accounted release (one that carries an epsilon) cannot be made without the receipt of
    the ledger that holds it (ledger_store.LedgerReceipt), so no reply can precede its ledger.
    """

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    ledger: InstitutionLedger | None
    policy: NodePolicy
    receipt: LedgerReceipt | None
    local: dict[str, Any] = field(default_factory=dict)  # for the institution's log only

    def __post_init__(self) -> None:
        if reply.EPSILON in self.metrics and self.receipt is None:
            raise LedgerError("an accounted update without its ledger's receipt; nothing may leave")


_process_started = True  # the first round in this process pays for Python start-up and imports


def _startup_seconds() -> float:
    """Seconds from this process' start to now (psutil ships with Flower's simulation extra)."""
    global _process_started
    if not _process_started:
        return 0.0
    _process_started = False
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def check_request(request: RoundRequest, policy: NodePolicy) -> None:
    """Refuse malformed or absurd server input before anything reads the data."""
    if policy.state_dir is not None and (not request.study or request.server_round < 1):
        raise InputRefused(
            "a node with a state dir trains only when the server names the study and "
            f"round (got study={request.study!r}, round={request.server_round})"
        )
    for name, tensor in request.global_state.items():
        values = tensor.detach()
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise InputRefused(f"global adapter tensor {name} has NaN or Inf values")
        if values.numel() and float(values.abs().max()) > MAX_GLOBAL_ABS:
            raise InputRefused(f"global adapter tensor {name} has a value beyond +-{MAX_GLOBAL_ABS:g}")


def _state_dir(policy: NodePolicy, request: RoundRequest) -> str | None:
    if policy.state_dir is not None:
        return policy.state_dir
    if policy.partition is not None and request.study and request.server_round:
        return str(simulation_state_dir(request.study, policy.partition[0]))
    return None  # direct calls without a study (tests): nothing persisted, OS entropy


def train_round(
    cfg: DictConfig, node_config: Mapping[str, Any], request: RoundRequest, memory: InstitutionLedger | None
) -> Released:
    """Train this client on the global adapter; raises before training on any refusal."""
    started = time.perf_counter()
    startup = _startup_seconds()
    cfg, policy = apply_node_config(cfg, node_config)
    check_request(request, policy)
    path = _state_dir(policy, request)
    store = InstitutionState(path) if path is not None else None
    # One round at a time per institution: a ClientApp of a stopped run may still be finishing
    # when the resumed run asks for the same round; it must see the ledger the other wrote.
    with store.locked() if store is not None else contextlib.nullcontext():
        if store is not None:
            store.claim(request.node_id)
        released = _locked_round(cfg, policy, request, store, memory)
    released.local.update({"startup-seconds": startup, "round-seconds": time.perf_counter() - started})
    local_log.round_done(path, {"study": request.study, "round": request.server_round, **released.local})
    return released


def _locked_round(
    cfg: DictConfig,
    policy: NodePolicy,
    request: RoundRequest,
    store: InstitutionState | None,
    memory: InstitutionLedger | None,
) -> Released:
    ledger = reconcile(memory, store.load_ledger() if store else None, store.ledger_path if store else None)
    ledger = ledger or InstitutionLedger()
    digest = state_digest(request.global_state)
    study = request.study or ""
    if store is not None and ledger.trained(study, request.server_round):
        kept = store.release(study, request.server_round, digest)
        if kept is not None:  # same round, same global adapter: resend; nothing new leaks
            receipt = store.receipt_on_disk(study, request.server_round) if reply.EPSILON in kept[1] else None
            return Released(kept[0], {**kept[1], "replayed": 1.0}, ledger, policy, receipt, {"replayed": True})
        log.warning(
            "Round %d was already trained here from another global adapter; training again is a "
            "new release, with fresh noise, and is counted again",
            request.server_round,
        )
    loaded = time.perf_counter()
    data = client_data(cfg, policy)
    model = cached_model(cfg)
    load_trainable_state(model, request.global_state)
    recipe = _probe_round if cfg.train.method == "linear-probe" else _lora_round
    return recipe(cfg, policy, request, store, ledger, data, model, digest, loaded)


def _lora_round(
    cfg: DictConfig,
    policy: NodePolicy,
    request: RoundRequest,
    store: InstitutionState | None,
    ledger: InstitutionLedger,
    data: ClientData,
    model: torch.nn.Module,
    digest: str,
    loaded: float,
) -> Released:
    """DP-SGD on every trainable tensor of the model (LoRA factors and head), from the tokens."""
    plan = _plan(cfg, policy, data, ledger, request.study or "") if cfg.privacy.enabled else None
    device = next(p for p in model.parameters() if p.requires_grad).device
    sampling, noise = _streams(cfg, data, store, request, digest, device)
    rate, steps = data.plan(cfg)
    # The release audit's canaries: records of the audited client only (its slot is its opt-in).
    canaries = release_canaries(cfg, data.policy.partition, model, rate, sampling)
    engine = _gradient_engine(cfg, model, rate * data.records, plan, noise, canaries)
    trained = time.perf_counter()
    try:
        stats = train_local(
            engine,
            data.encoded,
            cfg,
            rate,
            steps,
            _class_weights(cfg, model),
            generator=sampling,
            slots=data.records,
        )
    finally:
        engine.detach()
    local = {**_timings(loaded, trained), **_round_facts(data, stats, engine)}
    return _persist(store, ledger, plan, request, digest, trainable_state(model), data, rate, stats, local)


def _probe_round(
    cfg: DictConfig,
    policy: NodePolicy,
    request: RoundRequest,
    store: InstitutionState | None,
    ledger: InstitutionLedger,
    data: ClientData,
    model: torch.nn.Module,
    digest: str,
    loaded: float,
) -> Released:
    """The linear probe: DP-SGD on the head over cached features, centred on the client's own
    feature mean, which under DP is a Gaussian-mechanism release charged in this round's plan
    (once per study and data version) and kept in the state dir, never sent."""
    assert isinstance(model, LinearProbe)  # train.method=linear-probe builds one (models.build)
    study = request.study or ""
    features = client_features(cfg, policy, data, model)
    centre = centring.kept(cfg, store, ledger, study, features)
    charge = centring.charge(cfg) if centre is None else ()
    plan = _plan(cfg, policy, data, ledger, study, charge) if cfg.privacy.enabled else None
    sampling, noise = _streams(cfg, data, store, request, digest, model.classifier.weight.device)
    if centre is None:
        centre = centring.compute(cfg, features, data.records, noise)
    head = centred_head(model.classifier, centre.mean)
    rate, steps = data.plan(cfg)
    engine = _gradient_engine(cfg, head, rate * data.records, plan, noise)
    trained = time.perf_counter()
    try:
        stats = train_head(
            engine,
            features - centre.mean,
            data.encoded.labels,
            cfg,
            rate,
            steps,
            _class_weights(cfg, model),
            generator=sampling,
            slots=data.records,
        )
    finally:
        engine.detach()
    fold_into(model.classifier, head, centre.mean)
    local = {**_timings(loaded, trained), **_round_facts(data, stats, engine), "feature-mean-charged": bool(charge)}
    released = _persist(store, ledger, plan, request, digest, trainable_state(model), data, rate, stats, local)
    if charge and store is not None:
        centring.keep(store, study, centre)  # after the ledger holds its charge, never before
    return released


def _gradient_engine(
    cfg: DictConfig,
    module: torch.nn.Module,
    expected_batch: float,
    plan: Plan | None,
    noise: torch.Generator | None,
    extra: StepExtra | None = None,
) -> GradientEngine:
    """DP-SGD at the plan's noise on every trainable tensor of `module` (LoRA's model or the
    probe's head), or the non-private baseline when privacy is off (no plan)."""
    if plan is None:
        return GradientEngine(module, expected_batch, extra=extra)
    clip = float(cfg.privacy.clip_norm)
    return PrivateGradientEngine(module, expected_batch, clip, plan.terms.noise, generator=noise, extra=extra)


def _plan(
    cfg: DictConfig, policy: NodePolicy, data: ClientData, ledger: InstitutionLedger, study: str, extra: tuple = ()
) -> Plan:
    """The study's terms and this round's cost, checked against both budgets (BudgetExceeded)."""
    rate, steps = data.plan(cfg)
    delta = resolve_delta(cfg, policy, data.records)
    p = cfg.privacy
    return ledger.plan(
        Request(
            study=study,
            delta=delta,
            accountant=str(p.accountant),
            noise=None if p.noise_multiplier is None else float(p.noise_multiplier),
            rate=rate,
            steps=steps,
            rounds=int(cfg.rounds),
            study_budget=None if p.epsilon is None else float(p.epsilon),
            lifetime_budget=policy.lifetime_epsilon,
            lifetime_delta=policy.max_delta if policy.max_delta is not None else delta,
            extra=extra,
        )
    )


def _streams(
    cfg: DictConfig,
    data: ClientData,
    store: InstitutionState | None,
    request: RoundRequest,
    digest: str,
    device: torch.device,
) -> tuple[torch.Generator | None, torch.Generator | None]:
    """This attempt's (sampling, noise) generators; (None, None): fresh OS entropy."""
    secret = _secret(cfg, data, store, request)
    if secret is None:
        return None, None
    attempt = store.next_attempt(request.study or "", request.server_round) if store is not None else 0
    key = StreamKey(secret, request.server_round, digest, attempt)
    torch.manual_seed(model_seed(key))  # dropout
    return round_generators(key, device)


def _secret(cfg: DictConfig, data: ClientData, store: InstitutionState | None, request: RoundRequest) -> bytes | None:
    if cfg.privacy.seeded_noise and data.partition is not None:
        return simulation_secret(int(cfg.seed), data.partition)  # refused in deployment (node_policy)
    if store is not None and request.study:
        return institution_secret(store.secret(), request.study)
    return None  # no place to keep a key: fresh OS entropy


def _class_weights(cfg: DictConfig, model: torch.nn.Module) -> torch.Tensor | None:
    if cfg.model.task != "classification" or cfg.data.class_weights is None:
        return None
    device = next(p for p in model.parameters() if p.requires_grad).device
    return torch.tensor([float(w) for w in cfg.data.class_weights], device=device)


def _timings(loaded: float, trained: float) -> dict[str, float]:
    """Seconds spent loading and training (local log only: timing is a side channel)."""
    return {"load-seconds": trained - loaded, "train-seconds": time.perf_counter() - trained}


def _round_facts(data: ClientData, stats: TrainStats, engine: GradientEngine) -> dict[str, Any]:
    """What the institution may want to know about its round (local log only)."""
    return {
        "records-used": len(data.encoded),
        "records-declared": data.records,
        "dropped": data.dropped,
        "train-loss": stats.mean_loss,
        "examples": stats.examples,
        "rows": stats.rows,
        "empty-batches": stats.empty_batches,
        "clipped-fraction": getattr(engine, "last_clipped_fraction", None),
    }


def _persist(
    store: InstitutionState | None,
    ledger: InstitutionLedger,
    plan: Plan | None,
    request: RoundRequest,
    digest: str,
    state: dict[str, torch.Tensor],
    data: ClientData,
    rate: float,
    stats: TrainStats,
    local: dict[str, Any],
) -> Released:
    """Write the round's cost, then keep the release; only then may it leave."""
    metrics: dict[str, float] = {
        "num-examples": data.records,
        "sample-rate": rate,
        "steps": stats.steps,
        "replayed": 0.0,
    }
    if data.partition is not None:
        metrics["partition-id"] = data.partition
    receipt = None
    if plan is not None:
        ledger.record(plan, request.server_round, stats.steps)
        receipt = (  # on disk before the update can leave this client
            store.save_ledger(ledger, plan.request.study, request.server_round)
            if store is not None
            else LedgerReceipt.in_memory(ledger, plan.request.study, request.server_round)
        )
        study = ledger.study(plan.request.study)
        epsilon = study.epsilon()
        metrics.update(
            {
                "epsilon": epsilon if math.isfinite(epsilon) else 1e308,
                "delta": plan.terms.delta,
                "noise-multiplier": plan.terms.noise,
                "steps-total": study.steps,
            }
        )
        local["lifetime-epsilon"] = ledger.lifetime(plan.request.lifetime_delta).epsilon()
    metrics = reply.metrics(metrics)
    if store is not None and request.study:
        store.save_release(request.study, request.server_round, digest, state, metrics)
    return Released(state, metrics, ledger if plan is not None else None, data.policy, receipt, local)


__all__ = ["InputRefused", "PolicyError", "Released", "RoundRequest", "check_request", "train_round"]
