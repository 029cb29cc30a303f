"""Adaptive speculation control: how many tokens each request drafts per round.

Each request keeps an acceptance estimate ``a`` (:class:`RequestSpec`, an EWMA from a prior). With ``k``
draft positions a round commits ``E(k) = 1 + a + ... + a^k`` tokens on average, and
:class:`SpeculationController` picks the ``k`` in its bounds maximising::

    U(k) = E(k) / (1 + (v + c * s * dearer(pressure)) * k)

``v``: what a drafted token adds to the verification pass; ``c``: a drafter step over a target pass; ``s``:
the share of drafting the round waits for; ``pressure`` (:meth:`~SpeculationController.balance`) makes
drafting dearer when work piles up. ``k = 0`` (plain decoding) wins when ``a <= v + c * dearer(pressure)``.
Warm-up, hysteresis and probe rounds keep ``k`` stable. A pass waits for its batch's longest draft, so a
batch's drafts are decided together (:meth:`~SpeculationController.align`, :func:`round_depth`). The
reasoning and the measurements: ``docs/speculation-control.md``.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from cosine.errors import InvalidParameterError
from cosine.policy.scheduling import expected_tokens

log = logging.getLogger(__name__)

MODES = ("adaptive", "off", "fixed")


def _int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(name, f"must be an integer >= {low}, got {value!r}")
    return value


def _number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(name, f"must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidParameterError(name, f"must be in [{low}, {high}], got {value!r}")
    return float(value)


@dataclass
class SpecSettings:
    """Speculation control settings (``k`` = draft positions per round)."""

    k_min: int = 0  # lowest k the adaptive mode picks (0 allows switching speculation off)
    k_max: int = 8  # highest k the adaptive mode picks
    k_init: int = 4  # k during warm-up (and the first current k); must lie in [k_min, k_max]
    warmup_rounds: int = 2  # verified rounds drafted at k_init before adapting
    # change k only if the new optimum's U beats the current k's by this share (U is flat near its optimum:
    # a share much above a few percent pins k at k_init)
    hysteresis: float = 0.03
    ewma: float = 0.3  # weight of the newest round in the acceptance estimate
    # c: one drafter step / one target pass. The zoo manifest's drafter/target step ratio is about 0.22;
    # CostModel.draft_cost_ratio() computes it from a profile of the machine at hand.
    draft_cost_ratio: float = 0.2
    # Acceptance rate below which k = 0. None: computed, c * dearer(pressure) (where U(1) stops beating U(0)).
    off_below: float | None = None
    prior_acceptance: float = 0.6  # acceptance rate assumed before any round is observed
    # How many tested draft positions the prior counts as, for good: it keeps a few unlucky rounds from
    # driving the estimate to 0, yet lets a hopeless request switch off (a steady k = 4 history weighs
    # about 7 positions at ewma 0.3, a k = 1 history about 3).
    prior_trials: float = 0.5
    probe_every: int = 16  # a request at k = 0 drafts one probe round (at k_init) at least this often; 0 = never
    probe_first: int = 2  # ... and its first probe this many rounds after going off (the gap doubles per probe)
    # balance(): the verifier utilisation aimed at, the backlog that counts as one unit of pressure, and how
    # steeply the pressure saturates (tanh of gain * (utilisation term + backlog term)).
    target_busy: float = 0.8
    backlog_scale: float = 16.0
    pressure_gain: float = 1.5

    def __post_init__(self) -> None:
        _int("k_min", self.k_min)
        _int("k_max", self.k_max)
        _int("k_init", self.k_init)
        if self.k_min > self.k_max:
            raise InvalidParameterError("k_min", f"must be <= k_max ({self.k_max}), got {self.k_min}")
        if not self.k_min <= self.k_init <= self.k_max:
            raise InvalidParameterError("k_init", f"must lie in [{self.k_min}, {self.k_max}], got {self.k_init}")
        _int("warmup_rounds", self.warmup_rounds)
        _number("hysteresis", self.hysteresis, 0.0)
        _number("ewma", self.ewma, 0.0, 1.0)
        if self.ewma == 0:
            raise InvalidParameterError("ewma", "must be > 0 (0 would never learn)")
        _number("draft_cost_ratio", self.draft_cost_ratio, 0.0)
        if self.off_below is not None:
            _number("off_below", self.off_below, 0.0, 1.0)
        _number("prior_acceptance", self.prior_acceptance, 0.0, 1.0)
        _number("prior_trials", self.prior_trials, 0.0)
        if self.prior_trials == 0:
            raise InvalidParameterError("prior_trials", "must be > 0")
        _int("probe_every", self.probe_every)
        _int("probe_first", self.probe_first, 1)
        _number("target_busy", self.target_busy, 0.0, 1.0)
        if not 0 < self.target_busy < 1:
            raise InvalidParameterError("target_busy", f"must be strictly between 0 and 1, got {self.target_busy}")
        _number("backlog_scale", self.backlog_scale, 0.0)
        if self.backlog_scale == 0:
            raise InvalidParameterError("backlog_scale", "must be > 0")
        _number("pressure_gain", self.pressure_gain, 0.0)


class RequestSpec:
    """One request's speculation state: its acceptance estimate and the k it currently drafts."""

    def __init__(self, settings: SpecSettings | None = None, prior: float | None = None) -> None:
        s = settings or SpecSettings()
        self.ewma = s.ewma
        prior = s.prior_acceptance if prior is None else _number("prior", prior, 0.0, 1.0)
        # Discounted sums of accepted and of tested positions (older rounds decay by 1 - ewma per round, so
        # the newest round carries an ewma share of the weight); the prior is added to both, undecayed.
        self._prior = prior
        self._prior_trials = s.prior_trials
        self._accepted = 0.0
        self._trials = 0.0
        self.rounds = 0  # verified rounds that had a draft
        self.drafted = 0  # total draft positions
        self.accepted = 0  # total accepted positions
        self.k: int | None = None  # the current k (None until the first decision)
        self.rounds_off = 0  # consecutive decisions of k = 0 since going off or the last probe
        self.probe_gap = 0  # rounds off before the next probe (0: not off; set when it goes off)

    def observe(self, drafted: int, accepted: int) -> None:
        """Record one verified round: ``drafted`` draft positions (the tree's depth), ``accepted`` of them kept.

        Positions after the first rejection were never tested, so a round tests ``accepted + 1`` positions
        when one was rejected and ``drafted`` when all were accepted. A round without a draft changes nothing.
        """
        _int("drafted", drafted)
        _int("accepted", accepted)
        if accepted > drafted:
            raise InvalidParameterError("accepted", f"must be <= drafted ({drafted}), got {accepted}")
        if drafted == 0:
            return
        tested = accepted + (1 if accepted < drafted else 0)
        keep = 1 - self.ewma
        self._accepted = keep * self._accepted + accepted
        self._trials = keep * self._trials + tested
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted

    @property
    def acceptance_rate(self) -> float:
        """Estimated probability that the target accepts a draft position (given the ones before it)."""
        rate = (self._accepted + self._prior * self._prior_trials) / (self._trials + self._prior_trials)
        return min(1.0, max(0.0, rate))

    def __repr__(self) -> str:
        return f"RequestSpec(rate={self.acceptance_rate:.3f}, rounds={self.rounds}, k={self.k})"


