"""What a user sees in the MLflow UI, checked through the client on one small pipeline: names, nesting,
descriptions that link upstream runs, readable images, prefixed metrics, meaningful params, models and models:/."""
from __future__ import annotations

import math
import re

import mlflow
import pytest
from PIL import Image

from conftest import TINY_VQ, error_line, invoke, last_line, run_cli
from test_pipeline import SECTIONS, TINY_TOML

STAGE_TAGS = dict(zip(SECTIONS, ["vqvae", "quantize", "transformer", "generate", "decode"]))
METRIC_PREFIXES = ("train/", "val/", "data/", "eval/", "quantize/", "generate/")
RUN_ID_PARAMS = {"vqvae_run_id", "quantize_run_id", "transformer_run_id", "run_id"}


@pytest.fixture(scope="module")
def pipeline_runs(tracking_dir, dataset, tmp_path_factory) -> dict[str, mlflow.entities.Run]:
    config = tmp_path_factory.mktemp("ux") / "pipeline.toml"
    config.write_text(TINY_TOML)
    res = invoke("pipeline", "--manifest", dataset, "--config", config, "--experiment", "ux")
    assert res.exit_code == 0, res.output
    ids = {words[0]: words[-1] for words in map(str.split, res.stdout.splitlines()) if len(words) >= 2}
    client = mlflow.MlflowClient()
    return {section: client.get_run(ids[section]) for section in [*SECTIONS, "pipeline"]}


def test_runs_are_named_from_stage_and_data_and_distinct(pipeline_runs):
    names = {s: pipeline_runs[s].info.run_name for s in [*SECTIONS, "pipeline"]}
    assert len(set(names.values())) == len(names), names
    for section, name in names.items():
        assert name.startswith(f"{section}-"), names
    data = pipeline_runs["vqvae"].data.tags["data"]
    assert all(f"-{data}" in name for name in names.values()), names
    assert names["vqvae"] == f"vqvae-{data}-16px-K32"


def test_pipeline_parent_holds_its_stages_as_nested_children(pipeline_runs):
    parent = pipeline_runs["pipeline"]
    assert parent.data.tags["stage"] == "pipeline" and parent.info.status == "FINISHED"
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGE_TAGS.values())
    for section in SECTIONS:
        assert parent.data.tags[f"run_id.{section}"] == pipeline_runs[section].info.run_id
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"grid.png", "pipeline_settings.json", "pipeline.toml"} <= artifacts
    note = parent.data.tags["mlflow.note.content"]
    for section in SECTIONS:  # every stage linked, by ID
        assert f"/runs/{pipeline_runs[section].info.run_id}?workflowType=machine_learning)" in note


def test_each_description_links_its_upstream_run_and_reproduces_it(pipeline_runs):
    for prev, section in zip(SECTIONS, SECTIONS[1:]):
        run, up = pipeline_runs[section], pipeline_runs[prev]
        assert run.data.tags["upstream_run_id"] == up.info.run_id  # the contract tag stays
        note = run.data.tags["mlflow.note.content"]
        # in the "Model training" view: a link opens a new tab, which would show MLflow 3's GenAI navigation
        assert f"(#/experiments/{up.info.experiment_id}/runs/{up.info.run_id}?workflowType=machine_learning)" in note
        assert re.search(rf"python cli.py {'train' if section == 'train' else section} ", note), note
    note = pipeline_runs["vqvae"].data.tags["mlflow.note.content"]
    assert "python cli.py train-vqvae \\\n    --manifest" in note
    command = note.split("```bash\n")[1].split("\n```")[0].splitlines()  # one option per line, continued
    assert len(command) > 5 and all(line.endswith(" \\") for line in command[:-1]), command
    assert all(re.fullmatch(r"    --[\w-]+( \S+)?( \\)?", line) for line in command[1:]), command


