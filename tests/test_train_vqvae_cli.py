"""train-vqvae end to end through the CLI: what lands in MLflow, resume, and bad input."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_VQ, image_steps, invoke, last_line, make_image_set, run_cli
from core.images import load_rgb


def client():
    return mlflow.MlflowClient()


def artifact_paths(run_id: str, path: str = "") -> list[str]:
    return [a.path for a in client().list_artifacts(run_id, path)]


def test_run_holds_params_metrics_checkpoint_and_images(vqvae_run, tmp_path):
    run = client().get_run(vqvae_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "vqvae" and "upstream_run_id" not in run.data.tags
    assert run.data.params["codebook_size"] == "32" and run.data.params["ch_mult"] == "1,2"
    steps = [m.step for m in client().get_metric_history(vqvae_run, "train/total_loss")]
    assert steps == [1, 2, 3, 4]
    assert {"val/psnr", "val/l1", "val/codebook_usage", "val/perplexity", "train/codebook_usage"} <= set(run.data.metrics)
    assert "checkpoints/latest.json" in artifact_paths(vqvae_run, "checkpoints")
    assert any("reconstructions" in p for p in artifact_paths(vqvae_run, "images"))  # the image slider's
    # and under stable names, one per validation step: what the Artifacts tab lists and Compare matches
    # step 0 (the starting weights) too: MLflow's image card opens its slider at step 0
    assert artifact_paths(vqvae_run, "reconstructions") == ["reconstructions/step_000000.png",
                                                            "reconstructions/step_000002.png",
                                                            "reconstructions/step_000004.png"]
    assert image_steps(vqvae_run, "reconstructions") == [0, 2, 4]
    # the latest at the top level: MLflow's Compare view matches only top-level files across runs
    assert [p for p in artifact_paths(vqvae_run) if "." in p] == ["reconstructions.png"]
    latest, last = (open(client().download_artifacts(vqvae_run, p, str(tmp_path)), "rb").read()
                    for p in ("reconstructions.png", "reconstructions/step_000004.png"))
    assert latest == last
    # a constant learning rate is a param, not a flat chart: logged while the warm-up (20 steps) schedules it
    assert [m.step for m in client().get_metric_history(vqvae_run, "train/lr")] == [1, 2, 3, 4]
    assert run.inputs.dataset_inputs, "manifest recorded with log_input"


def test_checkpoint_loads_without_pickle_and_rebuilds_tokenizer(vqvae_run, dataset):
    from core.data import ImageDataset
    from vqvae.tokenizer import load_tokenizer

    tok = load_tokenizer(vqvae_run)
    x = torch.stack([ImageDataset([str(p)], 16, False)[0][0] for p in sorted((dataset.parent / "img").glob("*.png"))[:3]])
    codes = tok.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long and int(codes.max()) < 32
    assert tok.decode(codes).shape == (3, 3, 16, 16)


def test_resume_continues_the_same_run_and_step_axis(tracking_dir, dataset):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2", "--adam-betas", "0.8,0.95")
    assert res.exit_code == 0, res.output
    run_id = last_line(res.stdout)
    res = invoke("train-vqvae", "--resume", run_id, "--max-steps", "4")
    assert res.exit_code == 0, res.output
    assert last_line(res.stdout) == run_id
    steps = [m.step for m in client().get_metric_history(run_id, "train/total_loss")]
    assert steps == [1, 2, 3, 4]
    pointer = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                  artifact_path="checkpoints/latest.json")).read())
    assert pointer["step"] == 4
    from core.checkpoint import load_checkpoint
    state, _ = load_checkpoint(run_id)  # both optimizers took --adam-betas, and the resumed run kept them
    assert [tuple(state[k]["param_groups"][0]["betas"]) for k in ("opt_ae", "opt_d")] == [(0.8, 0.95)] * 2
    assert client().get_run(run_id).info.status == "FINISHED"
    # Resuming a finished run without more steps is refused and leaves it FINISHED.
    res = invoke("train-vqvae", "--resume", run_id)
    assert res.exit_code == 1 and "already trained to step 4" in res.output
    assert client().get_run(run_id).info.status == "FINISHED"
    # Architecture options cannot change on resume.
    res = invoke("train-vqvae", "--resume", run_id, "--max-steps", "6", "--codebook-size", "64")
    assert res.exit_code == 1 and "cannot change --codebook-size" in res.output


def test_mixed_image_modes_load_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((12, 12), 0, np.uint8)])).save(tmp_path / "transparent.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.arange(144, dtype=np.uint16).reshape(12, 12) * 400)).save(tmp_path / "deep.png")
    for path in sorted(tmp_path.iterdir()):
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (12, 12), path.name
    # fully transparent pixels are composited on white, not shown black
    assert np.asarray(load_rgb(tmp_path / "transparent.png")).min() == 255
    # 16-bit values are scaled to 8 bits, not clipped at 255
    deep = np.asarray(load_rgb(tmp_path / "deep.png"))[..., 0]
    assert deep.max() == round(143 * 400 / 65535 * 255) and deep[0, 1] == 2


def _fails_cleanly(res, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    # TINY_VQ sets GAN options in runs shorter than --disc-start: the note naming them may come first
    message = "\n".join(line for line in res.stderr.strip().splitlines()
                         if not line.startswith("note: ignored (not used, not logged): "))
    assert message.startswith("Error: ") and len(message.splitlines()) == 1, message
    assert "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in message, message


def _run_count() -> int:
    return len(client().search_runs([e.experiment_id for e in client().search_experiments()], max_results=50000))


def test_bad_manifests(tracking_dir, tmp_path):
    before = _run_count()
    res = invoke("train-vqvae", "--manifest", tmp_path / "nope.csv", *TINY_VQ)
    _fails_cleanly(res, "manifest not found")
    assert _run_count() == before  # checked before the run exists: a typo leaves no FAILED run behind
    (tmp_path / "nocol.csv").write_text("path,label\na.png,1\n")
    _fails_cleanly(invoke("train-vqvae", "--manifest", tmp_path / "nocol.csv", *TINY_VQ), "no 'image_path' column")
    (tmp_path / "empty.csv").write_text("image_path,label\n")
    _fails_cleanly(invoke("train-vqvae", "--manifest", tmp_path / "empty.csv", *TINY_VQ), "lists no images")
    assert _run_count() == before


def test_missing_images_are_counted_or_skipped(tracking_dir, tmp_path):
    manifest = make_image_set(tmp_path, n=12)
    lines = manifest.read_text().splitlines()
    lines += [f"img/missing_{i}.png,red,train" for i in range(4)]
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    lines.append("img/corrupt.png,red,train")
    manifest.write_text("\n".join(lines) + "\n")
    res = invoke("train-vqvae", "--manifest", manifest, *TINY_VQ, "--max-steps", "1")
    _fails_cleanly(res, "5 of 17 images are missing or unusable", "missing_0.png (missing)", "--skip-bad-images")
    res = invoke("train-vqvae", "--manifest", manifest, *TINY_VQ, "--max-steps", "1", "--skip-bad-images")
    assert res.exit_code == 0, res.output
    assert client().get_run(last_line(res.stdout)).data.metrics["data/skipped_images"] == 5


def test_image_size_and_unknown_resume(tracking_dir, dataset):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--image-size", "17", "--max-steps", "1")
    _fails_cleanly(res, "--image-size 17 is not divisible by the downsampling factor 2")
    _fails_cleanly(invoke("train-vqvae", "--resume", "0123456789abcdef"), "not found")


def test_top_level_script_runs_the_same_command(tracking_dir, dataset, tmp_path):
    proc = run_cli("--manifest", dataset, *TINY_VQ, "--max-steps", "1", script="train_vqvae.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = client().get_run(last_line(proc.stdout))
    assert run.data.tags["stage"] == "vqvae"
    proc = run_cli("--manifest", tmp_path / "missing.csv", script="train_vqvae.py", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("Error: manifest not found")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--quantizer", "fsq", "--fsq-levels", "4,4"],
                                  ["--ema", "--l2-norm", "--code-dim", "4", "--restart-after", "1"],
                                  ["--warmup-steps", "1", "--codebook-init", "kmeans", "--grad-accum", "2"]])
def test_quantizer_variants_train(tracking_dir, dataset, args):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "3", *args)
    assert res.exit_code == 0, res.output
