"""demo: the whole pipeline on scikit-learn's bundled handwritten digits: offline, minutes on a CPU."""
from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image

from core.tracking import download, run_name_option, run_page, with_tracking_options
from workflows.pipeline import register_models, register_option, run_pipeline

IMAGE_SIZE = 32  # the 8x8 digits are upscaled 4x (bicubic); benchmarks/demo_quality.py undoes it with a 4x4 box
SAMPLES_PER_DIGIT = 4
MANIFEST = "digits.csv"  # its file name names the data in run names: vqvae-digits-...

# Tuned with benchmarks/demo_quality.py: about 4.5 minutes on 2 CPU cores; a digit classifier reads ~93% of the
# samples as the digit asked for (8 is the weakest).
# f=4 gives an 8x8 code grid; low-dimensional l2-normalised codes with restarts keep the codebook in use;
# no GAN and no LPIPS (its VGG weights need a download): plain L1 is enough for blurry digits.
FULL: dict[str, dict[str, Any]] = {
    "vqvae": {"image_size": IMAGE_SIZE, "ch": 16, "ch_mult": "1,2,2", "z_channels": 32, "embed_dim": 32,
              "codebook_size": 128, "code_dim": 8, "l2_norm": True, "ema": False, "restart_after": 100,
              "ema_weights": 0.0,  # measured (99%) without the weight average, the tokenizer default since
              "perceptual_weight": 0.0, "disc_start": 10**9, "flip": False,  # a mirrored digit is another glyph
              "batch_size": 32, "max_steps": 800, "lr": 5e-4, "log_every": 20, "val_every": 200,
              "ckpt_every": 800},
    "quantize": {"batch_size": 256, "num_workers": 0},
    "train": {"n_layer": 4, "n_head": 4, "n_embd": 64, "window_size": 5, "max_steps": 1500, "batch_size": 32,
              "lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 100, "log_every": 20, "val_every": 500,
              "sample_every": 0, "ckpt_every": 1500},
    # top-k off: with best-of-4 it lowers accuracy here (92% -> 87% with top-k 20, the generate default)
    "generate": {"num_samples": 10 * SAMPLES_PER_DIGIT, "cfg_scale": 3.0, "best_of": 4, "top_k": 0},  # labels 0..9
    "decode": {"nrow": 10},  # one digit per column, one sample of each digit per row
}
QUICK: dict[str, dict[str, Any]] = {
    "vqvae": {**FULL["vqvae"], "ch": 8, "z_channels": 8, "embed_dim": 8, "codebook_size": 32, "max_steps": 20,
              "log_every": 5, "val_every": 20, "ckpt_every": 20},
    "quantize": FULL["quantize"],
    "train": {**FULL["train"], "n_layer": 1, "n_embd": 32, "max_steps": 20, "lr_warmup_steps": 5, "log_every": 5,
              "val_every": 20, "ckpt_every": 20},
    "generate": FULL["generate"],
    "decode": FULL["decode"],
}


def write_digits(out: Path, per_digit: int | None = None) -> Path:
    """Write the digits as 32x32 grayscale PNGs plus the manifest ``digits.csv`` (every 8th image of a digit: val;
    its name names the runs: vqvae-digits-...)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, seen = ["image_path,label,split"], Counter()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if per_digit is not None and seen[label] >= per_digit:
            continue
        name = f"images/{i:04d}.png"
        gray = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8))  # ink levels 0..16
        gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).save(out / name)
        rows.append(f"{name},{label},{'val' if seen[label] % 8 == 7 else 'train'}")
        seen[label] += 1
    manifest = out / MANIFEST
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def ui_command(tracking_uri: str) -> str:
    """How to look at the runs: the `mlflow ui` command for a local store, the address for a server."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    if tracking_uri.startswith("sqlite:///"):  # absolute, so it works from any directory
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):]).resolve())
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI (`mlflow ui` serves on port 5000), in MLflow 3's "Model training" view rather
    than the GenAI overview it opens on."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/{run_page(experiment_id, run_id)}"


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_data"),
              show_default=True, help="Folder for the digit images, the manifest and the sample grid.")
@click.option("--quick", is_flag=True, help="Tiny models on 300 of the 1797 digits: the same path in under a "
                                            "minute, with unrecognisable samples (for tests).")
@click.option("--force", is_flag=True, help="Re-run every stage even where an identical finished run exists.")
@register_option
@run_name_option
@with_tracking_options
def demo_command(out: Path, quick: bool, force: bool, register_prefix: str | None, tracking_uri: str | None,
                 experiment: str) -> None:
    """Train and sample the whole pipeline on built-in handwritten digits (prints the decode run ID last)."""
    import mlflow

    # Tiny models gain little from a second intra-op thread, and on a 2-core machine that is busy with anything
    # else each op then waits for the slower thread: measured 10.6 min for the demo instead of 4.3 min.
    torch.set_num_threads(1)
    click.echo(f"[0/5] writing the digits to {out}", err=True)
    manifest = write_digits(out, per_digit=30 if quick else None)
    settings = {**(QUICK if quick else FULL)}
    settings["vqvae"] = {**settings["vqvae"], "manifest": str(manifest)}
    command = "python cli.py demo" + " --quick" * quick + f" --out {shlex.quote(str(out.resolve()))}"
    run_ids = run_pipeline(settings, force, tracking_uri, experiment, command, ("demo-quick",) if quick else ("demo",))
    if register_prefix:
        register_models(run_ids, register_prefix)
    grid = download(run_ids["pipeline"], "grid.png", out)
    click.echo(f"samples: {grid.resolve()} ({SAMPLES_PER_DIGIT} per digit, digits 0-9 left to right)")
    click.echo(f"browse:  {ui_command(mlflow.get_tracking_uri())}")
    parent = mlflow.MlflowClient().get_run(run_ids["pipeline"])
    click.echo(f"then:    {run_url(mlflow.get_tracking_uri(), parent.info.experiment_id, parent.info.run_id)}")
    click.echo(run_ids["decode"])
