"""The speed benchmarks that back README's table still run (--quick) and their correctness checks hold."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def run(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_sampling_speed_quick():
    out = run("sampling_speed.py")
    assert re.search(r"same seed, same samples: (\d+)/\1;", out), out
    for part in ("1. in a fresh process", "2. after 2 tokenizer training steps", "3. window"):
        assert part in out, out
    rows = re.findall(r"^\s+[12]\s+1\s+(\S+)\s+\d+\s+\d+\s+(\S+)\s+(\S+)$", out, re.M)  # batch 2 and 1, twice
    assert len(rows) == 4, out
    if official_installed():  # the official sampler's rate and our ratios beside it
        assert all(float(off) > 0 and ratio.endswith("x") for off, ratio, _ in rows), out
    else:  # skipped gracefully, with a note saying how to install it
        assert "official taming-transformers not installed" in out and all(off == "-" for off, _, _ in rows), out


def test_gpt_train_speed_quick():
    out = run("gpt_train_speed.py")
    assert float(re.search(r"max \|logit sparse - dense\| = (\S+)", out).group(1)) < 1e-4, out
    assert "--no-rel-bias: is_causal" in out
    assert re.search(r"attention costing nothing\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x", out), out  # the bound row
    if official_installed():  # the official model's own training step beside ours
        assert re.search(r"official mingpt\.GPT\s+\d+\.\d+\s+1\.00x", out), out
    else:
        assert "official taming-transformers not installed" in out, out


def official_installed() -> bool:
    """Whether the official taming package (benchmarks/requirements.txt) is importable: CI runs without it."""
    import importlib.util
    return importlib.util.find_spec("taming") is not None and importlib.util.find_spec("einops") is not None


def test_tokenizer_step_speed_quick():
    out = run("tokenizer_step_speed.py")
    for kind in ("autoencoder", "before GAN", "with GAN"):  # the autoencoders alone, and the full official step
        if official_installed():
            assert re.search(rf"{kind}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x$", out, re.M), out
        else:  # our rate, and the official columns skipped with a note saying how to install the package
            assert re.search(rf"{kind}\s+-\s+\d+\.\d+\s+-$", out, re.M), out
    if not official_installed():
        assert "official taming-transformers not installed" in out, out



def test_quality_benchmark_tiny(tmp_path):
    """quality.py end to end on one tokenizer family and one class-conditional family, 2 steps a stage: both
    columns, every figure, and the JSON it writes."""
    import json

    out = tmp_path / "quality.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--steps", "2", "--seeds", "1",
                          "--family", "glyphs", "--family", "heldout-shapes", "--per-class", "2",
                          "--transformer-seeds", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "glyphs (held-out, tokenizer; 1 seed(s))" in res.stdout and "heldout-shapes (held-out" in res.stdout
    figures = json.loads(out.read_text())
    assert set(figures["glyphs"]["new"][0]) == {"psnr", "usage", "perplexity", "minutes"}
    assert {"accuracy", "real", "recon", "val_loss", "psnr", "usage"} <= set(figures["heldout-shapes"]["old"][0])
    assert figures["heldout-shapes"]["new"][0]["real"] > 0.9  # the classifier reads real held-out shapes
    assert 0 <= figures["heldout-shapes"]["new"][0]["recon"] <= 1
    assert len(figures["heldout-shapes"]["new"][0]["per_transformer"]) == 2


def test_quality_families_differ_and_hold_out_what_they_say(tmp_path):
    """Every family is its own kind of image; glyph validation uses characters training never shows, and patch
    validation comes from strips no training patch overlaps (checked through the manifests' splits)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    import pandas as pd
    from PIL import Image

    import quality

    means = {}
    for name, make in (("photos", quality.photo_patches), ("heldout", quality.heldout_photo_patches),
                       ("textures", quality.textures), ("glyphs", quality.glyphs)):
        manifest = make(tmp_path / name, 16, 4)
        df = pd.read_csv(manifest)
        assert (df.split == "train").sum() == 16 and (df.split == "val").sum() == 4
        imgs = np.stack([np.asarray(Image.open(manifest.parent / p)) for p in df.image_path])
        assert imgs.shape[1:] == (quality.SIZE, quality.SIZE, 3) and imgs.std() > 5
        means[name] = imgs.reshape(len(imgs), -1).mean(0)
    assert len({round(float(m.mean()), 3) for m in means.values()}) == 4


def test_gpu_check_dry_run():
    """gpu_check.py (what a CUDA machine runs) works end to end at tiny sizes on the CPU: every section prints a
    rate, none an error, so the one run on a GPU is not spent on a broken script."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--no-tests"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "error" not in res.stdout, res.stdout
    for name in ("ours fp32", "ours bf16 compiled", "ours dense (relative bias)", "ours plain causal (flash)",
                 "ours window", "ours eager b1", "ours compiled b16"):
        assert re.search(rf"{re.escape(name)}[^\n]*\s\d+\.\d+ (img|tok)/s", res.stdout), (name, res.stdout)


def test_gpu_check_runs_the_cuda_tests_in_one_process(monkeypatch, capsys):
    """The suite runs one worker per core (pytest.ini); the CUDA tests that gpu_check.py runs share one GPU, so they
    run in one process, and the summary line is passed on."""
    from benchmarks import gpu_check

    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="....\n4 passed in 2.00s\n", stderr="")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    gpu_check.run_cuda_tests(60)
    (cmd,) = seen
    assert cmd[cmd.index("-n") + 1] == "0" and cmd[cmd.index("-m", 3) + 1] == "cuda", cmd
    assert "cuda tests: 4 passed in 2.00s (exit 0)" in capsys.readouterr().out


def test_scratch_store_ignores_an_experiment_inherited_from_the_caller(tmp_path):
    """A benchmark started from a process that set an MLflow experiment (which exports MLFLOW_EXPERIMENT_ID to its
    children: a test run, an MLflow project) still logs to its own fresh store instead of failing to find it."""
    code = ("from common import scratch_tracking; import mlflow; scratch_tracking(); "
            "run = mlflow.start_run(); mlflow.end_run(); print(run.info.experiment_id)")
    env = {**os.environ, "MLFLOW_EXPERIMENT_ID": "12345", "MLFLOW_EXPERIMENT_NAME": "elsewhere",
           "TMPDIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "0", res.stdout  # the fresh store's default experiment
    assert list(tmp_path.glob("bench-*/mlflow.db")), list(tmp_path.iterdir())


def test_scale_quick():
    """benchmarks/scale.py runs each stage in its own process and prints peak RSS, the ratio and bytes per code
    (train's table is the same code with larger fake runs: left out here for time)."""
    out = run("scale.py", "--stages", "quantize,generate")
    for title in ("quantize (256 codes per 64-px image", "generate (tiny transformer"):
        assert title in out, out
    assert "train start-up" not in out, out
    rows = re.findall(r"^\s+[\d,]+ (?:images|grids|samples)\s+[\d,]+\s+(\d+)\s+(\d+\.\d+)\s+(-?\d+\.\d+)", out, re.M)
    assert len(rows) == 4 and all(float(rss) > 0 for rss, _, _ in rows), out
    assert [float(ratio) for _, ratio, _ in rows][::2] == [1.0, 1.0], out  # each table's first case


@pytest.mark.parametrize("family", ["shapes", "digits"])
def test_quality_recon_ceiling_pairs_each_decoded_val_image_with_its_label(tmp_path, monkeypatch, family):
    """recon_accuracy reads the decoded val codes in row order against index.csv's labels, whatever order the
    index lists them in: with a tokenizer that gave the real images back it equals the classifier's accuracy on the
    real images, and one image swapped for another class's lowers it. The digits' labels are numbers in
    index.csv: read as numbers they matched none of the classifier's text labels (a ceiling of 0%)."""
    import shutil

    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    make, features = quality.FAMILIES[family][2], quality.FAMILIES[family][3]
    manifest = make(tmp_path / family, 24)  # 24 images per class (shapes) or per digit
    df = pd.read_csv(manifest, dtype=str)
    val = df[df.split == "val"].reset_index(drop=True)
    index = val.assign(row=range(len(val)))[["split", "row", "image_path", "label"]]
    index = pd.concat([df[df.split == "train"].assign(row=0)[index.columns], index]).sample(frac=1, random_state=0)
    index.to_csv(tmp_path / "index.csv", index=False)
    images = tmp_path / "images"
    images.mkdir()
    for i, p in enumerate(val.image_path):  # a perfect tokenizer: the decoded images are the real ones
        shutil.copy(manifest.parent / p, images / f"{i:04d}.png")
    monkeypatch.setattr(quality, "decode", lambda cfg: "decode-run")
    monkeypatch.setattr(quality, "download", lambda run, name: tmp_path / name)
    real = quality.classifier(manifest, features)[1]
    assert real >= 0.9 and quality.recon_accuracy("quantize-run", manifest, features) == real
    pred = quality.read_decoded("decode-run", manifest, features)
    first = next(i for i, lab in enumerate(val.label) if pred[i] == lab)  # an image read right ...
    other = next(i for i, lab in enumerate(val.label) if pred[i] == lab != val.label[first])  # ... swapped for
    shutil.copy(manifest.parent / val.image_path[other], images / f"{first:04d}.png")  # another class's
    assert quality.recon_accuracy("quantize-run", manifest, features) == real - 1 / len(val)


def test_quality_conditional_averages_transformers_of_one_tokenizer(tmp_path, monkeypatch):
    """--transformer-seeds N: one tokenizer and quantize run, N transformers on its codes with distinct train and
    sampling seeds (the first the tokenizer's seed), samples read right and val loss averaged over them, each
    transformer's figure kept; a count below 1 is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    made = []
    monkeypatch.setattr(quality, "tokenizer", lambda m, steps, old, **kw: made.append(kw) or
                        ("vq", {"psnr": 18.0, "usage": 0.9}))
    monkeypatch.setattr(quality, "quantize", lambda cfg: "q-" + cfg.vqvae_run_id)
    monkeypatch.setattr(quality, "recon_accuracy", lambda q_id, m, f: 0.75)
    calls = []

    def fake_samples(q_id, manifest, features, steps, per_class, train_extra, gen_extra):
        calls.append((q_id, train_extra["seed"], gen_extra["seed"]))
        return {"accuracy": {7: 0.3, 1007: 0.5, 2007: 0.7}[train_extra["seed"]], "real": 1.0,
                "val_loss": train_extra["seed"] / 1000, "train_run_id": "t"}

    monkeypatch.setattr(quality, "sample_accuracy", fake_samples)
    res = quality.conditional(tmp_path / "m.csv", None, 5, False, 2, {"seed": 7}, transformer_seeds=3)
    assert made == [{"seed": 7}]  # one tokenizer
    assert calls == [("q-vq", 7, 7), ("q-vq", 1007, 1007), ("q-vq", 2007, 2007)]
    assert res["accuracy"] == pytest.approx(0.5) and res["per_transformer"] == [0.3, 0.5, 0.7]
    assert res["transformer_seeds"] == [7, 1007, 2007]  # what a paired comparison needs
    assert res["val_loss"] == pytest.approx((0.007 + 1.007 + 2.007) / 3)
    assert (res["recon"], res["real"], res["psnr"]) == (0.75, 1.0, 18.0)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--transformer-seeds", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least 1" in bad.stderr


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_image_decode_quick(fmt):
    """The loader's scaled JPEG decoding, and its whole-factor reduction of a PNG, give the crops a full decode
    gives (same place, same flip; the pixels within the rounding of libjpeg's scaled transform or of the
    reduction), at every training resolution."""
    import importlib.util

    out = run("image_decode.py", "--format", fmt)
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+\d+\.\d+\s+\d+\.\d+\s+(\S+)\s+\d+\.\d+x\s+(\S+) dB$", out, re.M)
    assert [size for size, *_ in rows] == ["32", "256", "512"], out
    assert all(float(psnr) > 35 for *_, psnr in rows), out
    if importlib.util.find_spec("taming") and importlib.util.find_spec("albumentations"):  # the official loader
        assert all(float(ms) > 0 and ratio.endswith("x") for _, ms, ratio, _ in rows), out
    else:  # skipped gracefully, with a note saying how to install it
        assert "official taming-transformers not installed" in out and all(ms == "-" for _, ms, _, _ in rows), out
