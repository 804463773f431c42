"""Images/s of a tokenizer training step at a fixed config, side by side: AE only vs with the GAN, fp32 vs bf16.

Runs the real `train-vqvae` loop (data loading, optimizer steps, MLflow logging) and reads back its
``train/images_per_sec`` metric, averaged over the logged intervals after the first (warm-up).
    python benchmarks/train_vqvae_speed.py [--steps 30] [--image-size 64] [--device auto]
"""
from __future__ import annotations

import argparse
import os
import sys

from common import image_set, machine, scratch_tracking


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    d = scratch_tracking()
    manifest = image_set(d / "data", 256, args.image_size)

    import mlflow
    import torch

    from vqvae.config import VQConfig
    from vqvae.train import train_vqvae

    base = dict(manifest=str(manifest), image_size=args.image_size, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1,
                attn_resolutions=(args.image_size // 4,), z_channels=64, embed_dim=64, codebook_size=512,
                perceptual_weight=0.0, batch_size=args.batch_size, max_steps=args.steps, log_every=5,
                val_every=10**6, ckpt_every=10**6, num_workers=2, device=args.device)
    variants = {"AE only, fp32": dict(disc_start=10**6), "AE + GAN, fp32": dict(disc_start=0)}
    if torch.cuda.is_available():
        variants["AE + GAN, bf16"] = dict(disc_start=0, precision="bf16")
        variants["AE + GAN, fp16"] = dict(disc_start=0, precision="fp16")
    results = {}
    for name, extra in variants.items():
        run_id = train_vqvae(VQConfig(**{**base, **extra}))
        hist = mlflow.MlflowClient().get_metric_history(run_id, "train/images_per_sec")
        values = [m.value for m in sorted(hist, key=lambda m: m.step)][1:] or [hist[-1].value]
        results[name] = sum(values) / len(values)
    print(f"\ntrain-vqvae step throughput — {machine()}", file=sys.stderr)
    print(f"config: {args.image_size}px, batch {args.batch_size}, ch 64 x (1,2,2), attn at "
          f"{args.image_size // 4}, codebook 512, {args.steps} steps", file=sys.stderr)
    ref = results["AE only, fp32"]
    print(f"{'variant':<18} {'images/s':>10} {'vs AE fp32':>11}")
    for name, v in results.items():
        print(f"{name:<18} {v:>10.1f} {v / ref:>10.2f}x")
    os.chdir("/")


if __name__ == "__main__":
    main()
