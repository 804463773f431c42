"""The transformer stage's one config: CLI options, MLflow params and the checkpoint all come from it."""
from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help_: str, **meta):
    return field(default=default, metadata={"help": help_, **meta})


@dataclass
class GPTTrainConfig:
    quantize_run_id: str = field(default=None, metadata={"help": "Run ID of the quantize stage."})
    # model
    n_layer: int = _f(4, "Transformer blocks.")
    n_head: int = _f(4, "Attention heads.")
    n_embd: int = _f(128, "Embedding width.")
    dropout: float = _f(0.0, "Dropout.")
    window_size: int = _f(0, "2-D local causal attention window w (0: full causal attention).")
    label_dropout: float = _f(0.1, "Share of training sequences whose class token is replaced by the null token "
                                   "(enables classifier-free guidance).")
    # optimisation
    max_steps: int = _f(1000, "Optimizer steps.")
    batch_size: int = _f(32, "Sequences per micro-batch (per process).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(3e-4, "Peak AdamW learning rate.")
    min_lr: float = _f(3e-5, "Learning rate at the end of the cosine schedule.")
    lr_warmup_steps: int = _f(100, "Linear warm-up steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices only).")
    grad_clip: float = _f(1.0, "Gradient-norm clip (0: off).")
    seed: int = _f(0, "Random seed.")
    device: str = _f("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = _f("fp32", "Autocast precision (fp16 uses a GradScaler).", choices=["fp32", "bf16", "fp16"])
    nan_policy: str = _f("stop", "On a NaN/inf loss: stop (keeping the last good checkpoint) or skip the step.",
                         choices=["stop", "skip"])
    log_every: int = _f(10, "Steps between metric logs.")
    val_every: int = _f(250, "Steps between validations.")
    sample_every: int = _f(500, "Steps between logged sample grids (0: only at the end).")
    ckpt_every: int = _f(500, "Steps between checkpoints.")
