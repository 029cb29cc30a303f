"""The controller's rules: from queue depths and worker load to speculation bounds and batch limits.

Pure decision logic. The controller process (:mod:`cosine.service.controller_service`) samples Redis into
:class:`ControlInputs`; :meth:`ControlPolicy.decide` returns the next :class:`ControlDecision` (``k_min`` /
``k_max``, ``max_cooperating``, verifier batch and token limits, an advisory ``pressure``), which workers
read through :class:`cosine.service.control_view.ControlView`. Rules, on each sample's :class:`Signals`:
1. drafts pile up: shorter drafts, one cooperating drafter fewer; 2. the verifier is the bottleneck: larger
batches (draft lengths stay the per-request policy's); 3. the verifier idles while drafters have room:
longer drafts, one cooperating drafter more; 4. calm: pressure decays, fields drift back to their defaults.
A rule acts after ``hysteresis_samples`` samples in a row; fields stay in bounds; the version changes only
when a field does. Thresholds and the measurements behind them: ``docs/controller.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from cosine import defaults

SCHEMA = 1  # bump when the control hash's fields change meaning


# -- inputs ---------------------------------------------------------------------------------------------
@dataclass
class StreamDepth:
    """One stream's consumer-group depth, as sampled from XINFO GROUPS / XPENDING."""

    stream: str
    lag: int | None  # entries not yet delivered to the group; None when Redis cannot tell (Redis 7.0)
    pending: int  # delivered, not yet acknowledged
    oldest_pending_ms: float = 0.0  # age of the oldest pending entry (from its id); 0 when none
    oldest_waiting_ms: float = 0.0  # age of the oldest undelivered entry; 0 when none
    lag_estimated: bool = False  # lag was NULL and was estimated from XLEN - pending

    @property
    def depth(self) -> int:
        return (self.lag or 0) + self.pending

    @property
    def age_ms(self) -> float:
        return max(self.oldest_pending_ms, self.oldest_waiting_ms)


@dataclass
class WorkerLoad:
    """One live worker's load, from its heartbeat stats."""

    worker_id: str
    role: str
    busy: float  # share of recent wall time spent in model work, 0..1
    active: int = 0  # requests it holds
    capacity: int = 0  # requests it may hold (0 = unknown)


@dataclass
class ControlInputs:
    at_ms: int  # Redis server time of the sample
    requests: StreamDepth | None = None
    drafts: list[StreamDepth] = field(default_factory=list)
    verifies: list[StreamDepth] = field(default_factory=list)
    verifiers: list[WorkerLoad] = field(default_factory=list)
    drafters: list[WorkerLoad] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready, floats rounded (for the control log)."""

        def clean(v):
            if isinstance(v, float):
                return round(v, 3)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> ControlInputs:
        return cls(
            at_ms=int(d["at_ms"]),
            requests=StreamDepth(**d["requests"]) if d.get("requests") else None,
            drafts=[StreamDepth(**x) for x in d.get("drafts", [])],
            verifies=[StreamDepth(**x) for x in d.get("verifies", [])],
            verifiers=[WorkerLoad(**x) for x in d.get("verifiers", [])],
            drafters=[WorkerLoad(**x) for x in d.get("drafters", [])],
        )


# -- decisions ------------------------------------------------------------------------------------------
_INT_FIELDS = ("version", "k_min", "k_max", "max_cooperating", "verifier_max_batch", "verifier_token_cap", "at_ms")


@dataclass(frozen=True)
class ControlDecision:
    version: int
    k_min: int
    k_max: int
    max_cooperating: int
    verifier_max_batch: int
    verifier_token_cap: int
    pressure: float = 0.0
    reason: str = ""
    at_ms: int = 0  # when it was decided (Redis time, ms); not part of what "changed" means

    def controls(self) -> tuple:
        """The fields that matter to workers: a decision is new when these differ."""
        return (self.k_min, self.k_max, self.max_cooperating, self.verifier_max_batch, self.verifier_token_cap,
                round(self.pressure, 3))

    def clamp_k(self, k: int) -> int:
        """A draft length inside this decision's bounds."""
        return max(self.k_min, min(self.k_max, int(k)))

    def to_dict(self) -> dict[str, int | float | str]:
        """Flat fields for a Redis hash (plus ``schema``)."""
        d: dict[str, int | float | str] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pressure"] = round(float(self.pressure), 3)
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ControlDecision:
        """From a Redis hash (bytes or str keys and values); raises ValueError on missing or bad fields."""
        m = {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else v)
             for k, v in d.items()}
        try:
            kw: dict = {name: int(m[name]) for name in _INT_FIELDS if name != "at_ms"}
            kw["at_ms"] = int(m.get("at_ms", 0))
            kw["pressure"] = float(m.get("pressure", 0.0))
            kw["reason"] = str(m.get("reason", ""))
        except KeyError as exc:
            raise ValueError(f"control decision lacks field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed control decision: {exc}") from None
        dec = cls(**kw)
        if not (0 <= dec.k_min <= dec.k_max <= 64):
            raise ValueError(f"control decision has a bad k range {dec.k_min}..{dec.k_max}")
        if dec.max_cooperating < 1 or dec.verifier_max_batch < 1 or dec.verifier_token_cap < 1:
            raise ValueError("control decision has a non-positive limit")
        if not (math.isfinite(dec.pressure) and -1.0 <= dec.pressure <= 1.0) or dec.version < 0:
            raise ValueError("control decision has a bad pressure or version")
        return dec


