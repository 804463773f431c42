"""Sampling code grids from a GPT: logits filters, guidance, best-of-K, cached or recomputed decoding."""
from __future__ import annotations

import torch
from torch import Tensor

from .model import GPT

# Sampling defaults, shared by `generate` and the served generator (docs/defaults.md, "Transformer on small data"):
# guidance 5 with top-k 5 (2% of a 256-code book) read as the class asked for 52% of shapes samples vs 45% at the
# earlier cfg 3 / top-k 20, and on the held-out shapes too; neither change alone helped. The top-k grows with the
# codebook past 256 codes (2%), so that a 16384-code tokenizer keeps 328 codes rather than 5; below, it stays 5
# (on the 128-code held-out shapes 3 codes read 51% vs 49% with 5: noise), never greedy decoding.
DEFAULT_TOP_K, DEFAULT_TOP_K_SHARE = 5, 0.02
DEFAULT_CFG_SCALE = 5.0  # conditional models only: guidance contrasts classes


def top_k_for(requested: int | None, codebook_size: int) -> int | None:
    """The top-k to sample with (None: no filter): as requested, 0 meaning all codes, else the default share of
    the codebook, at least DEFAULT_TOP_K (5 up to 256 codes, 20 of 1024, 328 of 16384)."""
    if requested is None:
        return max(DEFAULT_TOP_K, round(DEFAULT_TOP_K_SHARE * codebook_size))
    return requested or None


