"""demo --quick end to end: digits written, five chained runs, the sample grid fetched, the decode run ID last."""
from __future__ import annotations

import re

import mlflow
import pandas as pd
from PIL import Image

from conftest import invoke, last_line, run_cli

SECTIONS = ["vqvae", "quantize", "train", "generate", "decode"]
STAGE_TAGS = ["vqvae", "quantize", "transformer", "generate", "decode"]


def test_quick_demo_runs_every_stage_and_fetches_the_grid(tracking_dir, tmp_path):
    out = tmp_path / "demo"
    res = invoke("demo", "--quick", "--out", out, "--experiment", "demo-inprocess", "--register", "demo-q")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    stages = [line.split() for line in lines[:5]]
    assert [s[0] for s in stages] == SECTIONS and {s[1] for s in stages} == {"ran"}
    run_ids = [s[2] for s in stages]
    assert last_line(res.stdout) == run_ids[-1]

    manifest = pd.read_csv(out / "digits.csv")
    assert sorted(manifest.label.unique()) == list(range(10)) and set(manifest.split) == {"train", "val"}
    with Image.open(out / manifest.image_path[0]) as img:
        assert img.size == (32, 32)
    grid = out / "grid.png"
    assert f"samples: {grid.resolve()}" in res.stdout
    with Image.open(grid) as img:
        assert img.width == 2 + 10 * 66  # ten digits per row, 32 px upscaled to 64 px tiles
    assert re.search(r"mlflow ui --backend-store-uri sqlite:////\S+mlflow\.db", res.stdout)
    assert re.search(r"then: +http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\?workflowType=machine_learning",
                     res.stdout)

    client = mlflow.MlflowClient()
    runs = [client.get_run(r) for r in run_ids]
    assert [r.data.tags["stage"] for r in runs] == STAGE_TAGS
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.tags.get("upstream_run_id") for r in runs] == [None] + run_ids[:-1]
    assert runs[2].data.params["window_size"] != "0" and runs[2].data.params["num_classes"] == "10"
    assert [r.info.run_name.split("-")[:2] for r in runs] == [[s, "digits"] for s in SECTIONS]
    parent = client.get_run(lines[5].split()[1])  # `pipeline RUN_ID`
    assert parent.info.run_name == "pipeline-digits-demo-quick" and parent.data.tags["stage"] == "pipeline"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    # --register PREFIX: the tokenizer and the generator in the Model Registry, from the runs just made
    for name, run_id in (("demo-q-tokenizer", run_ids[0]), ("demo-q-generator", run_ids[2])):
        assert [v.run_id for v in client.search_model_versions(f"name = '{name}'")] == [run_id]
        assert f"registered models:/{name}/1" in res.stderr


def test_quick_demo_from_the_shell_prints_the_decode_run_id_last(tracking_dir, tmp_path):
    proc = run_cli("demo", "--quick", "--out", tmp_path / "demo", "--experiment", "demo-script", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = last_line(proc.stdout)
    assert mlflow.MlflowClient().get_run(run_id).data.tags["stage"] == "decode"
    assert (tmp_path / "demo" / "grid.png").is_file()
    assert "[5/5] decode" in proc.stderr
