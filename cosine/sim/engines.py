"""Simulated engines: a target and fused expert drafters whose forward passes are cost models.

The simulated target's next token is a keyed hash of the whole context (:class:`SimModel`), so a request's
true continuation is fixed by its prompt and speculative decoding must reproduce it exactly.
:class:`SimTarget` has :class:`cosine.engine.target.TargetVerifier`'s interface and
:class:`SimFusedDrafter` :class:`cosine.engine.fused_drafter.FusedDrafter`'s: each expert proposes the true
token with probability α(expert, domain) (:class:`AcceptanceModel`), the real
:func:`cosine.policy.fusion.fuse_position` fuses the candidates, and a diverged prefix stays wrong. Every
random choice is a keyed hash of (context, expert), so runs are reproducible whatever the timing; sampling
parameters are ignored (greedy). More: ``docs/simulation.md``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cosine.engine.fused_drafter import FusedDraft, FusedRequest
from cosine.engine.sequence import Sequence
from cosine.engine.target import StepResult, TargetVerifier
from cosine.engine.tree import DraftTree
from cosine.policy.fusion import fuse_position
from cosine.sim.costs import A100X4_70B, DOMAINS, RTX3090_68M, AcceptanceModel, DrafterCost, TargetCost

log = logging.getLogger(__name__)

VOCAB_SIZE = 32_000  # a Llama-sized vocabulary
RESERVED = 16  # ids below this never appear in generated text: 0 unused, 1.. domain markers
DOMAIN_MARKERS: dict[str, int] = {d: 1 + i for i, d in enumerate(DOMAINS)}
_MARKER_DOMAINS = {v: k for k, v in DOMAIN_MARKERS.items()}
_U64 = float(1 << 64)
PREFILL_AFTER = 16  # a drafter more than this many tokens behind a request catches up with a prefill


def domain_of(tokens: list[int]) -> str:
    """A request's domain, read from its prompt's first token (see :class:`SimWorkload`)."""
    return _MARKER_DOMAINS.get(tokens[0], DOMAINS[0]) if tokens else DOMAINS[0]


def _sleep_until(t0: float, ms: float, time_scale: float) -> None:
    """Sleep until ``ms`` simulated milliseconds (scaled by ``time_scale``) have passed since ``t0``."""
    left = t0 + ms * time_scale / 1000 - time.perf_counter()
    if ms > 0 and time_scale > 0 and left > 0:
        time.sleep(left)


# -- the "model" ----------------------------------------------------------------------------------------
class SimModel:
    """The simulated target's next-token function: a keyed hash of the whole context."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> None:
        if vocab_size <= RESERVED + 2:
            raise ValueError(f"vocab_size must exceed {RESERVED + 2}")
        self.vocab_size = vocab_size
        self.seed = seed
        self._key = seed.to_bytes(8, "little", signed=True)

    def digest(self, context: list[int]) -> bytes:
        return hashlib.blake2b(array("q", context).tobytes(), digest_size=16, key=self._key).digest()

    def token_from(self, digest: bytes) -> int:
        return RESERVED + int.from_bytes(digest[:8], "little") % (self.vocab_size - RESERVED)

    def next_token(self, context: list[int]) -> int:
        return self.token_from(self.digest(context))

    def continuation(self, prompt: list[int], n: int) -> list[int]:
        """What target-only greedy decoding produces: ``n`` tokens after ``prompt``."""
        ctx = list(prompt)
        for _ in range(n):
            ctx.append(self.next_token(ctx))
        return ctx[len(prompt):]


@dataclass
class SimRunner:
    """The parts of :class:`cosine.engine.runner.ModelRunner` the verifier service reads."""

    vocab_size: int = VOCAB_SIZE
    max_positions: int = 4096
    slots_run: int = 0  # token slots computed

    @property
    def slots_fed(self) -> int:
        """The simulated target packs what it is fed: every slot it computes holds a fed token."""
        return self.slots_run


