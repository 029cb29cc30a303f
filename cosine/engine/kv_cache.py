"""A batched KV cache where every row has its own length, with rollback that recomputes nothing.

Layout: per layer, keys and values of shape ``[rows, heads, physical, head_dim]`` live in a growable
buffer with spare rows and slots (:class:`SlotLayer`, a Hugging Face cache layer that writes in place
instead of concatenating). A new row is written into a spare row and a dropped row's place is taken by the
last row, so a request joining or leaving copies its own row, not the cache (on the CPU zoo, dropping one
of 8 rows of 250 slots by re-selecting the other seven took 21 ms, half a verification pass).
``valid[row, t]`` says whether physical slot ``t`` of a row holds a committed token. A row's committed
tokens are its valid slots in physical order, so logical position ``i`` is the ``i``-th valid slot.

* A forward appends ``Q`` slots to every row (shorter rows pad with masked slots).
* Commit marks which of the new slots stay (the accepted path of a draft tree); the others become holes.
* Rollback (``truncate``) turns the last committed slots of a row back into holes.
* Holes are masked out of attention, so nothing is recomputed; ``compact`` squeezes them out when they
  waste too much memory. RoPE is applied before keys are cached, so moving a slot does not change it.

Every use of transformers' cache classes is in this module, so a change of their API is fixed here.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's KV buffers with spare rows and spare slots (each doubled when outgrown), so that appending
    slots, adding a row or dropping one copies only what changes; ``keys``/``values`` are views of the used
    part (the first ``n`` rows, the first ``length`` slots).

    Slots below ``length`` always hold finite values (a row's holes are zeros), because attention multiplies
    them by a mask weight of zero and a garbage NaN would survive that."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.kbuf = key_states.new_empty((b, h, 64, d))
        self.vbuf = value_states.new_empty((b, value_states.shape[1], 64, value_states.shape[-1]))
        self.n = b
        self.length = 0
        self._sync()
        self.is_initialized = True

    def _sync(self) -> None:
        self.keys = self.kbuf[: self.n, :, : self.length]
        self.values = self.vbuf[: self.n, :, : self.length]

    def _reserve(self, rows: int, slots: int) -> None:
        cap_rows, cap_slots = self.kbuf.shape[0], self.kbuf.shape[2]
        if rows <= cap_rows and slots <= cap_slots:
            return
        rows = cap_rows if rows <= cap_rows else max(rows, 2 * cap_rows)
        slots = cap_slots if slots <= cap_slots else max(slots, 2 * cap_slots)
        for name in ("kbuf", "vbuf"):
            old = getattr(self, name)
            new = old.new_empty((rows, old.shape[1], slots, old.shape[3]))
            new[: self.n, :, : self.length] = old[: self.n, :, : self.length]
            setattr(self, name, new)

    # Rows a forward runs over when it feeds only some rows (None: all of them); set by BatchKV.only_rows.
    rows: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, need = self.length, self.length + key_states.shape[-2]
        self._reserve(self.n, need)
        if self.rows is None:
            self.kbuf[: self.n, :, start:need] = key_states
            self.vbuf[: self.n, :, start:need] = value_states
        else:  # the rows not fed get zeroed holes (finite, masked out); the fed ones get their new slots
            for buf, new in ((self.kbuf, key_states), (self.vbuf, value_states)):
                fresh = buf[: self.n, :, start:need]
                fresh.zero_()
                fresh.index_copy_(0, self.rows, new)
        self.length = need
        self._sync()
        if self.rows is None:
            return self.keys, self.values
        return self.keys.index_select(0, self.rows), self.values.index_select(0, self.rows)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    # -- row and slot surgery used by BatchKV ---------------------------------------------------------
    def gather_slots(self, index: torch.Tensor) -> None:
        """Keep, per row, the slots listed in ``index`` (``[rows, new_len]``), in that order (in place)."""
        new_len = index.shape[1]
        idx = index[:, None, :, None].to(self.kbuf.device)
        for buf in (self.kbuf, self.vbuf):
            kept = buf[: self.n].gather(2, idx.expand(self.n, buf.shape[1], new_len, buf.shape[3]))
            buf[: self.n, :, :new_len] = kept
        self.length = new_len
        self._sync()

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row ``src`` onto row ``dst`` for each ``(src, dst)`` in turn, then keep the first ``rows``."""
        for src, dst in moves:
            self.kbuf[dst, :, : self.length] = self.kbuf[src, :, : self.length]
            self.vbuf[dst, :, : self.length] = self.vbuf[src, :, : self.length]
        self.n = rows
        self._sync()

    def append_rows(self, other: SlotLayer) -> None:
        """Add ``other``'s rows after this layer's rows (the shorter side's extra slots are zeroed holes)."""
        m, length = other.n, max(self.length, other.length)
        self._reserve(self.n + m, length)
        for buf, theirs in ((self.kbuf, other.kbuf), (self.vbuf, other.vbuf)):
            buf[: self.n, :, self.length : length] = 0
            buf[self.n : self.n + m, :, : other.length] = theirs[:m, :, : other.length]
            buf[self.n : self.n + m, :, other.length : length] = 0
        self.n += m
        self.length = length
        self._sync()

    def adopt(self, other: SlotLayer) -> None:
        """Take ``other``'s buffers and shape."""
        self.kbuf, self.vbuf, self.n, self.length = other.kbuf, other.vbuf, other.n, other.length
        self._sync()


