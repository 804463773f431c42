"""Tokenizer training-step speed: ours vs the official taming-transformers modules and training step, side by side.

    pip install -r benchmarks/requirements.txt   # the official package (benchmark-only)
    python benchmarks/tokenizer_step_speed.py [--quick] [--threads N] [--rounds R] [--device cpu|cuda]

The official side is the installed package itself (`benchmarks/official.py`): taming.models.vqgan.VQModel with its
Encoder/Decoder/VectorQuantizer2 and VQLPIPSWithDiscriminator (BatchNorm PatchGAN), stepped as Lightning 1.x runs
its training_step with two optimizers. Without the package its rows print "-" and a note. Per configuration,
three steps, each on the same batch, timed in alternation (fastest of R), fp32:
  autoencoder   forward, L1 + codebook loss, backward, Adam: the autoencoders alone
  before GAN    the full step before disc_start: + LPIPS. The official step still runs the discriminator, the
                adaptive weight and a second autoencoder forward for the discriminator's pass, all x0; ours skips them
  with GAN      the full step after disc_start: + PatchGAN, adaptive weight, the discriminator's update. The
                official step runs the autoencoder forward twice and LPIPS and the PatchGAN backward twice; ours once
Ours is vqvae/train.py's step: fused Adam, the non-finite check and skip on the device. LPIPS is the same VGG16
network on both sides, randomly initialised (its weights are not here; the time does not depend on them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import official  # noqa: E402
from benchmarks.common import fastest, machine  # noqa: E402
from core.loop import step_optimizer  # noqa: E402
from core.runtime import Runtime, fused_adam  # noqa: E402
from vqvae.config import VQConfig  # noqa: E402
from vqvae.losses import VQGANLoss  # noqa: E402
from vqvae.model import VQModel  # noqa: E402
from vqvae.train import compile_autoencoder, step_discriminator  # noqa: E402

CONFIGS = {  # name: (image size, batch, ch, ch_mult, res blocks, attn resolutions, z/embed dim, codebook)
    "32px b16 ch64x(1,2,2) attn8 K256": (32, 16, 64, (1, 2, 2), 1, (8,), 64, 256),
    "64px b8 ch128x(1,1,2,2) 2res attn16 K1024": (64, 8, 128, (1, 1, 2, 2), 2, (16,), 256, 1024),
}
# the released f16 geometry (REFERENCE.md) at 256 px: what benchmarks/gpu_check.py times on a GPU
F16_256 = (256, 8, 128, (1, 1, 2, 2, 4), 2, (16,), 256, 1024)
NEVER = 10**9  # a disc_start never reached


def our_config(size: int, ch: int, mult: tuple, res: int, attn: tuple, zdim: int, K: int, gan: bool) -> VQConfig:
    """Our tokenizer with the official geometry: embed_dim-wide codes, no l2 norm, no restarts, as taming."""
    return VQConfig(image_size=size, ch=ch, ch_mult=mult, num_res_blocks=res, attn_resolutions=attn,
                    z_channels=zdim, embed_dim=zdim, codebook_size=K, code_dim=0, l2_norm=False, restart_after=0,
                    perceptual_weight=1.0, perceptual_backbone="random", disc_ch=64, disc_layers=3,
                    disc_start=0 if gan else NEVER, max_steps=NEVER + 1)


def our_autoencoder_step(cfg: VQConfig, x: torch.Tensor) -> Callable[[], None]:
    model = VQModel(cfg).to(x.device).train()
    opt = fused_adam(model.parameters(), 1e-4, (0.5, 0.9))

    def step() -> None:
        xrec, qloss, _ = model(x)
        ((x - xrec).abs().mean() + qloss).backward()
        step_optimizer(opt, torch.amp.GradScaler(x.device.type, enabled=False))
    return step


def our_full_step(cfg: VQConfig, x: torch.Tensor, precision: str = "fp32", compile: bool = False
                  ) -> Callable[[], None]:
    """vqvae/train.py's step (no accumulation): generator update, then the discriminator's once it is on."""
    rt = Runtime(x.device, precision)
    model, loss_fn = VQModel(cfg).to(x.device).train(), VQGANLoss(cfg).to(x.device)
    net = compile_autoencoder(model, model) if compile else model
    opt_ae, opt_d = fused_adam(model.parameters(), 1e-4, (0.5, 0.9)), fused_adam(
        loss_fn.discriminator.parameters(), 1e-4, (0.5, 0.9))
    scaler, scaler_d = rt.grad_scaler(), rt.grad_scaler()
    one = torch.ones((), device=x.device)

    def step() -> None:
        with rt.autocast():
            xrec, qloss, _ = net(x)
            gloss, _ = loss_fn.generator_loss(x, xrec, qloss, 0, model.last_layer, loss_scale=scaler.scale(one))
        finite = torch.isfinite(gloss)
        scaler.scale(gloss).backward()
        disc_on = loss_fn.disc_active(0)
        if disc_on:
            with rt.autocast():
                dloss, _ = loss_fn.discriminator_loss(x, xrec, 0)
            finite &= torch.isfinite(dloss)
            scaler_d.scale(dloss).backward()
        step_optimizer(opt_ae, scaler, finite)
        if disc_on:
            step_discriminator(loss_fn.discriminator, opt_d, scaler_d, rt, finite)
    return step


def official_autoencoder_step(ref: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = official.official_optimizers(ref)[0]

    def step() -> None:
        xrec, qloss = ref(x)
        ((x - xrec).abs().mean() + qloss).backward()
        opt.step()
        opt.zero_grad()
    return step


def official_full_step(vqgan, geometry: tuple, x: torch.Tensor, gan: bool) -> Callable[[], None]:
    size, _, ch, mult, res, attn, zdim, K = geometry
    ref = official.official_vqgan(vqgan, size, ch, mult, res, attn, zdim, K, disc_start=0 if gan else NEVER)
    ref = ref.to(x.device)
    opts = official.official_optimizers(ref)
    return lambda: official.lightning_step(ref, opts, x)


def synced(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """The step, waiting for the device at its end (timings on CUDA would otherwise measure the launch)."""
    if device.type != "cuda":
        return step
    return lambda: (step(), torch.cuda.synchronize())


def compare(name: str, geometry: tuple, device: torch.device, rounds: int, vqgan) -> None:
    size, batch, ch, mult, res, attn, zdim, K = geometry
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    ours = {"autoencoder": our_autoencoder_step(our_config(size, ch, mult, res, attn, zdim, K, False), x),
            "before GAN": our_full_step(our_config(size, ch, mult, res, attn, zdim, K, False), x),
            "with GAN": our_full_step(our_config(size, ch, mult, res, attn, zdim, K, True), x)}
    theirs = {}
    if vqgan is not None:
        ref = official.official_vqgan(vqgan, size, ch, mult, res, attn, zdim, K, disc_start=NEVER).to(device)
        theirs = {"autoencoder": official_autoencoder_step(ref, x),
                  "before GAN": official_full_step(vqgan, geometry, x, False),
                  "with GAN": official_full_step(vqgan, geometry, x, True)}
    for kind, mine in ours.items():
        steps = {"ours": synced(mine, device)}
        if kind in theirs:
            steps["official"] = synced(theirs[kind], device)
        best = fastest(steps, rounds)
        rate = batch / best["ours"]
        if "official" in best:
            ref_rate = batch / best["official"]
            print(f"  {name:<44}{kind:<13}{ref_rate:>15.2f}{rate:>12.2f}{rate / ref_rate:>8.2f}x", flush=True)
        else:
            print(f"  {name:<44}{kind:<13}{'-':>15}{rate:>12.2f}{'-':>9}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (first config, 2 images)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vqgan = official.taming_vqgan()
    print(f"tokenizer step — {machine()}, {device}, fp32, {time.strftime('%Y-%m-%d')}, fastest of {args.rounds} "
          "interleaved rounds")
    print(f"  {'config':<44}{'step':<13}{'official img/s':>15}{'ours img/s':>12}{'ours is':>9}")
    for name, geometry in list(CONFIGS.items())[:1 if args.quick else None]:
        if args.quick:
            geometry = (geometry[0], 2, 32, *geometry[3:])
        compare(name, geometry, device, args.rounds, vqgan)


if __name__ == "__main__":
    main()
