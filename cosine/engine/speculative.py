"""The single-process engine: target-only decoding and coupled speculative decoding on one runtime.

``SpeculativeEngine.generate`` runs a batch of requests to completion. Each round drafts for every
active sequence (one forward per draft step per drafter model), verifies all drafts in one target
forward, commits the accepted tokens and rolls back the rest. With ``speculative=False`` the same loop
makes plain target steps: that is the target-only autoregressive path.

With ``experts`` the drafting is CoSine's: several drafters draft each sequence in lockstep and their
candidates are fused into one tree (:class:`FusedDrafter`). ``experts`` is either a fixed list of
drafters for every sequence, or ``"route"``: expertise routing picks each sequence's experts every round,
as the verifier service does (:class:`~cosine.policy.steering.Steering`: a router per sequence, started
from a prior this engine learns across requests).
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from cosine.engine.draft_model import PROPOSALS, Drafter, DraftRequest
from cosine.engine.fused_drafter import FusedDraft, FusedDrafter, FusedRequest
from cosine.engine.models import check_drafter, load_model, load_tokenizer
from cosine.engine.prompt_scoring import best_by_prompt_loss
from cosine.engine.prompting import encode_text, eos_ids
from cosine.engine.runner import ModelRunner
from cosine.engine.sequence import Sequence
from cosine.engine.stopping import apply_stop_strings, visible_text
from cosine.engine.target import StepResult, TargetVerifier
from cosine.engine.tree import DraftTree
from cosine.errors import InvalidParameterError
from cosine.policy.speculation import SpecSettings
from cosine.policy.steering import RequestSteer, Steering, Switches
from cosine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

AUTO = "auto"
ROUTE = "route"


@dataclass(frozen=True)
class SpecConfig:
    """How the coupled path speculates: ``k`` draft positions per round, ``tree_width`` candidates per
    position (1 = chain), and the proposal kind (``onehot``: deterministic drafts; ``sampled``: drafts
    sampled from the drafter with their probabilities, chains only)."""

    k: int = 4
    tree_width: int = 1
    proposal: str = "onehot"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise InvalidParameterError("k", f"must be an integer >= 0, got {self.k!r}")
        if isinstance(self.tree_width, bool) or not isinstance(self.tree_width, int) or self.tree_width < 1:
            raise InvalidParameterError("tree_width", f"must be an integer >= 1, got {self.tree_width!r}")
        if self.proposal not in PROPOSALS:
            raise InvalidParameterError("proposal", f"must be one of {PROPOSALS}, got {self.proposal!r}")
        if self.proposal == "sampled" and self.tree_width != 1:
            raise InvalidParameterError("tree_width", "sampled proposals are chains: tree_width must be 1")


@dataclass
class RunTimings:
    draft_s: float = 0.0
    verify_s: float = 0.0
    rounds: int = 0
    extra: dict = field(default_factory=dict)


class SpeculativeEngine:
    def __init__(
        self,
        target: torch.nn.Module,
        drafters: dict[str, torch.nn.Module] | None = None,
        eos_id: int | tuple[int, ...] | None = None,
        config: SpecConfig | None = None,
        tokenizer=None,
    ) -> None:
        self.config = config or SpecConfig()
        self.tokenizer = tokenizer
        if eos_id is None and tokenizer is not None:
            eos_id = tokenizer.eos_token_id
        self.eos_id = eos_id
        self.verifier = TargetVerifier(ModelRunner(target, "target"), eos_id)
        vocab = self.verifier.runner.vocab_size  # drafters' logits fitted to the target's ids
        self.drafters = {name: Drafter(ModelRunner(m, name, vocab_size=vocab), name)
                         for name, m in (drafters or {}).items()}
        self.fused = FusedDrafter(self.drafters)
        # Expertise routing (its prior learned across requests); the loop's k is its own (``config``), so the
        # steering's speculation control keeps its defaults.
        self.steering = Steering(Switches(), self.config.k, spec=SpecSettings())
        self._experts: dict[str, list[str]] = {}  # seq id -> fixed fused experts
        self._routers: dict[str, RequestSteer] = {}  # seq id -> its routing state
        self.timings = RunTimings()

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_paths(
        cls,
        target_path: str | pathlib.Path,
        drafter_paths: dict[str, str | pathlib.Path] | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        config: SpecConfig | None = None,
    ) -> SpeculativeEngine:
        target = load_model(target_path, device, dtype)
        tokenizer = load_tokenizer(target_path)
        drafters = {}
        for name, path in (drafter_paths or {}).items():
            drafters[name] = load_model(path, device, dtype)
            check_drafter(str(target_path), target, tokenizer, str(path), drafters[name],
                          load_tokenizer(path, required=False))
        return cls(target, drafters, eos_ids(target, tokenizer), config, tokenizer)

    @classmethod
    def from_zoo(
        cls,
        zoo: str | pathlib.Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        config: SpecConfig | None = None,
        drafters: list[str] | None = None,
    ) -> SpeculativeEngine:
        from cosine.zoo import paths

        root = paths.zoo_dir(zoo)
        names = drafters if drafters is not None else paths.drafter_domains(root)
        return cls.from_paths(
            paths.target_dir(root), {n: paths.drafter_dir(n, root) for n in names}, device, dtype, config
        )

    # -- drafter choice -------------------------------------------------------------------------------
    def choose_drafters(self, prompt_ids: list[list[int]]) -> list[str]:
        """The drafter with the lowest loss on each prompt's tail (a cheap prior for its domain)."""
        return best_by_prompt_loss({n: d.runner.model for n, d in self.drafters.items()}, prompt_ids)

    # -- generation -----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[list[int] | str],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        drafter: str | Seq[str | None] | None = AUTO,
        speculative: bool = True,
        experts: Seq[str] | str | None = None,
    ) -> list[Sequence]:
        """Run every prompt to completion in one batch; returns the finished sequences in order.

        ``experts`` (overrides ``drafter``): a list of drafters that draft every sequence together, fused;
        or ``"route"``: per-sequence expertise routing picks them every round.
        """
        prompt_ids = [self._encode(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise InvalidParameterError("params", "one SamplingParams per prompt, or a single one for all")
        seqs = [Sequence(ids, p) for ids, p in zip(prompt_ids, params)]
        for seq in seqs:
            self.verifier.validate(seq)
        if speculative and self.config.k > 0 and self.drafters and experts is not None:
            self._assign_experts(seqs, experts)
        elif speculative and self.config.k > 0 and self.drafters:
            names = self._assign(prompt_ids, drafter)
            for seq, name in zip(seqs, names):
                seq.drafter = name
        self.verifier.admit(seqs)
        active = list(seqs)
        try:
            while active:
                self.run_round(active)
                done = [s for s in active if s.finished]
                if done:
                    self.release([s.seq_id for s in done])
                active = [s for s in active if not s.finished]
        finally:
            if active:
                self.release([s.seq_id for s in active])
        return seqs

    def _assign(self, prompt_ids: list[list[int]], drafter) -> list[str | None]:
        if drafter is None or isinstance(drafter, str):
            if drafter == AUTO:
                return list(self.choose_drafters(prompt_ids))
            if drafter is not None and drafter not in self.drafters:
                raise InvalidParameterError("drafter", f"unknown drafter {drafter!r}; have {sorted(self.drafters)}")
            return [drafter] * len(prompt_ids)
        names = list(drafter)
        auto = [i for i, n in enumerate(names) if n == AUTO]
        if auto:
            chosen = self.choose_drafters([prompt_ids[i] for i in auto])
            for i, n in zip(auto, chosen):
                names[i] = n
        for n in names:
            if n is not None and n not in self.drafters:
                raise InvalidParameterError("drafter", f"unknown drafter {n!r}; have {sorted(self.drafters)}")
        return names

    def _assign_experts(self, seqs: list[Sequence], experts: Seq[str] | str) -> None:
        names = list(self.drafters)
        if isinstance(experts, str) and experts == ROUTE:
            features = self.choose_drafters([s.prompt_ids for s in seqs])
            for seq, feature in zip(seqs, features):
                steer = self._routers[seq.seq_id] = self.steering.new()
                self.steering.learn_feature(steer, feature, names)
                seq.drafter = feature
            return
        chosen = [experts] if isinstance(experts, str) else list(experts)
        unknown = [n for n in chosen if n not in self.drafters]
        if not chosen or unknown:
            raise InvalidParameterError("experts", f"unknown or none {unknown}; have {sorted(names)} or {ROUTE!r}")
        for seq in seqs:
            self._experts[seq.seq_id] = chosen
            seq.drafter = chosen[0]

    def _round_experts(self, seq: Sequence) -> tuple[list[str] | None, dict[str, float] | None]:
        """The fused experts of ``seq`` this round (best first) and their trust, or None when it drafts alone."""
        steer = self._routers.get(seq.seq_id)
        if steer is None:
            return self._experts.get(seq.seq_id), None
        chosen, weights = self.steering.experts_for(steer, list(self.drafters), None, [])
        return chosen, dict(zip(chosen, weights)) or None

    def _feedback(self, res: StepResult, draft: FusedDraft) -> None:
        """Tell a routed sequence's router (and the prior table) how its experts did this round."""
        self.steering.observe(self._routers[res.seq.seq_id], res.depth, res.accepted, res.new_tokens, draft.votes,
                              draft.vote_confidence)

    def run_round(self, active: list[Sequence]) -> None:
        """Draft for ``active`` (grouped by drafter), verify everything in one target forward, commit."""
        cfg = self.config
        drafts: dict[str, DraftTree | None] = {s.seq_id: None for s in active}
        t0 = time.perf_counter()
        groups: dict[str, list[DraftRequest]] = {}
        fused_requests: list[FusedRequest] = []
        for seq in active:
            k = min(cfg.k, self.verifier.room(seq))
            if seq.drafter is None or k <= 0:
                continue
            experts, weights = self._round_experts(seq)
            sampled = cfg.proposal == "sampled" and not seq.params.greedy
            if experts and not sampled:
                fused_requests.append(FusedRequest(seq.seq_id, seq.tokens, k, experts, cfg.tree_width, weights=weights))
                continue
            groups.setdefault(experts[0] if experts else seq.drafter, []).append(
                DraftRequest(
                    seq.seq_id,
                    seq.tokens,
                    k,
                    cfg.tree_width,
                    seq.params,
                    seq.seed,
                    len(seq.output_ids),
                    cfg.proposal if not seq.params.greedy else "onehot",
                )
            )
        for name, reqs in groups.items():
            drafts.update(self.drafters[name].draft(reqs))
        fused = self.fused.draft(fused_requests)
        drafts.update({sid: f.tree for sid, f in fused.items()})
        t1 = time.perf_counter()
        results = self.verifier.step(drafts)
        for res in results:
            apply_stop_strings(res.seq, self.tokenizer, len(res.new_tokens))
        t2 = time.perf_counter()
        for res in results:
            if res.seq.seq_id in self._routers and res.seq.seq_id in fused:
                self._feedback(res, fused[res.seq.seq_id])
        self.timings.draft_s += t1 - t0 + (time.perf_counter() - t2)
        self.timings.verify_s += t2 - t1
        self.timings.rounds += 1

    def release(self, seq_ids: list[str]) -> None:
        """Free every trace of these sequences (target and drafter rows)."""
        self.verifier.release(seq_ids)
        for d in self.drafters.values():
            d.release(seq_ids)
        for sid in seq_ids:
            self._experts.pop(sid, None)
            self._routers.pop(sid, None)

    # -- text helpers ---------------------------------------------------------------------------------
    def _encode(self, prompt: list[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "text prompts need a tokenizer; pass token ids")
            if not prompt:
                raise InvalidParameterError("prompt", "must not be empty")
            return encode_text(self.tokenizer, prompt)
        return list(prompt)

    def text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            raise InvalidParameterError("tokenizer", "this engine has no tokenizer")
        return visible_text(seq, self.tokenizer)
