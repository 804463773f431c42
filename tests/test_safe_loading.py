"""Checkpoints and code grids are loaded without running pickled code: a planted pickle is refused, never run."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import ROOT, error_line, invoke

MARKER_NAME = "pwned"


class Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do with a real command."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_run(stage: str, files: dict[str, Path], tmp_path: Path) -> str:
    """A run tagged ``stage`` holding ``files`` (artifact path -> local file) under checkpoints/."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("planted") or client.get_experiment(client.create_experiment("planted"))
    run_id = client.create_run(exp.experiment_id, tags={"stage": stage}).info.run_id
    for name, path in files.items():
        staged = tmp_path / "stage" / run_id / name  # log_artifact keeps the file's own name
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(path.read_bytes())
        client.log_artifact(run_id, str(staged), "checkpoints")
    client.set_terminated(run_id)
    return run_id


def pointer(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "latest.json"
    path.write_text(text)
    return path


def refused(res, run_id: str) -> None:
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert error_line(res.stderr).startswith(f"Error: refusing to load checkpoint ckpt_a.pt of run {run_id}")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_planted_pickle_is_refused_by_every_loader(tracking_dir, tmp_path, writer):
    from core.checkpoint import UnsafeCheckpointError
    from vqvae.tokenizer import load_tokenizer

    marker = tmp_path / MARKER_NAME
    evil = tmp_path / "evil.pt"
    state = {"config": {"codebook_size": 32}, "step": 1, "model": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, evil)
    else:  # the legacy non-zip format goes through a different loader inside torch.load
        evil.write_bytes(pickle.dumps(state))
    ptr = pointer(tmp_path, json.dumps({"file": "ckpt_a.pt", "step": 1}))
    vq = plant_run("vqvae", {"ckpt_a.pt": evil, "latest.json": ptr}, tmp_path)
    gpt = plant_run("transformer", {"ckpt_a.pt": evil, "latest.json": ptr}, tmp_path)
    np.save(tmp_path / "codes.npy", np.zeros((1, 2, 2), dtype=np.int64))

    refused(invoke("quantize", "--vqvae-run-id", vq), vq)
    refused(invoke("train-vqvae", "--resume", vq, "--max-steps", "5"), vq)
    refused(invoke("decode", "--indices", tmp_path / "codes.npy", "--vqvae-run-id", vq), vq)
    refused(invoke("generate", "--transformer-run-id", gpt, "--num-samples", "1"), gpt)
    refused(invoke("train", "--resume", gpt, "--max-steps", "5"), gpt)
    with pytest.raises(UnsafeCheckpointError):
        load_tokenizer(vq)
    assert not marker.exists()


def test_planted_object_array_is_refused_as_code_grids(vqvae_run, tmp_path):
    marker = tmp_path / MARKER_NAME
    np.save(tmp_path / "codes.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    res = invoke("decode", "--indices", tmp_path / "codes.npy", "--vqvae-run-id", vqvae_run)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "holds pickled Python objects, not code grids (not loaded" in error_line(res.stderr)
    assert not marker.exists()


@pytest.mark.parametrize("text", ["", '{"file": "ckpt_', '{"file": "../../meta.yaml"}'])
def test_damaged_pointer_falls_back_to_the_newest_slot(vqvae_run, tmp_path, text):
    from core.checkpoint import load_checkpoint
    from vqvae.tokenizer import load_tokenizer

    slots = Path(mlflow.artifacts.download_artifacts(run_id=vqvae_run, artifact_path="checkpoints",
                                                     dst_path=str(tmp_path / "real")))
    run_id = plant_run("vqvae", {"ckpt_a.pt": slots / "ckpt_a.pt", "ckpt_b.pt": slots / "ckpt_b.pt",
                                 "latest.json": pointer(tmp_path, text)}, tmp_path)
    assert load_checkpoint(run_id)[0]["step"] == load_checkpoint(vqvae_run)[0]["step"] == 4
    assert load_tokenizer(run_id).codebook_size == 32


def call_texts(source: str, func: str) -> list[str]:
    """The full text of every call ``func(...)`` in ``source`` (parentheses balanced, so multi-line calls too)."""
    out = []
    for m in re.finditer(re.escape(func) + r"\(", source):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
            if depth == 0:
                break
        out.append(source[m.start():i])
    return out


def test_every_load_in_the_code_refuses_pickles():
    # tests load files they wrote themselves; the product code must never rely on the library default
    # our sources only: not the tests, virtual environments, or run outputs (logged models hold copies of the code)
    skip = {"tests", "mlruns", "mlartifacts", "outputs", "demo_data"}
    files = [p for p in ROOT.rglob("*.py")
             if not any(part in skip or part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert len(files) > 10
    for path in files:
        source = path.read_text()
        for call in call_texts(source, "torch.load"):
            assert "weights_only=True" in call, f"{path}: {call}"
        for call in call_texts(source, "np.load") + call_texts(source, "numpy.load"):
            assert "allow_pickle=False" in call, f"{path}: {call}"
        assert not re.search(r"\bpickle\.loads?\(|read_pickle\(|joblib\.load\(", source), path
