"""train-vqvae: train the VQGAN tokenizer from a CSV manifest as one MLflow run (tag stage=vqvae)."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch.utils.data import DataLoader

from core.checkpoint import load_weights
from core.data import ImageDataset, SeededSampler, data_fingerprint, read_manifest_on_ranks, resolve_workers
from core.ema import WeightEMA
from core.errors import UserError
from core.health import check_codebook, check_psnr, note_no_val_split
from core.images import comparison_grid, shorter_sides
from core.loop import TrainLoop, cosine_lr, ignore_stop_signals, step_optimizer, training_session
from core.options import build_config, config_options, explicit_options, note_unused
from core.runtime import Runtime, average_gradients, fused_adam
from core.tracking import (check_resumed_data, data_name, log_manifest, log_step_image, run_name_option, stage_run,
                           with_tracking_options)
from core.weights import log_model_weights
from vqvae.config import VQConfig
from vqvae.losses import VQGANLoss, fetch_vgg16
from vqvae.model import VQModel
from vqvae.pretrained import init_from_run, start_from
from vqvae.tokenizer import KIND

INIT_BATCHES = 8  # batches of encoder outputs the codebook initialisation draws from the training stream

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
    # Originals over their reconstructions: the comparison people look for in the UI.
    log_step_image(comparison_grid(*first), "reconstructions", step)
    return metrics


@torch.no_grad()
def log_first_reconstructions(model: VQModel, loader: DataLoader, rt: Runtime) -> None:
    """The reconstruction grid of the weights training starts from, at step 0: the baseline the later grids
    improve on, and what MLflow's image card shows first (its step slider opens at 0)."""
    model.eval()
    x = next(iter(loader))[0][:8].to(rt.device)
    with rt.autocast():
        xrec = model(x)[0]
    model.train()
    log_step_image(comparison_grid(x.cpu(), xrec.float().clamp(-1, 1).cpu()), "reconstructions", 0)


def active_terms(logs: dict[str, float], cfg: VQConfig, step: int) -> dict[str, float]:
    """The loss terms that mean something at ``step``: no flat zeros for switched-off parts, no duplicates."""
    off = set()
    if cfg.perceptual_weight == 0:
        off |= {"p_loss", "nll_loss"}  # without LPIPS the nll is the pixel loss itself
    if step < cfg.disc_start:
        off |= {"g_loss", "d_weight", "d_loss", "logits_real", "logits_fake"}
    if cfg.quantizer != "vq" or step < cfg.warmup_steps:
        off.add("q_loss")  # FSQ has no quantizer loss; the warm-up skips the quantizer
    return {k: v for k, v in logs.items() if k not in off}


def train_vqvae(cfg: VQConfig, resume_run_id: str | None = None, overrides: dict | None = None,
                tracking_uri: str | None = None, experiment: str | None = None, register: str | None = None) -> str:
    """Train (or resume) a tokenizer; returns the MLflow run ID. ``register``: Model Registry name."""
    if cfg.manifest:  # absolute, so later stages find it from any working directory
        cfg = dataclasses.replace(cfg, manifest=str(Path(cfg.manifest).resolve()))
    if (not resume_run_id and cfg.perceptual_weight > 0 and cfg.perceptual_backbone == "pretrained"
            and cfg.manifest and Path(cfg.manifest).is_file()):  # a bad manifest is reported first
        fetch_vgg16()  # download the LPIPS weights (or fail offline in one line) before a run exists
    with training_session(cfg, "vqvae", resume_run_id, overrides, tracking_uri, experiment) as (rt, cfg, state, slot):
        cfg, init = init_from_run(rt, cfg, overrides) if cfg.init_from and state is None else (cfg, None)
        return _train(rt, cfg, state, slot, resume_run_id, init, register)


def samples_before(step: int, cfg: VQConfig) -> int:
    """Training samples this rank drew before ``step``: its micro-batches, plus the batches that the codebook
    initialisation drew at the start of step ``warmup_steps`` (so a resumed run continues the same stream)."""
    drawn = step * cfg.grad_accum * cfg.batch_size
    if cfg.codebook_init != "none" and step > cfg.warmup_steps:
        drawn += INIT_BATCHES * cfg.batch_size
    return drawn


