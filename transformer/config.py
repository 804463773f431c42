"""The transformer stage's one config: CLI options, MLflow params and the checkpoint all come from it."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError
from core.options import LoopOptions, check_decay, opt


@dataclass
class GPTTrainConfig(LoopOptions):
    quantize_run_id: str = opt(None, "Run ID of the quantize stage.")
    # model
    n_layer: int = opt(4, "Transformer blocks.", ge=1)
    n_head: int = opt(4, "Attention heads.", ge=1)
    n_embd: int = opt(128, "Embedding width.", ge=1)
    dropout: float = opt(0.0, "Dropout.", ge=0, lt=1)
    pos_emb: str = opt("rowcol", "Position information: learned row/column embeddings of each code plus the relative "
                                 "bias (rowcol), or the relative bias only (none).", choices=["rowcol", "none"],
                       legacy="none")
    rel_bias: bool = opt(True, "Learned relative-position bias in attention. --no-rel-bias with --pos-emb rowcol is "
                               "the official model's plain causal attention: full-attention models then run the "
                               "fused flash/efficient attention kernels on GPU.")
    window_size: int = opt(0, "2-D local causal attention window w (0: full causal attention).", ge=0)
    label_dropout: float = opt(0.1, "Share of training sequences whose class token is replaced by the null token "
                                   "(enables classifier-free guidance).", ge=0, lt=1)
    # optimisation
    batch_size: int = opt(32, "Sequences per micro-batch (per process).", ge=1)
    # measured on digits, 400 steps (benchmarks/quality.py): 3e-4 with 100 warm-up steps ends at val loss 3.29,
    # 1e-3 with 40 at 2.67 and reads as the class asked for twice as often
    lr: float = opt(1e-3, "Peak AdamW learning rate.", gt=0)
    min_lr: float = opt(1e-4, "Learning rate at the end of the cosine schedule.", ge=0)
    lr_warmup_steps: int = opt(40, "Linear warm-up steps.", ge=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only).", ge=0)
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).", ge=0)
    val_every: int = opt(250, "Steps between validations.", ge=1)
    sample_every: int = opt(500, "Steps between logged sample grids (0: only at the end).", ge=0)

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if not self.rel_bias and self.pos_emb == "none":
            raise UserError("--no-rel-bias needs --pos-emb rowcol: without both the model has no position information")
        check_decay(self.lr, self.min_lr)
