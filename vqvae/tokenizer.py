"""A trained tokenizer loaded from its MLflow run: ``encode(images) -> indices``, ``decode(indices) -> images``."""
from __future__ import annotations

import torch

from core.checkpoint import load_checkpoint, load_weights
from core.ema import evaluated_weights
from core.errors import UserError
from core.options import config_from_dict
from core.tracking import get_run
from core.weights import load_model_weights
from vqvae.config import VQConfig, VQModelConfig
from vqvae.model import VQModel

KIND = "vqvae"  # the weights-only model kind of tokenizer runs


class Tokenizer:
    """Wraps a VQModel in eval mode; images are (B,3,H,W) floats in [-1, 1], indices (B,h,w) int64.

    ``manifest`` and ``val_fraction`` are the data the tokenizer was trained on (None for imported tokenizers),
    the defaults of the stages that encode a data set; ``step`` is the training step of the weights.
    """

    def __init__(self, model: VQModel, cfg: VQModelConfig, run_id: str | None = None, manifest: str | None = None,
                 val_fraction: float = 0.1, step: int = 0) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.run_id = run_id
        self.manifest = manifest
        self.val_fraction = val_fraction
        self.step = step

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
        """(B, 3, H, W) floats in [-1, 1] (`core.images.to_input` of each image), H and W multiples of the
        downsampling factor -> (B, H/f, W/f) code ids."""
        self.check_images(images)
        return self.model.encode_to_indices(images.to(self.device, non_blocking=True))

    def check_images(self, images: torch.Tensor) -> None:
        """What `encode` takes, checked from the shape and dtype alone (no pass over the values: no device sync)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise UserError(f"images must be a (batch, 3, height, width) tensor, got {shape}; "
                            "core.images.load_rgb and to_input make one image's (3, H, W)")
        if not images.dtype.is_floating_point:
            raise UserError(f"images must be floats in [-1, 1], got {images.dtype} (uint8 pixels: x / 127.5 - 1, "
                            "or core.images.to_input)")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise UserError(f"images are {images.shape[2]}x{images.shape[3]}, but this tokenizer needs sides that are "
                            f"multiples of its downsampling factor {f} (core.images.center_square crops to a size)")

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


def load_vq_model(run_id: str) -> tuple[VQModel, VQModelConfig, int]:
    """(model, architecture, step) of a vqvae run: its weights-only model, or for runs made before those were
    logged, its latest training checkpoint (never executes pickled code)."""
    run_id = get_run(run_id, "vqvae").info.run_id  # a models:/ URI becomes its source run
    weights = load_model_weights(run_id, KIND)
    if weights is not None:
        state, config, step = weights
        cfg, what = config_from_dict(VQModelConfig, config), f"tokenizer model of run {run_id}"
    else:
        ckpt, _ = load_checkpoint(run_id)
        state, step = evaluated_weights(ckpt), int(ckpt.get("step", 0))
        cfg, what = config_from_dict(VQConfig, ckpt["config"]), f"tokenizer checkpoint of run {run_id}"
    model = VQModel(cfg)
    load_weights(model, state, what)
    return model, cfg, step


def load_tokenizer(run_id: str, device: str | torch.device = "cpu") -> Tokenizer:
    """The tokenizer of a vqvae run (trained or imported), on ``device``."""
    model, cfg, step = load_vq_model(run_id)
    params = get_run(run_id).data.params
    return Tokenizer(model.to(device), cfg, run_id, params.get("manifest"), float(params.get("val_fraction", 0.1)),
                     step)
