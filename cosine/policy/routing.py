"""Expertise routing: which drafters draft for a request, decided per round from how they have done.

Each request keeps, per drafter, a score: a moving average of the harmonic mean of the drafter's own
confidence and of its agreement with the tokens the target committed (the CoSine paper's combination: a
drafter scores high only when it is both sure and right). While the request's recent acceptance is poor the
router explores (untried drafters first, then by an upper confidence bound); otherwise it exploits the best
drafter and those whose score is close to it. Before a drafter has feedback its score comes from a prior
(:class:`PriorTable`, learned online per kind of prompt). Everything is deterministic: ties go to the
drafter whose name sorts first. Measurements and the variants tried: ``docs/routing.md``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def harmonic(a: float, b: float) -> float:
    """Harmonic mean of two non-negative numbers; 0 when either is 0."""
    if a <= 0.0 or b <= 0.0:
        return 0.0
    return 2.0 * a * b / (a + b)


def length_to_score(acceptance_length: float) -> float:
    """Map a mean acceptance length (>= 1) onto the score scale [0, 1): the share of committed tokens
    that came from the draft, ``1 - 1/L`` (1 -> 0, 2 -> 0.5, 5 -> 0.8)."""
    if acceptance_length <= 1.0:
        return 0.0
    return 1.0 - 1.0 / acceptance_length


def agreement(votes: dict[str, list[int]], committed: list[int]) -> dict[str, float]:
    """Per drafter, the share of its votes that equal the committed token at the same depth (depths past
    either list are not scored; a drafter with nothing to score is left out)."""
    out: dict[str, float] = {}
    for name in sorted(votes):
        n = min(len(votes[name]), len(committed))
        if n:
            out[name] = sum(a == b for a, b in zip(votes[name][:n], committed[:n])) / n
    return out


def solo_acceptance(votes: dict[str, list[int]], committed: list[int]) -> dict[str, float]:
    """Per drafter, the acceptance length its own votes would have reached this round: 1 + the number of
    leading depths where its vote is the committed token (exact while the target follows the spine, whose
    prefix every vote was drafted from)."""
    out: dict[str, float] = {}
    for name in sorted(votes):
        hits = 0
        for vote, token in zip(votes[name], committed):
            if vote != token:
                break
            hits += 1
        out[name] = 1.0 + hits
    return out


def mean_confidence(vote_confidence: dict[str, list[float]]) -> dict[str, float]:
    """Per drafter, the mean confidence of its top-1 candidates over the depths it drafted."""
    return {e: sum(c) / len(c) for e, c in sorted(vote_confidence.items()) if c}


def round_feedback(votes: dict[str, list[int]], vote_confidence: dict[str, list[float]], committed: list[int],
                   accepted: int) -> RoundFeedback:
    """A verified round as the router's feedback: ``committed`` = the accepted tokens, then the target's."""
    return RoundFeedback(mean_confidence(vote_confidence), agreement(votes, committed), accepted + 1.0)


@dataclass
class RoutingSettings:
    # Weight of the newest round in each drafter's moving-average score (1 = only the last round counts).
    smoothing: float = 0.5
    # Explore when the request's recent mean acceptance length (accepted + 1) is below this.
    explore_below: float = 2.0
    # How many of the request's latest rounds make up "recent".
    window: int = 4
    # Rounds a drafter gets before its score is trusted: until then exploration tries it first.
    min_tries: int = 2
    # Exploration constant of the upper confidence bound: score + ucb_c * sqrt(ln(rounds + 1) / (tries + 1)).
    ucb_c: float = 0.5
    # Most drafters that draft for one request in one round.
    max_cooperating: int = 3
    # Exploiting, add further drafters whose score is at least (1 - cooperate_within) x the best score.
    cooperate_within: float = 0.15
    # How many rounds of feedback a prior counts for when blended with a drafter's observed score.
    prior_weight: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.window < 1 or self.min_tries < 0 or self.max_cooperating < 1:
            raise ValueError("window and max_cooperating must be >= 1, min_tries >= 0")
        if self.ucb_c < 0 or self.prior_weight < 0 or not 0.0 <= self.cooperate_within <= 1.0:
            raise ValueError("ucb_c and prior_weight must be >= 0, cooperate_within in [0, 1]")


@dataclass
class RoundFeedback:
    """What one verification round says about the drafters that drafted in it."""

    confidence: dict[str, float]  # per drafter that drafted: mean confidence of its own top candidates
    agreement: dict[str, float]  # per drafter, in [0, 1]: similarity of its candidates to the committed tokens
    acceptance_length: float  # accepted draft tokens + 1 (the target's bonus token) this round


@dataclass
class DrafterState:
    score: float = 0.0  # moving average of harmonic(confidence, agreement); meaningless while tries == 0
    tries: int = 0  # rounds this drafter drafted in
    recent: deque = field(default_factory=deque)  # acceptance lengths of its latest rounds


class RequestRouter:
    """Per-request routing state: scores drafters from round feedback and picks who drafts next."""

    def __init__(
        self,
        drafters: list[str],
        settings: RoutingSettings | None = None,
        prior: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings or RoutingSettings()
        self.prior = dict(prior or {})  # expected acceptance length per drafter; higher is better
        self.states: dict[str, DrafterState] = {}
        for name in drafters:
            self._state(name)
        self.recent: deque[float] = deque(maxlen=self.settings.window)
        self.rounds = 0
        self.last_mode = "explore"

    def _state(self, name: str) -> DrafterState:
        if name not in self.states:
            self.states[name] = DrafterState(recent=deque(maxlen=self.settings.window))
        return self.states[name]

    # -- scores ---------------------------------------------------------------------------------------
    def prior_score(self, name: str) -> float | None:
        """The drafter's prior on the score scale (None without one).

        Priors are expected acceptance lengths; scores are agreement-weighted confidences with a scale of
        their own (small drafters are rarely very confident). So a prior only says how a drafter compares
        with the best-prior one, in share of drafted tokens kept (``1 - 1/L``), and that ratio scales the
        request's mean observed score (1 before any feedback): a prior never outweighs what was seen.
        """
        if name not in self.prior:
            return None
        top = max(length_to_score(v) for v in self.prior.values())
        ratio = length_to_score(self.prior[name]) / top if top > 0.0 else 1.0
        seen = [st.score for st in self.states.values() if st.tries]
        return ratio * (sum(seen) / len(seen) if seen else 1.0)

    def score(self, name: str) -> float:
        """The drafter's score: its observed moving average blended with its prior (if it has one),
        the prior counting for ``prior_weight`` rounds."""
        st = self._state(name)
        prior = self.prior_score(name)
        w = self.settings.prior_weight
        if prior is None or w + st.tries == 0:
            return st.score if st.tries else 0.0
        return (w * prior + st.tries * st.score) / (w + st.tries)

    def ucb(self, name: str) -> float:
        st = self._state(name)
        return self.score(name) + self.settings.ucb_c * math.sqrt(math.log(self.rounds + 1) / (st.tries + 1))

    def recent_acceptance(self) -> float | None:
        """Mean acceptance length of the request's latest ``window`` rounds (None before any round)."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def exploring(self) -> bool:
        recent = self.recent_acceptance()
        return recent is None or recent < self.settings.explore_below

    # -- decisions ------------------------------------------------------------------------------------
    def choose(
        self,
        available: list[str],
        max_cooperating: int | None = None,
        pinned: list[str] | None = None,
    ) -> list[str]:
        """The drafters for the next round, best first; how many is the policy's decision.

        ``available`` restricts the choice (live workers, a per-request restriction); ``pinned`` forces
        exactly those drafters (those of them that are available), best first; ``max_cooperating``
        overrides the settings' cap (e.g. the speculation controller asks for fewer when drafts pile up).
        """
        ranked = sorted(dict.fromkeys(available), key=lambda n: (-self.score(n), n))
        if pinned is not None:
            wanted = set(pinned)
            return [n for n in ranked if n in wanted]
        if not ranked:
            return []
        cap = max(1, min(max_cooperating or self.settings.max_cooperating, len(ranked)))
        best, rest = ranked[0], ranked[1:]
        if self.exploring():
            self.last_mode = "explore"
            rest.sort(key=lambda n: (self._state(n).tries >= self.settings.min_tries, -self.ucb(n), n))
            return [best] + rest[: cap - 1]
        self.last_mode = "exploit"
        floor = self.score(best) * (1.0 - self.settings.cooperate_within)
        return [best] + [n for n in rest if self.score(n) >= floor and self.score(n) > 0.0][: cap - 1]

    def trust(self, chosen: list[str], floor: float = 0.05) -> dict[str, float]:
        """Each chosen drafter's score relative to the best one's, in ``[floor, 1]``: fusion scales a
        drafter's confidences by it, so an overconfident drafter the router rates low does not take the
        spine from the one it rates best. Empty for fewer than two drafters."""
        if len(chosen) < 2:
            return {}
        scores = {n: self.score(n) for n in chosen}
        top = max(scores.values())
        return {n: min(1.0, max(floor, s / top)) if top > 0.0 else 1.0 for n, s in scores.items()}

    def observe(self, fb: RoundFeedback) -> None:
        """Fold one round's feedback into the scores of the drafters that drafted in it."""
        alpha = self.settings.smoothing
        for name in sorted(fb.confidence):
            st = self._state(name)
            s = harmonic(fb.confidence[name], fb.agreement.get(name, 0.0))
            st.score = s if st.tries == 0 else (1.0 - alpha) * st.score + alpha * s
            st.tries += 1
            st.recent.append(fb.acceptance_length)
        self.recent.append(fb.acceptance_length)
        self.rounds += 1

    def snapshot(self) -> dict:
        """Scores and counters, for stats and debugging."""
        return {
            "mode": self.last_mode,
            "rounds": self.rounds,
            "recent_acceptance": self.recent_acceptance(),
            "drafters": {
                n: {"score": round(self.score(n), 4), "tries": st.tries, "recent": list(st.recent)}
                for n, st in sorted(self.states.items())
            },
        }


