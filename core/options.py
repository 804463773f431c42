"""One config dataclass per stage feeds the click options, the MLflow params and the checkpoint.

A field's ``metadata`` may hold ``help``, ``choices``, ``multiple`` (a repeatable option), a valid range
(``ge``/``gt``/``le``/``lt``; for tuples, per item) and ``applies`` (a predicate on the config: whether the
option means anything with the other options chosen; inapplicable options are not logged as params, and one the
user set says so on stderr, naming ``needs``, the text of what it applies to) and
``legacy`` (the behaviour of runs saved before the option existed, used when resuming them).
Tuple fields are written on the command line as comma-separated lists ("1,2,4").

Stage configs derive from `Config`, whose ``__post_init__`` checks every range and the config's own
``check()`` (incompatible pairs), so the CLI, pipeline config files and Python callers get the same one-line
error before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Callable, Iterable, TypeVar

import click

from core.errors import UserError

T = TypeVar("T")


WORKERS_HELP = ("DataLoader worker processes (default: the CPU cores of this process, less one, shared by the "
                "processes on this machine; at most 8).")  # every stage that loads images (`core.data.resolve_workers`)

_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def opt(default: Any, help_: str, **meta: Any) -> Any:
    """A config field with its CLI help, and optionally ``choices``, ``multiple``, a range (``ge``, ``gt``,
    ``le``, ``lt``) and ``applies`` (predicate on the config) with ``needs`` (what it applies to, for the user) in
    the metadata."""
    unknown = set(meta) - {"choices", "multiple", "cli", "applies", "needs", "legacy", *_BOUNDS}
    if unknown:
        raise TypeError(f"unknown option metadata {sorted(unknown)}")
    if ("applies" in meta) != ("needs" in meta):
        raise TypeError("an option's `applies` predicate comes with `needs`, the text of what it applies to")
    return dataclasses.field(default=default, metadata={"help": help_, **meta})


def range_text(f: dataclasses.Field) -> str:
    """The field's valid range as text, e.g. ">= 1" or "> 0, <= 1" ('' if it has none)."""
    return ", ".join(f"{_BOUNDS[k][0]} {f.metadata[k]}" for k in _BOUNDS if k in f.metadata)


def check_ranges(cfg: Any) -> None:
    """One-line error for the first field outside its declared range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or not range_text(f):
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if not all(test(item, f.metadata[k]) for k, (_, test) in _BOUNDS.items() if k in f.metadata):
                name = "--" + f.name.replace("_", "-")
                raise UserError(f"{name} must be {range_text(f)}{' (each item)' if isinstance(value, tuple) else ''}"
                                f", got {value if not isinstance(value, tuple) else ','.join(map(str, value))}")


@dataclasses.dataclass
class Config:
    """Base of every stage config: ranges and incompatible options are checked on construction."""

    def __post_init__(self) -> None:
        check_ranges(self)
        self.check()

    def check(self) -> None:
        """Incompatible combinations of options: raise `UserError` with the fix."""


@dataclasses.dataclass
class LoopOptions(Config):
    """Options every training stage has; stage configs extend this."""
    max_steps: int = opt(1000, "Optimizer steps.", ge=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", ge=1)
    seed: int = opt(0, "Random seed.", ge=0)
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = opt("fp32", "Autocast precision (fp16 uses a GradScaler).", choices=["fp32", "bf16", "fp16"])
    nan_policy: str = opt("stop", "On a NaN/inf loss: stop (keeping the last good checkpoint) or skip the step.",
                          choices=["stop", "skip"])
    log_every: int = opt(10, "Steps between metric logs.", ge=1)
    ckpt_every: int = opt(500, "Steps between checkpoints.", ge=1)
    ckpt_keep: int = opt(2, "Checkpoint files kept in the run: the newest complete ones (one of them may be "
                            "replaced by the upload in progress).", ge=2, le=26)
    ema_weights: float = opt(0.0, "Decay of an exponential moving average of the weights, used for validation, "
                                  "samples and the exported model (e.g. 0.999; 0: off).", ge=0, lt=1)
    compile: bool = opt(False, "torch.compile the model (faster steps after a slower first one).")
    system_metrics: bool = opt(True, "Log MLflow system metrics on the run: CPU, memory, disk, network, and GPU "
                                     "when nvidia-ml-py (pynvml) is installed.")


def check_decay(lr: float, min_lr: float) -> None:
    """Both trainers' cosine schedule decays from --lr to --min-lr (`core.loop.cosine_lr`): not upwards."""
    if min_lr > lr:
        raise UserError(f"--min-lr {min_lr} is above --lr {lr}; the schedule decays from lr to min-lr")


