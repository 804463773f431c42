"""What bites on real clusters, exercised on CPU: background checkpoint uploads, per-rank randomness, device-side
statistics, resume with DataLoader workers, weight EMA, mixed precision and torch.compile."""
from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import ROOT, TINY_GPT, TINY_VQ, invoke, last_line
from core.checkpoint import CheckpointWriter, load_checkpoint



def new_run(tracking_dir) -> str:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("writer") or client.get_experiment(client.create_experiment("writer"))
    return client.create_run(exp.experiment_id, tags={"stage": "vqvae"}).info.run_id


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((4,), float(step))}


# --- checkpoints: written locally, uploaded in the background, retried, rotated -----------------------------

def test_checkpoint_upload_runs_in_the_background_and_is_retried(tracking_dir, monkeypatch):
    run_id = new_run(tracking_dir)
    gate, calls = threading.Event(), []
    upload = mlflow.MlflowClient.log_artifact

    def slow_and_flaky(self, run_id, local_path, artifact_path=None):
        calls.append(Path(local_path).name)
        assert gate.wait(30)
        if len(calls) <= 2:
            raise ConnectionError("connection reset by peer")
        return upload(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", slow_and_flaky)
    writer = CheckpointWriter(run_id, keep=2, backoff_s=0.01)
    started = time.perf_counter()
    assert writer.save(state(1)) == "ckpt_a.pt"
    assert time.perf_counter() - started < 5 and not gate.is_set()  # the step went on while the upload waits
    gate.set()
    writer.wait(final=True)
    writer.close()
    assert calls == ["ckpt_a.pt", "ckpt_a.pt", "ckpt_a.pt", "latest.json"]  # two failures, then uploaded
    loaded, slot = load_checkpoint(run_id)
    assert slot == "ckpt_a.pt" and loaded["step"] == 1


def test_failed_upload_keeps_the_last_complete_checkpoint_and_says_so(tracking_dir, monkeypatch, capsys):
    run_id = new_run(tracking_dir)
    writer = CheckpointWriter(run_id, keep=2, retries=1, backoff_s=0.01)
    writer.save(state(1))
    writer.wait()

    def down(self, run_id, local_path, artifact_path=None):
        raise ConnectionError("tracking server unavailable")

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", down)
    assert writer.save(state(2)) == "ckpt_b.pt"
    assert writer.save(state(3)) == "ckpt_b.pt"  # never over the last complete checkpoint (a)
    err = capsys.readouterr().err
    assert ("the checkpoint of step 2 could not be uploaded after 2 tries (tracking server unavailable); training "
            "goes on, the last complete checkpoint is step 1") in err
    with pytest.raises(ConnectionError):  # the end of training must not pass over a lost final checkpoint
        writer.wait(final=True)
    writer.close()
    assert load_checkpoint(run_id)[0]["step"] == 1


def test_ckpt_keep_rotates_through_k_slots(tracking_dir):
    run_id = new_run(tracking_dir)
    writer = CheckpointWriter(run_id, keep=3)
    slots = [writer.save(state(step)) for step in range(1, 5)]
    writer.wait(final=True)
    writer.close()
    assert slots == ["ckpt_a.pt", "ckpt_b.pt", "ckpt_c.pt", "ckpt_a.pt"]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "checkpoints")}
    assert names == {"checkpoints/ckpt_a.pt", "checkpoints/ckpt_b.pt", "checkpoints/ckpt_c.pt",
                     "checkpoints/latest.json"}
    assert load_checkpoint(run_id)[0]["step"] == 4
    # resumed, the writer continues the rotation after the slot it loaded
    writer = CheckpointWriter(run_id, previous_slot="ckpt_a.pt", keep=3)
    assert writer.save(state(5)) == "ckpt_b.pt"
    writer.wait(final=True)
    writer.close()


# --- randomness per rank and per sample ---------------------------------------------------------------------

def test_ranks_draw_different_random_numbers_and_resume_draws_the_same():
    from core.runtime import Runtime

    def draws(rank: int, step: int) -> torch.Tensor:
        Runtime(torch.device("cpu"), "fp32", rank=rank, world_size=2).seed_step(seed=0, step=step)
        return torch.rand(8)

    assert not torch.equal(draws(0, 5), draws(1, 5))  # dropout masks differ between ranks
    assert not torch.equal(draws(0, 5), draws(0, 6))
    assert torch.equal(draws(1, 5), draws(1, 5))  # a function of (seed, step, rank) only


def test_augmentations_depend_on_the_sample_seed_only(tmp_path):
    import numpy as np
    from PIL import Image

    from core.data import ImageDataset, SeededSampler

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    data = ImageDataset([str(path)], 16, train=True)
    rank0 = list(zip(range(6), SeededSampler(1, rank=0, world_size=2, seed=0)))
    rank1 = list(zip(range(6), SeededSampler(1, rank=1, world_size=2, seed=0)))
    crops0 = [data[key][0] for _, key in rank0]
    assert not any(torch.equal(a, data[key][0]) for a, (_, key) in zip(crops0, rank1))  # ranks crop differently
    assert torch.equal(crops0[4], data[rank0[4][1]][0])  # the same seed gives the same crop in any process
    resumed = SeededSampler(1, rank=0, world_size=2, seed=0, start=4)
    assert next(iter(resumed)) == rank0[4][1]  # a resumed sampler continues with the same seeds


