"""The transformer stage's one config: CLI options, MLflow params and the checkpoint all come from it."""
from __future__ import annotations

from dataclasses import dataclass

from core.loop import LoopOptions
from core.options import opt


@dataclass
class GPTTrainConfig(LoopOptions):
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
    batch_size: int = opt(32, "Sequences per micro-batch (per process).")
    lr: float = opt(3e-4, "Peak AdamW learning rate.")
    min_lr: float = opt(3e-5, "Learning rate at the end of the cosine schedule.")
    lr_warmup_steps: int = opt(100, "Linear warm-up steps.")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only).")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    val_every: int = opt(250, "Steps between validations.")
    sample_every: int = opt(500, "Steps between logged sample grids (0: only at the end).")
