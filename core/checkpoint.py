"""Checkpoints as run artifacts: written atomically, logged only when complete, loaded without pickled code.

Two slots (``checkpoints/ckpt_a.pt``, ``ckpt_b.pt``) alternate; ``checkpoints/latest.json`` names the newest
complete one and is written last. A process killed at any moment leaves the previous slot and pointer intact.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from core.options import build_config, config_from_dict, flat_values
from core.tracking import download

# Options that may differ when resuming; everything else must match the checkpoint's config.
RESUMABLE_OVERRIDES = {"max_steps", "device", "precision", "num_workers", "log_every", "val_every", "ckpt_every",
                       "sample_every", "val_batches", "nan_policy", "skip_bad_images"}


def resolve_resume_config(state: dict, overrides: dict[str, Any], cls: type, run_id: str) -> Any:
    """The checkpoint's config, with the explicitly given options that may change on resume."""
    saved = state["config"]
    fresh = flat_values(build_config(cls, {**saved, **overrides}))
    old = flat_values(config_from_dict(cls, saved))
    changed = [k for k in overrides if k not in RESUMABLE_OVERRIDES and fresh[k] != old[k]]
    if changed:
        raise UserError(f"cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} when resuming "
                        f"run {run_id}; only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change")
    cfg = config_from_dict(cls, {**saved, **{k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES}})
    if state["step"] >= cfg.max_steps:
        raise UserError(f"run {run_id} already trained to step {state['step']} (--max-steps {cfg.max_steps}); "
                        "pass a larger --max-steps to continue it")
    return cfg


ARTIFACT_DIR = "checkpoints"
POINTER = "latest.json"
SLOTS = ("ckpt_a.pt", "ckpt_b.pt")


class CheckpointWriter:
    """Saves training state into the active MLflow run, alternating between two slots."""

    def __init__(self, previous_slot: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ckpt-"))
        self.last_slot = previous_slot

    def save(self, state: dict[str, Any]) -> str:
        import mlflow

        slot = SLOTS[1] if self.last_slot == SLOTS[0] else SLOTS[0]
        path = self.dir / slot
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # the local file is whole or absent
        mlflow.log_artifact(str(path), ARTIFACT_DIR)
        pointer = self.dir / POINTER
        pointer.write_text(json.dumps({"file": slot, "step": int(state.get("step", 0))}))
        mlflow.log_artifact(str(pointer), ARTIFACT_DIR)  # only after the slot is complete
        self.last_slot = slot
        return slot

    def close(self) -> None:
        """Remove the local copies: the run's artifacts hold the checkpoints."""
        shutil.rmtree(self.dir, ignore_errors=True)


class UnsafeCheckpointError(UserError):
    """A file holding pickled code or objects: never loaded, never silently skipped."""


def safe_load(path: str | Path, what: str) -> dict[str, Any]:
    """``torch.load`` that never runs pickled code; anything else is a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        named = re.search(r"GLOBAL ([\w.]+)", text)  # what the file would have called
        other = re.search(r"unrecognized function \S+|refusing to [^\n.]+", text)
        detail = f"it names {named.group(1)}" if named else other.group(0) if other else text.splitlines()[0][:200]
        raise UnsafeCheckpointError(
            f"refusing to load {what}: it contains pickled objects other than tensors and plain data, "
            f"which could run code ({detail}); nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {what}: {str(exc).splitlines()[0][:200]}") from None


def load_checkpoint(run_id: str) -> tuple[dict[str, Any], str]:
    """Newest complete checkpoint of a run and its slot name; falls back to the other slot if it is damaged."""
    try:
        named = json.loads(download(run_id, f"{ARTIFACT_DIR}/{POINTER}").read_text())["file"]
    except (ValueError, KeyError, TypeError):  # a pointer cut short by a kill (or tampered with)
        named = None
    if named not in SLOTS:  # then the newest slot that loads wins
        named = None
    order = [named] + [s for s in SLOTS if s != named] if named else list(SLOTS)
    first_error: UserError | None = None
    loaded = []
    for slot in order:
        try:
            state = safe_load(download(run_id, f"{ARTIFACT_DIR}/{slot}"), f"checkpoint {slot} of run {run_id}")
        except UnsafeCheckpointError:
            raise
        except UserError as exc:
            first_error = first_error or exc
            continue
        if named:
            return state, slot
        loaded.append((state, slot))
    if loaded:
        return max(loaded, key=lambda pair: pair[0].get("step", 0))
    raise first_error


def load_weights(module: torch.nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """``load_state_dict`` whose mismatch (checkpoint vs config) is a one-line error, not a traceback."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UserError(f"{what} does not match its config: {str(exc)[:400]}") from None
