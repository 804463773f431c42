"""The toolkit's MLflow models: pyfunc "models from code" (the model's Python file is logged, never a pickled
object) whose artifacts are weights-only folders (safetensors + config.json, `core.weights`); images travel as
base64 PNG strings, so `mlflow models serve` answers plain JSON."""
from __future__ import annotations

import base64
import io
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click
from PIL import Image

from core.errors import UserError
from core.images import load_rgb
from core.tracking import connect, with_tracking_options

ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("core", "vqvae", "transformer")  # what the model files import: shipped with every model
REQUIREMENTS = ("mlflow", "torch", "torchvision", "safetensors", "numpy", "pandas", "pillow", "click", "pyyaml")


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_base64(text: str, min_side: int | None = None) -> Image.Image:
    """A request's image, opened as every stage opens image files (`load_rgb`)."""
    return load_rgb(io.BytesIO(base64.b64decode(text)), min_side)


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
               register: str | None = None, model_config: dict[str, Any] | None = None, step: int = 0) -> Any:
    """Log a model-from-code into the active run (``name`` = its artifact folder) and, with ``register``, add it
    to the Model Registry. ``folders``: artifact name -> a callable writing that folder's files into a path.
    ``model_config``: load-time settings and their defaults (a loader may override them: ``mlflow.pyfunc.load_model(
    uri, model_config={...})``). ``step``: the training step of the weights; MLflow links the run's metrics of
    that step (the last validation among them) to the logged model, so its page and the Models tab show them."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        artifacts = {}
        for key, write in folders.items():
            write(Path(tmp) / key)
            artifacts[key] = str(Path(tmp) / key)
        return mlflow.pyfunc.log_model(name=name, python_model=str(code_file), artifacts=artifacts,
                                       code_paths=[str(ROOT / p) for p in CODE_PACKAGES], signature=signature,
                                       input_example=input_example, pip_requirements=pip_requirements(),
                                       registered_model_name=register, step=step,
                                       **({"model_config": model_config} if model_config else {}))


# The MLflow model each training stage logs (its name, and the run's `stage` tag)
STAGE_MODELS = {"vqvae": "tokenizer", "transformer": "generator"}
ALIAS = re.compile(r"^[\w-]+$")


def register_run_model(run_id: str, name: str, alias: str | None = None) -> Any:
    """Register the model a finished tokenizer or generator run logged as a version of ``name`` (the version that
    already holds it when there is one: registering twice adds nothing); ``alias`` then points at it.
    Returns the model version. Everything is checked before anything is registered."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from core.tracking import get_run

    if alias is not None and (not ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias)):
        raise UserError(f"--alias {alias!r} is not a valid alias: letters, digits, '_' and '-', not 'latest' or "
                        "'v<number>' (those name versions)")
    run = get_run(run_id)
    run_id, stage = run.info.run_id, run.data.tags.get("stage")
    if stage not in STAGE_MODELS:
        raise UserError(f"run {run_id} is a {stage or 'non-toolkit'} run; register takes a tokenizer (train-vqvae) "
                        "or generator (train) run")
    if run.info.status != "FINISHED":
        raise UserError(f"run {run_id} is {run.info.status}; only a finished run has its model (resume it with "
                        f"--resume {run_id})")
    kind = STAGE_MODELS[stage]
    models = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                                     filter_string=f"source_run_id = '{run_id}'") if m.name == kind]
    if not models:
        raise UserError(f"run {run_id} logged no {kind} model (an imported tokenizer, or a run made before models "
                        "were logged); train one, or import it with import-vqvae")
    client = mlflow.MlflowClient()
    try:
        existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                    if v.source in (models[0].model_uri, f"models:/{models[0].model_id}")]
        version = existing[0] if existing else mlflow.register_model(models[0].model_uri, name)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise UserError(f"cannot register run {run_id}'s {kind} as {name!r}: {exc.message.splitlines()[0]}") from None
    return version


@click.command("register")
@click.option("--run-id", required=True, help="A finished train-vqvae (tokenizer) or train (generator) run.")
@click.option("--name", required=True, help="Registered model name (created if new; otherwise a new version).")
@click.option("--alias", default=None, help="Point this alias (e.g. champion) at the version: models:/NAME@ALIAS.")
@with_tracking_options
def register_command(run_id: str, name: str, alias: str | None, tracking_uri: str | None, experiment: str) -> None:
    """Register the model of a finished training run, without training again (prints models:/NAME/VERSION)."""
    connect(tracking_uri, experiment)
    version = register_run_model(run_id, name, alias)
    if alias:
        click.echo(f"alias models:/{name}@{alias} -> version {version.version}", err=True)
    click.echo(f"models:/{name}/{version.version}")
