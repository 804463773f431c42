"""Reading the files a stage takes from an earlier run: a missing, empty, truncated or corrupt file, or one of the
wrong kind (a pickle where safetensors or .npy is expected), is a one-line error naming the run, the file, what is
wrong with it and what to do; nothing in it is run (no pickles are loaded)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle protocol 2+ header; torch.save's zip archive


def remedy(run_id: str | None) -> str:
    """What to do about a damaged artifact of ``run_id``: make that run again with the stage that made it."""
    if not run_id:
        return "write the file again"
    from core.tracking import STAGE_COMMANDS

    try:
        import mlflow

        tags = mlflow.MlflowClient().get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - the advice is a courtesy: the error itself must not fail
        tags = {}
    stage = tags.get("stage")
    command = "import-vqvae" if "imported_from" in tags else STAGE_COMMANDS.get(stage)
    if command is None:
        return "re-run the stage that made this run and use the new run"
    return f"re-run `python cli.py {command}` to make a new {stage} run and use that one"


def damaged(run_id: str | None, name: str, problem: str) -> UserError:
    """The one-line error for artifact ``name`` of ``run_id`` (a local file when ``run_id`` is None)."""
    where = f"run {run_id}: artifact {name}" if run_id else f"file {name}"
    return UserError(f"{where} {problem}; {remedy(run_id)}")


def what_is_wrong(path: Path, exc: BaseException | None, expected: str) -> str:
    """Why ``path`` could not be read as ``expected``: empty, a pickle, or the reader's own first line."""
    try:
        head = path.read_bytes()[:4]
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(_PICKLE_MAGIC):
        return f"is a pickle or torch.save file, not a {expected} (not loaded: a pickle can run code)"
    if exc is None or not str(exc).strip():
        return f"is truncated or corrupt (not a readable {expected})"
    return f"is truncated or corrupt (not a readable {expected}: {str(exc).strip().splitlines()[0][:160]})"


def read_json(path: Path, run_id: str | None, name: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object with at least ``keys``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise damaged(run_id, name, what_is_wrong(Path(path), exc, "JSON file")) from None
    if not isinstance(data, dict):
        raise damaged(run_id, name, f"holds a JSON {type(data).__name__}, not an object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise damaged(run_id, name, f"lacks the key {missing[0]!r}")
    return data


def read_safetensors(path: Path, run_id: str | None, name: str) -> dict[str, Any]:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        raise damaged(run_id, name, what_is_wrong(Path(path), exc, "safetensors file")) from None


def read_codes(path: Path, run_id: str | None, name: str, mmap: bool = False) -> np.ndarray:
    """Integer code grids (N, h, w) from a .npy file, never unpickling objects (``mmap``: memory-mapped)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_npy = f.read(6) == b"\x93NUMPY"  # np.load would also open .npz (zip) archives, e.g. torch.save's
    except OSError:
        is_npy = False
    if not is_npy:
        raise damaged(run_id, name, what_is_wrong(path, None, ".npy array"))
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        problem = what_is_wrong(path, exc, ".npy array")
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            problem = "holds pickled Python objects, not code grids (not loaded: a pickle can run code)"
        raise damaged(run_id, name, problem) from None
    if arr.dtype.kind not in "iu":
        raise damaged(run_id, name, f"holds {arr.dtype} values, but code grids must be integers")
    if arr.ndim != 3 or min(arr.shape[1:], default=0) < 1:
        raise damaged(run_id, name, f"is not code grids: they must have shape (N, height, width), got {arr.shape}")
    return arr


def read_table(path: Path, run_id: str | None, name: str, columns: tuple[str, ...]):
    """The ``columns`` of a CSV table (only those: a million image paths would cost more memory than the codes)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, usecols=lambda c: c in columns)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise damaged(run_id, name, what_is_wrong(Path(path), exc, "CSV table")) from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise damaged(run_id, name, f"lacks the column {missing[0]!r}")
    return table
