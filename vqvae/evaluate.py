"""evaluate: reconstruction quality of a trained tokenizer on its validation split, logged onto its own run.

Metrics (prefix ``eval/``, at the checkpoint's training step): ``psnr`` (dB, per image then averaged; identical
images score ``PSNR_CAP`` = 100 dB instead of infinity), ``ssim`` (11x11 Gaussian window, sigma 1.5),
``lpips`` (VGG16; only when its torchvision weights are in the torch hub cache), ``codebook_usage`` and
``perplexity`` of the validation codes, ``rfid`` (Inception FID of reconstructions against originals; only
when torch-fidelity and its Inception weights are available locally), ``num_images``. A metric that cannot be
computed offline is skipped with a note in tag ``eval/<metric>_note`` and on stderr. Artifacts:
``eval/per_image.csv`` and ``eval/worst.png`` (lowest-PSNR originals on top, reconstructions below).
"""
from __future__ import annotations

import importlib
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

from core.data import ImageDataset, read_manifest, resolve_workers
from core.errors import UserError
from core.images import comparison_grid
from core.options import WORKERS_HELP, Config, build_config, config_options, explicit_options, note_unused, opt
from core.runtime import setup_runtime
from core.tracking import artifact_folder, connect, resolve_run_ids, with_tracking_options
from vqvae.quantize import usage_stats
from vqvae.tokenizer import Tokenizer, load_tokenizer

PSNR_CAP = 100.0  # dB for identical images (MSE 0), where PSNR is infinite
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


@dataclass
class EvalConfig(Config):
    vqvae_run_id: str = opt(None, "Run ID of the train-vqvae stage to evaluate.")
    generate_run_id: str = opt(None, "Instead: a generate run whose samples to score (FID, Inception Score, "
                                     "precision/recall) against --manifest's images.")
    npz: str = opt(None, "With --generate-run-id: also write the samples to this .npz (arr_0, uint8 NHWC: the "
                         "file OpenAI's ADM evaluator reads).", applies=lambda c: bool(c.generate_run_id),
                         needs="--generate-run-id")
    feature_extractor: str = opt("inception-v3-compat", "With --generate-run-id: torch-fidelity feature extractor "
                                 "(inception-v3-compat gives the published FID/IS).",
                                 applies=lambda c: bool(c.generate_run_id), needs="--generate-run-id")
    manifest: str = opt(None, "Manifest whose val split to use (default: the tokenizer's, split as in training).")
    max_images: int = opt(None, "Evaluate at most this many val images (default: all).", ge=1)
    batch_size: int = opt(32, "Images per batch.", ge=1)
    num_workers: int = opt(None, WORKERS_HELP, ge=0)
    skip_bad_images: bool = opt(False, "Skip missing/unreadable images.")
    fid: bool = opt(True, "Compute rFID (needs torch-fidelity and its Inception weights offline; biased upwards "
                          "on few images).")
    worst: int = opt(8, "Images in the worst-PSNR grid eval/worst.png.", ge=1)
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = opt("fp32", "Autocast precision of the tokenizer's encode and decode (metrics in fp32).",
                         choices=["fp32", "bf16", "fp16"])


