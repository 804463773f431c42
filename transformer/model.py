"""GPT over VQGAN code grids: 2-D windowed causal attention with a learned relative-position bias, learned
row/column position embeddings, and a key/value cache whose memory and per-token cost are bounded by the window.

Sequence = [prefix] + the H*W codes in raster order, token ids as laid out by `transformer.vocab.TokenLayout`
(which GPTConfig mixes in); the head predicts only the K codes.
Positions: the relative bias tells a token where its keys are; pos_emb="rowcol" adds a learned embedding of
the code's row and column (where in the image it is: borders, centre), as the official model's absolute
embedding does. A window model generating a grid larger than its training grid maps rows/columns with the
official sliding-window rule (see position_index), so it still generates any grid size.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transformer import matmul
from transformer.vocab import TokenLayout

POS_EMB = ("none", "rowcol")


@dataclass
class GPTConfig(TokenLayout):
    codebook_size: int
    num_classes: int  # 0 = unconditional
    grid_shape: tuple[int, int]  # training latent grid (H, W)
    n_layer: int
    n_head: int
    n_embd: int
    window_size: int  # 0 = full causal attention
    dropout: float = 0.0
    # "rowcol": learned row + column embeddings of each code; "none": relative bias only (see from_saved)
    pos_emb: str = "rowcol"
    # learned relative-position bias in attention; without it (and with rowcol embeddings, like the official
    # model) full attention is plain causal attention and runs SDPA's fused flash/efficient kernels
    rel_bias: bool = True

    def __post_init__(self) -> None:
        self.grid_shape = tuple(int(s) for s in self.grid_shape)  # checkpoints round-trip it as a list
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {self.grid_shape}")
        if self.codebook_size < 1 or self.num_classes < 0 or self.window_size < 0:
            raise ValueError("codebook_size must be >= 1, num_classes and window_size >= 0")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos_emb not in POS_EMB:
            raise ValueError(f"pos_emb must be one of {POS_EMB}, got {self.pos_emb!r}")
        if not self.rel_bias and self.pos_emb == "none":
            raise ValueError("a model without the relative bias needs pos_emb='rowcol': it would have no positions")

    @classmethod
    def from_saved(cls, saved: dict) -> "GPTConfig":
        """A config saved with ``dataclasses.asdict``; those saved before position embeddings existed had none."""
        return cls(**{"pos_emb": "none", **saved})

    @property
    def window(self) -> int:
        """Effective window w: full attention is the window rule with w = max(H, W) of the training grid."""
        return self.window_size or max(self.grid_shape)


def relative_index(qi: Tensor, qj: Tensor, ki: Tensor, kj: Tensor, w: int) -> tuple[Tensor, Tensor]:
    """Bias-table column and visibility of code key (ki, kj) for code query (qi, qj); broadcasts.

    Visible: own row, columns j-w..j; the w-1 rows above, columns j-w..j+w-1. The column for a visible
    pair is di*2w + (dj+w) with di = i-i' in [0, w-1], dj = j'-j in [-w, w-1]; column 2w*w is the prefix.
    """
    di, dj = qi - ki, kj - qj
    visible = (dj >= -w) & (((di == 0) & (dj <= 0)) | ((di > 0) & (di < w) & (dj < w)))
    index = di.clamp(0, w - 1) * (2 * w) + dj.clamp(-w, w - 1) + w
    return index, visible


def attention_index(grid_shape: tuple[int, int], w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bias-table columns (T, T) and visibility (T, T) of the whole sequence, T = 1 + H*W."""
    H, W = grid_shape
    n = torch.arange(H * W, device=device)
    i, j = n // W, n % W
    code_index, code_visible = relative_index(i[:, None], j[:, None], i[None], j[None], w)
    T = 1 + H * W
    index = torch.full((T, T), 2 * w * w, device=device)  # column 0 (the prefix key) -> prefix bias
    index[1:, 1:] = code_index
    visible = torch.zeros(T, T, dtype=torch.bool, device=device)
    visible[:, 0] = True  # everyone sees the prefix; the prefix query sees only itself
    visible[1:, 1:] = code_visible
    return index, visible


