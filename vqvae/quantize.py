"""quantize: encode a manifest's images into code grids, stored as artifacts of a new run (tag stage=quantize).

Artifacts: ``codes/<split>.npy`` (N,h,w; uint16 when the codebook fits), ``index.csv`` (split, row → image_path,
label, label_id), ``vocab.json`` (codebook size, grid shape and class names: what the codes are; the
transformer lays out its own tokens from it), ``codebook_usage.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.data import ImageDataset, read_manifest
from core.errors import UserError
from core.options import Config, build_config, config_options, opt
from core.runtime import setup_runtime
from core.tracking import (artifact_folder, connect, data_name, get_run, log_manifest, resolve_run_ids,
                           run_name_option, stage_run, with_tracking_options)
from vqvae.codegrids import CodeGrids
from vqvae.tokenizer import Tokenizer, load_tokenizer


@dataclass
class QuantizeConfig(Config):
    vqvae_run_id: str = opt(None, "Run ID of the train-vqvae stage (or models:/NAME/VERSION, models:/NAME@ALIAS).")
    manifest: str = opt(None, "CSV manifest to encode (default: the tokenizer's).")
    batch_size: int = opt(64, "Images per batch.", ge=1)
    num_workers: int = opt(2, "DataLoader worker processes.", ge=0)
    skip_bad_images: bool = opt(False, "Skip missing/unreadable images.")
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = opt("fp32", "Autocast precision.", choices=["fp32", "bf16", "fp16"])


def sorted_classes(labels: pd.Series) -> tuple[str, ...]:
    """Class names in a stable order: numeric labels numerically ("2" before "10"), others alphabetically."""
    names = sorted({str(x) for x in labels.dropna()})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return tuple(names)


def encode_images(tok: Tokenizer, paths: list[str], batch_size: int, num_workers: int, rt,
                  desc: str) -> np.ndarray:
    """Code grids (N,h,w) int64 for image files, batched, with pinned non-blocking host→device copies."""
    loader = DataLoader(ImageDataset(paths, tok.cfg.image_size, train=False), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=rt.device.type == "cuda")
    out = []
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=desc, dynamic_ncols=True):
            with rt.autocast():
                out.append(tok.encode(x.to(rt.device, non_blocking=True)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, *tok.grid_shape), dtype=np.int64)


def usage_stats(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, float, float]:
    """(counts per code, fraction of codes used, perplexity) over a set of code grids."""
    counts = np.bincount(codes.reshape(-1), minlength=codebook_size)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return counts, float((counts > 0).mean()), float(np.exp(-(nz * np.log(nz)).sum()))


def usage_figure(counts: np.ndarray):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax1.bar(np.arange(len(counts)), counts, width=1.0)
    ax1.set(title="code frequency", xlabel="code id", ylabel="count")
    ax2.plot(np.sort(counts)[::-1] + 1)
    ax2.set(title="codes by frequency (rank plot)", xlabel="rank", ylabel="count + 1", yscale="log")
    fig.tight_layout()
    return fig


def quantize(cfg: QuantizeConfig, tracking_uri: str | None = None, experiment: str | None = None) -> str:
    import matplotlib.pyplot as plt
    import mlflow

    rt = setup_runtime(cfg.device, cfg.precision)
    connect(tracking_uri, experiment)
    cfg = resolve_run_ids(cfg)
    # everything checkable is checked before the run exists: the tokenizer run, the manifest and its images
    get_run(cfg.vqvae_run_id, "vqvae")
    tok = load_tokenizer(cfg.vqvae_run_id, rt.device)
    manifest = cfg.manifest or tok.manifest
    if manifest is None:
        raise UserError(f"tokenizer run {cfg.vqvae_run_id} was not trained on a manifest (imported); "
                        "pass --manifest")
    if not cfg.manifest and not Path(manifest).is_file():
        raise UserError(f"the tokenizer's manifest {manifest} no longer exists; pass --manifest")
    df, skipped = read_manifest(manifest, tok.val_fraction, cfg.skip_bad_images)
    with stage_run("quantize", cfg, upstream_run_id=cfg.vqvae_run_id, upstream_stage="vqvae",
                   data=data_name(cfg.manifest) if cfg.manifest else None) as run:
        log_manifest(df, str(manifest), "quantize")
        classes = sorted_classes(df["label"])
        grids = CodeGrids(tok.codebook_size, tuple(tok.grid_shape), classes)
        df["label_id"] = [classes.index(str(x)) if not pd.isna(x) else -1 for x in df["label"]]
        with artifact_folder() as out:
            (out / "codes").mkdir()
            t0, all_codes, index = time.perf_counter(), [], []
            for split in ("train", "val"):
                part = df[df.split == split].reset_index(drop=True)
                codes = encode_images(tok, part.image_path.tolist(), cfg.batch_size, cfg.num_workers, rt, split)
                np.save(out / "codes" / f"{split}.npy", codes.astype(grids.code_dtype))
                index.append(part.assign(row=np.arange(len(part)))[["split", "row", "image_path", "label",
                                                                     "label_id"]])
                all_codes.append(codes)
            elapsed = time.perf_counter() - t0
            pd.concat(index).to_csv(out / "index.csv", index=False)
            (out / "vocab.json").write_text(grids.to_json())
        counts, used, ppl = usage_stats(np.concatenate([c.reshape(-1) for c in all_codes]), tok.codebook_size)
        mlflow.log_metrics({"quantize/codebook_usage": used, "quantize/perplexity": ppl, "data/num_images": len(df),
                            "data/skipped_images": skipped, "quantize/images_per_sec": len(df) / max(elapsed, 1e-9)})
        fig = usage_figure(counts)
        mlflow.log_figure(fig, "codebook_usage.png")
        plt.close(fig)
        return run.info.run_id


@click.command("quantize")
@config_options(QuantizeConfig)
@run_name_option
@with_tracking_options
def quantize_command(tracking_uri: str | None, experiment: str, **values: Any) -> None:
    """Encode a dataset into code grids with a trained tokenizer (prints the run ID last)."""
    cfg = build_config(QuantizeConfig, values)
    if not cfg.vqvae_run_id:
        raise UserError("--vqvae-run-id is required (the run ID printed by train-vqvae)")
    quantize(cfg, tracking_uri, experiment)
