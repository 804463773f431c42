"""Weights-only models: a safetensors file plus a JSON config — what inference needs, nothing that can run code.

Layout (a folder, and the run artifact folder ``model/``): ``weights.safetensors`` and ``config.json`` =
``{"kind": ..., "config": {...}, "step": N}``. Training checkpoints (optimizers, discriminator) are for resuming;
every inference stage loads this instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.errors import UserError

MODEL_DIR = "model"
LAST_MODEL_DIR = "model-last"  # a trainer that keeps its best-validation weights in MODEL_DIR logs its last ones here
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def save_weights(folder: str | Path, state_dict: dict[str, torch.Tensor], kind: str, config: dict[str, Any],
                 step: int = 0) -> Path:
    """Write ``weights.safetensors`` + ``config.json`` into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: store plain copies
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in state_dict.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"kind": kind, "config": config, "step": int(step)}, indent=2))
    return folder


def load_weights_folder(folder: str | Path, kind: str, run_id: str | None = None, artifact_path: str = MODEL_DIR
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(state_dict, config, step) of a weights-only model folder (of run ``run_id``, for the messages); a damaged
    file or a wrong kind is a one-line error."""
    from core.artifacts import damaged, read_json, read_safetensors

    folder = Path(folder)
    name = (lambda f: f"{artifact_path}/{f}") if run_id else (lambda f: str(folder / f))
    meta = read_json(folder / CONFIG_FILE, run_id, name(CONFIG_FILE), ("kind", "config"))
    if meta.get("kind") != kind:
        raise UserError(f"the model in {folder} is a {meta.get('kind')!r} model, but a {kind!r} model is needed")
    if not isinstance(meta["config"], dict) or not isinstance(meta.get("step", 0), int):
        raise damaged(run_id, name(CONFIG_FILE), "has a config that is not an object or a step that is not an integer")
    state = read_safetensors(folder / WEIGHTS_FILE, run_id, name(WEIGHTS_FILE))
    return state, meta["config"], int(meta.get("step", 0))


def log_model_weights(state_dict: dict[str, torch.Tensor], kind: str, config: dict[str, Any], step: int = 0,
                      artifact_path: str = MODEL_DIR) -> None:
    """Log the weights-only model of the active run as artifacts ``model/weights.safetensors`` + ``model/config.json``
    (what every inference stage loads; the training checkpoint is only for resuming)."""
    from core.tracking import artifact_folder

    with artifact_folder(artifact_path=artifact_path) as folder:
        save_weights(folder, state_dict, kind, config, step)


def load_model_weights(run_id: str, kind: str, artifact_path: str = MODEL_DIR
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int] | None:
    """(state_dict, config, step) of a run's weights-only model, or None for runs made before runs logged one
    (callers then fall back to the run's training checkpoint)."""
    import mlflow

    from core.tracking import download

    names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, artifact_path)}
    if WEIGHTS_FILE not in names and CONFIG_FILE not in names:
        return None
    missing = next((f for f in (WEIGHTS_FILE, CONFIG_FILE) if f not in names), None)
    if missing:
        from core.artifacts import damaged

        raise damaged(run_id, f"{artifact_path}/{missing}", "is missing")
    return load_weights_folder(download(run_id, artifact_path), kind, run_id, artifact_path)