def test_restarts_and_usage_count_optimizer_steps_not_micro_batches():
    from vqvae.config import VQModelConfig
    from vqvae.quantizer import VectorQuantizer

    q = VectorQuantizer(VQModelConfig(codebook_size=8, embed_dim=2, restart_after=2))
    q.forwards_per_step = 2  # --grad-accum 2
    for _ in range(4):
        q(torch.randn(2, 2, 2, 2))
    assert q.step.item() == 2


# --- host synchronisation ------------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy")


def count_host_reads(monkeypatch) -> list[int]:
    """Patch the tensor methods that wait for the device; returns the per-step read counts of our own code
    (files of this repository outside tests/), filled in as training runs."""
    from core.loop import TrainLoop

    reads, per_step = [0], []
    ours = str(ROOT)

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            # our files only: not the tests, and not packages of a virtual environment inside the checkout (CI)
            if caller.startswith(ours) and "/tests/" not in caller and "-packages/" not in caller:
                reads[0] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    begin_step = TrainLoop.begin_step

    def marking(self):
        per_step.append(reads[0])
        begin_step(self)

    monkeypatch.setattr(TrainLoop, "begin_step", marking)
    return per_step


QUIET = ["--log-every", "100", "--val-every", "100", "--ckpt-every", "100"]


def test_vqvae_steps_read_the_device_once(tracking_dir, dataset, monkeypatch):
    marks = count_host_reads(monkeypatch)
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, *QUIET, "--max-steps", "5", "--disc-start", "0",
                 "--ema", "--restart-after", "1", "--grad-accum", "2", "--ema-weights", "0.9")
    assert res.exit_code == 0, res.output
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    assert per_step[1:] == [0] * 3, per_step  # non-finite steps are skipped on the device; read when logged


def test_transformer_steps_read_the_device_once(quantize_run, monkeypatch):
    marks = count_host_reads(monkeypatch)
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, *QUIET, "--max-steps", "5",
                 "--grad-accum", "2")
    assert res.exit_code == 0, res.output
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    assert per_step[1:] == [0] * 3, per_step


def test_plain_causal_model_trains_and_generates(quantize_run):
    """--no-rel-bias reaches the model (no bias parameters, plain causal attention) and generate loads it."""
    from transformer.generate import load_transformer

    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, *QUIET, "--no-rel-bias")
    assert res.exit_code == 0, res.output
    run = last_line(res.stdout)
    model, _ = load_transformer(run, torch.device("cpu"))
    assert not model.config.rel_bias and all(blk.attn.rel_bias is None for blk in model.blocks)
    gen = invoke("generate", "--transformer-run-id", run, "--num-samples", "2")
    assert gen.exit_code == 0, gen.output


# --- exact resume with workers; weight EMA -------------------------------------------------------------------

def test_vqvae_resume_is_exact_with_workers_codebook_init_and_ema(tracking_dir, dataset):
    args = ["--manifest", dataset, *TINY_VQ, "--warmup-steps", "1", "--codebook-init", "random",
            "--restart-after", "1", "--ema-weights", "0.5", "--dropout", "0.1"]
    straight = invoke("train-vqvae", *args, "--max-steps", "4", "--num-workers", "2")
    first = invoke("train-vqvae", *args, "--max-steps", "2", "--num-workers", "2")
    assert straight.exit_code == 0 and first.exit_code == 0, straight.output + first.output
    # another worker count on resume: the data a step sees depends on the sample seeds alone
    resumed = invoke("train-vqvae", "--resume", last_line(first.stdout), "--max-steps", "4", "--num-workers", "1")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_checkpoint(last_line(straight.stdout))[0], load_checkpoint(last_line(first.stdout))[0]
    for part in ("model", "discriminator", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    ema = {k.removeprefix("module."): v for k, v in a["ema"].items()}
    assert torch.equal(ema["quantizer.codebook"], a["model"]["quantizer.codebook"])  # codes are not averaged
    assert not torch.equal(ema["decoder.conv_out.weight"], a["model"]["decoder.conv_out.weight"])


def test_weight_ema_averages_weights_and_copies_codebook_and_buffers():
    from core.ema import WeightEMA
    from vqvae.config import VQModelConfig
    from vqvae.model import VQModel

    model = VQModel(VQModelConfig(image_size=8, ch=8, ch_mult=(1, 2), z_channels=4, embed_dim=4, codebook_size=8))
    ema = WeightEMA(model, 0.75, live=("quantizer.codebook",))
    ema.update()  # the first update copies
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.quantizer.step += 3
    ema.update()
    averaged = ema.module.state_dict()
    weight = "decoder.conv_out.weight"
    new = 0.25 / (1 - 0.75 ** 2)  # bias-corrected: the second update's weight
    assert torch.allclose(averaged[weight], (1 - new) * before[weight] + new * model.state_dict()[weight])
    assert torch.equal(averaged["quantizer.codebook"], model.quantizer.codebook)
    assert averaged["quantizer.step"].item() == 3
    assert WeightEMA(model, 0.0).module is model


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99, 0.999])
def test_weight_ema_is_the_bias_corrected_mean_of_the_trained_weights(decay):
    """After k applied updates the average is sum_i decay^(k-i) w_i / sum_i decay^(k-i) over the weights w_1..w_k
    seen at the updates: no share of the initial weights (an uncorrected 0.99 average of 100 steps keeps 37% of
    them), and skipped steps count for nothing."""
    from core.ema import WeightEMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay)
    seen = []
    for k in range(12):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3) * 10)
        applied = k % 4 != 3
        ema.update(torch.tensor(applied))
        seen += [model.weight.clone()] if applied else []
        coef = torch.tensor([decay ** (len(seen) - 1 - i) for i in range(len(seen))], dtype=torch.float64)
        expected = (coef[:, None, None] * torch.stack(seen).double()).sum(0) / coef.sum()
        assert torch.allclose(ema.module.weight.double(), expected, rtol=1e-4, atol=1e-4), k