def _pad_cols(mask: torch.Tensor, physical: int) -> torch.Tensor:
    if mask.shape[1] == physical:
        return mask
    pad = torch.zeros((mask.shape[0], physical - mask.shape[1]), dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, pad], dim=1)


def _empty_like(layer: SlotLayer, rows: int) -> SlotLayer:
    """A layer with ``rows`` rows and no slots, shaped like ``layer``."""
    empty = SlotLayer()
    empty.device = layer.device
    empty.kbuf = layer.kbuf.new_zeros((rows, layer.kbuf.shape[1], 0, layer.kbuf.shape[3]))
    empty.vbuf = layer.vbuf.new_zeros((rows, layer.vbuf.shape[1], 0, layer.vbuf.shape[3]))
    empty.n = rows
    empty.length = 0
    empty.is_initialized = True
    empty._sync()
    return empty


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=SlotLayer)


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the cache (``cache`` since transformers 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class BatchKV:
    """The HF cache object plus per-row slot validity."""

    # Compact when at least this share of the physical slots are holes (and there are enough slots).
    COMPACT_WASTE = 0.5
    COMPACT_MIN_SLOTS = 64

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # Slot validity is bookkeeping for building attention masks on the host: it stays on the CPU, so a
        # forward on a GPU never waits for it; only gather indices travel to the cache's device.
        self.device = torch.device("cpu")
        self.cache_device = torch.device(device)
        self.cache = new_cache()
        self._valid = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self._physical = 0
        self._lengths: list[int] | None = None
        self.compactions = 0

    # The validity mask lives in a buffer with spare columns, so a forward does not copy it.
    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, : self._physical]

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._valid = value
        self._physical = value.shape[1]
        self._lengths = None

    # -- shape ----------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def physical(self) -> int:
        return self._physical

    def lengths(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def lengths_list(self) -> list[int]:
        """Committed tokens per row (cached between changes of the validity mask)."""
        if self._lengths is None:
            self._lengths = self.lengths().tolist()
        return self._lengths

    def _layers(self) -> list[SlotLayer]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    @property
    def filled(self) -> bool:
        """Whether any layer holds slots yet (before the first forward there is nothing to select from)."""
        return bool(self._layers())

    # -- growth and commit ----------------------------------------------------------------------------
    def merge(self, other: BatchKV) -> None:
        """Append ``other``'s rows (e.g. freshly prefilled requests) below this cache's rows."""
        physical = max(self.physical, other.physical)
        self.valid = torch.cat([_pad_cols(self.valid, physical), _pad_cols(other.valid.to(self.device), physical)])
        mine, theirs = self._layers(), other._layers()
        if not theirs:
            theirs = [_empty_like(layer, other.rows) for layer in mine]
        if not mine:
            self.cache = other.cache
            mine = [_empty_like(layer, self.rows - other.rows) for layer in theirs]
            for layer, empty in zip(theirs, mine):
                empty.append_rows(layer)
                layer.adopt(empty)
            return
        for layer, extra in zip(mine, theirs):
            layer.append_rows(extra)

    def after_forward(self, new_slots: int) -> None:
        """A forward appended ``new_slots`` slots to every row; they are holes until committed."""
        need = self._physical + new_slots
        if need > self._valid.shape[1]:
            grown = torch.zeros((self.rows, max(need, 2 * self._valid.shape[1], 64)), dtype=torch.bool,
                                device=self.device)
            grown[:, : self._physical] = self.valid
            self._valid = grown
        else:
            self._valid[:, self._physical : need] = False
        self._physical = need

    def commit(self, keep: torch.Tensor) -> None:
        """Mark which of the last forward's slots (``keep``: ``[rows, Q]`` bool) hold committed tokens."""
        q = keep.shape[1]
        self._valid[:, self._physical - q : self._physical] = keep.to(self.device)
        self._lengths = None
        self.maybe_compact()

    def truncate(self, rows: torch.Tensor, new_lengths: torch.Tensor) -> None:
        """Roll rows back to ``new_lengths`` committed tokens; the removed slots become holes."""
        rows = rows.to(self.device)
        sub = self.valid[rows]
        logical = sub.cumsum(dim=1) - 1
        sub &= logical < new_lengths.to(self.device)[:, None]
        self._valid[rows, : self._physical] = sub
        self._lengths = None

    # -- maintenance ----------------------------------------------------------------------------------
    def maybe_compact(self) -> None:
        if self.physical < self.COMPACT_MIN_SLOTS or self.rows == 0:
            return
        used = max(self.lengths_list())
        if (self.physical - used) / self.physical >= self.COMPACT_WASTE:
            self.compact()

    def compact(self) -> None:
        """Squeeze out holes: each row's committed slots move to the front, in order."""
        lengths = self.lengths()
        new_len = int(lengths.max()) if self.rows else 0
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)[:, :new_len]
        for layer in self._layers():
            layer.gather_slots(order)
        self.valid = torch.arange(new_len, device=self.device)[None, :] < lengths[:, None]
        self.compactions += 1

    @contextlib.contextmanager
    def only_rows(self, rows: list[int]):
        """Within the block, a forward runs over ``rows`` only (its inputs have one row per listed row, in
        that order): each layer stores their new slots in place, gives the other rows holes, and returns
        the listed rows' keys and values (a copy of theirs alone, instead of computing every row)."""
        layers = self._layers()
        index = torch.tensor(rows, dtype=torch.long, device=self.cache_device)
        for layer in layers:
            layer.rows = index
        try:
            yield
        finally:
            for layer in layers:
                layer.rows = None

    def drop_rows(self, rows: list[int]) -> list[int]:
        """Drop ``rows``: the last rows move into their places, one row copied per row dropped (not the whole
        cache). Returns the new order: entry ``j`` is the old index of the row now at ``j``."""
        order = list(range(self.rows))
        moves: list[tuple[int, int]] = []
        for r in sorted(set(rows), reverse=True):  # the rows after r that go are gone already
            last = len(order) - 1
            if r != last:
                moves.append((last, r))
                order[r] = order[last]
            order.pop()
        valid = self.valid.clone()
        for src, dst in moves:
            valid[dst] = valid[src]
        self.valid = valid[: len(order)]
        for layer in self._layers():
            layer.move_rows(moves, len(order))
        return order

    def slots_of(self, row: int) -> torch.Tensor:
        """Physical slot indices of a row's committed tokens, in logical order."""
        return torch.nonzero(self.valid[row], as_tuple=False).flatten()

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.cache.layers[layer]
        return entry.keys, entry.values
