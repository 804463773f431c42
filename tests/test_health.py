"""Health checks: a collapsing tokenizer and a diverging transformer are reported once (stderr + tag `health`)
with the options that fix them; healthy runs are not."""
from __future__ import annotations

import mlflow

from conftest import TINY_GPT, TINY_VQ, invoke, last_line


def tags(run_id: str) -> dict[str, str]:
    return mlflow.get_run(run_id).data.tags


def test_collapsed_codebook_is_reported_once_with_the_fix(tracking_dir, dataset):
    # 2048 codes, 2 images x 64 latents per step, usage over 1 step: at most 6% of the codebook can be in use
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--batch-size", "2", "--codebook-size", "2048",
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
        "--l2-norm, --code-dim 8, --restart-after 20, --quantizer fsq"
    assert codebook_remedies(VQConfig(l2_norm=True, code_dim=8, restart_after=0)) == \
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
    assert "val loss diverging at step 3" in health and "--lr" in health
    assert res.stderr.count("Warning: transformer val loss") == 1

    losses = iter([2.0, 1.9, 2.0])  # within 10% of its best: noise, not divergence
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT, "--max-steps", "3")
    assert res.exit_code == 0, res.output
    assert "health" not in tags(last_line(res.stdout))
