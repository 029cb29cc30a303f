"""Cluster-scale simulation: the real workers, Redis and policies; model forward passes replaced by cost models.

* :mod:`cosine.sim.costs` — documented hardware profiles (a 70B target on 4 A100s, 68M drafters on
  consumer GPUs) and the acceptance model derived from the zoo's measured acceptance lengths;
* :mod:`cosine.sim.engines` — :class:`SimTarget` and :class:`SimFusedDrafter` (the engines' interfaces,
  deterministic and lossless), :class:`SimWorkload` (prompts for a domain mix), :class:`SimTokenizer`;
* :mod:`cosine.sim.cluster` — :class:`SimCluster` (real verifier, drafter and controller services as
  threads of one process) and :func:`run_workload` (requests through the real client, measured and checked).
"""

from cosine.sim.costs import (
    A100X4_70B,
    DOMAINS,
    RTX3090_68M,
    AcceptanceModel,
    DrafterCost,
    TargetCost,
    alpha_of_mal,
    mal_of_alpha,
    parse_card,
    sim_cost_model,
)
from cosine.sim.engines import (
    SimFusedDrafter,
    SimModel,
    SimPrompt,
    SimTarget,
    SimTokenizer,
    SimWorkload,
    domain_of,
    sim_features,
)

__all__ = [
    "A100X4_70B", "DOMAINS", "RTX3090_68M", "AcceptanceModel", "DrafterCost", "TargetCost", "alpha_of_mal",
    "mal_of_alpha", "parse_card", "sim_cost_model", "SimFusedDrafter", "SimModel", "SimPrompt", "SimTarget",
    "SimTokenizer", "SimWorkload", "domain_of", "sim_features", "SimCluster", "run_workload",
]


def __getattr__(name: str):
    # The cluster pulls in the services (Redis, torch): import it only when asked for.
    if name in ("SimCluster", "run_workload"):
        from cosine.sim import cluster

        return getattr(cluster, name)
    raise AttributeError(name)
