"""Tokenizer training-step speed: our VQModel vs the official taming-transformers modules, side by side.

    python benchmarks/tokenizer_step_speed.py [--quick] [--threads N] [--rounds R]

The official code is not installed: benchmarks/taming_reference.py re-implements its Encoder/Decoder/
VectorQuantizer2 op for op. One step = forward, L1 reconstruction + codebook loss, backward, Adam step (the
autoencoder update; the GAN and LPIPS terms, the same modules on both sides, are left out), on the same batch,
timed in alternation (fastest of R), fp32.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import taming_reference as taming  # noqa: E402
from benchmarks.common import fastest, machine  # noqa: E402
from vqvae.config import VQConfig  # noqa: E402
from vqvae.model import VQModel  # noqa: E402

CONFIGS = {  # name: (image size, batch, ch, ch_mult, res blocks, attn resolutions, z/embed dim, codebook)
    "32px b16 ch64x(1,2,2) attn8 K256": (32, 16, 64, (1, 2, 2), 1, (8,), 64, 256),
    "64px b8 ch128x(1,1,2,2) 2res attn16 K1024": (64, 8, 128, (1, 1, 2, 2), 2, (16,), 256, 1024),
}


def step_fn(model: torch.nn.Module, x: torch.Tensor, ours: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def step() -> None:
        xrec, qloss = model(x)[:2] if ours else model(x)
        loss = (x - xrec).abs().mean() + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (first config, 2 images)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"tokenizer step — {machine()}, fp32, {time.strftime('%Y-%m-%d')}, fastest of {args.rounds}")
    print(f"  {'config':<44}{'official img/s':>15}{'ours img/s':>12}{'ours is':>9}")
    for name, (size, batch, ch, mult, res, attn, zdim, K) in list(CONFIGS.items())[:1 if args.quick else None]:
        batch = 2 if args.quick else batch
        torch.manual_seed(0)
        x = torch.rand(batch, 3, size, size) * 2 - 1
        ours = VQModel(VQConfig(image_size=size, ch=ch, ch_mult=mult, num_res_blocks=res, attn_resolutions=attn,
                                z_channels=zdim, embed_dim=zdim, codebook_size=K)).train()
        ref = taming.VQModel(ch, mult, res, attn, size, zdim, zdim, K).train()
        steps = {"official": step_fn(ref, x, False), "ours": step_fn(ours, x, True)}
        best = fastest(steps, args.rounds)
        official, mine = batch / best["official"], batch / best["ours"]
        print(f"  {name:<44}{official:>15.1f}{mine:>12.1f}{mine / official:>8.2f}x")


if __name__ == "__main__":
    main()