def cap_total(ks: dict[str, int], widths: dict[str, int] | None, token_cap: int,
              padded: bool = False) -> dict[str, int]:
    """Shorten drafts until the pass fits ``token_cap``: each request feeds ``1 + k * width`` tokens, and with
    ``padded`` every request computes as many as the largest (an engine padding rows to the longest segment).

    While the total is over the cap, the request with the most draft candidates (``k * width``; ties by
    id) loses one position; ``k`` never goes below 0. If even all roots exceed the cap, every ``k`` is 0.
    """
    _int("token_cap", token_cap, 1)
    widths = widths or {}
    out: dict[str, int] = {}
    width: dict[str, int] = {}
    for rid, k in ks.items():
        out[rid] = _int(f"ks[{rid}]", k)
        width[rid] = _int(f"widths[{rid}]", widths.get(rid, 1), 1)
    total = sum(1 + out[r] * width[r] for r in out)
    heap = [(-out[r] * width[r], r) for r in out if out[r] > 0]
    heapq.heapify(heap)

    def fed() -> int:  # the heap's top holds the most candidates any request still drafts
        return len(out) * (1 + (-heap[0][0] if heap else 0)) if padded else total

    while fed() > token_cap and heap:
        _, rid = heapq.heappop(heap)
        out[rid] -= 1
        total -= width[rid]
        if out[rid] > 0:
            heapq.heappush(heap, (-out[rid] * width[rid], rid))
    return out


