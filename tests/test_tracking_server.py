"""The whole chain against a real `mlflow server` (SQLite + proxied artifacts), and a server that is down."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, TINY_GPT, TINY_VQ, error_line, invoke, last_line

START_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A tracking server on a free port for this module; the module is skipped if it does not come up."""
    d = tmp_path_factory.mktemp("server")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{d / 'db'}", "--artifacts-destination", str(d / "art"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=d, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (d / "server.log").read_text()[-500:]
                pytest.skip(f"mlflow server did not become healthy within {START_TIMEOUT} s: {tail}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cli(cwd: Path, *args: str) -> str:
    """A stage as a user runs it, with no MLFLOW_TRACKING_URI in the environment; returns its run ID."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_line(proc.stdout)


def test_chain_runs_against_a_tracking_server(server, dataset, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    remote = ["--tracking-uri", server, "--experiment", "remote"]
    vq = cli(work, "train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2", *remote)
    q = cli(work, "quantize", "--vqvae-run-id", vq, "--num-workers", "0", *remote)
    t = cli(work, "train", "--quantize-run-id", q, *TINY_GPT, *remote)
    g = cli(work, "generate", "--transformer-run-id", t, "--num-samples", "2", *remote)
    dec = cli(work, "decode", "--run-id", g, *remote)
    assert not list(work.iterdir()), "nothing may be tracked locally"  # e.g. a stray ./mlflow.db or ./mlruns

    # a fresh process elsewhere pulls artifacts by run ID alone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys, mlflow\n"
              "for run_id, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    print(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path='.'))\n")
    proc = subprocess.run([sys.executable, "-c", script, dec, "grid.png", vq, "checkpoints/latest.json"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": server})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"step": 2' in (elsewhere / "latest.json").read_text()


def test_a_server_that_is_down_fails_fast(tracking_dir, dataset):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "1", "--tracking-uri", down)
    assert time.monotonic() - t0 < 30
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert error_line(res.stderr).startswith(f"Error: cannot reach the MLflow tracking server at {down}")


def test_a_server_that_never_answers_fails_in_bounded_time(tracking_dir):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        res = invoke("quantize", "--vqvae-run-id", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri)
        assert time.monotonic() - t0 < 30
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert error_line(res.stderr).startswith(f"Error: cannot reach the MLflow tracking server at {uri}")


MISSING = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("args", [
    ["quantize", "--vqvae-run-id", MISSING], ["train", "--quantize-run-id", MISSING],
    ["train", "--resume", MISSING], ["train-vqvae", "--resume", MISSING, "--max-steps", "9"],
    ["generate", "--transformer-run-id", "models:/gen@champion"], ["decode", "--run-id", MISSING],
    ["evaluate", "--vqvae-run-id", MISSING], ["register", "--run-id", MISSING, "--name", "tok"],
    ["export-vqvae", "--run-id", MISSING, "--format", "taming", "--out", "x.ckpt"]], ids=lambda a: a[0] + a[1])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_run_named_in_a_folder_without_the_database(tmp_path, monkeypatch, args, how):
    """The usual cause of "run not found": a later stage started in another folder, where the default
    sqlite:///mlflow.db does not exist. Say that, name the option, and do not leave an empty database behind."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri if how == "environment" else "sqlite:///unused.db")
    res = invoke(*args, *(["--tracking-uri", uri] if how == "option" else []))
    assert res.exit_code == 1, res.output
    line = error_line(res.stderr)
    assert line.startswith(f"Error: no MLflow tracking database at {tmp_path / 'elsewhere.db'}, so {args[1]} "), line
    assert "--tracking-uri" in line and not list(tmp_path.iterdir())


CONNECT_AT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from core.tracking import connect
import mlflow
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # every process opens the store at the same moment
connect(sys.argv[2], "together")
with mlflow.start_run():
    mlflow.log_param("p", 1)
"""


def test_commands_started_together_on_a_fresh_database(tmp_path):
    """A job array, or two terminals, starting stages at once in a new folder: MLflow builds a fresh SQLite
    store's tables in migration steps that raced ("table ... already exists", "duplicate column name") and
    failed every process but one. Each must get its run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 8  # past every process's imports
    procs = [subprocess.Popen([sys.executable, "-c", CONNECT_AT, str(ROOT), uri, str(start)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e.strip().splitlines()[-1] for e in errors if e)
    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("together")
                                                 .experiment_id])
    assert len(runs) == 3
