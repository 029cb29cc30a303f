"""Cost models for the cluster simulation: how long a forward pass takes on the simulated hardware, and how
often a drafter's token is the target's.

Only model forwards are simulated (sleeps of these lengths); every Redis hop is a real one. The default
profiles, :data:`A100X4_70B` (a 70B Llama-2-class target, tensor-parallel over 4 × A100-80GB) and
:data:`RTX3090_68M` (a 68M drafter on one RTX 3090), are first-principles estimates from bandwidth and FLOP
rooflines; the field comments give the arithmetic and ``docs/simulation.md`` the reasoning, so another
profile can be written the same way. :class:`AcceptanceModel` turns the zoo's measured mean acceptance
lengths (``zoo/MODEL_CARD.md``) into a per-token acceptance probability per drafter and domain.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field

DOMAINS: tuple[str, ...] = ("code", "prose", "records")

# Mean acceptance length, drafter (rows) x prompt domain (columns), greedy, k = 4; copied from the
# "Acceptance-length matrix" table of zoo/MODEL_CARD.md (built 2026-11-26). tests/test_sim.py checks that
# it still matches the card; AcceptanceModel.from_card() reads the card itself instead.
CARD_K = 4
CARD_MAL: dict[str, dict[str, float]] = {
    "code": {"code": 2.625, "prose": 1.239, "records": 1.258},
    "prose": {"code": 1.681, "prose": 3.171, "records": 1.392},
    "records": {"code": 1.15, "prose": 1.088, "records": 3.795},
}


@dataclass(frozen=True)
class TargetCost:
    """Time of one batched target forward (the default numbers' reasoning: ``docs/simulation.md``)."""

    name: str = "llama-70b-fp16 on 4x A100-80GB (TP=4)"
    overhead_ms: float = 8.0  # all-reduces (160 x ~20 us) + launches + sampling per forward
    weights_ms: float = 21.9  # 35 GB per GPU / 1.6 TB/s effective HBM bandwidth
    token_ms: float = 0.224  # 140 GFLOP per token / (4 x 312 TFLOPS x 50%)
    kv_ms_per_token: float = 5.1e-5  # 320 KiB of KV per context token / (4 x 1.6 TB/s)

    def verify_ms(self, batch: int, tree_tokens: int, max_context: int) -> float:
        """One verification forward: ``batch`` sequences, ``tree_tokens`` tokens in all (each sequence's
        last committed token plus its draft nodes), the longest context ``max_context``."""
        if batch <= 0:
            return 0.0
        return (self.overhead_ms + max(self.weights_ms, tree_tokens * self.token_ms)
                + batch * max_context * self.kv_ms_per_token)

    def prefill_ms(self, prompt_tokens: int) -> float:
        """Prefilling newly admitted prompts (``prompt_tokens`` in all) in one forward."""
        if prompt_tokens <= 0:
            return 0.0
        return self.overhead_ms + max(self.weights_ms, prompt_tokens * self.token_ms)


@dataclass(frozen=True)
class DrafterCost:
    """Time of one batched drafter step (one expert, one draft position)."""

    name: str = "llama-68m-fp16 on 1x RTX 3090"
    step_ms: float = 1.5  # eager decode step: ~1.3 ms launches/Python + ~0.2 ms weight reads
    row_ms: float = 0.02  # per sequence in the batch: LM head (49 MFLOP), softmax/top-k, KV append
    prefill_token_ms: float = 0.004  # 136 MFLOP per token at ~35 TFLOPS effective

    def draft_step_ms(self, batch: int) -> float:
        return 0.0 if batch <= 0 else self.step_ms + batch * self.row_ms

    def prefill_ms(self, tokens: int) -> float:
        """Catching a drafter's KV up on ``tokens`` tokens (new requests) in one forward."""
        return 0.0 if tokens <= 0 else self.step_ms + tokens * self.prefill_token_ms


A100X4_70B = TargetCost()
RTX3090_68M = DrafterCost()


# -- acceptance -------------------------------------------------------------------------------------------
def mal_of_alpha(alpha: float, k: int) -> float:
    """Mean acceptance length of a k-token chain with independent per-token acceptance ``alpha``."""
    return sum(alpha ** i for i in range(k + 1))


def alpha_of_mal(mal: float, k: int = CARD_K, tol: float = 1e-10) -> float:
    """Invert :func:`mal_of_alpha` (monotone in alpha on [0, 1]) by bisection."""
    if not 1.0 <= mal <= k + 1:
        raise ValueError(f"a mean acceptance length with k={k} lies in [1, {k + 1}], got {mal}")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if mal_of_alpha(mid, k) < mal:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def parse_card(path: str | pathlib.Path | None = None) -> tuple[int, dict[str, dict[str, float]]]:
    """The acceptance-length matrix of a zoo model card: (k, {drafter: {domain: MAL}})."""
    if path is None:
        from cosine.zoo import paths

        path = paths.zoo_dir() / "MODEL_CARD.md"
    lines = pathlib.Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Acceptance-length matrix"))
    m = re.search(r"k\s*=\s*(\d+)", lines[start])
    k = int(m.group(1)) if m else CARD_K
    rows = [line for line in lines[start + 1:] if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[0] == "drafter", f"unexpected acceptance table header {header}"
    domains = header[1:]
    table: dict[str, dict[str, float]] = {}
    for line in rows[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        try:
            table[cells[0]] = {d: float(v) for d, v in zip(domains, cells[1:])}
        except ValueError:
            break
    return k, table


@dataclass
class AcceptanceModel:
    """Per-token acceptance probability of each drafter on each domain (greedy, independent positions)."""

    mal: dict[str, dict[str, float]] = field(default_factory=lambda: {d: dict(r) for d, r in CARD_MAL.items()})
    k: int = CARD_K
    unknown_alpha: float = 0.1  # a drafter not in the table (or an unknown domain)
    alphas: dict[str, dict[str, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.alphas = {e: {d: alpha_of_mal(v, self.k) for d, v in row.items()} for e, row in self.mal.items()}

    @classmethod
    def from_card(cls, path: str | pathlib.Path | None = None) -> AcceptanceModel:
        k, table = parse_card(path)
        return cls(table, k)

    @property
    def experts(self) -> list[str]:
        return sorted(self.alphas)

    @property
    def domains(self) -> list[str]:
        return sorted({d for row in self.alphas.values() for d in row})

    def alpha(self, expert: str, domain: str) -> float:
        return self.alphas.get(expert, {}).get(domain, self.unknown_alpha)

    def expected_mal(self, expert: str, domain: str, k: int) -> float:
        return mal_of_alpha(self.alpha(expert, domain), k)


# -- what `cosine profile` would measure on the simulated hardware -------------------------------------------
PROFILE_BATCHES = (1, 2, 4, 8, 16, 32)
PROFILE_CONTEXTS = (32, 128, 512, 2048)
PROFILE_NODES = (0, 2, 4, 8)  # draft nodes per row
PROFILE_DRAFT_BATCHES = (1, 4, 16)
PROFILE_DRAFT_STEPS = (1, 2, 4, 8)


def sim_cost_model(target: TargetCost = A100X4_70B, drafter: DrafterCost = RTX3090_68M):
    """The verifier scheduler's linear :class:`cosine.policy.cost_model.CostModel`, fitted (as ``cosine
    profile`` fits real measurements) to the simulated hardware's times over a grid like the profiler's.
    Without it the scheduler would plan with the built-in CPU-zoo numbers, not the simulated cluster's."""
    from cosine.policy.cost_model import CostModel, now_iso

    verify = [(b, c, b * (1 + n), target.verify_ms(b, b * (1 + n), c))
              for b in PROFILE_BATCHES for c in PROFILE_CONTEXTS for n in PROFILE_NODES]
    draft = [(b, s, s * drafter.draft_step_ms(b)) for b in PROFILE_DRAFT_BATCHES for s in PROFILE_DRAFT_STEPS]
    model = CostModel().fit_verify(verify).fit_draft(draft)
    model.metadata.update({"source": "cosine.sim: fitted to simulated hardware", "target": target.name,
                           "drafter": drafter.name, "created": now_iso()})
    return model
