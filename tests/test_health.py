"""Health checks: a collapsing tokenizer and a diverging transformer are reported once (stderr + tag `health`)
with the options that fix them; healthy runs are not."""
from __future__ import annotations

import mlflow

from conftest import TINY_GPT, TINY_VQ, invoke, last_line


def tags(run_id: str) -> dict[str, str]:
    return mlflow.get_run(run_id).data.tags


def test_collapsed_codebook_is_reported_once_with_the_fix(tracking_dir, dataset):
    # 2048 codes, 256 images x 64 latents a step (enough that the usage window stays 2 steps, see
    # test_quantizer), plain VQ from taming's initialisation: a few codes take every latent
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--codebook-size", "2048", "--batch-size", "256",
                 "--usage-window", "1", "--no-l2-norm", "--code-dim", "0", "--restart-after", "0",
                 "--max-steps", "4")
    assert res.exit_code == 0, res.output
    health = tags(last_line(res.stdout))["health"]
    assert "codebook collapse" in health and "--l2-norm" in health and "--restart-after" in health
    assert res.stderr.count("Warning: codebook collapse") == 1  # once, although every logged step is collapsed


def test_healthy_tokenizer_gets_no_health_tag(tracking_dir, dataset):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--usage-window", "2", "--max-steps", "4")
    assert res.exit_code == 0, res.output
    assert "health" not in tags(last_line(res.stdout))
    assert "Warning" not in res.stderr


def test_remedies_name_only_options_not_in_use():
    from core.health import codebook_remedies
    from vqvae.config import VQConfig

    assert codebook_remedies(VQConfig(l2_norm=False, code_dim=0, restart_after=0)) == \
        "--l2-norm, --code-dim 8, --restart-after 20, --entropy-weight 0.01, --quantizer fsq"
    assert codebook_remedies(VQConfig(l2_norm=True, code_dim=8, restart_after=0, entropy_weight=0.05)) == \
        "--restart-after 20, --quantizer fsq"
    assert "--fsq-levels" in codebook_remedies(VQConfig(quantizer="fsq"))


def test_diverging_transformer_is_reported(tracking_dir, vqvae_run, monkeypatch):
    import transformer.train as train

    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    quantize_run = last_line(res.stdout)
    losses = iter([2.0, 1.9, 2.5])  # best 1.9, then 32% above it
    monkeypatch.setattr(train, "validation_loss", lambda *a, **k: next(losses))
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--max-steps", "3")
    assert res.exit_code == 0, res.output
    health = tags(last_line(res.stdout))["health"]
    # diverging, or overfitting when the train loss happened to fall meanwhile: both name the regularisation
    assert "at step 3" in health and "--dropout" in health and "--weight-decay" in health
    assert res.stderr.count("Warning: transformer") == 1

    losses = iter([2.0, 1.9, 1.95])  # within 5% of its best: noise, not divergence nor overfitting
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--max-steps", "3")
    assert res.exit_code == 0, res.output
    assert "health" not in tags(last_line(res.stdout))


def test_overfitting_is_told_apart_from_divergence(monkeypatch, capsys):
    """Val loss rising 5% while the train loss falls: overfitting, with regularisation above the values in use;
    rising as much with the train loss rising too: nothing until it passes 10% (diverging)."""
    from core import health
    from transformer.config import GPTTrainConfig

    cfg = GPTTrainConfig(dropout=0.2, weight_decay=0.05)
    monkeypatch.setattr(health, "_best_val", {})
    for step, (val, train) in enumerate([(2.0, 2.5), (1.8, 2.0), (1.85, 1.7)], 1):
        health.check_val_loss(cfg, step, val, train)
    assert capsys.readouterr().err == ""  # 2.8% above its best: not yet
    health.check_val_loss(cfg, 4, 1.92, 1.5)
    err = capsys.readouterr().err
    assert "overfitting at step 4" in err and "from 2.0000 to 1.5000" in err
    assert "--dropout 0.4" in err and "--weight-decay 0.5" in err and "best-validation weights" in err
    monkeypatch.setattr(health, "_best_val", {})
    for step, (val, train) in enumerate([(1.8, 2.0), (1.92, 2.1)], 1):  # train loss rose as well
        health.check_val_loss(cfg, step, val, train)
    assert capsys.readouterr().err == ""
    health.check_val_loss(cfg, 3, 2.1, 2.2)
    assert "diverging at step 3" in capsys.readouterr().err


