"""Pretrained tokenizers: official taming/LlamaGen files imported (exact official indices), exported, fine-tuned,
and used by every stage; weights-only models of trained runs.

``fixtures/{taming,llamagen}_tiny.*`` hold official-named weights built with the official code and its outputs
(``fixture.*``; the JSON files say how). From them the tests write files in the real formats: a Lightning
``.ckpt`` whose ``callbacks`` is keyed by Lightning's ModelCheckpoint class, LlamaGen's release and training files.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_GPT, TINY_VQ, error_line, invoke, last_line

FIXTURES = Path(__file__).parent / "fixtures"
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"
FINE_TUNE = ["--perceptual-weight", "0", "--batch-size", "4", "--max-steps", "2", "--disc-start", "100",
             "--val-every", "2", "--ckpt-every", "2", "--log-every", "1", "--val-batches", "1", "--num-workers", "0"]


def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(official state dict, fixture tensors, description) of ``taming`` or ``llamagen``."""
    tensors = load_file(str(FIXTURES / f"{name}_tiny.safetensors"))
    outputs = {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("fixture.")}
    return tensors, outputs, json.loads((FIXTURES / f"{name}_tiny.json").read_text())


class _FakeLightning:
    """Installs a module named like Lightning's while a checkpoint is written, so the file names that class exactly
    as a real taming checkpoint does; removed before anything is loaded (Lightning is not installed)."""

    def __enter__(self) -> type:
        # pickled by reference, as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint
        model_checkpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING})
        self.names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING]
        for name in self.names:
            sys.modules[name] = types.ModuleType(name)
        sys.modules[LIGHTNING].ModelCheckpoint = model_checkpoint
        return model_checkpoint

    def __exit__(self, *exc) -> None:
        for name in self.names:
            del sys.modules[name]


def lightning_ckpt(path: Path, state: dict[str, torch.Tensor], payload: Callable[[type], object] | None = None
                   ) -> Path:
    """taming's PyTorch Lightning 1.0.8 checkpoint layout, with training-only ``loss.*`` weights (and
    ``payload(ModelCheckpoint class)`` among the callbacks)."""
    with _FakeLightning() as model_checkpoint:
        sd = OrderedDict(state)
        sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
        sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 4, 1, 1)
        callbacks = {model_checkpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "/x/last.ckpt"}}
        if payload is not None:
            callbacks["payload"] = payload(model_checkpoint)
        torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "callbacks": callbacks,
                    "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}],
                    "lr_schedulers": [], "state_dict": sd}, path)
    return path