# -- target ---------------------------------------------------------------------------------------------
class SimTarget(TargetVerifier):
    """:class:`cosine.engine.target.TargetVerifier` over :class:`SimModel` and a cost model: the same
    bookkeeping (sequences, room, validation), simulated forwards."""

    def __init__(self, model: SimModel | None = None, cost: TargetCost = A100X4_70B, time_scale: float = 1.0,
                 max_positions: int = 4096, eos_id: int | None = None) -> None:
        self.model = model or SimModel()
        super().__init__(SimRunner(self.model.vocab_size, max_positions), eos_id)  # type: ignore[arg-type]
        self.cost = cost
        self.time_scale = time_scale
        self.forwards = 0
        self.simulated_ms = 0.0  # model time slept (before time_scale)

    def admit(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        for seq in seqs:
            self.validate(seq)
        for seq in seqs:
            self.seqs[seq.seq_id] = seq
        self._spend(t0, self.cost.prefill_ms(sum(len(s) - 1 for s in seqs)))

    def release(self, seq_ids: list[str]) -> None:
        for sid in seq_ids:
            self.seqs.pop(sid, None)

    def _spend(self, t0: float, ms: float) -> None:
        self.simulated_ms += ms
        _sleep_until(t0, ms, self.time_scale)

    def step(self, drafts: dict[str, DraftTree | None]) -> list[StepResult]:
        """One batched "forward": greedy tree acceptance against the true continuation of each sequence."""
        t0 = time.perf_counter()
        results: list[StepResult] = []
        tokens = 0
        longest = 0
        for sid in [s for s in self.seqs if s in drafts]:
            seq = self.seqs[sid]
            tree = drafts[sid] or DraftTree()
            if tree.depth > self.room(seq):
                tree = tree.truncated(self.room(seq))
            tokens += 1 + len(tree)
            longest = max(longest, len(seq) + tree.depth)
            ctx = seq.tokens
            node, path = -1, []
            while True:
                y = self.model.next_token(ctx)
                nxt = next((c for c in tree.children(node) if tree.tokens[c] == y), None)
                if nxt is None:
                    break
                path.append(nxt)
                ctx.append(y)
                node = nxt
            new = [tree.tokens[i] for i in path] + [y]
            seq.stats.record(tree.depth, len(tree), len(path), [tree.sources[i] for i in path])
            added = seq.append(new, self.eos_id, self.max_len)
            results.append(StepResult(seq, new[:added], len(path), tree.depth))
        self.forwards += 1
        self.runner.slots_run += tokens
        self._spend(t0, self.cost.verify_ms(len(results), tokens, longest))
        return results


# -- drafters -------------------------------------------------------------------------------------------
class SimFusedDrafter:
    """:class:`cosine.engine.fused_drafter.FusedDrafter`'s interface over an acceptance model and a cost model.

    ``right_conf`` / ``wrong_conf``: the ranges a proposal's confidence is drawn from when it is the true
    token / a wrong one (overlapping, so fusion sometimes trusts the wrong expert, as with real models).
    ``second_choice``: with ``width > 1``, the chance that an expert whose first choice is wrong has the true
    token as its second candidate (an assumption; the zoo measured chains only).
    """

    def __init__(self, experts: Iterable[str], acceptance: AcceptanceModel | None = None,
                 cost: DrafterCost = RTX3090_68M, domain_of: Callable[[list[int]], str] = domain_of,
                 model: SimModel | None = None, time_scale: float = 1.0, seed: int = 1,
                 right_conf: tuple[float, float] = (0.5, 1.0), wrong_conf: tuple[float, float] = (0.0, 0.7),
                 second_choice: float = 0.3, feature_accuracy: float = 0.9) -> None:
        self.drafters: dict[str, str] = {e: e for e in experts}  # the service reads the keys (expert names)
        if not self.drafters:
            raise ValueError("a simulated drafter worker needs at least one expert")
        self.acceptance = acceptance or AcceptanceModel()
        self.cost = cost
        self.domain_of = domain_of
        self.model = model or SimModel()
        self.time_scale = time_scale
        self._key = seed.to_bytes(8, "little", signed=True)
        self.right_conf = right_conf
        self.wrong_conf = wrong_conf
        self.second_choice = second_choice
        self.feature_accuracy = feature_accuracy
        self.known: dict[str, dict[str, int]] = {}  # seq_id -> expert -> tokens its (simulated) KV holds
        self.steps = 0
        self.simulated_ms = 0.0

    # -- the interface --------------------------------------------------------------------------------
    def release(self, seq_ids: list[str]) -> None:
        for sid in seq_ids:
            self.known.pop(sid, None)

    def features(self, prompts: list[list[int]]) -> list[str]:
        """The prompt feature (the expert whose loss on the prompt would be lowest): the prompt's domain
        with probability ``feature_accuracy`` when a hosted expert matches it, else another hosted expert."""
        return [sim_features([p], list(self.drafters), self.feature_accuracy, self._key)[0] for p in prompts]

    def draft(self, requests: list[FusedRequest], stop: Callable[[], bool] | None = None) -> dict[str, FusedDraft]:
        """As :meth:`cosine.engine.fused_drafter.FusedDrafter.draft`: ``stop``, asked before every expert's
        forward after the first depth (in simulated time), ends the trees at the last depth completed."""
        t0 = time.perf_counter()
        requests = [r for r in requests if r.k > 0]
        for r in requests:
            unknown = [e for e in r.experts if e not in self.drafters]
            if not r.experts or unknown:
                raise ValueError(f"{r.seq_id}: unknown or missing experts {r.experts}; have {sorted(self.drafters)}")
            if r.width < 1:
                raise ValueError(f"{r.seq_id}: width must be >= 1, got {r.width}")
        out: dict[str, FusedDraft] = {}
        rows: dict[str, list[int]] = {e: [] for e in self.drafters}  # per expert: each request's k
        prefill: dict[str, int] = {e: 0 for e in self.drafters}  # per expert: tokens to catch up on
        for r in requests:
            known = self.known.setdefault(r.seq_id, {})
            for e in r.experts:
                rows[e].append(r.k)
                # New to this expert (or far behind, e.g. after an eviction): its KV is built in one prefill.
                # Otherwise the few tokens committed since its last round ride along with the first step.
                if e not in known or len(r.tokens) - known[e] > PREFILL_AFTER:
                    prefill[e] += len(r.tokens)
                known[e] = len(r.tokens)
            out[r.seq_id] = self._draft_one(r)
        ms = sum(self.cost.prefill_ms(n) for n in prefill.values())
        depth = max((r.k for r in requests), default=0)
        for d in range(depth):  # one batched forward per expert per position, over the rows still drafting
            stopped = False
            for ks in rows.values():
                drafting = sum(1 for k in ks if k > d)
                if not drafting:
                    continue
                if d > 0 and stop is not None:
                    _sleep_until(t0, ms, self.time_scale)
                    stopped = stop()
                    if stopped:  # the depth some experts did not draft is dropped
                        break
                ms += self.cost.draft_step_ms(drafting)
            if stopped:
                out = {sid: fd.truncated(d) for sid, fd in out.items()}
                depth = d
                break
        self.steps += depth
        self.simulated_ms += ms
        _sleep_until(t0, ms, self.time_scale)
        return out

    # -- one request ----------------------------------------------------------------------------------
    def _draft_one(self, r: FusedRequest) -> FusedDraft:
        domain = self.domain_of(r.tokens)
        ctx = list(r.tokens)
        draft = FusedDraft(DraftTree(), {e: [] for e in r.experts}, {e: [] for e in r.experts})
        cap = r.max_alternatives if r.max_alternatives is not None else len(r.experts) * r.width - 1
        parent = -1
        for _ in range(r.k):
            digest = self.model.digest(ctx)
            truth = self.model.token_from(digest)
            cands = {e: self._candidates(digest, truth, e, domain, r.width) for e in r.experts}
            fused = fuse_position(cands, cap)
            for e, c in cands.items():
                draft.votes[e].append(c[0][0])
                draft.vote_confidence[e].append(c[0][1])
            spine = draft.tree.add(fused.spine_token, parent, fused.spine_confidence, fused.spine_source)
            for tok, conf, src in fused.alternatives:
                draft.tree.add(tok, parent, conf, src)
            parent = spine
            ctx.append(fused.spine_token)
        return draft

    def _candidates(self, digest: bytes, truth: int, expert: str, domain: str, width: int) -> list[tuple[int, float]]:
        """Expert ``expert``'s top-``width`` (token, confidence) after the context hashed to ``digest``."""
        h = hashlib.blake2b(digest + expert.encode(), digest_size=32, key=self._key).digest()
        u = [int.from_bytes(h[i:i + 8], "little") / _U64 for i in range(0, 32, 8)]
        right = u[0] < self.acceptance.alpha(expert, domain)
        lo, hi = self.right_conf if right else self.wrong_conf
        conf = lo + (hi - lo) * u[1]
        first = truth if right else self._wrong(truth, h, 0)
        out = [(first, conf)]
        if width > 1:
            rng = random.Random(h)
            truth_second = not right and u[2] < self.second_choice
            taken = {first}
            for rank in range(1, width):
                c = conf * (0.3 + 0.6 * rng.random()) / rank
                if rank == 1 and truth_second:
                    tok = truth
                else:
                    tok = self._wrong(truth, h, rank)
                    while tok in taken or tok == truth:
                        tok = RESERVED + (tok - RESERVED + 1) % (self.model.vocab_size - RESERVED)
                taken.add(tok)
                out.append((tok, c))
        return out

    def _wrong(self, truth: int, h: bytes, salt: int) -> int:
        """A token other than ``truth``, drawn from the hash."""
        n = self.model.vocab_size - RESERVED - 1
        x = int.from_bytes(hashlib.blake2b(h + bytes([salt]), digest_size=8).digest(), "little") % n
        tok = RESERVED + x
        return tok + 1 if tok >= truth else tok


def sim_features(prompts: list[list[int]], experts: list[str] | tuple[str, ...] = DOMAINS,
                 accuracy: float = 0.9, key: bytes = b"features") -> list[str]:
    """Per prompt, the expert a prompt-loss prior would pick: its domain's expert with probability
    ``accuracy`` (when one is among ``experts``), else another of ``experts`` (deterministic per prompt)."""
    experts = sorted(experts)
    out = []
    for p in prompts:
        h = hashlib.blake2b(array("q", p).tobytes(), digest_size=16, key=key[:64]).digest()
        u = int.from_bytes(h[:8], "little") / _U64
        pick = int.from_bytes(h[8:], "little")
        domain = domain_of(p)
        if domain in experts and (u < accuracy or len(experts) == 1):
            out.append(domain)
        else:
            others = [e for e in experts if e != domain] or experts
            out.append(others[pick % len(others)])
    return out


# -- workload and tokenizer ---------------------------------------------------------------------------------
@dataclass
class SimPrompt:
    domain: str
    ids: list[int]


@dataclass
class SimWorkload:
    """Prompts (token ids) for a domain mix; a prompt's first token marks its domain (:func:`domain_of`)."""

    mix: dict[str, float] = field(default_factory=lambda: {d: 1.0 for d in DOMAINS})
    prompt_len: tuple[int, int] = (32, 128)  # inclusive range of prompt lengths
    vocab_size: int = VOCAB_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [d for d in self.mix if d not in DOMAIN_MARKERS]
        if unknown:
            raise ValueError(f"unknown domains {unknown}; the simulation knows {list(DOMAIN_MARKERS)}")
        if not self.mix or sum(self.mix.values()) <= 0:
            raise ValueError("the domain mix needs a positive weight")

    def prompts(self, n: int) -> list[SimPrompt]:
        rng = random.Random(self.seed)
        domains = sorted(d for d, w in self.mix.items() if w > 0)
        weights = [self.mix[d] for d in domains]
        out = []
        for _ in range(n):
            d = rng.choices(domains, weights)[0]
            length = rng.randint(*self.prompt_len)
            ids = [DOMAIN_MARKERS[d]] + [rng.randrange(RESERVED, self.vocab_size) for _ in range(length - 1)]
            out.append(SimPrompt(d, ids))
        return out


class SimTokenizer:
    """A file-free tokenizer for the simulation: token ``i`` is the word ``t{i}`` (domain markers ``<code>``…)."""

    eos_token_id = None

    def __init__(self, vocab_size: int = VOCAB_SIZE) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def _word(self, i: int) -> str:
        return f"<{_MARKER_DOMAINS[i]}>" if i in _MARKER_DOMAINS else f"t{i}"

    def __call__(self, text: str, add_special_tokens: bool = False, **_kw) -> dict:
        ids = []
        markers = {f"<{d}>": m for d, m in DOMAIN_MARKERS.items()}
        for w in text.split():
            if w in markers:
                ids.append(markers[w])
            elif w.startswith("t") and w[1:].isdigit() and RESERVED <= int(w[1:]) < self.vocab_size:
                ids.append(int(w[1:]))
            else:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                ids.append(RESERVED + h % (self.vocab_size - RESERVED))
        return {"input_ids": ids}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self(text)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False, **_kw) -> str:
        return "".join(" " + self._word(int(i)) for i in ids)
