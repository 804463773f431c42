"""Sampling speed: our window-bounded KV cache vs recomputation, a concatenated ("past") cache, and a sliding crop.

    python benchmarks/sampling_speed.py [--quick] [--threads N]

1. Full attention, 16x16 grid, batch 16 and batch 1: our cache vs an official-style cache that concatenates each
   step's keys/values onto the past (taming's cached `sample_with_past` and mingpt's `forward_with_past`
   re-implemented op for op on the same weights, separate key/query/value projections included: the official
   code is not installed) and, at batch 16, vs recompute-everything (use_cache=False).
2. Window model (trained on 16x16) generating 32x32: our cache vs the official sliding 16x16 crop (one
   full forward per token), and our tokens/s at 32x32 vs 16x16.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer.model import GPT, GPTConfig  # noqa: E402
from transformer.sample import _sample_token, generate  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_times(fns: list, rounds: int) -> list[tuple[float, object]]:
    """Fastest of `rounds` runs of each function, run in alternation so a change in machine load hits all alike."""
    best = [(math.inf, None)] * len(fns)
    for _ in range(rounds):
        best = [min(b, timed(fn), key=lambda r: r[0]) for b, fn in zip(best, fns)]
    return best


class OfficialAttention(torch.nn.Module):
    """taming's mingpt CausalSelfAttention with `layer_past`, on our block's weights: separate key, query and value
    projections (ours fuses them into one), the new key/value stacked into `present`, the past concatenated on,
    attention dropout (a no-op in eval, but a call). The relative bias is ours: the official model has none."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        C = attn.proj.in_features
        self.key, self.query, self.value = (torch.nn.Linear(C, C) for _ in range(3))
        for s, lin in zip((1, 0, 2), (self.key, self.query, self.value)):  # our fused rows: q, k, v
            lin.weight.data.copy_(attn.qkv.weight[s * C:(s + 1) * C])
            lin.bias.data.copy_(attn.qkv.bias[s * C:(s + 1) * C])
        self.attn_drop, self.resid_drop, self.proj = torch.nn.Dropout(attn.dropout), attn.resid_drop, attn.proj
        self.n_head = attn.n_head

    def forward(self, x: torch.Tensor, bias: torch.Tensor, layer_past: torch.Tensor | None):
        B, T, C = x.size()
        k = self.key(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = self.query(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        present = torch.stack((k, v))
        if layer_past is not None:
            past_key, past_value = layer_past
            k = torch.cat((past_key, k), dim=-2)
            v = torch.cat((past_value, v), dim=-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))) + bias
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y)), present


