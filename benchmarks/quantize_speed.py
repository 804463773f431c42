"""Quantize throughput (images/s) at a fixed tokenizer config, side by side: batch 1 vs batched, 0 vs 2 workers.

    python benchmarks/quantize_speed.py [--images 512] [--image-size 64] [--device auto]
"""
from __future__ import annotations

import argparse
import sys

from common import image_set, machine, scratch_tracking


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    d = scratch_tracking()
    manifest = image_set(d / "data", args.images, args.image_size)

    import mlflow

    from vqvae.config import VQConfig
    from vqvae.quantize import QuantizeConfig, quantize
    from vqvae.train import train_vqvae

    vq = train_vqvae(VQConfig(manifest=str(manifest), image_size=args.image_size, ch=64, ch_mult=(1, 2, 2),
                              attn_resolutions=(args.image_size // 4,), codebook_size=512, perceptual_weight=0.0,
                              max_steps=1, val_every=10**6, device=args.device))
    variants = {"batch 1, 0 workers": (1, 0), "batch 64, 0 workers": (64, 0), "batch 64, 2 workers": (64, 2)}
    results = {}
    for name, (bs, workers) in variants.items():
        run_id = quantize(QuantizeConfig(vqvae_run_id=vq, batch_size=bs, num_workers=workers, device=args.device))
        results[name] = mlflow.MlflowClient().get_run(run_id).data.metrics["quantize/images_per_sec"]
    print(f"\nquantize throughput — {machine()}", file=sys.stderr)
    print(f"tokenizer: {args.image_size}px, ch 64 x (1,2,2), codebook 512; {args.images} images", file=sys.stderr)
    ref = results["batch 1, 0 workers"]
    print(f"{'variant':<22} {'images/s':>10} {'vs batch 1':>11}")
    for name, v in results.items():
        print(f"{name:<22} {v:>10.1f} {v / ref:>10.2f}x")


if __name__ == "__main__":
    main()
