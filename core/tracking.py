"""MLflow plumbing shared by every stage: connect, open/resume/fail a run (named, described, nested under a
pipeline), resolve run IDs and ``models:/`` URIs, find runs and artifacts."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import importlib.util
import os
import re
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
# What each stage's run is, in words (first line of its description)
STAGE_TITLES = {"vqvae": "VQGAN image tokenizer", "quantize": "dataset encoded into code grids",
                "transformer": "transformer (GPT) over code grids", "generate": "sampled code grids and images",
                "decode": "code grids decoded into images", "pipeline": "pipeline: one run per stage, nested below"}
NOTE_TAG = "mlflow.note.content"  # the run/experiment description the UI shows (markdown)
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
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


# --run-name of the command being run: taken by the first run it opens (a pipeline's parent, not its stages)
_RUN_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_name", default=None)


def _store_run_name(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    _RUN_NAME.set(value or None)


run_name_option = click.option(
    "--run-name", default=None, expose_value=False, callback=_store_run_name,
    help="Name of the MLflow run (default: from the stage, its data and its key options).")


def take_run_name(default: str) -> str:
    """The --run-name given on the command line (once), else ``default``."""
    name = _RUN_NAME.get()
    _RUN_NAME.set(None)
    return name or default


_EXPERIMENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("experiment_id", default=None)


def connect(tracking_uri: str | None, experiment: str | None = DEFAULT_EXPERIMENT, read_only: bool = False) -> None:
    """Point MLflow at ``tracking_uri`` and ``experiment``; a dead server is a one-line error within seconds.
    ``read_only``: only point at the store (torchrun's other ranks, which read runs but never write)."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    _check_store_holds_runs(uri)
    if read_only:
        mlflow.set_tracking_uri(uri)
        return
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
        with _sqlite_setup_lock(uri):
            exp = mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT)
            _EXPERIMENT_ID.set(exp.experiment_id)
            for key, value in EXPERIMENT_TAGS.items():  # once: a user's own description or kind is kept
                if key not in exp.tags:
                    mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    except Exception as exc:  # noqa: BLE001 - any store failure becomes one line
        raise UserError(f"cannot use MLflow tracking store {uri}: {_first_line(exc)}") from None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (query options dropped); None for other stores."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None


def _sqlite_setup_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock held while MLflow opens a SQLite store: MLflow creates a new database's tables and migrates an old
    one's in steps that two processes must not take at once (two commands started together on a fresh
    ``mlflow.db``, e.g. a job array or two terminals, otherwise fail with "table ... already exists"). The lock
    is a hidden file beside the database; other stores need none."""
    db = sqlite_file(uri)
    if db is None or not db.parent.is_dir():
        return contextlib.nullcontext()  # MLflow's own error names the missing folder
    from filelock import FileLock

    return FileLock(db.with_name(f".{db.name}.lock"))


def _check_store_holds_runs(uri: str) -> None:
    """A command given a run (``--*-run-id``, ``--resume``, ``--init-from``) and pointed at a SQLite store that
    does not exist was run from another folder than the stage it names: say so, rather than create an empty
    ``mlflow.db`` here and then report the run as not found."""
    db = sqlite_file(uri)
    if db is None:
        return
    ctx = click.get_current_context(silent=True)
    named = [(param.opts[0], ctx.params.get(param.name)) for param in (ctx.command.params if ctx else ())
             if param.name.endswith("run_id") or param.name == "init_from"]
    named = [(flag, value) for flag, value in named if value and isinstance(value, str)]
    if named and not db.exists():
        flag, value = named[0]
        raise UserError(f"no MLflow tracking database at {db.resolve()}, so {flag} {value} "
                        "cannot be found; run this command in the folder where the earlier stage ran, or pass "
                        "that store's --tracking-uri (or set MLFLOW_TRACKING_URI)")


EXPERIMENT_NOTE = """Runs of **taming-mlflow** (VQGAN tokenizer + transformer, Esser et al. 2021).