# -- settings -------------------------------------------------------------------------------------------
@dataclass
class ControlSettings:
    # speculation length: k_max moves within [k_max_lowest, k_max_highest]; k_min is fixed (<= k_max)
    k_min: int = 0  # per-request policies may shorten drafts down to this (0: they may switch a request's
    # speculation off when its drafts are rarely accepted)
    # where k_max starts and drifts back to: above the fixed default k, so adaptive requests with good
    # acceptance may draft longer, with room left for the idle-verifier rule
    k_max_default: int = 6
    k_max_lowest: int = 1  # shortening stops here (0 would turn speculation off under pressure)
    k_max_highest: int = 8  # lengthening stops here
    k_step: int = 1  # k_max change per action
    # cooperating drafters per request (token fusion)
    cooperating_default: int = 2  # room both ways (routing's own cap is 3); routing may use fewer
    cooperating_lowest: int = 1
    cooperating_highest: int = 3
    # verifier batch limits (the token cap follows the batch limit in proportion)
    batch_default: int = defaults.VERIFIER_MAX_ACTIVE
    batch_lowest: int = 1
    batch_highest: int = 2 * defaults.VERIFIER_MAX_ACTIVE
    batch_step: int = 8
    token_cap_default: int = defaults.VERIFIER_MAX_BATCH_TOKENS
    token_cap_lowest: int = 256
    token_cap_highest: int = 4 * defaults.VERIFIER_MAX_BATCH_TOKENS
    # thresholds: busy shares are 0..1, backlogs are lag + pending per live worker, ages are ms
    verifier_busy_low: float = 0.5  # below: the verifier idles
    verifier_busy_high: float = 0.85  # above: the verifier may be the bottleneck
    drafter_busy_spare: float = 0.6  # below: drafters have room for longer / more drafts
    drafter_busy_high: float = 0.9  # above: drafters are saturated
    draft_backlog_low: float = 8.0  # at most this many draft jobs per drafter = nothing queues
    draft_backlog_high: float = float(defaults.DRAFTER_BATCH_MAX)  # more than one full drafting batch queued
    draft_age_high_ms: float = 200.0  # a draft job this old is probably past the verifier's draft budget
    verify_backlog_low: float = 1.0  # drafts waiting per verifier when it idles
    verify_backlog_high: float = 16.0  # drafts waiting per verifier when it is behind
    verify_age_high_ms: float = 200.0  # a draft waiting this long at the verifier
    verifier_full: float = 0.9  # active / capacity at which waiting requests mean the verifiers are full
    # dynamics
    hysteresis_samples: int = 3  # a rule acts after its condition held this many consecutive samples
    drift_samples: int = 40  # calm samples between steps back toward the defaults (10 s at 250 ms)
    pressure_quantum: float = 0.1  # pressure is rounded to this

    def __post_init__(self) -> None:
        if not (0 <= self.k_min <= self.k_max_lowest <= self.k_max_default <= self.k_max_highest <= 8):
            raise ValueError("need 0 <= k_min <= k_max_lowest <= k_max_default <= k_max_highest <= 8")
        if not (1 <= self.cooperating_lowest <= self.cooperating_default <= self.cooperating_highest <= 3):
            raise ValueError("need 1 <= cooperating_lowest <= cooperating_default <= cooperating_highest <= 3")
        if not (1 <= self.batch_lowest <= self.batch_default <= self.batch_highest):
            raise ValueError("need 1 <= batch_lowest <= batch_default <= batch_highest")
        if not (1 <= self.token_cap_lowest <= self.token_cap_default <= self.token_cap_highest):
            raise ValueError("need 1 <= token_cap_lowest <= token_cap_default <= token_cap_highest")
        if self.hysteresis_samples < 1 or self.drift_samples < 1 or self.k_step < 1 or self.batch_step < 1:
            raise ValueError("hysteresis_samples, drift_samples, k_step and batch_step must be >= 1")
        if not (0 <= self.verifier_busy_low <= self.verifier_busy_high):
            raise ValueError("need verifier_busy_low <= verifier_busy_high")


