"""MLflow plumbing shared by every stage: connect, open/resume/fail a run, find runs and artifacts by ID."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import click

from core.errors import UserError

STAGES = ("vqvae", "quantize", "transformer", "generate", "decode")
STAGE_COMMANDS = {"vqvae": "train-vqvae", "quantize": "quantize", "transformer": "train",
                  "generate": "generate", "decode": "decode"}
DEFAULT_EXPERIMENT = "taming"
# OSErrors that mean a full disk or a folder we may not write: a one-line error rather than a traceback
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# An unreachable server must fail fast, not retry for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for our own progress

tracking_options = [
    click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
                 help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
    click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name."),
]


def with_tracking_options(fn):
    for opt in reversed(tracking_options):
        fn = opt(fn)
    return fn


def connect(tracking_uri: str | None, experiment: str | None = DEFAULT_EXPERIMENT) -> None:
    """Point MLflow at ``tracking_uri`` and ``experiment``; a dead server is a one-line error within seconds."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"cannot reach the MLflow tracking server at {uri} ({reason}); "
                            "start it or pass another --tracking-uri") from None
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT)
    except Exception as exc:  # noqa: BLE001 - any store failure becomes one line
        raise UserError(f"cannot use MLflow tracking store {uri}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def get_run(run_id: str, stage: str | None = None):
    """Fetch a run, checking it exists and (if given) that it belongs to ``stage``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id!r} not found in tracking store {mlflow.get_tracking_uri()}; "
                        "check the run ID and --tracking-uri") from None
    actual = run.data.tags.get("stage")
    if stage is not None and actual != stage:
        raise UserError(f"run {run_id} is a {actual or 'non-toolkit'} run, but a {stage} run is needed "
                        f"(one made by `cli.py {STAGE_COMMANDS[stage]}`)")
    return run


def code_version() -> str:
    """Git commit of this checkout (with '+dirty' for local changes), else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("taming-mlflow")
        except PackageNotFoundError:
            return "unknown"


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, upstream_run_id: str | None = None,
              resume_run_id: str | None = None, enabled: bool = True) -> Iterator[Any]:
    """Open (or resume) the stage's MLflow run; mark it FAILED/KILLED on errors; print its ID last on stdout.

    ``enabled=False`` (non-zero ranks of a distributed job) yields None and never touches MLflow.
    """
    import mlflow

    if not enabled:
        yield None
        return
    if resume_run_id:
        # the run stays in its own experiment, whatever --experiment says (MLflow refuses a mismatch)
        mlflow.set_experiment(experiment_id=get_run(resume_run_id, stage).info.experiment_id)
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tag("resumed", "true")
    else:
        tags = {"stage": stage, "code_version": code_version()}
        if upstream_run_id:
            tags["upstream_run_id"] = upstream_run_id
        run = mlflow.start_run(tags=tags)
        if params:
            mlflow.log_params(params)
    run_id = run.info.run_id
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted")
        mlflow.end_run("KILLED")
        raise UserError(f"interrupted; run {run_id} marked KILLED (resume with --resume {run_id})") from None
    except click.ClickException as exc:
        mlflow.set_tag("error", exc.format_message()[:5000])
        mlflow.end_run("FAILED")
        raise
    except BaseException as exc:
        storage = isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS  # the machine's fault, not the code's
        message = (f"cannot write {exc.filename or 'an output file'}: {exc.strerror}; free disk space or fix the "
                   "permissions, then run again") if storage else _first_line(exc)
        mlflow.set_tag("error", message[:5000])
        mlflow.end_run("FAILED")
        if storage:
            raise UserError(message) from None
        raise
    mlflow.end_run("FINISHED")
    click.echo(run_id)  # last stdout line: lets shells chain stages with $(... | tail -n1)


def download(run_id: str, artifact_path: str, dst: str | Path | None = None) -> Path:
    """Download an artifact (file or folder) of a run; a missing artifact is a one-line error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dst) if dst else None)
    except (MlflowException, OSError) as exc:
        raise UserError(f"run {run_id} has no artifact {artifact_path!r} ({_first_line(exc)}); "
                        "was that stage finished?") from None
    return Path(local)


def find_upstream(run_id: str, stage: str, max_hops: int = 6):
    """Follow ``upstream_run_id`` tags from ``run_id`` until a run of ``stage`` (the run itself counts)."""
    run = get_run(run_id)
    for _ in range(max_hops):
        if run.data.tags.get("stage") == stage:
            return run
        up = run.data.tags.get("upstream_run_id")
        if not up:
            break
        run = get_run(up)
    raise UserError(f"no {stage} run found upstream of run {run_id}")


def log_manifest(df, source: str, context: str) -> None:
    """Record the dataset of a run (shown under the run's inputs in the UI)."""
    import warnings

    import mlflow

    with warnings.catch_warnings():  # a local path matches two equivalent source types; MLflow warns
        warnings.simplefilter("ignore", UserWarning)
        mlflow.log_input(mlflow.data.from_pandas(df, source=source, name="manifest"), context=context)


@contextlib.contextmanager
def artifact_folder(run_id: str | None = None, artifact_path: str | None = None) -> Iterator[Path]:
    """A scratch folder whose files become artifacts (of the active run, or ``run_id``) when the block
    completes; the folder is removed either way, so runs leave nothing behind in /tmp."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="artifacts-") as folder:
        yield Path(folder)
        if run_id:
            mlflow.MlflowClient().log_artifacts(run_id, folder, artifact_path)
        else:
            mlflow.log_artifacts(folder, artifact_path)
