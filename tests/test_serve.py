"""The generator answers `mlflow models serve -m models:/NAME@ALIAS --env-manager local` with PNG images."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow

from conftest import TINY_GPT, invoke, last_line
from core.mlflow_models import image_from_base64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer /ping within {timeout} s")


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_registered_generator_serves_png_images(tracking_dir, vqvae_run, tmp_path):
    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--quantize-run-id", last_line(res.stdout), *TINY_GPT, "--register", "serve-gen")
    assert res.exit_code == 0, res.output
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name = 'serve-gen'")
    client.set_registered_model_alias("serve-gen", "champion", version.version)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    venv_bin = Path(sys.executable).parent  # `mlflow models serve` runs the venv's uvicorn through PATH
    env = {**os.environ, "PYTHONPATH": "", "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    # from another directory, without this checkout on the path: the model must carry its own code
    proc = subprocess.Popen([str(venv_bin / "mlflow"), "models", "serve", "-m", "models:/serve-gen@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until_up(url, proc)
        status, body = post(url, {"dataframe_records": [{"label": "red", "num_samples": 2, "seed": 5,
                                                          "temperature": 0.9, "top_k": 8}]})
        assert status == 200, body
        rows = body["predictions"]
        assert [r["label"] for r in rows] == ["red", "red"]
        for row in rows:
            assert image_from_base64(row["image"]).size == (16, 16)
        again = post(url, {"dataframe_records": [{"label": "red", "num_samples": 2, "seed": 5, "temperature": 0.9,
                                                  "top_k": 8}]})[1]["predictions"]
        assert again == rows  # same seed, same images
        status, body = post(url, {"dataframe_records": [{"label": "purple"}]})
        assert status == 400 and "unknown label 'purple'" in body.get("message", ""), body
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End the server and the workers it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc.stdout.close()


def test_served_generator_honours_precision(tmp_path, monkeypatch):
    """The served generator samples in the precision its loader asks for through MLflow's model config
    (weights and KV cache in bf16 here), fp32 by default, and refuses an unknown one."""
    import dataclasses
    import types

    import pandas as pd
    import pytest
    import torch
    from mlflow.exceptions import MlflowException

    from core.weights import save_weights
    from transformer import pyfunc_model
    from transformer.model import GPT, GPTConfig

    gpt = GPT(GPTConfig(16, 0, (3, 4), n_layer=1, n_head=2, n_embd=16, window_size=0))
    save_weights(tmp_path / "gen", gpt.state_dict(), pyfunc_model.KIND, dataclasses.asdict(gpt.config))
    monkeypatch.setattr(pyfunc_model.Vocab, "load", staticmethod(lambda path: types.SimpleNamespace(num_classes=0)))
    tokenizer = types.SimpleNamespace(decode_indices=lambda codes: torch.zeros(len(codes), 3, 12, 16))
    monkeypatch.setattr(pyfunc_model, "load_tokenizer_folder", lambda folder, device: (tokenizer, None))
    artifacts = {"generator": str(tmp_path / "gen"), "tokenizer": str(tmp_path / "tok")}
    for config, dtype in ((None, torch.float32), ({"precision": "bf16"}, torch.bfloat16)):
        model = pyfunc_model.GeneratorModel()
        model.load_context(types.SimpleNamespace(artifacts=artifacts, model_config=config))
        assert next(model.gpt.parameters()).dtype == dtype
        out = model.predict(None, pd.DataFrame([{"num_samples": 2, "seed": 1}]))
        assert len(out) == 2 and model.gpt._caches[0].kv.dtype == dtype
    with pytest.raises(MlflowException, match="precision must be one of fp32, bf16, fp16"):
        pyfunc_model.GeneratorModel().load_context(types.SimpleNamespace(artifacts=artifacts,
                                                                         model_config={"precision": "fp8"}))


def test_served_generator_default_top_k_scales_with_the_codebook(tmp_path, monkeypatch):
    """A request without top_k samples with the share of the model's codebook that `generate` uses (20 of 1024
    codes), 0 turns the filter off, and an explicit value is kept."""
    import dataclasses
    import types

    import pandas as pd
    import torch

    from core.weights import save_weights
    from transformer import pyfunc_model
    from transformer.model import GPT, GPTConfig

    gpt = GPT(GPTConfig(1024, 0, (2, 2), n_layer=1, n_head=2, n_embd=16, window_size=0))
    save_weights(tmp_path / "gen", gpt.state_dict(), pyfunc_model.KIND, dataclasses.asdict(gpt.config))
    monkeypatch.setattr(pyfunc_model.Vocab, "load", staticmethod(lambda path: types.SimpleNamespace(num_classes=0)))
    tokenizer = types.SimpleNamespace(decode_indices=lambda codes: torch.zeros(len(codes), 3, 8, 8))
    monkeypatch.setattr(pyfunc_model, "load_tokenizer_folder", lambda folder, device: (tokenizer, None))
    used = []
    real = pyfunc_model.generate
    monkeypatch.setattr(pyfunc_model, "generate", lambda *a, **kw: (used.append(kw["top_k"]), real(*a, **kw))[1])
    model = pyfunc_model.GeneratorModel()
    model.load_context(types.SimpleNamespace(artifacts={"generator": str(tmp_path / "gen"), "tokenizer": "-"},
                                             model_config=None))
    for row in ({"num_samples": 1}, {"num_samples": 1, "top_k": 0}, {"num_samples": 1, "top_k": 7}):
        model.predict(None, pd.DataFrame([row]))
    assert used == [20, None, 7]


def test_served_tokenizer_sees_an_image_as_quantize_does(tracking_dir, vqvae_run, tmp_path):
    """Any file a user sends the tokenizer model (here: not square, half transparent, turned by an EXIF tag,
    16-bit) gets the codes quantize writes for the same file: one preprocessing, not a squashed or black-backed
    copy of it."""
    import base64

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rgba = rng.integers(0, 255, (20, 34, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((20, 34)) < 0.5, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img" / "wide.png")
    turned = Image.fromarray(rng.integers(0, 255, (18, 40, 3), dtype=np.uint8))
    exif = turned.getexif()
    exif[0x0112] = 6  # orientation: shown turned 90° clockwise
    turned.save(tmp_path / "img" / "turned.png", exif=exif)
    Image.fromarray(rng.integers(0, 65535, (40, 22), dtype=np.uint16)).save(tmp_path / "img" / "deep.png")
    Image.fromarray(rgba[..., :3]).resize((300, 170)).save(tmp_path / "img" / "large.jpg")  # decoded at 1/8
    names = ["deep.png", "large.jpg", "turned.png", "wide.png"]
    (tmp_path / "m.csv").write_text("image_path,split\n" + "".join(f"img/{n},train\n" for n in names))
    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--manifest", tmp_path / "m.csv", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    run_id = last_line(res.stdout)
    index = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="index.csv"))
    codes = np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="codes/train.npy"))
    experiment = mlflow.MlflowClient().get_run(vqvae_run).info.experiment_id
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                           filter_string=f"source_run_id = '{vqvae_run}'")
    served = mlflow.pyfunc.load_model(model.model_uri).predict(pd.DataFrame(
        {"image": [base64.b64encode((tmp_path / "img" / n).read_bytes()).decode("ascii") for n in names]}))
    for name, answer in zip(names, served.codes):
        row = index.loc[index.image_path.str.endswith(name), "row"].item()
        assert json.loads(answer) == codes[row].tolist(), name
