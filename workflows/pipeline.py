"""pipeline: all five stages on your data, chained by run ID; identical finished stages are reused, not re-run.

Settings come from a TOML or YAML file with one section per stage command ([vqvae], [quantize], [train],
[generate], [decode]) holding that command's options, then from ``--set STAGE.KEY=VALUE``, then ``--manifest``.
The pipeline is one parent MLflow run (tag stage=pipeline): the stages it runs are nested below it; the stages
it reuses are linked from its description and tags; it holds the settings and the final sample grid.
"""
from __future__ import annotations

import contextlib
import difflib
import shlex
import sys
import time
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from core.data import data_fingerprint, read_manifest
from core.errors import UserError
from core.options import build_config, note_unused
from core.tracking import (NOTE_TAG, code_version, connect, data_name, describe, download, get_run, run_link, run_params,
                           run_name_option, stage_run, with_tracking_options, wrap_command)
from transformer.config import GPTTrainConfig
from transformer.generate import GenerateConfig, generate_command, run_generate
from transformer.train import train_command, train_transformer
from vqvae.config import VQConfig
from vqvae.decode import DecodeConfig, decode, decode_command
from vqvae.quantize import QuantizeConfig, quantize, quantize_command
from vqvae.train import train_vqvae, train_vqvae_command

PATH_FIELDS = ("manifest", "context_image")  # files: made absolute, as a run is reused only for the same file


@dataclass(frozen=True)
class Stage:
    section: str  # config-file section: the stage's command, with `vqvae` for train-vqvae
    tag: str  # the `stage` tag of its runs
    config: type
    command: click.Command  # the section accepts this command's options
    run: Callable[..., str]  # stage function (cfg, tracking_uri=..., experiment=...) -> run ID
    upstream: str | None = None  # config field that takes the previous stage's run ID
    fixed: tuple[str, ...] = ()  # further fields that make no sense inside the pipeline

    def options(self) -> dict[str, click.Option]:
        """The command's options that a config file may set, by field name."""
        names = {f.name for f in fields(self.config)} - {self.upstream, *self.fixed}
        return {p.name: p for p in self.command.params if p.name in names}


STAGES = (
    Stage("vqvae", "vqvae", VQConfig, train_vqvae_command, train_vqvae),
    Stage("quantize", "quantize", QuantizeConfig, quantize_command, quantize, "vqvae_run_id"),
    Stage("train", "transformer", GPTTrainConfig, train_command, train_transformer, "quantize_run_id"),
    Stage("generate", "generate", GenerateConfig, generate_command, run_generate, "transformer_run_id"),
    Stage("decode", "decode", DecodeConfig, decode_command, decode, "run_id", fixed=("indices", "vqvae_run_id")),
)
SECTIONS = {stage.section: stage for stage in STAGES}

Settings = dict[str, dict[str, Any]]  # section -> field name -> value


def convert(option: click.Option, value: Any, where: str) -> Any:
    """A config value parsed as the command line would parse it; lists stand for comma-separated values."""
    try:
        if option.multiple:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(option.type.convert(v, option, None) for v in items)
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        return option.type.convert(value, option, None)
    except click.BadParameter as exc:
        raise UserError(f"{where}: {exc.message}") from None


def check_settings(raw: Any, source: str) -> Settings:
    """Validate sections and option names (dashes or underscores) and parse the values."""
    if not isinstance(raw, dict):
        raise UserError(f"{source} must hold sections: {', '.join(SECTIONS)}")
    out: Settings = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"unknown section [{section}] in {source}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"section [{section}] in {source} must hold option = value pairs")
        options = SECTIONS[section].options()
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in options:
                valid = ", ".join(n.replace("_", "-") for n in options)
                close = difflib.get_close_matches(name, list(options), n=1)
                hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
                raise UserError(f"unknown option {key!r} in [{section}] of {source}{hint}; valid options: {valid}")
            if value is not None:  # YAML `key:` with no value: keep the default
                out.setdefault(section, {})[name] = convert(options[name], value, f"[{section}] {key} in {source}")
    return out


def resolve_files(settings: Settings, base: Path) -> Settings:
    """File options with ``~`` expanded (no shell sees a config file's values, nor ``--set x=~/...``) and a relative
    path read from ``base``: the config file's folder, so that a config works from wherever it is run, or the
    current folder for ``--set``."""
    for values in settings.values():
        for name in PATH_FIELDS:
            if isinstance(values.get(name), str):
                values[name] = str(base / Path(values[name]).expanduser())  # an absolute path stays as it is
    return settings


