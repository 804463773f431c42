"""GPT over VQGAN code grids: 2-D windowed causal attention with a learned relative-position bias,
and a key/value cache whose memory and per-token cost are bounded by the window.

Sequence = [prefix] + the H*W codes in raster order, token ids as laid out by `transformer.vocab.TokenLayout`
(which GPTConfig mixes in); the head predicts only the K codes.
There is no absolute position embedding: keys and values do not depend on where a token sits, so a
window model can generate grids larger than its training grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transformer.vocab import TokenLayout


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

    def __post_init__(self) -> None:
        self.grid_shape = tuple(int(s) for s in self.grid_shape)  # checkpoints round-trip it as a list
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {self.grid_shape}")
        if self.codebook_size < 1 or self.num_classes < 0 or self.window_size < 0:
            raise ValueError("codebook_size must be >= 1, num_classes and window_size >= 0")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

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


def _additive(visible: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


class KVCache:
    """One layer's keys/values: the prefix (B, h, 1, hd) and a ring of the last R code rows (B, h, R*Wg, hd).

    Grid row i lives in ring row i % R; GPT.setup_cache orders the R x Wg slots so that what one decode
    step may see is a single contiguous range of them (a view: decoding copies nothing).
    """

    def __init__(self, batch: int, n_head: int, head_dim: int, slots: int, slot_of_code: Tensor,
                 dtype: torch.dtype) -> None:
        self.slot_of_code = slot_of_code  # (H*W,) ring slot each raster position writes
        device = slot_of_code.device
        self.k_prefix = torch.zeros(batch, n_head, 1, head_dim, device=device, dtype=dtype)
        self.v_prefix = torch.zeros_like(self.k_prefix)
        self.k = torch.zeros(batch, n_head, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def fill(self, k: Tensor, v: Tensor) -> None:
        """Store a prefill's keys/values (B, h, T, hd): the prefix, then the codes still inside the ring."""
        self.k_prefix.copy_(k[:, :, :1])
        self.v_prefix.copy_(v[:, :, :1])
        first = max(0, k.shape[2] - 1 - self.k.shape[2])  # older codes are out of every later window
        slot = self.slot_of_code[first:k.shape[2] - 1]  # consecutive codes land in distinct slots
        self.k.index_copy_(2, slot, k[:, :, 1 + first:])
        self.v.index_copy_(2, slot, v[:, :, 1 + first:])


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)
        w = config.window
        # per-head bias: columns di*2w + dj + w for code keys, last column for the prefix key
        self.rel_bias = nn.Parameter(torch.zeros(config.n_head, 2 * w * w + 1))

    def forward(self, x: Tensor, index: Tensor, mask: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            cache.fill(k, v)
        bias = self.rel_bias[:, index].to(q.dtype) + mask  # the gather keeps the table differentiable
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    def decode(self, x: Tensor, cache: KVCache, slot: int | Tensor, window: slice | Tensor, index: Tensor,
               mask: Tensor) -> Tensor:
        """One token (B, C): write its K/V into ring slot `slot`, attend to the prefix + the ring's `window` slots.

        Eager decoding passes an int and a slice (a view, no copy); the compiled decoder passes index tensors
        (a gather of fixed size, so shapes never change).
        """
        B = x.shape[0]
        q, k, v = self.qkv(x).view(B, 3, self.n_head, self.head_dim).unbind(1)
        cache.k[:, :, slot] = k
        cache.v[:, :, slot] = v
        keys, values = cache.k[:, :, window], cache.v[:, :, window]
        q = q.unsqueeze(2) * (1.0 / math.sqrt(self.head_dim))
        att = torch.cat([q @ cache.k_prefix.mT, q @ keys.mT], dim=-1) + (self.rel_bias[:, index] + mask)[:, None]
        att = att.softmax(dim=-1)
        y = att[..., :1] @ cache.v_prefix + att[..., 1:] @ values  # (B, h, 1, hd)
        return self.proj(y.view(B, -1))


class Block(nn.Module):
    """Pre-LN transformer block with a GELU MLP x4."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.dropout))

    def forward(self, x: Tensor, index: Tensor, mask: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), index, mask, cache)
        return x + self.mlp(self.ln2(x))

    def decode(self, x: Tensor, cache: KVCache, *args) -> Tensor:
        x = x + self.attn.decode(self.ln1(x), cache, *args)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.codebook_size, bias=False)  # codes only
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        self._index_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._caches: list[KVCache] | None = None
        self._cache_key: tuple | None = None
        self._compiled = None  # torch.compile'd _decode, built on first use

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

    def _attention_index(self, grid: tuple[int, int], device: torch.device,
                         dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Bias columns and additive mask of the whole sequence, built once per (grid, device, dtype)."""
        key = (grid, device, dtype)
        if key not in self._index_cache:
            index, visible = attention_index(grid, self.config.window, device)
            self._index_cache[key] = index, _additive(visible, dtype)
        return self._index_cache[key]

    def _run(self, tokens: Tensor, grid: tuple[int, int], caches: list[KVCache] | None = None) -> Tensor:
        T = tokens.shape[1]
        if not 1 <= T <= 1 + grid[0] * grid[1]:
            raise ValueError(f"sequence length {T} does not fit grid {grid} (1 <= T <= 1 + H*W)")
        x = self.drop(self.tok_emb(tokens))
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        index, mask = self._attention_index(grid, tokens.device, dtype)
        index, mask = index[:T, :T], mask[:T, :T]
        for i, block in enumerate(self.blocks):
            x = block(x, index, mask, caches[i] if caches else None)
        return self.ln_f(x)

    def forward(self, tokens: Tensor, grid_shape: tuple[int, int] | None = None) -> Tensor:
        """Logits (B, T, K) over the codes for tokens (B, T) = [prefix, codes...] with T <= 1 + H*W."""
        return self.head(self._run(tokens, self.check_grid(grid_shape)))

    # ---- key/value cache: setup_cache, then prefill, then decode_step per token ----

    def setup_cache(self, batch_size: int, grid_shape: tuple[int, int] | None = None, compile: bool = False) -> None:
        """Allocate the caches for generating `grid_shape` and precompute, for every position, the ring slot it
        writes, the slots it reads and their bias columns. compile (CUDA only): torch.compile the decode step."""
        grid = self.check_grid(grid_shape)
        H, W = grid
        w = self.config.window
        rows, cols = min(w, H), min(2 * w, W)  # ring rows; columns a decode step can see
        p = next(self.parameters())
        dev, hd = p.device, self.config.n_embd // self.config.n_head
        self._cache_grid = grid
        # Slot order: if the window is narrower than the grid, column-major, so the window's columns are one
        # run of slots; otherwise row-major, where the slots written so far are a run too (full attention
        # reads only those).
        n = torch.arange(H * W, device=dev)
        i, j = n // W, n % W
        if cols < W:
            write = j * rows + i % rows
            start = (j - w).clamp(0, W - cols) * rows
            length = torch.full_like(n, cols * rows)
        else:
            write, start, length = (i % rows) * W + j, torch.zeros_like(n), (n + 1).clamp(max=rows * W)
        slots = start[:, None] + torch.arange(cols * rows, device=dev)  # (HW, L): read window, fixed size L
        slot_row, slot_col = (slots % rows, slots // rows) if cols < W else (slots // W, slots % W)
        # each slot holds the latest grid row <= i with its residue mod R; stale slots (rows < 0, the current
        # row's future columns, or beyond `length`) are invisible
        i, j = i[:, None], j[:, None]
        held = i - (i - slot_row) % rows
        index, visible = relative_index(i, j, held, slot_col, w)
        visible &= (held >= 0) & (torch.arange(cols * rows, device=dev) < length[:, None])
        if self._cache_key != (batch_size, grid, p.dtype, dev):  # reuse the buffers (and any CUDA graph) if we can
            self._cache_key = (batch_size, grid, p.dtype, dev)
            self._caches = [KVCache(batch_size, self.config.n_head, hd, rows * W, write, p.dtype) for _ in self.blocks]
        self._slot_of_code, self._read_slots = write, slots
        self._decode_index = torch.cat([torch.full((H * W, 1), 2 * w * w, device=dev), index], 1)  # prefix first
        self._decode_mask = _additive(torch.cat([torch.ones_like(visible[:, :1]), visible], 1), p.dtype)
        self._eager_steps = list(zip(write.tolist(), start.tolist(), length.tolist()))
        self._use_compiled = compile and dev.type == "cuda"
        if self._use_compiled and self._compiled is None:
            self._compiled = torch.compile(self._decode, mode="reduce-overhead", fullgraph=True)
        if self._use_compiled:
            for cache in self._caches:  # fixed addresses: CUDA graphs update them in place
                for t in (cache.k, cache.v, cache.k_prefix, cache.v_prefix):
                    torch._dynamo.mark_static_address(t)

    def prefill(self, tokens: Tensor) -> Tensor:
        """Run [prefix, context codes...] (B, T), filling the cache; logits (B, K) of the last token."""
        if self._caches is None:
            raise RuntimeError("call setup_cache() before prefill()")
        return self.head(self._run(tokens, self._cache_grid, self._caches)[:, -1])

    def decode_step(self, token: Tensor, position: int) -> Tensor:
        """Feed the code `token` (B,) at raster position `position` of the grid; logits (B, K) for the next code."""
        if self._use_compiled:  # static shapes: the whole fixed-size window, indexed by tensors
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
            return self._compiled(token, self._slot_of_code[position], self._read_slots[position],
                                  self._decode_index[position], self._decode_mask[position])
        slot, start, length = self._eager_steps[position]
        return self._decode(token, slot, slice(start, start + length), self._decode_index[position, :1 + length],
                            self._decode_mask[position, :1 + length])

    def _decode(self, token: Tensor, slot: int | Tensor, window: slice | Tensor, index: Tensor, mask: Tensor) -> Tensor:
        x = self.tok_emb(token)
        for block, cache in zip(self.blocks, self._caches):
            x = block.decode(x, cache, slot, window, index, mask)
        return self.head(self.ln_f(x))

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with weight decay on Linear weights only (not biases, norms, embeddings, position biases)."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
