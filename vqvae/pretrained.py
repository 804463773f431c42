"""Pretrained tokenizers: ``import-vqvae`` (an official taming/LlamaGen file -> a vqvae run), ``export-vqvae`` (a vqvae
run -> a file under the official names) and ``train-vqvae --init-from`` (fine-tune from any vqvae run)."""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import click
import torch

from core.errors import UserError
from core.options import flat_values
from core.runtime import Runtime, broadcast_from_main
from core.tracking import NOTE_TAG, connect, get_run, stage_run, with_tracking_options
from core.weights import log_model_weights
from vqvae.config import VQConfig, VQModelConfig
from vqvae.convert import (FORMATS, OfficialWeights, check_same, default_image_size, fresh_statistics,
                           infer_architecture, llamagen_args, read_official, read_taming_yaml, taming_yaml,
                           to_official, to_ours)
from vqvae.model import VQModel
from vqvae.tokenizer import KIND, load_vq_model

# Fields that fix the weights' shapes or what they compute: taken from the --init-from run. The image size may
# change (attention stays at the same levels); the rest of VQModelConfig is training behaviour.
ARCHITECTURE = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "quantizer",
                "codebook_size", "code_dim", "l2_norm", "fsq_levels")


def import_config(path: Path, fmt: str, config: str | None, image_size: int | None
                  ) -> tuple[OfficialWeights, VQModelConfig]:
    """(official weights, our architecture) of an official file; a --config that contradicts it is an error."""
    weights = read_official(path, fmt)
    arch = infer_architecture(weights)
    size = image_size or weights.image_size
    if config:
        if weights.format != "taming":
            raise UserError(f"--config reads taming's model.yaml, but {path.name} is a {weights.format} file; "
                            "drop --config (the architecture is inferred from the tensors)")
        given, resolution = read_taming_yaml(config)
        check_same(given, arch, f"--config {config}")
        size = size or resolution
    l2_norm = weights.format == "llamagen" if weights.l2_norm is None else weights.l2_norm  # LlamaGen's default
    return weights, arch.config(size or default_image_size(arch), l2_norm)