def window_rows_index(grid_shape: tuple[int, int], w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bias columns (W, w*(1+W)) and visibility (H, W, w*(1+W)) for `windowed_attention`: query (i, j) against
    key (r, c) of the frame of the w grid rows i-w+1..i (r = 0 the oldest), c = 0 being the prefix's copy at the
    head of each frame row and c = 1.. the codes. Only the own row's prefix copy and the rows inside the grid
    are visible."""
    H, W = grid_shape
    j = torch.arange(W, device=device)[:, None]
    r = torch.arange(w, device=device).repeat_interleave(1 + W)[None]
    c = torch.arange(1 + W, device=device).repeat(w)[None]
    index, visible = relative_index(torch.full_like(j, w - 1), j, r, c - 1, w)
    prefix = c == 0
    index = torch.where(prefix, 2 * w * w, index)
    visible = torch.where(prefix, r == w - 1, visible)
    inside = r >= w - 1 - torch.arange(H, device=device)[:, None]  # (H, w*(1+W)): key row i-(w-1)+r >= 0
    return index, visible[None] & inside[:, None]


def windowed_attention(qkv: Tensor, rel_bias: Tensor | None, index: Tensor, mask: Tensor, grid_shape: tuple[int, int],
                       w: int, dropout_p: float = 0.0) -> Tensor:
    """Block-sparse equivalent of the dense masked attention of a window model: qkv (B, 1 + H*W, 3, h, hd), the
    fused projection's output as it comes; returns (B, 1 + H*W, h*hd), ready for the output projection.

    Every grid row's W queries attend to a frame of w*(1+W) keys, the w rows ending at their own, each row
    headed by a copy of the prefix (index (W, w*(1+W)) and additive mask (H, W, w*(1+W)) from
    window_rows_index), instead of all 1 + H*W keys: the work falls by about H/w. The prefix query sees only
    itself, so its output is its own value.
    """
    bias = mask if rel_bias is None else rel_bias[:, index].to(qkv.dtype)[:, None] + mask  # (h, H, W, w*(1+W))
    return _WindowedAttention.apply(qkv, bias, grid_shape, w, dropout_p)


class _WindowedAttention(torch.autograd.Function):
    """windowed_attention's forward and backward, written out: through autograd the same ops took 1.4-1.6x as
    long (benchmarks/gpt_train_speed.py, attention only), in unfold_backward's scatter of the overlapping frames,
    the three separate q/k/v gradients it zero-fills and sums, and copies between layouts. Here q, k and v are
    laid out for the batched matmuls once, their gradients land in one (B, T, 3, h, hd) tensor, and the frames'
    gradients are summed by one strided reduction.

    Keys and values are tables of rows (B*h*H grid rows, each headed by a prefix copy), with w-1 zero rows
    before them; a row's frame is the w table rows ending at its own: an overlapping view that the batched
    matmuls read in place. A frame reaching above the grid reads the previous head's last rows (or the zero
    rows), which the mask hides (and their gradients are exactly zero).
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
        ctx.grid, ctx.w = grid, w
        return out.view(B, T, h * hd)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None, None]:
        q, k_table, v_table, att, noise = ctx.saved_tensors
        (H, W), w = ctx.grid, ctx.w
        n, hd = q.shape[0], q.shape[2]
        B, T, h = grad.shape[0], grad.shape[1], n // (grad.shape[0] * H)
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


