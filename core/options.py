"""One config dataclass per stage feeds the click options, the MLflow params and the checkpoint.

A field's ``metadata`` may hold ``help``, ``choices`` and ``multiple`` (a repeatable option).
Tuple fields are written on the command line as comma-separated lists ("1,2,4").
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, TypeVar

import click

T = TypeVar("T")


def opt(default: Any, help_: str, **meta: Any) -> Any:
    """A config field with its CLI help (and ``choices``/``multiple``) in the metadata."""
    return dataclasses.field(default=default, metadata={"help": help_, **meta})


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
    """Rebuild a config saved with ``dataclasses.asdict`` (e.g. from a checkpoint), ignoring unknown keys."""
    return build_config(cls, values)


def config_params(cfg: Any) -> dict[str, Any]:
    """Flat MLflow params: tuples joined with commas, None as empty string."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, (tuple, list)):
            v = ",".join(map(str, v))
        out[k] = "" if v is None else v
    return out


def explicit_options(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually typed (not defaults): what may override a resumed run's config."""
    return {k: v for k, v in values.items()
            if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
