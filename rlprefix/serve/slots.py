"""The K/V cache of a running decode batch that rows join and leave at any step (continuous batching).

Why this layout: every decode step must stay one model call over all running rows, and a `StaticCache` writes
one column for the whole batch. So all rows write their next token's K/V at one shared column `w`, and a row's
context (prefix K/V, prompt, then its tokens) may sit anywhere left of `w` in its own cache row; `valid` marks its
columns and the attention mask hides the rest. A joining row is placed right-aligned to end just before `w`.
Where a key sits does not change a row's logits (attention sees only the keys its mask allows, and rotary
positions were applied when the keys were computed), up to float summation order, as in any batch.

Rows live in slots 0..n-1 (a leaving row's slot is taken by the last row), and a decode step runs on views of
the first n rows and w + 1 columns, so its cost follows the rows and context in use, not the capacity. When `w`
reaches the capacity, each row's valid columns are packed to the right (the gaps that rows joining and leaving
left behind are dropped), and only if that leaves little room does the capacity grow (doubling, up to `limit`).
A row never needs more than `limit` columns, so no row waits for room.
"""
from __future__ import annotations

import torch
from transformers import StaticCache

from rlprefix.decoding.static_cache import decode_mask
from rlprefix.models.spec import kv_spec
from rlprefix.models.sampling import model_dtype

COLUMNS = 64  # capacity granularity


def right_aligned(valid: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving each row's valid columns (in order) to the right end of `width` columns: [B, width] source columns
    (the columns before them point at column 0) and [B, width] the mask of the columns valid after the move."""
    rows, cols = valid.shape
    count = valid.sum(1, keepdim=True)
    dest = torch.where(valid, valid.long().cumsum(1) - 1 + (width - count), width)  # invalid ones: a scratch column
    index = torch.zeros(rows, width + 1, dtype=torch.long, device=valid.device)
    index.scatter_(1, dest, torch.arange(cols, device=valid.device).expand(rows, cols))
    return index[:, :width], torch.arange(width, device=valid.device) >= width - count


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, heads, W, d] with columns picked per row by index [B, width]."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


class SlotCache:
    """K/V of up to `rows` running rows; `n` rows in use, the next decode step writes column `w`."""

    def __init__(self, model, rows: int, limit: int, columns: int = COLUMNS):
        self.model, self.rows, self.limit = model, rows, limit
        self.spec, self.dtype = kv_spec(model), model_dtype(model)
        self.n = self.w = 0
        self.columns = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(rows, 0, dtype=torch.bool, device=model.device)
        self._grow(min(columns, limit))

    def _grow(self, columns: int) -> None:
        """A new StaticCache of `columns` columns (its layers' full tensors are the slot buffers); rows in use move
        over."""
        spec, device = self.spec, self.model.device
        cache = StaticCache(config=self.model.config, max_cache_len=columns)
        if any(layer.is_sliding for layer in cache.layers):
            raise ValueError("the server's running batch does not support sliding-window attention layers")
        empty = torch.zeros(self.rows, spec.num_kv_heads, 1, spec.head_dim, dtype=self.dtype, device=device)
        keys, values = [], []
        for i, layer in enumerate(cache.layers):
            layer.lazy_initialization(empty, empty)
            keys.append(layer.keys)
            values.append(layer.values)
            if self.keys:
                layer.keys[:self.n, :, :self.w] = self.keys[i][:self.n, :, :self.w]
                layer.values[:self.n, :, :self.w] = self.values[i][:self.n, :, :self.w]
        valid = torch.zeros(self.rows, columns, dtype=torch.bool, device=device)
        valid[:, :self.w] = self.valid[:, :self.w]
        self.cache, self.keys, self.values, self.valid, self.columns = cache, keys, values, valid, columns

    def _pack(self) -> None:
        """Move each row's valid columns to the right end of as few columns as the fullest row needs."""
        n, w = self.n, self.w
        width = int(self.valid[:n, :w].sum(1).max()) if n else 0
        index, placed = right_aligned(self.valid[:n, :w], width)
        for k, v in zip(self.keys, self.values):
            k[:n, :, :width] = _gather(k[:n, :, :w], index)
            v[:n, :, :width] = _gather(v[:n, :, :w], index)
        self.valid[:n] = False
        self.valid[:n, :width] = placed
        self.w = width

    def _fit(self, need: int) -> None:
        """Make `need` <= w < capacity: pack when w reached the capacity, grow when packing left under a quarter
        free."""
        if max(self.w, need) < self.columns:
            self.w = max(self.w, need)
            return
        self._pack()
        w = max(self.w, need)
        if self.columns - w < max(self.columns // 4, 1):
            columns = min(max(2 * self.columns, -(-(w + 1) // COLUMNS) * COLUMNS), self.limit)
            if columns <= w:
                raise ValueError(f"a row needs {w + 1} cache columns; the limit is {self.limit}")
            self._grow(columns)  # (moves the packed columns, w of them)
        self.w = w

    def add(self, cache, valid: torch.Tensor) -> None:
        """New rows (slots n, n+1, ...) from a prefilled cache `cache` (its layers' keys [k, heads, W, d]) and their
        valid columns [k, W], right-aligned so that their next token goes to column w."""
        k = valid.shape[0]
        if self.n + k > self.rows:
            raise ValueError(f"{k} rows do not fit: {self.n} of {self.rows} slots are in use")
        width = int(valid.sum(1).max())
        self._fit(width)
        index, placed = right_aligned(valid, width)
        at, cols = slice(self.n, self.n + k), slice(self.w - width, self.w)
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            keys[at, :, cols] = _gather(layer.keys, index)
            values[at, :, cols] = _gather(layer.values, index)
        self.valid[at] = False
        self.valid[at, cols] = placed
        self.n += k

    def remove(self, slots: list[int]) -> list[int]:
        """Free `slots`; the last rows move into the holes. Returns the old slot of each row now in slots 0..n-1."""
        gone = set(slots)
        n = self.n - len(gone)
        holes = [i for i in range(n) if i in gone]
        tail = [i for i in range(n, self.n) if i not in gone]
        order = list(range(n))
        for h, t in zip(holes, tail):
            order[h] = t
        if holes:
            dst, src = (torch.tensor(x, device=self.valid.device) for x in (holes, tail))
            for x in (*self.keys, *self.values):
                x[dst, :, :self.w] = x[src, :, :self.w]
            self.valid[dst] = self.valid[src]
        self.n = n
        if n == 0:
            self.w = 0
        return order

    def step(self) -> tuple[StaticCache, torch.Tensor]:
        """The cache and the additive attention mask [n, 1, 1, w + 1] for one decode step of the n rows, which
        writes their tokens' K/V at column w; then w moves on."""
        self._fit(0)
        n, w = self.n, self.w
        self.valid[:n, w] = True
        for layer, keys, values in zip(self.cache.layers, self.keys, self.values):
            layer.keys, layer.values = keys[:n, :, :w + 1], values[:n, :, :w + 1]  # views: writes land in the slots
            layer.cumulative_length.fill_(w)
        self.w += 1
        return self.cache, decode_mask(self.valid[:n, :w + 1], w, self.dtype)