def _parse_tuple(text: str | tuple, item: type) -> tuple:
    if isinstance(text, (tuple, list)):
        return tuple(item(v) for v in text)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return tuple(item(p) for p in parts)
    except ValueError as exc:
        raise click.BadParameter(f"expected a comma-separated list of {item.__name__}, got {text!r}") from exc


def _field_type(cls: type, f: dataclasses.Field) -> tuple[Any, Any]:
    """(base type, tuple item type or None) for a dataclass field, resolving string annotations."""
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        tp = args[0]
    if typing.get_origin(tp) is tuple:
        return tuple, typing.get_args(tp)[0]
    return tp, None


def config_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per CLI field of dataclass ``cls``."""

    def decorate(fn: Callable) -> Callable:
        own = cls.__dict__.get("__annotations__", {})
        # the stage's own options first in --help, then those shared through a base config
        fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)
        for f in reversed(fields):
            if not f.metadata.get("cli", True):
                continue
            name = "--" + f.name.replace("_", "-")
            tp, item = _field_type(cls, f)
            default = f.default if f.default is not dataclasses.MISSING else None
            help_ = f.metadata.get("help", "")
            if range_text(f):
                help_ += f" [{range_text(f)}]"
            if f.metadata.get("multiple"):
                opt = click.option(name, multiple=True, help=help_ + " (repeatable)")
            elif tp is bool:
                opt = click.option(f"{name}/--no-{name[2:]}", default=default, show_default=True, help=help_)
            elif tp is tuple:
                opt = click.option(name, default=",".join(map(str, default or ())), show_default=True,
                                   help=help_ + " (comma-separated)")
            else:
                choices = f.metadata.get("choices")
                ctype = click.Choice(choices) if choices else tp
                required = f.default is dataclasses.MISSING
                opt = click.option(name, type=ctype, default=default, required=required,
                                   show_default=default is not None, help=help_)
            fn = opt(fn)
        fn.config_class = cls  # lets tests and tools find every command's config
        return fn

    return decorate


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` from CLI/config-file values, ignoring keys that are not fields."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values or values[f.name] is None and f.default is not None:
            continue
        tp, item = _field_type(cls, f)
        kwargs[f.name] = _parse_tuple(values[f.name], item) if tp is tuple else values[f.name]
    return cls(**kwargs)


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config saved with ``dataclasses.asdict`` (e.g. from a checkpoint), ignoring unknown keys; a field
    the saved config predates takes its ``legacy`` value (what runs did before the option existed) if it has one."""
    legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(cls) if "legacy" in f.metadata}
    return build_config(cls, {**legacy, **values})


def flat_values(cfg: Any) -> dict[str, Any]:
    """Every field as a flat value (tuples joined with commas, None as empty string), for comparisons."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, (tuple, list)):
            v = ",".join(map(str, v))
        out[k] = "" if v is None else v
    return out


def config_params(cfg: Any) -> dict[str, Any]:
    """MLflow params: the options that apply to the chosen ones, without empty values."""
    applies = {f.name: f.metadata.get("applies") for f in dataclasses.fields(cfg)}
    return {k: v for k, v in flat_values(cfg).items()
            if v != "" and (applies[k] is None or applies[k](cfg))}


def unused_options(cfg: Any, given: Iterable[str]) -> list[str]:
    """Of the options in ``given`` (those the user set), the ones that do nothing with the others chosen, each as
    "--flag (needs ...)"."""
    given = set(given)
    return [f"--{f.name.replace('_', '-')} (needs {f.metadata['needs']})" for f in dataclasses.fields(cfg)
            if f.name in given and "applies" in f.metadata and not f.metadata["applies"](cfg)]


def note_unused(cfg: Any, given: Iterable[str], where: str = "") -> None:
    """One line on stderr naming the options the user set that do nothing with the others chosen: they are not
    used and not logged as params, which a user would otherwise find out only by their absence. Under torchrun
    only the first process says it."""
    unused = unused_options(cfg, given)
    if unused and os.environ.get("RANK", "0") == "0":
        click.echo(f"note: {where}ignored (not used, not logged): {', '.join(unused)}", err=True)


def explicit_options(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually typed (not defaults): what may override a resumed run's config."""
    return {k: v for k, v in values.items()
            if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