def import_vqvae(path: str | Path, fmt: str = "auto", config: str | None = None, image_size: int | None = None,
                 name: str | None = None, tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Create a vqvae run holding an official tokenizer's weights; returns its run ID."""
    import mlflow

    path = Path(path)
    connect(tracking_uri, experiment)
    weights, cfg = import_config(path, fmt, config, image_size)  # bad files fail before a run exists
    state = to_ours(weights, cfg)
    with stage_run("vqvae", cfg, data=path.stem, name=("imported", f"{cfg.image_size}px", f"K{cfg.codebook_size}")
                   ) as run:
        mlflow.set_tags({"imported_from": f"{weights.format}:{path.name}", NOTE_TAG: (
            f"**Imported {weights.format} tokenizer** `{path.name}` · stage `vqvae`\n\n"
            f"Made by: `python cli.py import-vqvae --checkpoint {shlex.quote(str(path.resolve()))}`")})
        if name:
            mlflow.set_tag("mlflow.runName", name)
        log_model_weights(state, KIND, dataclasses.asdict(cfg), 0)
        click.echo(f"imported {weights.format} tokenizer {path.name}: {cfg.codebook_size} codes, "
                   f"{cfg.image_size} px -> {cfg.image_size // cfg.downsample_factor}x"
                   f"{cfg.image_size // cfg.downsample_factor} codes", err=True)
    return run.info.run_id


def export_vqvae(run_id: str, fmt: str, out: str | Path, tracking_uri: str | None = None,
                 experiment: str | None = None) -> Path:
    """Write a vqvae run's weights under the official names: taming ``{"state_dict"}`` + ``model.yaml`` beside
    it, or LlamaGen ``{"model"}``; both load with ``torch.load(weights_only=True)``."""
    connect(tracking_uri, experiment)
    model, cfg, step = load_vq_model(run_id)
    state = to_official(model.state_dict(), cfg, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "taming":
        torch.save({"state_dict": state, "global_step": step, "epoch": 0}, out)
        out.with_suffix(".yaml").write_text(taming_yaml(cfg))
        click.echo(f"wrote {out} and its config {out.with_suffix('.yaml')} (taming VQModel)", err=True)
    else:
        torch.save({"model": state, "steps": step}, out)
        click.echo(f"wrote {out}; LlamaGen VQModel arguments: {json.dumps(llamagen_args(cfg))}", err=True)
    return out


def init_from_run(rt: Runtime, cfg: VQConfig, explicit: dict[str, Any] | None
                  ) -> tuple[VQConfig, dict[str, torch.Tensor] | None]:
    """The config with the architecture of the ``--init-from`` run, and its weights (each rank reads them itself) with the quantizer's
    bookkeeping restarted. An explicitly given architecture option that differs is an error."""
    state = None
    if rt.is_main:
        cfg = dataclasses.replace(cfg, init_from=get_run(cfg.init_from, "vqvae").info.run_id)  # models:/ -> run
        model, src, _ = load_vq_model(cfg.init_from)
        given, have = flat_values(cfg), flat_values(src)
        # --code-dim 0 means embed_dim: compare the code size in effect (an imported run records embed_dim)
        embed = cfg.embed_dim if "embed_dim" in (explicit or {}) else src.embed_dim
        given["code_dim"], have["code_dim"] = cfg.code_dim or embed, src.code_dim or src.embed_dim
        clash = next((k for k in ARCHITECTURE if k in (explicit or {}) and given[k] != have[k]), None)
        if clash:
            flag = "--" + clash.replace("_", "-")
            raise UserError(f"{flag} {given[clash]} conflicts with the --init-from run {cfg.init_from}, which has "
                            f"{flag} {have[clash] if have[clash] != '' else 'none'}; drop {flag} (the architecture "
                            "comes from that run)")
        size = cfg.image_size if "image_size" in (explicit or {}) else src.image_size
        levels = [d for d in (2**i for i in range(len(src.ch_mult))) if src.image_size // d in src.attn_resolutions]
        cfg = dataclasses.replace(cfg, image_size=size, attn_resolutions=tuple(size // d for d in levels),
                                  **{k: getattr(src, k) for k in ARCHITECTURE if k != "attn_resolutions"})
    (cfg,) = broadcast_from_main(rt, cfg)  # the config only: each rank reads the weights itself
    if not rt.is_main:
        model, _, _ = load_vq_model(cfg.init_from)
    state = fresh_statistics(model.state_dict(), VQModel(cfg).state_dict())
    return cfg, state


def start_from(model: VQModel, state: dict[str, torch.Tensor] | None, cfg: VQConfig, is_main: bool) -> None:
    """Load the ``--init-from`` weights (before DDP wrapping) and tag the run with their source."""
    if state is None:
        return
    model.load_state_dict(state)
    if is_main:
        import mlflow

        mlflow.set_tag("init_from", cfg.init_from)


@click.command("import-vqvae")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="taming .ckpt (e.g. vqgan_imagenet_f16_1024 last.ckpt), LlamaGen .pt (vq_ds16_c2i.pt or a "
                   "training checkpoint), or a .safetensors with official names.")
@click.option("--config", default=None, type=click.Path(dir_okay=False),
              help="taming's model.yaml: checked against the tensors, gives the image size (optional).")
@click.option("--format", "fmt", type=click.Choice(["auto", *FORMATS]), default="auto", show_default=True,
              help="Official format (auto: from the parameter names).")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Image size the tokenizer works at (default: the config's resolution, LlamaGen's training "
                   "args, else the size that puts attention at 16x16 features, as in every official model).")
@click.option("--name", default=None, help="Run name.")
@with_tracking_options
def import_vqvae_command(checkpoint: Path, config: str | None, fmt: str, image_size: int | None, name: str | None,
                         tracking_uri: str | None, experiment: str) -> None:
    """Import a pretrained taming-transformers or LlamaGen tokenizer as a vqvae run (prints the run ID last)."""
    import_vqvae(checkpoint, fmt, config, image_size, name, tracking_uri, experiment)


@click.command("export-vqvae")
@click.option("--run-id", required=True, help="vqvae run (trained or imported).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), required=True, help="Official format to write.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@with_tracking_options
def export_vqvae_command(run_id: str, fmt: str, out: Path, tracking_uri: str | None, experiment: str) -> None:
    """Write a vqvae run's weights under taming's or LlamaGen's names (prints the file last)."""
    click.echo(export_vqvae(run_id, fmt, out, tracking_uri, experiment))
