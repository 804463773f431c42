"""torchrun with 2 CPU processes (DDP over gloo): one MLflow run, identical replicas, a single-process resume."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import torch

from conftest import ROOT, TINY_GPT, TINY_VQ, invoke, last_line
from core.checkpoint import load_checkpoint
from test_interrupt import ENDLESS, has_metrics, wait_for_run

# Runs the CLI unchanged, but keeps each rank's tokenizer and loss modules and saves their final weights to
# $RECORD_DIR, so the test compares the replicas without any test-only code path in the product.
RECORDING_LAUNCHER = """
import os, sys
import torch
import vqvae.train as train
from cli import cli

built = {}


def recording(cls):
    class Recorded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built[cls.__name__] = self
    return Recorded


train.VQModel, train.VQGANLoss = recording(train.VQModel), recording(train.VQGANLoss)
if os.environ["RANK"] == "1":  # a NaN loss at step 1 on this rank only: with --nan-policy skip every rank skips it
    generator_loss = train.VQGANLoss.generator_loss

    def nan_at_step_1(self, x, xrec, qloss, step, *args, **kwargs):
        total, logs = generator_loss(self, x, xrec, qloss, step, *args, **kwargs)
        return total * float("nan") if step == 1 else total, logs

    train.VQGANLoss.generator_loss = nan_at_step_1
cli.main(sys.argv[1:], standalone_mode=False)
torch.save({"model": built["VQModel"].state_dict(), "discriminator": built["VQGANLoss"].discriminator.state_dict()},
           os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(script), *map(str, args)]


def torchrun(script: Path, *args: str, cwd: Path) -> str:
    """Two processes on this machine; returns the run ID (rank 0's last stdout line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RECORD_DIR": str(cwd)}
    proc = subprocess.run(torchrun_command(script, *args), cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return last_line(proc.stdout)


def only_run(experiment: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, "only rank 0 may create runs"
    return runs[0]


def steps(run_id: str, key: str) -> list[int]:
    return sorted({m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)})


def test_train_vqvae_with_ddp(tracking_dir, dataset, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(RECORDING_LAUNCHER)
    # EMA updates, dead-code restarts, the discriminator (averaged by hand), a skipped step, the codebook
    # initialisation and DDP re-wrapped after the warm-up (no unused-parameter search from then on) stay in sync
    run_id = torchrun(launcher, "train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "4", "--ema",
                      "--restart-after", "1", "--grad-accum", "2", "--nan-policy", "skip", "--experiment", "ddp-vqvae",
                      "--warmup-steps", "1", "--codebook-init", "random", "--ema-weights", "0.5", cwd=tmp_path)
    run = only_run("ddp-vqvae")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert steps(run_id, "train/skipped_nonfinite") == [1]  # rank 1's NaN, reported by rank 0
    assert steps(run_id, "train/total_loss") == [1, 3, 4] and steps(run_id, "val/psnr") == [2, 4]
    assert run.data.metrics["train/d_loss"] > 0  # the discriminator trained (disc-start 2)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    saved, _ = load_checkpoint(run_id)
    assert saved["step"] == 4
    for part in ("model", "discriminator"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), f"{part}.{key} differs between ranks"
            assert torch.equal(value, saved[part][key]), f"{part}.{key} differs from the checkpoint"
            assert not value.is_floating_point() or torch.isfinite(value).all(), f"{part}.{key} is not finite"

    res = invoke("train-vqvae", "--resume", run_id, "--max-steps", "6")  # one process picks it up
    assert res.exit_code == 0, res.output
    assert steps(run_id, "train/total_loss") == [1, 3, 4, 5, 6]
    assert load_checkpoint(run_id)[0]["step"] == 6


def test_train_transformer_with_ddp(quantize_run, tmp_path):
    run_id = torchrun(ROOT / "train.py", "--quantize-run-id", quantize_run, *TINY_GPT, "--experiment",
                      "ddp-transformer", cwd=tmp_path)
    run = only_run("ddp-transformer")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["upstream_run_id"] == quantize_run
    assert steps(run_id, "train/loss") == [1, 2] and steps(run_id, "val/loss") == [1, 2]
    assert load_checkpoint(run_id)[0]["step"] == 2

    # resumed under torchrun: every rank reads the checkpoint rank 0 chose itself (nothing checkpoint-sized is
    # broadcast); the run goes on as one
    assert torchrun(ROOT / "train.py", "--resume", run_id, "--max-steps", "4", cwd=tmp_path) == run_id
    assert steps(run_id, "train/loss") == [1, 2, 3, 4]
    assert load_checkpoint(run_id)[0]["step"] == 4


def test_sigterm_under_torchrun_stops_every_rank_with_a_checkpoint(tracking_dir, dataset, tmp_path):
    """A preempted job: the scheduler's SIGTERM reaches torchrun, which passes it to both ranks; they stop at the
    same step, rank 0 checkpoints and marks the run KILLED, and all exit within torchrun's 30 s grace period."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(torchrun_command(ROOT / "train_vqvae.py", "--manifest", dataset, *TINY_VQ, *ENDLESS,
                                                 "--ckpt-every", "100000", "--experiment", "ddp-sigterm"),
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        run_id = wait_for_run("ddp-sigterm", proc, has_metrics, timeout=180)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "interrupted; run" in (tmp_path / "stderr.txt").read_text()
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    done = load_checkpoint(run_id)[0]["step"]  # the only checkpoint is the one the signal wrote
    assert done >= 1
    res = invoke("train-vqvae", "--resume", run_id, "--max-steps", done + 1)
    assert res.exit_code == 0, res.output
    assert steps(run_id, "train/total_loss")[-1] == done + 1


# Two ranks step an fp16 discriminator through the trainer's own function; rank 1's gradients overflow at step 1.
FP16_DISCRIMINATOR = """
import os
import torch
from core.runtime import setup_runtime
from vqvae.losses import NLayerDiscriminator
from vqvae.train import step_discriminator

rt = setup_runtime("cpu", "fp16", seed=0)
disc = NLayerDiscriminator(3, 8, 2)
opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # rt.grad_scaler()'s class; a scale without early overflows
stepped = []
for step in range(3):
    rt.seed_step(0, step)  # different data on each rank
    with rt.autocast():
        loss = disc(torch.randn(2, 3, 16, 16)).float().mean()
    scaler.scale(loss).backward()
    if step == 1 and rt.rank == 1:
        next(disc.parameters()).grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in disc.parameters()]
    step_discriminator(disc, opt, scaler, rt)
    stepped.append(any(not torch.equal(a, p) for a, p in zip(before, disc.parameters())))
torch.save({"state": disc.state_dict(), "stepped": stepped, "scale": scaler.get_scale()},
           os.path.join(os.environ["RECORD_DIR"], f"disc{rt.rank}.pt"))
print("done")
"""


def test_fp16_discriminator_skips_an_overflow_on_every_rank(tmp_path):
    script = tmp_path / "disc.py"
    script.write_text(FP16_DISCRIMINATOR)
    torchrun(script, cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"disc{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        assert rank["stepped"] == [True, False, True]  # both skip the step that overflowed on rank 1 only
        assert rank["scale"] == 128.0  # and back off the scale alike
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between ranks"
        assert torch.isfinite(value).all()
