"""A/B of the GPT's position information at equal steps: relative bias + row/column embeddings (the default,
an additive float mask: CUDA's memory-efficient SDPA kernel) vs row/column embeddings only (--no-rel-bias:
is_causal, flash attention on CUDA). Held-out validation loss (nats per code) on two families of code grids.

    python benchmarks/position_ab.py [--steps 150] [--seeds 1]

The grids are made without a trained tokenizer, so the A/B needs minutes, not hours: each image's pixels
quantized to a small palette (one code per pixel), class-conditional:
- shapes: benchmarks/quality.py's circles, squares and triangles at 16x16 px, RGB quantized to 4x4x4 = 64 codes;
- digits: scikit-learn's 8x8 digits upscaled to 16x16 (nearest), 17 grey levels = 17 codes.
Every 8th image is held out. Same initial weights for both variants (the bias starts at zero).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402
from transformer.model import GPT, GPTConfig  # noqa: E402


def shape_grids(n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import SHAPES, draw_shape
    rng = np.random.default_rng(seed)
    grids, labels = [], []
    for i in range(n_per_class):
        for c, kind in enumerate(SHAPES):
            img = np.asarray(draw_shape(kind, rng).resize((16, 16)))  # (16, 16, 3) uint8
            q = img // 64  # 4 levels per channel
            grids.append(q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2])
            labels.append(c)
    return torch.as_tensor(np.stack(grids), dtype=torch.long), torch.tensor(labels), 64


def digit_grids() -> tuple[torch.Tensor, torch.Tensor, int]:
    from sklearn.datasets import load_digits
    d = load_digits()
    img = torch.as_tensor(d.images, dtype=torch.long)  # (n, 8, 8), 0..16
    return img.repeat_interleave(2, 1).repeat_interleave(2, 2), torch.as_tensor(d.target), 17


def run(grids: torch.Tensor, labels: torch.Tensor, K: int, rel_bias: bool, steps: int, seed: int,
        batch: int = 16) -> float:
    n_cls = int(labels.max()) + 1
    held = torch.arange(len(grids)) % 8 == 7
    cfg = GPTConfig(K, n_cls, (16, 16), n_layer=2, n_head=4, n_embd=64, window_size=0, rel_bias=rel_bias)
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.01, 1e-3)
    seq = torch.cat([cfg.class_token(labels)[:, None], grids.flatten(1)], 1)
    train, val = seq[~held], seq[held]
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lr = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        b = train[torch.randint(len(train), (batch,), generator=g)]
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float(sum(F.cross_entropy(model(v[:, :-1]).flatten(0, 1), v[:, 1:].flatten(), reduction="sum")
                         for v in val.split(64)) / val[:, 1:].numel())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"position A/B — {machine()}, {time.strftime('%Y-%m-%d')}, GPT 2L 4H 64d, full attention, 16x16 grids, "
          f"{args.steps} steps, batch 16, AdamW 1e-3 cosine; held-out loss, nats/code")
    print(f"  {'data':<8}{'seed':>5}{'rel bias + rowcol':>19}{'rowcol only':>13}{'difference':>12}")
    for name, data in (("shapes", shape_grids(150)), ("digits", digit_grids())):
        for seed in range(args.seeds):
            a, b = (run(*data, rel_bias=rb, steps=args.steps, seed=seed) for rb in (True, False))
            print(f"  {name:<8}{seed:>5}{a:>19.4f}{b:>13.4f}{b - a:>+12.4f}", flush=True)


if __name__ == "__main__":
    main()
