"""decode: turn code grids (of a generate or quantize run, or a .npy file) into images in a new run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from core.artifacts import read_codes
from core.errors import UserError
from core.images import grid_image, to_pil
from core.options import Config, build_config, config_options, opt
from core.runtime import setup_runtime
from core.tracking import (artifact_folder, connect, download, find_upstream, get_run, resolve_run_ids, run_name_option,
                           stage_run, with_tracking_options)
from vqvae.tokenizer import load_tokenizer

SAMPLES_ARTIFACT = "samples/codes.npy"  # written by `generate`
GRID_MAX = 64  # images in the logged grid, however many are decoded


@dataclass
class DecodeConfig(Config):
    run_id: str = opt(None, "A generate or quantize run whose code grids to decode.")
    indices: str = opt(None, ".npy file of code grids (N,h,w) from elsewhere (needs --vqvae-run-id).")
    vqvae_run_id: str = opt(None, "Tokenizer run for --indices (or models:/NAME/VERSION, models:/NAME@ALIAS).")
    split: str = opt("val", "Split to decode from a quantize run.", choices=["train", "val"])
    max_images: int = opt(64, "Decode at most this many grids.", ge=1)
    nrow: int = opt(8, "Images per row in the grid.", ge=1)
    batch_size: int = opt(32, "Grids decoded per batch.", ge=1)
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])


def load_codes(path: Path, run_id: str | None = None, name: str | None = None) -> np.ndarray:
    """Code grids of a .npy file (artifact ``name`` of ``run_id``, or a user's file), memory-mapped: batches are
    read (and cast) as they are decoded; never unpickles."""
    return read_codes(path, run_id, name or str(path), mmap=True)


def source_codes(cfg: DecodeConfig) -> tuple[np.ndarray, str]:
    """(code grids, tokenizer run ID) for the chosen input."""
    if cfg.indices:
        if not cfg.vqvae_run_id:
            raise UserError("--indices needs --vqvae-run-id (the tokenizer that made the codes)")
        if not Path(cfg.indices).is_file():
            raise UserError(f"indices file not found: {cfg.indices}")
        get_run(cfg.vqvae_run_id, "vqvae")
        return load_codes(Path(cfg.indices)), cfg.vqvae_run_id
    if not cfg.run_id:
        raise UserError("pass --run-id (a generate or quantize run) or --indices with --vqvae-run-id")
    stage = get_run(cfg.run_id).data.tags.get("stage")
    if stage == "generate":
        codes = load_codes(download(cfg.run_id, SAMPLES_ARTIFACT), cfg.run_id, SAMPLES_ARTIFACT)
    elif stage == "quantize":
        codes = load_codes(download(cfg.run_id, f"codes/{cfg.split}.npy"), cfg.run_id, f"codes/{cfg.split}.npy")
    else:
        raise UserError(f"run {cfg.run_id} is a {stage or 'non-toolkit'} run, but decode needs a generate or "
                        "quantize run")
    return codes, find_upstream(cfg.run_id, "vqvae").info.run_id


def decode(cfg: DecodeConfig, tracking_uri: str | None = None, experiment: str | None = None) -> str:
    import mlflow

    rt = setup_runtime(cfg.device)
    connect(tracking_uri, experiment)
    cfg = resolve_run_ids(cfg)
    upstream = cfg.run_id or cfg.vqvae_run_id
    # the input is read and checked before the run exists: a mistake leaves no run
    codes, vqvae_run = source_codes(cfg)
    tok = load_tokenizer(vqvae_run, rt.device)
    if len(codes) == 0:
        raise UserError("there are no code grids to decode")
    for lo in range(0, min(len(codes), cfg.max_images), 4096):  # read a chunk at a time: the file is memory-mapped
        tok.check_indices(torch.from_numpy(np.asarray(codes[lo:min(lo + 4096, cfg.max_images)], dtype=np.int64)))
    # params only where they apply: --split picks among a quantize run's grids; --max-images when it cuts
    quantized = not cfg.indices and get_run(cfg.run_id).data.tags.get("stage") == "quantize"
    drop = (() if quantized else ("split",)) + (("max_images",) if cfg.max_images >= len(codes) else ())
    codes = codes[: cfg.max_images]
    with stage_run("decode", cfg, upstream_run_id=upstream, drop_params=drop,
                   name=(Path(cfg.indices).stem,) if cfg.indices else ()) as run:
        preview = []
        with artifact_folder() as out:
            (out / "images").mkdir()
            # batch by batch: PNGs written as they are decoded, only the grid's first images kept in memory
            for lo in range(0, len(codes), cfg.batch_size):
                batch = torch.from_numpy(np.asarray(codes[lo:lo + cfg.batch_size], dtype=np.int64))
                images = tok.decode(batch.to(rt.device)).cpu()
                for i, img in enumerate(images, lo):
                    to_pil(img).save(out / "images" / f"{i:0{max(4, len(str(len(codes) - 1)))}d}.png")
                if lo < GRID_MAX:
                    preview.append(images[:GRID_MAX - lo])
            grid_image(torch.cat(preview), nrow=cfg.nrow).save(out / "grid.png")
        mlflow.log_metric("data/num_images", len(codes))
        return run.info.run_id


@click.command("decode")
@config_options(DecodeConfig)
@run_name_option
@with_tracking_options
def decode_command(tracking_uri: str | None, experiment: str, **values: Any) -> None:
    """Decode code grids into PNG images and a grid (prints the run ID last)."""
    decode(build_config(DecodeConfig, values), tracking_uri, experiment)