def position_index(n: int, trained: int, device: torch.device) -> Tensor:
    """Embedding row of each of n grid rows (or columns) for a model trained on `trained` of them.

    Up to the trained size: the identity. Beyond (window models on larger grids): the official high-resolution
    sampler's rule, the position inside a trained-size frame slid to centre on the row and clamped to the
    grid: the first and last trained//2 rows keep their border embeddings (top/bottom edge statistics), the
    rows between take the centre row's. Unlike interpolation it uses only embeddings seen in training.
    """
    i = torch.arange(n, device=device)
    return i - (i - trained // 2).clamp(max=n - trained).clamp(min=0)


def _additive(visible: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


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


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)
        self.window = config.window
        # per-head bias: columns di*2w + dj + w for code keys, last column for the prefix key
        self.rel_bias = nn.Parameter(torch.zeros(config.n_head, 2 * config.window ** 2 + 1)) if config.rel_bias else None

    def forward(self, x: Tensor, index: Tensor | None, mask: Tensor | None, grid: tuple[int, int] | None = None,
                cache: KVCache | None = None) -> Tensor:
        """Dense masked attention with (T, T) index/mask, or plain causal attention if both are None; or, with
        `grid` (a window model, x covering the whole grid), windowed_attention with window_rows_index's."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        p = self.dropout if self.training else 0.0
        if grid is not None:
            return self.resid_drop(self.proj(windowed_attention(qkv, self.rel_bias, index, mask, grid, self.window, p)))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if cache is not None:
            cache.fill(k, v)
        if mask is None:  # no bias, full attention: the fused causal kernels (flash/efficient on CUDA)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            bias = mask if self.rel_bias is None else self.rel_bias[:, index].to(q.dtype) + mask  # differentiable gather
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], dropout_p=p)  # 4-D: the fused CPU kernel
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-LN transformer block with a GELU MLP x4."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.dropout))

    def forward(self, x: Tensor, *attn_args) -> Tensor:
        x = x + self.attn(self.ln1(x), *attn_args)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        H, W = config.grid_shape
        rowcol = config.pos_emb == "rowcol"
        self.row_emb = nn.Embedding(H, config.n_embd) if rowcol else None
        self.col_emb = nn.Embedding(W, config.n_embd) if rowcol else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.codebook_size, bias=False)  # codes only
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        self.block_sparse = True  # window models: windowed_attention in forward (False: the dense reference)
        self._index_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._caches: list[KVCache] | None = None
        self._cache_key: tuple | None = None
        self._compiled = None  # torch.compile'd _decode, built on first use
        self._weights_version: tuple | None = None  # of the decode step's laid-out weights
        self._linears: dict[tuple, list] = {}  # (backend, batch) -> the decode step's layers and head
        self._backend_of: dict[tuple, str] = {}  # (batch, device, dtype, threads) -> the fastest matmul backend
        self.backends_used: set[str] = set()  # by every setup_cache so far (generate logs them)
        self.backend = "torch"  # of the decode step set up last

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def check_grid(self, grid_shape: tuple[int, int] | None) -> tuple[int, int]:
        """The grid to use (default: the training grid); full attention only knows its training grid."""
        grid = tuple(grid_shape) if grid_shape is not None else self.config.grid_shape
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {grid}")
        if self.config.window_size == 0 and grid != self.config.grid_shape:
            raise ValueError(f"a full-attention model only generates its training grid {self.config.grid_shape}, "
                             f"got {grid}; train with window_size > 0 to generate other grid sizes")
        return grid

    def positions(self, grid: tuple[int, int]) -> Tensor | None:
        """Position embedding (H*W, C) of every code of `grid` in raster order (None for pos_emb="none")."""
        if self.row_emb is None:
            return None
        (H, W), (Ht, Wt), dev = grid, self.config.grid_shape, self.row_emb.weight.device
        rows, cols = self.row_emb(position_index(H, Ht, dev)), self.col_emb(position_index(W, Wt, dev))
        return (rows[:, None] + cols[None]).view(H * W, -1)

    def _attention_index(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype,
                         windowed: bool) -> tuple[Tensor, Tensor]:
        """Bias columns and additive mask for dense attention over the whole sequence, or for windowed_attention;
        built once per (grid, device, dtype)."""
        key = (grid, device, dtype, windowed)
        if key not in self._index_cache:
            build = window_rows_index if windowed else attention_index
            index, visible = build(grid, self.config.window, device)
            self._index_cache[key] = index, _additive(visible, dtype)
        return self._index_cache[key]

    def _run(self, tokens: Tensor, grid: tuple[int, int], caches: list[KVCache] | None = None) -> Tensor:
        B, T = tokens.shape
        if not 1 <= T <= 1 + grid[0] * grid[1]:
            raise ValueError(f"sequence length {T} does not fit grid {grid} (1 <= T <= 1 + H*W)")
        x = self.tok_emb(tokens)
        pos = self.positions(grid)
        if pos is not None:  # the prefix is not a code: no position
            x = torch.cat([x[:, :1], x[:, 1:] + pos[:T - 1]], 1)
        x = self.drop(x)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = -(-(T - 1) // grid[1])  # grid rows the codes reach
        if caches is None and self.block_sparse and self.config.window_size and self.config.window < rows:
            # block-sparse: pad to whole rows (the padding is in every real query's future, so invisible)
            sub = (rows, grid[1])
            x = F.pad(x, (0, 0, 0, 1 + rows * grid[1] - T))
            args = (*self._attention_index(sub, tokens.device, dtype, True), sub)
        elif not self.config.rel_bias and not self.config.window_size:
            args = (None, None, None)  # plain causal attention
        else:
            index, mask = self._attention_index(grid, tokens.device, dtype, False)
            args = (index[:T, :T], mask[:T, :T], None)
        for i, block in enumerate(self.blocks):
            x = block(x, *args, caches[i] if caches else None)
        return self.ln_f(x[:, :T])

    def forward(self, tokens: Tensor, grid_shape: tuple[int, int] | None = None) -> Tensor:
        """Logits (B, T, K) over the codes for tokens (B, T) = [prefix, codes...] with T <= 1 + H*W."""
        return self.head(self._run(tokens, self.check_grid(grid_shape)))

    # ---- key/value cache: setup_cache, then prefill, then decode_step per token ----

    @torch.no_grad()
    def setup_cache(self, batch_size: int, grid_shape: tuple[int, int] | None = None, compile: bool = False,
                    backend: str = "auto") -> None:
        """Allocate the caches for generating `grid_shape` and precompute, for every position, the ring slot it
        writes, the slots it reads and their bias + mask, and the decode weights. Call it again after the weights
        change. compile (CUDA only): torch.compile the decode step into CUDA graphs (fixed shapes). backend: the
        matmul backend of the decode step (transformer/matmul.py), "auto" for the one timed fastest; pin one for
        bit-identical samples across processes (backends round differently, and a timing can pick either of two
        close ones)."""
        grid = self.check_grid(grid_shape)
        H, W = grid
        w = self.config.window
        rows, cols = min(w, H), min(2 * w, W)  # ring rows; columns a decode step can see
        p = next(self.parameters())
        dev, dtype, hd = p.device, p.dtype, self.config.n_embd // self.config.n_head
        self._cache_grid = grid
        n = torch.arange(H * W, device=dev)
        i, j = n // W, n % W
        # Slot order: if the window is narrower than the grid, column-major with a copy of the prefix heading each
        # column, so the window's columns (and a prefix) are one run of slots; otherwise the prefix, then the ring
        # row-major, where the slots written so far are a run too (full attention reads only those).
        if cols < W:
            per = rows + 1
            write, start = j * per + 1 + i % rows, (j - w).clamp(0, W - cols) * per
            length = torch.full_like(n, cols * per)
            n_slots, prefix_slots = W * per, torch.arange(W, device=dev) * per
        else:
            write, start = 1 + (i % rows) * W + j, torch.zeros_like(n)
            length = 2 + n.clamp(max=rows * W - 1)  # the prefix and codes 0..n, at most the ring
            n_slots, prefix_slots = 1 + rows * W, torch.zeros(1, dtype=torch.long, device=dev)
        L = int(length.max())
        slots = start[:, None] + torch.arange(L, device=dev)  # (HW, L): read window, fixed size L
        # ring row (-1: a prefix copy) and grid column of each slot
        slot_row, slot_col = (slots % per - 1, slots // per) if cols < W else ((slots - 1).div(W, rounding_mode="floor"),
                                                                             (slots - 1) % W)
        # each code slot holds the latest grid row <= i with its residue mod R; stale slots (rows < 0, the current
        # row's future columns, or beyond `length`) are invisible; of the prefix copies only the first is visible
        i, j = i[:, None], j[:, None]
        held = i - (i - slot_row) % rows
        index, visible = relative_index(i, j, held, slot_col, w)
        visible &= (held >= 0) & (torch.arange(L, device=dev) < length[:, None])
        is_prefix = slot_row < 0
        index = torch.where(is_prefix, 2 * w * w, index)
        visible = torch.where(is_prefix, slots == start[:, None], visible)
        # positions sharing a bias pattern share a table row: the tables stay small on large grids
        patterns, pattern_of = torch.unique(torch.where(visible, index, -1), dim=0, return_inverse=True)
        # every layer's bias table as rows (layer, head), with a last column of -inf that invisible slots index:
        # one index_select per step gathers bias and mask for all layers
        table = (torch.cat([blk.attn.rel_bias for blk in self.blocks]) if self.config.rel_bias else
                 torch.zeros(len(self.blocks) * self.config.n_head, 2 * w * w + 1, device=dev)).to(dtype)
        self._rel_bias = F.pad(table, (0, 1), value=float("-inf"))
        self._pattern_index = torch.where(patterns >= 0, patterns, table.shape[1])
        if self._cache_key != (batch_size, grid, dtype, dev):  # reuse the buffers (and any CUDA graph) if we can
            self._cache_key = (batch_size, grid, dtype, dev)
            self._caches = [KVCache(batch_size, self.config.n_head, hd, n_slots, write, prefix_slots, dtype)
                            for _ in self.blocks]
        self._slot_of_code, self._read_slots = write, slots
        self._steps = list(zip(write.tolist(), start.tolist(), length.tolist(), pattern_of.tolist()))
        self._positions = self.positions(grid)
        # the matrix products run through the backend timed fastest for this batch (transformer/matmul.py); laying
        # out 25 MB of weights for it takes longer than 5 decode steps, so that is redone only when a weight
        # changed (its version counts in-place updates) or moved
        version = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._weights_version != version:
            self._weights_version, self._linears = version, {}
        # CUDA only: on CPU the compiled step measured slower than this eager one (benchmarks/sampling_speed.py)
        self._use_compiled = compile and dev.type == "cuda"
        self.backend = self._choose_backend(batch_size, backend)
        self.backends_used.add(self.backend)
        self._decode_layers, self._decode_head = self._laid_out(self.backend, batch_size)
        if self._use_compiled and self._compiled is None:
            self._compiled = torch.compile(self._decode, mode="reduce-overhead", fullgraph=True)
        if self._use_compiled:
            for cache in self._caches:  # fixed addresses: CUDA graphs update them in place
                torch._dynamo.mark_static_address(cache.kv)

    def _laid_out(self, backend: str, batch: int) -> tuple[list[tuple], matmul.Linear]:
        """Per block (ln1, qkv, split, proj, ln2, fc, out) with each norm as (weight, bias, eps), each Linear a
        matmul.linear of `backend` and split taking qkv's output to the queries (B*h, 1, hd) and the keys/values
        (2, B, h, hd) (at batch 1, views made once of the buffer qkv writes into); and the head (final norm folded in).
        The last two layouts are kept until a weight changes."""
        # per batch size but for torch's: oneDNN lays the weights out for it, numpy-rows only at batch 1, and the
        # numpy backends write into output buffers of the batch's size
        key = (backend, batch if backend != "torch" else 0)
        if key not in self._linears:
            if len(self._linears) == 2:  # a full chunk's and the last chunk's; more would pile up 25 MB copies
                del self._linears[next(iter(self._linears))]

            def buffer(m: nn.Linear) -> Tensor | None:  # what the numpy backends write m's products into
                return m.weight.new_empty(batch, m.out_features) if backend in matmul.NUMPY else None

            def lin(m: nn.Linear, out: Tensor | None = None) -> matmul.Linear:
                return matmul.linear(backend, m.weight, m.bias, batch, out)

            def buffered(m: nn.Linear) -> matmul.Linear:
                return lin(m, buffer(m))

            def norm(m: nn.LayerNorm) -> tuple:
                return m.weight, m.bias, m.eps
            h, hd = self.config.n_head, self.config.n_embd // self.config.n_head

            def split(q_kv: Tensor) -> tuple[Tensor, Tensor]:  # torch's layout serves every batch size
                q_kv = q_kv.view(q_kv.shape[0], 3, h, hd)
                return q_kv[:, 0].reshape(-1, 1, hd), q_kv[:, 1:].transpose(0, 1)

            def qkv_split(m: nn.Linear) -> tuple[matmul.Linear, Callable]:
                out = buffer(m)
                if out is None or batch > 1:  # several rows: the queries' reshape copies
                    return lin(m, out), split
                views = split(out)  # every product lands in `out`
                return lin(m, out), lambda _: views
            layers = [(norm(b.ln1), *qkv_split(b.attn.qkv), buffered(b.attn.proj), norm(b.ln2), buffered(b.mlp[0]),
                       buffered(b.mlp[2])) for b in self.blocks]
            head, ln_f, C = lin(self.head), norm(self.ln_f), self.config.n_embd  # its logits leave the step: fresh
            self._linears[key] = [layers, lambda x: head(torch.layer_norm(x, (C,), *ln_f))]
        return tuple(self._linears[key])

    def _choose_backend(self, batch: int, requested: str) -> str:
        """The decode step's matmul backend: `requested` if it can run this model (else a ValueError naming those
        that can), or for "auto" the one timed fastest, once per (batch, device, dtype, threads), on this model's
        weights (a model moved to the GPU must not keep a CPU-only choice). Off the CPU (so for the compiled CUDA
        step too) torch's is the only one."""
        p = next(self.parameters())
        if requested != "auto":
            usable = matmul.backends(p.device, p.dtype)
            if requested not in usable:
                raise ValueError(f"the {requested!r} matmul backend cannot run this model ({p.device.type}, "
                                 f"{str(p.dtype).removeprefix('torch.')}): use one of {', '.join(usable)} or auto")
            return requested
        key = (batch, p.device.type, p.dtype, torch.get_num_threads())
        if key not in self._backend_of:
            layers = [(m.weight, m.bias) for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp[0], b.mlp[2])]
            self._backend_of[key] = matmul.fastest(layers, batch)
        return self._backend_of[key]

    def decode_threads(self) -> AbstractContextManager:
        """Context to run decode steps in: numpy's BLAS limited to torch's thread count when the step uses it."""
        return matmul.blas_threads(torch.get_num_threads()) if self.backend in matmul.NUMPY else nullcontext()

    def prefill(self, tokens: Tensor) -> Tensor:
        """Run [prefix, context codes...] (B, T), filling the cache; logits (B, K) of the last token."""
        if self._caches is None:
            raise RuntimeError("call setup_cache() before prefill()")
        return self.head(self._run(tokens, self._cache_grid, self._caches)[:, -1])

    def decode_step(self, token: Tensor, position: int) -> Tensor:
        """Feed the code `token` (B,) at raster position `position` of the grid; logits (B, K) for the next code."""
        slot, start, length, pattern = self._steps[position]
        pos = None if self._positions is None else self._positions[position]
        if self._use_compiled:  # static shapes: the whole fixed-size window, gathered by index tensors
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
            return self._compiled(token, pos, self._slot_of_code[position], self._read_slots[position],
                                  self._decode_bias(pattern, self._pattern_index.shape[1]))
        return self._decode(token, pos, slot, slice(start, start + length), self._decode_bias(pattern, length))

    def _decode_bias(self, pattern: int, length: int) -> Tensor:
        """Every layer's scores before the keys: relative bias + mask over the first `length` slots a step reads,
        (layers, B*h, 1, length), laid out per batch row so each layer's baddbmm adds it as it multiplies."""
        n, B, h = len(self.blocks), self._cache_key[0], self.config.n_head
        bias = self._rel_bias.index_select(1, self._pattern_index[pattern, :length]).view(n, 1, h, 1, length)
        return bias.expand(n, B, h, 1, length).reshape(n, B * h, 1, length)

    def _decode(self, token: Tensor, pos: Tensor | None, slot: int | Tensor, window: slice | Tensor,
                bias: Tensor) -> Tensor:
        """One token through every layer: write its keys/values into ring slot `slot`, attend to the ring's
        `window` slots (a slice: views; an index tensor: a gather of fixed size) with scores starting from
        bias (layers, B*h, 1, L). Attention is two batched matmuls over (B*h) rows of the cache, which read the
        keys and values in place: on CPU 1.6-1.8x faster than SDPA's fused kernel for a single query."""
        x = self.tok_emb(token)
        if pos is not None:
            x = x + pos
        B, C = x.shape
        hd = C // self.config.n_head
        for (ln1, qkv, split, proj, ln2, fc, out), cache, mask in zip(self._decode_layers, self._caches, bias):
            q, kv = split(qkv(torch.layer_norm(x, (C,), *ln1)))
            cache.write(slot, kv)
            k_t, v = cache.read(window)
            att = torch.baddbmm(mask, q, k_t, alpha=hd ** -0.5).softmax(-1)
            x = x + proj(torch.bmm(att, v).view(B, C))
            x = x + out(F.gelu(fc(torch.layer_norm(x, (C,), *ln2))))
        return self._decode_head(x)

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with weight decay on Linear weights only (not biases, norms, embeddings, position biases)."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
