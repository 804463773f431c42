"""The tokenizer as an MLflow model from code: PNG images (base64) in, code grids and reconstructions out.

MLflow runs this file to load the model (`set_model` below); its artifact ``tokenizer`` is the weights-only
folder (safetensors + config.json). Request: ``{"dataframe_records": [{"image": "<base64 PNG>"}]}``; answer per
image: ``codes`` (the code grid as a JSON list of rows) and ``reconstruction`` (base64 PNG).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from core.images import center_square, to_input, to_pil
from core.mlflow_models import image_from_base64, log_pyfunc, png_base64
from core.options import config_from_dict
from core.weights import load_weights_folder, save_weights
from vqvae.config import VQModelConfig
from vqvae.model import VQModel

KIND = "vqvae"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                           outputs=Schema([ColSpec("string", "codes"), ColSpec("string", "reconstruction")]))


def load_tokenizer_folder(folder: str | Path, device: torch.device) -> tuple[VQModel, VQModelConfig]:
    """A VQModel in eval mode and its config, from a weights-only folder."""
    state, config, _ = load_weights_folder(folder, KIND)
    cfg = config_from_dict(VQModelConfig, config)
    model = VQModel(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def write_tokenizer_folder(model: VQModel, cfg: VQModelConfig, step: int):
    """A writer of the tokenizer's weights-only folder (for `log_pyfunc`)."""
    config = dataclasses.asdict(cfg.model_config())
    return lambda folder: save_weights(folder, model.state_dict(), KIND, config, step)


PRECISIONS = ("fp32", "bf16", "fp16")


class TokenizerModel(mlflow.pyfunc.PythonModel):
    """Served on the GPU when there is one. ``model_config={"precision": "bf16"}`` (`mlflow.pyfunc.load_model`)
    runs encode and decode under autocast (default fp32)."""

    def load_context(self, context) -> None:
        from core.runtime import Runtime

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = (getattr(context, "model_config", None) or {}).get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"model_config precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.runtime = Runtime(self.device, precision)
        self.model, self.cfg = load_tokenizer_folder(context.artifacts["tokenizer"], self.device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # images of any size are seen as quantize sees them, so that the same image gets the same codes
        size = self.cfg.image_size
        x = torch.stack([to_input(center_square(image_from_base64(b, size), size))
                         for b in model_input["image"]]).to(self.device)
        with torch.inference_mode(), self.runtime.autocast():
            codes = self.model.encode_to_indices(x)
            rec = self.model.decode_indices(codes).float().clamp(-1, 1).cpu()
        return pd.DataFrame({"codes": [json.dumps(c.tolist()) for c in codes.cpu()],
                             "reconstruction": [png_base64(to_pil(r)) for r in rec]})


def log_tokenizer_model(model: VQModel, cfg: VQModelConfig, step: int, register: str | None = None):
    """Log the trained tokenizer as the run's MLflow model ``tokenizer`` (registered as ``register`` if given)
    at training step ``step``: the model carries the run's metrics of that step."""
    from PIL import Image

    example = pd.DataFrame({"image": [png_base64(Image.new("RGB", (cfg.image_size, cfg.image_size), "gray"))]})
    return log_pyfunc("tokenizer", Path(__file__), {"tokenizer": write_tokenizer_folder(model, cfg, step)},
                      SIGNATURE, example, register, model_config={"precision": "fp32"}, step=step)


mlflow.models.set_model(TokenizerModel())
