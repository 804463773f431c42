"""Tokenizer training-step speed: ours vs the official taming-transformers modules and training step, side by side.

    python benchmarks/tokenizer_step_speed.py [--quick] [--threads N] [--rounds R]

The official code is not installed: benchmarks/taming_reference.py re-implements its Encoder/Decoder/
VectorQuantizer2, its BatchNorm PatchGAN, VQLPIPSWithDiscriminator and the training step as Lightning runs it with
two optimizers, op for op. Per configuration, three steps, each on the same batch, timed in alternation (fastest
of R), fp32:
  autoencoder   forward, L1 + codebook loss, backward, Adam: the autoencoders alone
  before GAN    the full step before disc_start: + LPIPS. The official step still runs the discriminator, the
                adaptive weight and a second autoencoder forward for the discriminator's pass, all x0; ours skips them
  with GAN      the full step after disc_start: + PatchGAN, adaptive weight, the discriminator's update. The
                official step runs the autoencoder forward twice and LPIPS and the PatchGAN backward twice; ours once
LPIPS is the same VGG16 network on both sides, randomly initialised (its weights are not here; the time does not
depend on them).
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
from vqvae.losses import LPIPSLoss, VQGANLoss  # noqa: E402
from vqvae.model import VQModel  # noqa: E402

CONFIGS = {  # name: (image size, batch, ch, ch_mult, res blocks, attn resolutions, z/embed dim, codebook)
    "32px b16 ch64x(1,2,2) attn8 K256": (32, 16, 64, (1, 2, 2), 1, (8,), 64, 256),
    "64px b8 ch128x(1,1,2,2) 2res attn16 K1024": (64, 8, 128, (1, 1, 2, 2), 2, (16,), 256, 1024),
}
NEVER = 10**9  # a disc_start never reached


def adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9))


def autoencoder_step(model: torch.nn.Module, x: torch.Tensor, ours: bool):
    opt = adam(model.parameters())

    def step() -> None:
        xrec, qloss = model(x)[:2] if ours else model(x)
        loss = (x - xrec).abs().mean() + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def our_full_step(cfg: VQConfig, x: torch.Tensor, gan: bool):
    """vqvae/train.py's step (fp32, no accumulation): generator update, then the discriminator's once it is on."""
    cfg = VQConfig(**{**cfg.__dict__, "disc_start": 0 if gan else NEVER})
    model, loss_fn = VQModel(cfg).train(), VQGANLoss(cfg)
    opt_ae, opt_d = adam(model.parameters()), adam(loss_fn.discriminator.parameters())

    def step() -> None:
        xrec, qloss, _ = model(x)
        gloss, _ = loss_fn.generator_loss(x, xrec, qloss, 0, model.last_layer)
        gloss.backward()
        if loss_fn.disc_active(0):
            loss_fn.discriminator_loss(x, xrec, 0)[0].backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
    return step


def official_full_step(ref: taming.VQModel, x: torch.Tensor, gan: bool):
    loss = taming.VQLPIPSWithDiscriminator(LPIPSLoss("random"), disc_start=0 if gan else NEVER).train()
    opts = adam(ref.parameters()), adam(loss.discriminator.parameters())
    return lambda: taming.training_step(ref, loss, opts, x, global_step=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (first config, 2 images)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"tokenizer step — {machine()}, fp32, {time.strftime('%Y-%m-%d')}, fastest of {args.rounds}")
    print(f"  {'config':<44}{'step':<13}{'official img/s':>15}{'ours img/s':>12}{'ours is':>9}")
    for name, (size, batch, ch, mult, res, attn, zdim, K) in list(CONFIGS.items())[:1 if args.quick else None]:
        batch = 2 if args.quick else batch
        torch.manual_seed(0)
        x = torch.rand(batch, 3, size, size) * 2 - 1
        cfg = VQConfig(image_size=size, ch=ch, ch_mult=mult, num_res_blocks=res, attn_resolutions=attn,
                       z_channels=zdim, embed_dim=zdim, codebook_size=K, perceptual_weight=1.0,
                       perceptual_backbone="random", disc_ch=64, disc_layers=3)
        ref = taming.VQModel(ch, mult, res, attn, size, zdim, zdim, K).train()
        rows = {"autoencoder": (autoencoder_step(ref, x, False), autoencoder_step(VQModel(cfg).train(), x, True)),
                "before GAN": (official_full_step(ref, x, False), our_full_step(cfg, x, False)),
                "with GAN": (official_full_step(ref, x, True), our_full_step(cfg, x, True))}
        for kind, (theirs, ours) in rows.items():
            best = fastest({"official": theirs, "ours": ours}, args.rounds)
            official, mine = batch / best["official"], batch / best["ours"]
            print(f"  {name:<44}{kind:<13}{official:>15.2f}{mine:>12.2f}{mine / official:>8.2f}x")


if __name__ == "__main__":
    main()
