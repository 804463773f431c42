"""train keeps the weights of its lowest validation loss as the run's model (generate's default); the last ones
stay available (`generate --weights last`), also across a resume."""
from __future__ import annotations

import json

import mlflow
import torch

from conftest import TINY_GPT, invoke, last_line


def test_best_validation_weights_are_the_default_and_last_ones_stay(tracking_dir, vqvae_run, monkeypatch):
    import transformer.train as train
    from core.tracking import download
    from core.weights import LAST_MODEL_DIR, load_model_weights
    from transformer.generate import load_transformer

    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    losses = iter([3.0, 2.5, 2.6, 2.7])  # best at step 2
    monkeypatch.setattr(train, "validation_loss", lambda *a, **k: next(losses))
    args = [a if a != "2" or i != TINY_GPT.index("--max-steps") + 1 else "4" for i, a in enumerate(TINY_GPT)]
    res = invoke("train", "--quantize-run-id", last_line(res.stdout), *args, "--lr", "1e-2", "--lr-warmup-steps", "0")
    assert res.exit_code == 0, res.output
    run_id = last_line(res.stdout)
    best, _, best_step = load_model_weights(run_id, "transformer")
    last, _, last_step = load_model_weights(run_id, "transformer", LAST_MODEL_DIR)
    assert (best_step, last_step) == (2, 4)
    assert any(not torch.equal(best[k], last[k]) for k in best)  # two steps at lr 1e-2 apart
    metrics = mlflow.get_run(run_id).data.metrics
    assert (metrics["val/best_step"], metrics["val/best_loss"]) == (2, 2.5)
    for which, expected in (("best", best), ("last", last)):
        model, _ = load_transformer(run_id, torch.device("cpu"), which)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    res = invoke("generate", "--transformer-run-id", run_id, "--num-samples", "2", "--weights", "last")
    assert res.exit_code == 0, res.output
    assert json.loads(download(last_line(res.stdout), "settings.json").read_text())["weights"] == "last"
    res = invoke("generate", "--transformer-run-id", run_id, "--num-samples", "2", "--weights", "worst")
    assert res.exit_code != 0 and "--weights" in res.output

    # resumed for two more steps: the best of before the resume is still the one to beat
    losses = iter([2.8, 2.4])
    res = invoke("train", "--resume", run_id, "--max-steps", "6")
    assert res.exit_code == 0, res.output
    _, _, best_step = load_model_weights(run_id, "transformer")
    assert best_step == 6 and mlflow.get_run(run_id).data.metrics["val/best_loss"] == 2.4
