"""Attention of the GPT over code grids: which keys a code sees (the 2-D window rule) and the relative-position
bias it adds, as dense SDPA, as block-sparse frames (CPU training of window models), as FlexAttention (CUDA
training of window models); one decoded token against the KV cache is `transformer.model.decode_block`.

Every (query, key) pair maps to a column of a per-head bias table (h, 2w*w + 1): di*2w + dj + w for code keys,
2w*w for the prefix key, and 2w*w + 1 (one past the table) where the key is not visible: gathering from the table
padded with a -inf column gives bias and mask in one tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

if TYPE_CHECKING:
    from transformer.cache import KVCache
    from transformer.model import GPTConfig


def relative_index(qi: Tensor, qj: Tensor, ki: Tensor, kj: Tensor, w: int) -> Tensor:
    """Bias-table column of code key (ki, kj) for code query (qi, qj), or 2w*w + 1 (masked); broadcasts.

    Visible: own row, columns j-w..j; the w-1 rows above, columns j-w..j+w-1: column di*2w + (dj+w) with
    di = i-i' in [0, w-1], dj = j'-j in [-w, w-1].
    """
    di, dj = qi - ki, kj - qj
    visible = (dj >= -w) & (((di == 0) & (dj <= 0)) | ((di > 0) & (di < w) & (dj < w)))
    return torch.where(visible, di * (2 * w) + dj + w, 2 * w * w + 1)


def attention_index(grid_shape: tuple[int, int], w: int, device: torch.device) -> Tensor:
    """Bias-table columns (T, T) of the whole sequence, T = 1 + H*W: every query sees the prefix, the prefix
    query only it."""
    H, W = grid_shape
    n = torch.arange(H * W, device=device)
    i, j = n // W, n % W
    index = torch.full((1 + H * W, 1 + H * W), 2 * w * w + 1, device=device)
    index[:, 0] = 2 * w * w
    index[1:, 1:] = relative_index(i[:, None], j[:, None], i[None], j[None], w)
    return index


def window_rows_index(grid_shape: tuple[int, int], w: int, device: torch.device) -> Tensor:
    """Bias-table columns (H, W, w*(1+W)) for `windowed_attention`: query (i, j) against key (r, c) of the frame
    of the w grid rows i-w+1..i (r = 0 the oldest), c = 0 being the prefix's copy at the head of each frame row
    and c = 1.. the codes. Only the own row's prefix copy and the rows inside the grid are visible."""
    H, W = grid_shape
    j = torch.arange(W, device=device)[:, None]
    r = torch.arange(w, device=device).repeat_interleave(1 + W)[None]
    c = torch.arange(1 + W, device=device).repeat(w)[None]
    index = relative_index(torch.full_like(j, w - 1), j, r, c - 1, w)
    index = torch.where(c == 0, torch.where(r == w - 1, 2 * w * w, 2 * w * w + 1), index)
    inside = r >= w - 1 - torch.arange(H, device=device)[:, None]  # (H, w*(1+W)): key row i-(w-1)+r >= 0
    return torch.where(inside[:, None], index[None], 2 * w * w + 1)


def gather_bias(table: Tensor, index: Tensor) -> Tensor:
    """Additive scores (rows of `table`, *index.shape): a bias table's columns `index`, -inf where masked."""
    return F.pad(table, (0, 1), value=float("-inf"))[:, index]


