"""generate: sample code grids from a trained transformer into a new run (tag stage=generate).

Artifacts: ``samples/codes.npy`` (N,H,W; written batch by batch into a memory map), ``samples/logprob.npy``,
``settings.json`` (every setting plus the label of each sample), ``grid.png`` (a preview: the first 64 samples
decoded through the upstream tokenizer, captioned with their class names) and, with ``--gif``,
``samples/generation.gif`` (raster-order decoding, unknown area blank).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torchvision.transforms.functional as TF
from tqdm import tqdm

from core.checkpoint import load_checkpoint, load_weights
from core.ema import evaluated_weights
from core.errors import UserError
from core.images import grid_image, load_rgb, to_input
from core.options import Config, build_config, config_options, explicit_options, note_unused, opt
from core.runtime import gather_rows, setup_runtime, teardown
from core.tracking import (artifact_folder, connect, download, find_upstream, get_run, resolve_run_ids, run_name_option,
                           stage_run, with_tracking_options)
from core.weights import LAST_MODEL_DIR, MODEL_DIR, load_model_weights
from transformer.model import GPT, GPTConfig
from transformer.sample import (DEFAULT_CFG_SCALE, DEFAULT_TOP_K, DEFAULT_TOP_K_SHARE, PRECISIONS, generate,
                               guidance_scale, top_k_for)
from transformer.vocab import Vocab


@dataclass
class GenerateConfig(Config):
    transformer_run_id: str = opt(None, "Run ID of the train (transformer) stage (or models:/NAME/VERSION, "
                                       "models:/NAME@ALIAS).")
    num_samples: int = opt(16, "Number of code grids to sample.", ge=1)
    label: tuple[str, ...] = opt((), "Class label (name or id) to sample; several cycle over the samples. "
                                    "Default for a conditional model: every class in turn.", multiple=True)
    cfg_scale: float | None = opt(None, "Classifier-free guidance scale s: logits_u + s (logits_c - logits_u); "
                                       f"1 = off. Default: {DEFAULT_CFG_SCALE:g} for class-conditional models, off "
                                       "for unconditional ones.", ge=0)
    temperature: float = opt(1.0, "Softmax temperature.", gt=0)
    top_k: int | None = opt(None, "Keep the k most likely codes (0: all). Default: "
                                  f"{DEFAULT_TOP_K_SHARE:.0%} of the codebook, at least {DEFAULT_TOP_K} (20 of 1024 "
                                  "codes).", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of codes with this probability mass.", gt=0, le=1)
    seed: int = opt(0, "Random seed: the same seed and --batch-size give the same samples, with any number of "
                       "torchrun processes (each batch is seeded from the seed and its first sample's number).", ge=0)
    weights: str = opt("best", "The transformer's weights: those of its lowest validation loss, or its last ones.",
                       choices=["best", "last"])
    best_of: int = opt(1, "Draw K candidates per sample and keep the most likely.", ge=1)
    context_image: str = opt(None, "Complete this image: its top rows are kept, the rest is sampled.")
    context_fraction: float = opt(0.5, "Share of the grid's rows taken from --context-image.", gt=0, lt=1,
                                applies=lambda c: bool(c.context_image),
                                needs="--context-image")
    latent_size: str = opt(None, "Code grid HxW to sample, e.g. 32x32 (default: the training grid). Larger grids "
                                "need a model trained with --window-size.")
    batch_size: int = opt(64, "Samples per batch.", ge=1)
    gif: bool = opt(False, "Also write an animation of the raster-order decoding.")
    cache: bool = opt(True, "Use the key/value cache (--no-cache: recompute the whole prefix per token; slow, "
                           "for reference).")
    compile: bool = opt(False, "torch.compile the decode step into CUDA graphs (CUDA only; ignored on CPU).",
                        applies=lambda c: c.cache, needs="--cache")
    precision: str = opt("fp32", "Weights and key/value cache dtype while sampling (bf16/fp16 halve the memory "
                                 "decoding streams; the draws stay in float64).", choices=list(PRECISIONS))
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])

    def check(self) -> None:
        self.grid((1, 1))  # a malformed --latent-size fails here, before anything is loaded

    def grid(self, trained: tuple[int, int]) -> tuple[int, int]:
        """The code grid to sample: --latent-size HxW, else the training grid."""
        if not self.latent_size:
            return tuple(trained)
        size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", self.latent_size.lower())
        if not size or min(int(size[1]), int(size[2])) < 1:
            raise UserError(f"--latent-size must look like HxW, positive (e.g. 32x32), got {self.latent_size!r}")
        return int(size[1]), int(size[2])


def load_transformer(run_id: str, device: torch.device, which: str = "best") -> tuple[GPT, Vocab]:
    """Rebuild a trained GPT from its run and the vocabulary of the quantize run it was trained on.

    ``which``: "best" (model/, the best-validation weights) or "last" (model-last/; runs that logged only
    model/ kept their last weights there)."""
    get_run(run_id, "transformer")
    weights = load_model_weights(run_id, "transformer", LAST_MODEL_DIR) if which == "last" else None
    weights = weights or load_model_weights(run_id, "transformer", MODEL_DIR)  # None for older runs: the checkpoint
    what = f"transformer {'model' if weights else 'checkpoint'} of run {run_id}"
    if weights is None:
        checkpoint, _ = load_checkpoint(run_id)
        weights = evaluated_weights(checkpoint), checkpoint["model_config"], None
    state, mcfg, _ = weights
    model = GPT(GPTConfig.from_saved(mcfg))
    load_weights(model, state, what)
    quantize_run = find_upstream(run_id, "quantize").info.run_id
    vocab = Vocab.load(download(quantize_run, "vocab.json"), quantize_run)
    return model.to(device).eval(), vocab


def sample_labels(cfg: GenerateConfig, vocab: Vocab) -> tuple[torch.Tensor | None, list[str | None]]:
    """Class ids per sample (cycling over --label, or over every class) and their names."""
    if cfg.label and not vocab.num_classes:
        raise UserError(f"--label {cfg.label[0]!r} given, but the model is unconditional (its manifest had no labels)")
    if not vocab.num_classes:
        if cfg.cfg_scale not in (None, 1.0):
            raise UserError("--cfg-scale needs a class-conditional model")
        return None, [None] * cfg.num_samples
    ids = [vocab.class_id(lab) for lab in cfg.label] or list(range(vocab.num_classes))
    per_sample = torch.tensor([ids[i % len(ids)] for i in range(cfg.num_samples)])
    return per_sample, [vocab.classes[i] for i in per_sample.tolist()]


def context_codes(cfg: GenerateConfig, tokenizer, grid: tuple[int, int]) -> torch.Tensor:
    """Top rows of the context image's code grid, encoded at the size of the grid being sampled."""
    path = Path(cfg.context_image)
    try:
        image = load_rgb(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --context-image {path}: {type(exc).__name__}: {exc}") from None
    f = tokenizer.downsample_factor
    # squashed to the sampled grid's shape (not cropped): the whole context image shows in the samples' top rows
    x = to_input(TF.resize(image, [grid[0] * f, grid[1] * f], antialias=True))[None]
    rows = max(1, min(grid[0] - 1, round(grid[0] * cfg.context_fraction)))
    return tokenizer.encode(x).cpu()[:, :rows].expand(cfg.num_samples, -1, -1)


def generation_gif(codes: np.ndarray, tokenizer, path: Path, max_samples: int = 16) -> None:
    """One frame per generated row: the partial grid decoded, rows not generated yet shown white."""
    codes = torch.from_numpy(codes[:max_samples].astype(np.int64))
    f = tokenizer.downsample_factor
    frames = []
    for r in range(codes.shape[1] + 1):
        partial = codes.clone()
        partial[:, r:] = 0  # any valid code: its pixels are blanked below
        images = tokenizer.decode(partial).cpu().clone()  # inference tensors are read-only
        images[:, :, r * f:] = 1.0
        frames.append(grid_image(images, nrow=min(8, len(codes))))
    frames[0].save(path, save_all=True, append_images=frames[1:] + [frames[-1]] * 4, duration=120, loop=0)


def run_name_parts(cfg: GenerateConfig) -> tuple[str, ...]:
    """The sampling options that tell generate runs apart, for the run name (e.g. cfg2-k100-s0)."""
    parts = (cfg.cfg_scale not in (None, 1) and f"cfg{cfg.cfg_scale:g}",
             cfg.temperature != 1 and f"T{cfg.temperature:g}", cfg.top_k and f"k{cfg.top_k}",
             cfg.top_p < 1 and f"p{cfg.top_p:g}", cfg.best_of > 1 and f"best{cfg.best_of}",
             cfg.context_image and "completion", cfg.latent_size, f"s{cfg.seed}")
    return tuple(p for p in parts if p)


PREVIEW = 64  # samples decoded into the logged grid


def batch_seed(seed: int, first: int) -> int:
    """The sampling seed of the batch whose first sample is number ``first``: a batch draws the same samples
    whichever rank makes it, so one process and N ranks give the same samples for the same seed."""
    return int(np.random.SeedSequence([seed, first]).generate_state(1, np.uint64)[0] >> 1)


def sample_into(model: GPT, codes: np.ndarray | None, logprob: np.ndarray | None, cfg: GenerateConfig, rt,
                grid: tuple[int, int], labels: torch.Tensor | None, context: torch.Tensor | None,
                cfg_scale: float, top_k: int | None) -> None:
    """Sample ``cfg.num_samples`` grids batch by batch, each batch seeded by `batch_seed`; under torchrun rank r
    makes batches r, r+W, ...: each round rank 0 gathers the ranks' batches (fixed-size tensors) and writes them
    into the memory-mapped ``codes``/``logprob`` (None on the other ranks). Memory stays that of a round."""
    n, bs, world = cfg.num_samples, cfg.batch_size, rt.world_size
    with tqdm(total=n, unit="sample", file=sys.stderr, disable=not rt.is_main, dynamic_ncols=True) as bar:
        for first in range(0, n, bs * world):
            lo = min(first + rt.rank * bs, n)
            hi = min(lo + bs, n)
            batch = torch.zeros(bs, *grid, dtype=torch.long, device=rt.device)
            lp = torch.zeros(bs, dtype=torch.float32, device=rt.device)
            if hi > lo:  # a rank past the end sends padding
                try:
                    c, l = generate(model, hi - lo, grid_shape=grid, labels=None if labels is None else labels[lo:hi],
                                    cfg_scale=cfg_scale, temperature=cfg.temperature, top_k=top_k,
                                    top_p=cfg.top_p, seed=batch_seed(cfg.seed, lo),
                                    context=None if context is None else context[lo:hi], best_of=cfg.best_of,
                                    batch_size=bs, use_cache=cfg.cache, compile=cfg.compile)
                except ValueError as exc:  # e.g. a larger grid for a full-attention model
                    raise UserError(str(exc)) from None
                batch[:hi - lo], lp[:hi - lo] = c, l
            batch, lp = gather_rows(rt, batch), gather_rows(rt, lp)
            end = min(first + bs * world, n)
            if codes is not None:
                codes[first:end] = batch[:end - first].cpu().numpy()
                logprob[first:end] = lp[:end - first].cpu().numpy()
            bar.update(end - first)


def run_generate(cfg: GenerateConfig, tracking_uri: str | None = None, experiment: str | None = None) -> str:
    rt = setup_runtime(cfg.device)
    try:
        return _generate(rt, cfg, tracking_uri, experiment)
    finally:
        teardown(rt)


def _generate(rt, cfg: GenerateConfig, tracking_uri: str | None, experiment: str | None) -> str:
    import mlflow

    from vqvae.tokenizer import load_tokenizer

    connect(tracking_uri, experiment, read_only=not rt.is_main)
    cfg = resolve_run_ids(cfg)
    # the run IDs, labels, options and context image are checked before the run exists: a mistake leaves no run
    model, vocab = load_transformer(cfg.transformer_run_id, rt.device, cfg.weights)
    model.to(PRECISIONS[cfg.precision])
    grid = cfg.grid(vocab.grid_shape)
    labels, names = sample_labels(cfg, vocab)
    cfg_scale = guidance_scale(cfg.cfg_scale, labels is not None)
    top_k = top_k_for(cfg.top_k, model.config.codebook_size)
    vqvae_run_id = find_upstream(cfg.transformer_run_id, "vqvae").info.run_id
    tokenizer = load_tokenizer(vqvae_run_id, rt.device)
    context = context_codes(cfg, tokenizer, grid) if cfg.context_image else None
    if not rt.is_main:
        sample_into(model, None, None, cfg, rt, grid, labels, context, cfg_scale, top_k)
        return ""
    with stage_run("generate", cfg, upstream_run_id=cfg.transformer_run_id, upstream_stage="transformer",
                   name=run_name_parts(cfg)) as run:
        # the values behind the defaults' None ("auto"), for the runs table and for comparing runs
        mlflow.log_params({"cfg_scale_used": cfg_scale, "top_k_used": top_k or 0})
        with artifact_folder() as out:
            (out / "samples").mkdir()
            # written batch by batch into memory maps: 50,000 samples never sit in memory
            codes = np.lib.format.open_memmap(out / "samples" / "codes.npy", mode="w+", dtype=vocab.code_dtype,
                                              shape=(cfg.num_samples, *grid))
            logprob = np.lib.format.open_memmap(out / "samples" / "logprob.npy", mode="w+", dtype=np.float32,
                                                shape=(cfg.num_samples,))
            sample_into(model, codes, logprob, cfg, rt, grid, labels, context, cfg_scale, top_k)
            codes.flush()  # on disk before the folder is logged, whatever the platform's mapping semantics
            logprob.flush()
            settings = {**asdict(cfg), "cfg_scale": cfg_scale, "top_k": top_k or 0, "grid_shape": list(grid),
                        "sample_labels": names, "vqvae_run_id": vqvae_run_id}
            (out / "settings.json").write_text(json.dumps(settings, indent=2))
            if cfg.gif:
                generation_gif(codes, tokenizer, out / "samples" / "generation.gif")
            preview = torch.from_numpy(codes[:PREVIEW].astype(np.int64)).to(rt.device)
            images = torch.cat([tokenizer.decode(b).cpu() for b in preview.split(cfg.batch_size)])
            shown = names[:PREVIEW]
            distinct = len(set(shown))  # labels cycle: one column per label when there are a few
            nrow = distinct if 1 < distinct <= 16 else 8
            grid_image(images, nrow=nrow, captions=shown if labels is not None else None).save(out / "grid.png")
            mean_logprob = float(np.mean(logprob, dtype=np.float64))
            del codes, logprob
        mlflow.log_metric("generate/mean_logprob_per_token", mean_logprob / (grid[0] * grid[1]))
        return run.info.run_id


@click.command("generate")
@config_options(GenerateConfig)
@run_name_option
@with_tracking_options
@click.pass_context
def generate_command(ctx: click.Context, tracking_uri: str | None, experiment: str, **values: Any) -> None:
    """Sample code grids from a trained transformer (prints the run ID last); `decode` turns them into images."""
    cfg = build_config(GenerateConfig, values)
    if not cfg.transformer_run_id:
        raise UserError("--transformer-run-id is required (the run ID printed by train)")
    note_unused(cfg, explicit_options(ctx, values))
    run_generate(cfg, tracking_uri, experiment)
