"""quantize: encode a manifest's images into code grids, stored as artifacts of a new run (tag stage=quantize).

Artifacts: ``codes/<split>.npy`` (N,h,w; uint16 when the codebook fits; with --flip also
``codes/train_flip.npy``, the flipped training images' codes, row for row), ``index.csv`` (split, row → image_path,
label, label_id), ``vocab.json`` (codebook size, grid shape and class names: what the codes are; the
transformer lays out its own tokens from it), ``codebook_usage.png``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
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

from core.data import SPLITS, ImageDataset, cache_dir, data_fingerprint, read_manifest_on_ranks, resolve_workers
from core.errors import UserError
from core.options import WORKERS_HELP, Config, build_config, config_options, opt
from core.runtime import broadcast_from_main, gather_rows, release_free_memory, setup_runtime, teardown
from core.tracking import (check_resumed_data, connect, data_name, get_run, log_manifest, resolve_run_ids,
                           run_name_option, stage_run, with_tracking_options)
from vqvae.codegrids import CodeGrids
from vqvae.tokenizer import Tokenizer, load_tokenizer


@dataclass
class QuantizeConfig(Config):
    vqvae_run_id: str = opt(None, "Run ID of the train-vqvae stage (or models:/NAME/VERSION, models:/NAME@ALIAS).")
    manifest: str = opt(None, "CSV manifest to encode (default: the tokenizer's).")
    batch_size: int = opt(64, "Images per batch.", ge=1)
    num_workers: int = opt(None, WORKERS_HELP, ge=0)
    skip_bad_images: bool = opt(False, "Skip missing/unreadable images.")
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = opt("fp32", "Autocast precision.", choices=["fp32", "bf16", "fp16"])
    flip: bool = opt(False, "Also store the codes of the horizontally flipped training images "
                            "(codes/train_flip.npy; train then picks one of the two per sample, LlamaGen's augmentation).")
    verify: bool = opt(True, "Open every image once to check it (cached per manifest content); --no-verify skips it.")


def sorted_classes(labels: pd.Series) -> tuple[str, ...]:
    """Class names in a stable order: numeric labels numerically ("2" before "10"), others alphabetically."""
    names = sorted({str(x) for x in labels.dropna()})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return tuple(names)


def usage_stats(counts: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(counts per code, fraction of codes used, perplexity) from the count of each code."""
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


PROGRESS = "progress.json"  # in the work folder: rows already encoded per split, written after their codes


def work_folder(run_id: str) -> Path:
    """Where a quantize run's codes grow (memory-mapped) until they are uploaded; `--resume` continues there."""
    return cache_dir("quantize", run_id)


def save_progress(work: Path, state: dict) -> None:
    """The durable progress marker: written (atomically) only after the codes it counts are flushed to disk, so
    after a kill it never claims rows that are not there."""
    tmp = work / f"{PROGRESS}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, work / PROGRESS)


def usage_from_files(paths: list[Path], codebook_size: int, chunk: int = 4096) -> tuple[np.ndarray, float, float]:
    """`usage_stats` of code files read a chunk of grids at a time (the codes are never all in memory)."""
    counts = np.zeros(codebook_size, dtype=np.int64)
    for path in paths:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        for lo in range(0, len(arr), chunk):
            counts += np.bincount(np.asarray(arr[lo:lo + chunk]).reshape(-1), minlength=codebook_size)
    return usage_stats(counts)


def rank_rows(lo: int, n: int, batch_size: int, rt) -> range:
    """Rows this rank encodes in the round starting at row ``lo``: its own batch of the ranks' consecutive ones."""
    start = min(lo + rt.rank * batch_size, n)
    return range(start, min(start + batch_size, n))