def test_pipeline_run_carries_the_headline_params_and_metrics_of_its_stages(pipeline_runs):
    parent, vq, train = (pipeline_runs[s].data for s in ("pipeline", "vqvae", "train"))
    assert parent.params["data"] == vq.tags["data"]
    assert {k: parent.params[k] for k in ("vqvae.image_size", "vqvae.codebook_size", "vqvae.max_steps",
                                          "train.n_layer", "train.n_embd", "train.max_steps")} == \
        {"vqvae.image_size": "16", "vqvae.codebook_size": "32", "vqvae.max_steps": "2", "train.n_layer": "1",
         "train.n_embd": "16", "train.max_steps": "2"}
    assert parent.params["train.num_params"] == train.params["num_params"]
    # generate's defaults are decided at run time (a conditional model: guidance 5, top-k 2% of 32 codes, at least 5):
    # the values used (the unset options themselves are not logged)
    gen = pipeline_runs["generate"].data.params
    assert (gen["cfg_scale_used"], gen["top_k_used"]) == ("5.0", "5")
    assert (parent.params["generate.cfg_scale"], parent.params["generate.top_k"]) == ("5.0", "5")
    assert "vqvae.fsq_levels" not in parent.params  # a VQ tokenizer: only the params its run has
    assert parent.metrics == {
        "tokenizer/val_psnr": vq.metrics["val/psnr"], "tokenizer/val_codebook_usage": vq.metrics["val/codebook_usage"],
        "transformer/val_loss": train.metrics["val/loss"],
        "generate/mean_logprob_per_token": pipeline_runs["generate"].data.metrics["generate/mean_logprob_per_token"]}


def test_generate_run_holds_a_readable_sample_grid(pipeline_runs, tmp_path):
    run_id = pipeline_runs["generate"].info.run_id
    with Image.open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="grid.png",
                                                        dst_path=str(tmp_path))) as img:
        assert img.width >= 512 and img.height >= 64


def test_metric_keys_carry_a_stage_prefix_and_inactive_terms_are_not_logged(pipeline_runs):
    for section in SECTIONS:
        keys = pipeline_runs[section].data.metrics
        assert keys and all(k.startswith(METRIC_PREFIXES) for k in keys), (section, sorted(keys))
    vq = pipeline_runs["vqvae"].data.metrics  # no LPIPS, GAN never on within 2 steps
    assert "train/rec_loss" in vq and "train/q_loss" in vq
    assert not {"train/p_loss", "train/nll_loss", "train/g_loss", "train/d_weight", "train/d_loss"} & set(vq)


def test_params_apply_to_the_chosen_options(pipeline_runs):
    vq = pipeline_runs["vqvae"].data.params
    assert "codebook_size" in vq and "fsq_levels" not in vq  # quantizer vq
    assert ("ema_decay" in vq) == (vq["ema"] == "True")  # the EMA decay only for an EMA codebook
    for section in SECTIONS:
        params = pipeline_runs[section].data.params
        assert "" not in params.values() and not RUN_ID_PARAMS & set(params), (section, params)
    # decoding a generate run's 4 samples: no quantize split, no limit that cuts nothing
    assert not {"split", "max_images"} & set(pipeline_runs["decode"].data.params)
    assert pipeline_runs["decode"].data.params["nrow"] == "2"


def test_training_runs_log_models_from_code_without_pickles(pipeline_runs, tmp_path):
    import pandas as pd

    from core.mlflow_models import image_from_base64

    for section, name, val in (("vqvae", "tokenizer", "val/psnr"), ("train", "generator", "val/loss")):
        run_id = pipeline_runs[section].info.run_id
        models = mlflow.search_logged_models(experiment_ids=[pipeline_runs[section].info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'", output_format="list")
        assert [m.name for m in models] == [name]
        # the model carries its weights' validation metrics (the last step's), each once
        carried = [(m.key, m.value, m.step) for m in models[0].metrics]
        assert (val, pipeline_runs[section].data.metrics[val], 2) in carried, carried
        assert len(carried) == len(set(carried)) and "data/train_images" not in {k for k, _, _ in carried}
        local = mlflow.artifacts.download_artifacts(models[0].model_uri, dst_path=str(tmp_path / name))
        files = {p.name for p in __import__("pathlib").Path(local).rglob("*") if p.is_file()}
        assert "weights.safetensors" in files and "config.json" in files
        assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".cloudpickle"))], files
    generator = mlflow.pyfunc.load_model(models[0].model_uri)
    out = generator.predict(pd.DataFrame([{"label": "blue", "num_samples": 2, "seed": 3}]))
    assert list(out.label) == ["blue", "blue"]
    assert image_from_base64(out.image[0]).size == (16, 16)


