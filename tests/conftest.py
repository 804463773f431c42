"""Shared fixtures: tiny generated image sets, an isolated MLflow store, and CLI runners (no network)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Tiny models on a 2-core machine: one intra-op thread avoids oversubscription (≈10× faster here).
torch.set_num_threads(1)
sys.path.insert(0, str(ROOT))

# A tokenizer small enough to train a few steps on CPU in about a second.
TINY_VQ = ["--image-size", "16", "--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "8",
           "--embed-dim", "8", "--codebook-size", "32", "--perceptual-weight", "0", "--batch-size", "8",
           "--disc-start", "2", "--disc-layers", "2", "--val-every", "2", "--ckpt-every", "2", "--log-every", "1", "--val-batches", "1",
           "--num-workers", "0"]

# The tiny transformer of the acceptance checks (options given later on a command line override these).
TINY_GPT = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "8", "--max-steps", "2",
            "--val-every", "1", "--sample-every", "0", "--ckpt-every", "1", "--log-every", "1"]


def make_image_set(folder: Path, n: int = 24, size: int = 20, classes: tuple[str, ...] = ("red", "blue"),
                   seed: int = 0, with_split: bool = True) -> Path:
    """Write ``n`` small PNGs (a coloured square per class on a noisy background) and a manifest CSV."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60)}
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        arr[y:y + size // 2, x:x + size // 2] = colours.get(label, (200, 200, 200))
        name = f"img/{label}_{i:03d}.png"
        Image.fromarray(arr).save(folder / name)
        split = "val" if i % 6 == 5 else "train"
        rows.append(f"{name},{label},{split}" if with_split else f"{name},{label}")
    header = "image_path,label,split" if with_split else "image_path,label"
    manifest = folder / "manifest.csv"
    manifest.write_text(header + "\n" + "\n".join(rows) + "\n")
    return manifest


@pytest.fixture(autouse=True)
def no_network_downloads(monkeypatch):
    """Tests never touch the network: torch hub downloads (VGG16 for LPIPS, ...) fail as they do offline; a test of
    the download path mocks it itself."""
    import urllib.error

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture(autouse=True)
def no_inherited_experiment():
    """MLflow's set_experiment (every in-process stage) exports MLFLOW_EXPERIMENT_ID for child processes: drop it
    after each test, so a later test's subprocess with a store of its own does not inherit another store's
    experiment (which of them ran first depends on how the tests are spread over the workers)."""
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def tracking_dir(tmp_path_factory) -> Path:
    """One SQLite tracking store per test session, created up front (concurrent first use fails)."""
    import mlflow

    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["TAMING_CACHE_DIR"] = str(d / "cache")  # verified manifests, quantize work folders: not in ~/.cache
    # a SQLite store puts artifacts under ./mlruns of the working directory, resolved when the store is first
    # made: move there first, to keep them out of the checkout
    os.chdir(d)
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().search_experiments()
    return d


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_image_set(tmp_path_factory.mktemp("data"))


def invoke(*args: str):
    """Run `cli.py ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, script: str = "cli.py",
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command as a separate process, as a user's shell would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1].strip()


def image_steps(run_id: str, key: str) -> list[int]:
    """The steps of the run's ``log_image(key=, step=)`` images: the marks of its image card's slider in the UI."""
    import mlflow

    paths = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "images")]
    return sorted(int(m[1]) for p in paths if p.endswith(".png")
                  and (m := re.match(rf"images/{re.escape(key)}[+%]step[+%](\d+)[+%]", p)))


def error_line(stderr: str) -> str:
    """A failed command's one-line error: stderr holds nothing else but progress bars, MLflow's own logs and the
    note naming options that do nothing (TINY_VQ's GAN options in runs shorter than --disc-start)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines()
             if line.strip() and "%|" not in line and not re.match(r"\d{4}/\d\d/\d\d [\d:]+ [A-Z]+ mlflow", line)
             and not line.startswith("note: ignored (not used, not logged): ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


@pytest.fixture(scope="session")
def vqvae_run(tracking_dir, dataset) -> str:
    """A tiny trained tokenizer shared by the tests that only need one to exist."""
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "4")
    assert res.exit_code == 0, res.output
    return last_line(res.stdout)


@pytest.fixture(scope="module")
def quantize_run(vqvae_run) -> str:
    """The shared tokenizer's quantize run (one per test module that asks for it)."""
    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    return last_line(res.stdout)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped here, run by benchmarks/gpu_check.py on a CUDA machine."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