def psnr(x: torch.Tensor, y: torch.Tensor, cap: float = PSNR_CAP) -> torch.Tensor:
    """Per-image PSNR in dB of (B,C,H,W) images in [-1, 1] (peak = full range), at most ``cap``."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).clamp(max=cap)  # mse 0 gives +inf, clamped to the cap


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (B,C,H,W) images in [-1, 1] (Gaussian window 11, sigma 1.5, on [0, 1] data)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure((x.float() + 1) / 2, (y.float() + 1) / 2, data_range=1.0,
                                               reduction="none")


def per_image_metrics(x: torch.Tensor, xrec: torch.Tensor,
                      lpips: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and (given an LPIPS module) LPIPS per image, as CPU tensors of shape (B,)."""
    out = {"psnr": psnr(xrec, x), "ssim": ssim(xrec, x)}
    if lpips is not None:
        out["lpips"] = lpips(x, xrec).flatten(1).mean(1)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def load_lpips(device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    """(LPIPS module, None), or (None, why not) when its VGG16 weights are neither cached nor downloadable."""
    from vqvae.losses import LPIPSLoss, fetch_vgg16

    try:  # downloads the VGG16 weights into the torch hub cache when missing
        fetch_vgg16(without="")  # offline: no training option to suggest, evaluate goes on without LPIPS
        return LPIPSLoss(backbone="pretrained").to(device), None
    except UserError as exc:  # offline without the weights, or an unreadable weights file
        return None, f"LPIPS skipped: {exc.message}"


def inception_weights() -> tuple[Path | None, str | None]:
    """(weights file, None), or (None, why not): FID needs torch-fidelity and its Inception file in the hub cache."""
    try:
        importlib.import_module("torch_fidelity")  # only checking that torchmetrics' FID backend is installed
    except ImportError:
        return None, "rFID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        return None, f"rFID skipped: Inception weights not found at {path} (download {INCEPTION_URL} there)"
    return path, None


def keep_worst(worst: tuple[torch.Tensor, ...] | None, batch: tuple[torch.Tensor, ...],
               k: int) -> tuple[torch.Tensor, ...]:
    """The ``k`` lowest-PSNR (psnr, original, reconstruction) rows of ``worst`` and ``batch`` together."""
    merged = batch if worst is None else tuple(torch.cat(p) for p in zip(worst, batch))
    keep = merged[0].argsort()[:k]
    return tuple(t[keep] for t in merged)


def val_paths(tok: Tokenizer, cfg: EvalConfig) -> list[str]:
    manifest = cfg.manifest or tok.manifest
    if manifest is None:
        raise UserError(f"tokenizer run {cfg.vqvae_run_id} was not trained on a manifest (imported); pass --manifest")
    if not Path(manifest).is_file():
        raise UserError(f"the tokenizer's manifest {manifest} no longer exists; pass --manifest"
                        if not cfg.manifest else f"manifest not found: {manifest}")
    df, _ = read_manifest(manifest, tok.val_fraction, cfg.skip_bad_images)
    paths = df.loc[df["split"] == "val", "image_path"].tolist()[: cfg.max_images]
    if not paths:
        raise UserError(f"manifest {manifest} has no val images to evaluate (val fraction {tok.val_fraction}); "
                        "pass --manifest with a split column that marks some rows 'val'")
    return paths


def evaluate(cfg: EvalConfig, tracking_uri: str | None = None, experiment: str | None = None) -> dict[str, float]:
    """Evaluate the tokenizer of ``cfg.vqvae_run_id`` and log the results onto that run; returns the metrics."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    rt = setup_runtime(cfg.device, cfg.precision)
    connect(tracking_uri, experiment)
    cfg = resolve_run_ids(cfg)
    tok = load_tokenizer(cfg.vqvae_run_id, rt.device)
    paths = val_paths(tok, cfg)
    lpips, lpips_note = load_lpips(rt.device)
    fid, fid_note = None, "rFID skipped: --no-fid"
    if cfg.fid:
        weights, fid_note = inception_weights()
        if weights is not None and len(paths) < 2:
            fid_note = "rFID skipped: it needs at least 2 images"
        elif weights is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(feature=2048, normalize=True,
                                           feature_extractor_weights_path=str(weights)).to(rt.device)

    loader = DataLoader(ImageDataset(paths, tok.cfg.image_size, train=False), batch_size=cfg.batch_size,
                        num_workers=resolve_workers(cfg.num_workers), pin_memory=rt.pin_memory())
    rows: dict[str, list[torch.Tensor]] = {}
    codes, worst = [], None  # worst: (psnr, originals, reconstructions) of the lowest-PSNR images so far
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc="evaluate", dynamic_ncols=True):
            x = x.to(rt.device, non_blocking=rt.pin_memory())
            with rt.autocast():
                idx = tok.encode(x)
                xrec = tok.decode(idx).float()
            codes.append(idx.cpu())
            m = per_image_metrics(x, xrec, lpips)
            for k, v in m.items():
                rows.setdefault(k, []).append(v)
            if fid is not None:
                fid.update((x + 1) / 2, real=True)
                fid.update((xrec + 1) / 2, real=False)
            # keep only the worst few so far: every image would not fit in memory on big sets
            worst = keep_worst(worst, (m["psnr"], x.cpu(), xrec.cpu()), cfg.worst)
    per_image = {k: torch.cat(v).numpy() for k, v in rows.items()}
    _, used, ppl = usage_stats(np.bincount(torch.cat(codes).numpy().reshape(-1), minlength=tok.codebook_size))
    metrics = {f"eval/{k}": float(np.mean(v)) for k, v in per_image.items()}
    metrics.update({"eval/codebook_usage": used, "eval/perplexity": ppl, "eval/num_images": len(paths),
                    "eval/images_per_sec": len(paths) / max(time.perf_counter() - t0, 1e-9)})
    if fid is not None:
        metrics["eval/rfid"] = float(fid.compute())

    client = mlflow.MlflowClient()
    run_id = cfg.vqvae_run_id
    notes = {"eval/lpips_note": lpips_note, "eval/rfid_note": fid_note}
    old_tags = client.get_run(run_id).data.tags
    for key, note in notes.items():
        if note:
            click.echo(f"note: {note}", err=True)
        elif key in old_tags:
            client.delete_tag(run_id, key)  # a note from an earlier evaluation no longer applies
    step, now = tok.step, int(time.time() * 1000)  # the weights' training step: re-evaluations line up
    # Log through the client by run ID: re-opening the run with start_run would change its FINISHED status.
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in notes.items() if v]
                     + [RunTag("eval/manifest", str(cfg.manifest or tok.manifest))])
    with artifact_folder(run_id, "eval") as out:
        pd.DataFrame({"image_path": paths, **per_image}).to_csv(out / "per_image.csv", index=False)
        comparison_grid(worst[1], worst[2]).save(out / "worst.png")
    click.echo(", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()), err=True)
    return metrics


@click.command("evaluate")
@config_options(EvalConfig)
@with_tracking_options
@click.pass_context
def evaluate_command(ctx: click.Context, tracking_uri: str | None, experiment: str, **values: Any) -> None:
    """Measure a tokenizer's reconstructions on its val split; logs eval/* onto its run (prints the run ID last).

    With --generate-run-id and --manifest: FID, Inception Score and precision/recall of a generate run's samples
    against the manifest's images (torch-fidelity), logged as gen/* onto the generate run.

    PSNR of identical images is capped at 100 dB. LPIPS and rFID need pretrained weights in the torch hub
    cache; without them they are skipped with a note (tag eval/<metric>_note), not an error.
    """
    cfg = build_config(EvalConfig, values)
    note_unused(cfg, explicit_options(ctx, values))
    if cfg.generate_run_id:
        from vqvae.sample_metrics import generation_metrics

        if not cfg.manifest:
            raise UserError("--generate-run-id needs --manifest: the reference images the samples are scored against")
        rt = setup_runtime(cfg.device)
        connect(tracking_uri, experiment)
        run_id = resolve_run_ids(cfg).generate_run_id
        generation_metrics(run_id, cfg.manifest, rt.device, cfg.batch_size, cfg.max_images, cfg.feature_extractor,
                           cfg.npz)
        click.echo(run_id)
        return
    if not cfg.vqvae_run_id:
        raise UserError("--vqvae-run-id is required (the run ID printed by train-vqvae)")
    evaluate(cfg, tracking_uri, experiment)
    click.echo(cfg.vqvae_run_id)