class WindowedAttention(torch.autograd.Function):
    """Block-sparse equivalent of the dense masked attention of a window model: qkv (B, 1 + H*W, 3, h, hd), the
    fused projection's output as it comes, and bias (h or 1, H, W, w*(1+W)) gathered with window_rows_index;
    returns (B, 1 + H*W, h*hd), ready for the output projection.

    Every grid row's W queries attend to a frame of w*(1+W) keys, the w rows ending at their own, each row
    headed by a copy of the prefix, instead of all 1 + H*W keys: the work falls by about H/w. The prefix query
    sees only itself, so its output is its own value. Keys and values are tables of rows (B*h*H grid rows), with
    w-1 zero rows before them; a row's frame is the w table rows ending at its own: an overlapping view that the
    batched matmuls read in place. A frame reaching above the grid reads the previous head's last rows (or the
    zero rows), which the mask hides (and their gradients are exactly zero).

    The backward is written out: through autograd the same ops took 1.4-1.6x as long (attention only; a whole
    CPU training step 1.1-1.2x), in unfold_backward's scatter of the overlapping frames, the three separate
    q/k/v gradients it zero-fills and sums, and copies between layouts. Here q, k and v are laid out for the
    batched matmuls once, their gradients land in one (B, T, 3, h, hd) tensor, and the frames' gradients are
    summed by one strided reduction.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, grid: tuple[int, int], w: int, dropout_p: float) -> Tensor:
        B, T, _, h, hd = qkv.shape
        H, W = grid
        n = B * h * H
        q = qkv.new_empty(B, h, H, W, hd).copy_(_by_rows(qkv[:, 1:, 0], grid)).view(n, W, hd).mul_(hd ** -0.5)
        tables = []
        for s in (1, 2):  # keys, values
            table = qkv.new_empty(w - 1 + n, 1 + W, hd)
            table[:w - 1] = 0
            rows = table[w - 1:].view(B, h, H, 1 + W, hd)
            rows[:, :, :, 0] = qkv[:, 0, s, :, None]
            rows[:, :, :, 1:] = _by_rows(qkv[:, 1:, s], grid)
            tables.append(table)
        k, v = (_frames(t, w) for t in tables)
        att = torch.bmm(q, k.mT)
        att.view(B, h, H, W, -1).add_(bias)
        att = att.softmax(-1)  # float32 under CUDA autocast: the casts below are no-ops otherwise
        noise = F.dropout(torch.ones_like(att), dropout_p) if dropout_p else None  # = F.dropout(att)'s draws
        y = torch.bmm((att if noise is None else att * noise).to(v.dtype), v)
        out = qkv.new_empty(B, T, h, hd)
        out[:, 0] = qkv[:, 0, 2]
        _by_rows(out[:, 1:], grid).copy_(y.view(B, h, H, W, hd))
        ctx.save_for_backward(q, *tables, att, noise)
        ctx.grid, ctx.w, ctx.shape = grid, w, qkv.shape
        return out.view(B, T, h * hd)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None, None]:
        q, k_table, v_table, att, noise = ctx.saved_tensors
        (H, W), w, (B, T, _, h, hd) = ctx.grid, ctx.w, ctx.shape
        n = B * h * H
        grad = grad.contiguous().view(B, T, h, hd)  # a loss like .sum() sends a stride-0 one
        dy = _by_rows(grad[:, 1:], ctx.grid).reshape(n, W, hd)
        d_att = torch.bmm(dy, _frames(v_table, w).mT)
        if noise is not None:
            d_att.mul_(noise)
        d_scores = torch._softmax_backward_data(d_att.to(att.dtype), att, -1, att.dtype).to(q.dtype)
        d_bias = d_scores.view(B, h, H, W, -1).sum(0) if ctx.needs_input_grad[1] else None
        d_qkv = grad.new_empty(B, T, 3, h, hd)
        d_qkv[:, 0, 0] = 0  # the prefix query attends to nothing
        d_q = torch.bmm(d_scores, _frames(k_table, w)).mul_(hd ** -0.5)
        _by_rows(d_qkv[:, 1:, 0], ctx.grid).copy_(d_q.view(B, h, H, W, hd))
        dropped = (att if noise is None else att * noise).to(q.dtype)
        for s, (a, b) in ((1, (d_scores.mT, q)), (2, (dropped.mT, dy))):
            rows = _unframe(a, b, w)[w - 1:].view(B, h, H, 1 + W, hd)
            d_qkv[:, 0, s] = rows[:, :, :, 0].sum(2)  # the prefix's copies
            _by_rows(d_qkv[:, 1:, s], ctx.grid).copy_(rows[:, :, :, 1:])
        d_qkv[:, 0, 2] += grad[:, 0]  # the prefix query's output is its value
        return d_qkv, d_bias, None, None, None


windowed_attention = WindowedAttention.apply  # (qkv, bias, grid, w, dropout_p)


def _by_rows(codes: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h, H, W, hd) view of (B, H*W, h, hd) codes in raster order: each head's grid rows."""
    B, _, h, hd = codes.shape
    return codes.view(B, *grid, h, hd).permute(0, 3, 1, 2, 4)


