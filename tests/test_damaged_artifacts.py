"""Every artifact a stage reads from an earlier run — weights, model config, checkpoints, code grids, vocab, index —
missing, empty, truncated, corrupt or of the wrong kind (a pickle where safetensors or .npy is expected): one line
naming the run, the file, what is wrong and what to do; exit 1, no traceback, nothing in the file run. A damaged
newest checkpoint slot falls back to the previous one by itself."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import Param

from conftest import TINY_GPT, error_line, invoke, last_line
from test_safe_loading import MARKER_NAME as MARKER, Payload

@pytest.fixture(scope="module")
def chain(quantize_run) -> dict[str, str]:
    """A finished chain: vq (tokenizer), q (quantize), t (transformer), g (generate)."""
    ids = {"vq": mlflow.MlflowClient().get_run(quantize_run).data.tags["upstream_run_id"], "q": quantize_run}
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT)
    assert res.exit_code == 0, res.output
    ids["t"] = last_line(res.stdout)
    res = invoke("generate", "--transformer-run-id", ids["t"], "--num-samples", "2")
    assert res.exit_code == 0, res.output
    ids["g"] = last_line(res.stdout)
    return ids


def clone_run(run_id: str, tmp_path: Path, change: dict[str, bytes | None]) -> str:
    """A copy of a run (tags, params, artifacts) with artifacts replaced (bytes) or removed (None)."""
    client = mlflow.MlflowClient()
    src = client.get_run(run_id)
    tags = {k: v for k, v in src.data.tags.items() if not k.startswith("mlflow.")}
    new = client.create_run(src.info.experiment_id, tags=tags).info.run_id
    client.log_batch(new, params=[Param(k, v) for k, v in src.data.params.items()])
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "copy" / new)))
    for name, content in change.items():
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)
    client.log_artifacts(new, str(folder))
    client.set_terminated(new)
    shutil.rmtree(folder)
    return new


def corruptions(original: bytes, marker: Path) -> dict[str, bytes | None]:
    buffer = io.BytesIO()
    torch.save({"weights": Payload(marker)}, buffer)
    return {"missing": None, "empty": b"", "truncated": original[: len(original) // 2],
            "corrupt": bytes(range(256)) * 4, "pickle": buffer.getvalue()}


def original(run_id: str, name: str) -> bytes:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name)).read_bytes()


# (what is damaged, run key, artifact, command reading it)
ARTIFACTS = [
    ("tokenizer weights", "vq", "model/weights.safetensors", ["quantize", "--vqvae-run-id", "{run}", "--num-workers", "0"]),
    ("tokenizer model config", "vq", "model/config.json", ["quantize", "--vqvae-run-id", "{run}", "--num-workers", "0"]),
    ("transformer weights", "t", "model/weights.safetensors", ["generate", "--transformer-run-id", "{run}", "--num-samples", "1"]),
    ("code grids", "q", "codes/train.npy", ["train", "--quantize-run-id", "{run}", *TINY_GPT]),
    ("validation code grids", "q", "codes/val.npy", ["train", "--quantize-run-id", "{run}", *TINY_GPT]),
    ("vocab", "q", "vocab.json", ["train", "--quantize-run-id", "{run}", *TINY_GPT]),
    ("index", "q", "index.csv", ["train", "--quantize-run-id", "{run}", *TINY_GPT]),
    ("sampled code grids", "g", "samples/codes.npy", ["decode", "--run-id", "{run}"]),
]


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "corrupt", "pickle"])
@pytest.mark.parametrize("what,key,name,command", ARTIFACTS, ids=[a[0] for a in ARTIFACTS])
def test_damaged_artifact_is_one_line(chain, tmp_path, what, key, name, command, kind):
    marker = tmp_path / MARKER
    content = corruptions(original(chain[key], name), marker)[kind]
    bad = clone_run(chain[key], tmp_path, {name: content})
    before = len(mlflow.search_runs(search_all_experiments=True))
    res = invoke(*[a.format(run=bad) for a in command])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    line = error_line(res.stderr)  # one line, no traceback
    assert bad in line
    if kind == "missing":  # (a run without model/ at all predates weights-only models: read via its checkpoint)
        assert f"{name} is missing" in line if name.startswith("model/") else f"has no artifact '{name}'" in line
    else:
        assert name in line and "re-run `python cli.py" in line, line
        problem = {"empty": "is empty", "pickle": "pickle"}.get(kind)
        if problem and not name.endswith((".json", ".csv")):
            assert problem in line, line
    assert not marker.exists()
    assert len(mlflow.search_runs(search_all_experiments=True)) == before  # checked before a run is made


def test_config_of_the_wrong_shape_is_one_line(chain, tmp_path):
    for text, problem in (("[1, 2]", "holds a JSON list"), ('{"kind": "vqvae"}', "lacks the key 'config'"),
                          ('{"kind": "vqvae", "config": 3}', "config that is not an object")):
        bad = clone_run(chain["vq"], tmp_path, {"model/config.json": text.encode()})
        res = invoke("quantize", "--vqvae-run-id", bad, "--num-workers", "0")
        assert res.exit_code == 1 and problem in error_line(res.stderr) and bad in error_line(res.stderr)
    vocab = json.loads(original(chain["q"], "vocab.json"))
    for change in ({"grid_shape": [4]}, {"codebook_size": "many"}, {"classes": 5}):
        bad = clone_run(chain["q"], tmp_path, {"vocab.json": json.dumps({**vocab, **change}).encode()})
        res = invoke("train", "--quantize-run-id", bad, *TINY_GPT)
        assert res.exit_code == 1 and "does not describe code grids" in error_line(res.stderr)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 2, 2), dtype=np.int64))
    bad = clone_run(chain["q"], tmp_path, {"codes/train.npy": buf.getvalue()})
    res = invoke("train", "--quantize-run-id", bad, *TINY_GPT)
    assert res.exit_code == 1 and "but vocab.json says" in error_line(res.stderr)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_slot(chain, tmp_path):
    """Resume from a run whose newest slot is truncated: the previous slot is used, with a warning; both damaged:
    one line."""
    from core.checkpoint import load_checkpoint

    run = chain["t"]
    newest = json.loads(original(run, "checkpoints/latest.json"))["file"]
    other = next(s for s in ("ckpt_a.pt", "ckpt_b.pt") if s != newest)
    data = original(run, f"checkpoints/{newest}")
    bad = clone_run(run, tmp_path, {f"checkpoints/{newest}": data[: len(data) // 3]})
    state, slot = load_checkpoint(bad)
    assert slot == other and state["step"] == 1
    res = invoke("train", "--resume", bad, "--max-steps", "3")
    assert res.exit_code == 0, res.output
    assert f"checkpoint {newest} of run {bad}" in res.stderr and f"using the previous checkpoint {other}" in res.stderr

    both = clone_run(run, tmp_path, {f"checkpoints/{newest}": b"", f"checkpoints/{other}": b"\x00" * 10})
    res = invoke("train", "--resume", both, "--max-steps", "3")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    line = error_line(res.stderr)
    assert line.startswith(f"Error: cannot read checkpoint {newest} of run {both}")
    assert "no other checkpoint slot of the run loads either: re-run `python cli.py train`" in line


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
@pytest.mark.parametrize("kind", ["truncated", "corrupt", "pickle", "wrong kind"])
def test_damaged_pipeline_settings_file_is_one_line(tracking_dir, tmp_path, suffix, kind):
    marker = tmp_path / MARKER
    good = '[train]\nmax-steps = 2\n' if suffix == ".toml" else "train:\n  max-steps: 2\n"
    content = {"truncated": good[: good.index("=") if suffix == ".toml" else good.index(":") + 4] + "[\n",
               "corrupt": bytes(range(256)) * 4, "pickle": corruptions(b"", marker)["pickle"],
               "wrong kind": "[1, 2]\n" if suffix == ".yaml" else "train = 3\n"}[kind]
    path = tmp_path / f"settings{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = len(mlflow.search_runs(search_all_experiments=True))
    res = invoke("pipeline", "--manifest", tmp_path / "none.csv", "--config", path)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert str(path) in error_line(res.stderr) and not marker.exists()
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
