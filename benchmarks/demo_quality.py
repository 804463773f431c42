"""Demo quality: wall time of the full `cli.py demo`, and how often a digit classifier reads its samples as the
digit that was asked for.

    python benchmarks/demo_quality.py [--out DIR] [--per-digit N]

Runs the demo as a user would (a fresh process, its own tracking store in DIR), then samples N more grids per
digit from the demo's transformer with the demo's generate settings and decodes them. An SVM trained on the
demo's train split, each 32x32 image box-averaged back to 8x8 (undoing the demo's 4x upscaling), classifies the
real val split (sanity check) and the samples.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from core.options import build_config  # noqa: E402
from core.tracking import connect, download  # noqa: E402
from transformer.generate import GenerateConfig, run_generate  # noqa: E402
from vqvae.decode import DecodeConfig, decode  # noqa: E402
from workflows.demo import FULL, IMAGE_SIZE, MANIFEST  # noqa: E402


def features(path: Path) -> np.ndarray:
    """A 32x32 image as the 64 box-averaged 8x8 intensities in [0, 1]."""
    small = Image.open(path).convert("L").resize((IMAGE_SIZE // 4,) * 2, Image.BOX)
    return np.asarray(small, dtype=np.float64).reshape(-1) / 255


def run_demo(out: Path, uri: str) -> tuple[float, dict[str, str]]:
    """Wall time of `cli.py demo` and its run IDs by stage, from its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--out", str(out), "--force",
                           "--tracking-uri", uri], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"demo failed (exit {proc.returncode})")
    ids = dict(line.split()[::2] for line in proc.stdout.splitlines() if len(line.split()) == 3)
    return wall, ids


def sample(train_run_id: str, per_digit: int, uri: str) -> tuple[list[Path], list[str]]:
    """Decoded samples (in label order 0..9, 0..9, ...) with the demo's generate settings, and their labels."""
    gen = build_config(GenerateConfig, {**FULL["generate"], "transformer_run_id": train_run_id,
                                        "num_samples": 10 * per_digit})
    with contextlib.redirect_stdout(sys.stderr):  # the stages print their run IDs; stdout is for the results
        gen_id = run_generate(gen, uri, "demo-quality")
        dec_id = decode(build_config(DecodeConfig, {"run_id": gen_id, "max_images": 10 * per_digit}), uri,
                        "demo-quality")
    labels = json.loads(download(gen_id, "settings.json").read_text())["sample_labels"]
    return sorted(download(dec_id, "images").glob("*.png")), labels


def score(out: Path, paths: list[Path], labels: list[str]) -> tuple[float, pd.Series]:
    """Accuracy on the real val split, and per digit on the samples, of an SVM fit on the train split."""
    from sklearn.svm import SVC

    manifest = pd.read_csv(out / MANIFEST, dtype=str)
    x = np.stack([features(out / p) for p in manifest.image_path])
    train, val = (manifest.split == "train").to_numpy(), (manifest.split == "val").to_numpy()
    clf = SVC().fit(x[train], manifest.label[train])
    real = float((clf.predict(x[val]) == manifest.label[val]).mean())
    labels = np.asarray(labels)
    return real, pd.Series(clf.predict(np.stack([features(p) for p in paths])) == labels).groupby(labels).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="demo folder (default: a new temporary one)")
    parser.add_argument("--per-digit", type=int, default=50, help="samples per digit to classify")
    args = parser.parse_args()

    out = (args.out or Path(tempfile.mkdtemp(prefix="demo-quality-"))).resolve()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    wall, ids = run_demo(out, uri)
    connect(uri, "demo-quality")
    real, per_digit = score(out, *sample(ids["train"], args.per_digit, uri))
    print(f"demo wall time: {wall / 60:.1f} min ({wall:.0f} s); its sample grid: {out / 'grid.png'}")
    print(f"classifier accuracy on real held-out digits: {real:.1%}")
    print(f"accuracy on generated samples ({args.per_digit} per digit): {per_digit.mean():.1%}")
    print("digit  " + " ".join(f"{d:>4}" for d in per_digit.index))
    print("acc %  " + " ".join(f"{100 * a:4.0f}" for a in per_digit.values))


if __name__ == "__main__":
    main()