@dataclass
class Signals:
    """What the rules look at, derived from one sample (logged with every decision)."""

    verifiers: int
    drafters: int
    verifier_busy: float
    drafter_busy: float
    verifier_fill: float
    active_requests: int
    requests_waiting: int
    requests_wait_ms: float
    draft_backlog: float
    draft_age_ms: float
    verify_backlog: float
    verify_age_ms: float

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def signals(inputs: ControlInputs) -> Signals:
    vs, ds = inputs.verifiers, inputs.drafters
    capacity = sum(w.capacity for w in vs if w.capacity > 0)
    active = sum(w.active for w in vs)
    req = inputs.requests
    return Signals(
        verifiers=len(vs),
        drafters=len(ds),
        verifier_busy=sum(w.busy for w in vs) / len(vs) if vs else 0.0,
        drafter_busy=sum(w.busy for w in ds) / len(ds) if ds else 0.0,
        verifier_fill=active / capacity if capacity else 0.0,
        active_requests=active,
        requests_waiting=(req.lag or 0) if req else 0,
        requests_wait_ms=req.oldest_waiting_ms if req else 0.0,
        draft_backlog=sum(s.depth for s in inputs.drafts) / max(1, len(ds)),
        draft_age_ms=max((s.age_ms for s in inputs.drafts), default=0.0),
        verify_backlog=sum(s.depth for s in inputs.verifies) / max(1, len(vs)),
        verify_age_ms=max((s.age_ms for s in inputs.verifies), default=0.0),
    )


def _changes(**pairs: tuple[int, int]) -> str:
    """``k_max 4->5, cooperating 2->3`` for the pairs that differ."""
    return ", ".join(f"{name} {a}->{b}" for name, (a, b) in pairs.items() if a != b)


def _toward(value: int, target: int, step: int) -> int:
    if value < target:
        return min(target, value + step)
    if value > target:
        return max(target, value - step)
    return value


