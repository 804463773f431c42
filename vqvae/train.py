"""train-vqvae: train the VQGAN tokenizer from a CSV manifest as one MLflow run (tag stage=vqvae)."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import click
import torch
from torch.utils.data import DataLoader

from core.checkpoint import load_weights
from core.data import ImageDataset, ResumableSampler, read_manifest
from core.errors import UserError
from core.health import check_codebook
from core.images import grid_image
from core.loop import TrainLoop, training_session
from core.options import build_config, config_options, config_params, explicit_options
from core.runtime import Runtime, average_gradients, rng_state, set_rng_state
from core.tracking import log_manifest, stage_run, with_tracking_options
from vqvae.config import VQConfig
from vqvae.losses import VQGANLoss
from vqvae.model import VQModel

@torch.no_grad()
def validate(model: VQModel, loss_fn: VQGANLoss, loader: DataLoader, rt: Runtime, cfg: VQConfig,
             step: int) -> dict[str, float]:
    """Reconstruction metrics and codebook statistics on up to ``val_batches`` validation batches."""
    import mlflow

    model.eval()
    l1, mse_psnr, lp, n = 0.0, 0.0, 0.0, 0
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    first = None
    for b, (x, _) in enumerate(loader):
        if b >= cfg.val_batches:
            break
        x = x.to(rt.device, non_blocking=True)
        with rt.autocast():
            xrec, _, q = model(x)
        xrec = xrec.float().clamp(-1, 1)
        l1 += (xrec - x).abs().mean(dim=(1, 2, 3)).sum().item()
        mse = ((xrec - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        mse_psnr += (10 * torch.log10(1 / mse)).sum().item()
        if loss_fn.perceptual is not None:
            lp += loss_fn.perceptual(x, xrec).sum().item()
        counts += torch.bincount(q.indices.flatten().cpu(), minlength=model.codebook_size)
        n += x.shape[0]
        if first is None:
            first = (x[:8].cpu(), xrec[:8].cpu())
    model.train()
    probs = counts.float() / counts.sum().clamp_min(1)
    metrics = {"val/l1": l1 / n, "val/psnr": mse_psnr / n, "val/codebook_usage": (counts > 0).float().mean().item(),
               "val/perplexity": torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()).item()}
    if loss_fn.perceptual is not None:
        metrics["val/lpips"] = lp / n
    mlflow.log_metrics(metrics, step=step)
    # Originals on the top row, reconstructions below: the comparison people look for in the UI.
    mlflow.log_image(grid_image(torch.cat(first), nrow=first[0].shape[0]), key="reconstructions", step=step)
    return metrics


def train_vqvae(cfg: VQConfig, resume_run_id: str | None = None, overrides: dict | None = None,
                tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Train (or resume) a tokenizer; returns the MLflow run ID."""
    if cfg.manifest:  # absolute, so later stages find it from any working directory
        cfg = dataclasses.replace(cfg, manifest=str(Path(cfg.manifest).resolve()))
    with training_session(cfg, "vqvae", resume_run_id, overrides, tracking_uri, experiment) as session:
        return _train(*session, resume_run_id)


