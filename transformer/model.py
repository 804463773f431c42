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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transformer.attention import Attention, attention_index, flex_block_mask, window_rows_index
from transformer.cache import KVCache, ring_layout
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


def position_index(n: int, trained: int, device: torch.device) -> Tensor:
    """Embedding row of each of n grid rows (or columns) for a model trained on `trained` of them.

    Up to the trained size: the identity. Beyond (window models on larger grids): the official high-resolution
    sampler's rule, the position inside a trained-size frame slid to centre on the row and clamped to the
    grid: the first and last trained//2 rows keep their border embeddings (top/bottom edge statistics), the
    rows between take the centre row's. Unlike interpolation it uses only embeddings seen in training.
    """
    i = torch.arange(n, device=device)
    return i - (i - trained // 2).clamp(max=n - trained).clamp(min=0)


class Block(nn.Module):
    """Pre-LN transformer block with a GELU MLP x4."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.dropout))

    def forward(self, x: Tensor, cache: KVCache | None = None, **attn) -> Tensor:
        x = x + self.attn(self.ln1(x), cache, **attn)
        return x + self.mlp(self.ln2(x))

    def decode_params(self) -> tuple[Tensor, ...]:
        """The parameters `decode_block` reads, in its order: references, not copies (training and load_state_dict
        update them in place)."""
        a, (fc1, _, fc2, _) = self.attn, self.mlp
        return (self.ln1.weight, self.ln1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                self.ln2.weight, self.ln2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def decode_block(x: Tensor, params: tuple[Tensor, ...], n_head: int, cache: KVCache, slot: int | Tensor,
                 window: slice | Tensor, bias: Tensor) -> Tensor:
    """Block.forward (in eval mode) for one token x (B, C) against the cache, as functional calls on the block's
    `decode_params`: at one row a step, module calls and their attribute lookups took ~15% of a CPU decode step.

    The token's key/value go into `slot`; the query attends to the cache's `window` slots (a slice: views; an
    index tensor: a fixed-size gather, for the compiled step) with scores starting from `bias` (B*h, 1, L), the
    relative bias + mask. Two batched matmuls over the B*h cache rows read keys and values in place: on CPU
    faster than SDPA's fused kernel for a single query."""
    ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b = params
    B, C = x.shape
    hd = C // n_head
    qkv = F.linear(F.layer_norm(x, (C,), ln1_w, ln1_b), qkv_w, qkv_b).view(B, 3, n_head, hd)
    cache.write(slot, qkv[:, 1:].transpose(0, 1))
    k_t, v = cache.read(window)
    att = torch.baddbmm(bias, qkv[:, 0].reshape(B * n_head, 1, hd), k_t, alpha=hd ** -0.5).softmax(-1)
    x = x + F.linear(torch.bmm(att, v).view(B, C), proj_w, proj_b)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (C,), ln2_w, ln2_b), fc1_w, fc1_b)), fc2_w, fc2_b)


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
        # training a window model: FlexAttention (flex None: on CUDA) or else the block-sparse windowed_attention;
        # block_sparse False: the dense masked reference
        self.block_sparse, self.flex = True, None
        self._index_cache: dict[tuple, Any] = {}  # see _built_once
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

    def positions(self, grid: tuple[int, int]) -> Tensor | None:
        """Position embedding (H*W, C) of every code of `grid` in raster order (None for pos_emb="none")."""
        if self.row_emb is None:
            return None
        (H, W), (Ht, Wt), dev = grid, self.config.grid_shape, self.row_emb.weight.device
        rows, cols = self.row_emb(position_index(H, Ht, dev)), self.col_emb(position_index(W, Wt, dev))
        return (rows[:, None] + cols[None]).view(H * W, -1)

    def _built_once(self, build, *args):
        """build(*args), an attention index, kept for the next calls (built outside inference mode: those built
        while sampling serve training too)."""
        if (build, *args) not in self._index_cache:
            with torch.inference_mode(False):
                self._index_cache[(build, *args)] = build(*args)
        return self._index_cache[(build, *args)]

    def _run(self, tokens: Tensor, grid: tuple[int, int], caches: list[KVCache] | None = None) -> Tensor:
        B, T = tokens.shape
        if not 1 <= T <= 1 + grid[0] * grid[1]:
            raise ValueError(f"sequence length {T} does not fit grid {grid} (1 <= T <= 1 + H*W)")
        x = self.tok_emb(tokens)
        pos = self.positions(grid)
        if pos is not None:  # the prefix is not a code: no position
            x = torch.cat([x[:, :1], x[:, 1:] + pos[:T - 1]], 1)
        x = self.drop(x)
        rows = -(-(T - 1) // grid[1])  # grid rows the codes reach
        w, dev, attn = self.config.window, x.device, {}
        if caches is None and self.block_sparse and self.config.window_size and w < rows:
            flex = self.flex if self.flex is not None else x.is_cuda
            if flex and not (self.training and self.config.dropout):  # FlexAttention has no dropout
                attn["index"], attn["block_mask"] = self._built_once(flex_block_mask, grid, w, T, dev)
            else:  # block-sparse: pad to whole rows (the padding is in every real query's future, so invisible)
                attn["grid"] = (rows, grid[1])
                attn["index"] = self._built_once(window_rows_index, attn["grid"], w, dev)
                x = F.pad(x, (0, 0, 0, 1 + rows * grid[1] - T))
        elif self.config.rel_bias or self.config.window_size:  # else plain causal attention
            attn["index"] = self._built_once(attention_index, grid, w, dev)[:T, :T]
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None, **attn)
        return self.ln_f(x[:, :T])

    def forward(self, tokens: Tensor, grid_shape: tuple[int, int] | None = None) -> Tensor:
        """Logits (B, T, K) over the codes for tokens (B, T) = [prefix, codes...] with T <= 1 + H*W."""
        return self.head(self._run(tokens, self.check_grid(grid_shape)))

    # ---- decoding, gpt-fast style: setup_cache once, prefill the prompt, then decode_step per token ----

    @torch.no_grad()
    def setup_cache(self, batch_size: int, grid_shape: tuple[int, int] | None = None, compile: bool = False) -> None:
        """Allocate the static KV caches (in the weights' dtype and device) for generating `grid_shape`, and
        precompute for every position the ring slot it writes, the slots it reads and their bias + mask. Call it
        again after the weights change. compile (CUDA only): torch.compile the decode step with
        mode="reduce-overhead" (CUDA graphs: fixed shapes, the caches at fixed addresses)."""
        grid = self.check_grid(grid_shape)
        w = self.config.window
        p = next(self.parameters())
        dev, dtype, hd = p.device, p.dtype, self.config.n_embd // self.config.n_head
        self._cache_grid = grid
        ring = ring_layout(grid, w, dev)
        # positions sharing a bias pattern share a table row: the tables stay small on large grids
        self._pattern_index, pattern_of = torch.unique(ring["index"], dim=0, return_inverse=True)
        # every layer's bias table as rows (layer, head), with a last column of -inf that masked slots index:
        # one index_select per step gathers bias and mask for all layers
        table = (torch.cat([blk.attn.rel_bias for blk in self.blocks]) if self.config.rel_bias else
                 torch.zeros(len(self.blocks) * self.config.n_head, 2 * w * w + 1, device=dev)).to(dtype)
        self._rel_bias = F.pad(table, (0, 1), value=float("-inf"))
        if self._cache_key != (batch_size, grid, dtype, dev):  # reuse the buffers (and any CUDA graph) if we can
            self._cache_key = (batch_size, grid, dtype, dev)
            self._caches = [KVCache(batch_size, self.config.n_head, hd, ring["n_slots"], ring["write"],
                                    ring["prefix_slots"], dtype) for _ in self.blocks]
        self._slot_of_code, self._read_slots = ring["write"], ring["slots"]
        self._steps = list(zip(*(ring[k].tolist() for k in ("write", "start", "length")), pattern_of.tolist()))
        self._positions = self.positions(grid)
        self._block_params = [block.decode_params() for block in self.blocks]
        # CUDA only: on CPU the compiled step measured slower than the eager one (benchmarks/sampling_speed.py)
        self._use_compiled = compile and dev.type == "cuda"
        if self._use_compiled:
            self._compiled = self._compiled or torch.compile(self._decode, mode="reduce-overhead", fullgraph=True)
            for cache in self._caches:  # fixed addresses: CUDA graphs update them in place
                torch._dynamo.mark_static_address(cache.kv)

    def prefill(self, tokens: Tensor) -> Tensor:
        """Run [prefix, context codes...] (B, T) through the full-sequence attention, filling the cache; logits
        (B, K) of the last token."""
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
        """One token (B,) through every block against the caches."""
        x = F.embedding(token, self.tok_emb.weight)
        if pos is not None:
            x = x + pos
        h = self.config.n_head
        for params, cache, b in zip(self._block_params, self._caches, bias):
            x = decode_block(x, params, h, cache, slot, window, b)
        return F.linear(F.layer_norm(x, x.shape[-1:], self.ln_f.weight, self.ln_f.bias), self.head.weight)

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with weight decay on Linear weights only (not biases, norms, embeddings, position biases)."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
        # fused (CUDA and CPU): one kernel, and a non-finite step is skipped on the device (no host read)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
