"""The decode-time key/value cache: a static, preallocated ring of the last window rows of codes (plus prefix
copies), laid out so that what one decode step may see is one contiguous run of slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from transformer.attention import relative_index


class KVCache:
    """One layer's keys and values, kv (2, B, h, S, hd): a ring of the last R code rows plus prefix copies.

    Grid row i lives in ring row i % R; GPT.setup_cache orders the slots (and puts copies of the prefix among
    them) so that what one decode step may see, prefix included, is a single contiguous range: a view, read by
    one batched matmul per product (keys and values each (B*h, S, hd) with no copy), with nothing gathered.
    """

    def __init__(self, batch: int, n_head: int, head_dim: int, slots: int, slot_of_code: Tensor,
                 prefix_slots: Tensor, dtype: torch.dtype) -> None:
        self.slot_of_code, self.prefix_slots = slot_of_code, prefix_slots  # (H*W,), (P,)
        self.code_slots = slots - prefix_slots.numel()
        self.kv = torch.zeros(2, batch, n_head, slots, head_dim, device=slot_of_code.device, dtype=dtype)
        self._views: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self._slots = self.kv.unbind(3)  # one view (2, B, h, hd) per slot: a write is one copy

    def write(self, slot: int | Tensor, kv: Tensor) -> None:
        """Store one step's keys and values (2, B, h, hd) in `slot` (an index tensor: the compiled step)."""
        if isinstance(slot, int):
            self._slots[slot].copy_(kv)
        else:
            self.kv[:, :, :, slot] = kv

    def read(self, window: slice | Tensor) -> tuple[Tensor, Tensor]:
        """Keys, transposed, (B*h, hd, L) and values (B*h, L, hd) of the slots `window`: for a slice, views of
        the cache (made once per slice: the decode loop asks for the same few again and again); for an index
        tensor (the fixed-shape compiled step), a gather."""
        if isinstance(window, slice):
            key = (window.start, window.stop)
            if key not in self._views:
                k, v = self.kv[:, :, :, window].flatten(1, 2).unbind()
                self._views[key] = k.mT, v
            return self._views[key]
        k, v = self.kv[:, :, :, window].flatten(1, 2).unbind()
        return k.mT, v

    def fill(self, k: Tensor, v: Tensor) -> None:
        """Store a prefill's keys/values (B, h, T, hd): the prefix, then the codes still inside the ring."""
        self.kv[:, :, :, self.prefix_slots] = torch.stack((k[:, :, :1], v[:, :, :1]))
        first = max(0, k.shape[2] - 1 - self.code_slots)  # older codes are out of every later window
        slot = self.slot_of_code[first:k.shape[2] - 1]  # consecutive codes land in distinct slots
        self.kv[:, :, :, slot] = torch.stack((k[:, :, 1 + first:], v[:, :, 1 + first:]))


def ring_layout(grid: tuple[int, int], w: int, device: torch.device) -> dict[str, Tensor]:
    """Where every raster position n of `grid` writes and what it reads, for a window-w model:
    write (HW,) its slot; start/length (HW,) the run of slots it may see; slots (HW, L) that run padded to the
    longest (the fixed-shape compiled step reads all L); index (HW, L) the bias-table column of each slot read
    (relative_index's, masked where invisible); n_slots and prefix_slots (P,) the cache's size and its prefix
    copies.

    Slot order: if the window is narrower than the grid, column-major with a copy of the prefix heading each
    column, so the window's columns (and a prefix) are one run of slots; otherwise the prefix, then a ring of
    min(w, H) rows row-major, where the slots written so far are a run too (full attention reads only those).
    """
    H, W = grid
    rows, cols = min(w, H), min(2 * w, W)  # ring rows; columns a decode step can see
    n = torch.arange(H * W, device=device)
    i, j = n // W, n % W
    if cols < W:
        per = rows + 1
        write, start = j * per + 1 + i % rows, (j - w).clamp(0, W - cols) * per
        length = torch.full_like(n, cols * per)
        n_slots, prefix_slots = W * per, torch.arange(W, device=device) * per
    else:
        write, start = 1 + (i % rows) * W + j, torch.zeros_like(n)
        length = 2 + n.clamp(max=rows * W - 1)  # the prefix and codes 0..n, at most the ring
        n_slots, prefix_slots = 1 + rows * W, torch.zeros(1, dtype=torch.long, device=device)
    L = int(length.max())
    slots = start[:, None] + torch.arange(L, device=device)
    # ring row (-1: a prefix copy) and grid column of each slot
    if cols < W:
        slot_row, slot_col = slots % per - 1, slots // per
    else:
        slot_row, slot_col = (slots - 1).div(W, rounding_mode="floor"), (slots - 1) % W
    # each code slot holds the latest grid row <= i with its residue mod R; stale slots (rows < 0, the current
    # row's future columns, or beyond `length`) are masked; of the prefix copies only the first is visible
    i, j = i[:, None], j[:, None]
    held = i - (i - slot_row) % rows
    index = relative_index(i, j, held, slot_col, w)
    index = torch.where((held >= 0) & (torch.arange(L, device=device) < length[:, None]), index, 2 * w * w + 1)
    prefix = torch.where(slots == start[:, None], 2 * w * w, 2 * w * w + 1)
    index = torch.where(slot_row < 0, prefix, index)
    return dict(write=write, start=start, length=length, slots=slots, index=index, n_slots=n_slots,
                prefix_slots=prefix_slots)
