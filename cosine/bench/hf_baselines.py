"""What a user would run instead of CoSine: Hugging Face ``generate`` on the target model, in this process.

* ``hf-generate`` — batch 1, one request after another: what a user with one request at a time gets;
* ``hf-batched``  — static batches of ``c`` prompts at concurrency ``c``, left-padded with the tokenizer's
                    pad token, the attention mask passed;
* ``hf-assisted`` — assisted generation, batch 1, ``assistant_model=`` the prompt's own domain drafter: the
                    drafter with the lowest loss on the prompt, as ``SpeculativeEngine.choose_drafters``
                    picks it.

Models are loaded as a user would (``AutoModelForCausalLM.from_pretrained``, eval, SDPA, float32), apart
from the engine's. Greedy, the same prompts and ``max_new_tokens`` as CoSine's paths. End-of-text is
ignored as CoSine's ``ignore_eos`` ignores it: generation does not stop at it but may still emit it. HF
gets an ``eos_token_id`` outside the vocabulary, which no step can produce (``min_new_tokens`` would
instead forbid end-of-text and change the output wherever it is the greedy choice).

:meth:`HFBaselines.compare` checks any path's greedy outputs against the target alone's, token for token,
and names each divergence whose two candidates the target scores within ``NEAR_TIE_LOGIT_GAP`` of each
other: there, the summation order of another batch shape or thread count may pick either.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from cosine.bench.timing import RequestTiming, summarize
from cosine.engine.models import load_model, load_tokenizer
from cosine.engine.prompt_scoring import best_by_prompt_loss
from cosine.engine.sequence import SpecStats
from cosine.zoo import paths

HF_PATHS = ("hf-generate", "hf-batched", "hf-assisted")
NEAR_TIE_LOGIT_GAP = 1e-3  # target logits this close at a divergence: a near-tie, not a bug


class _FirstToken(StoppingCriteria):
    """Never stops; records when the first new token was chosen (HF checks its stopping criteria then)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFBaselines:
    """The zoo's target and drafters as plain Hugging Face models, and the three ways a user would decode."""

    def __init__(self, zoo=None, dtype: str = "float32") -> None:
        root = paths.zoo_dir(zoo)
        self.target = load_model(paths.target_dir(root), "cpu", dtype)
        self.drafters = {n: load_model(paths.drafter_dir(n, root), "cpu", dtype) for n in paths.drafter_domains(root)}
        self.tokenizer = load_tokenizer(paths.target_dir(root))
        self.tokenizer.padding_side = "left"
        self.never = int(self.target.config.vocab_size)  # an end-of-text id no step can produce
        self._drafter_of: dict[str, str] = {}

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def drafter_for(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt's own domain drafter (lowest loss on the prompt), computed once per prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._drafter_of]
        if new:
            self._drafter_of.update(zip(new, best_by_prompt_loss(self.drafters, [self.encode(p) for p in new])))
        return [self._drafter_of[p] for p in prompts]

    @torch.inference_mode()
    def _generate(self, batch: list[str], max_new_tokens: int, drafter: str | None) -> tuple[list[list[int]], float]:
        """One ``generate`` call; returns each prompt's new tokens and when the first was chosen."""
        if len(batch) == 1:
            enc = {"input_ids": torch.tensor([self.encode(batch[0])])}
        else:
            enc = dict(self.tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt"))
        first = _FirstToken()
        extra = {"assistant_model": self.drafters[drafter]} if drafter else {}
        out = self.target.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.never,
                                   pad_token_id=self.tokenizer.pad_token_id,
                                   stopping_criteria=StoppingCriteriaList([first]), **extra)
        start = enc["input_ids"].shape[1]
        return [row[start:].tolist() for row in out], first.at or time.perf_counter()

    def run(self, path: str, prompts: list[str], concurrency: int, max_new_tokens: int,
            outputs: dict[int, list[int]] | None = None) -> dict:
        """A closed loop of ``path`` over ``prompts`` (``hf-batched``: batches of ``concurrency``; the others one
        prompt at a time); returns the row :func:`summarize` makes, and fills ``outputs`` by prompt index."""
        size = concurrency if path == "hf-batched" else 1
        helpers = self.drafter_for(prompts) if path == "hf-assisted" else [None] * len(prompts)
        timings: list[RequestTiming] = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), size):
            begin = time.perf_counter()
            outs, first = self._generate(prompts[i : i + size], max_new_tokens, helpers[i])
            end = time.perf_counter()
            for j, out in enumerate(outs):
                timings.append(RequestTiming(begin, first, end, len(out)))
                if outputs is not None:
                    outputs[i + j] = out
        return summarize(timings, time.perf_counter() - t0, SpecStats())

    def warm_up(self, prompts: list[str]) -> None:
        """Each path once on two prompts, so no allocator or kernel start-up lands in a timed run."""
        for path in HF_PATHS:
            self.run(path, prompts[:2], 2, 8)

    @torch.inference_mode()
    def _gap(self, prompt: str, prefix: list[int], a: int, b: int) -> float:
        """How far apart the target (batch 1) scores tokens ``a`` and ``b`` after ``prompt`` + ``prefix``."""
        logits = self.target(torch.tensor([self.encode(prompt) + prefix])).logits[0, -1]
        return abs(float(logits[a] - logits[b]))

    def compare(self, outputs: dict[int, list[int]], reference: dict[int, list[int]], prompts: list[str]) -> dict:
        """``outputs`` against the ``reference`` (the target alone's) on the prompts both have: how many are
        identical, and each divergence (prompt, position, the target's logit gap there) as a near-tie or not."""
        common = sorted(set(outputs) & set(reference))
        near, other = [], []
        for i in common:
            mine, ref = outputs[i], reference[i]
            if mine == ref:
                continue
            pos = next((p for p, (x, y) in enumerate(zip(mine, ref)) if x != y), min(len(mine), len(ref)))
            if pos >= min(len(mine), len(ref)):  # one is a prefix of the other: lengths differ, not tokens
                other.append({"prompt": i, "position": pos, "logit_gap": None})
                continue
            gap = self._gap(prompts[i], ref[:pos], ref[pos], mine[pos])
            (near if gap <= NEAR_TIE_LOGIT_GAP else other).append({"prompt": i, "position": pos,
                                                                   "logit_gap": round(gap, 6)})
        return {"compared": len(common), "identical": len(common) - len(near) - len(other),
                "near_ties": near, "mismatches": other}


def match_cell(match: dict | None) -> str:
    """``"11/12 (1 near-tie)"``; ``"**10/12, 2 mismatched**"`` when a divergence is not a near-tie."""
    if match and match.get("reference"):
        return "reference"
    if not match or not match["compared"]:
        return "—"
    text = f"{match['identical']}/{match['compared']}"
    if match["near_ties"]:
        text += f" ({len(match['near_ties'])} near-tie{'s' if len(match['near_ties']) > 1 else ''})"
    if match["mismatches"]:
        text = f"**{text}, {len(match['mismatches'])} mismatched**"
    return text
