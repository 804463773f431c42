"""A trained tokenizer loaded from its MLflow run: ``encode(images) -> indices``, ``decode(indices) -> images``."""
from __future__ import annotations

import torch

from core.checkpoint import load_checkpoint, load_weights
from core.errors import UserError
from core.options import config_from_dict
from core.tracking import get_run
from vqvae.config import VQConfig
from vqvae.model import VQModel


class Tokenizer:
    """Wraps a VQModel in eval mode; images are (B,3,H,W) floats in [-1, 1], indices (B,h,w) int64."""

    def __init__(self, model: VQModel, cfg: VQConfig, run_id: str | None = None) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.run_id = run_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def codebook_size(self) -> int:
        return self.model.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def grid_shape(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.downsample_factor
        return side, side

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_to_indices(images.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        self.check_indices(indices)
        return self.model.decode_indices(indices.to(self.device, dtype=torch.long)).clamp(-1, 1)

    def check_indices(self, indices: torch.Tensor) -> None:
        """Code grids must be (N, h, w) integers in [0, codebook_size)."""
        if indices.dim() != 3 or min(indices.shape[1:], default=0) < 1:
            raise UserError(f"code grids must have shape (N, height, width), got {tuple(indices.shape)}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise UserError(f"code grids must hold integers, got {indices.dtype}")
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= self.codebook_size:
            raise UserError(f"code grids hold ids {lo}..{hi}, but the tokenizer has codes 0..{self.codebook_size - 1}")


def load_tokenizer(run_id: str, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer from a vqvae run's latest checkpoint (never executes pickled code)."""
    get_run(run_id, "vqvae")
    state, _ = load_checkpoint(run_id)
    cfg = config_from_dict(VQConfig, state["config"])
    model = VQModel(cfg)
    load_weights(model, state["model"], f"tokenizer checkpoint of run {run_id}")
    return Tokenizer(model.to(device), cfg, run_id)