def encode_split(tok: Tokenizer, paths: list[str], arrays: list[np.ndarray], start: int, cfg: QuantizeConfig,
                 rt, desc: str, on_round) -> int:
    """Encode images ``start``.. into ``arrays`` (the codes, then with --flip those of the flipped images), a round
    at a time: each rank encodes its own batch, rank 0 gathers the round (fixed-size tensors, nothing pickled)
    and writes it, then calls ``on_round(rows done)``. Returns the images this process encoded."""
    n, bs, world = len(paths), cfg.batch_size, rt.world_size
    rounds = range(start, n, bs * world)
    # a rank past the end still takes part in the round's gather: it encodes a stand-in image and sends padding
    batches = [list(rank_rows(lo, n, bs, rt)) or [0] for lo in rounds]
    loader = DataLoader(ImageDataset(paths, tok.cfg.image_size, train=False), batch_sampler=batches,
                        num_workers=resolve_workers(cfg.num_workers), pin_memory=rt.pin_memory())
    views = len(arrays)
    encoded = 0
    with torch.inference_mode():
        for lo, (x, _) in tqdm(zip(rounds, loader), total=len(rounds), desc=desc, dynamic_ncols=True,
                               disable=not rt.is_main):
            x = x.to(rt.device, non_blocking=rt.pin_memory())
            if views == 2:
                x = torch.cat([x, x.flip(-1)])
            with rt.autocast():
                codes = tok.encode(x).view(views, len(x) // views, *tok.grid_shape)
            encoded += len(rank_rows(lo, n, bs, rt))
            if rt.distributed:
                padded = codes.new_zeros(views, bs, *tok.grid_shape)
                padded[:, :codes.shape[1]] = codes
                codes = gather_rows(rt, padded, dim=1)  # rank r's batch at [r*bs, (r+1)*bs)
            if rt.is_main:
                hi = min(lo + bs * world, n)
                host = codes[:, :hi - lo].cpu().numpy()
                for arr, part in zip(arrays, host):
                    arr[lo:hi] = part
                on_round(hi)
    return encoded


def quantize(cfg: QuantizeConfig, tracking_uri: str | None = None, experiment: str | None = None,
             resume_run_id: str | None = None) -> str:
    """Encode the manifest into code grids, streamed into memory-mapped files in a work folder (`work_folder`)
    with a progress marker after every round, so that ``resume_run_id`` continues a killed run where it stopped;
    under torchrun every rank encodes its share and rank 0 writes and talks to MLflow."""
    rt = setup_runtime(cfg.device, cfg.precision)
    try:
        return _quantize(rt, cfg, tracking_uri, experiment, resume_run_id)
    finally:
        teardown(rt)


def _quantize(rt, cfg: QuantizeConfig, tracking_uri: str | None, experiment: str | None,
              resume_run_id: str | None) -> str:
    import matplotlib.pyplot as plt
    import mlflow

    connect(tracking_uri, experiment, read_only=not rt.is_main)
    progress = None
    if rt.is_main:
        if resume_run_id:
            resume_run_id = get_run(resume_run_id, "quantize").info.run_id
            marker = work_folder(resume_run_id) / PROGRESS
            if not marker.is_file():
                raise UserError(f"quantize run {resume_run_id} has no progress on this machine ({marker} is "
                                "missing: it finished, or ran elsewhere); quantize again without --resume")
            progress = json.loads(marker.read_text())
            cfg = dataclasses.replace(QuantizeConfig(**progress["config"]), device=cfg.device,
                                      num_workers=cfg.num_workers)
        cfg = resolve_run_ids(cfg)
    (cfg, progress) = broadcast_from_main(rt, cfg, progress)  # a config and row counts: small
    # everything checkable is checked before the run exists: the tokenizer run, the manifest and its images
    get_run(cfg.vqvae_run_id, "vqvae")
    tok = load_tokenizer(cfg.vqvae_run_id, rt.device)
    manifest = cfg.manifest or tok.manifest
    if manifest is None:
        raise UserError(f"tokenizer run {cfg.vqvae_run_id} was not trained on a manifest (imported); "
                        "pass --manifest")
    if not cfg.manifest and not Path(manifest).is_file():
        raise UserError(f"the tokenizer's manifest {manifest} no longer exists; pass --manifest")
    if rt.is_main:
        cache_dir("quantize")  # where the codes will grow: a folder that cannot be made fails before the run
        if resume_run_id:
            check_resumed_data(resume_run_id, manifest, "quantize again without --resume")
    df, skipped = read_manifest_on_ranks(rt, manifest, tok.val_fraction, cfg.skip_bad_images, cfg.verify)
    with stage_run("quantize", cfg, upstream_run_id=cfg.vqvae_run_id, upstream_stage="vqvae",
                   resume_run_id=resume_run_id, enabled=rt.is_main,
                   data=data_name(cfg.manifest) if cfg.manifest else None) as run:
        classes = sorted_classes(df["label"])
        grids = CodeGrids(tok.codebook_size, tuple(tok.grid_shape), classes)
        df["label_id"] = df["label"].map({name: i for i, name in enumerate(classes)}).fillna(-1).astype(int)
        # the image paths per split are all that encoding needs: the frame is written out (index.csv) and dropped
        # before any image is encoded, so that nothing per image but its path stays in memory
        parts = [df[df.split == split].assign(row=lambda part: np.arange(len(part))) for split in SPLITS]
        paths = {split: part["image_path"].tolist() for split, part in zip(SPLITS, parts)}
        (run_id,) = broadcast_from_main(rt, run.info.run_id if run else None)
        work = work_folder(run_id) if rt.is_main else None
        out = work / "artifacts" if work else None
        files: dict[str, list[Path]] = {}
        num_images = len(df)
        if rt.is_main:
            if progress is None:
                log_manifest(df, str(manifest), "quantize")
                mlflow.set_tag("data_fingerprint", data_fingerprint(manifest))  # what pipeline reuse is keyed on
                mlflow.set_tag("quantize_work_dir", str(work))
                progress = {"config": dataclasses.asdict(cfg), "done": {"train": 0, "val": 0}}
                (out / "codes").mkdir(parents=True, exist_ok=True)
            pd.concat(parts)[["split", "row", "image_path", "label", "label_id"]].to_csv(out / "index.csv", index=False)
            for split, part in paths.items():
                names = [f"{split}.npy"] + ([f"{split}_flip.npy"] if cfg.flip and split == "train" else [])
                files[split] = [out / "codes" / name for name in names]
                for path in files[split]:
                    if not path.is_file():  # preallocated: the disk space is claimed before any work
                        np.lib.format.open_memmap(path, mode="w+", dtype=grids.code_dtype,
                                                  shape=(len(part), *grids.grid_shape)).flush()
            save_progress(work, progress)
        del df, parts
        release_free_memory()
        (progress,) = broadcast_from_main(rt, progress)  # where every rank starts: row counts, small
        t0, encoded = time.perf_counter(), 0
        for split, split_paths in paths.items():
            arrays = ([np.lib.format.open_memmap(p, mode="r+") for p in files[split]] if rt.is_main
                      else [None] * (2 if cfg.flip and split == "train" else 1))

            def on_round(done: int, split=split, arrays=arrays) -> None:
                for arr in arrays:
                    arr.flush()  # the codes reach the disk before the marker that counts them
                progress["done"][split] = done
                save_progress(work, progress)

            encoded += encode_split(tok, split_paths, arrays, progress["done"][split], cfg, rt, split,
                                    on_round)
            del arrays
        elapsed = time.perf_counter() - t0
        if not rt.is_main:
            return ""
        (out / "vocab.json").write_text(grids.to_json())
        counts, used, ppl = usage_from_files(files["train"][:1] + files["val"], tok.codebook_size)
        mlflow.log_metrics({"quantize/codebook_usage": used, "quantize/perplexity": ppl, "data/num_images": num_images,
                            "data/skipped_images": skipped,
                            "quantize/images_per_sec": encoded / max(elapsed, 1e-9)})
        fig = usage_figure(counts)
        mlflow.log_figure(fig, "codebook_usage.png")
        plt.close(fig)
        mlflow.log_artifacts(str(out))
        shutil.rmtree(work, ignore_errors=True)  # uploaded: nothing is left to resume
        return run.info.run_id


@click.command("quantize")
@config_options(QuantizeConfig)
@click.option("--resume", "resume_run_id", default=None,
              help="Continue this quantize run (killed or failed) after the last images it stored.")
@run_name_option
@with_tracking_options
def quantize_command(tracking_uri: str | None, experiment: str, resume_run_id: str | None, **values: Any) -> None:
    """Encode a dataset into code grids with a trained tokenizer (prints the run ID last)."""
    cfg = build_config(QuantizeConfig, values)
    if not cfg.vqvae_run_id and not resume_run_id:
        raise UserError("--vqvae-run-id is required (the run ID printed by train-vqvae)")
    quantize(cfg, tracking_uri, experiment, resume_run_id)