Each stage is a run, tagged `stage`: `vqvae` (tokenizer) → `quantize` (dataset as code grids) → `transformer` \
→ `generate` (samples, with a picture) → `decode` (one PNG per sample). A `pipeline` or `demo` is one parent run \
with its stages nested below it: expand its row. Every run's description links the run it was built from and \
gives the command that reproduces it; the Models column holds the tokenizer and generator as MLflow models."""
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model training
EXPERIMENT_TAGS = {NOTE_TAG: EXPERIMENT_NOTE, "mlflow.experimentKind": "custom_model_development"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def resolve_run_id(ref: str) -> str:
    """A run ID as given, or the source run of a registered model version (``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not ref.startswith("models:/"):
        return ref
    match = MODEL_URI.match(ref)
    if not match:
        raise UserError(f"{ref!r} is not a model URI; use models:/NAME/VERSION or models:/NAME@ALIAS")
    client, name = mlflow.MlflowClient(), match["name"]
    try:
        version = (client.get_model_version(name, match["version"]) if match["version"]
                   else client.get_model_version_by_alias(name, match["alias"]))
    except MlflowException:
        raise UserError(f"no registered model version {ref} in {mlflow.get_tracking_uri()}; register one with "
                        "--register NAME, or check the name, version or alias") from None
    if not version.run_id:
        raise UserError(f"{ref} was not logged by a run of this toolkit; pass a run ID instead")
    return version.run_id


def run_id_fields(cfg: Any) -> list[str]:
    """Config fields that name another run (they accept ``models:/`` URIs; the run link replaces the param)."""
    return [f.name for f in dataclasses.fields(cfg) if f.name == "run_id" or f.name.endswith("_run_id")]


def resolve_run_ids(cfg: Any) -> Any:
    """``cfg`` with every ``models:/`` URI in its run-ID fields replaced by the model's source run ID."""
    return dataclasses.replace(cfg, **{name: resolve_run_id(getattr(cfg, name)) for name in run_id_fields(cfg)
                                       if getattr(cfg, name)})


def run_params(cfg: Any) -> dict[str, Any]:
    """The MLflow params of a stage config: options that apply, without run IDs (the description links them)."""
    from core.options import config_params

    ids = set(run_id_fields(cfg))
    return {k: v for k, v in config_params(cfg).items() if k not in ids}


def get_run(run_id: str, stage: str | None = None):
    """Fetch a run (or a ``models:/`` URI's source run), checking it exists and (if given) that it belongs to
    ``stage``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = resolve_run_id(run_id)
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


def check_resumed_data(run_id: str, manifest: str | Path, restart: str) -> None:
    """``--resume`` continues a run on the data it started on: a manifest whose images changed since (added,
    removed or edited files) would leave a quantize run's codes out of step with its index, and a training run
    tagged with data it did not train on (pipelines reuse runs by that tag). ``restart``: what to do instead."""
    from core.data import data_fingerprint

    started = get_run(run_id).data.tags.get("data_fingerprint")
    if started and started != data_fingerprint(manifest):
        raise UserError(f"the images of manifest {manifest} changed since run {run_id} started (files added, "
                        f"removed or edited); --resume continues a run only on its own data: {restart}")


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


STAGE_SECTIONS = {"vqvae": "vqvae", "quantize": "quantize", "transformer": "train", "generate": "generate",
                  "decode": "decode", "pipeline": "pipeline"}  # run names start with these
GENERIC_MANIFEST_NAMES = {"manifest", "index", "data", "dataset", "labels", "train", "images"}


def data_name(manifest: str | Path) -> str:
    """A short name for a dataset: the manifest's file name, or its folder's when the file name is generic."""
    path = Path(manifest)
    name = path.parent.name if path.stem.lower() in GENERIC_MANIFEST_NAMES else path.stem
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "data"


def run_page(experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, relative to its root, in MLflow 3's "Model training" view: without
    ``workflowType`` a page opened afresh (a description's links open a new tab) shows the GenAI navigation."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_link(run) -> str:
    """A markdown link to a run that works inside the MLflow UI."""
    return f"[{run.info.run_name or run.info.run_id}]({run_page(run.info.experiment_id, run.info.run_id)})"


def command_line(command: str, cfg: Any) -> str:
    """The `python cli.py ...` command that makes a run with ``cfg`` (options left at their default omitted),
    one option per line (``\\`` continuations): a long command stays readable in the run's description."""
    import shlex

    words = ["python", "cli.py", command]
    first = {"manifest", *run_id_fields(cfg)}  # what the run was made from, then the options
    for f in sorted(dataclasses.fields(cfg), key=lambda f: f.name not in first):
        value, applies = getattr(cfg, f.name), f.metadata.get("applies")
        if value in (None, "", ()) or value == f.default or (applies is not None and not applies(cfg)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif f.metadata.get("multiple"):
            for item in value:
                words += [flag, shlex.quote(str(item))]
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words += [flag, shlex.quote(text)]
    return wrap_command(words)


def wrap_command(words: list[str]) -> str:
    """Shell words as a command with one option (and its value) per line, joined by ``\\`` continuations."""
    lines: list[list[str]] = [[]]
    for word in words:
        if word.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(word)
    return " \\\n    ".join(" ".join(line) for line in lines)


def describe(stage: str, data: str | None, upstream: list, command: str | None, extra: str = "") -> str:
    """A run's description: what it is, the runs it was built from (links), how to make it again."""
    lines = [f"**{STAGE_TITLES[stage]}**" + (f" on `{data}`" if data else "") + f" · stage `{stage}`"]
    if upstream:
        lines.append("Built from: " + ", ".join(f"{r.data.tags.get('stage', 'run')} run {run_link(r)}"
                                               for r in upstream))
    if extra:
        lines.append(extra)
    if command:
        lines.append(f"Reproduce (code version `{code_version()[:12]}`):\n\n```bash\n{command}\n```")
    return "\n\n".join(lines)


def unique_run_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... if the active experiment already has a run of that name."""
    import mlflow
    from mlflow.entities import ViewType

    active = mlflow.active_run()  # a pipeline's stages go to its experiment
    experiment_id = active.info.experiment_id if active else _EXPERIMENT_ID.get()
    if experiment_id is None:
        return name
    quoted = name.replace("'", "\\'")
    taken = {r.info.run_name for r in mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}%'",
        output_format="list", run_view_type=ViewType.ALL)}  # deleted runs too: they can be restored
    n = 2
    candidate = name
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


@contextlib.contextmanager
def stage_run(stage: str, cfg: Any = None, upstream_run_id: str | None = None, resume_run_id: str | None = None,
              enabled: bool = True, name: tuple[str, ...] = (), data: str | None = None,
              echo: bool = True, upstream_stage: str | None = None, drop_params: tuple[str, ...] = ()
              ) -> Iterator[Any]:
    """Open (or resume) the stage's MLflow run; mark it FAILED/KILLED on errors; print its ID last on stdout.

    A new run is named ``SECTION-DATA-NAME...`` (or --run-name), nested under the active run (a pipeline's
    parent) if any, tagged with its data name (``data``, else the upstream run's), and described in markdown
    (what it is, a link to its upstream run, the command that reproduces it). ``cfg`` gives the params (less
    ``drop_params``, options that do not apply to the input at hand). The upstream run is checked (it exists;
    it is a ``upstream_stage`` run) before the run is created: a mistake leaves no run behind. A name already
    taken in the experiment gets a ``-2``, ``-3``... suffix. A config with ``system_metrics`` set logs MLflow's
    system metrics (CPU, memory, GPU when pynvml is installed) while the run is open.
    ``enabled=False`` (non-zero ranks of a distributed job) yields None and never touches MLflow.
    """
    import mlflow

    if not enabled:
        yield None
        return
    system_metrics = bool(getattr(cfg, "system_metrics", False))
    if system_metrics and importlib.util.find_spec("psutil") is None:  # MLflow's monitor needs it
        system_metrics = False
    if resume_run_id:
        # the run stays in its own experiment, whatever --experiment says (MLflow refuses a mismatch)
        resume_run_id = get_run(resume_run_id, stage).info.run_id
        mlflow.set_experiment(experiment_id=get_run(resume_run_id).info.experiment_id)
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
        mlflow.set_tag("resumed", "true")
        renamed = take_run_name("")
        if renamed:  # --run-name when resuming renames the run
            mlflow.set_tag("mlflow.runName", renamed)
    else:
        upstream = get_run(upstream_run_id, upstream_stage) if upstream_run_id else None  # before the run exists
        data = data or (upstream.data.tags.get("data") if upstream else None)
        tags = {"stage": stage, "code_version": code_version()}
        if data:
            tags["data"] = data
        if upstream_run_id:
            tags["upstream_run_id"] = upstream.info.run_id
        command = command_line(STAGE_COMMANDS.get(stage, stage), cfg) if cfg is not None else None
        tags[NOTE_TAG] = describe(stage, data, [upstream] if upstream else [], command)
        run_name = unique_run_name(take_run_name("-".join([STAGE_SECTIONS[stage], *([data] if data else []),
                                                           *name])))
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=mlflow.active_run() is not None,
                               log_system_metrics=system_metrics)
        if cfg is not None:
            mlflow.log_params({k: v for k, v in run_params(cfg).items() if k not in drop_params})
    if getattr(cfg, "system_metrics", False) and not system_metrics:
        mlflow.set_tag("system_metrics_note", "not logged: psutil is not installed (pip install psutil)")
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
    if echo:
        click.echo(run_id)  # last stdout line: lets shells chain stages with $(... | tail -n1)


_DOWNLOADS: list[Path] = []  # this process's download folder, made on first use


def download_folder() -> Path:
    """One folder per process for downloaded artifacts, removed when the process exits: a day of stages does not
    fill the temp folder (MLflow would make a new temp folder per download and never remove it)."""
    import atexit
    import shutil

    if not _DOWNLOADS or not _DOWNLOADS[0].is_dir():
        folder = Path(tempfile.mkdtemp(prefix="taming-downloads-"))
        owner = os.getpid()  # forked workers inherit the list but must not remove their parent's folder
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
        _DOWNLOADS[:] = [folder]
    return _DOWNLOADS[0]


def download(run_id: str, artifact_path: str, dst: str | Path | None = None) -> Path:
    """Download an artifact (file or folder) of a run; a missing artifact is a one-line error.

    Without ``dst`` it lands at ``download_folder()/RUN_ID/ARTIFACT_PATH``: downloading it again replaces it
    (by rename, so a file still open or memory-mapped from the last download stays intact) instead of adding
    a copy."""
    import shutil

    import mlflow
    from mlflow.exceptions import MlflowException

    staging = None
    if dst is None:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=download_folder()))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst or staging))
        except (MlflowException, OSError) as exc:
            raise UserError(f"run {run_id} has no artifact {artifact_path!r} ({_first_line(exc)}); "
                            "was that stage finished?") from None
        if staging is None:
            return Path(local)
        final = download_folder() / run_id / artifact_path.strip("/")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(local, final)
        return final
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def find_upstream(run_id: str, stage: str, max_hops: int = 6):
    """Follow ``upstream_run_id`` tags from ``run_id`` (or a ``models:/`` URI) until a run of ``stage`` (the run
    itself counts)."""
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


def log_step_image(image, key: str, step: int) -> None:
    """An image logged three times: under ``key`` at ``step`` (the run's image slider in Model metrics), as the
    artifact ``KEY/step_NNNNNN.png`` (a stable name the Artifacts tab lists) and as ``KEY.png``, the latest, at the
    top level: MLflow's Compare view shows only top-level files common to the runs, side by side."""
    import mlflow

    mlflow.log_image(image, key=key, step=step)
    mlflow.log_image(image, f"{key}/step_{step:06d}.png")
    mlflow.log_image(image, f"{key}.png")


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
