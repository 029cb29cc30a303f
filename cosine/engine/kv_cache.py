"""A batched KV cache where every row has its own length and stays contiguous.

Layout: per layer, keys and values of shape ``[rows, heads, slots, head_dim]`` live in a growable buffer
with spare rows and slots (:class:`SlotLayer`, a Hugging Face cache layer that writes in place instead of
concatenating). Row ``r``'s committed tokens are its slots ``[0, length_r)``, in order: there are no holes.

* A forward writes each fed row's ``Q`` new slots at ``[length_r, length_r + Q)``; attention reads the
  first ``max(length) + Q`` slots of every row, so a row only needs a mask when rows differ in length or
  its segment is a tree (:meth:`BatchKV.attention_mask`).
* Commit keeps some of the new slots: a kept prefix (a chain's accepted tokens) only moves the length; a
  tree's accepted path is moved down to follow the committed slots (at most ``Q`` slots per row).
* Rollback (``truncate``) only shortens a row. RoPE is applied before keys are cached, so moving a slot
  does not change it, and nothing is ever recomputed.
* Slots past a row's length hold stale but finite values (buffers start zeroed): attention gives them
  weight zero, and a NaN there would survive that.
* Forwards run under ``torch.inference_mode`` (less bookkeeping per op than ``no_grad``), so the buffers
  are inference tensors: every method that writes them runs in that mode too.
* A model spread over devices keeps each layer's buffers on that layer's device (where its keys arrive);
  the index tensors of a forward or a commit are made once on the input device and moved to a layer's
  device where it differs.

A new row is written into a spare row and a dropped row's place is taken by the last row, so a request
joining or leaving copies its own row, not the cache. Buffers grow in bounded steps (:func:`~cosine.engine.
kv_budget.plan`: slots to a multiple of 64 and by at least a quarter, never doubling) and never past
:attr:`BatchKV.limit` token slots (rows x slots) when what is in use fits in it; they shrink when rows leave
and less than half of them is needed (and are freed when the last row goes). Every use of transformers'
cache classes is in this module, so a change of their API is fixed here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from cosine.engine.kv_budget import SLOT_CHUNK, plan


@dataclass
class Feed:
    """Where one forward's new slots go, shared by every layer.

    ``rows``: the rows fed, in input order: ``None`` = every row, a ``slice`` = a contiguous range (read as
    a view), a tensor = any rows (their keys and values are copied out). ``start``: the slot of the first
    new token, the same for every row fed; ``None`` when rows start at different slots, and ``scatter``
    holds the (row, slot) index of every new slot instead. ``span``: key slots attention reads. ``limit``:
    the token slots (rows x slots) the buffers may grow to (None: any)."""

    rows: torch.Tensor | slice | None
    start: int | None
    span: int
    scatter: tuple[torch.Tensor, torch.Tensor] | None = None
    limit: int | None = None


class SlotLayer(DynamicLayer):
    """One layer's KV buffers with spare rows and spare slots (grown in bounded steps when outgrown), so that
    appending slots, adding a row or dropping one copies only what changes."""

    feed: Feed | None = None  # set by BatchKV.feed for the duration of a forward

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape  # no slots yet: the first update reserves what it writes
        self.kbuf = key_states.new_zeros((b, h, 0, d))
        self.vbuf = value_states.new_zeros((b, value_states.shape[1], 0, value_states.shape[-1]))
        self.n = b
        self.length = 0  # slots in use by the longest row
        self.is_initialized = True

    # ``keys``/``values``: views of the used part, made when read (the length moves with every commit).
    @property
    def keys(self) -> torch.Tensor | None:
        return self.kbuf[: self.n, :, : self.length] if self.is_initialized else None

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer's own bookkeeping; the buffers are the truth
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return self.vbuf[: self.n, :, : self.length] if self.is_initialized else None

    @values.setter
    def values(self, value) -> None:
        pass

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (spare rows and slots included)."""
        return self.kbuf.numel() * self.kbuf.element_size() + self.vbuf.numel() * self.vbuf.element_size()

    def _reserve(self, rows: int, slots: int, limit: int | None = None) -> None:
        cap_rows, cap_slots = self.kbuf.shape[0], self.kbuf.shape[2]
        if rows <= cap_rows and slots <= cap_slots:
            return
        self._reshape(*plan(rows, slots, cap_rows, cap_slots, limit))

    def _reshape(self, rows: int, slots: int) -> None:
        """New buffers of ``rows x slots`` (at least the rows and slots in use) holding what is in use."""
        for name in ("kbuf", "vbuf"):
            old = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], slots, old.shape[3]))
            new[: self.n, :, : self.length] = old[: self.n, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        feed = self.feed or Feed(None, self.length, self.length + key_states.shape[-2])
        self._reserve(self.n, feed.span, feed.limit)
        rows = slice(0, self.n) if feed.rows is None else feed.rows
        if feed.scatter is None and isinstance(rows, slice):
            end = feed.start + key_states.shape[-2]
            self.kbuf[rows, :, feed.start : end] = key_states
            self.vbuf[rows, :, feed.start : end] = value_states
        else:  # one scatter of [rows, Q] slots; inputs go to [rows, Q, heads, dim] to match the index
            row_idx, slot_idx = (_on(index, self.kbuf.device) for index in feed.scatter)
            self.kbuf[row_idx, :, slot_idx] = key_states.transpose(1, 2)
            self.vbuf[row_idx, :, slot_idx] = value_states.transpose(1, 2)
        if isinstance(rows, slice):
            return self.kbuf[rows, :, : feed.span], self.vbuf[rows, :, : feed.span]
        rows = _on(rows, self.kbuf.device)
        return self.kbuf[:, :, : feed.span].index_select(0, rows), self.vbuf[:, :, : feed.span].index_select(0, rows)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    # -- row and slot surgery used by BatchKV ---------------------------------------------------------
    def move_slots(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slot ``src[i]`` of row ``rows[i]`` onto its slot ``dst[i]``, for all ``i`` at once."""
        rows, src, dst = (_on(index, self.kbuf.device) for index in (rows, src, dst))
        for buf in (self.kbuf, self.vbuf):
            buf[rows, :, dst] = buf[rows, :, src]

    def set_length(self, length: int) -> None:
        self.length = length

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row ``src`` onto row ``dst`` for each ``(src, dst)`` in turn, then keep the first ``rows``."""
        for src, dst in moves:
            self.kbuf[dst, :, : self.length] = self.kbuf[src, :, : self.length]
            self.vbuf[dst, :, : self.length] = self.vbuf[src, :, : self.length]
        self.n = rows

    def append_rows(self, other: SlotLayer, length: int, limit: int | None = None) -> None:
        """Add ``other``'s rows after this layer's rows; ``length`` is the longest row after that."""
        m = other.n
        self._reserve(self.n + m, length, limit)
        copied = min(other.length, length)
        self.kbuf[self.n : self.n + m, :, :copied] = other.kbuf[:m, :, :copied]
        self.vbuf[self.n : self.n + m, :, :copied] = other.vbuf[:m, :, :copied]
        self.n += m
        self.length = length


def _on(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``index`` on ``device`` (itself when it is there already)."""
    return index if index.device == device else index.to(device)


def _empty_like(layer: SlotLayer, rows: int) -> SlotLayer:
    """A layer with ``rows`` rows and no slots in use, shaped like ``layer``."""
    empty = SlotLayer()
    empty.device = layer.device
    empty.kbuf = layer.kbuf.new_zeros((rows, layer.kbuf.shape[1], 0, layer.kbuf.shape[3]))
    empty.vbuf = layer.vbuf.new_zeros((rows, layer.vbuf.shape[1], 0, layer.vbuf.shape[3]))
    empty.n = rows
    empty.length = 0
    empty.is_initialized = True
    return empty


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=SlotLayer)


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the cache (``cache`` since transformers 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class BatchKV:
    """The HF cache object plus each row's committed length.

    ``limit``: the token slots (rows x slots) the buffers may take (None: no limit); what is in use always
    fits, so a forward needing more than the limit still runs (the caller's admission keeps it within)."""

    def __init__(self, device: torch.device | str = "cpu", limit: int | None = None) -> None:
        self.device = torch.device("cpu")  # where bookkeeping tensors (lengths, masks of commits) are made
        self.cache_device = torch.device(device)  # where index tensors are made (the model's input device)
        self.cache = new_cache()
        self._lengths: list[int] = []
        self.limit = limit
        self.peak_bytes = 0  # the most the buffers held at once (sampled after every forward and merge)

    # -- shape ----------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self._lengths)

    @property
    def physical(self) -> int:
        """Slots in use: the longest row's length."""
        return max(self._lengths, default=0)

    def lengths(self) -> torch.Tensor:
        return torch.tensor(self._lengths, dtype=torch.long)

    def lengths_list(self) -> list[int]:
        """Committed tokens per row."""
        return self._lengths

    @property
    def valid(self) -> torch.Tensor:
        """``[rows, physical]``: whether each slot of a row holds a committed token (a prefix of each row)."""
        return torch.arange(self.physical)[None, :] < self.lengths()[:, None]

    def _layers(self) -> list[SlotLayer]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    # -- memory ---------------------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes the key and value buffers of every layer hold now, spare rows and slots included."""
        return sum(layer.nbytes for layer in self._layers())

    @property
    def capacity(self) -> tuple[int, int]:
        """``(rows, slots)`` the buffers have room for (``(0, 0)`` before the first forward)."""
        layers = self._layers()
        return (layers[0].kbuf.shape[0], layers[0].kbuf.shape[2]) if layers else (0, 0)

    def _note(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def _shrink(self) -> None:
        """After rows left: free the buffers when no row is left; reallocate them when less than half of
        their token slots would do (the rows, and the longest row plus a chunk of slots for what comes)."""
        if not self._lengths:
            self.cache = new_cache()
            return
        rows, slots = self.capacity
        want = plan(self.rows, self.physical + SLOT_CHUNK, 0, 0, self.limit)
        if rows * slots > 2 * want[0] * want[1]:
            with torch.inference_mode():
                for layer in self._layers():
                    layer._reshape(*want)

    @property
    def filled(self) -> bool:
        """Whether any layer holds slots yet (before the first forward there is nothing to select from)."""
        return bool(self._layers())

    def add_empty_rows(self, count: int) -> None:
        """Rows with nothing committed, for a fresh cache that a prefill forward fills."""
        self._lengths.extend([0] * count)

    def _set_lengths(self, lengths: list[int]) -> None:
        self._lengths = lengths
        used = self.physical
        for layer in self._layers():
            layer.set_length(used)

    # -- forward --------------------------------------------------------------------------------------
    def feed(self, rows: list[int] | None, q: int) -> None:
        """The next forward writes ``q`` new slots after each row's committed ones, for ``rows`` (input row
        ``i`` is cache row ``rows[i]``; ``None``: every row, in order). :meth:`fed` ends it."""
        work = self._lengths if rows is None else [self._lengths[r] for r in rows]
        first = work[0] if work else 0
        index: torch.Tensor | slice | None = None
        if rows is not None:
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            index = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=self.cache_device)
        feed = Feed(index, first, max(work, default=0) + q, limit=self.limit)
        if any(s != first for s in work) or isinstance(index, torch.Tensor):
            dev = self.cache_device
            row_idx = torch.tensor(range(len(work)) if rows is None else rows, device=dev)
            slot_idx = torch.tensor(work, device=dev)[:, None] + torch.arange(q, device=dev)
            feed.start, feed.scatter = None, (row_idx[:, None], slot_idx)
        for layer in self.cache.layers:
            layer.feed = feed

    def fed(self) -> None:
        for layer in self.cache.layers:
            layer.feed = None
        self._note()

    def extend(self, counts: list[int]) -> None:
        """Commit the first ``counts[r]`` new slots of each row (a chain's tokens, a prefill)."""
        self._set_lengths([n + c for n, c in zip(self._lengths, counts)])

    def attention_mask(self, rows: list[int] | None, ancestors: torch.Tensor) -> torch.Tensor:
        """Boolean ``[rows, 1, Q, max(length) + Q]`` mask for a forward that feeds ``rows`` (``None``: all):
        a new node sees its row's committed slots and, among the new slots, those ``ancestors[row, node]``
        marks (``[rows, Q, Q]`` bool, on the cache's device)."""
        starts = self._lengths if rows is None else [self._lengths[r] for r in rows]
        q = ancestors.shape[-1]
        span = max(starts, default=0) + q
        dev = ancestors.device
        rel = torch.arange(span, device=dev)[None, :] - torch.tensor(starts, device=dev)[:, None]  # [rows, span]
        new = (rel >= 0) & (rel < q)
        gathered = ancestors.gather(2, rel.clamp(0, q - 1)[:, None, :].expand(-1, q, -1))
        return ((rel < 0)[:, None, :] | (gathered & new[:, None, :]))[:, None]

    # -- commit and rollback --------------------------------------------------------------------------
    def commit(self, keep: torch.Tensor | list[list[bool]]) -> None:
        """Keep, per row, the marked slots of the last forward (``keep``: ``[rows, Q]`` bool), in order:
        they follow the row's committed slots."""
        marks = keep.tolist() if isinstance(keep, torch.Tensor) else keep
        lengths = list(self._lengths)
        rows: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        for r, row in enumerate(marks):
            for node, kept in enumerate(row):
                if kept:
                    if node + self._lengths[r] != lengths[r]:  # a hole before it: move the slot down
                        rows.append(r)
                        src.append(self._lengths[r] + node)
                        dst.append(lengths[r])
                    lengths[r] += 1
        if rows:
            dev = self.cache_device
            with torch.inference_mode():
                index = [torch.tensor(x, device=dev) for x in (rows, src, dst)]
                for layer in self._layers():
                    layer.move_slots(*index)
        self._set_lengths(lengths)

    def truncate(self, rows: torch.Tensor | list[int], new_lengths: torch.Tensor | list[int]) -> None:
        """Roll rows back to ``new_lengths`` committed tokens (never longer than they are)."""
        lengths = list(self._lengths)
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
        new = new_lengths.tolist() if isinstance(new_lengths, torch.Tensor) else new_lengths
        for r, n in zip(rows, new):
            lengths[r] = min(lengths[r], int(n))
        self._set_lengths(lengths)

    def compact(self) -> None:
        """Nothing to squeeze out: rows never have holes (kept for callers that compact now and then)."""

    # -- rows -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def merge(self, other: BatchKV) -> None:
        """Append ``other``'s rows (e.g. freshly prefilled requests) below this cache's rows."""
        mine, theirs = self._layers(), other._layers()
        lengths = self._lengths + other._lengths
        used = max(lengths, default=0)
        if not theirs:
            theirs = [_empty_like(layer, other.rows) for layer in mine]
        if not mine and not self.rows:  # nothing here yet: take the other cache as it is
            self.cache = other.cache
        elif not mine:
            self.cache = other.cache
            mine = [_empty_like(layer, self.rows) for layer in theirs]
            for layer, empty in zip(theirs, mine):
                empty.append_rows(layer, used)
                layer.kbuf, layer.vbuf, layer.n = empty.kbuf, empty.vbuf, empty.n
        else:
            for layer, extra in zip(mine, theirs):
                layer.append_rows(extra, used, self.limit)
        self._set_lengths(lengths)
        rows, slots = self.capacity
        if self.limit is not None and rows * slots > self.limit:  # another cache's buffers, taken as they were
            want = plan(self.rows, self.physical, 0, 0, self.limit)
            if want[0] * want[1] < rows * slots:
                for layer in self._layers():
                    layer._reshape(*want)
        self._note()

    @torch.inference_mode()
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
        for layer in self._layers():
            layer.move_rows(moves, len(order))
        self._set_lengths([self._lengths[i] for i in order])
        self._shrink()
        return order

    # -- inspection -----------------------------------------------------------------------------------
    def slots_of(self, row: int) -> torch.Tensor:
        """Physical slot indices of a row's committed tokens, in logical order."""
        return torch.arange(self._lengths[row])

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.cache.layers[layer]
        return entry.keys, entry.values