@torch.inference_mode()
def concat_cache_generate(model: GPT, num_samples: int, seed: int = 0) -> torch.Tensor:
    """taming's cached sampler (`sample_with_past` calling mingpt's `forward_with_past`), op for op on our
    weights: every step concatenates the per-step presents into the past, and each layer concatenates its new
    key/value onto it. Same bias and uniforms as generate(), so the same tokens."""
    cfg, (H, W) = model.config, model.config.grid_shape
    model.eval()
    u = torch.rand(num_samples, H * W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    index, mask = model._attention_index((H, W), torch.device("cpu"), torch.float32, windowed=False)
    pos = model.positions((H, W))  # the code fed at step t >= 1 sits at raster position t - 1
    biases = [blk.attn.rel_bias[:, index] + mask for blk in model.blocks]  # (h, T, T), built once
    attns = [OfficialAttention(blk.attn).eval() for blk in model.blocks]
    temperature = 1.0
    x = torch.full((num_samples, 1), cfg.sos_id)
    out, past = [], []
    for t in range(H * W):
        # forward_with_past
        z = model.tok_emb(x)
        past_t = torch.cat(past, dim=-2) if past else None  # (L, 2, B, h, t, hd): a full copy each step
        z = model.drop(z if pos is None or t == 0 else z + pos[t - 1])
        presents = []
        for layer, (blk, attn) in enumerate(zip(model.blocks, attns)):
            a, present = attn(blk.ln1(z), biases[layer][:, t:t + 1, :t + 1], None if past_t is None else past_t[layer])
            z = z + a
            z = z + blk.mlp(blk.ln2(z))
            presents.append(present)
        logits = model.head(model.ln_f(z))
        past.append(torch.stack(presents))
        # sample_with_past
        logits = logits[:, -1, :] / temperature
        x, _ = _sample_token(logits.double(), u[:, t])  # inverse CDF with our uniforms: the same tokens as ours
        x = x[:, None]
        out.append(x)
    return torch.cat(out, 1).view(num_samples, H, W)


@torch.inference_mode()
def sliding_crop_rate(model: GPT, num_samples: int, grid: tuple[int, int], n_tokens: int) -> float:
    """Tokens/s of the official high-resolution sampler: for every token, crop the training-size window of
    the grid around it and run a full forward of the whole crop. That costs the same for every token, so
    n_tokens (from the middle of the grid) are timed and the rate extrapolated."""
    (h, w), (H, W) = model.config.grid_shape, grid
    model.eval()
    codes = torch.randint(model.config.codebook_size, (num_samples, H, W))
    prefix = torch.full((num_samples, 1), model.config.sos_id)
    start = (H // 2) * W
    t0 = time.perf_counter()
    for n in range(start, start + n_tokens):
        i, j = divmod(n, W)
        i0, j0 = min(max(i - h // 2, 0), H - h), min(max(j - w // 2, 0), W - w)
        crop = codes[:, i0:i0 + h, j0:j0 + w].flatten(1)
        local = (i - i0) * w + (j - j0)
        logits = model(torch.cat([prefix, crop], 1)[:, :-1])[:, local]
        codes[:, i, j] = logits.argmax(-1)
    return num_samples * n_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per method (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: decoding is many small ops, and extra threads only spin)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        n, size, layers, heads, width, K, crop_tokens = 2, 4, 2, 2, 32, 64, 4
    else:
        n, size, layers, heads, width, K, crop_tokens = 16, 16, 8, 8, 256, 1024, 32
    print(f"{time.strftime('%Y-%m-%d')} | cpu ({os.cpu_count()} cores) | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | fp32 | "
          f"GPT {layers}L {heads}H {width}d K={K}, random init | {n} samples | "
          f"fastest of {args.rounds} runs (recompute and crop: one run)")

    # 1. full attention, training grid
    full = GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=0))
    generate(full, 2, batch_size=2)  # warm-up: masks, allocator
    print(f"\n1. full attention, {size}x{size} grid, vs the official-style concatenated cache (same weights, uniforms)")
    print(f"  {'batch':>5} {'method':<38}{'tok/s':>9}{'ms/step':>9}{'ours is':>9}  identical samples")
    for b in (n, 1):
        n_tok = b * size * size
        (t_cache, (ours, _)), (t_concat, concat) = best_times(
            [lambda: generate(full, b, batch_size=b), lambda: concat_cache_generate(full, b)], args.rounds)
        rows = [(f"ours: KV cache, {full.backend} matmuls", t_cache, None),  # timed fastest for this batch
                ("official-style concatenated cache", t_concat, concat)]
        if b == n:
            t_rec, (rec, _) = timed(lambda: generate(full, n, batch_size=n, use_cache=False))  # slow: one run
            rows.append(("recompute everything (no cache)", t_rec, rec))
        for name, t, other in rows:
            same = "" if other is None else f"{int((ours == other).flatten(1).all(1).sum())}/{b}"
            ratio = "" if other is None else f"{t / t_cache:.2f}x"
            print(f"  {b:>5} {name:<38}{n_tok / t:>9.0f}{t / (size * size) * 1e3:>9.2f}{ratio:>9}  {same}")

    # 2. window model trained on size x size, generating 2x each side
    w = size // 2
    win = GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=w))
    big = (2 * size, 2 * size)
    generate(win, 2, big, batch_size=2)  # warm-up
    (t_big, _), (t_small, _) = best_times(
        [lambda: generate(win, n, big, batch_size=n), lambda: generate(win, n, batch_size=n)], args.rounds)
    r_big, r_small = n * big[0] * big[1] / t_big, n * size * size / t_small
    r_crop = sliding_crop_rate(win, n, big, crop_tokens)
    print(f"\n2. window w={w}, trained on {size}x{size}, generating {big[0]}x{big[1]}")
    print(f"  {'method':<36}{'tok/s':>9}{'ours is':>10}")
    print(f"  {f'ours: KV cache, {big[0]}x{big[1]}':<36}{r_big:>9.0f}")
    print(f"  {f'official sliding crop, {big[0]}x{big[1]}':<36}{r_crop:>9.1f}{r_big / r_crop:>9.0f}x"
          f"  (timed on {crop_tokens} tokens per sample, extrapolated)")
    print(f"  {f'ours: KV cache, {size}x{size}':<36}{r_small:>9.0f}{r_big / r_small:>9.2f}x"
          f"  ({big[0]}x{big[1]} rate / {size}x{size} rate)")


if __name__ == "__main__":
    main()
