"""evaluate: metric functions on known pairs, then end to end on a tiny trained tokenizer."""
from __future__ import annotations

import sys
import types

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from vqvae import evaluate as ev
from vqvae.evaluate import PSNR_CAP, evaluate_command, keep_worst, per_image_metrics, psnr, ssim


def run(*args) -> Result:
    return CliRunner().invoke(evaluate_command, [str(a) for a in args])


def test_psnr_ssim_known_pairs() -> None:
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP))
    assert torch.allclose(ssim(x, x), torch.ones(3))
    # an offset of 0.2 in [-1, 1] is 0.1 of the [0, 1] range: MSE 0.01, PSNR 10*log10(1/0.01) = 20 dB
    base = torch.zeros(2, 3, 16, 16)
    assert torch.allclose(psnr(base + 0.2, base), torch.full((2,), 20.0))
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert (ssim(noisy, x) < 0.95).all() and (psnr(noisy, x) < 20).all()


def test_per_image_metrics_and_worst() -> None:
    x = torch.zeros(4, 3, 16, 16)
    xrec = x + torch.tensor([0.0, 0.2, 0.4, 0.02]).view(4, 1, 1, 1)
    l1 = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731 - (B,1,1,1) like LPIPS
    m = per_image_metrics(x, xrec, l1)
    assert set(m) == {"psnr", "ssim", "lpips"} and all(v.shape == (4,) for v in m.values())
    assert torch.allclose(m["lpips"], torch.tensor([0.0, 0.2, 0.4, 0.02]))
    worst = keep_worst(None, (m["psnr"][:2], x[:2], xrec[:2]), k=2)
    worst = keep_worst(worst, (m["psnr"][2:], x[2:], xrec[2:]), k=2)
    assert torch.allclose(worst[2][:, 0, 0, 0], torch.tensor([0.4, 0.2]))


def test_inception_weights_note(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    path, note = ev.inception_weights()
    assert path is None and str(tmp_path / "hub" / "checkpoints" / ev.INCEPTION_FILE) in note
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ev.INCEPTION_FILE).write_bytes(b"")
    assert ev.inception_weights() == (tmp_path / "hub" / "checkpoints" / ev.INCEPTION_FILE, None)


def test_requires_run_id() -> None:
    res = run("--device", "cpu")
    assert res.exit_code == 1 and "--vqvae-run-id is required" in res.output


def test_evaluate_logs_onto_the_vqvae_run(vqvae_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no LPIPS/Inception weights
    res = run("--vqvae-run-id", vqvae_run, "--device", "cpu", "--worst", "3")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == vqvae_run
    assert "note: LPIPS skipped" in res.stderr and "note: rFID skipped" in res.stderr
    assert "--perceptual-weight" not in res.stderr  # a training option, which evaluate does not have

    client = mlflow.MlflowClient()
    r = client.get_run(vqvae_run)
    assert r.info.status == "FINISHED"
    m = r.data.metrics
    assert m["eval/num_images"] == 4  # the fixture's val split
    assert 0 < m["eval/psnr"] < PSNR_CAP and -1 <= m["eval/ssim"] <= 1
    assert 0 < m["eval/codebook_usage"] <= 1 and m["eval/perplexity"] >= 1
    assert "eval/lpips" not in m and "eval/rfid" not in m
    assert "VGG16" in r.data.tags["eval/lpips_note"] and r.data.tags["eval/rfid_note"].startswith("rFID skipped")

    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=vqvae_run, artifact_path="eval/per_image.csv"))
    assert len(table) == 4 and {"image_path", "psnr", "ssim"} <= set(table.columns)
    assert m["eval/psnr"] == pytest.approx(table["psnr"].mean())
    grid = Image.open(mlflow.artifacts.download_artifacts(run_id=vqvae_run, artifact_path="eval/worst.png"))
    # 3 worst 16px images upscaled 11x (grids are >= 512 px wide), originals over reconstructions, rows labelled
    assert grid.width > 3 * (16 * 11 + 2) + 2 and grid.height == 2 * (16 * 11 + 2) + 2

    # with LPIPS available, its stale note goes away and the metric appears
    fake = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    monkeypatch.setattr(ev, "load_lpips", lambda device: (fake, None))
    res = run("--vqvae-run-id", vqvae_run, "--device", "cpu", "--max-images", "2", "--no-fid")
    assert res.exit_code == 0, res.output
    r = client.get_run(vqvae_run)
    assert r.info.status == "FINISHED" and "eval/lpips_note" not in r.data.tags
    assert r.data.metrics["eval/num_images"] == 2 and "eval/lpips" in r.data.metrics