class ControlPolicy:
    """Holds the hysteresis streaks between samples; :meth:`decide` is the whole rule set."""

    RULES = ("piling", "bottleneck", "idle")

    def __init__(self, settings: ControlSettings | None = None) -> None:
        self.settings = settings or ControlSettings()
        self.reset()

    def reset(self) -> None:
        """Forget the streaks (a new controller, or a decision published by someone else)."""
        self.streaks = {name: 0 for name in self.RULES}
        self.calm = 0
        self.last_signals: Signals | None = None
        self.assessment = "no samples yet"

    # -- helpers ----------------------------------------------------------------------------------------
    def initial(self, version: int = 0, at_ms: int = 0, reason: str = "defaults") -> ControlDecision:
        s = self.settings
        return ControlDecision(version, min(s.k_min, s.k_max_default), s.k_max_default, s.cooperating_default,
                               s.batch_default, s.token_cap_default, 0.0, reason, at_ms)

    def token_cap_for(self, batch: int) -> int:
        s = self.settings
        cap = round(s.token_cap_default * batch / s.batch_default)
        return max(s.token_cap_lowest, min(s.token_cap_highest, cap))

    def _quantise(self, p: float) -> float:
        q = self.settings.pressure_quantum
        p = max(-1.0, min(1.0, p))
        return round(round(p / q) * q, 3) if q > 0 else round(p, 3)

    def clamp(self, d: ControlDecision) -> ControlDecision:
        """``d`` with every field inside the bounds."""
        s = self.settings
        k_max = max(s.k_max_lowest, min(s.k_max_highest, d.k_max))
        batch = max(s.batch_lowest, min(s.batch_highest, d.verifier_max_batch))
        return replace(
            d,
            k_max=k_max,
            k_min=min(s.k_min, k_max),
            max_cooperating=max(s.cooperating_lowest, min(s.cooperating_highest, d.max_cooperating)),
            verifier_max_batch=batch,
            verifier_token_cap=max(s.token_cap_lowest, min(s.token_cap_highest, d.verifier_token_cap)),
            pressure=self._quantise(d.pressure if math.isfinite(d.pressure) else 0.0),
        )

    # -- the rules --------------------------------------------------------------------------------------
    def conditions(self, g: Signals) -> dict[str, tuple[bool, float]]:
        """Each rule's condition and its severity (>= 1 when it holds; for ``idle``, 0..1 how idle)."""
        s = self.settings
        piling_score = max(
            g.draft_backlog / s.draft_backlog_high if s.draft_backlog_high > 0 else 0.0,
            g.draft_age_ms / s.draft_age_high_ms if s.draft_age_high_ms > 0 else 0.0,
            g.drafter_busy / s.drafter_busy_high if s.drafter_busy_high > 0 else 0.0,
        )
        piling = g.drafters > 0 and piling_score > 1.0
        backed_up = (g.verify_backlog > s.verify_backlog_high or g.verify_age_ms > s.verify_age_high_ms
                     or (g.requests_waiting > 0 and g.verifier_fill >= s.verifier_full))
        bottleneck = g.verifiers > 0 and g.verifier_busy > s.verifier_busy_high and backed_up
        bottleneck_score = max(
            g.verifier_busy / s.verifier_busy_high if s.verifier_busy_high > 0 else 1.0,
            g.verify_backlog / s.verify_backlog_high if s.verify_backlog_high > 0 else 0.0,
            g.verify_age_ms / s.verify_age_high_ms if s.verify_age_high_ms > 0 else 0.0,
        )
        verifier_idle = (g.verifiers > 0 and g.active_requests > 0 and g.verifier_busy < s.verifier_busy_low
                         and g.verify_backlog <= s.verify_backlog_low)
        drafters_spare = (g.drafters > 0 and g.drafter_busy < s.drafter_busy_spare
                          and g.draft_backlog <= s.draft_backlog_low and g.draft_age_ms <= s.draft_age_high_ms / 2)
        idle = verifier_idle and drafters_spare and not piling and not bottleneck
        idleness = 1.0 - g.verifier_busy / s.verifier_busy_low if s.verifier_busy_low > 0 else 1.0
        return {"piling": (piling, piling_score), "bottleneck": (bottleneck, bottleneck_score),
                "idle": (idle, max(0.0, min(1.0, idleness)))}

    def decide(self, inputs: ControlInputs, previous: ControlDecision) -> ControlDecision:
        s = self.settings
        g = signals(inputs)
        self.last_signals = g
        cond = self.conditions(g)
        for name in self.RULES:
            self.streaks[name] = self.streaks[name] + 1 if cond[name][0] else 0
        calm = not any(c for c, _ in cond.values())
        self.calm = self.calm + 1 if calm else 0

        base = self.clamp(previous)
        k_max, coop = base.k_max, base.max_cooperating
        batch, cap, pressure = base.verifier_max_batch, base.verifier_token_cap, base.pressure
        reasons: list[str] = []
        if base.controls() != previous.controls():
            reasons.append("clamped to the bounds")
        positive: list[float] = []
        h = s.hysteresis_samples

        if self.streaks["bottleneck"] >= h:
            self.streaks["bottleneck"] = 0
            what = (f"verifier bottleneck (busy {g.verifier_busy:.2f}, {g.verify_backlog:.1f} drafts waiting per "
                    f"verifier, oldest {g.verify_age_ms:.0f} ms, {g.requests_waiting} requests waiting)")
            # Larger batches only (see rule 2 in the module docstring); nor is it drafting pressure.
            if batch < s.batch_highest:
                batch = min(s.batch_highest, batch + s.batch_step)
                cap = self.token_cap_for(batch)
                reasons.append(f"{what}: batch {base.verifier_max_batch}->{batch}")
            else:
                reasons.append(f"{what}: batch at its bound")

        if self.streaks["piling"] >= h:
            self.streaks["piling"] = 0
            score = cond["piling"][1]
            new_k = max(s.k_max_lowest, k_max - s.k_step)
            new_coop = max(s.cooperating_lowest, coop - 1)
            what = (f"drafts pile up ({g.draft_backlog:.1f} jobs per drafter, oldest {g.draft_age_ms:.0f} ms, "
                    f"drafter busy {g.drafter_busy:.2f})")
            reasons.append(f"{what}: {_changes(k_max=(k_max, new_k), cooperating=(coop, new_coop)) or 'at the bounds'}")
            k_max, coop = new_k, new_coop
            positive.append(min(1.0, 0.5 * score))

        if self.streaks["idle"] >= h:
            self.streaks["idle"] = 0
            new_k = min(s.k_max_highest, k_max + s.k_step)
            new_coop = min(s.cooperating_highest, coop + 1)
            what = (f"verifier idles (busy {g.verifier_busy:.2f}, {g.verify_backlog:.1f} drafts waiting) and drafters "
                    f"have room (busy {g.drafter_busy:.2f}, {g.draft_backlog:.1f} jobs each)")
            reasons.append(f"{what}: {_changes(k_max=(k_max, new_k), cooperating=(coop, new_coop)) or 'at the bounds'}")
            k_max, coop = new_k, new_coop
            pressure = -min(1.0, 0.5 + 0.5 * cond["idle"][1])

        if positive:
            pressure = max(positive)
        if calm:
            if self.calm % h == 0 and pressure != 0.0:
                old = pressure
                pressure = pressure / 2 if abs(pressure) / 2 >= 0.1 else 0.0
                reasons.append(f"calm: pressure {old:+.1f}->{self._quantise(pressure):+.1f}")
            if self.calm % s.drift_samples == 0:
                if k_max != s.k_max_default:
                    new_k = _toward(k_max, s.k_max_default, s.k_step)
                    reasons.append(f"calm for {self.calm} samples: k_max {k_max}->{new_k} (toward the default)")
                    k_max = new_k
                elif coop != s.cooperating_default:
                    new_coop = _toward(coop, s.cooperating_default, 1)
                    reasons.append(f"calm for {self.calm} samples: cooperating {coop}->{new_coop} (toward the default)")
                    coop = new_coop
                elif batch != s.batch_default:
                    new_batch = _toward(batch, s.batch_default, s.batch_step)
                    reasons.append(f"calm for {self.calm} samples: batch {batch}->{new_batch} (toward the default)")
                    batch, cap = new_batch, self.token_cap_for(new_batch)
                elif cap != self.token_cap_for(batch):
                    cap = self.token_cap_for(batch)
                    reasons.append(f"calm for {self.calm} samples: token cap back to {cap}")

        self.assessment = self._assess(cond, calm)
        candidate = self.clamp(replace(base, k_max=k_max, k_min=min(s.k_min, k_max), max_cooperating=coop,
                                       verifier_max_batch=batch, verifier_token_cap=cap, pressure=pressure))
        if candidate.controls() == previous.controls():
            return previous
        return replace(candidate, version=previous.version + 1, reason="; ".join(reasons) or "adjusted",
                       at_ms=inputs.at_ms)

    def _assess(self, cond: dict, calm: bool) -> str:
        if calm:
            return f"calm for {self.calm} samples"
        h = self.settings.hysteresis_samples
        return ", ".join(f"{name} {self.streaks[name]}/{h}" for name in self.RULES if cond[name][0])
