"""Interrupted training: kill -9, Ctrl-C and NaN losses keep a loadable checkpoint; resume is exact."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import pytest
import torch

from conftest import ROOT, TINY_GPT, TINY_VQ, error_line, invoke, last_line
from core.checkpoint import load_checkpoint

# The kill tests need a run that is still going when they stop it.
ENDLESS = ["--max-steps", "100000", "--val-every", "100000"]


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts `cli.py ARGS` as its own process (stderr, a busy progress bar, to a file so no pipe fills up);
    whatever still runs at the end of the test is killed: these runs would otherwise go on for hours."""
    procs: list[subprocess.Popen] = []

    def launch(*args: str) -> subprocess.Popen:
        with open(tmp_path / "stderr.txt", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=tmp_path,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                          stderr=err, text=True))
        return procs[-1]

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_for_run(experiment: str, proc: subprocess.Popen, ready: Callable[[str], bool], timeout: float = 120) -> str:
    """Poll the tracking store until the process's run satisfies ``ready``; returns the run ID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.returncode}"
        exp = client().get_experiment_by_name(experiment)
        runs = client().search_runs([exp.experiment_id]) if exp else []
        if runs and ready(runs[0].info.run_id):
            return runs[0].info.run_id
        time.sleep(0.2)
    pytest.fail(f"no run in experiment {experiment} got ready within {timeout} s")


def has_checkpoint(run_id: str) -> bool:
    return any(a.path == "checkpoints/latest.json" for a in client().list_artifacts(run_id, "checkpoints"))


def has_metrics(run_id: str) -> bool:
    return bool(client().get_metric_history(run_id, "train/total_loss"))


def metric_steps(run_id: str, key: str = "train/total_loss") -> list[int]:
    return sorted({m.step for m in client().get_metric_history(run_id, key)})


def test_kill_9_keeps_the_last_checkpoint_and_resume_continues_the_step_axis(tracking_dir, dataset, start):
    proc = start("train-vqvae", "--manifest", dataset, *TINY_VQ, *ENDLESS, "--ckpt-every", "1",
                 "--experiment", "kill9")
    run_id = wait_for_run("kill9", proc, has_checkpoint)
    proc.kill()  # SIGKILL: no handler runs, whatever the process was doing
    proc.wait(timeout=30)
    state, _ = load_checkpoint(run_id)
    done = state["step"]
    assert done >= 1 and state["config"]["max_steps"] == 100000

    res = invoke("train-vqvae", "--resume", run_id, "--max-steps", done + 2)
    assert res.exit_code == 0, res.output
    assert last_line(res.stdout) == run_id
    # metrics logged after the last checkpoint are logged again for the same steps: no gap, same axis
    assert metric_steps(run_id) == list(range(1, done + 3))
    assert client().get_run(run_id).info.status == "FINISHED"
    assert load_checkpoint(run_id)[0]["step"] == done + 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_marks_the_run_killed(tracking_dir, dataset, start, tmp_path, sig):
    """SIGTERM (how Slurm and Kubernetes stop a job) does what Ctrl-C does, well within their grace period."""
    experiment = f"signal-{sig.name}"
    proc = start("train-vqvae", "--manifest", dataset, *TINY_VQ, *ENDLESS, "--ckpt-every", "100000",
                 "--experiment", experiment)
    run_id = wait_for_run(experiment, proc, has_metrics)
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert error_line((tmp_path / "stderr.txt").read_text()) == (
        f"Error: interrupted; run {run_id} marked KILLED (resume with --resume {run_id})")
    assert client().get_run(run_id).info.status == "KILLED"
    done = load_checkpoint(run_id)[0]["step"]  # the only checkpoint is the one Ctrl-C wrote
    assert done >= 1

    res = invoke("train-vqvae", "--resume", run_id, "--max-steps", done + 1)
    assert res.exit_code == 0, res.output
    assert client().get_run(run_id).info.status == "FINISHED"
    assert metric_steps(run_id) == list(range(1, done + 2))


def test_sigterm_to_the_whole_job_with_dataloader_workers(tracking_dir, dataset, tmp_path):
    """Slurm signals every process of a job step, DataLoader workers included: training still finishes its step,
    checkpoints and marks the run KILLED (a killed worker would have failed the step)."""
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train-vqvae", "--manifest", str(dataset),
                                 *TINY_VQ, *ENDLESS, "--ckpt-every", "100000", "--num-workers", "2",
                                 "--experiment", "sigterm-job"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, start_new_session=True)
    try:
        run_id = wait_for_run("sigterm-job", proc, has_metrics)
        os.killpg(proc.pid, signal.SIGTERM)  # the job's process group: the trainer and its workers
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1
    assert error_line((tmp_path / "stderr.txt").read_text()) == (
        f"Error: interrupted; run {run_id} marked KILLED (resume with --resume {run_id})")
    assert load_checkpoint(run_id)[0]["step"] >= 1


def nan_at(monkeypatch, nan_step: int) -> None:
    """Make the generator loss NaN at one (0-based) training step."""
    from vqvae.losses import VQGANLoss

    original = VQGANLoss.generator_loss

    def patched(self, x, xrec, qloss, step, *args, **kwargs):
        total, logs = original(self, x, xrec, qloss, step, *args, **kwargs)
        return (total * math.nan if step == nan_step else total), logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", patched)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tracking_dir, dataset, monkeypatch):
    nan_at(monkeypatch, 2)
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "4", "--experiment", "nan")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    message = error_line(res.stderr)
    assert "loss became NaN/inf at step 2" in message and "last good checkpoint (step 2) is kept" in message
    run_id = message.split("--resume ")[1].split()[0]
    assert client().get_run(run_id).info.status == "FAILED"
    state, _ = load_checkpoint(run_id)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_policy_skip_skips_the_step_and_still_finishes(tracking_dir, dataset, monkeypatch):
    nan_at(monkeypatch, 3)  # the last step: the final checkpoint and validation must still happen
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "4", "--nan-policy", "skip")
    assert res.exit_code == 0, res.output
    run_id = last_line(res.stdout)
    assert metric_steps(run_id, "train/skipped_nonfinite") == [3]
    assert metric_steps(run_id) == [1, 2, 3]  # no NaN losses in the charts
    assert 4 in metric_steps(run_id, "val/l1")
    state, _ = load_checkpoint(run_id)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_vqvae_resume_reproduces_an_uninterrupted_run(tracking_dir, dataset):
    straight = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "4")
    first = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2")
    assert straight.exit_code == 0 and first.exit_code == 0, straight.output + first.output
    resumed = invoke("train-vqvae", "--resume", last_line(first.stdout), "--max-steps", "4")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_checkpoint(last_line(straight.stdout))[0], load_checkpoint(last_line(first.stdout))[0]
    # random flips, the discriminator switching on at step 2 and the quantizer buffers all carry over
    for part in ("model", "discriminator"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"


@pytest.fixture(scope="module")
def quantize_run(vqvae_run) -> str:
    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    return last_line(res.stdout)


def test_transformer_resume_reproduces_an_uninterrupted_run(quantize_run):
    args = ["--quantize-run-id", quantize_run, *TINY_GPT, "--label-dropout", "0.5", "--dropout", "0.1"]
    straight = invoke("train", *args, "--max-steps", "4")
    first = invoke("train", *args, "--max-steps", "2")
    assert straight.exit_code == 0 and first.exit_code == 0, straight.output + first.output
    resumed = invoke("train", "--resume", last_line(first.stdout), "--max-steps", "4")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_checkpoint(last_line(straight.stdout))[0], load_checkpoint(last_line(first.stdout))[0]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"


def ctrl_c_at_step(monkeypatch, at: int, times: int) -> None:
    """Press Ctrl-C ``times`` times as the transformer starts its (0-based) step ``at``."""
    import transformer.train as train

    lr_at = train.lr_at

    def pressing(step: int, cfg) -> float:
        if step == at and cfg.max_steps == 6:  # not once resumed with a larger --max-steps
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return lr_at(step, cfg)

    monkeypatch.setattr(train, "lr_at", pressing)


def test_transformer_ctrl_c_finishes_the_step_then_saves(quantize_run, monkeypatch):
    ctrl_c_at_step(monkeypatch, 3, times=1)
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--ckpt-every", "100", "--max-steps", "6")
    run_id = error_line(res.stderr).split("--resume ")[1].rstrip(")")
    assert client().get_run(run_id).info.status == "KILLED"
    assert load_checkpoint(run_id)[0]["step"] == 4
    res = invoke("train", "--resume", run_id, "--max-steps", "7")
    assert res.exit_code == 0, res.output
    assert metric_steps(run_id, "train/loss") == list(range(1, 8))


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(quantize_run, monkeypatch):
    ctrl_c_at_step(monkeypatch, 3, times=2)
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--ckpt-every", "2", "--max-steps", "6")
    run_id = error_line(res.stderr).split("--resume ")[1].rstrip(")")
    assert client().get_run(run_id).info.status == "KILLED"
    assert load_checkpoint(run_id)[0]["step"] == 2  # a step cut short is never saved
