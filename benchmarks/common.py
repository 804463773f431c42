"""Helpers for benchmark scripts: a throwaway MLflow store, a generated image set, alternating timings."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def scratch_tracking() -> Path:
    """Point MLflow at a fresh SQLite store in a temp dir (created up front) and return the dir."""
    import mlflow

    d = Path(tempfile.mkdtemp(prefix="bench-"))
    # an experiment inherited from the caller names one of another store: MLflow's set_experiment exports
    # MLFLOW_EXPERIMENT_ID to child processes, and start_run would look for it here and fail
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    os.chdir(d)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.MlflowClient().search_experiments()
    return d


def image_set(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random-blob RGB PNGs of ``size``² and a manifest."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = (rng.random((size // 4, size // 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(folder / "img" / f"{i:05d}.png")
        rows.append(f"img/{i:05d}.png,{i % 10}")
    (folder / "manifest.csv").write_text("image_path,label\n" + "\n".join(rows) + "\n")
    return folder / "manifest.csv"


def machine() -> str:
    import platform

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.python_version()}"


def fastest(steps: dict, rounds: int) -> dict:
    """Fastest of `rounds` timed calls of each step, called in alternation after one warm-up round."""
    best = dict.fromkeys(steps, float("inf"))
    for r in range(rounds + 1):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            best[key] = min(best[key], time.perf_counter() - t0) if r else best[key]
    return best
