"""The generator as an MLflow model from code: a JSON request of labels and sampling options in, PNG images
(base64) out — the transformer samples code grids and the bundled tokenizer decodes them.

MLflow runs this file to load the model (`set_model` below). Artifacts: ``generator`` (the GPT's weights-only
folder plus ``vocab.json``) and ``tokenizer`` (the tokenizer's weights-only folder). Request, one row per
request (every column optional; an empty record ``{}`` asks for one image with every default)::

    {"dataframe_records": [{"label": "7", "num_samples": 4, "seed": 0, "temperature": 1.0, "top_k": 0,
                            "top_p": 1.0, "cfg_scale": 2.0}]}

Answer: one row per image, ``label`` and ``image`` (base64 PNG). The same seed gives the same images.
Sampling precision (weights and KV cache): ``fp32`` unless the loader asks for another through MLflow's model
config, e.g. ``mlflow.pyfunc.load_model(uri, model_config={"precision": "bf16"})`` or
``mlflow models serve ... --model-config precision=bf16`` where the MLflow version supports it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from core.errors import UserError
from core.images import to_pil
from core.mlflow_models import log_pyfunc, png_base64
from core.weights import load_weights_folder, save_weights
from transformer.model import GPT, GPTConfig
from transformer.sample import PRECISIONS, generate, guidance_scale, top_k_for
from transformer.vocab import Vocab
from vqvae.pyfunc_model import load_tokenizer_folder, write_tokenizer_folder

KIND = "transformer"
VOCAB_FILE = "vocab.json"
MAX_SAMPLES = 256  # per request row: a served model must not be asked for unbounded work
OPTIONS = {"label": ("string", None), "num_samples": ("long", 1), "seed": ("long", 0), "temperature": ("double", 1.0),
           "top_k": ("long", None), "top_p": ("double", 1.0),  # top_k None: a share of the codebook (top_k_for)
           "cfg_scale": ("double", None)}  # None: the default for conditional models, off for unconditional ones
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(kind, name, required=False) for name, (kind, _) in OPTIONS.items()]),
    outputs=Schema([ColSpec("string", "label", required=False), ColSpec("string", "image")]))


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        folder = Path(context.artifacts["generator"])
        state, config, _ = load_weights_folder(folder, KIND)
        self.gpt = GPT(GPTConfig.from_saved(config))
        self.gpt.load_state_dict(state)
        precision = str((getattr(context, "model_config", None) or {}).get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise MlflowException(f"model_config precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                                  INVALID_PARAMETER_VALUE)
        self.gpt.to(self.device, PRECISIONS[precision]).eval()
        self.vocab = Vocab.load(folder / VOCAB_FILE)
        self.tokenizer, _ = load_tokenizer_folder(context.artifacts["tokenizer"], self.device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        answer = []
        # An empty record ({"dataframe_records": [{}]}) means every option at its default: one image. MLflow's
        # schema check turns a frame without columns into one without rows, so no rows is that request.
        for row in model_input.to_dict("records") or [{}]:
            opts = {k: row[k] if k in row and pd.notna(row[k]) else default for k, (_, default) in OPTIONS.items()}
            answer += [(label, png_base64(image)) for label, image in self._sample(**opts)]
        return pd.DataFrame(answer, columns=["label", "image"])

    def _sample(self, label: str | None, num_samples: int, seed: int, temperature: float, top_k: int, top_p: float,
                cfg_scale: float | None) -> list:
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise MlflowException(f"num_samples must be 1..{MAX_SAMPLES}, got {num_samples}", INVALID_PARAMETER_VALUE)
        labels, name = None, None
        if label is not None or self.vocab.num_classes:
            try:  # no label for a conditional model: the first class
                class_id = self.vocab.class_id(str(label)) if label is not None else 0
            except UserError as exc:
                raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
            labels, name = torch.full((int(num_samples),), class_id), self.vocab.classes[class_id]
        try:
            codes, _ = generate(self.gpt, int(num_samples), labels=labels,
                                cfg_scale=guidance_scale(cfg_scale, labels is not None),
                                temperature=float(temperature), top_p=float(top_p),
                                top_k=top_k_for(None if top_k is None else int(top_k), self.gpt.config.codebook_size),
                                seed=int(seed))
        except ValueError as exc:  # out-of-range sampling options
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        with torch.inference_mode():
            decoded = self.tokenizer.decode_indices(codes.to(self.device)).clamp(-1, 1).cpu()
        return [(name, to_pil(image)) for image in decoded]


def log_generator_model(gpt: GPT, vocab: Vocab, tokenizer, step: int, register: str | None = None):
    """Log the trained transformer with its tokenizer as the run's MLflow model ``generator`` (registered as
    ``register`` if given) at training step ``step``: the model carries the run's metrics of that step.
    ``tokenizer``: a `vqvae.tokenizer.Tokenizer`."""
    def write_generator(folder: Path) -> None:
        save_weights(folder, gpt.state_dict(), KIND, dataclasses.asdict(gpt.config), step)
        (folder / VOCAB_FILE).write_text(vocab.to_json())

    example = {"num_samples": 1, "seed": 0, "temperature": 1.0}
    if vocab.num_classes:
        example = {"label": vocab.classes[0], **example, "cfg_scale": 1.0}
    return log_pyfunc("generator", Path(__file__),
                      {"generator": write_generator,
                       "tokenizer": write_tokenizer_folder(tokenizer.model, tokenizer.cfg, 0)},
                      SIGNATURE, pd.DataFrame([example]), register, model_config={"precision": "fp32"}, step=step)


mlflow.models.set_model(GeneratorModel())
