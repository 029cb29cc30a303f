"""Steering: CoSine's policies applied to the requests one verifier owns (pure, no I/O).

Per request it keeps a router (which drafters, how many cooperate) and a speculation state (how many
positions to draft); per round it turns the verified draft into feedback for both, and it asks the
scheduler which ready requests to verify together. What a decision depends on besides the request is
passed in as a :class:`Load` (the verifier's batch and context, the controller's latest decision). Each
mechanism can be switched off on its own (:class:`Switches`), which is how ``cosine bench`` measures what
each is worth. The single-process engine uses the same routing through :meth:`Steering.new` /
:meth:`experts_for` / :meth:`observe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cosine.policy.control_policy import ControlDecision
from cosine.policy.cost_model import CostModel
from cosine.policy.routing import PriorTable, RequestRouter, RoutingSettings, round_feedback, solo_acceptance
from cosine.policy.scheduling import Candidate, SchedulerSettings, choose_batch, expected_tokens, hold_ms
from cosine.policy.speculation import RequestSpec, SpecSettings, SpeculationController, dearer

NODES_EWMA = 0.05  # weight of the newest draft in Steering.nodes_per_depth
PASS_EWMA = 0.1  # weight of the newest pass in Steering's measured draft wait and pass overhead


@dataclass
class Switches:
    """Which of CoSine's mechanisms are on (all by default; the ablations turn one off)."""

    routing: bool = True  # off: each request keeps the drafter its prompt fits best, one drafter
    fusion: bool = True  # off: one drafter per round (no lockstep cooperation, no fused siblings)
    scheduling: bool = True  # off: verify every ready request, highest priority first, up to the token cap
    adaptive: bool = True  # off: every request drafts the fixed k


@dataclass
class RequestSteer:
    """A request's policy state."""

    spec: RequestSpec
    router: RequestRouter | None = None
    feature: str = ""


@dataclass(frozen=True)
class Load:
    """What a round's decisions depend on besides the request: the requests the verifier holds (the batch a
    pass is shared by), their longest context (attention over it is part of every pass: leaving it out made a
    drafted token look twice as dear at a batch of 30 and switched fair requests off) and the controller's
    latest decision (None: no controller has published; the verifier's own settings hold)."""

    batch: int = 1
    context: int = 0
    control: ControlDecision | None = None

    @property
    def pressure(self) -> float:
        return self.control.pressure if self.control is not None else 0.0