def test_checkpoint_fallback_loads_the_weights_the_run_evaluated():
    """Runs without a weights-only model load from their checkpoint: the average when the run kept one (what its
    validation used and its model artifact would hold), else the trained weights."""
    from core.ema import WeightEMA, evaluated_weights

    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.9)
    ema.update()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict()}
    got = evaluated_weights(ckpt)
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ema.module.state_dict().items())
    assert not torch.equal(got["weight"], model.weight)
    for off in (None, {}, "junk"):
        assert evaluated_weights({"model": ckpt["model"], "ema": off}) is ckpt["model"]
    assert evaluated_weights({"model": ckpt["model"]}) is ckpt["model"]


# --- the GPU code paths, on CPU --------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vqvae_trains_in_mixed_precision(tracking_dir, dataset, precision):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "3", "--disc-start", "1",
                 "--precision", precision)
    assert res.exit_code == 0, res.output
    saved = load_checkpoint(last_line(res.stdout))[0]
    assert saved["step"] == 3 and all(torch.isfinite(v).all() for v in saved["model"].values()
                                      if v.is_floating_point())
    assert (saved["scaler"] != {}) == (precision == "fp16")  # the CPU GradScaler ran for fp16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_transformer_trains_in_mixed_precision(quantize_run, precision):
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--max-steps", "3", "--precision", precision,
                 "--ema-weights", "0.9")
    assert res.exit_code == 0, res.output
    saved = load_checkpoint(last_line(res.stdout))[0]
    assert saved["step"] == 3 and saved["ema"] is not None


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with AOT autograd but without inductor's C++ code generation (minutes on 2 cores): the
    same graph capture, guards and compiled backward as on a GPU."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_vqvae_trains_compiled(tracking_dir, dataset, quick_compile):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "3", "--compile",
                 "--restart-after", "1")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(last_line(res.stdout))[0]["step"] == 3


def test_transformer_trains_compiled(quantize_run, quick_compile):
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--max-steps", "3", "--compile")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(last_line(res.stdout))[0]["step"] == 3


def test_exported_model_holds_the_weight_average(tracking_dir, dataset):
    """With --ema-weights the run's weights-only model (what inference and export use) is the average."""
    from core.checkpoint import load_checkpoint
    from core.weights import load_model_weights

    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "3", "--ema-weights", "0.5")
    assert res.exit_code == 0, res.output
    run_id = last_line(res.stdout)
    exported, _, _ = load_model_weights(run_id, "vqvae")
    ckpt, _ = load_checkpoint(run_id)
    average = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    w = "encoder.conv_in.weight"
    assert torch.equal(exported[w], average[w]) and not torch.equal(exported[w], ckpt["model"][w])


@pytest.mark.parametrize("files,quota", [({"cpu.max": "200000 100000\n"}, 2.0), ({"cpu.max": "max 100000\n"}, None),
                                         ({"cpu.max": "150000 100000\n"}, 1.5),
                                         ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"},
                                          3.0),
                                         ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
                                         ({}, None), ({"cpu.max": "garbage"}, None)])
def test_a_containers_cpu_quota_caps_workers_and_threads(tmp_path, monkeypatch, files, quota):
    """A pod limited to 2 CPUs on a 64-core host sees 64 cores through os.cpu_count() and its affinity: DataLoader
    workers and torch's threads sized from that share two CPUs' time. The quota (cgroup v2 cpu.max, v1
    cfs_quota/period) caps both; without one, the affinity stands."""
    import os

    import core.runtime
    from core.data import default_num_workers
    from core.runtime import cgroup_cpu_quota, setup_runtime, usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    monkeypatch.setattr(core.runtime, "CGROUP", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    expected = -(-int(quota * 10) // 10) if quota else 64
    assert usable_cores() == expected and default_num_workers() == min(8, expected - 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)
        setup_runtime("cpu")
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(threads)
