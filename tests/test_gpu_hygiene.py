"""GPU hygiene on CPU: no host reads between log/validation/checkpoint steps, skipped steps decided on the device,
and --resume taking the saved precision (or converting to a new one) without a traceback."""
from __future__ import annotations

import math
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT, TINY_VQ, invoke, last_line
from core.checkpoint import load_checkpoint
from core.loop import TrainLoop, step_optimizer
from core.runtime import Runtime

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Host reads of tensor values by our code, per training step (the loop's step at the time of the read)."""
    counts: Counter = Counter()
    ours = str(ROOT)
    current = {"step": None}
    begin = TrainLoop.begin_step

    def begin_step(self):
        current["step"] = self.step
        return begin(self)

    monkeypatch.setattr(TrainLoop, "begin_step", begin_step)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename  # our code only (as in test_robustness.count_host_reads)
            if current["step"] is not None and caller.startswith(ours) and "/tests/" not in caller \
                    and "-packages/" not in caller:
                counts[current["step"]] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_a_skipped_step_reads_nothing_from_the_device_until_the_log_step(tracking_dir, dataset, host_reads, monkeypatch):
    # GAN on from step 0, EMA, grad accumulation and a NaN step skipped: steps 0-4 end at no log/val/checkpoint step
    nan_at = 2
    from vqvae.losses import VQGANLoss

    original = VQGANLoss.generator_loss

    def patched(self, x, xrec, qloss, step, *args, **kwargs):
        total, logs = original(self, x, xrec, qloss, step, *args, **kwargs)
        return (total * math.nan if step == nan_at else total), logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", patched)
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "6", "--log-every", "6",
                 "--val-every", "6", "--ckpt-every", "6", "--disc-start", "0", "--ema-weights", "0.9",
                 "--grad-accum", "2", "--nan-policy", "skip", "--experiment", "sync-vq")
    assert res.exit_code == 0, res.output
    assert [host_reads[s] for s in range(5)] == [0] * 5, host_reads
    assert host_reads[5] > 0  # the reads happen, at the log step (the counter does count)
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(last_line(res.stdout), "train/skipped_nonfinite")
    assert [(m.step, m.value) for m in history] == [(nan_at, 1.0)]
    state, _ = load_checkpoint(last_line(res.stdout))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_device_skip_leaves_weights_optimizer_and_ema_untouched(precision):
    """A skipped step (ok False) changes nothing; an applied one equals a plain optimizer step."""
    from core.ema import WeightEMA
    from core.runtime import fused_adam

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = fused_adam(model.parameters(), 1e-2, (0.9, 0.95))
    rt = Runtime(torch.device("cpu"), precision)
    scaler = rt.grad_scaler()
    ema = WeightEMA(model, 0.5)

    class Cfg:
        nan_policy, log_every, max_steps = "skip", 100, 100

    loop = TrainLoop.__new__(TrainLoop)
    loop.cfg, loop.rt, loop.step, loop._skipped, loop._first_skipped, loop._ok = Cfg, rt, 0, None, None, None
    x = torch.randn(8, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler.scale(model(x).pow(2).mean()).backward()
    step_optimizer(opt, scaler, loop.step_ok(torch.tensor(False)), clip=1.0)
    ema.update(loop._ok)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ema.module.state_dict().items())
    assert all(int(s["step"]) == 0 for s in opt.state.values())
    assert int(loop._skipped) == 1 and int(loop._first_skipped) == 0

    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(before)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for m, o in ((model, None), (reference, ref_opt)):
        loss = m(x).pow(2).mean()
        if o is None:
            scaler.scale(loss).backward()
            step_optimizer(opt, scaler, loop.step_ok(torch.tensor(True)))
        else:
            loss.backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_bf16_run_resumed_without_the_flag_stays_bf16(tracking_dir, dataset, monkeypatch):
    first = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2", "--precision", "bf16")
    assert first.exit_code == 0, first.output
    used = []
    autocast = Runtime.autocast

    def recording(self):
        if sys._getframe(1).f_code.co_filename.endswith("train.py"):  # the training steps (not the served model's)
            used.append(self.precision)
        return autocast(self)

    monkeypatch.setattr(Runtime, "autocast", recording)
    resumed = invoke("train-vqvae", "--resume", last_line(first.stdout), "--max-steps", "3")
    assert resumed.exit_code == 0, resumed.output
    assert used and set(used) == {"bf16"}
    assert load_checkpoint(last_line(resumed.stdout))[0]["config"]["precision"] == "bf16"


def test_fp32_run_resumed_in_fp16_is_converted(tracking_dir, dataset):
    first = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2")
    assert first.exit_code == 0, first.output
    resumed = invoke("train-vqvae", "--resume", last_line(first.stdout), "--max-steps", "3", "--precision", "fp16")
    assert resumed.exit_code == 0, resumed.output
    assert "Traceback" not in resumed.output
    state, _ = load_checkpoint(last_line(resumed.stdout))
    assert state["config"]["precision"] == "fp16" and state["scaler"]  # a live GradScaler from then on
    assert state["step"] == 3


def test_resume_refuses_a_changed_architecture_in_one_line(tracking_dir, dataset):
    first = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2")
    resumed = invoke("train-vqvae", "--resume", last_line(first.stdout), "--max-steps", "3", "--ch", "24")
    assert resumed.exit_code == 1 and "Traceback" not in resumed.output
    assert "cannot change --ch when resuming" in resumed.stderr.strip().splitlines()[-1]


def test_evaluate_and_the_served_tokenizer_take_a_precision(tracking_dir, dataset, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from PIL import Image

    from core.mlflow_models import png_base64

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no LPIPS/Inception weights
    trained = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2", "--experiment", "prec")
    assert trained.exit_code == 0, trained.output
    run_id = last_line(trained.stdout)
    used = []
    autocast = Runtime.autocast

    def recording(self):
        used.append(self.precision)
        return autocast(self)

    monkeypatch.setattr(Runtime, "autocast", recording)
    psnr = {}
    for precision in ("fp32", "bf16"):
        res = invoke("evaluate", "--vqvae-run-id", run_id, "--device", "cpu", "--no-fid", "--precision", precision)
        assert res.exit_code == 0, res.output
        psnr[precision] = mlflow.MlflowClient().get_run(run_id).data.metrics["eval/psnr"]
    assert used == ["fp32", "bf16"]
    assert abs(psnr["bf16"] - psnr["fp32"]) < 1.0 and psnr["bf16"] != psnr["fp32"]  # ran in bf16, still close

    used.clear()
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/tokenizer", model_config={"precision": "bf16"})
    out = model.predict(pd.DataFrame({"image": [png_base64(Image.new("RGB", (20, 20), "red"))]}))
    assert len(out) == 1 and used == ["bf16"]
