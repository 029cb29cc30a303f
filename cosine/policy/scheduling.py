"""Verification batch scheduling: which ready requests the target verifies together in its next pass.

Every ready request is a :class:`Candidate` (what it would feed and is expected to commit, its context,
priority, deadline and wait); a late draft or a request without a drafter is a one-token plain step.
:func:`choose_batch` picks the batch ``S`` maximising a weighted mix of throughput and waiting::

    score(S) = (1 - w) * V(C) / (V(S) + V(R))  -  w * latency(S) / latency(C)

where ``V`` is the cost model's pass time, ``R`` what is left for later passes and ``w`` the latency weight
(at 0 a candidate is left out only where that saves more than a pass's fixed cost). Deadlines and
starvation force candidates in first; the search is greedy under the token cap and ``max_batch``.
:func:`hold_ms` says whether waiting for drafts on their way beats going now. The formulas, the search and
the measurements behind them: ``docs/scheduling.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from cosine.errors import InvalidParameterError
from cosine.policy.cost_model import CostModel

log = logging.getLogger(__name__)

_MIN_MS = 1e-3  # a pass never costs less than this (guards a zero cost model)


@dataclass
class Candidate:
    """One ready request, as the scheduler sees it."""

    rid: str
    tree_tokens: int = 1  # tokens it feeds in the pass: 1 root + draft nodes
    expected_tokens: float = 1.0  # expected committed tokens if verified now (accepted + the bonus token)
    context: int = 0  # committed tokens in its cache (what its attention spans)
    priority: int = 0  # higher goes first
    deadline_in_ms: float | None = None  # time left until its deadline (negative: already late); None: none
    waited_ms: float = 0.0  # since it became ready (or its draft job was sent)
    has_draft: bool = True  # False: verified without a draft, a plain step (1 token fed, 1 committed)

    def __post_init__(self) -> None:
        if not isinstance(self.rid, str) or not self.rid:
            raise InvalidParameterError("rid", f"must be a non-empty string, got {self.rid!r}")
        if not self.has_draft:
            self.tree_tokens, self.expected_tokens = 1, 1.0
        if isinstance(self.tree_tokens, bool) or not isinstance(self.tree_tokens, int) or self.tree_tokens < 1:
            raise InvalidParameterError("tree_tokens", f"must be an integer >= 1, got {self.tree_tokens!r}")
        if not _finite(self.expected_tokens) or self.expected_tokens < 0:
            raise InvalidParameterError(
                "expected_tokens", f"must be a finite number >= 0, got {self.expected_tokens!r}"
            )
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 0:
            raise InvalidParameterError("context", f"must be an integer >= 0, got {self.context!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidParameterError("priority", f"must be an integer, got {self.priority!r}")
        if self.deadline_in_ms is not None and not _finite(self.deadline_in_ms):
            raise InvalidParameterError(
                "deadline_in_ms", f"must be a finite number or None, got {self.deadline_in_ms!r}"
            )
        if not _finite(self.waited_ms) or self.waited_ms < 0:
            raise InvalidParameterError("waited_ms", f"must be a finite number >= 0, got {self.waited_ms!r}")

    @classmethod
    def plain(cls, rid: str, context: int, **kwargs) -> Candidate:
        """A ready request without a draft (late draft or no drafter): a 1-token plain step."""
        return cls(rid, 1, 1.0, context, has_draft=False, **kwargs)


@dataclass
class SchedulerSettings:
    """How :func:`choose_batch` trades verified tokens per ms against waiting."""

    latency_weight: float = 0.5  # w: 0 = throughput first ... 1 = latency first
    # Tokens fed per pass (roots + draft nodes) at most. 256 keeps one pass of the zoo target on one CPU
    # core near 100 ms (7.3 ms + 0.37 ms per token, see CostModel.default); raise it on a GPU.
    token_cap: int = 256
    max_batch: int = 32  # requests per pass at most
    starvation_ms: float = 500.0  # a candidate that waited this long always goes (space permitting)
    urgent_ms: float = 200.0  # a deadline closer than this sends the candidate first
    priority_base: float = 2.0  # each priority level multiplies a candidate's latency weight by this
    # Hold the pass for drafts still on their way (see hold_ms) at most this long; 0 = never hold.
    max_hold_ms: float = 50.0

    def __post_init__(self) -> None:
        if not _finite(self.latency_weight) or not 0.0 <= self.latency_weight <= 1.0:
            raise InvalidParameterError("latency_weight", f"must be in [0, 1], got {self.latency_weight!r}")
        for name in ("token_cap", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")
        if not _finite(self.starvation_ms) or self.starvation_ms <= 0:
            raise InvalidParameterError("starvation_ms", f"must be a number > 0, got {self.starvation_ms!r}")
        if not _finite(self.urgent_ms) or self.urgent_ms < 0:
            raise InvalidParameterError("urgent_ms", f"must be a number >= 0, got {self.urgent_ms!r}")
        if not _finite(self.priority_base) or self.priority_base < 1:
            raise InvalidParameterError("priority_base", f"must be a number >= 1, got {self.priority_base!r}")
        if not _finite(self.max_hold_ms) or self.max_hold_ms < 0:
            raise InvalidParameterError("max_hold_ms", f"must be a number >= 0, got {self.max_hold_ms!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def expected_tokens(acceptance_rate: float, depth: int) -> float:
    """Expected committed tokens of a chain of ``depth`` drafts under i.i.d. per-token acceptance ``a``:
    ``1 + a + a^2 + ... + a^depth = (1 - a^(depth+1)) / (1 - a)`` (accepted drafts + the bonus token)."""
    if not _finite(acceptance_rate) or not 0.0 <= acceptance_rate <= 1.0:
        raise InvalidParameterError("acceptance_rate", f"must be in [0, 1], got {acceptance_rate!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise InvalidParameterError("depth", f"must be an integer >= 0, got {depth!r}")
    a = float(acceptance_rate)
    if a >= 1.0:
        return float(depth + 1)
    return (1.0 - a ** (depth + 1)) / (1.0 - a)


def is_urgent(cand: Candidate, settings: SchedulerSettings) -> bool:
    return cand.deadline_in_ms is not None and cand.deadline_in_ms < settings.urgent_ms


def is_starving(cand: Candidate, settings: SchedulerSettings) -> bool:
    return cand.waited_ms >= settings.starvation_ms


class _Set:
    """Running sums of a set of candidates (what the objective needs), with O(1) add and 'without one'."""

    def __init__(self, cands: Iterable[Candidate], weight) -> None:
        self.weight = weight
        self.members: dict[str, Candidate] = {}
        self.n = 0
        self.tokens = 0
        self.p = 0.0  # sum of latency weights
        self.pw = 0.0  # sum of weight * waited_ms
        for c in cands:
            self.add(c)

    def add(self, c: Candidate) -> None:
        self.members[c.rid] = c
        self.n += 1
        self.tokens += c.tree_tokens
        self.p += self.weight(c)
        self.pw += self.weight(c) * c.waited_ms

    def remove(self, c: Candidate) -> None:
        del self.members[c.rid]
        self.n -= 1
        self.tokens -= c.tree_tokens
        self.p -= self.weight(c)
        self.pw -= self.weight(c) * c.waited_ms

    def top_contexts(self) -> tuple[int, int, str | None]:
        """The largest context, the second largest, and whose the largest is."""
        return _top_two(self.members.values(), lambda c: c.context)

    def top_trees(self) -> tuple[int, int, str | None]:
        """The largest tree (tokens fed), the second largest, and whose the largest is."""
        return _top_two(self.members.values(), lambda c: c.tree_tokens)


def _top_two(cands: Iterable[Candidate], key) -> tuple[int, int, str | None]:
    first, second, who = 0, 0, None
    for c in cands:
        v = key(c)
        if v > first:
            first, second, who = v, first, c.rid
        elif v > second:
            second = v
    return first, second, who


class _Objective:
    def __init__(self, cands: list[Candidate], cost: CostModel, settings: SchedulerSettings) -> None:
        # verify_ms's formula, inlined: the greedy search evaluates it a few thousand times per call.
        self.coef = (cost.verify_base_ms, cost.verify_row_ms, cost.verify_token_ms, cost.verify_context_ms)
        self.free = cost.verify_free_tokens
        self.fed = cost.fed
        self.w = settings.latency_weight
        self.max_batch, self.token_cap = settings.max_batch, settings.token_cap
        base = settings.priority_base
        self.weight = lambda c: base ** max(-64, min(64, c.priority))
        everyone = _Set(cands, self.weight)
        self.v_all = self.v(everyone.n, max(c.context for c in cands), everyone.tokens, everyone.top_trees()[0])
        self.lat_ref = max(everyone.pw + everyone.p * self.v_all, 1e-12)

    def v(self, n: int, context: int, tokens: int, largest: int) -> float:
        if not n:
            return 0.0
        base, row, token, ctx = self.coef
        fed = self.fed(n, tokens, largest)
        return max(base + row * n + token * max(0.0, fed - self.free) + ctx * n * context, _MIN_MS)

    def score(self, n, context, tokens, largest, p_in,
              rest_n, rest_context, rest_tokens, rest_largest, rest_p, rest_pw) -> float:
        if n == 0:
            return -math.inf
        v = self.v(n, context, tokens, largest)
        v_rest = self.v(rest_n, rest_context, rest_tokens, rest_largest)
        if rest_n:  # the rest goes in as many passes as the caps need, each paying the fixed cost
            fed = self.fed(rest_n, rest_tokens, rest_largest)
            passes = max(math.ceil(rest_n / self.max_batch), math.ceil(fed / self.token_cap))
            v_rest += (passes - 1) * self.coef[0]
        latency = p_in * v + rest_pw + rest_p * (v + v_rest)
        return (1 - self.w) * self.v_all / (v + v_rest) - self.w * latency / self.lat_ref


def _without(top: tuple[int, int, str | None], c: Candidate) -> int:
    """The largest value of a set once ``c`` left it (``top`` from :func:`_top_two`)."""
    first, second, who = top
    return second if who == c.rid else first


def _score_with(obj: _Objective, chosen: _Set, chosen_top: tuple[int, int], rest: _Set, rest_top,
                c: Candidate) -> float:
    """The score if ``c`` moved from the rest into the chosen set (``chosen_top``: its largest context and
    tree; ``rest_top``: the rest's :meth:`_Set.top_contexts` and :meth:`_Set.top_trees`)."""
    wc = obj.weight(c)
    alone = rest.n <= 1
    return obj.score(
        chosen.n + 1,
        max(chosen_top[0], c.context),
        chosen.tokens + c.tree_tokens,
        max(chosen_top[1], c.tree_tokens),
        chosen.p + wc,
        rest.n - 1,
        0 if alone else _without(rest_top[0], c),
        rest.tokens - c.tree_tokens,
        0 if alone else _without(rest_top[1], c),
        rest.p - wc,
        rest.pw - wc * c.waited_ms,
    )


def _score_without(obj: _Objective, chosen: _Set, chosen_top, rest: _Set, rest_top: tuple[int, int],
                   c: Candidate) -> float:
    """The score if ``c`` moved from the chosen set back to the rest (``chosen_top``: the chosen set's
    :meth:`_Set.top_contexts` and :meth:`_Set.top_trees`; ``rest_top``: the rest's largest context and tree)."""
    wc = obj.weight(c)
    return obj.score(
        chosen.n - 1,
        _without(chosen_top[0], c),
        chosen.tokens - c.tree_tokens,
        _without(chosen_top[1], c),
        chosen.p - wc,
        rest.n + 1,
        max(rest_top[0], c.context),
        rest.tokens + c.tree_tokens,
        max(rest_top[1], c.tree_tokens),
        rest.p + wc,
        rest.pw + wc * c.waited_ms,
    )


def objective(chosen: Iterable[str], cands: list[Candidate], cost: CostModel, settings: SchedulerSettings) -> float:
    """The score of verifying exactly ``chosen`` now (see the module docstring); ``-inf`` for an empty batch."""
    if not cands:
        return -math.inf
    picked = set(chosen)
    obj = _Objective(cands, cost, settings)
    inside = _Set((c for c in cands if c.rid in picked), obj.weight)
    rest = _Set((c for c in cands if c.rid not in picked), obj.weight)
    return obj.score(
        inside.n, inside.top_contexts()[0], inside.tokens, inside.top_trees()[0], inside.p,
        rest.n, rest.top_contexts()[0], rest.tokens, rest.top_trees()[0], rest.p, rest.pw,
    )


def choose_batch(cands: list[Candidate], cost: CostModel, settings: SchedulerSettings | None = None) -> list[str]:
    """The request ids to verify together in the next pass, in the order they were picked."""
    settings = settings or SchedulerSettings()
    if not cands:
        return []
    if len({c.rid for c in cands}) != len(cands):
        raise InvalidParameterError("candidates", "request ids must be unique")
    search = _Search(cands, cost, settings)

    # 1. Forced: urgent deadlines (earliest first), then the starving (longest wait first); priority breaks ties.
    forced = [c for c in cands if is_urgent(c, settings) or is_starving(c, settings)]
    forced.sort(
        key=lambda c: (0, c.deadline_in_ms, -c.priority, -c.waited_ms)
        if is_urgent(c, settings)
        else (1, -c.waited_ms, -c.priority, 0.0)
    )
    for c in forced:
        if search.chosen.n >= settings.max_batch:
            break
        if search.fits(c):
            search.take(c)

    # 2. Greedy: the highest (priority, marginal gain) among the candidates that keep or raise the score; with a
    #    padded engine first among those no larger than the best largest tree (see _largest_tree), then among
    #    all, so that no single addition improves the result either way.
    biggest = max(c.tree_tokens for c in cands)
    for largest in dict.fromkeys((_largest_tree(cands, forced, cost, settings), biggest)):
        search.greedy(largest)
    # 3. From the other side: everyone (if everyone fits), then whoever's leaving improves the score most,
    #    while one does. Adding one at a time can miss the split that leaves one costly candidate behind
    #    (its context or its tree would pad every row): the first additions make the rest cheaper by taking
    #    it. The better of the two batches goes, polished by the greedy additions.
    fed_all = cost.fed(len(cands), sum(c.tree_tokens for c in cands), biggest)
    if len(cands) <= settings.max_batch and fed_all <= settings.token_cap:
        pruned = _Search(cands, cost, settings)
        for c in cands:
            pruned.take(c)
        pruned.prune({c.rid for c in forced})
        pruned.greedy(biggest)
        if pruned.score() > search.score():
            search = pruned
    log.debug("scheduled %d of %d candidates (%d tokens): %s", search.chosen.n, len(cands), search.chosen.tokens,
              search.order)
    return search.order


class _Search:
    """The chosen set and the rest while :func:`choose_batch` moves candidates from one to the other."""

    def __init__(self, cands: list[Candidate], cost: CostModel, settings: SchedulerSettings) -> None:
        self.cost, self.settings = cost, settings
        self.obj = _Objective(cands, cost, settings)
        self.chosen = _Set((), self.obj.weight)
        self.rest = _Set(cands, self.obj.weight)
        self.top = (0, 0)  # the chosen set's largest context and largest tree (it only grows)
        self.order: list[str] = []

    def fits(self, c: Candidate) -> bool:
        if self.chosen.n == 0:
            return True  # one candidate alone always fits
        fed = self.cost.fed(self.chosen.n + 1, self.chosen.tokens + c.tree_tokens, max(self.top[1], c.tree_tokens))
        return self.chosen.n < self.settings.max_batch and fed <= self.settings.token_cap

    def take(self, c: Candidate) -> None:
        self.rest.remove(c)
        self.chosen.add(c)
        self.top = (max(self.top[0], c.context), max(self.top[1], c.tree_tokens))
        self.order.append(c.rid)

    def score(self) -> float:
        chosen, rest = self.chosen, self.rest
        return self.obj.score(
            chosen.n, self.top[0], chosen.tokens, self.top[1], chosen.p,
            rest.n, rest.top_contexts()[0], rest.tokens, rest.top_trees()[0], rest.p, rest.pw,
        )

    def prune(self, keep: set[str]) -> None:
        """Move the chosen candidate whose leaving improves the score most to the rest, while one does
        (the ``keep`` ones stay; so does the last one)."""
        chosen, rest, obj = self.chosen, self.rest, self.obj
        while chosen.n > 1:
            current = self.score()
            top = (chosen.top_contexts(), chosen.top_trees())
            rest_top = (rest.top_contexts()[0], rest.top_trees()[0])
            best, best_c = 0.0, None
            for c in chosen.members.values():
                if c.rid in keep:
                    continue
                gain = _score_without(obj, chosen, top, rest, rest_top, c) - current
                if gain > best:
                    best, best_c = gain, c
            if best_c is None:
                break
            chosen.remove(best_c)
            rest.add(best_c)
            self.order.remove(best_c.rid)
            self.top = (chosen.top_contexts()[0], chosen.top_trees()[0])

    def greedy(self, largest: int) -> None:
        """Take candidates no larger than ``largest`` while one keeps or raises the score, best first."""
        chosen, rest, obj = self.chosen, self.rest, self.obj
        while chosen.n < self.settings.max_batch and rest.n:
            current = self.score()
            top = (rest.top_contexts(), rest.top_trees())
            best: tuple[int, float] | None = None
            best_c: Candidate | None = None
            for c in rest.members.values():
                if c.tree_tokens > largest or not self.fits(c):
                    continue
                if chosen.n == 0:  # the first pick always goes: the most tokens per ms alone
                    gain = c.expected_tokens / obj.v(1, c.context, c.tree_tokens, c.tree_tokens)
                else:
                    gain = _score_with(obj, chosen, self.top, rest, top, c) - current
                    if gain < -1e-9 * abs(current):  # a tie serves it now: the rest waits less
                        continue
                key = (c.priority, gain)
                if best is None or key > best:
                    best, best_c = key, c
            if best_c is None:
                break
            self.take(best_c)


def _largest_tree(cands: list[Candidate], forced: list[Candidate], cost: CostModel,
                  settings: SchedulerSettings) -> int:
    """The largest tree the greedy search may add (the forced candidates go regardless).

    With a padded engine the pass's largest tree sets every row's cost, and a greedy search that starts from
    the best single candidate would start from a deep tree and then add plain steps at its size. So each
    tree size present is tried as the pass's largest: the batch of every candidate no larger (plus the
    forced ones) is scored, and the best size bounds the search. Packed engines: no bound."""
    sizes = sorted({c.tree_tokens for c in cands})
    if not cost.padded or len(sizes) == 1:
        return sizes[-1]
    must = {c.rid for c in forced}
    best, best_score = sizes[-1], -math.inf
    for size in sizes:
        batch = [c.rid for c in cands if c.tree_tokens <= size or c.rid in must]
        score = objective(batch, cands, cost, settings)
        if score > best_score:
            best, best_score = size, score
    return best


def hold_ms(ready: list[Candidate], coming: list[tuple[Candidate, float]], cost: CostModel,
            settings: SchedulerSettings | None = None) -> float:
    """How long to hold the next pass for drafts still on their way (0 = verify now).

    ``coming`` pairs a request whose draft has not arrived with the ms until it is expected. Going now, the
    drafts due by ``t`` are done at ``max(V(ready), t) + V(due)``; holding ``t`` ms for them, at
    ``t + V(ready + due)``. Hold for the arrival time that finishes soonest, if that beats going now (it pays
    for a pass that hardly grows with the batch, see ``docs/scheduling.md``). Never held: with nothing ready,
    with an urgent or starving candidate ready, past ``max_hold_ms``, or when the batch is already full.
    """
    settings = settings or SchedulerSettings()
    if not ready or not coming or settings.max_hold_ms <= 0:
        return 0.0
    if any(is_urgent(c, settings) or is_starving(c, settings) for c in ready):
        return 0.0
    n, ctx, largest, tokens = len(ready), max(c.context for c in ready), max(c.tree_tokens for c in ready), \
        sum(c.tree_tokens for c in ready)
    if n >= settings.max_batch or cost.fed(n, tokens, largest) >= settings.token_cap:
        return 0.0

    def v(n: int, ctx: int, tokens: int, largest: int) -> float:
        return max(cost.verify_ms(n, ctx, cost.fed(n, tokens, largest)), _MIN_MS)

    now_ms = v(n, ctx, tokens, largest)
    due = [0, 0, 0, 0]  # the due drafts alone: n, context, tokens, largest tree
    best_saving, best_wait = 0.0, 0.0
    for cand, eta in sorted(coming, key=lambda x: x[1]):
        eta = max(0.0, eta)
        fed = cost.fed(n + 1, tokens + cand.tree_tokens, max(largest, cand.tree_tokens))
        if eta > settings.max_hold_ms or n >= settings.max_batch or fed > settings.token_cap:
            break
        n, ctx, largest, tokens = n + 1, max(ctx, cand.context), max(largest, cand.tree_tokens), \
            tokens + cand.tree_tokens
        due = [due[0] + 1, max(due[1], cand.context), due[2] + cand.tree_tokens, max(due[3], cand.tree_tokens)]
        saving = max(now_ms, eta) + v(*due) - (eta + v(n, ctx, tokens, largest))
        if saving > best_saving:
            best_saving, best_wait = saving, eta
    return best_wait
