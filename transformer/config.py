"""The transformer stage's one config: CLI options, MLflow params and the checkpoint all come from it."""
from __future__ import annotations

from dataclasses import dataclass

from core.options import opt


@dataclass
class GPTTrainConfig:
    quantize_run_id: str = opt(None, "Run ID of the quantize stage.")
    # model
    n_layer: int = opt(4, "Transformer blocks.")
    n_head: int = opt(4, "Attention heads.")
    n_embd: int = opt(128, "Embedding width.")
    dropout: float = opt(0.0, "Dropout.")
    window_size: int = opt(0, "2-D local causal attention window w (0: full causal attention).")
    label_dropout: float = opt(0.1, "Share of training sequences whose class token is replaced by the null token "
                                   "(enables classifier-free guidance).")
    # optimisation
    max_steps: int = opt(1000, "Optimizer steps.")
    batch_size: int = opt(32, "Sequences per micro-batch (per process).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lr: float = opt(3e-4, "Peak AdamW learning rate.")
    min_lr: float = opt(3e-5, "Learning rate at the end of the cosine schedule.")
    lr_warmup_steps: int = opt(100, "Linear warm-up steps.")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only).")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    seed: int = opt(0, "Random seed.")
    device: str = opt("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = opt("fp32", "Autocast precision (fp16 uses a GradScaler).", choices=["fp32", "bf16", "fp16"])
    nan_policy: str = opt("stop", "On a NaN/inf loss: stop (keeping the last good checkpoint) or skip the step.",
                         choices=["stop", "skip"])
    log_every: int = opt(10, "Steps between metric logs.")
    val_every: int = opt(250, "Steps between validations.")
    sample_every: int = opt(500, "Steps between logged sample grids (0: only at the end).")
    ckpt_every: int = opt(500, "Steps between checkpoints.")