class PriorTable:
    """Which drafters do well on which kind of prompt, learned online across requests.

    Key: a cheap prompt feature (e.g. the name of the drafter with the lowest loss on the prompt's tail).
    Value: per drafter, the running mean acceptance length it reached on requests with that feature.
    """

    def __init__(self, neutral: float = 2.0, bonus: float = 0.25) -> None:
        # Expected acceptance length of a drafter nothing is known about.
        self.neutral = neutral
        # Added to the prior of the drafter the feature names, while that pair has no data of its own.
        self.bonus = bonus
        self.stats: dict[str, dict[str, list[float]]] = {}  # feature -> drafter -> [sum, count]
        self.totals: dict[str, list[float]] = {}  # drafter -> [sum, count] over all features

    def update(self, feature: str, drafter: str, acceptance_length: float) -> None:
        own = self.stats.setdefault(feature, {}).setdefault(drafter, [0.0, 0])
        for cell in (own, self.totals.setdefault(drafter, [0.0, 0])):
            cell[0] += float(acceptance_length)
            cell[1] += 1

    def mean(self, feature: str, drafter: str) -> float | None:
        cell = self.stats.get(feature, {}).get(drafter)
        return cell[0] / cell[1] if cell and cell[1] else None

    def prior(self, feature: str, drafters: list[str]) -> dict[str, float]:
        """Expected acceptance length per drafter for a prompt with ``feature``: the feature's mean, else
        the drafter's mean over all features, else ``neutral``; the named drafter gets ``bonus`` until the
        pair has data."""
        out: dict[str, float] = {}
        for name in drafters:
            own = self.mean(feature, name)
            if own is not None:
                out[name] = own
                continue
            total = self.totals.get(name)
            out[name] = total[0] / total[1] if total and total[1] else self.neutral
            if name == feature:
                out[name] += self.bonus
        return out

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "neutral": self.neutral,
            "bonus": self.bonus,
            "features": {f: {d: [s, int(c)] for d, (s, c) in ds.items()} for f, ds in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> PriorTable:
        if data.get("version") != 1:
            raise ValueError(f"unknown prior table version {data.get('version')!r}")
        table = cls(float(data.get("neutral", 2.0)), float(data.get("bonus", 0.25)))
        for feature, ds in data.get("features", {}).items():
            for drafter, (s, c) in ds.items():
                table.stats.setdefault(str(feature), {})[str(drafter)] = [float(s), int(c)]
                total = table.totals.setdefault(str(drafter), [0.0, 0])
                total[0] += float(s)
                total[1] += int(c)
        return table