def round_depth(rates: dict[str, float], limits: dict[str, int], low: int, high: int,
                round_ms: Callable[[int], float], others: int = 0) -> int:
    """For an engine that pads every row of a pass to its largest tree: the depth ``K`` in ``[low, high]``
    that every request of the round drafts (each at most its limit), minimising the round's mean per-token
    latency, ``round_ms(K) * mean(1 / E_i(K))`` over its requests (why latency and not tokens per ms:
    ``docs/speculation-control.md``).

    ``rates``: the acceptance estimates of the requests whose depth it decides; ``limits``: the most
    positions each may draft (its room); ``round_ms(K)``: the round's time at depth ``K`` (the pass plus the
    drafting); ``others``: the round's other requests (fixed lengths), counted as committing one token
    whatever ``K`` is. Ties go to the shorter depth.
    """
    _int("low", low)
    _int("others", others)
    if high < low:
        raise InvalidParameterError("high", f"must be >= low ({low}), got {high!r}")
    best, best_latency = low, math.inf
    for depth in range(low, high + 1):
        inverse = others + sum(1 / expected_tokens(_number(f"rates[{rid}]", rate, 0.0, 1.0),
                                                   min(depth, _int(f"limits[{rid}]", limits.get(rid, depth))))
                               for rid, rate in rates.items())
        latency = round_ms(depth) * inverse
        if latency < best_latency * (1 - 1e-12):
            best, best_latency = depth, latency
    return best