def step_discriminator(disc: torch.nn.Module, opt_d: torch.optim.Optimizer, scaler_d: torch.amp.GradScaler,
                       rt: Runtime, ok: torch.Tensor | None = None) -> None:
    """Optimizer step of the discriminator (not DDP-wrapped: it also runs, frozen, in the generator pass).

    Its gradients are averaged over ranks before the scaler looks for inf/NaN: a rank whose own gradients are
    finite must still skip a step that another rank's overflow poisons, or the replicas diverge.
    """
    average_gradients(disc, rt)
    step_optimizer(opt_d, scaler_d, ok)


def compile_autoencoder(net: torch.nn.Module, model: VQModel) -> torch.nn.Module:
    """``torch.compile(net)`` with the decoder's output conv left out of the compiled region.

    The adaptive GAN weight needs two gradients at that conv's weight (`VQGANLoss._gan_balance`). Outside the
    compiled region they take that conv's weight-gradient alone; inside it, each would run the region's whole
    compiled backward (one autograd node), twice per step on top of the step's own backward.
    """
    conv_out = model.decoder.conv_out
    conv_out.forward = torch.compiler.disable(conv_out.forward, recursive=False)
    return torch.compile(net)


def small_images_note(paths: list[str], size: int, factor: int) -> str | None:
    """When a quarter or more of a sample of the training images is smaller than ``size`` on its shorter side:
    they are upscaled to it, which the tokenizer learns as blur, at the cost of the larger size. Says so with the
    largest size that fits them (a multiple of the downsampling ``factor``); None otherwise."""
    sides = shorter_sides(paths)
    small = [s for s in sides if s < size]
    if not sides or len(small) * 4 < len(sides):
        return None
    median = int(np.median(sides))
    fit = max(factor, median // factor * factor)
    return (f"{len(small)} of {len(sides)} training images sampled are smaller than --image-size {size} on their "
            f"shorter side (median {median} px): they are upscaled, which the tokenizer learns as blur; train at "
            f"--image-size {fit}, or on larger images")


def _train(rt: Runtime, cfg: VQConfig, state: dict | None, slot: str | None, resume_run_id: str | None,
           init: dict | None = None, register: str | None = None) -> str:
    import mlflow

    from vqvae.pyfunc_model import log_tokenizer_model

    codes = f"K{cfg.codebook_size}" if cfg.quantizer == "vq" else "FSQ" + "x".join(map(str, cfg.fsq_levels))
    if cfg.manifest is None:
        raise UserError("--manifest is required: a CSV with an image_path column")
    # every image is opened and verified once, by rank 0 (and cached per manifest content), before the run exists
    # (a bad manifest leaves no run); the other ranks read the manifest themselves and drop the rows rank 0 found bad
    df, skipped = read_manifest_on_ranks(rt, cfg.manifest, cfg.val_fraction, cfg.skip_bad_images)
    if resume_run_id:  # every rank: the same answer, so all of them stop together
        check_resumed_data(resume_run_id, cfg.manifest, "train again without --resume, or with --init-from "
                           f"{resume_run_id} to start from its weights")
    with stage_run("vqvae", cfg, resume_run_id=resume_run_id, enabled=rt.is_main,
                   name=(f"{cfg.image_size}px", codes), data=data_name(cfg.manifest) if cfg.manifest else None) as run:
        train_df, val_df = df[df.split == "train"], df[df.split == "val"]
        if val_df.empty:  # tiny datasets: validate on training images rather than not at all
            val_df = train_df.iloc[: cfg.batch_size * cfg.val_batches]
            if rt.is_main:
                note_no_val_split(f"{len(val_df)} training images", f"the manifest's split column, or --val-fraction "
                                  f"{cfg.val_fraction} of its {len(train_df)} images, put none there: mark rows "
                                  "'val' in a split column, or raise --val-fraction")
        if rt.is_main and state is None:
            note = small_images_note(train_df.image_path.tolist(), cfg.image_size, cfg.downsample_factor)
            if note:
                click.echo(f"note: {note}", err=True)
            log_manifest(df, str(cfg.manifest), "training")
            mlflow.set_tag("data_fingerprint", data_fingerprint(cfg.manifest))  # what pipeline reuse is keyed on
            mlflow.log_metrics({"data/train_images": len(train_df), "data/val_images": len(val_df),
                                "data/skipped_images": skipped}, step=0)
        model = VQModel(cfg).to(rt.device)
        model.quantizer.forwards_per_step = cfg.grad_accum  # restarts and usage windows count optimizer steps
        loss_fn = VQGANLoss(cfg).to(rt.device)
        betas = tuple(cfg.adam_betas)  # a list when the config came back from a checkpoint's JSON
        opt_ae = fused_adam(model.parameters(), cfg.lr, betas)
        opt_d = fused_adam(loss_fn.discriminator.parameters(), cfg.lr, betas)
        scaler, scaler_d = rt.grad_scaler(), rt.grad_scaler()
        start_from(model, init, cfg, rt.is_main)
        ema = WeightEMA(model, cfg.ema_weights, live=("quantizer.codebook",) if cfg.quantizer == "vq" else ())
        step = 0
        if state is not None:
            load_weights(model, state["model"], f"checkpoint of run {resume_run_id}")
            load_weights(loss_fn.discriminator, state["discriminator"], f"discriminator of run {resume_run_id}")
            opt_ae.load_state_dict(state["opt_ae"])
            opt_d.load_state_dict(state["opt_d"])
            if state["scaler"]:  # empty when saved unscaled (fp32/bf16): resumed in fp16, the scaler starts afresh
                scaler.load_state_dict(state["scaler"])
            if state["scaler_d"]:
                scaler_d.load_state_dict(state["scaler_d"])
            ema.load_state_dict(state.get("ema"))
            step = state["step"]

        def wrapped(quantizing: bool) -> torch.nn.Module:
            # the warm-up skips the quantizer: only then must DDP look for parameters without gradients
            net = rt.wrap(model, find_unused_parameters=not quantizing)
            return compile_autoencoder(net, model) if cfg.compile else net

        net = wrapped(step >= cfg.warmup_steps)
        workers = resolve_workers(cfg.num_workers)
        pin = rt.pin_memory()
        sampler = SeededSampler(len(train_df), rt.rank, rt.world_size, cfg.seed, start=samples_before(step, cfg))
        loader = DataLoader(ImageDataset(train_df.image_path.tolist(), cfg.image_size, True, cfg.flip),
                            batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                            pin_memory=pin, persistent_workers=workers > 0, drop_last=False,
                            worker_init_fn=ignore_stop_signals)
        val_loader = DataLoader(ImageDataset(val_df.image_path.tolist(), cfg.image_size, False),
                                batch_size=cfg.batch_size, num_workers=workers, pin_memory=pin,
                                persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        one = torch.ones((), device=rt.device)

        def snapshot() -> dict:
            return {"config": dataclasses.asdict(cfg), "step": loop.step, "model": model.state_dict(),
                    "discriminator": loss_fn.discriminator.state_dict(), "opt_ae": opt_ae.state_dict(),
                    "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(), "scaler_d": scaler_d.state_dict(),
                    "ema": ema.state_dict()}

        loop = TrainLoop(cfg, rt, run, snapshot, step, slot, "train-vqvae")
        with loop.running(loader, val_loader):
            if rt.is_main and step == 0 and cfg.val_every < cfg.max_steps:  # several grids: a slider to open at 0
                log_first_reconstructions(ema.module, val_loader, rt)
            while loop.step < cfg.max_steps:
                loop.begin_step()
                step = loop.step
                if step == cfg.warmup_steps and cfg.codebook_init != "none" and (cfg.warmup_steps or cfg.init_from):
                    init_codebook(model, batches, rt, cfg)
                if step == cfg.warmup_steps and cfg.warmup_steps > 0:
                    net = wrapped(True)
                lr = cosine_lr(step, cfg.lr, cfg.end_lr, cfg.lr_warmup_steps, cfg.max_steps)
                for opt in (opt_ae, opt_d):
                    for group in opt.param_groups:
                        group["lr"] = lr
                quantize, disc_on = step >= cfg.warmup_steps, loss_fn.disc_active(step)
                # statistics stay on the device; they are read once, when logged
                logs: dict[str, torch.Tensor] = {}
                finite, seen = torch.ones((), dtype=torch.bool, device=rt.device), 0
                for micro in range(cfg.grad_accum):
                    x = next(batches)[0].to(rt.device, non_blocking=pin)
                    sync = micro == cfg.grad_accum - 1 or not rt.distributed
                    with contextlib.nullcontext() if sync else net.no_sync():
                        with rt.autocast():
                            xrec, qloss, q = net(x, quantize=quantize)
                            # the scale as a device tensor: GradScaler.get_scale() would wait for the device
                            gloss, glogs = loss_fn.generator_loss(x, xrec, qloss, step, model.last_layer,
                                                                  loss_scale=scaler.scale(one))
                        finite &= torch.isfinite(gloss)
                        scaler.scale(gloss / cfg.grad_accum).backward()
                    if disc_on:
                        with rt.autocast():
                            dloss, dlogs = loss_fn.discriminator_loss(x, xrec, step)
                        finite &= torch.isfinite(dloss)
                        scaler_d.scale(dloss / cfg.grad_accum).backward()
                        glogs.update(dlogs)
                    if q is not None and q.perplexity is not None:
                        glogs["perplexity"] = q.perplexity
                    for k, v in glogs.items():
                        logs[k] = logs.get(k, 0.0) + v.detach().float() / cfg.grad_accum
                    seen += x.shape[0]
                # a non-finite step is skipped on the device; it still counts, validates and checkpoints on schedule
                ok = loop.step_ok(finite)
                step_optimizer(opt_ae, scaler, ok)
                if disc_on:
                    step_discriminator(loss_fn.discriminator, opt_d, scaler_d, rt, ok)
                ema.update(ok)
                finite = loop.end_step(seen)  # read from the device only where something below reads it too
                if rt.is_main and finite and loop.due(cfg.log_every):
                    logs = dict(zip(logs, torch.stack(list(logs.values())).tolist()))  # one host read for all
                    metrics = {f"train/{k}": v for k, v in active_terms(logs, cfg, step).items()}
                    metrics.update({"train/codebook_usage": model.quantizer.usage(),
                                    "train/images_per_sec": loop.throughput()})
                    # a decaying lr is charted; a constant one is a param, not a flat chart: charted only while the
                    # warm-up ramps it, and only when the ramp spans several logs (else a flat line, read as 0)
                    if (cfg.end_lr is not None and cfg.end_lr < cfg.lr
                            or cfg.lr_warmup_steps > cfg.log_every and step < cfg.lr_warmup_steps + cfg.log_every):
                        metrics["train/lr"] = lr
                    mlflow.log_metrics(metrics, step=loop.step)
                    check_codebook(cfg, loop.step, metrics, model.quantizer.window_steps)
                    loop.bar.set_postfix(loss=f"{metrics.get('train/total_loss', float('nan')):.4f}",
                                         usage=f"{metrics['train/codebook_usage']:.2f}")
                if rt.is_main and loop.due(cfg.val_every):
                    val = validate(ema.module, loss_fn, val_loader, rt, cfg, loop.step)
                    check_psnr(cfg, loop.step, val["val/psnr"])
                loop.checkpoint_if_due()
        if rt.is_main:
            log_model_weights(ema.module.state_dict(), KIND, dataclasses.asdict(cfg.model_config()), loop.step)
            log_tokenizer_model(ema.module, cfg, loop.step, register)
        return run.info.run_id if run else ""


@torch.no_grad()
def init_codebook(model: VQModel, batches, rt: Runtime, cfg: VQConfig, num_batches: int = INIT_BATCHES) -> None:
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
@click.option("--register", default=None, metavar="NAME",
              help="Register the trained tokenizer in the Model Registry under NAME (a new version).")
@run_name_option
@with_tracking_options
@click.pass_context
def train_vqvae_command(ctx: click.Context, resume_run_id: str | None, register: str | None,
                        tracking_uri: str | None, experiment: str, **values: Any) -> None:
    """Train the VQGAN tokenizer on a CSV manifest (prints the run ID last)."""
    cfg = build_config(VQConfig, values)
    if not resume_run_id and cfg.manifest is None:
        raise UserError("--manifest is required (a CSV with an image_path column), unless --resume is given")
    given = explicit_options(ctx, values)
    note_unused(cfg, given)
    train_vqvae(cfg, resume_run_id, given, tracking_uri, experiment, register)
