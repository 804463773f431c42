"""Health checks while training: a run that is going wrong says so once, on stderr and as the MLflow tag
``health`` of its run, naming the options that fix it. Called by the trainers on the main process at log and
validation time (never per step in the hot path)."""
from __future__ import annotations

import math
from typing import Any

import click

MIN_USAGE = 0.10  # share of the codebook used over the usage window
MIN_PERPLEXITY = 0.05  # of the most codes a batch can use: min(codebook size, tokens per batch)
MAX_VAL_RISE = 0.10  # relative rise of the val loss above its best that counts as diverging

_best_val: dict[str, tuple[float, int]] = {}  # run id -> (best val loss, its step)


def _run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def report(message: str) -> None:
    """Warn on stderr and tag the active run with ``health`` — once per run (also across resumes)."""
    import mlflow

    run_id = _run_id()
    if run_id is not None:
        if "health" in mlflow.MlflowClient().get_run(run_id).data.tags:
            return
        mlflow.set_tag("health", message)
    click.echo(f"Warning: {message}", err=True)


def codebook_size(cfg: Any) -> int:
    return math.prod(cfg.fsq_levels) if cfg.quantizer == "fsq" else cfg.codebook_size


def codebook_remedies(cfg: Any) -> str:
    """The collapse remedies this tokenizer config does not use yet, as options to pass."""
    if cfg.quantizer == "fsq":
        return "fewer --fsq-levels (a smaller implicit codebook)"
    fixes = [f for f, on in (("--l2-norm", cfg.l2_norm), ("--code-dim 8", 0 < cfg.code_dim <= 32),
                             ("--restart-after 20", 0 < cfg.restart_after <= 50)) if not on]
    fixes.append("--quantizer fsq" if fixes else "a smaller --codebook-size, or --quantizer fsq")
    return ", ".join(fixes)


def check_codebook(cfg: Any, step: int, metrics: dict[str, float]) -> None:
    """Codebook collapse: usage below 10% or batch perplexity below 5% of what a batch could reach.

    Checked once a full usage window of quantized steps has passed (usage is meaningless before)."""
    if step - cfg.warmup_steps < cfg.usage_window:
        return
    usage, perplexity = metrics.get("train/codebook_usage"), metrics.get("train/perplexity")
    k = codebook_size(cfg)
    tokens = cfg.batch_size * (cfg.image_size // cfg.downsample_factor) ** 2
    low_usage = usage is not None and usage < MIN_USAGE
    low_ppl = perplexity is not None and perplexity < MIN_PERPLEXITY * min(k, tokens)
    if low_usage or low_ppl:
        what = f"usage {usage:.1%}" if low_usage else f"perplexity {perplexity:.1f}"
        report(f"codebook collapse at step {step}: {what} of {k} codes (the tokenizer represents images with "
               f"a few codes, and reconstructions stay blurry); retrain with {codebook_remedies(cfg)}")


def check_val_loss(cfg: Any, step: int, val_loss: float) -> None:
    """Validation loss that is not finite or has risen more than 10% above its best so far."""
    run_id = _run_id() or ""
    best, best_step = _best_val.get(run_id, (math.inf, step))
    if math.isfinite(val_loss) and val_loss <= best:
        _best_val[run_id] = (val_loss, step)
        return
    if not math.isfinite(val_loss) or val_loss > best * (1 + MAX_VAL_RISE):
        report(f"transformer val loss diverging at step {step}: {val_loss:.4f}, best {best:.4f} at step "
               f"{best_step}; retrain with a lower --lr (now {cfg.lr:g}), more --dropout or --weight-decay, "
               f"or fewer --max-steps (overfitting on a small dataset)")
