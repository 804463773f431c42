"""pipeline: stages chained from a config file, identical finished stages reused, re-runs from a changed stage."""
from __future__ import annotations

import tomllib
from pathlib import Path

import mlflow
import pytest

from conftest import invoke, last_line

TINY_TOML = """
[vqvae]
image-size = 16
ch = 16
ch-mult = [1, 2]
z-channels = 8
embed_dim = 8
codebook-size = 32
perceptual-weight = 0
disc-start = 1000
batch-size = 8
max-steps = 2
log-every = 1
val-every = 2
ckpt-every = 2
val-batches = 1

[quantize]
num-workers = 0

[train]
n-layer = 1
n-head = 2
n-embd = 16
max-steps = 2
batch-size = 4
lr-warmup-steps = 1
log-every = 1
val-every = 2
sample-every = 0
ckpt-every = 2

[generate]
num-samples = 4

[decode]
nrow = 2
"""
SECTIONS = ["vqvae", "quantize", "train", "generate", "decode"]


def pipeline(*args, experiment: str):
    res = invoke("pipeline", *args, "--experiment", experiment)
    assert res.exit_code == 0, res.output
    lines = [line.split() for line in res.stdout.splitlines()]
    stages = {words[0]: (words[1], words[2]) for words in lines if len(words) == 3}
    assert list(stages) == SECTIONS
    assert last_line(res.stdout) == stages["decode"][1]
    return {s: run_id for s, (_, run_id) in stages.items()}, {s: action for s, (action, _) in stages.items()}


def num_runs(experiment: str) -> int:
    """Stage runs (each pipeline also opens a parent run, tag stage=pipeline)."""
    return len(mlflow.search_runs(experiment_names=[experiment], filter_string="tags.stage != 'pipeline'",
                                  output_format="list"))


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text(TINY_TOML)
    return path