def test_register_then_pass_models_uri_to_a_stage(tracking_dir, dataset):
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "2", "--register", "ux-tok",
                 "--experiment", "ux-registry")
    assert res.exit_code == 0, res.output
    vq = last_line(res.stdout)
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'ux-tok'")
    assert [v.run_id for v in versions] == [vq]
    client.set_registered_model_alias("ux-tok", "prod", versions[0].version)
    for ref, name in (("models:/ux-tok@prod", "q-by-alias"), (f"models:/ux-tok/{versions[0].version}",
                                                               "q-by-alias-2")):  # names stay unique
        res = invoke("quantize", "--vqvae-run-id", ref, "--num-workers", "0", "--run-name", "q-by-alias",
                     "--experiment", "ux-registry")
        assert res.exit_code == 0, res.output
        run = client.get_run(last_line(res.stdout))
        assert run.data.tags["upstream_run_id"] == vq and run.info.run_name == name
        assert f"/runs/{vq}?workflowType=machine_learning)" in run.data.tags["mlflow.note.content"]
    # --resume and --init-from take model references too
    res = invoke("train-vqvae", "--resume", "models:/ux-tok@prod", "--max-steps", "3")
    assert res.exit_code == 0 and last_line(res.stdout) == vq, res.output
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "1", "--init-from", "models:/ux-tok/1",
                 "--experiment", "ux-registry")
    assert res.exit_code == 0, res.output
    assert client.get_run(last_line(res.stdout)).data.tags["init_from"] == vq


def test_register_a_finished_run_without_training_again(pipeline_runs, tmp_path):
    import pandas as pd
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    client = mlflow.MlflowClient()
    vq, train = pipeline_runs["vqvae"].info.run_id, pipeline_runs["train"].info.run_id
    res = invoke("register", "--run-id", vq, "--name", "ux-reg-tok", "--alias", "champion")
    assert res.exit_code == 0, res.output
    assert last_line(res.stdout) == "models:/ux-reg-tok/1"
    assert client.get_model_version_by_alias("ux-reg-tok", "champion").run_id == vq
    res = invoke("register", "--run-id", vq, "--name", "ux-reg-tok")  # once is enough: the same version
    assert res.exit_code == 0 and last_line(res.stdout) == "models:/ux-reg-tok/1", res.output
    assert len(client.search_model_versions("name = 'ux-reg-tok'")) == 1
    res = invoke("register", "--run-id", train, "--name", "ux-reg-gen", "--alias", "prod")
    assert res.exit_code == 0 and last_line(res.stdout) == "models:/ux-reg-gen/1", res.output
    # served with every default: the empty record {} asks for one image (parsed as the scoring server does)
    model = mlflow.pyfunc.load_model("models:/ux-reg-gen@prod")
    request = infer_and_parse_data({"dataframe_records": [{}]}, model.metadata.get_input_schema())
    out = model.predict(request)
    assert len(out) == 1 and out.label[0] == "blue" and out.image[0]  # the first class
    assert len(model.predict(pd.DataFrame([{"num_samples": 2}]))) == 2
    # mistakes: one line, nothing registered
    for args, expect in ((["--run-id", pipeline_runs["quantize"].info.run_id], "register takes a tokenizer"),
                         (["--run-id", "0123456789abcdef0123456789abcdef"], "not found"),
                         (["--run-id", vq, "--alias", "v2"], "is not a valid alias")):
        proc = run_cli("register", *args, "--name", "ux-reg-bad")
        assert proc.returncode == 1 and expect in error_line(proc.stderr), proc.stderr
    assert not client.search_registered_models("name = 'ux-reg-bad'")


def test_training_runs_log_system_metrics_unless_turned_off(tracking_dir, dataset):
    pytest.importorskip("psutil")  # in requirements.txt: MLflow's system metrics need it
    client = mlflow.MlflowClient()
    mlflow.set_system_metrics_sampling_interval(0.2)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        runs = {}
        for flag in ("--system-metrics", "--no-system-metrics"):
            res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "6", "--lr-warmup-steps",
                         "2", "--lr-schedule", "cosine", flag, "--experiment", "ux-system")
            assert res.exit_code == 0, res.output
            runs[flag] = client.get_run(last_line(res.stdout))
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    on, off = runs["--system-metrics"].data, runs["--no-system-metrics"].data
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(on.metrics)
    assert not [k for k in off.metrics if k.startswith("system/")] and off.params["system_metrics"] == "False"
    # the learning rate is charted: the warm-up ramp, then the cosine decay from --lr to --min-lr 0 at --max-steps
    lr = client.get_metric_history(runs["--system-metrics"].info.run_id, "train/lr")
    cosine = [3e-4 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [m.step for m in lr] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in lr] == pytest.approx([1.5e-4, 3e-4, *cosine])


