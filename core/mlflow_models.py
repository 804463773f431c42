"""The toolkit's MLflow models: pyfunc "models from code" (the model's Python file is logged, never a pickled
object) whose artifacts are weights-only folders (safetensors + config.json, `core.weights`); images travel as
base64 PNG strings, so `mlflow models serve` answers plain JSON."""
from __future__ import annotations

import base64
import io
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("core", "vqvae", "transformer")  # what the model files import: shipped with every model
REQUIREMENTS = ("mlflow", "torch", "torchvision", "safetensors", "numpy", "pandas", "pillow", "click", "pyyaml")


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_base64(text: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        return img.convert("RGB")


def pip_requirements() -> list[str]:
    """This environment's versions: given explicitly, so MLflow does not load the model again to infer them."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_pyfunc(name: str, code_file: Path, folders: dict[str, Any], signature: Any, input_example: Any,
               register: str | None = None, model_config: dict[str, Any] | None = None) -> Any:
    """Log a model-from-code into the active run (``name`` = its artifact folder) and, with ``register``, add it
    to the Model Registry. ``folders``: artifact name -> a callable writing that folder's files into a path.
    ``model_config``: load-time settings and their defaults (a loader may override them: ``mlflow.pyfunc.load_model(
    uri, model_config={...})``)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        artifacts = {}
        for key, write in folders.items():
            write(Path(tmp) / key)
            artifacts[key] = str(Path(tmp) / key)
        return mlflow.pyfunc.log_model(name=name, python_model=str(code_file), artifacts=artifacts,
                                       code_paths=[str(ROOT / p) for p in CODE_PACKAGES], signature=signature,
                                       input_example=input_example, pip_requirements=pip_requirements(),
                                       registered_model_name=register, model_config=model_config)