def _frames(table: Tensor, w: int) -> Tensor:
    """(n, w*(1+W), hd) view of a (w-1+n, 1+W, hd) table: frame f is table rows f..f+w-1."""
    rows, width, hd = table.shape
    return table.view(rows, width * hd).unfold(0, w, 1).mT.reshape(rows - w + 1, w * width, hd)


def _unframe(a: Tensor, b: Tensor, w: int) -> Tensor:
    """The gradient (w-1+n, (1+W)*hd) of a table from its frames' gradients bmm(a, b), (n, w*(1+W), hd): each
    table row sums its w frames' blocks. The bmm writes into a buffer padded with w-1 zero frames on both sides,
    where row r's blocks (frame r-o, block o) are equally spaced: one strided sum adds them up."""
    n, L, hd = a.shape[0], a.shape[1], b.shape[2]
    R = L // w * hd
    buf = a.new_empty(n + 2 * (w - 1), L * hd)
    buf[:w - 1] = 0
    buf[n + w - 1:] = 0
    torch.bmm(a, b, out=buf[w - 1:n + w - 1].view(n, L, hd))
    return buf.as_strided((n + w - 1, w, R), (w * R, (w - 1) * R, 1), (w - 1) * R).sum(1)


def flex_block_mask(grid_shape: tuple[int, int], w: int, T: int, device: torch.device) -> tuple[Tensor, BlockMask]:
    """attention_index's first T rows and columns, and their visible pairs as FlexAttention's block mask: only
    the blocks with a visible pair are computed (about H/w of them for a window model)."""
    index = attention_index(grid_shape, w, device)[:T, :T].contiguous()
    return index, create_block_mask(lambda b, h, q, k: index[q, k] <= 2 * w * w, None, None, T, T, device=device)


# compiled on CUDA (FlexAttention's fused kernel; eager it is a dense reference), as is on CPU (tests)
_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


class Attention(nn.Module):
    """Multi-head attention with a per-head learned relative-position bias (the window rule of relative_index)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)
        self.window = w = config.window
        # per-head bias: columns di*2w + dj + w for code keys, 2w*w for the prefix key (relative_index)
        self.rel_bias = nn.Parameter(torch.zeros(config.n_head, 2 * w * w + 1)) if config.rel_bias else None

    def bias(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive scores (h, or 1 without a learned bias, *index.shape) of bias-table columns `index`."""
        table = index.new_zeros(1, 2 * self.window ** 2 + 1, dtype=dtype) if self.rel_bias is None else self.rel_bias
        return gather_bias(table.to(dtype), index)  # differentiable: the bias table gets its gradient

    def _score_mod(self, index: Tensor):
        """FlexAttention's score_mod adding the bias of columns `index` (T, T) (None without a learned bias)."""
        if self.rel_bias is None:
            return None
        table = F.pad(self.rel_bias, (0, 1))  # masked pairs read a zero: the block mask hides them
        return lambda score, b, h, q, k: score + table[h, index[q, k]].to(score.dtype)

    def forward(self, x: Tensor, cache: KVCache | None = None, index: Tensor | None = None,
                grid: tuple[int, int] | None = None, block_mask: BlockMask | None = None) -> Tensor:
        """Dense attention with bias-table columns `index` (T, T) (None: plain causal attention); with
        `block_mask`, the same through FlexAttention; with `grid` (a window model, x covering whole grid rows),
        windowed_attention with window_rows_index's columns."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        p = self.dropout if self.training else 0.0
        if grid is not None:
            y = windowed_attention(qkv, self.bias(index, qkv.dtype), grid, self.window, p)
            return self.resid_drop(self.proj(y))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if cache is not None:
            cache.fill(k, v)
        if block_mask is not None:
            y = _flex(q, k, v, score_mod=self._score_mod(index), block_mask=block_mask)
        elif index is None:  # no bias, full attention: the fused causal kernels (flash/efficient on CUDA)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # an additive float mask in q's dtype: CUDA's memory-efficient kernel takes it (flash takes none)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(index, q.dtype)[None], dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
