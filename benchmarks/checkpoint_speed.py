"""Step time with and without a checkpoint: the upload in a background thread vs in the step (the old way).

A model whose training state (weights + two Adam moments) is ``--state-mb`` MB trains on CPU; every
``--every``-th step saves a checkpoint through `core.checkpoint.CheckpointWriter` into a throwaway MLflow store.
A remote artifact store is emulated by an upload that takes ``size / --upload-mb-per-s`` seconds.
    python benchmarks/checkpoint_speed.py [--state-mb 300] [--upload-mb-per-s 100] [--steps 30] [--every 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import machine, scratch_tracking


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--state-mb", type=float, default=300.0)
    p.add_argument("--upload-mb-per-s", type=float, default=100.0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    args = p.parse_args()
    scratch_tracking()

    import mlflow
    import torch

    from core.checkpoint import CheckpointWriter

    upload = mlflow.MlflowClient.log_artifact

    def remote(self, run_id, local_path, artifact_path=None):  # a store at --upload-mb-per-s
        time.sleep(Path(local_path).stat().st_size / 1e6 / args.upload_mb_per_s)
        return upload(self, run_id, local_path, artifact_path)

    mlflow.MlflowClient.log_artifact = remote
    width = int((args.state_mb * 1e6 / 4 / 3 / 4) ** 0.5)  # 4 square layers, weights + 2 Adam moments, fp32
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(64, width)

    def run(mode: str) -> tuple[list[float], list[float]]:
        """(step times without a checkpoint, step times with one) in seconds."""
        run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("bench").experiment_id).info.run_id
        writer = CheckpointWriter(run_id)
        plain, saving = [], []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if mode != "none" and step % args.every == 0:
                writer.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()})
                if mode == "inline":
                    writer.wait(final=True)  # what the step used to wait for: the whole upload
                saving.append(time.perf_counter() - t0)
            elif step > 1:
                plain.append(time.perf_counter() - t0)
        writer.wait(final=True)
        writer.close()
        return plain, saving

    results = {mode: run(mode) for mode in ("none", "background", "inline")}
    mb = sum(t.numel() * 4 for t in model.state_dict().values()) * 3 / 1e6
    print(f"\ncheckpoint cost per step — {machine()}", file=sys.stderr)
    print(f"training state {mb:.0f} MB, upload {args.upload_mb_per_s:.0f} MB/s, checkpoint every {args.every} "
          f"steps, {args.steps} steps", file=sys.stderr)
    base = statistics.median(results["none"][0])
    print(f"{'variant':<34} {'step ms (median)':>17} {'vs no checkpoint':>17}")
    print(f"{'step without a checkpoint':<34} {base * 1e3:>17.0f} {1:>16.2f}x")
    for mode, label in (("background", "checkpoint step, background upload"),
                        ("inline", "checkpoint step, upload in step")):
        t = statistics.median(results[mode][1])
        print(f"{label:<34} {t * 1e3:>17.0f} {t / base:>16.2f}x")


if __name__ == "__main__":
    main()
