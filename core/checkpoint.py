"""Checkpoints as run artifacts: written atomically, logged only when complete, loaded without pickled code.

Slots (``checkpoints/ckpt_a.pt``, ``ckpt_b.pt``, ... ``--ckpt-keep`` of them) rotate; ``checkpoints/latest.json``
names the newest complete one and is uploaded last. A process killed at any moment leaves the previous slot and
pointer intact.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.errors import UserError
from core.options import build_config, config_from_dict, flat_values
from core.tracking import STORAGE_ERRNOS, download

# Options that may differ when resuming; everything else must match the checkpoint's config.
RESUMABLE_OVERRIDES = {"max_steps", "device", "precision", "num_workers", "log_every", "val_every", "ckpt_every",
                       "sample_every", "val_batches", "nan_policy", "skip_bad_images", "ckpt_keep", "compile",
                       "system_metrics"}


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
MAX_SLOTS = 26


def slot_names(keep: int) -> list[str]:
    """``ckpt_a.pt``, ``ckpt_b.pt``, ...: the ``keep`` artifact files that checkpoints rotate through."""
    return [f"ckpt_{chr(ord('a') + i)}.pt" for i in range(keep)]


SLOTS = tuple(slot_names(MAX_SLOTS))


def _retryable(exc: BaseException) -> bool:
    """A full disk or a refused write will not heal within seconds; network and server errors may."""
    return not (isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS)


class CheckpointWriter:
    """Saves training state into a run: written to a local file at once, uploaded by a background thread.

    The training step never waits for an upload; the next checkpoint waits for the previous upload. Uploads
    are retried with exponential backoff; if one still fails, training goes on, ``latest.json`` keeps naming
    the last complete checkpoint, and a warning says so (at the end of training a failed upload is an error).
    Checkpoints rotate through ``keep`` slots and never overwrite the newest complete one, so ``keep`` - 1
    complete checkpoints stay in the run while the next one uploads.
    """

    def __init__(self, run_id: str, previous_slot: str | None = None, keep: int = 2, retries: int = 5,
                 backoff_s: float = 2.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ckpt-"))
        self.run_id, self.slots, self.retries, self.backoff_s = run_id, slot_names(keep), retries, backoff_s
        self.last_slot = previous_slot  # newest complete checkpoint in the run
        self.last_step: int | None = None
        self._attempted = previous_slot
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending: tuple[Future, str, int] | None = None

    def _next_slot(self) -> str:
        start = self.slots.index(self._attempted) + 1 if self._attempted in self.slots else 0
        for i in range(len(self.slots)):
            slot = self.slots[(start + i) % len(self.slots)]
            if slot != self.last_slot:
                return slot
        raise AssertionError("unreachable: keep >= 2")

    def save(self, state: dict[str, Any]) -> str:
        """Write ``state`` locally and start its upload; returns the slot it goes to."""
        self.wait()
        slot = self._attempted = self._next_slot()
        path = self.dir / slot
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # the local file is whole or absent
        step = int(state.get("step", 0))
        self._pending = (self._pool.submit(self._upload, path, step), slot, step)
        return slot

    def _upload(self, path: Path, step: int) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        pointer = self.dir / "pointer" / POINTER
        pointer.parent.mkdir(exist_ok=True)
        pointer.write_text(json.dumps({"file": path.name, "step": step}))
        try:
            for attempt in range(self.retries + 1):
                try:
                    client.log_artifact(self.run_id, str(path), ARTIFACT_DIR)
                    client.log_artifact(self.run_id, str(pointer), ARTIFACT_DIR)  # only after the slot is complete
                    return
                except Exception as exc:  # noqa: BLE001 - whatever the store raised: retry, or hand it over
                    if attempt == self.retries or not _retryable(exc):
                        raise
                    time.sleep(self.backoff_s * 2**attempt)
        finally:
            path.unlink(missing_ok=True)  # the run holds it now (or it is lost): no local copies pile up

    def wait(self, final: bool = False) -> None:
        """Wait for the upload in progress. A failed upload is a warning, or raised when ``final``."""
        if self._pending is None:
            return
        (future, slot, step), self._pending = self._pending, None
        exc = future.exception()
        if exc is None:
            self.last_slot, self.last_step = slot, step
            return
        if final:
            raise exc
        kept = f"step {self.last_step}" if self.last_step is not None else (
            f"the one named by {ARTIFACT_DIR}/{POINTER}" if self.last_slot else "none yet")
        tqdm.write(f"warning: the checkpoint of step {step} could not be uploaded after {self.retries + 1} tries "
                   f"({_first_line(exc)}); training goes on, the last complete checkpoint is {kept}", file=sys.stderr)

    def close(self) -> None:
        """Stop the upload thread (after its current upload) and remove the local copies."""
        self._pool.shutdown(wait=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


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
        corrupt = re.search(r"Unsupported operand[^\n]*", text)  # bytes that are no pickle at all
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # a pickle (protocol 2+) that torch's safe loader refused
        if corrupt and not named and not other and not pickled:
            raise UserError(f"cannot read {what}: it is not a checkpoint, truncated or corrupt "
                            f"({corrupt.group(0)})") from None
        detail = f"it names {named.group(1)}" if named else other.group(0) if other else _first_line(exc)[:200]
        raise UnsafeCheckpointError(
            f"refusing to load {what}: it contains pickled objects other than tensors and plain data, "
            f"which could run code ({detail}); nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        problem = "it is empty (0 bytes)" if Path(path).stat().st_size == 0 else (
            f"it is truncated or corrupt ({_first_line(exc)[:200]})")
        raise UserError(f"cannot read {what}: {problem}") from None


def load_checkpoint(run_id: str) -> tuple[dict[str, Any], str]:
    """Newest complete checkpoint of a run and its slot name; falls back to the other slot if it is damaged."""
    try:
        named = json.loads(download(run_id, f"{ARTIFACT_DIR}/{POINTER}").read_text())["file"]
    except (ValueError, KeyError, TypeError):  # a pointer cut short by a kill (or tampered with)
        named = None
    if named not in SLOTS:  # then the newest slot that loads wins
        named = None
    present = _present_slots(run_id)
    order = [named] + [s for s in present if s != named] if named else present
    first_error: UserError | None = None
    loaded = []
    for slot in order:
        try:
            path = download(run_id, f"{ARTIFACT_DIR}/{slot}")
            state = safe_load(path, f"checkpoint {slot} of run {run_id}")
            if not isinstance(state, dict) or "step" not in state:
                raise UserError(f"cannot read checkpoint {slot} of run {run_id}: it is not a training checkpoint "
                                "(no step)")
        except UnsafeCheckpointError:
            raise
        except UserError as exc:
            first_error = first_error or exc
            continue
        if first_error is not None and named:  # the newest is damaged: an older complete slot takes its place
            tqdm.write(f"warning: {first_error.message.removeprefix('cannot read ')}; using the previous checkpoint "
                       f"{slot} (step {state.get('step')}) instead", file=sys.stderr)
        if named:
            return state, slot
        loaded.append((state, slot))
    if loaded:
        return max(loaded, key=lambda pair: pair[0].get("step", 0))
    if first_error is None:
        raise UserError(f"run {run_id} has no checkpoint ({ARTIFACT_DIR}/ is empty); was it ever saved?")
    from core.artifacts import remedy

    raise UserError(f"{first_error.message}; no other checkpoint slot of the run loads either: {remedy(run_id)}")


def load_checkpoint_slot(run_id: str, slot: str) -> dict[str, Any]:
    """The checkpoint in ``slot`` of a run (the one `load_checkpoint` chose on rank 0), loaded onto the CPU."""
    return safe_load(download(run_id, f"{ARTIFACT_DIR}/{slot}"), f"checkpoint {slot} of run {run_id}")


def _present_slots(run_id: str) -> list[str]:
    """The checkpoint slots a run holds (listing fails on some stores: then every name is tried)."""
    import mlflow

    try:
        names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, ARTIFACT_DIR)}
    except Exception:  # noqa: BLE001 - a listing is only a shortcut
        return list(SLOTS)
    return [s for s in SLOTS if s in names]


def load_weights(module: torch.nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """``load_state_dict`` whose mismatch (checkpoint vs config) is a one-line error, not a traceback."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UserError(f"{what} does not match its config: {str(exc)[:400]}") from None