def llamagen_train_file(path: Path, state: dict[str, torch.Tensor], **args) -> Path:
    """LlamaGen's vq_train.py checkpoint: model, optimizers, discriminator, steps and an argparse.Namespace."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "discriminator": {"conv.weight": torch.randn(2, 3, 4, 4)}, "optimizer_disc": {"state": {}},
                "steps": 500, "args": argparse.Namespace(vq_model="VQ-16", codebook_l2_norm=True, **args)}, path)
    return path


def real_file(name: str, tmp_path: Path) -> Path:
    state, _, _ = fixture(name)
    if name == "taming":
        return lightning_ckpt(tmp_path / "last.ckpt", state)
    return llamagen_train_file(tmp_path / "0000500.pt", state, image_size=32)


def imported(*args) -> str:
    res = invoke("import-vqvae", *args)
    assert res.exit_code == 0, res.output
    return last_line(res.stdout)


@pytest.fixture(scope="module")
def imports(tracking_dir, tmp_path_factory) -> dict[str, str]:
    """Run IDs of the two fixtures imported from their real-format files."""
    folder = tmp_path_factory.mktemp("official")
    return {name: imported("--checkpoint", real_file(name, folder)) for name in ("taming", "llamagen")}


@pytest.mark.parametrize("name", ["taming", "llamagen"])
def test_import_reproduces_the_official_outputs(imports, name):
    from vqvae.tokenizer import load_tokenizer

    _, out, _ = fixture(name)
    tok = load_tokenizer(imports[name])
    assert "pytorch_lightning" not in sys.modules
    assert torch.equal(tok.encode(out["input"]), out["indices"])
    with torch.no_grad():
        assert (tok.model.encode_latents(out["input"]) - out["latent"]).abs().max() < 1e-4
        decoded = tok.model.decode_indices(out["indices"])  # the official decoders do not clamp
    assert (decoded - out["decoded"]).abs().max() < 1e-5  # the bar: within 1e-5 of the official decoder

    run = mlflow.MlflowClient().get_run(imports[name])
    file = "last.ckpt" if name == "taming" else "0000500.pt"
    assert run.data.tags["stage"] == "vqvae" and run.data.tags["imported_from"] == f"{name}:{file}"
    assert run.data.params["codebook_size"] == "64" and run.info.status == "FINISHED"
    listing = {a.path for a in mlflow.MlflowClient().list_artifacts(imports[name], "model")}
    assert listing == {"model/weights.safetensors", "model/config.json"}


def test_shape_inference_matches_the_official_configs():
    from vqvae.convert import OfficialWeights, default_image_size, infer_architecture

    state, _, desc = fixture("taming")
    arch = infer_architecture(OfficialWeights("taming", state))
    cfg = arch.config(default_image_size(arch), False)  # no --image-size: attention at 16x16 features
    dd = desc["ddconfig"]
    assert (cfg.image_size, cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, list(cfg.attn_resolutions),
            cfg.z_channels) == (dd["resolution"], dd["ch"], dd["ch_mult"], dd["num_res_blocks"],
                                dd["attn_resolutions"], dd["z_channels"])
    assert (cfg.embed_dim, cfg.codebook_size) == (desc["embed_dim"], desc["n_embed"])

    state, _, desc = fixture("llamagen")
    arch = infer_architecture(OfficialWeights("llamagen", state))
    cfg = arch.config(desc["resolution"], True)
    eq = desc["equivalent_taming_style_config"]
    assert (cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, list(cfg.attn_resolutions), cfg.z_channels,
            cfg.embed_dim, cfg.codebook_size) == (eq["ch"], eq["ch_mult"], eq["num_res_blocks"],
                                                  eq["attn_resolutions"], eq["z_channels"], eq["embed_dim"],
                                                  eq["n_embed"])
    # the real VQ-16 layout: attention at the last of five levels, 16x16 codes at 256 px
    assert default_image_size(arch) == 16 * 4 and arch.attn_levels == (2,)


def test_released_llamagen_file_and_plain_state_dicts(tracking_dir, tmp_path):
    """``{"model": ...}`` as released (no args: l2 lookup by default) and a bare .safetensors with official names."""
    from vqvae.tokenizer import load_tokenizer

    state, out, _ = fixture("llamagen")
    torch.save({"model": state}, tmp_path / "vq_ds16_c2i.pt")
    run = imported("--checkpoint", tmp_path / "vq_ds16_c2i.pt", "--image-size", "32", "--format", "llamagen")
    tok = load_tokenizer(run)
    assert tok.cfg.l2_norm and tok.cfg.image_size == 32
    assert torch.equal(tok.encode(out["input"]), out["indices"])
    save_file(fixture("taming")[0], str(tmp_path / "taming.safetensors"))
    run = imported("--checkpoint", tmp_path / "taming.safetensors", "--name", "tiny taming")
    assert torch.equal(load_tokenizer(run).encode(fixture("taming")[1]["input"]), fixture("taming")[1]["indices"])
    assert mlflow.MlflowClient().get_run(run).info.run_name == "tiny taming"


def test_file_saved_on_a_gpu_loads_on_cpu(tracking_dir, tmp_path, monkeypatch):
    """Storages tagged cuda:0 (as torch.save writes them on a GPU) are mapped to the CPU."""
    from vqvae.tokenizer import load_tokenizer

    state, out, _ = fixture("llamagen")
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        llamagen_train_file(tmp_path / "gpu.pt", state, image_size=32)
    if not torch.cuda.is_available():  # the file really asks for a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=False)
    assert torch.equal(load_tokenizer(imported("--checkpoint", tmp_path / "gpu.pt")).encode(out["input"]),
                       out["indices"])


def test_config_yaml_is_checked_against_the_tensors(tracking_dir, tmp_path):
    import yaml

    from vqvae.tokenizer import load_tokenizer

    state, out, desc = fixture("taming")
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", state)
    config = {"model": {"target": "taming.models.vqgan.VQModel",
                        "params": {"embed_dim": 8, "n_embed": 64, "ddconfig": desc["ddconfig"],
                                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    tok = load_tokenizer(imported("--checkpoint", ckpt, "--config", tmp_path / "model.yaml"))
    assert tok.cfg.image_size == 32 and torch.equal(tok.encode(out["input"]), out["indices"])

    config["model"]["params"]["ddconfig"] = {**desc["ddconfig"], "ch_mult": [2, 2]}
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(config))
    res = invoke("import-vqvae", "--checkpoint", ckpt, "--config", tmp_path / "wrong.yaml")
    assert res.exit_code == 1
    assert error_line(res.stderr) == (f"Error: --config {tmp_path / 'wrong.yaml'} says ch_mult 2,2, but the "
                                      "checkpoint's tensors have 2,1")
    res = invoke("import-vqvae", "--checkpoint", ckpt, "--format", "llamagen")
    assert res.exit_code == 1 and "holds taming weights; use --format taming or auto" in error_line(res.stderr)


class Payload:
    """Unpickling this would run a command that creates a marker file."""

    def __init__(self, func, marker: Path) -> None:
        self.func, self.marker = func, str(marker)

    def __reduce__(self):
        return (self.func, (f"touch {self.marker}",) if self.func is not open else (self.marker, "w"))


@pytest.mark.parametrize("kind", ["os.system in a Lightning ckpt", "open in LlamaGen args",
                                  "calling the Lightning placeholder"])
def test_malicious_file_is_refused_and_nothing_runs(tracking_dir, tmp_path, kind):
    import os

    state, _, _ = fixture("taming")
    marker = tmp_path / "pwned"
    if kind == "os.system in a Lightning ckpt":
        path = lightning_ckpt(tmp_path / "evil.ckpt", state, payload=lambda _: Payload(os.system, marker))
        named = f"it names {os.system.__module__}.system"
    elif kind == "open in LlamaGen args":
        path = llamagen_train_file(tmp_path / "evil.pt", fixture("llamagen")[0], image_size=Payload(open, marker))
        named = f"it names {open.__module__}.open"
    else:  # the allow-listed placeholder refuses to be called, whatever the arguments
        path = lightning_ckpt(tmp_path / "evil.ckpt", state, payload=lambda cls: Payload(cls, marker))
        named = "refusing to construct"
    before = len(all_runs())
    res = invoke("import-vqvae", "--checkpoint", path)
    assert res.exit_code == 1 and not marker.exists()
    line = error_line(res.stderr)
    assert line.startswith(f"Error: refusing to load {path}: it contains pickled objects")
    assert named in line and line.endswith("nothing in it was run")
    assert len(all_runs()) == before  # refused before any run was created


def all_runs() -> list:
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("name", ["taming", "llamagen"])
def test_export_writes_official_names_and_round_trips(imports, tmp_path, name):
    from vqvae.tokenizer import load_tokenizer

    state, out, _ = fixture(name)
    file = tmp_path / ("exported.ckpt" if name == "taming" else "exported.pt")
    res = invoke("export-vqvae", "--run-id", imports[name], "--format", name, "--out", file)
    assert res.exit_code == 0, res.output
    assert last_line(res.stdout) == str(file)
    written = torch.load(file, map_location="cpu", weights_only=True)  # plain data: no allow-list needed
    weights = written["state_dict" if name == "taming" else "model"]
    expected = dict(state)
    if name == "llamagen":  # the buffer LlamaGen's strict load_state_dict wants
        assert torch.equal(weights.pop("quantize.codebook_used"), torch.zeros(65536))
        expected.pop("quantize.codebook_used")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k].float()) for k in expected)
    extra = ["--config", file.with_suffix(".yaml")] if name == "taming" else ["--image-size", "32"]
    again = imported("--checkpoint", file, *extra)
    assert torch.equal(load_tokenizer(again).encode(out["input"]), out["indices"])


def test_export_refuses_what_the_official_code_cannot_build(vqvae_run, imports, tmp_path):
    res = invoke("export-vqvae", "--run-id", vqvae_run, "--format", "taming", "--out", tmp_path / "x.ckpt")
    assert res.exit_code == 1 and "multiple of 32" in error_line(res.stderr)  # TINY_VQ has 16 channels
    res = invoke("export-vqvae", "--run-id", imports["llamagen"], "--format", "taming", "--out", tmp_path / "x.ckpt")
    assert res.exit_code == 1 and "l2-normalised codebook has no taming equivalent" in error_line(res.stderr)
    assert not (tmp_path / "x.ckpt").exists()


def test_fine_tune_from_an_imported_tokenizer(imports, dataset):
    from core.weights import load_model_weights
    from vqvae.tokenizer import load_tokenizer

    src = imports["llamagen"]
    res = invoke("train-vqvae", "--manifest", dataset, "--init-from", src, *FINE_TUNE, "--codebook-init", "kmeans")
    assert res.exit_code == 0, res.output
    run_id = last_line(res.stdout)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["init_from"] == src
    assert {k: run.data.params[k] for k in ("ch", "ch_mult", "attn_resolutions", "l2_norm", "codebook_size")} == \
        {"ch": "32", "ch_mult": "1,1,1", "attn_resolutions": "8", "l2_norm": "True", "codebook_size": "64"}
    state, config, step = load_model_weights(run_id, "vqvae")  # logged at the end: weights only, no optimizers
    assert step == 2 and config["ch_mult"] == [1, 1, 1] and not any(k.startswith("disc") for k in state)
    assert int(state["quantizer.step"]) == 2  # usage bookkeeping restarted at step 0
    before = load_tokenizer(src).model.state_dict()
    assert not torch.equal(state["encoder.conv_in.weight"], before["encoder.conv_in.weight"])
    assert not torch.equal(state["quantizer.codebook"], before["quantizer.codebook"])  # k-means re-initialised

    res = invoke("train-vqvae", "--manifest", dataset, "--init-from", src, *FINE_TUNE, "--ch", "64")
    assert res.exit_code == 1
    assert error_line(res.stderr) == (f"Error: --ch 64 conflicts with the --init-from run {src}, which has --ch 32; "
                                      "drop --ch (the architecture comes from that run)")


def test_every_stage_works_on_an_imported_tokenizer(imports, dataset, monkeypatch):
    """quantize -> train -> generate -> decode and evaluate on an imported tokenizer; inference loads the
    weights-only models, never a training checkpoint."""
    import core.checkpoint

    def no_checkpoints(run_id):
        raise AssertionError(f"training checkpoint of {run_id} loaded for inference")

    vq = imports["taming"]
    res = invoke("quantize", "--vqvae-run-id", vq, "--num-workers", "0")
    assert res.exit_code == 1 and "was not trained on a manifest (imported); pass --manifest" in error_line(res.stderr)
    res = invoke("quantize", "--vqvae-run-id", vq, "--manifest", dataset, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    q = last_line(res.stdout)
    res = invoke("train", "--quantize-run-id", q, *TINY_GPT)
    assert res.exit_code == 0, res.output
    t = last_line(res.stdout)
    for module in ("vqvae.tokenizer", "transformer.generate"):
        monkeypatch.setattr(sys.modules[module], "load_checkpoint", no_checkpoints)
    monkeypatch.setattr(core.checkpoint, "load_checkpoint", no_checkpoints)
    res = invoke("generate", "--transformer-run-id", t, "--num-samples", "2", "--gif")
    assert res.exit_code == 0, res.output
    res = invoke("decode", "--run-id", last_line(res.stdout))
    assert res.exit_code == 0, res.output
    listing = {a.path for a in mlflow.MlflowClient().list_artifacts(last_line(res.stdout), "images")}
    assert len(listing) == 2
    res = invoke("evaluate", "--vqvae-run-id", vq, "--manifest", dataset, "--no-fid")
    assert res.exit_code == 0, res.output
    assert "eval/psnr" in mlflow.MlflowClient().get_run(vq).data.metrics


def test_trained_runs_log_weights_only_models(vqvae_run, monkeypatch, tmp_path):
    """A trained tokenizer's weights-only model equals its last checkpoint's averaged weights (`--ema-weights`, on
    by default for the tokenizer) and is what inference loads."""
    import vqvae.tokenizer as tokenizer
    from core.checkpoint import load_checkpoint
    from core.ema import evaluated_weights
    from core.weights import load_model_weights

    state, config, step = load_model_weights(vqvae_run, "vqvae")
    ckpt, _ = load_checkpoint(vqvae_run)
    assert step == ckpt["step"] and config["codebook_size"] == 32 and "manifest" not in config
    averaged = evaluated_weights(ckpt)
    assert state.keys() == averaged.keys() and all(torch.equal(state[k], averaged[k]) for k in state)
    assert not all(torch.equal(state[k], ckpt["model"][k]) for k in state)  # the average, not the last weights
    with monkeypatch.context() as m:
        m.setattr(tokenizer, "load_checkpoint", lambda run_id: pytest.fail("checkpoint loaded"))
        tok = tokenizer.load_tokenizer(vqvae_run)
    assert tok.step == step and tok.manifest == mlflow.MlflowClient().get_run(vqvae_run).data.params["manifest"]

    assert set(averaged) == set(ckpt["model"])
    # a run made before weights-only models (checkpoints only) still loads, through its checkpoint: the weights it
    # evaluated (the average), as the model artifact holds them
    client = mlflow.MlflowClient()
    old = client.create_run(client.get_run(vqvae_run).info.experiment_id, tags={"stage": "vqvae"}).info.run_id
    client.log_artifacts(old, str(mlflow.artifacts.download_artifacts(run_id=vqvae_run, artifact_path="checkpoints",
                                                                      dst_path=str(tmp_path))), "checkpoints")
    client.set_terminated(old)
    assert load_model_weights(old, "vqvae") is None
    legacy = tokenizer.load_tokenizer(old)
    assert legacy.step == step and all(torch.equal(v, state[k]) for k, v in legacy.model.state_dict().items())


def test_codebook_init_without_warmup_needs_init_from(dataset):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "1", "--codebook-init", "kmeans")
    assert res.exit_code == 1 and "--init-from RUN_ID" in error_line(res.stderr)
