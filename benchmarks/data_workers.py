"""Images/s of `train-vqvae` with ``--num-workers 0`` (decoding in the training loop) vs the default worker count,
on 256-px JPEGs (320x256 photo-like files: decode, resize, random crop, flip), read back from the run's
``train/images_per_sec`` metric after the first logged interval; and the data pipeline alone (the training
DataLoader without a model), the rate it can feed a GPU at.
    python benchmarks/data_workers.py [--steps 10] [--batch-size 16] [--image-size 256]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine, scratch_tracking


def jpeg_set(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` 320x256 JPEGs (smooth random colour fields, like photos compress) and a manifest."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = (rng.random((16, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((320, 256), Image.BICUBIC).save(folder / "img" / f"{i:05d}.jpg", quality=90)
    (folder / "manifest.csv").write_text("image_path\n" + "".join(f"img/{i:05d}.jpg\n" for i in range(n)))
    return folder / "manifest.csv"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    d = scratch_tracking()
    manifest = jpeg_set(d / "data", 512)

    import time

    import mlflow
    from torch.utils.data import DataLoader

    from core.data import ImageDataset, SeededSampler, default_num_workers, read_manifest
    from vqvae.config import VQConfig
    from vqvae.train import train_vqvae

    # a small model, so that what the benchmark shows is whether the loop waits for data
    paths = read_manifest(manifest, val_fraction=0.0)[0].image_path.tolist()
    loader_rates = {}
    for workers in (0, default_num_workers()):
        loader = DataLoader(ImageDataset(paths, args.image_size, train=True), batch_size=args.batch_size,
                            sampler=SeededSampler(len(paths), 0, 1, seed=0), num_workers=workers)
        batches = iter(loader)
        next(batches)  # workers started
        t0 = time.perf_counter()
        for _ in range(16):
            next(batches)
        loader_rates[workers] = 16 * args.batch_size / (time.perf_counter() - t0)
        del batches
    base = dict(manifest=str(manifest), image_size=args.image_size, ch=8, ch_mult=(1, 2, 2, 2), z_channels=16,
                embed_dim=16, codebook_size=256, perceptual_weight=0.0, disc_start=10**6, batch_size=args.batch_size,
                max_steps=args.steps, log_every=5, val_every=10**6, ckpt_every=10**6, device=args.device)
    results = {}
    for workers in (0, default_num_workers()):
        run_id = train_vqvae(VQConfig(**base, num_workers=workers))
        hist = sorted(mlflow.MlflowClient().get_metric_history(run_id, "train/images_per_sec"), key=lambda m: m.step)
        values = [m.value for m in hist][1:] or [hist[-1].value]
        results[workers] = sum(values) / len(values)
    print(f"\ntrain-vqvae images/s by DataLoader workers — {machine()}", file=sys.stderr)
    print(f"320x256 JPEGs -> {args.image_size}px crops, batch {args.batch_size}, ch 8 x (1,2,2,2), "
          f"{args.steps} steps", file=sys.stderr)
    print(f"{'--num-workers':<14} {'train-vqvae images/s':>21} {'vs 0':>6} {'loader alone images/s':>22} {'vs 0':>6}")
    for workers, rate in results.items():
        label = f"{workers} (default)" if workers == default_num_workers() else str(workers)
        print(f"{label:<14} {rate:>21.1f} {rate / results[0]:>5.2f}x {loader_rates[workers]:>22.1f} "
              f"{loader_rates[workers] / loader_rates[0]:>5.2f}x")


if __name__ == "__main__":
    main()