# --precision of the samplers: the dtype of the weights and the KV cache
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def guidance_scale(requested: float | None, conditional: bool) -> float:
    """The guidance scale to sample with: as requested, else the default for conditional models (1 = off)."""
    if requested is None:
        return DEFAULT_CFG_SCALE if conditional else 1.0
    return requested


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set logits below the k-th largest (per row) to -inf; ties with the k-th value are all kept."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {k!r}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (at least one token).

    Tokens tied with the last kept one are kept too, so the result does not depend on sort order.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p == 1.0:
        return logits
    sorted_logits = logits.sort(dim=-1, descending=True).values
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly ahead of each token
    n_keep = (before < p).sum(dim=-1, keepdim=True)  # >= 1: the first token has nothing ahead
    cutoff = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _sample_token(logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse-CDF draw with uniforms u (B,) in [0, 1): tokens (B,) and their log-probabilities."""
    logp = logits.log_softmax(dim=-1)
    cdf = logp.exp().cumsum(dim=-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    token = token.clamp_(max=logits.shape[-1] - 1)  # u*total rounding up to total
    return token, logp.gather(1, token[:, None]).squeeze(1)


def _sample_chunk(model: GPT, prefix: Tensor, context: Tensor, u: Tensor, grid: tuple[int, int],
                  cfg_scale: float | None, temperature: float, top_k: int | None, top_p: float | None,
                  use_cache: bool, compile: bool) -> tuple[Tensor, Tensor]:
    """Complete B sequences [prefix, context, ...] (one row per candidate); codes (B, H*W), log-prob (B,)."""
    H, W = grid
    B, n_ctx = context.shape
    sos = model.config.sos_id
    if cfg_scale is not None:  # conditional rows, then the same rows with the null (SOS) prefix
        prefix = torch.cat([prefix, torch.full_like(prefix, sos)])
        context = context.repeat(2, 1)
    seq = torch.empty(prefix.shape[0], 1 + H * W, dtype=torch.long, device=prefix.device)
    seq[:, 0], seq[:, 1:1 + n_ctx] = prefix, context
    logp_total = torch.zeros(B, dtype=torch.float64, device=prefix.device)
    if use_cache:
        model.setup_cache(seq.shape[0], grid, compile=compile)
        logits = model.prefill(seq[:, :1 + n_ctx])
    for t in range(n_ctx, H * W):  # t: raster index of the code drawn now (sequence index 1 + t)
        if not use_cache:
            logits = model(seq[:, :1 + t], grid)[:, -1]  # reference path: rerun the whole prefix
        elif t > n_ctx:
            logits = model.decode_step(seq[:, t], t - 1)
        logits = logits.double()
        if cfg_scale is not None:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        if temperature != 1.0:  # dividing by 1 is exact: skip the op
            logits = logits / temperature
        if top_k is not None:
            logits = top_k_filter(logits, top_k)
        if top_p is not None:
            logits = top_p_filter(logits, top_p)
        token, logp = _sample_token(logits, u[:, t - n_ctx])
        seq[:, 1 + t] = token if cfg_scale is None else token.repeat(2)
        logp_total += logp
    return seq[:B, 1:], logp_total


@torch.inference_mode()
def generate(model: GPT, num_samples: int, grid_shape: tuple[int, int] | None = None,
             labels: Tensor | None = None, cfg_scale: float = 1.0, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             context: Tensor | None = None, best_of: int = 1, batch_size: int = 64,
             use_cache: bool = True, compile: bool = False) -> tuple[Tensor, Tensor]:
    """Sample `num_samples` code grids; returns codes (n, H, W) and each grid's total log-probability (n,).

    labels (n,): class per sample (None: the SOS/null prefix). cfg_scale != 1 with labels: classifier-free
    guidance, logits u + s*(c - u). context (n, r, W): fixed top rows to complete. best_of: draw that many
    candidates per sample and keep the one with the highest total log-probability of its drawn tokens
    under the distribution actually sampled from (guided, tempered, top-k/top-p filtered); that total is
    what is returned. Draws are inverse-CDF with uniforms from a CPU generator seeded with `seed`, drawn
    up front, so the cached and recomputed paths (and any batch_size) give the same samples up to floating-point
    rounding, and one seed gives bit-identical samples in every process on one machine. Sampling runs in the
    model's dtype (weights and KV cache; `model.to(torch.bfloat16)` for bf16 decoding); the logits are filtered
    and drawn from in float64.
    """
    cfg = model.config
    grid = model.check_grid(grid_shape)
    H, W = grid
    device = next(model.parameters()).device
    if num_samples < 1 or best_of < 1 or batch_size < 1:
        raise ValueError("num_samples, best_of and batch_size must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None:  # the filters validate their arguments: fail before any work
        top_k_filter(torch.zeros(1, 1), top_k)
    if top_p is not None:
        top_p_filter(torch.zeros(1, 1), top_p)
    if labels is None:
        if cfg_scale != 1.0:
            raise ValueError("cfg_scale != 1 needs labels (guidance contrasts a class with the null prefix)")
        prefix = torch.full((num_samples,), cfg.sos_id, dtype=torch.long)
    else:
        if cfg.num_classes == 0:
            raise ValueError("labels given to an unconditional model")
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.numel() not in (1, num_samples):
            raise ValueError(f"labels must hold 1 or num_samples={num_samples} classes, got {labels.numel()}")
        labels = labels.reshape(-1).expand(num_samples)
        prefix = cfg.class_token(labels)
    if context is None:
        context = torch.zeros(num_samples, 0, W, dtype=torch.long)
    if context.dim() != 3 or context.shape[0] not in (1, num_samples) or context.shape[2] != W or context.shape[1] > H:
        raise ValueError(f"context must be ({num_samples} or 1, r <= {H}, {W}) codes, got {tuple(context.shape)}")
    context = context.to(dtype=torch.long, device="cpu").expand(num_samples, -1, -1)
    if context.numel() and not 0 <= int(context.min()) <= int(context.max()) < cfg.codebook_size:
        raise ValueError(f"context codes must lie in [0, {cfg.codebook_size})")
    n_ctx = context.shape[1] * W
    rows = num_samples * best_of  # candidates of sample s are rows s*best_of ... s*best_of + best_of-1
    prefix = prefix.repeat_interleave(best_of).to(device)
    context = context.flatten(1).repeat_interleave(best_of, 0).to(device)
    u = torch.rand(rows, H * W - n_ctx, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    guide = cfg_scale if labels is not None and cfg_scale != 1.0 else None

    was_training = model.training
    model.eval()
    codes, logp = [], []
    try:
        for lo in range(0, rows, batch_size):
            sl = slice(lo, lo + batch_size)
            c, lp = _sample_chunk(model, prefix[sl], context[sl], u[sl], grid, guide, temperature, top_k, top_p,
                                  use_cache, compile)
            codes.append(c)
            logp.append(lp)
    finally:
        model.train(was_training)
    codes, logp = torch.cat(codes).view(num_samples, best_of, H, W), torch.cat(logp).view(num_samples, best_of)
    best = logp.argmax(dim=1)
    pick = torch.arange(num_samples, device=device)
    return codes[pick, best], logp[pick, best]