def _train(rt: Runtime, cfg: VQConfig, state: dict | None, slot: str | None, resume_run_id: str | None) -> str:
    import mlflow

    with stage_run("vqvae", config_params(cfg), resume_run_id=resume_run_id, enabled=rt.is_main) as run:
        if cfg.manifest is None:
            raise UserError("--manifest is required: a CSV with an image_path column")
        df, skipped = read_manifest(cfg.manifest, cfg.val_fraction, cfg.skip_bad_images)
        train_df, val_df = df[df.split == "train"], df[df.split == "val"]
        if val_df.empty:  # tiny datasets: validate on training images rather than not at all
            val_df = train_df.iloc[: cfg.batch_size * cfg.val_batches]
        if rt.is_main and state is None:
            log_manifest(df, str(cfg.manifest), "training")
            mlflow.log_metrics({"data/train_images": len(train_df), "data/val_images": len(val_df),
                                "data/skipped_images": skipped}, step=0)
        model = VQModel(cfg).to(rt.device)
        loss_fn = VQGANLoss(cfg).to(rt.device)
        opt_ae = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        scaler, scaler_d = rt.grad_scaler(), rt.grad_scaler()
        step = 0
        if state is not None:
            load_weights(model, state["model"], f"checkpoint of run {resume_run_id}")
            load_weights(loss_fn.discriminator, state["discriminator"], f"discriminator of run {resume_run_id}")
            opt_ae.load_state_dict(state["opt_ae"])
            opt_d.load_state_dict(state["opt_d"])
            scaler.load_state_dict(state["scaler"])
            scaler_d.load_state_dict(state["scaler_d"])
            step = state["step"]
        ddp_model = rt.wrap(model, find_unused_parameters=cfg.warmup_steps > 0)  # warm-up skips the quantizer

        sampler = ResumableSampler(len(train_df), rt.rank, rt.world_size, cfg.seed,
                                   start=step * cfg.grad_accum * cfg.batch_size)
        pin = rt.device.type == "cuda"
        loader = DataLoader(ImageDataset(train_df.image_path.tolist(), cfg.image_size, True, cfg.flip),
                            batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=pin, persistent_workers=cfg.num_workers > 0, drop_last=False)
        val_loader = DataLoader(ImageDataset(val_df.image_path.tolist(), cfg.image_size, False),
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin)
        batches = iter(loader)  # draws a worker seed from the global RNG: restore the RNG after it
        if state is not None:
            set_rng_state(state["rng"])

        def snapshot() -> dict:
            return {"config": dataclasses.asdict(cfg), "step": loop.step, "model": model.state_dict(),
                    "discriminator": loss_fn.discriminator.state_dict(), "opt_ae": opt_ae.state_dict(),
                    "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(), "scaler_d": scaler_d.state_dict(),
                    "rng": rng_state()}

        loop = TrainLoop(cfg, rt, run, snapshot, step, slot, "train-vqvae")
        with loop.running():
            while loop.step < cfg.max_steps:
                loop.begin_step()
                step = loop.step
                if step == cfg.warmup_steps and cfg.warmup_steps > 0 and cfg.codebook_init != "none":
                    init_codebook(model, batches, rt, cfg)
                lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else cfg.lr
                for opt in (opt_ae, opt_d):
                    for group in opt.param_groups:
                        group["lr"] = lr
                quantize = step >= cfg.warmup_steps
                logs: dict[str, float] = {}
                finite, seen = True, 0
                for micro in range(cfg.grad_accum):
                    x = next(batches)[0].to(rt.device, non_blocking=True)
                    sync = micro == cfg.grad_accum - 1 or not rt.distributed
                    with contextlib.nullcontext() if sync else ddp_model.no_sync():
                        with rt.autocast():
                            xrec, qloss, q = ddp_model(x, quantize=quantize)
                            gloss, glogs = loss_fn.generator_loss(
                                x, xrec, qloss, step, model.last_layer,
                                loss_scale=scaler.get_scale() if scaler.is_enabled() else 1.0)
                        finite &= bool(torch.isfinite(gloss))
                        scaler.scale(gloss / cfg.grad_accum).backward()
                    if step >= cfg.disc_start:
                        with rt.autocast():
                            dloss, dlogs = loss_fn.discriminator_loss(x, xrec, step)
                        finite &= bool(torch.isfinite(dloss))
                        scaler_d.scale(dloss / cfg.grad_accum).backward()
                        glogs.update(dlogs)
                    for k, v in glogs.items():
                        logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
                    if q is not None and q.perplexity is not None:
                        logs["perplexity"] = logs.get("perplexity", 0.0) + float(q.perplexity) / cfg.grad_accum
                    seen += x.shape[0]
                finite = loop.agree_finite(finite, opt_ae, opt_d)
                if finite:  # a skipped step still counts, and still validates/checkpoints on schedule below
                    scaler.step(opt_ae)
                    scaler.update()
                    opt_ae.zero_grad(set_to_none=True)
                    if step >= cfg.disc_start:
                        scaler_d.unscale_(opt_d)
                        average_gradients(loss_fn.discriminator, rt)
                        scaler_d.step(opt_d)
                        scaler_d.update()
                        opt_d.zero_grad(set_to_none=True)
                loop.end_step(seen)
                if rt.is_main and finite and loop.due(cfg.log_every):
                    metrics = {f"train/{k}": v for k, v in logs.items()}
                    metrics.update({"train/lr": lr, "train/codebook_usage": model.quantizer.usage(),
                                    "train/images_per_sec": loop.throughput()})
                    mlflow.log_metrics(metrics, step=loop.step)
                    check_codebook(cfg, loop.step, metrics)
                    loop.bar.set_postfix(loss=f"{logs.get('total_loss', float('nan')):.4f}",
                                         usage=f"{metrics['train/codebook_usage']:.2f}")
                if rt.is_main and loop.due(cfg.val_every):
                    validate(model, loss_fn, val_loader, rt, cfg, loop.step)
                loop.checkpoint_if_due()
        return run.info.run_id if run else ""


@torch.no_grad()
def init_codebook(model: VQModel, batches, rt: Runtime, cfg: VQConfig, num_batches: int = 8) -> None:
    """Seed the codebook from encoder outputs after the AE warm-up (k-means or random latents)."""
    latents = []
    for _ in range(num_batches):
        x = next(batches)[0].to(rt.device)
        with rt.autocast():
            z = model.encode_latents(x)
        latents.append(z.float())
    model.quantizer.init_codebook(torch.cat(latents), cfg.codebook_init)


@click.command("train-vqvae")
@config_options(VQConfig)
@click.option("--resume", "resume_run_id", default=None, help="Continue this vqvae run from its last checkpoint.")
@with_tracking_options
@click.pass_context
def train_vqvae_command(ctx: click.Context, resume_run_id: str | None, tracking_uri: str | None,
                        experiment: str, **values: Any) -> None:
    """Train the VQGAN tokenizer on a CSV manifest (prints the run ID last)."""
    cfg = build_config(VQConfig, values)
    if not resume_run_id and cfg.manifest is None:
        raise UserError("--manifest is required (a CSV with an image_path column), unless --resume is given")
    train_vqvae(cfg, resume_run_id, explicit_options(ctx, values), tracking_uri, experiment)
