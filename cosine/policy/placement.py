"""Drafter placement: which drafter worker drafts a request, and, with fusion across workers, which worker
leads its lockstep and which ones it asks for the other experts' candidates.

A request keeps its drafter worker while that worker lives (its KV rows are there); a request without one, or
whose worker died, goes to the least loaded live worker hosting a drafter model it may use. Pure: the caller
passes in the live workers and what each hosts (from their heartbeats) and how many requests each drafts;
the decisions come back as values, the caller logs and counts them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


def least_loaded(workers: list[str], load: Counter) -> str:
    """The worker with the fewest requests in ``load`` (ties: by name, so the choice is deterministic)."""
    return min(workers, key=lambda w: (load[w], w))


@dataclass
class Placement:
    hosted: dict[str, list[str]]  # live drafter worker -> the drafter models it hosts
    cross_fusion: bool = False  # a request's experts may live on several workers

    @classmethod
    def from_heartbeats(cls, drafters: dict[str, dict], cross_fusion: bool = False) -> Placement:
        """From live drafter workers' heartbeat info (``experts``: comma-separated model names)."""
        return cls({w: [e for e in str(info.get("experts", "")).split(",") if e] for w, info in drafters.items()},
                   cross_fusion)

    def alive(self, worker: str | None) -> bool:
        return worker is not None and worker in self.hosted

    def pool(self, worker: str | None) -> list[str]:
        """The drafter models a request drafted by ``worker`` can use: the worker's own, or with fusion across
        workers every live worker's (its own first)."""
        own = self.hosted.get(worker or "", [])
        if not self.cross_fusion:
            return list(own)
        return list(own) + sorted({e for models in self.hosted.values() for e in models} - set(own))

    def drafter_for(self, current: str | None, wanted: list[str], load: Counter) -> str | None:
        """The request's drafter worker: ``current`` while it lives, else the least loaded one hosting one of
        ``wanted`` (any model when empty); None when no live worker fits."""
        if self.alive(current):
            return current
        fits = [w for w, models in self.hosted.items() if not wanted or set(wanted) & set(models)]
        return least_loaded(fits, load) if fits else None

    def lead_for(self, current: str | None, experts: list[str], load: Counter) -> str | None:
        """Fusion across workers: the request's worker leads while it hosts one of the chosen ``experts``;
        otherwise the lead moves to the least loaded worker hosting the best one."""
        if current is None or set(experts) & set(self.hosted.get(current, [])):
            return current
        fits = [w for w, models in self.hosted.items() if experts[0] in models]
        return least_loaded(fits, load) if fits else current

    def peers_for(self, lead: str | None, experts: list[str], weights: list[float], sticky: dict[str, str],
                  load: Counter) -> tuple[list[str], list[float], dict[str, str]]:
        """The worker to ask for each chosen expert the lead does not host (``sticky``, the request's earlier
        choice, while it still hosts it; else the least loaded that does); experts no live worker hosts are
        left out. Returns the experts kept, their weights and the peers."""
        own = set(self.hosted.get(lead or "", []))
        peers: dict[str, str] = {}
        for e in experts:
            if e in own:
                continue
            if e in self.hosted.get(sticky.get(e, ""), []):
                peers[e] = sticky[e]
                continue
            fits = [w for w, models in self.hosted.items() if w != lead and e in models]
            if fits:
                peers[e] = least_loaded(fits, load)
        keep = [i for i, e in enumerate(experts) if e in own or e in peers]
        return [experts[i] for i in keep], [weights[i] for i in keep] if weights else [], peers