class Steering:
    def __init__(self, switches: Switches, k: int, cost: CostModel | None = None,
                 scheduler: SchedulerSettings | None = None, spec: SpecSettings | None = None,
                 routing: RoutingSettings | None = None) -> None:
        self.switches = switches
        self.k = k
        self.cost = cost or CostModel.default()
        self.scheduler = scheduler or SchedulerSettings()
        # The drafter/target step ratio that speculation control weighs drafts by: the profiled one.
        ratio = self.cost.draft_cost_ratio()
        self.spec_settings = spec or SpecSettings(k_init=k, **({"draft_cost_ratio": ratio} if 0 < ratio < 1 else {}))
        self.controller = SpeculationController(self.spec_settings)
        self.routing = routing or RoutingSettings()
        self.priors = PriorTable()
        # Draft nodes the verifier is fed per draft position (spine plus fused siblings; EWMA over verified
        # drafts): what a drafted position adds to a pass, where the tree width alone counts one per expert
        # candidate kept and fusion keeps the ones its experts disagreed on.
        self.nodes_per_depth = 1.0
        # What a round costs beyond the cost model's bare forward and drafting job, measured by the verifier
        # per pass (EWMA, :meth:`observe_pass`): how long it waited for drafts while holding requests, and its
        # other time outside forwards (Redis calls, serialisation, scheduling, prefilling arrivals between
        # passes). ``draft_ms_sent`` is the drafting time the cost model predicts for the latest round of jobs,
        # which the wait is set against.
        self.draft_wait_ms: float | None = None
        self.pass_overhead_ms = 0.0
        self.draft_ms_sent = 0.0

    def new(self) -> RequestSteer:
        return RequestSteer(RequestSpec(self.spec_settings))

    # -- what to draft ------------------------------------------------------------------------------------
    def adapts(self, mode: str) -> bool:
        """Whether a request with this speculation mode gets its k from adaptive control."""
        return mode not in ("off", "fixed") and self.k != 0 and self.switches.adaptive

    def k_for(self, steer: RequestSteer, mode: str, fixed_k: int | None, room: int, load: Load,
              ahead: bool = False) -> int:
        """Draft positions for the request's next round (0 = a plain target step). ``ahead``: the round's
        draft is in hand already (a bet its drafter sent ahead), so the job only sets the depth of the bets
        drafted while this round is verified: drafting is off the round's path and priced at nothing."""
        if mode == "off" or self.k == 0:  # a verifier started with k=0 never speculates
            return 0
        if mode == "fixed":
            return max(0, min(fixed_k or 0, room))
        if not self.switches.adaptive:
            return max(0, min(self.k, room))
        c = load.control
        bounds = (c.k_min, c.k_max) if c is not None else None
        single = self.plain_pass_ms(load)
        # The drafter/target ratio is relative to a bare forward; a round of plain steps costs its overhead too.
        diluted = single / (single + self.pass_overhead_ms) if single > 0 else 1.0
        share = 0.0 if ahead else self.draft_share() * diluted
        k = self.controller.k_for(steer.spec, bounds=bounds, pressure=load.pressure,
                                  verify_cost=self.verify_cost(load), draft_share=share)
        return max(0, min(k, room))

    def plain_pass_ms(self, load: Load) -> float:
        """The cost model's forward of a pass of plain steps at the verifier's batch and context."""
        n = max(1, load.batch)
        return self.cost.verify_ms(n, load.context, n)

    def verify_cost(self, load: Load) -> float:
        """What one drafted position adds to a request's share of a verification pass, relative to that share
        with no draft (the pass plus the verifier's measured overhead per pass), at the verifier's batch and
        context, a draft of its default length and the nodes a position feeds (``nodes_per_depth``; the cost
        model's knee makes it 0 for a big target feeding few tokens)."""
        n, k = max(1, load.batch), max(1, self.k)
        single = self.plain_pass_ms(load)
        if single <= 0:
            return 0.0
        fed = math.ceil(n * (1 + k * self.nodes_per_depth))  # each drafted position feeds its fused siblings too
        return (self.cost.verify_ms(n, load.context, fed) - single) / (k * (single + self.pass_overhead_ms))

    # -- what a round costs beyond the cost model -------------------------------------------------------
    def observe_pass(self, draft_wait_ms: float, overhead_ms: float, fresh: bool = True) -> None:
        """The verifier's time since its previous pass: waiting for drafts while it held requests, and the rest
        besides the pass's forward (Redis, serialisation, scheduling, prefilling arrivals). ``fresh``: some
        draft of the pass was drafted for its job (not a bet); a pass of bets alone says nothing of how long
        drafting keeps a round waiting."""
        if self.draft_wait_ms is None:
            self.draft_wait_ms, self.pass_overhead_ms = draft_wait_ms, overhead_ms
            return
        if fresh:
            self.draft_wait_ms += PASS_EWMA * (draft_wait_ms - self.draft_wait_ms)
        self.pass_overhead_ms += PASS_EWMA * (overhead_ms - self.pass_overhead_ms)

    def draft_share(self) -> float:
        """The part of drafting's time a round waits for: the verifier's measured wait for drafts per pass
        against the drafting time predicted for the jobs it sends, at most 1 (and 1 before any pass).

        When the verifier is busy with other requests while a round's drafts are made (under load, with
        requests verified in turns), drafts come back before they are needed and their time is off the
        round's path: pricing it in full made drafts shorter than the best fixed length under load (on the
        demo zoo at a burst's peak, the verifier waited about 1 ms per pass for drafts predicted at 6 ms)."""
        if self.draft_wait_ms is None or self.draft_ms_sent <= 0:
            return 1.0
        return min(1.0, self.draft_wait_ms / self.draft_ms_sent)

    def cap(self, ks: dict[str, int], width: int, token_cap: int, load: Load,
            adaptive: dict[str, tuple[RequestSteer, int]] | None = None, ahead: frozenset[str] = frozenset()
            ) -> dict[str, int]:
        """The round's ks (the jobs going out together), adjusted together: with an engine that pads rows,
        one depth for the ``adaptive`` requests (id -> its steering and room; :meth:`one_depth`); otherwise
        their shorter drafts lengthened towards the round's longest where that pays
        (:meth:`SpeculationController.align`); then the longest drafts shortened first when the round's
        draft tokens (padded or not) would exceed the verifier's cap."""
        if not self.switches.adaptive:
            return ks
        width = max(width, round(self.nodes_per_depth))
        if adaptive and self.cost.padded:
            ks = self.one_depth(ks, adaptive, width, load)
        elif adaptive and len(ks) > 1:
            ks = self.align(ks, adaptive, width, load)
        ks = self.controller.cap_total(ks, {rid: width for rid in ks}, token_cap, self.cost.padded)
        drafting = [k for rid, k in ks.items() if k > 0 and rid not in ahead]  # the drafts a round waits for
        if drafting:
            self.draft_ms_sent = self.cost.draft_ms(len(drafting), max(drafting))
        return ks

    def one_depth(self, ks: dict[str, int], adaptive: dict[str, tuple[RequestSteer, int]], width: int,
                  load: Load) -> dict[str, int]:
        """With an engine that pads every row of a pass to its largest tree: one depth for the round's adaptive
        requests (:func:`~cosine.policy.speculation.round_depth`), at most the longest any of them asked for,
        at least the longest fixed one (the pass pads to it anyway, so up to it drafting is free to verify)
        and at least 1 when one of them probes (k = 0 for good, drafting a probe round). Requests switched
        off draft it too: beside the others a plain step costs their slots and commits one token."""
        mine = {rid: a for rid, a in adaptive.items() if rid in ks}
        if not mine:
            return ks
        fixed = max((k for rid, k in ks.items() if rid not in mine), default=0)
        high = max(fixed, *(ks[rid] for rid in mine))
        probing = any(ks[rid] > 0 and a[0].spec.k == 0 for rid, a in mine.items())
        low = min(high, max(fixed, 1 if probing else 0))
        n, context = len(ks), load.context
        rooms = {rid: a[1] for rid, a in mine.items()}
        drafting = dearer(load.pressure) * self.draft_share()

        def round_ms(depth: int) -> float:
            longest = max(depth, fixed)
            total = sum(1 + (min(depth, rooms[rid]) if rid in mine else k) * width for rid, k in ks.items())
            fed = self.cost.fed(n, total, 1 + longest * width)
            return (self.cost.verify_ms(n, context, fed) + self.pass_overhead_ms
                    + drafting * self.cost.draft_ms(n, longest))

        depth = self.controller.round_depth({rid: a[0].spec.acceptance_rate for rid, a in mine.items()}, rooms,
                                            low, high, round_ms, others=len(ks) - len(mine))
        return {rid: min(depth, rooms[rid]) if rid in mine else k for rid, k in ks.items()}

    def align(self, ks: dict[str, int], adaptive: dict[str, tuple[RequestSteer, int]], width: int,
              load: Load) -> dict[str, int]:
        """Lengthen shorter drafts towards the round's longest (the jobs going out together come back to
        one pass, which waits for the longest), priced with the cost model: what a fed token adds to the pass
        against the round's tokens per ms (the pass plus drafting the longest draft)."""
        mine = {rid: a for rid, a in adaptive.items() if rid in ks and ks[rid] > 0}
        top = max(ks.values(), default=0)
        if all(ks[rid] >= top for rid in mine):
            return ks
        tokens = sum(1 + k * width for k in ks.values())
        n, context = len(ks), load.context
        round_ms = (self.cost.verify_ms(n, context, tokens) + self.pass_overhead_ms
                    + self.draft_share() * self.cost.draft_ms(1, top))
        # What a fed token adds to the pass, on average over what alignment could add (a knee makes the first
        # ones free on a big target).
        most = tokens + sum(top - ks[rid] for rid in mine) * width
        token_ms = (self.cost.verify_ms(n, context, most) - self.cost.verify_ms(n, context, tokens)) / (most - tokens)
        return self.controller.align(
            ks, {rid: a[0].spec.acceptance_rate for rid, a in mine.items()}, token_ms, round_ms,
            {rid: width for rid in ks}, {rid: a[1] for rid, a in mine.items()}, load.pressure)

    def experts_for(self, steer: RequestSteer, hosted: list[str], pinned: str | None, allowed: list[str],
                    control: ControlDecision | None = None) -> tuple[list[str], list[float]]:
        """The drafter models for the next job, best first, with their trust (relative router scores);
        no models = the drafter worker's choice (its prompt feature)."""
        if pinned is not None:
            return ([pinned], []) if pinned in hosted else ([], [])
        pool = [e for e in hosted if not allowed or e in allowed]
        if not pool:
            return [], []
        if not self.switches.routing or steer.router is None:
            if steer.feature in pool:
                return [steer.feature], []
            return ([], []) if not allowed else (pool[:1], [])
        most = control.max_cooperating if control is not None else self.routing.max_cooperating
        if not self.switches.fusion:
            most = 1
        chosen = steer.router.choose(pool, max_cooperating=most)
        trust = steer.router.trust(chosen)
        return chosen, [trust[e] for e in chosen] if trust else []

    def learn_feature(self, steer: RequestSteer, feature: str, hosted: list[str]) -> None:
        """The drafter worker told us the request's prompt feature: start its router from the prior."""
        if steer.feature or not feature:
            return
        steer.feature = feature
        if self.switches.routing:
            steer.router = RequestRouter(hosted, self.routing, self.priors.prior(feature, hosted))

    # -- feedback -----------------------------------------------------------------------------------------
    def observe(self, steer: RequestSteer, depth: int, accepted: int, committed: list[int],
                votes: dict[str, list[int]], vote_conf: dict[str, list[float]], nodes: int = 0) -> None:
        """One verified round: acceptance for speculation control, each expert's votes for routing, and
        the draft's ``nodes`` (tree size) for what a drafted position feeds a pass."""
        if depth > 0:
            steer.spec.observe(depth, accepted)
            if nodes >= depth:
                self.nodes_per_depth += NODES_EWMA * (nodes / depth - self.nodes_per_depth)
        if not votes:
            return
        if steer.feature:  # the prior learns what each expert alone would have reached, not the ensemble
            for expert, solo in solo_acceptance(votes, committed).items():
                self.priors.update(steer.feature, expert, solo)
        if steer.router is not None:
            steer.router.observe(round_feedback(votes, vote_conf, committed, accepted))

    # -- what to verify together ----------------------------------------------------------------------------
    def expected(self, steer: RequestSteer, depth: int) -> float:
        """Tokens a round with a draft of ``depth`` positions is expected to commit (bonus included)."""
        return expected_tokens(steer.spec.acceptance_rate, depth) if depth else 1.0

    def _limits(self, max_batch: int, token_cap: int, c: ControlDecision | None) -> SchedulerSettings:
        if c is not None:
            max_batch = min(max_batch, c.verifier_max_batch) if c.verifier_max_batch else max_batch
            token_cap = min(token_cap, c.verifier_token_cap) if c.verifier_token_cap else token_cap
        return SchedulerSettings(**{**self.scheduler.__dict__, "token_cap": token_cap, "max_batch": max_batch})

    def pick(self, cands: list[Candidate], max_batch: int, token_cap: int,
             control: ControlDecision | None = None) -> list[str]:
        """Which ready requests to verify together. Without scheduling: by priority, up to the token cap."""
        settings = self._limits(max_batch, token_cap, control)
        if not self.switches.scheduling:
            chosen, tokens = [], 0
            for cand in sorted(cands, key=lambda x: -x.priority):
                if chosen and (tokens + cand.tree_tokens > settings.token_cap or len(chosen) >= settings.max_batch):
                    break
                chosen.append(cand.rid)
                tokens += cand.tree_tokens
            return chosen
        return choose_batch(cands, self.cost, settings)

    def hold(self, ready: list[Candidate], coming: list[tuple[Candidate, float]], max_batch: int,
             token_cap: int, control: ControlDecision | None = None) -> float:
        """ms to hold the next pass for drafts on their way (0 = go now; never without scheduling)."""
        if not self.switches.scheduling:
            return 0.0
        return hold_ms(ready, coming, self.cost, self._limits(max_batch, token_cap, control))