def test_stalled_tokenizer_psnr_names_the_options_that_help(monkeypatch, capsys):
    from core import health
    from vqvae.config import VQConfig

    monkeypatch.setattr(health, "_psnr", {})
    cfg = VQConfig(warmup_steps=10, l2_norm=True, code_dim=8, ema=False, restart_after=20, ema_weights=0.0)
    health.check_psnr(cfg, 10, 5.0)  # the warm-up's end: not counted
    for step, psnr in ((100, 18.0), (200, 19.9), (300, 20.0)):  # still gaining over two intervals
        health.check_psnr(cfg, step, psnr)
    assert capsys.readouterr().err == ""
    health.check_psnr(cfg, 400, 20.1)  # +0.2 dB over steps 200..400
    err = capsys.readouterr().err
    assert "PSNR stalled at step 400: 20.1 dB, +0.20 dB since step 200" in err
    assert "--ema" in err and "--no-l2-norm" in err and "--code-dim 0" in err and "--restart-after" not in err
    assert "--codebook-size (now 256)" in err and "--adam-betas 0.9,0.99" in err and "--ema-weights 0.99" in err
    assert "--ema-weights" not in health.psnr_remedies(VQConfig())  # on by default
    assert health.psnr_remedies(VQConfig(ema=True, l2_norm=False, code_dim=0, adam_betas=(0.9, 0.99),
                                         lr_schedule="cosine")).startswith("a larger --codebook")
    fsq = health.psnr_remedies(VQConfig(quantizer="fsq", ema_weights=0.0))
    # the training options apply to every quantizer; the codebook's do not
    assert "--fsq-levels" in fsq and "--adam-betas 0.9,0.99" in fsq and "--ema-weights 0.99" in fsq
    assert "--ema," not in fsq and "--no-l2-norm" not in fsq and "--codebook-size" not in fsq
    # a run on the (default) constant rate is pointed at the decay first
    assert "--lr-schedule cosine" in err and health.psnr_remedies(VQConfig()).startswith("--lr-schedule cosine")
    assert health.psnr_remedies(VQConfig(quantizer="fsq")).startswith("--lr-schedule cosine")
    assert "--lr-schedule" not in health.psnr_remedies(VQConfig(quantizer="fsq", lr_schedule="cosine"))


def test_a_run_without_a_val_split_says_what_its_val_metrics_measure(tracking_dir, tmp_path):
    """A small folder whose hash split put no image in val (or a split column with none): both stages validate on
    training data, which cannot show overfitting; each says so once, on stderr and as the tag ``val_split``, and
    the other health checks keep their tag."""
    from conftest import make_image_set

    manifest = make_image_set(tmp_path, n=8)
    manifest.write_text(manifest.read_text().replace(",val\n", ",train\n"))
    res = invoke("train-vqvae", "--manifest", manifest, *TINY_VQ, "--max-steps", "2", "--val-every", "1")
    assert res.exit_code == 0, res.output
    vq = last_line(res.stdout)
    assert res.stderr.count("note: no val split: val metrics measure 8 training images") == 1, res.stderr
    assert "mark rows 'val' in a split column" in res.stderr
    assert tags(vq)["val_split"] == "none: val metrics measure 8 training images"
    res = invoke("quantize", "--vqvae-run-id", vq, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--quantize-run-id", last_line(res.stdout), *TINY_GPT, "--val-every", "1")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("note: no val split: val metrics measure training grids") == 1, res.stderr
    assert tags(last_line(res.stdout))["val_split"] == "none: val metrics measure training grids"
    assert "val_split" not in tags(last_line(invoke("train-vqvae", "--manifest", make_image_set(tmp_path / "b"),
                                                    *TINY_VQ, "--max-steps", "1").stdout))


def test_images_smaller_than_the_training_size_are_named(tracking_dir, dataset):
    """20-px images trained at 32 px are upscaled: the tokenizer learns blur. The run says so before training, from
    a sample of headers, with the size that fits them; at 16 px it says nothing."""
    from vqvae.train import small_images_note

    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--image-size", "32", "--max-steps", "1")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("training images sampled are smaller") == 1, res.stderr
    assert ("note: 20 of 20 training images sampled are smaller than --image-size 32 on their shorter side (median "
            "20 px): they are upscaled, which the tokenizer learns as blur; train at --image-size 20") in res.stderr
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "1")
    assert res.exit_code == 0 and "are smaller than --image-size" not in res.stderr, res.output
    paths = [str(p) for p in sorted((dataset.parent / "img").iterdir())]
    assert small_images_note(paths, 24, 8).endswith("--image-size 16, or on larger images")
    assert small_images_note(paths[:3] + ["missing.png"] * 20, 24, 4) is not None  # unreadable files left out
    assert small_images_note(["missing.png"], 24, 4) is None
