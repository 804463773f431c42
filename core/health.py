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
OVERFIT_RISE = 0.05  # relative rise of the val loss above its best, while the train loss fell, that is overfitting
STALL_DB = 0.25  # val PSNR gained over the last two validation intervals below which a tokenizer has stalled

_best_val: dict[str, tuple[float, int, float | None]] = {}  # run id -> (best val loss, its step, train loss then)
_psnr: dict[str, list[tuple[int, float]]] = {}  # run id -> [(step, val PSNR)]


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


def not_in_use(*fixes: tuple[str, bool]) -> list[str]:
    """The options of (option, in use) pairs that are not in use yet, in order."""
    return [option for option, on in fixes if not on]


def codebook_remedies(cfg: Any) -> str:
    """The collapse remedies this tokenizer config does not use yet, as options to pass."""
    if cfg.quantizer == "fsq":
        return "fewer --fsq-levels (a smaller implicit codebook)"
    fixes = not_in_use(("--l2-norm", cfg.l2_norm), ("--code-dim 8", 0 < cfg.code_dim <= 32),
                       ("--restart-after 20", 0 < cfg.restart_after <= 50),
                       ("--entropy-weight 0.01", cfg.entropy_weight > 0))
    fixes.append("--quantizer fsq" if fixes else "a smaller --codebook-size, or --quantizer fsq")
    return ", ".join(fixes)


def check_codebook(cfg: Any, step: int, metrics: dict[str, float], window: int | None = None) -> None:
    """Codebook collapse: usage below 10% or batch perplexity below 5% of what a batch could reach.

    Checked once a full usage window (``window`` steps: the quantizer's, scaled with the codebook size; default
    ``cfg.usage_window``) of quantized steps has passed (usage is meaningless before)."""
    if step - cfg.warmup_steps < (window or cfg.usage_window):
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


def overfit_remedies(cfg: Any) -> str:
    """Regularisation options for a transformer that overfits, with values above the ones in use."""
    return (f"--dropout {max(0.1, 2 * cfg.dropout):g}, --weight-decay {max(0.1, 10 * cfg.weight_decay):g}, a smaller "
            f"model (--n-layer {cfg.n_layer}, --n-embd {cfg.n_embd} now), more images, or fewer --max-steps")


def check_val_loss(cfg: Any, step: int, val_loss: float, train_loss: float | None = None) -> None:
    """Validation loss that is not finite or has risen more than 10% above its best so far (diverging), or more
    than 5% while the train loss fell below its value at the best validation (overfitting)."""
    run_id = _run_id() or ""
    best, best_step, train_then = _best_val.get(run_id, (math.inf, step, None))
    if math.isfinite(val_loss) and val_loss <= best:
        _best_val[run_id] = (val_loss, step, train_loss)
        return
    falling = train_loss is not None and train_then is not None and train_loss < train_then
    if falling and val_loss > best * (1 + OVERFIT_RISE):
        report(f"transformer overfitting at step {step}: val loss {val_loss:.4f} rose from its best {best:.4f} "
               f"(step {best_step}) while the train loss fell from {train_then:.4f} to {train_loss:.4f}; generate "
               f"uses the best-validation weights, but a model that generalises needs {overfit_remedies(cfg)}")
    elif not math.isfinite(val_loss) or val_loss > best * (1 + MAX_VAL_RISE):
        report(f"transformer val loss diverging at step {step}: {val_loss:.4f}, best {best:.4f} at step "
               f"{best_step}; retrain with a lower --lr (now {cfg.lr:g}), {overfit_remedies(cfg)}")


def psnr_remedies(cfg: Any) -> str:
    """Tokenizer options that raise the PSNR reached, those not in use yet first (measured with
    benchmarks/quality.py, docs/defaults.md)."""
    schedule = not_in_use(("--lr-schedule cosine (+1-4 dB on photo patches at 400 steps; check class-conditional "
                           "samples)", cfg.lr_schedule == "cosine"))
    # options of the autoencoder's training, whatever the quantizer
    training = not_in_use(
        ("--ema-weights 0.99 (the default: +0.1-4.9 dB at 400 steps)", cfg.ema_weights > 0),
        ("--adam-betas 0.9,0.99 (sharper reconstructions before the GAN starts; codes a short-trained transformer "
         "may model less well)", cfg.adam_betas[0] >= 0.9))
    if cfg.quantizer == "fsq":
        return ", ".join(schedule + training + ["more --fsq-levels (a larger implicit codebook), or a wider model "
                                                "(--ch, --z-channels)"])
    fixes = schedule + not_in_use(
        ("--ema", cfg.ema), ("--no-l2-norm", not cfg.l2_norm),
        ("--code-dim 0 (codes as wide as --embed-dim)", cfg.code_dim in (0, cfg.embed_dim)),
        ("--restart-after 20", 0 < cfg.restart_after <= 50)) + training
    fixes.append(f"a larger --codebook-size (now {cfg.codebook_size}) or a wider model (--ch {cfg.ch} now)")
    return ", ".join(fixes)


def check_psnr(cfg: Any, step: int, psnr: float) -> None:
    """Tokenizer whose val PSNR gained less than 0.25 dB over its last two validation intervals (at least 3
    validations after the warm-up): more steps will not help, other options may."""
    if step <= cfg.warmup_steps:
        return
    history = _psnr.setdefault(_run_id() or "", [])
    history.append((step, psnr))
    if len(history) >= 3 and psnr - history[-3][1] < STALL_DB:
        first = history[-3]
        report(f"tokenizer PSNR stalled at step {step}: {psnr:.1f} dB, {psnr - first[1]:+.2f} dB since step "
               f"{first[0]}; retrain with {psnr_remedies(cfg)}")


def note_no_val_split(what: str, fix: str) -> None:
    """A run whose data has no val split validates on training data: say so once, on stderr and as the tag
    ``val_split`` of the active run (not ``health``: the other checks still speak), since "val" metrics that
    measure training data cannot show overfitting and pick the last weights as the best."""
    import mlflow

    if mlflow.active_run() is not None:
        if "val_split" in mlflow.MlflowClient().get_run(_run_id()).data.tags:
            return  # said when the run started (a resumed run)
        mlflow.set_tag("val_split", f"none: val metrics measure {what}")
    click.echo(f"note: no val split: val metrics measure {what}, so they cannot show overfitting; {fix}", err=True)