def read_config_file(path: Path) -> Settings:
    """Settings from a .toml or .yaml/.yml file; files it names are relative to its folder."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"config file {path} must end in .toml, .yaml or .yml")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    return resolve_files(check_settings(raw, str(path)), path.resolve().parent)


def parse_set_options(items: tuple[str, ...]) -> Settings:
    """``--set STAGE.KEY=VALUE`` options as settings."""
    raw: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise UserError(f"--set expects STAGE.KEY=VALUE (e.g. train.max-steps=2000), got {item!r}")
        raw.setdefault(section, {})[name] = value
    return resolve_files(check_settings(raw, "--set"), Path.cwd())


def merge(*layers: Settings) -> Settings:
    """Later layers override earlier ones, option by option."""
    out: Settings = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def stage_config(stage: Stage, values: dict[str, Any]) -> Any:
    """The stage's config from its settings (upstream run ID not yet filled in); paths made absolute."""
    try:
        cfg = build_config(stage.config, values)
    except click.BadParameter as exc:
        raise UserError(f"[{stage.section}]: {exc.message}") from None
    note_unused(cfg, values, f"[{stage.section}] ")  # every value here was set by the user (config file, --set)
    for name in PATH_FIELDS:
        if getattr(cfg, name, None):
            cfg = replace(cfg, **{name: str(Path(getattr(cfg, name)).resolve())})
    return cfg


def find_finished(stage: Stage, cfg: Any, upstream: str | None, version: str) -> str | None:
    """The newest FINISHED run of this stage in the active experiment with the same upstream run, code version,
    params and (stages that read a manifest) data fingerprint, if any."""
    import mlflow

    query = [f"tags.stage = '{stage.tag}'", "attributes.status = 'FINISHED'", f"tags.code_version = '{version}'"]
    if upstream:
        query.append(f"tags.upstream_run_id = '{upstream}'")
    params = {k: str(v) for k, v in run_params(cfg).items()}  # as MLflow stores them
    if getattr(cfg, "manifest", None):
        # keyed on the data, not the path: an edited manifest or a changed image means a new run
        query.append(f"tags.data_fingerprint = '{data_fingerprint(cfg.manifest)}'")
        params.pop("manifest", None)
    for run in mlflow.search_runs(filter_string=" and ".join(query), order_by=["attributes.start_time DESC"],
                                  output_format="list"):
        # A resumed run keeps the params of its first start, which may not describe what it became; a run made
        # outside a pipeline (no parent) is the user's own, not one of this pipeline's stages. A param the run
        # lacks did not apply to its input (same code version: e.g. decode's --split for a generate run).
        if ("resumed" not in run.data.tags and "mlflow.parentRunId" in run.data.tags
                and all(run.data.params.get(k, v) == v for k, v in params.items())):
            return run.info.run_id
    return None


# What a pipeline row shows in the runs table: its stages' key params and results, as "section.key"; a param whose
# default is decided at run time shows the value used (logged as KEY_used), not "None"
HEADLINE_PARAMS = {"vqvae": ("image_size", "quantizer", "codebook_size", "fsq_levels", "max_steps"),
                   "train": ("n_layer", "n_head", "n_embd", "window_size", "num_params", "max_steps"),
                   "generate": ("num_samples", "cfg_scale", "top_k")}
HEADLINE_METRICS = {("vqvae", "val/psnr"): "tokenizer/val_psnr",  # (section, its run's metric): the pipeline's
                    ("vqvae", "val/codebook_usage"): "tokenizer/val_codebook_usage",
                    ("train", "val/loss"): "transformer/val_loss",
                    ("generate", "generate/mean_logprob_per_token"): "generate/mean_logprob_per_token"}


