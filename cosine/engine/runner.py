"""ModelRunner: one Hugging Face causal LM, a batched KV cache, and token-tree forwards over it.

A *segment* is what one row feeds in one forward: tokens with parent indices (``-1`` = attaches to the
row's committed prefix). A chain is ``parents = [-1, 0, 1, ...]``; a token tree is any forest whose
parents come before their children. One forward runs every row's segment at once: attention goes to the
row's committed slots plus the node's own ancestors, and positions are the row's length plus the node's
depth. Nothing new is committed until :meth:`commit` says which nodes stay; a row's committed slots stay
contiguous (:mod:`cosine.engine.kv_cache`), so most passes need no attention mask at all.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from cosine.engine import lean_llama
from cosine.engine.families import layout_of, to_model_mask, windowed_mask
from cosine.engine.kv_cache import BatchKV, cache_kwarg
from cosine.engine.models import input_device, spread
from cosine.engine.vocab import fit_logits

log = logging.getLogger(__name__)


@dataclass
class Segment:
    tokens: list[int]
    parents: list[int]

    @staticmethod
    def chain(tokens: list[int]) -> Segment:
        return Segment(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        depth: list[int] = []
        for i, p in enumerate(self.parents):
            if p >= i:
                raise ValueError("a node's parent must come before it")
            depth.append(0 if p < 0 else depth[p] + 1)
        return depth


# A prefill group takes rows down to this share of its longest prompt: every row of a forward computes the
# longest row's slots, so admitting prompts of 14 and 297 tokens together computed 297 for both. Below it a
# new group (one more forward) starts. 11 held-out prompts of 17-265 tokens beside 20 requests took 1.8 s to
# prefill as one batch on the demo zoo's CPU target, stalling every request in flight for as long.
PREFILL_GROUP_SHARE = 0.7


def prefill_groups(lengths: list[int], share: float = PREFILL_GROUP_SHARE) -> list[list[int]]:
    """Indices of ``lengths`` in prefill groups: longest first, each group the rows at least ``share`` of its
    longest (empty prefixes all in one group)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= share * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class ModelRunner:
    """Runs one model over a batch of rows, each row one sequence with its own committed length."""

    # A forward that feeds at most this share of the rows runs over those rows alone (their cache copied
    # out per layer, unless they are adjacent rows); above it, every row runs and the rows not fed compute
    # padding. Every row costs a full share of the forward's compute, so a verifier pass over 8 of 32
    # requests would otherwise cost as much as a pass over all 32.
    SUBSET_SHARE = 0.75
    # Every row of a forward computes as many slots as the longest segment (shorter ones are padded), so a
    # pass costs its rows times its largest tree: what cost models of this runner price (CostModel.padded).
    PADDED = True

    def __init__(self, model: torch.nn.Module, name: str = "model", lean: bool | None = None,
                 vocab_size: int | None = None) -> None:
        """``vocab_size``: the ids the returned logits cover (a drafter's: the target's), cut or padded with
        ``-inf`` from the model's own table (:func:`~cosine.engine.vocab.fit_logits`)."""
        self.model = model
        # The lean forward (:mod:`cosine.engine.lean_llama`) where it reproduces the model's own bit for bit;
        # ``lean=False`` keeps transformers' forward (``None``: lean where supported).
        self.lean = lean_llama.supports(model) if lean is None else lean and lean_llama.supports(model)
        self.name = name
        # Which masks the model's layers take (sliding windows, per-kind dicts); refuses what it cannot run.
        self.layout = layout_of(model, name)
        # Inputs (ids, positions, masks, the cache's index tensors) are made on the input embedding's device.
        # A model spread over devices (``load_model(device_map=...)``) carries accelerate's hooks, which move
        # each decoder layer's inputs (hidden states, the attention mask, position embeddings) to the layer's
        # device and the logits back to the inputs' device; the cache is left alone and each SlotLayer keeps
        # its buffers on its layer's device.
        self.device = input_device(model)
        self.dtype = model.get_input_embeddings().weight.dtype
        # Per-row ``logits_to_keep`` positions would meet the last hidden states on another device than the
        # one the hooks send them to: a spread model projects every position and the last ones are picked.
        self._keep_rows = not spread(model)
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        # Ids past the model's embedding table (padding ids of a larger target vocabulary, which trained
        # models never emit) are fed as this id: only a drafter meets them, and a draft is only a proposal.
        self.embed_rows = int(model.get_input_embeddings().num_embeddings)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.kv = BatchKV(self.device)
        self._cache_kwarg = cache_kwarg(model)
        # Models that take ``logits_to_keep`` project only the positions asked for onto the vocabulary: a
        # drafter's step needs each row's last position, a prefill none (the projection is over half of a
        # small drafter's compute per token).
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.row_ids: list[str] = []
        self.forwards = 0
        self.rows_run = 0  # rows computed over all forwards (fed or padding)
        self.slots_run = 0  # token slots computed over all forwards: rows run x the longest segment
        self.slots_fed = 0  # of those, slots holding a fed token (the rest is padding)

    # -- rows -----------------------------------------------------------------------------------------
    def row_of(self, seq_id: str) -> int:
        return self.row_ids.index(seq_id)

    def has(self, seq_id: str) -> bool:
        return seq_id in self.row_ids

    def lengths(self) -> list[int]:
        return list(self.kv.lengths_list())

    def length_of(self, seq_id: str) -> int:
        return self.kv.lengths_list()[self.row_of(seq_id)]

    def add_rows(self, seq_ids: list[str], prefixes: list[list[int]]) -> None:
        """Add rows and prefill them with ``prefixes`` (which may be empty): one batched forward per group of
        similar lengths (:func:`prefill_groups`), so a long prompt does not pad every short one to its length.
        The new rows follow the existing ones in group order (longest first; the order given within a group):
        look rows up by id (:meth:`row_of`), as after :meth:`remove_rows`."""
        if not seq_ids:
            return
        for sid in seq_ids:
            if sid in self.row_ids:
                raise ValueError(f"{self.name}: row {sid} already exists")
        for group in prefill_groups([len(p) for p in prefixes]):
            fresh = ModelRunner.__new__(ModelRunner)
            fresh.__dict__.update(self.__dict__)
            fresh.kv = BatchKV(self.device)
            fresh.kv.add_empty_rows(len(group))
            fresh.row_ids = [seq_ids[i] for i in group]
            if any(prefixes[i] for i in group):
                segments = [Segment.chain(prefixes[i]) for i in group]
                fresh.forward(segments, logits="none")
                fresh.commit_segments(segments)
            self.kv.merge(fresh.kv)
            self.row_ids.extend(fresh.row_ids)
            self.forwards, self.rows_run = fresh.forwards, fresh.rows_run
            self.slots_run, self.slots_fed = fresh.slots_run, fresh.slots_fed

    def remove_rows(self, seq_ids: list[str]) -> None:
        """Drop these rows (the last rows take their places: row order is not kept)."""
        gone = set(seq_ids)
        rows = [i for i, sid in enumerate(self.row_ids) if sid in gone]
        if not rows:
            return
        order = self.kv.drop_rows(rows)
        self.row_ids = [self.row_ids[i] for i in order]

    def truncate(self, seq_id: str, length: int) -> None:
        """Roll a row back to its first ``length`` committed tokens."""
        self.kv.truncate([self.row_of(seq_id)], [length])

    # -- forward --------------------------------------------------------------------------------------
    @staticmethod
    def _ancestors(seg: Segment | None, q: int) -> list[list[bool]]:
        """``[Q][Q]``: which new nodes each node sees (its ancestors and itself); padding sees itself."""
        n = len(seg) if seg else 0
        rows = [[j == i for j in range(q)] for i in range(q)]
        for i in range(n):
            p = seg.parents[i]  # type: ignore[union-attr]
            if p >= 0:
                rows[i] = [a or b for a, b in zip(rows[i], rows[p])]
        return rows

    @torch.inference_mode()
    def forward(self, segments: list[Segment | None],
                logits: Literal["all", "last", "none"] = "all") -> torch.Tensor | None:
        """Run one forward with a segment per row (``None`` = nothing for that row).

        Returns float32 logits: with ``"all"``, ``[rows, Q, vocab]`` (row ``r``, node ``i``: the
        distribution of the token that follows node ``i``); with ``"last"``, ``[rows, vocab]``, after each
        row's last node; undefined for rows given ``None``. ``"none"`` returns ``None``. The new slots stay
        uncommitted. The forward runs under ``torch.inference_mode``: read the logits, do not write them.

        Attention needs no mask when every row run starts at the same length and feeds a chain (one token,
        a prefill, or a causal block that transformers builds from the cache's length); otherwise a boolean
        mask of each row's committed slots and its nodes' ancestors is built once for the pass.
        """
        if len(segments) != self.kv.rows:
            raise ValueError(f"{self.name}: {len(segments)} segments for {self.kv.rows} rows")
        q = max((len(s) for s in segments if s is not None), default=0)
        if q == 0:
            return None
        fed = [r for r, s in enumerate(segments) if s is not None]
        # Feeding only some rows: run those alone unless nearly all are fed, where copying their cache costs
        # more than computing the padding of the few left out (rows run without a segment compute padding).
        subset = len(fed) <= self.SUBSET_SHARE * len(segments) and self.kv.filled
        work = fed if subset else list(range(len(segments)))
        rows = len(work)
        lengths = self.kv.lengths_list()
        ids: list[list[int]] = []
        pos: list[list[int]] = []
        sizes: list[int] = []
        chains = True
        for row in work:
            seg = segments[row]
            n = len(seg) if seg else 0
            base = lengths[row]
            sizes.append(n)
            if n == 0:
                ids.append([0] * q)
                pos.append([base] * q)
                continue
            assert seg is not None
            if seg.parents == list(range(-1, n - 1)):  # a chain: depth = index
                top = base + n - 1
                pos.append(list(range(base, base + n)) + [base] * (q - n))
            else:
                chains = False
                depths = seg.depths()
                top = base + max(depths)
                pos.append([base + d for d in depths] + [base] * (q - n))
            if top >= self.max_positions:
                raise ValueError(f"{self.name}: position {top} exceeds the context")
            tokens = seg.tokens if max(seg.tokens) < self.embed_rows else [
                t if t < self.embed_rows else 0 for t in seg.tokens]
            ids.append(tokens + [0] * (q - n))
        starts = {lengths[row] for row in work}
        positions = torch.tensor(pos, device=self.device)
        mask = None
        if self.layout.windowed or not (chains and len(starts) == 1 and (q == 1 or starts == {self.kv.physical})):
            anc = torch.tensor([self._ancestors(segments[row], q) for row in work], device=self.device)
            mask = self._model_masks(self.kv.attention_mask(work, anc), [lengths[row] for row in work], positions)
        last = [max(n, 1) - 1 for n in sizes]  # each row's last node
        keep: int | torch.Tensor | None = None
        if self._keeps_logits and logits == "none":
            keep = 1
        elif self._keeps_logits and logits == "last":
            keep = (1 if all(n == q for n in sizes) else None if not self._keep_rows else
                    torch.tensor(last, device=self.device)[:, None])  # [rows, 1] positions
        self.kv.feed(work if subset else None, q)
        try:
            got = self.call_model(torch.tensor(ids, device=self.device), positions, mask, keep)
        finally:
            self.kv.fed()
        self.forwards += 1
        self.rows_run += rows
        self.slots_run += rows * q
        self.slots_fed += sum(sizes)
        if logits == "none":
            return None
        if logits == "last":
            got = got[:, -1] if keep is not None else got[torch.arange(rows), torch.tensor(last)]
        if got.dtype != torch.float32:
            got = got.float()
        got = fit_logits(got, self.vocab_size)
        if not subset:
            return got
        full = got.new_empty((len(segments), *got.shape[1:]))
        return full.index_copy_(0, torch.tensor(work, device=full.device), got)

    def _model_masks(self, full: torch.Tensor, starts: list[int], positions: torch.Tensor):
        """The mask (or per-kind dict of masks) the model takes, from the boolean ``full`` mask of a forward
        whose rows start at ``starts`` with nodes at ``positions`` (``[rows, Q]``): a sliding-window layer sees
        only keys within its window (committed slot ``s`` holds position ``s``, a new node its own position)."""
        layout = self.layout
        masks = {}
        for kind, window in layout.windows.items():
            mask = full
            if window is not None:
                q, span = positions.shape[1], full.shape[-1]
                slots = torch.arange(span, device=self.device)[None, :]
                rel = slots - torch.tensor(starts, device=self.device)[:, None]
                key_pos = torch.where((rel >= 0) & (rel < q), positions.gather(1, rel.clamp(0, q - 1)), slots)
                mask = windowed_mask(full, positions, key_pos, window)
            masks[kind] = to_model_mask(mask, layout, self.dtype)
        return masks if layout.by_kind else next(iter(masks.values()))

    def call_model(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                   keep: int | torch.Tensor | None) -> torch.Tensor:
        """The model's logits for one forward over the cache (the lean forward where it applies); ``keep``:
        the positions to project (``logits_to_keep``), ``None`` for all."""
        if self.lean:
            return lean_llama.forward(self.model, ids, pos, mask, self.kv.cache, 0 if keep is None else keep)
        extra = {} if keep is None else {"logits_to_keep": keep}
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                          **{self._cache_kwarg: self.kv.cache}, **extra).logits

    def commit(self, keep: torch.Tensor | list[list[bool]]) -> None:
        """Commit the nodes marked in ``keep`` (``[rows, Q]`` bools) of the last forward."""
        self.kv.commit(keep)

    def commit_segments(self, segments: list[Segment | None]) -> None:
        """Commit every node of the last forward's segments (they must be chains)."""
        self.kv.extend([len(s) if s else 0 for s in segments])