class SpeculationController:
    """Chooses k per request and turns queue signals into pressure (see the module docstring)."""

    cap_total = staticmethod(cap_total)
    round_depth = staticmethod(round_depth)

    def __init__(self, settings: SpecSettings | None = None) -> None:
        self.settings = settings or SpecSettings()

    def new_request(self, prior: float | None = None) -> RequestSpec:
        return RequestSpec(self.settings, prior)

    # -- the model ------------------------------------------------------------------------------------
    def cost_ratio(self, pressure: float = 0.0, draft_share: float = 1.0) -> float:
        """The effective drafter/target cost ratio ``c * share * dearer(pressure)``: ``draft_share`` is the part
        of drafting's time a round waits for (1: all of it; less where drafts come back while the verifier is
        busy with other work, so their time is off the round's path)."""
        return self.settings.draft_cost_ratio * _number("draft_share", draft_share, 0.0, 1.0) * dearer(pressure)

    def off_threshold(self, pressure: float = 0.0, verify_cost: float = 0.0, draft_share: float = 1.0) -> float:
        """The acceptance rate under which k = 0 pays more than any k >= 1."""
        if self.settings.off_below is not None:
            return self.settings.off_below
        return min(1.0, self.cost_ratio(pressure, draft_share) + _number("verify_cost", verify_cost, 0.0))

    def utility(self, rate: float, k: int, pressure: float = 0.0, verify_cost: float = 0.0,
                draft_share: float = 1.0) -> float:
        """Expected committed tokens per unit of cost: ``E(k) / (1 + (v + c * share * dearer(pressure)) * k)``,
        where ``v`` (``verify_cost``) is what one drafted token adds to the request's share of a verification
        pass, relative to that share without a draft (0 for a target whose pass does not grow with the tokens
        fed), and ``share`` (``draft_share``) the part of drafting a round waits for (:meth:`cost_ratio`)."""
        return expected_tokens(rate, k) / (1 + (self.cost_ratio(pressure, draft_share) + verify_cost) * k)

    def best_k(self, rate: float, low: int, high: int, pressure: float = 0.0, verify_cost: float = 0.0,
               draft_share: float = 1.0) -> int:
        """The k in ``[low, high]`` with the highest utility (the smallest one on ties)."""
        if low == 0 and self.settings.off_below is not None and rate < self.settings.off_below:
            return 0
        verify_cost = _number("verify_cost", verify_cost, 0.0)
        best, best_u = low, -math.inf
        for k in range(low, high + 1):
            u = self.utility(rate, k, pressure, verify_cost, draft_share)
            if u > best_u * (1 + 1e-12):
                best, best_u = k, u
        return best

    # -- decisions ------------------------------------------------------------------------------------
    def k_for(
        self,
        state: RequestSpec,
        mode: str = "adaptive",
        fixed_k: int | None = None,
        bounds: tuple[int, int] | None = None,
        pressure: float = 0.0,
        verify_cost: float = 0.0,
        draft_share: float = 1.0,
    ) -> int:
        """The k to draft this round (call once per round).

        ``off``: 0. ``fixed``: ``fixed_k`` (default ``k_init``), as asked: bounds and pressure do not apply.
        ``adaptive``: ``k_init`` during warm-up, then the utility-maximising k with hysteresis, inside
        ``bounds`` (the controller's, overriding ``k_min``/``k_max``); k_init and the current k are clamped
        into the bounds too.
        """
        s = self.settings
        if mode not in MODES:
            raise InvalidParameterError("mode", f"must be one of {MODES}, got {mode!r}")
        if mode == "off":
            return 0
        if mode == "fixed":
            return _int("fixed_k", s.k_init if fixed_k is None else fixed_k)
        pressure = _pressure(pressure)
        low, high = s.k_min, s.k_max
        if bounds is not None:
            if len(bounds) != 2:
                raise InvalidParameterError("bounds", f"must be (low, high), got {bounds!r}")
            low, high = _int("bounds", bounds[0]), _int("bounds", bounds[1])
            if low > high:
                raise InvalidParameterError("bounds", f"low must be <= high, got {bounds!r}")
        clamp = lambda k: max(low, min(high, k))  # noqa: E731
        if state.rounds < s.warmup_rounds and s.k_init > 0:
            k = clamp(s.k_init)
        else:
            rate = state.acceptance_rate
            current = clamp(s.k_init if state.k is None else state.k)
            best = self.best_k(rate, low, high, pressure, verify_cost, draft_share)
            forced_off = best == 0 and s.off_below is not None and rate < s.off_below
            better = (self.utility(rate, best, pressure, verify_cost, draft_share)
                      > (1 + s.hysteresis) * self.utility(rate, current, pressure, verify_cost, draft_share))
            if best != current and (forced_off or better):
                log.debug("k %d -> %d (rate %.3f, pressure %.2f)", current, best, rate, pressure)
                k = best
            else:
                k = current
        state.k = k
        if k == 0:
            state.rounds_off += 1
            state.probe_gap = state.probe_gap or min(s.probe_first, s.probe_every)
            if s.probe_every and state.rounds_off >= state.probe_gap and high > 0:
                state.rounds_off = 0
                state.probe_gap = min(2 * state.probe_gap, s.probe_every)
                return clamp(max(1, s.k_init))  # a probe round: state.k stays 0 unless the data lift it
        else:
            state.rounds_off = state.probe_gap = 0
        return k

    def align(self, ks: dict[str, int], rates: dict[str, float], token_ms: float, round_ms: float,
              widths: dict[str, int] | None = None, limits: dict[str, int] | None = None,
              pressure: float = 0.0) -> dict[str, int]:
        """Lengthen the shorter drafts of a batch towards its longest one where that pays.

        ``ks``: the k of each request whose job goes out now (0: no draft, left alone); ``rates``: their
        acceptance estimates (a request without one is left alone); ``token_ms``: what one more fed token
        adds to the verification pass; ``round_ms``: the round's time at ``ks`` (the pass plus drafting the
        longest draft); ``widths``: candidates per position (default 1); ``limits``: the most positions
        each request may draft (its room; default none beyond the longest draft).

        The pass waits for the longest draft, ``K`` positions, whatever the others draft, so a request at
        ``k < K`` drafting ``k' <= K`` costs the round only the ``(k' - k) * width`` tokens it adds to the
        pass, ``token_ms`` each, weighed by ``dearer(pressure)`` like any drafting. It is lengthened to the
        longest ``k'`` whose added tokens ``E(k') - E(k)`` per added ms are at least the round's own tokens
        per ms (``sum of E(k) / round_ms``), i.e. when lengthening raises the batch's rate.
        """
        pressure = _pressure(pressure)
        _number("token_ms", token_ms, 0.0)
        _number("round_ms", round_ms, 0.0)
        widths, limits = widths or {}, limits or {}
        out = {rid: _int(f"ks[{rid}]", k) for rid, k in ks.items()}
        top = max(out.values(), default=0)
        if top == 0:
            return out
        gain = 0.0
        for rid, k in out.items():
            rate = rates.get(rid)
            gain += expected_tokens(_number(f"rates[{rid}]", rate, 0.0, 1.0), k) if rate is not None else 1.0
        per_ms = gain / round_ms if round_ms > 0 else math.inf
        for rid, k in out.items():
            rate = rates.get(rid)
            if k == 0 or rate is None:
                continue
            width = _int(f"widths[{rid}]", widths.get(rid, 1), 1)
            limit = min(top, _int(f"limits[{rid}]", limits.get(rid, top)))
            base = expected_tokens(rate, k)
            for longer in range(limit, k, -1):
                cost = token_ms * (longer - k) * width * dearer(pressure)
                added = expected_tokens(rate, longer) - base
                if added > 0 and added >= per_ms * cost:
                    out[rid] = longer
                    break
        return out

    def balance(self, verifier_busy: float, draft_backlog: int, verify_backlog: int) -> float:
        """Pressure in [-1, 1] from the verifier's utilisation (share of time computing, 0..1) and the backlogs.

        ``pressure = tanh(gain * (u + (draft_backlog + verify_backlog) / backlog_scale))`` where ``u`` maps the
        utilisation onto [-1, 1] around ``target_busy`` (0 at the target, -1 idle, +1 saturated). An idle
        verifier with empty queues gives about -0.9 (draft longer); a saturated one, or work piling up at
        either stage, pushes towards +1 (draft shorter: rejected drafts waste the scarce side's time).
        """
        s = self.settings
        busy = min(1.0, max(0.0, _number("verifier_busy", verifier_busy)))
        backlog = _int("draft_backlog", draft_backlog) + _int("verify_backlog", verify_backlog)
        if busy >= s.target_busy:
            u = (busy - s.target_busy) / (1 - s.target_busy)
        else:
            u = (busy - s.target_busy) / s.target_busy
        return math.tanh(s.pressure_gain * (u + backlog / s.backlog_scale))


def _pressure(value: float) -> float:
    return min(1.0, max(-1.0, _number("pressure", value)))


def dearer(pressure: float) -> float:
    """The factor pressure puts on the price of drafting and of the tokens a draft adds to a pass:
    ``1 + max(0, pressure)`` (an idle verifier makes nothing cheaper: see ``docs/speculation-control.md``)."""
    return 1 + max(0.0, _pressure(pressure))