def test_constant_lr_is_charted_only_while_the_warmup_ramps_it(tracking_dir, dataset):
    # the default, official constant rate: after the warm-up a chart would be a flat line
    # (with the codebook-entropy loss on, as an option of the same real training loop: it trains, and its two
    # options are logged as params, the temperature only where the loss is on)
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "6", "--lr-warmup-steps", "2",
                 "--entropy-weight", "0.05", "--no-system-metrics", "--experiment", "ux-lr-constant")
    assert res.exit_code == 0, res.output
    lr = mlflow.MlflowClient().get_metric_history(last_line(res.stdout), "train/lr")
    assert [(m.step, m.value) for m in lr] == [(1, 1.5e-4), (2, 3e-4), (3, 3e-4)]
    params = mlflow.MlflowClient().get_run(last_line(res.stdout)).data.params
    assert params["entropy_weight"] == "0.05" and params["entropy_temperature"] == "0.1"


def test_no_lr_chart_when_the_warmup_fits_in_one_logging_interval(tracking_dir, dataset):
    # the demo's tokenizer (warm-up 20, log every 20) charted two points at the peak: a flat line the UI reads as 0
    res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "4", "--lr-warmup-steps", "2",
                 "--log-every", "2", "--no-system-metrics", "--experiment", "ux-lr")
    assert res.exit_code == 0, res.output
    run = mlflow.MlflowClient().get_run(last_line(res.stdout))
    assert "train/lr" not in run.data.metrics and "train/total_loss" in run.data.metrics
    assert run.data.params["lr_warmup_steps"] == "2"  # the schedule stays readable as params
    assert run.data.params["entropy_weight"] == "0.0" and "entropy_temperature" not in run.data.params


def test_unknown_model_reference_is_a_one_line_error(tracking_dir):
    proc = run_cli("quantize", "--vqvae-run-id", "models:/no-such-model@prod")
    assert proc.returncode == 1
    assert "no registered model version models:/no-such-model@prod" in error_line(proc.stderr)


def test_grids_are_upscaled_sharp_and_labelled():
    import torch

    from core.images import comparison_grid, grid_image

    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).view(4, 3, 8, 8)
    plain = grid_image(images, nrow=2)
    assert plain.width >= 512 and plain.size == (2 * (8 * 32 + 2) + 2,) * 2  # 8 px tiles x32: grid >= 512 wide
    tile = torch.tensor(plain.getchannel(0).getdata()).view(plain.height, plain.width)[2:2 + 256, 2:2 + 256]
    assert len(tile.unique()) == len((images[0, 0] + 1).mul(127.5).round().unique())  # nearest: no new values
    captioned = grid_image(images, nrow=4, captions=["a", "b", "c", "d"])
    assert captioned.height > grid_image(images, nrow=4).height  # room for the captions
    pairs = comparison_grid(images, images.flip(0))
    assert pairs.width > grid_image(torch.cat([images, images]), nrow=4).width  # row names on the left


def test_readme_download_snippet_works_from_another_folder(pipeline_runs, tracking_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in readme.split("```python\n")[1:] if "download_artifacts" in b).split("```")[0]
    lines = block.splitlines()
    snippet = "\n".join(lines[: next(i for i, line in enumerate(lines) if "download_artifacts" in line) + 1])
    uri = re.search(r'set_tracking_uri\("([^"]+)"\)', snippet).group(1)
    snippet = snippet.replace(uri, f"sqlite:///{tracking_dir / 'mlflow.db'}").replace(
        "RUN_ID", repr(pipeline_runs["generate"].info.run_id))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # as in a user's fresh shell
    proc = subprocess.run([sys.executable, "-c", snippet + "\nprint(path)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file() and Path(proc.stdout.strip()) == (tmp_path / "grid.png").resolve()
    assert not (tmp_path / "mlflow.db").exists()  # no stray empty store left behind