def test_reuses_finished_stages_and_reruns_from_the_changed_one(tracking_dir, dataset, config):
    exp = "pipeline-reuse"
    args = ("--manifest", dataset, "--config", config)
    first, actions = pipeline(*args, experiment=exp)
    assert set(actions.values()) == {"ran"}
    client = mlflow.MlflowClient()
    tags = {s: client.get_run(first[s]).data.tags for s in SECTIONS}
    assert [tags[s]["stage"] for s in SECTIONS] == ["vqvae", "quantize", "transformer", "generate", "decode"]
    assert "upstream_run_id" not in tags["vqvae"]
    assert all(tags[s]["upstream_run_id"] == first[prev] for prev, s in zip(SECTIONS, SECTIONS[1:]))
    assert client.get_run(first["vqvae"]).data.params["manifest"] == str(dataset.resolve())

    # a standalone run with the same options is the user's own: the pipeline keeps reusing its own stages
    vq_options = [w for k, v in tomllib.loads(TINY_TOML)["vqvae"].items()
                  for w in (f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v))]
    res = invoke("train-vqvae", "--manifest", dataset, *vq_options, "--experiment", exp)
    assert res.exit_code == 0, res.output
    standalone = last_line(res.stdout)
    assert client.get_run(standalone).data.params == client.get_run(first["vqvae"]).data.params
    assert client.get_run(standalone).info.run_name == client.get_run(first["vqvae"]).info.run_name + "-2"

    again, actions = pipeline(*args, experiment=exp)
    assert again == first and set(actions.values()) == {"reused"}
    assert num_runs(exp) == 5 + 1
    # the second pipeline's parent links the reused runs (tags, description) without adopting them as children
    parent = mlflow.search_runs(experiment_names=[exp], filter_string="tags.stage = 'pipeline'",
                                order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert all(parent.data.tags[f"run_id.{s}"] == first[s] for s in SECTIONS)
    assert parent.data.tags["mlflow.note.content"].count("reused") == 5
    assert not mlflow.search_runs(experiment_names=[exp], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")

    new_seed, actions = pipeline(*args, "--set", "generate.seed=1", experiment=exp)
    assert [actions[s] for s in SECTIONS] == ["reused"] * 3 + ["ran"] * 2
    assert [new_seed[s] == first[s] for s in SECTIONS] == [True] * 3 + [False] * 2

    longer, actions = pipeline(*args, "--set", "train.max_steps=3", experiment=exp)
    assert [actions[s] for s in SECTIONS] == ["reused"] * 2 + ["ran"] * 3
    assert client.get_run(longer["train"]).data.params["max_steps"] == "3"
    assert num_runs(exp) == 6 + 2 + 3

    forced, actions = pipeline(*args, "--force", experiment=exp)
    assert set(actions.values()) == {"ran"} and not set(forced.values()) & set(first.values())


def test_failed_stage_stops_with_one_line_and_a_rerun_continues(tracking_dir, dataset, config, tmp_path):
    exp = "pipeline-failure"
    yaml_config = tmp_path / "pipeline.yaml"  # the same settings as YAML, with one bad value
    yaml_config.write_text("vqvae:\n  image_size: 16\n  ch: 16\n  ch-mult: 1,2\n  z-channels: 8\n  embed-dim: 8\n"
                           "  codebook-size: 32\n  perceptual-weight: 0\n  disc-start: 1000\n  batch-size: 8\n"
                           "  max-steps: 2\n  val-batches: 1\n"
                           "quantize:\n  num_workers: 0\n"
                           "train: {n-layer: 1, n-head: 2, n-embd: 16, max-steps: 2, batch-size: 4, sample-every: 0}\n"
                           "generate:\n  num-samples: 4\n  label: purple\n")
    res = invoke("pipeline", "--manifest", dataset, "--config", yaml_config, "--experiment", exp)
    assert res.exit_code == 1
    assert last_line(res.stderr).startswith("Error: generate stage failed: unknown label 'purple'")
    statuses = {r.data.tags["stage"]: r.info.status for r in mlflow.search_runs(experiment_names=[exp],
                                                                                output_format="list")}
    # the label is checked before the generate run exists: no FAILED generate run, only the pipeline's
    assert statuses == {"vqvae": "FINISHED", "quantize": "FINISHED", "transformer": "FINISHED",
                        "pipeline": "FAILED"}

    _, actions = pipeline("--manifest", dataset, "--config", yaml_config, "--set", "generate.label=red",
                          experiment=exp)
    assert [actions[s] for s in SECTIONS] == ["reused"] * 3 + ["ran"] * 2


@pytest.mark.parametrize("args, message", [
    (["--set", "train.n-layers=2"],
     "unknown option 'n-layers' in [train] of --set (did you mean n-layer?); valid options: n-layer,"),
    (["--set", "sample.seed=2"], "unknown section [sample] in --set; valid sections: vqvae, quantize, train,"),
    (["--set", "train.quantize-run-id=abc"], "unknown option 'quantize-run-id' in [train]"),
    (["--set", "train.max-steps=many"], "[train] max-steps in --set: 'many' is not a valid integer"),
    (["--set", "vqvae.quantizer=pq"], "'pq' is not one of 'vq', 'fsq'"),
    (["--set", "train.max-steps"], "--set expects STAGE.KEY=VALUE"),
    (["--set", "vqvae.ch-mult=1,x"], "expected a comma-separated list of int"),
])
def test_bad_settings_are_one_line_errors(tracking_dir, dataset, config, args, message):
    res = invoke("pipeline", "--manifest", dataset, "--config", config, *args, "--experiment", "pipeline-bad")
    assert res.exit_code == 1, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unknown_key_in_config_file_is_named(tracking_dir, dataset, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nmax-step = 10\n")
    res = invoke("pipeline", "--manifest", dataset, "--config", path)
    assert res.exit_code == 1
    assert f"unknown option 'max-step' in [train] of {path} (did you mean max-steps?); valid options:" in res.stderr


def test_manifest_is_required(tracking_dir, config):
    res = invoke("pipeline", "--config", config)
    assert res.exit_code == 1 and "--manifest is required" in res.stderr


def test_reuse_is_keyed_on_the_data_not_the_manifest_path(tracking_dir, dataset, config, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(dataset.parent, data)
    args = ("--manifest", data / "manifest.csv", "--config", config, "--set", "generate.num-samples=1")
    first, _ = pipeline(*args, experiment="pipeline-data")
    image = sorted((data / "img").glob("*.png"))[0]
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image)  # same path, new pixels
    changed, actions = pipeline(*args, experiment="pipeline-data")
    assert set(actions.values()) == {"ran"}  # the tokenizer onwards: a stale tokenizer is not reused
    assert not set(changed.values()) & set(first.values())


def test_files_in_a_config_are_read_from_its_folder(tmp_path, monkeypatch):
    """A config file names its manifest relative to itself, or under ``~``, which no shell expands in a file (nor in
    ``--set stage.key=~/...``): either way the pipeline finds it from whichever folder it runs in."""
    from workflows.pipeline import parse_set_options, read_config_file

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "conf").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (project / "conf" / "p.toml").write_text('[vqvae]\nmanifest = "../data/m.csv"\n[generate]\ncontext-image = '
                                             '"~/cat.png"\n')
    settings = read_config_file(project / "conf" / "p.toml")
    assert Path(settings["vqvae"]["manifest"]).resolve() == project / "data" / "m.csv"
    assert settings["generate"]["context_image"] == str(tmp_path / "home" / "cat.png")
    (project / "conf" / "p.yaml").write_text(f"vqvae:\n  manifest: {project / 'data' / 'm.csv'}\n")
    assert read_config_file(project / "conf" / "p.yaml")["vqvae"]["manifest"] == str(project / "data" / "m.csv")
    settings = parse_set_options(("vqvae.manifest=~/m.csv", "generate.context-image=cat.png"))
    assert settings == {"vqvae": {"manifest": str(tmp_path / "home" / "m.csv")},
                        "generate": {"context_image": str(tmp_path / "cat.png")}}
