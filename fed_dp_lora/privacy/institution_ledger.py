"""The institution's lifetime ledger: every DP release it made, in every study.

The server chooses study ids. With one ledger per study, a server could reset an institution's
budget by starting a new study; here one ledger composes everything. A study's epsilon is the
history filtered to that study, at the study's delta: this is what the server's report shows.
The lifetime epsilon is the whole history at the institution's own delta. It is checked against
the institution's own budget (node-config `epsilon`) and stays in the institution's local log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fed_dp_lora.privacy.accountant import BudgetExceeded, PrivacyLedger, calibrate_noise

DP_SGD = "dp-sgd"
FEATURE_MEAN = "feature-mean"  # the linear probe's centring: one Gaussian mechanism (q = 1, one step)

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as the accountant takes it


@dataclass(frozen=True)
class Release:
    """One accounted mechanism that left the institution (or might have: it is recorded first):
    a round of DP-SGD, or a release its update depends on (`kind`, e.g. the probe's feature mean)."""

    study: str
    round: int
    noise: float
    rate: float
    steps: int
    kind: str = DP_SGD


@dataclass(frozen=True)
class StudyTerms:
    """Fixed at a study's first round: its delta, accountant and calibrated noise multiplier."""

    delta: float
    accountant: str
    noise: float


@dataclass(frozen=True)
class Request:
    """What a round asks for, and the budgets it must fit (the run's and the institution's)."""

    study: str
    delta: float
    accountant: str
    noise: float | None  # fixed by the run; None: calibrated at the study's first round
    rate: float
    steps: int  # this round
    rounds: int  # planned rounds of the study, for calibration
    study_budget: float | None
    lifetime_budget: float | None
    lifetime_delta: float
    # Other mechanisms this round's update depends on, by kind (FEATURE_MEAN); composed in the
    # same ledger and, at the study's first round, in the noise calibration.
    extra: tuple[tuple[str, Mechanism], ...] = ()

    @property
    def extra_mechanisms(self) -> tuple[Mechanism, ...]:
        return tuple(m for _, m in self.extra)


@dataclass(frozen=True)
class Plan:
    """An accepted request: the study's terms and the epsilons after this round."""

    request: Request
    terms: StudyTerms
    study_epsilon: float
    lifetime_epsilon: float


@dataclass
class InstitutionLedger:
    """Every release of one institution; serializes to flat lists (a Flower ConfigRecord)."""

    releases: list[Release] = field(default_factory=list)
    studies: dict[str, StudyTerms] = field(default_factory=dict)

    def study(self, study: str) -> PrivacyLedger:
        """The study's own composition, at the study's delta (what the server is told)."""
        terms = self.studies[study]
        mine = [r for r in self.releases if r.study == study]
        return PrivacyLedger(
            terms.accountant, terms.delta, [(r.noise, r.rate, r.steps) for r in mine], [r.round for r in mine]
        )

    def lifetime(self, delta: float) -> PrivacyLedger:
        """Everything this institution ever released (RDP), at its own delta."""
        return PrivacyLedger(
            "rdp", delta, [(r.noise, r.rate, r.steps) for r in self.releases], [r.round for r in self.releases]
        )

    def trained(self, study: str, server_round: int) -> bool:
        return any(r.study == study and r.round == server_round for r in self.releases)

    def plan(self, request: Request) -> Plan:
        """Fix the study's terms (at its first round) and check both budgets, before any training."""
        terms = self.studies.get(request.study) or self._new_terms(request)
        if (terms.delta, terms.accountant) != (request.delta, request.accountant):
            raise BudgetExceeded(
                f"study {request.study} was accounted with delta {terms.delta:g} / "
                f"{terms.accountant}; the run now asks for {request.delta:g} / "
                f"{request.accountant}. Refusing: keep privacy settings fixed within a study"
            )
        planned = [*request.extra_mechanisms, (terms.noise, request.rate, request.steps)]
        known = (
            self.study(request.study) if request.study in self.studies else PrivacyLedger(terms.accountant, terms.delta)
        )
        study_eps = _after(known, planned)
        lifetime_eps = _after(self.lifetime(request.lifetime_delta), planned)
        for spent, budget, what in (
            (study_eps, request.study_budget, "this study's budget"),
            (lifetime_eps, request.lifetime_budget, "the institution's lifetime budget"),
        ):
            if budget is not None and spent > budget * (1 + 1e-9):
                raise BudgetExceeded(
                    f"privacy budget exhausted: epsilon would reach {spent:.3f} > {what} {budget:g}. Refusing to train"
                )
        return Plan(request, terms, study_eps, lifetime_eps)

    def _new_terms(self, r: Request) -> StudyTerms:
        """Noise for a new study: the run's, or calibrated so the whole planned study fits the run's
        budget; raised if needed so it also fits what is left of the lifetime budget."""
        planned = r.steps * r.rounds
        candidates = [r.noise] if r.noise is not None else []
        if r.noise is None and r.study_budget is not None:
            candidates.append(
                calibrate_noise(r.study_budget, r.delta, r.rate, planned, r.accountant, r.extra_mechanisms)
            )
        if r.lifetime_budget is not None:
            spent = tuple((x.noise, x.rate, x.steps) for x in self.releases) + r.extra_mechanisms
            candidates.append(calibrate_noise(r.lifetime_budget, r.lifetime_delta, r.rate, planned, "rdp", spent))
        if not candidates:
            raise ValueError("neither a noise multiplier nor a budget to calibrate one")
        return StudyTerms(r.delta, r.accountant, float(max(candidates)))

    def charged(self, study: str, kind: str) -> bool:
        return any(r.study == study and r.kind == kind for r in self.releases)

    def record(self, plan: Plan, server_round: int, steps: int) -> Release:
        """Add the round's releases, the extra mechanisms first (called before the update can
        leave the institution)."""
        study = plan.request.study
        self.studies.setdefault(study, plan.terms)
        for kind, (noise, rate, count) in plan.request.extra:
            self.releases.append(Release(study, int(server_round), float(noise), float(rate), int(count), kind))
        release = Release(study, int(server_round), plan.terms.noise, plan.request.rate, int(steps))
        self.releases.append(release)
        return release

    def extends(self, other: InstitutionLedger) -> bool:
        """True when this ledger is `other` plus later releases (same study terms)."""
        n = len(other.releases)
        same_terms = all(self.studies.get(s) == t for s, t in other.studies.items())
        return same_terms and self.releases[:n] == other.releases

    def to_dict(self) -> dict[str, Any]:
        studies = sorted(self.studies)
        return {
            "version": 2,
            "study": [r.study for r in self.releases],
            "round": [r.round for r in self.releases],
            "noise": [r.noise for r in self.releases],
            "rate": [r.rate for r in self.releases],
            "steps": [r.steps for r in self.releases],
            "kind": [r.kind for r in self.releases],
            "study-ids": studies,
            "study-delta": [self.studies[s].delta for s in studies],
            "study-accountant": [self.studies[s].accountant for s in studies],
            "study-noise": [self.studies[s].noise for s in studies],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstitutionLedger:
        if int(data.get("version", 0)) != 2:
            raise ValueError(f"unknown ledger version {data.get('version')!r}")
        columns = [list(data.get(k) or []) for k in ("study", "round", "noise", "rate", "steps")]
        if len({len(c) for c in columns}) != 1:
            raise ValueError("ledger columns have different lengths")
        kinds = list(data.get("kind") or [DP_SGD] * len(columns[0]))  # ledgers before kinds: all DP-SGD
        if len(kinds) != len(columns[0]):
            raise ValueError("ledger columns have different lengths")
        releases = [
            Release(str(s), int(r), float(n), float(q), int(k), str(kind))
            for s, r, n, q, k, kind in zip(*columns, kinds, strict=True)
        ]
        ids = [str(s) for s in data.get("study-ids") or []]
        terms = zip(
            data.get("study-delta") or [],
            data.get("study-accountant") or [],
            data.get("study-noise") or [],
            strict=True,
        )
        studies = {s: StudyTerms(float(d), str(a), float(n)) for s, (d, a, n) in zip(ids, terms, strict=True)}
        if len(studies) != len(ids) or {r.study for r in releases} - set(studies):
            raise ValueError("ledger releases name studies without terms")
        return cls(releases, studies)


def _after(ledger: PrivacyLedger, planned: list[Mechanism]) -> float:
    """Epsilon of `ledger` after also running every mechanism in `planned`."""
    return PrivacyLedger(ledger.accountant, ledger.delta, ledger.history + planned).epsilon()