def headline(run_ids: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    """The stage runs' headline params (``section.name``, with the data name) and final metrics."""
    runs = {section: get_run(run_ids[section]) for section in HEADLINE_PARAMS}
    params = {"data": runs["vqvae"].data.tags.get("data", "")}
    for section, keys in HEADLINE_PARAMS.items():
        logged = runs[section].data.params
        for key in keys:
            value = logged.get(f"{key}_used", logged.get(key))
            if value is not None:
                params[f"{section}.{key}"] = value
    metrics = {name: runs[section].data.metrics[key] for (section, key), name in HEADLINE_METRICS.items()
               if key in runs[section].data.metrics}
    return {k: v for k, v in params.items() if v != ""}, metrics


def run_stage(stage: Stage, cfg: Any, tracking_uri: str | None, experiment: str | None) -> str:
    """Run one stage in-process; any failure becomes one line naming the stage."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the stage prints its run ID; our stdout is the summary
            return stage.run(cfg, tracking_uri=tracking_uri, experiment=experiment)
    except click.ClickException as exc:
        message = exc.format_message()
    except Exception as exc:  # noqa: BLE001 - the pipeline reports every failure the same way
        message = f"{type(exc).__name__}: {exc}"
    raise UserError(f"{stage.section} stage failed: {message} (finished stages are reused when you re-run)")


def run_pipeline(settings: Settings, force: bool = False, tracking_uri: str | None = None,
                 experiment: str | None = None, command: str | None = None, name: tuple[str, ...] = (),
                 config_file: Path | None = None) -> dict[str, str]:
    """Run or reuse each stage in order under one parent run; prints `STAGE ran|reused RUN_ID` per stage on
    stdout, progress on stderr. Returns the run ID per section, and the parent's as ``pipeline``.
    ``command``: the command line that reproduces the pipeline; ``name``: run-name parts after the data name;
    ``config_file``: logged into the parent run."""
    import mlflow

    configs = [stage_config(stage, settings.get(stage.section, {})) for stage in STAGES]  # fail before any work
    read_manifest(configs[0].manifest, check_files=False)  # a wrong manifest leaves no pipeline run behind
    connect(tracking_uri, experiment)
    version = code_version()
    run_ids: dict[str, str] = {}
    actions: dict[str, str] = {}
    upstream = None
    start = time.perf_counter()
    with stage_run("pipeline", name=name, data=data_name(configs[0].manifest), echo=False) as parent:
        mlflow.log_dict(settings, "pipeline_settings.json")  # after the config file, --set and --manifest
        if config_file:
            mlflow.log_artifact(str(config_file))
        for n, (stage, cfg) in enumerate(zip(STAGES, configs), 1):
            if stage.upstream:
                cfg = replace(cfg, **{stage.upstream: upstream})
            elapsed = int(time.perf_counter() - start)
            click.echo(f"[{n}/{len(STAGES)}] {stage.section} ({elapsed // 60}m{elapsed % 60:02d}s elapsed)", err=True)
            run_id = None if force else find_finished(stage, cfg, upstream, version)
            action = "reused"
            if run_id is None:
                run_id, action = run_stage(stage, cfg, tracking_uri, experiment), "ran"
            click.echo(f"{stage.section:<9} {action:<6} {run_id}")
            run_ids[stage.section] = upstream = run_id
            actions[stage.section] = action
            mlflow.set_tag(f"run_id.{stage.section}", run_id)
        mlflow.log_artifact(str(download(run_ids["generate"], "grid.png")))  # the samples, captioned
        params, metrics = headline(run_ids)
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.set_tag(NOTE_TAG, pipeline_description(run_ids, actions, command))
    run_ids["pipeline"] = parent.info.run_id
    click.echo(f"pipeline  {parent.info.run_id}")
    return run_ids


def register_models(run_ids: dict[str, str], prefix: str) -> dict[str, str]:
    """Register the pipeline's tokenizer and generator as ``PREFIX-tokenizer`` and ``PREFIX-generator`` (a reused
    run that is already registered keeps its version); returns their ``models:/NAME/VERSION`` URIs."""
    from core.mlflow_models import STAGE_MODELS, register_run_model

    uris = {}
    for section, stage in (("vqvae", "vqvae"), ("train", "transformer")):
        name = f"{prefix}-{STAGE_MODELS[stage]}"
        uris[name] = f"models:/{name}/{register_run_model(run_ids[section], name).version}"
        click.echo(f"registered {uris[name]}", err=True)
    return uris


register_option = click.option(
    "--register", "register_prefix", default=None, metavar="PREFIX",
    help="Register the trained models as PREFIX-tokenizer and PREFIX-generator in the Model Registry.")


def pipeline_description(run_ids: dict[str, str], actions: dict[str, str], command: str | None) -> str:
    """The parent run's description: a table linking each stage's run (nested below if it ran here)."""
    rows = ["| stage | run | |", "| --- | --- | --- |"]
    for section, run_id in run_ids.items():
        note = "ran (nested below)" if actions[section] == "ran" else "reused: an identical finished run"
        rows.append(f"| {section} | {run_link(get_run(run_id))} | {note} |")
    data = get_run(run_ids["vqvae"]).data.tags.get("data")
    return describe("pipeline", data, [], command, extra="\n".join(rows) + "\n\n`grid.png`: the generated samples.")


@click.command("pipeline")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV manifest of your images (overrides `manifest` in [vqvae]).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML or YAML file with sections [vqvae] [quantize] [train] [generate] [decode] holding each "
                   "command's options (dashes or underscores).")
@click.option("--set", "set_options", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Override one option, e.g. --set train.max-steps=2000 (repeatable).")
@click.option("--force", is_flag=True, help="Re-run every stage even where an identical finished run exists.")
@register_option
@run_name_option
@with_tracking_options
def pipeline_command(manifest: Path | None, config_file: Path | None, set_options: tuple[str, ...], force: bool,
                     register_prefix: str | None, tracking_uri: str | None, experiment: str) -> None:
    """Run every stage on your data, reusing identical finished ones (prints the decode run ID last)."""
    settings = merge(read_config_file(config_file) if config_file else {}, parse_set_options(set_options),
                     {"vqvae": {"manifest": str(manifest)}} if manifest else {})
    if not settings.get("vqvae", {}).get("manifest"):
        raise UserError("--manifest is required (or `manifest` in the [vqvae] section of --config)")
    words = ["python", "cli.py", "pipeline", "--manifest", str(Path(settings["vqvae"]["manifest"]).resolve())]
    words += ["--config", str(config_file.resolve())] if config_file else []
    for item in set_options:
        words += ["--set", item]
    words += ["--force"] if force else []
    run_ids = run_pipeline(settings, force, tracking_uri, experiment, wrap_command(list(map(shlex.quote, words))),
                           config_file=config_file)
    if register_prefix:
        register_models(run_ids, register_prefix)
    click.echo(run_ids["decode"])
