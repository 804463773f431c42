"""Time to turn a phone photo into a training crop: the training loader (`ImageDataset`, which decodes a JPEG at
the smallest 1/2, 1/4 or 1/8 scale that still covers the crop, and reduces a PNG by a whole factor first) against the official taming data loader itself
(``taming.data.base.ImagePaths`` with random crops, installed from benchmarks/requirements.txt: every pixel
decoded, then albumentations) and against our loader decoding every pixel first; and how far apart our two crops
are.
    python benchmarks/image_decode.py [--quick] [--sizes 32,256,512] [--format jpg|png]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine
from official import image_paths


def phone_photos(folder: Path, n: int, size: tuple[int, int], fmt: str = "jpg") -> list[Path]:
    """``n`` photos at ``size`` (JPEG at quality 92, as phones save, or PNG): scikit-learn's two sample
    photographs, upscaled and shifted so that no two files are the same."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    paths = []
    for i in range(n):
        big = photos[i % 2].resize((size[0] + 8 * i, size[1] + 6 * i), Image.BICUBIC).crop((8 * i, 6 * i, *[
            s + d * i for s, d in zip(size, (8, 6))]))
        paths.append(folder / f"{i:03d}.{fmt}")
        big.save(paths[-1], **({"quality": 92} if fmt == "jpg" else {"compress_level": 6}))
    return paths


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="4 smaller photos (a smoke test, not a figure)")
    p.add_argument("--sizes", default="32,256,512", help="training resolutions (shorter side, then crop)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg",
                   help="photos as JPEG (decoded at a reduced scale) or PNG (every pixel decoded, then reduced)")
    args = p.parse_args()

    from unittest import mock

    import torch

    from core.data import ImageDataset
    from core.images import load_rgb

    torch.set_num_threads(1)
    official = image_paths()
    if official is not None:
        import cv2

        cv2.setNumThreads(1)  # albumentations resizes with OpenCV: one thread, as ours
    shape = (1008, 756) if args.quick else (4032, 3024)  # a 12-MP phone photo
    n = 4 if args.quick else 12
    with tempfile.TemporaryDirectory() as d:
        paths = [str(q) for q in phone_photos(Path(d), n, shape, args.format)]
        kind = "JPEGs" if args.format == "jpg" else "PNGs"
        print(f"\nphone photo -> training crop, one thread — {machine()}", file=sys.stderr)
        print(f"{n} {kind} of {shape[0]}x{shape[1]}{' (quality 92)' if args.format == 'jpg' else ''}; resize the "
              "shorter side, random crop (ours: and flip); median of 3 passes, interleaved", file=sys.stderr)
        print(f"{'crop px':>7} {'official ms':>12} {'full decode ms':>15} {'loader ms':>10} {'vs official':>12} "
              f"{'vs full':>8} {'crops apart (PSNR)':>19}")
        for size in map(int, args.sizes.split(",")):
            dataset = ImageDataset(paths, size, train=True)

            def crops(full: bool) -> tuple[float, list[torch.Tensor]]:
                """Seconds per image and the crops (the same seeds: the same crop and flip either way)."""
                every_pixel = mock.patch("core.data.load_rgb", lambda path, min_side=None: load_rgb(path))
                with every_pixel if full else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    out = [dataset[(i, i)][0] for i in range(n)]
                return (time.perf_counter() - t0) / n, out

            def official_ms() -> float:
                loader = official(paths, size=size, random_crop=True)
                t0 = time.perf_counter()
                for i in range(n):
                    loader[i]
                return (time.perf_counter() - t0) / n

            runs, official_runs = {True: [], False: []}, []
            for _ in range(3):
                for full in (True, False):
                    runs[full].append(crops(full))
                if official is not None:
                    official_runs.append(official_ms())
            full_ms, loader_ms = (1000 * float(np.median([t for t, _ in runs[full]])) for full in (True, False))
            off_ms = 1000 * float(np.median(official_runs)) if official_runs else None
            # model inputs lie in [-1, 1]: a quarter of their squared difference is the MSE on a [0, 1] scale
            mse = float(np.mean([(a - b).pow(2).mean() / 4 for a, b in zip(runs[True][0][1], runs[False][0][1])]))
            psnr = 10 * np.log10(1 / mse) if mse > 0 else float("inf")
            off = (f"{off_ms:>12.1f}", f"{off_ms / loader_ms:>11.1f}x") if off_ms else (f"{'-':>12}", f"{'-':>12}")
            print(f"{size:>7} {off[0]} {full_ms:>15.1f} {loader_ms:>10.1f} {off[1]} {full_ms / loader_ms:>7.1f}x "
                  f"{psnr:>16.1f} dB")


if __name__ == "__main__":
    main()
