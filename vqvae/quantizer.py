"""Quantizers for the tokenizer: a VQ codebook with the usual anti-collapse remedies, and FSQ.

Both map an encoder latent (B, embed_dim, h, w) to a `QuantOut` and track codebook usage. They run in
fp32 with autocast off, because argmin distances and rounding are unreliable in bf16/fp16.

Multi-process: when torch.distributed is initialised, code counts and EMA statistics are all-reduced,
and codebook changes drawn from one process's data (restarts, k-means) are broadcast from rank 0, so
every rank keeps an identical codebook. Training-mode forwards are collective calls: every rank must make
the same number of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vqvae.config import VQModelConfig


@dataclass
class QuantOut:
    z_q: torch.Tensor  # (B, embed_dim, h, w); straight-through: its gradient flows to the encoder output
    loss: torch.Tensor  # scalar quantizer loss (0 for FSQ and when quantization is bypassed)
    indices: torch.Tensor | None  # (B, h, w) long; None when quantization is bypassed
    perplexity: torch.Tensor | None  # scalar, exp(entropy) of this process's batch histogram; None when bypassed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _sample_rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    """k row indices out of n: without replacement when possible."""
    return torch.randperm(n, device=device)[:k] if n >= k else torch.randint(n, (k,), device=device)


def _nearest(x: torch.Tensor, codes: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Index of the nearest code for every row of x; chunked so the (rows, K) matrix stays ~64 MB."""
    chunk = max(1, 2**24 // codes.shape[0])
    out = []
    for xs in x.split(chunk):
        sim = xs @ codes.T
        if cosine:  # rows and codes are unit vectors: nearest = most similar
            out.append(sim.argmax(1))
        else:  # ||x - e||^2 without the ||x||^2 term, which does not change the argmin
            out.append((codes.pow(2).sum(1) - 2 * sim).argmin(1))
    return torch.cat(out)


def entropy_loss(x: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Codebook-entropy loss (MaskGIT; LlamaGen's entropy_loss_ratio) of latents x (N, D) against codes (K, D):
    the mean entropy of each latent's soft assignment p = softmax(-||x - e||^2 / T), minus the entropy of p averaged
    over the N latents, plus log K so that it is never negative (a negative train/q_loss reads as a bug; the
    constant changes no gradient). 0 when every latent sits on one code and the codes are used evenly, at most
    2 log K; its gradient moves the latents only (the codebook follows by its own update), and the batch is this
    process's."""
    codes = codes.detach().clone()  # a copy: an EMA or restart step rewrites the codebook before backward
    logits = (2 * x @ codes.T - x.pow(2).sum(1, keepdim=True) - codes.pow(2).sum(1)) / temperature
    logp = logits.log_softmax(1)
    p = logp.exp()
    mean = p.mean(0)
    return -(p * logp).sum(1).mean() + (mean * mean.clamp_min(1e-12).log()).sum() + math.log(codes.shape[0])


def rotate_onto(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, Algorithm 1): rows of z mapped onto the rows of q by a scaled rotation.

    Returns (||q||/||z||) R z with R the rotation taking z's direction to q's, R = I - 2 r r^T + 2 q^ z^T
    (r = normalised z^ + q^), scale and R treated as constants: the value is q, and the gradient reaching z is
    the incoming gradient rotated back by R^T and scaled, so it carries the angle and magnitude between z and
    its code instead of being copied unchanged (straight-through).
    """
    with torch.no_grad():
        z_norm, q_norm = z.norm(dim=1, keepdim=True).clamp_min(eps), q.norm(dim=1, keepdim=True)
        z_hat, q_hat = z / z_norm, q / q_norm.clamp_min(eps)
        r = F.normalize(z_hat + q_hat, dim=1, eps=eps)
        scale = q_norm / z_norm
    # R z without forming R: z - 2 r (r.z) + 2 q^ (z^.z)
    rz = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q_hat * (z_hat * z).sum(1, keepdim=True)
    return scale * rz


def _kmeans(x: torch.Tensor, k: int, iters: int, spherical: bool) -> torch.Tensor:
    """Lloyd's algorithm from k random rows; empty clusters keep their previous centre."""
    centres = x[_sample_rows(x.shape[0], k, x.device)]
    for _ in range(iters):
        assign = _nearest(x, centres, spherical)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if spherical:
            centres = F.normalize(centres, dim=1)
    return centres


RARE_FACTOR = 16  # a code counts as dead only when idle this many times its expected gap under uniform usage


def scaled_steps(steps: int, codebook_size: int, tokens_per_step: int) -> int:
    """``steps`` raised to at least RARE_FACTOR x the expected gap between two uses of one code when every code is
    used equally often (codebook_size / tokens_per_step steps).

    At 256 codes and 1024 tokens a step every code is expected 4 times a step, and 20 idle steps mean dead. At
    16384 codes the same 1024 tokens use a given code once in 16 steps: a fixed 20-step threshold would restart
    codes that are merely rare, at every step, and a 100-step usage window would undercount them.
    """
    return max(steps, math.ceil(RARE_FACTOR * codebook_size / max(1, tokens_per_step)))


class _UsageTracker(nn.Module):
    """A step counter (optimizer steps) and the last step each code was used.

    A training step is ``forwards_per_step`` training forwards (the trainer sets it to its gradient
    accumulation), so ``restart_after`` and ``usage_window`` count steps, not micro-batches. Everything here
    stays on the device: no host synchronisation per forward.
    """

    def __init__(self, codebook_size: int, usage_window: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.usage_window = usage_window
        self.forwards_per_step = 1
        self.tokens_per_step = 0  # all processes' tokens per optimizer step; set by the first training forward
        self._forwards = 0  # training forwards seen; the checkpointed `step` is what persists
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((codebook_size,), -1, dtype=torch.long))  # -1: never

    def _histogram(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts per code, perplexity) of this batch; a scatter-add, because CUDA's bincount reads the
        largest index back to the host."""
        flat = indices.flatten()
        counts = torch.zeros(self.codebook_size, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float32))
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        return counts, perplexity

    def _starts_step(self) -> bool:
        """Whether the training forward in progress is the first of its step."""
        return self._forwards % self.forwards_per_step == 0

    # Bookkeeping with Python counters (and collectives) stays out of torch.compile graphs: a guard on the
    # forward counter would recompile the model at every step.
    @torch.compiler.disable
    @torch.no_grad()
    def _mark_used(self, global_counts: torch.Tensor, tokens: int) -> None:
        """Record this forward's (all-reduced) code counts; ``tokens``: this process's tokens in the forward."""
        world = dist.get_world_size() if _distributed() else 1
        self.tokens_per_step = tokens * world * self.forwards_per_step
        if self._starts_step():
            self.step += 1
        self._forwards += 1
        self.last_used.copy_(torch.where(global_counts > 0, self.step, self.last_used))

    @property
    def window_steps(self) -> int:
        """The usage window, scaled with the codebook size and the tokens per step (`scaled_steps`)."""
        return scaled_steps(self.usage_window, self.codebook_size, self.tokens_per_step or self.codebook_size)

    def usage(self) -> float:
        """Fraction of codes used within the last `window_steps` training steps (reads the device: log time)."""
        recent = (self.last_used >= 0) & (self.step - self.last_used < self.window_steps)
        return recent.float().mean().item()


class VectorQuantizer(_UsageTracker):
    """Nearest-neighbour codebook lookup (VQ-VAE), optionally low-dimensional, cosine, EMA-updated, with restarts.

    Loss = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2 (beta on the commitment term); with EMA updates the
    codebook term is replaced by the moving averages and only the commitment term remains. Both terms are
    computed in the code space (after the input projection, after l2-normalisation).
    """

    def __init__(self, cfg: VQModelConfig):
        super().__init__(cfg.codebook_size, cfg.usage_window)
        self.embed_dim = cfg.embed_dim
        self.code_dim = cfg.code_dim or cfg.embed_dim
        self.beta = cfg.beta
        self.l2_norm = cfg.l2_norm
        self.ema = cfg.ema
        self.ema_decay = cfg.ema_decay
        self.rotation_trick = cfg.rotation_trick
        self.restart_after = cfg.restart_after
        self.entropy_weight, self.entropy_temperature = cfg.entropy_weight, cfg.entropy_temperature
        # low-dimensional lookup (LlamaGen): codes of size code_dim between 1x1 projections
        low_dim = self.code_dim != cfg.embed_dim
        self.proj_in = nn.Conv2d(cfg.embed_dim, self.code_dim, 1) if low_dim else nn.Identity()
        self.proj_out = nn.Conv2d(self.code_dim, cfg.embed_dim, 1) if low_dim else nn.Identity()
        k = cfg.codebook_size
        # taming's init; with EMA the codebook is a parameter that never takes gradients
        self.codebook = nn.Parameter(torch.empty(k, self.code_dim).uniform_(-1 / k, 1 / k), requires_grad=not cfg.ema)
        # EMA statistics start at count 1 / sum = code, so codes never assigned stay put (with count 0 they'd
        # be divided by ~0 and fly away)
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        # step at which each code was last (re)initialised: restarted codes get a grace period
        # without counting as "used" in usage()
        self.register_buffer("last_reset", torch.zeros(k, dtype=torch.long))

    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup, (K, code_dim)."""
        return F.normalize(self.codebook, dim=1) if self.l2_norm else self.codebook

    def forward(self, z: torch.Tensor) -> QuantOut:
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantOut:
        b, _, h, w = z.shape
        flat = self.proj_in(z).permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        if self.l2_norm:
            flat = F.normalize(flat, dim=1)
        if self.training and self.restart_after > 0:
            self._restart_dead_codes(flat.detach())  # before the lookup, so this batch can use the new codes
        codes = self.codes()
        with torch.no_grad():
            idx = _nearest(flat, codes, self.l2_norm)
        e = F.embedding(idx, codes)
        loss = self.beta * F.mse_loss(flat, e.detach())
        if not self.ema:
            loss = loss + F.mse_loss(e, flat.detach())
        if self.training and self.entropy_weight > 0:
            loss = loss + self.entropy_weight * entropy_loss(flat, codes, self.entropy_temperature)
        counts, perplexity = self._histogram(idx)
        if self.training:
            self._update(flat.detach(), idx, counts)
        z_q = rotate_onto(flat, e) if self.rotation_trick else flat + (e - flat).detach()
        z_q = z_q.view(b, h, w, self.code_dim).permute(0, 3, 1, 2).contiguous()
        return QuantOut(self.proj_out(z_q), loss, idx.view(b, h, w), perplexity)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook step (if enabled) and usage bookkeeping, on statistics summed over processes."""
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
            stats = _all_reduce(torch.cat([counts[:, None], sums], 1))  # one collective for both
            self.ema_count.lerp_(stats[:, 0], 1 - self.ema_decay)
            self.ema_sum.lerp_(stats[:, 1:], 1 - self.ema_decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0
            n, eps = self.ema_count.sum(), 1e-5
            smoothed = (self.ema_count + eps) / (n + self.codebook_size * eps) * n
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
            counts = stats[:, 0]
        else:
            counts = _all_reduce(counts.clone())
        self._mark_used(counts, idx.numel())

    @torch.no_grad()
    def _set_codes(self, rows: torch.Tensor, new: torch.Tensor) -> None:
        """Overwrite the codes where the (K,) mask ``rows`` is set (in code space; ``new`` is (K, code_dim)) and
        restart their EMA statistics and idle timers; masked, so no host synchronisation."""
        keep = ~rows[:, None]
        self.codebook.copy_(torch.where(keep, self.codebook, new))
        self.ema_count.copy_(torch.where(rows, 1.0, self.ema_count))
        self.ema_sum.copy_(torch.where(keep, self.ema_sum, new))
        self.last_reset.copy_(torch.where(rows, self.step, self.last_reset))

    @torch.compiler.disable
    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Replace codes idle for `restart_after` steps (scaled by `scaled_steps`: rare codes of a large codebook are
        not dead) by random encoder outputs of this batch, once per step.

        A candidate is drawn for every code and only the dead ones take theirs: the same work every step,
        instead of reading the number of dead codes back to the host.
        """
        if not self._starts_step():
            return
        idle = self.step - torch.maximum(self.last_used, self.last_reset)
        world = dist.get_world_size() if _distributed() else 1
        after = scaled_steps(self.restart_after, self.codebook_size, flat.shape[0] * world * self.forwards_per_step)
        dead = idle >= after  # same on every rank: built from reduced counts
        new = flat[_sample_rows(flat.shape[0], self.codebook_size, flat.device)]
        self._set_codes(dead, _broadcast(new.contiguous()))  # rank 0's picks everywhere

    @torch.no_grad()
    def init_codebook(self, latents: torch.Tensor, method: str = "kmeans", iters: int = 10) -> None:
        """Initialise all codes from encoder outputs (N, embed_dim) or (B, embed_dim, h, w).

        "kmeans": `iters` Lloyd iterations (spherical when l2_norm); "random": random latents.
        Computed on rank 0 and broadcast.
        """
        if method not in ("kmeans", "random"):
            raise ValueError(f"unknown codebook init {method!r}; expected 'kmeans' or 'random'")
        if latents.dim() == 4:
            latents = latents.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        x = latents.to(self.codebook.device, torch.float32)
        x = self.proj_in(x[:, :, None, None]).flatten(1)  # proj_in is a 1x1 conv
        if self.l2_norm:
            x = F.normalize(x, dim=1)
        k = self.codebook_size
        codes = torch.empty_like(self.codebook)
        if not _distributed() or dist.get_rank() == 0:
            codes = _kmeans(x, k, iters, self.l2_norm) if method == "kmeans" else x[_sample_rows(x.shape[0], k, x.device)]
        self._set_codes(torch.ones(k, dtype=torch.bool, device=codes.device), _broadcast(codes.contiguous()))

    def indices_to_z(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> z_q (B, embed_dim, h, w)."""
        e = F.embedding(indices, self.codes()).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(e)


class FSQ(_UsageTracker):
    """Finite scalar quantization (Mentzer et al. 2023): project to len(levels) dims, bound, round.

    Dimension i takes levels[i] integer values; for even levels the grid is shifted by half a step
    ({-L/2, ..., L/2-1}), so every level is reachable. Codes are scaled to [-1, 1] by L//2. The index is
    the mixed-radix number of the per-dimension digits. No loss, no collapse by construction.
    """

    def __init__(self, cfg: VQModelConfig):
        levels = torch.tensor(cfg.fsq_levels, dtype=torch.long)
        super().__init__(int(levels.prod()), cfg.usage_window)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_width", levels // 2, persistent=False)
        self.proj_in = nn.Conv2d(cfg.embed_dim, len(levels), 1)
        self.proj_out = nn.Conv2d(len(levels), cfg.embed_dim, 1)

    def _bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Squash z so that rounding gives exactly `levels` values per dimension."""
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., len(levels)) codes in [-1, 1] -> (...) long indices."""
        digits = (codes * self.half_width).round().long() + self.half_width
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long indices -> (..., len(levels)) codes in [-1, 1]."""
        digits = (indices[..., None] // self.basis) % self.levels
        return (digits - self.half_width).float() / self.half_width

    def forward(self, z: torch.Tensor) -> QuantOut:
        with torch.autocast(z.device.type, enabled=False):
            zb = self._bound(self.proj_in(z.float()).permute(0, 2, 3, 1))
            q = zb + (zb.round() - zb).detach()  # straight-through rounding
            codes = q / self.half_width
            indices = self.codes_to_indices(codes.detach())
            counts, perplexity = self._histogram(indices)
            if self.training:
                self._mark_used(_all_reduce(counts.clone()), indices.numel())
            z_q = self.proj_out(codes.permute(0, 3, 1, 2).contiguous())
        return QuantOut(z_q, z.new_zeros((), dtype=torch.float32), indices, perplexity)

    def indices_to_z(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> z_q (B, embed_dim, h, w)."""
        return self.proj_out(self.indices_to_codes(indices).permute(0, 3, 1, 2).contiguous())


def build_quantizer(cfg: VQModelConfig) -> VectorQuantizer | FSQ:
    """The quantizer named by `cfg.quantizer` ("vq" or "fsq")."""
    if cfg.quantizer == "vq":
        return VectorQuantizer(cfg)
    if cfg.quantizer == "fsq":
        return FSQ(cfg)
    raise ValueError(f"unknown quantizer {cfg.quantizer!r}; expected 'vq' or 'fsq'")
